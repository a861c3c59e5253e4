"""MLflow tracking of a training run; the only module that imports mlflow.

`Tracker.start` opens (or resumes) one MLflow run on the main process and returns
an object the trainer calls every tick and snapshot. Other ranks, and runs with
`tracking.enabled: false`, get an inactive Tracker whose methods do nothing.

Where runs go (first match wins):
  1. `tracking.uri` from the config;
  2. `$MLFLOW_TRACKING_URI`;
  3. a local run dir: `sqlite:///<parent of run.dir>/mlflow.db`, artifacts in
     `<parent of run.dir>/mlartifacts`, so `mlflow ui --backend-store-uri
     sqlite:///runs/mlflow.db` shows every run under ./runs/;
  4. an s3:// run dir: `sqlite:///./mlruns/mlflow.db` on this machine (a note says so;
     a cluster run should set tracking.uri to a shared tracking server).

Failure policy: a URI that does not work at start is a UserError. After start,
tracking must never kill or stall a multi-day run: every MLflow call is guarded,
a failure makes the tracker skip calls for `retry_interval_s`, a warning is printed
at most once per `warn_interval_s`, metrics and tags are kept and sent when the
server answers again (images are dropped while it is away). HTTP timeouts and
retries are shortened through MLflow's own environment variables so a dead server
costs seconds, not minutes, per attempt.

No secret reaches MLflow: config keys named like key/secret/token/password, user:pass@
in URLs, secret-looking query parameters and the values of secret environment
variables are replaced by `***` in params and tags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from sg2dist import storage
from sg2dist.config import Config, ModelConfig
from sg2dist.errors import UserError
from sg2dist.images import to_uint8, z_from_seeds

REDACTED = "***"
_SECRET_NAME = re.compile(r"key|secret|token|passw|credential|auth", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?<=://)[^/\s@]+@")
_SECRET_QUERY = re.compile(
    r"(?<=[?&])([^=&\s]*(?:key|secret|token|passw|signature|credential)[^=&\s]*=)[^&\s]+",
    re.IGNORECASE,
)

# Short HTTP timeouts so that a dead server blocks a training step for seconds, not the
# minutes of MLflow's defaults (7 retries, 120 s). User settings in the environment win.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_MODEL_UPLOAD_TIMEOUT_S = 600  # a 1024 px G_ema is ~120 MB through the artifact proxy
_LIBRARY_LOGGERS = ("urllib3.connectionpool", "mlflow", "botocore", "requests")
_MAX_PENDING_METRICS = 200_000  # about a week of tick metrics; older ones are dropped first
_BATCH_METRICS = 1000  # MLflow's limit per log_batch call
_BATCH_TAGS = 100
SENT, KEPT, REFUSED = "sent", "kept", "refused"  # outcomes of one guarded MLflow call


# ---------------------------------------------------------------------------- secrets


def _secret_env_values() -> list[str]:
    """Values of environment variables named like secrets (AWS_SECRET_ACCESS_KEY, ...)."""
    return [
        value for name, value in os.environ.items() if _SECRET_NAME.search(name) and len(value) >= 8
    ]


def redact_text(text: str) -> str:
    """`text` with URL credentials, secret query values and secret env values masked."""
    text = _URL_USERINFO.sub(REDACTED + "@", text)
    text = _SECRET_QUERY.sub(r"\1" + REDACTED, text)
    for secret in _secret_env_values():
        text = text.replace(secret, REDACTED)
    return text


def redact(key: str, value: Any) -> str:
    """The string MLflow may see for a param or tag `key` = `value`."""
    if _SECRET_NAME.search(key.rsplit(".", 1)[-1]) and value not in ("", None):
        return REDACTED
    return redact_text(str(value))


def flatten_config(cfg: Config) -> dict[str, str]:
    """{'train.batch': '32', ...}: one MLflow param per config key, secrets redacted."""
    params: dict[str, str] = {}
    for section, fields in cfg.to_dict().items():
        for name, value in fields.items():
            key = f"{section}.{name}"
            params[key] = redact(key, value)
    return params


# ---------------------------------------------------------------------------- where runs go


def resolve_tracking_uri(cfg: Config) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None = the server's)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri, None
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    if storage.is_s3(cfg.run.dir):
        store = Path("mlruns").resolve()
        print(
            f"[tracking] run.dir is in S3 and no tracking.uri is set: MLflow runs go to {store} "
            "on this machine; set tracking.uri to a shared server for cluster runs",
            file=sys.stderr,
        )
        return f"sqlite:///{store}/mlflow.db", (store / "artifacts").as_uri()
    store = Path(cfg.run.dir).resolve().parent
    return f"sqlite:///{store}/mlflow.db", (store / "mlartifacts").as_uri()


def _prepare_local_store(uri: str) -> None:
    """sqlite needs the folder of its database file to exist."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # Another run created it between our two calls.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _node_id() -> str:
    """'node<machine rank>' (torchrun GROUP_RANK, Kubernetes JOB_COMPLETION_INDEX)."""
    for var in ("GROUP_RANK", "NODE_RANK", "JOB_COMPLETION_INDEX"):
        if os.environ.get(var, "").isdigit():
            return f"node{os.environ[var]}"
    return "node0"


def _one_line(exc: Exception) -> str:
    """'Type: first line of the message', shortened, secrets masked."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {redact_text(lines[0] if lines else '')[:300]}"


def _is_refusal(exc: Exception) -> bool:
    """A request the server answered with a client error (400 bad value, 404, ...): sending
    it again cannot help. 429 (rate limited) is a temporary failure like being away."""
    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status != 429


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence urllib3/MLflow retry chatter during a guarded call: the tracker prints its own
    rate-limited warning instead of one line per failed request."""
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _env(overrides: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------- the tracker


class Tracker:
    """One MLflow run seen from the trainer. Inactive (all no-ops) unless made by `start`."""

    retry_interval_s = 30.0  # after a failure, skip MLflow calls this long
    warn_interval_s = 60.0  # at most one "MLflow unreachable" warning per this many seconds

    def __init__(
        self, client: MlflowClient | None = None, run_id: str | None = None, uri: str = ""
    ) -> None:
        self._client = client
        self._run_id = run_id
        self.uri = uri
        self._pending_metrics: list[Metric] = []
        self._pending_tags: dict[str, str] = {}
        self._offline_until = 0.0  # time.monotonic() before which calls are skipped
        self._last_warning = -float("inf")
        self._failing = False
        self._system_monitor: SystemMetricsMonitor | None = None

    @classmethod
    def start(
        cls, cfg: Config, *, is_main: bool, run_id: str | None, tags: dict[str, str]
    ) -> Tracker:
        """Open a new run, or continue `run_id` (from a checkpoint); UserError if the URI fails."""
        if not (is_main and cfg.tracking.enabled):
            return cls()
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        uri, artifact_location = resolve_tracking_uri(cfg)
        try:
            _prepare_local_store(uri)
            client = MlflowClient(tracking_uri=uri)
            tracker = cls(client, cls._open_run(client, cfg, run_id, artifact_location), uri)
            tracker._log_start(cfg, tags, resumed=run_id is not None)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"MLflow tracking URI '{redact_text(uri)}' does not work ({_one_line(exc)}); "
                "start the server or fix tracking.uri / MLFLOW_TRACKING_URI, "
                "or set tracking.enabled=false"
            ) from None
        if cfg.tracking.system_metrics:
            tracker._start_system_metrics(resume=run_id is not None)
        print(f"[tracking] MLflow run {tracker.run_id} at {redact_text(uri)}", file=sys.stderr)
        return tracker

    @staticmethod
    def _open_run(
        client: MlflowClient, cfg: Config, run_id: str | None, artifact_location: str | None
    ) -> str:
        if run_id is not None:
            try:
                client.get_run(run_id)
            except MlflowException as exc:
                if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
                    raise
                raise UserError(
                    f"MLflow run {run_id} (from the checkpoint) is not in the tracking store; "
                    "point tracking.uri / MLFLOW_TRACKING_URI at the store that holds it, "
                    "or set tracking.enabled=false"
                ) from None
            client.update_run(run_id, status="RUNNING")
            return run_id
        experiment_id = _experiment_id(client, cfg.tracking.experiment, artifact_location)
        run_name = cfg.tracking.run_name or cfg.run.dir.rstrip("/").rsplit("/", 1)[-1]
        return client.create_run(experiment_id, run_name=run_name).info.run_id

    def _log_start(self, cfg: Config, tags: dict[str, str], *, resumed: bool) -> None:
        params = flatten_config(cfg)
        if resumed:
            # MLflow refuses to change a logged param; a resume may have changed a few
            # (e.g. a longer train.kimg): log only the new keys and name the changed ones.
            logged = self._client.get_run(self._run_id).data.params
            changed = sorted(k for k in params if k in logged and logged[k] != params[k])
            if changed:
                print(
                    f"[tracking] config changed since the run started (params keep their "
                    f"first values): {', '.join(changed)}",
                    file=sys.stderr,
                )
            params = {k: v for k, v in params.items() if k not in logged}
        all_tags = {key: redact(key, value) for key, value in tags.items()}
        all_tags["sg2dist.node"] = f"{_node_id()} ({socket.gethostname()})"
        items = [Param(k, v) for k, v in params.items()]
        for first in range(0, len(items), 100):  # MLflow's limit of params per batch
            self._client.log_batch(self._run_id, params=items[first : first + 100])
        self._client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])

    def _start_system_metrics(self, *, resume: bool) -> None:
        # MLflow's monitor thread samples CPU, memory, disk, network (and GPUs that nvidia-ml-py
        # sees) every 10 s; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides.
        self._system_monitor = SystemMetricsMonitor(
            self._run_id, node_id=_node_id(), tracking_uri=self.uri, resume_logging=resume
        )
        self._system_monitor.start()

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def active(self) -> bool:
        return self._client is not None

    # ------------------------------------------------------------------ guarded calls

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> str:
        """`fn(*args, **kwargs)` unless in the back-off window: SENT, KEPT (server away:
        try again later) or REFUSED (the server rejected this request itself)."""
        now = time.monotonic()
        if now < self._offline_until:
            return KEPT
        try:
            with _quiet_libraries():
                fn(*args, **kwargs)
        except Exception as exc:
            refused = _is_refusal(exc)
            if not refused:
                self._offline_until = now + self.retry_interval_s
                self._failing = True
            if now - self._last_warning >= self.warn_interval_s:
                self._last_warning = now
                what = "refused" if refused else "failed"
                consequence = (
                    "that data is dropped"
                    if refused
                    else f"metrics are kept and retried every {self.retry_interval_s:g} s"
                )
                print(
                    f"[tracking] warning: MLflow at {redact_text(self.uri)} {what} {fn.__name__} "
                    f"({_one_line(exc)}); training goes on, {consequence}",
                    file=sys.stderr,
                )
            return REFUSED if refused else KEPT
        if self._failing:
            self._failing = False
            print("[tracking] MLflow reachable again; logging resumed", file=sys.stderr)
            self._restart_system_metrics()
        return SENT

    def _restart_system_metrics(self) -> None:
        # MLflow's monitor thread stops for good at its first failed request: replace it.
        if self._system_monitor is not None:
            with _quiet_libraries():
                self._system_monitor.finish()
            self._start_system_metrics(resume=True)

    def _flush(self) -> None:
        while self._pending_metrics or self._pending_tags:
            metrics = self._pending_metrics[:_BATCH_METRICS]
            tags = [RunTag(k, v) for k, v in list(self._pending_tags.items())[:_BATCH_TAGS]]
            outcome = self._call(self._client.log_batch, self._run_id, metrics=metrics, tags=tags)
            if outcome == KEPT:
                return
            del self._pending_metrics[: len(metrics)]  # sent, or refused (a bad key or value)
            for tag in tags:
                self._pending_tags.pop(tag.key, None)

    # ------------------------------------------------------------------ what the trainer calls

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at an explicit `step` (kimg or images seen), so curves continue on resume."""
        if not self.active:
            return
        timestamp_ms = int(time.time() * 1000)
        self._pending_metrics += [
            Metric(key, float(value), timestamp_ms, int(step)) for key, value in metrics.items()
        ]
        overflow = len(self._pending_metrics) - _MAX_PENDING_METRICS
        if overflow > 0:
            del self._pending_metrics[:overflow]
        self._flush()

    def set_tag(self, key: str, value: str) -> None:
        if not self.active:
            return
        self._pending_tags[key] = redact(key, value)
        self._flush()

    def log_image(self, image: Any, key: str, step: int) -> None:
        """One image of the series `key` (PIL image or HWC uint8 array); dropped while offline."""
        if not self.active:
            return
        if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]  # MLflow takes greyscale as HW
        self._call(
            self._client.log_image, self._run_id, image, key=key, step=int(step), synchronous=True
        )

    def log_generator(self, G_ema: torch.nn.Module, cfg: Config, *, register_name: str = "") -> str:
        """G_ema as an MLflow pyfunc model (seeds or z, psi -> images); returns its model URI
        ("" when inactive or when MLflow failed)."""
        if not self.active:
            return ""
        model_uri = ""

        def log_generator() -> None:
            nonlocal model_uri
            model_uri = log_generator_model(
                G_ema, cfg.model, self._run_id, self.uri, register_name=register_name
            )

        # The final model is worth one attempt and a warning whatever the back-off says.
        self._offline_until, self._last_warning = 0.0, -float("inf")
        with _env({"MLFLOW_HTTP_REQUEST_TIMEOUT": str(_MODEL_UPLOAD_TIMEOUT_S)}):
            self._call(log_generator)
        return model_uri

    def end(self, status: str = "FINISHED") -> None:
        """Flush, stop system metrics, mark the run FINISHED / FAILED / KILLED."""
        if not self.active:
            return
        self._offline_until = 0.0  # one last try, whatever the back-off says
        self._flush()
        if self._system_monitor is not None:
            with _quiet_libraries():
                self._system_monitor.finish()
            self._system_monitor = None
        self._offline_until = 0.0
        self._call(self._client.set_terminated, self._run_id, status)


class NodeSystemMetrics:
    """System metrics of one more machine, logged into node 0's run under its own node id.

    Only the main process (node 0) tracks; the first process of every other node starts one
    of these with the run id broadcast from node 0, so the run shows every machine's CPU,
    memory and GPUs. Only for a shared tracking server: another machine's local sqlite file
    would never be seen. Failures only print a warning; training goes on.
    """

    def __init__(self, cfg: Config, run_id: str) -> None:
        self._monitor = None
        uri, _ = resolve_tracking_uri(cfg)
        if not (cfg.tracking.enabled and cfg.tracking.system_metrics and run_id):
            return
        if not uri.startswith(("http://", "https://", "databricks")):
            return
        try:
            with _quiet_libraries():
                self._monitor = SystemMetricsMonitor(
                    run_id, node_id=_node_id(), tracking_uri=uri, resume_logging=True
                )
                self._monitor.start()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            print(
                f"[tracking] system metrics of {_node_id()} off: {_one_line(exc)}", file=sys.stderr
            )
            self._monitor = None

    def end(self) -> None:
        if self._monitor is not None:
            with _quiet_libraries():
                self._monitor.finish()
            self._monitor = None


# ---------------------------------------------------------------------------- G_ema as a model


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of G_ema: one row per image, columns `seed` or `z`, optional `psi`
    (truncation, default 1) and `class_idx` (conditional models); returns uint8 images
    [N, H, W, C]. z for a seed is `np.random.RandomState(seed).randn(z_dim)`."""

    def load_context(self, context: Any) -> None:
        from sg2dist.model import build_networks

        model_cfg = ModelConfig(**json.loads(Path(context.artifacts["model_config"]).read_text()))
        G, _ = build_networks(model_cfg)
        G.load_state_dict(
            torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.G = G.eval().requires_grad_(False).to(self.device)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        return _generate_images(self.G, model_input, params or {}, self.device)


def _latents_from_rows(G: torch.nn.Module, rows: Any) -> np.ndarray:
    if "z" in rows.columns and rows["z"].notna().all():
        z = np.stack([np.asarray(z_row, dtype=np.float64) for z_row in rows["z"]])
        if z.shape[1] != G.z_dim:
            raise ValueError(f"z has {z.shape[1]} values per row; this generator takes {G.z_dim}")
        return z
    if "seed" not in rows.columns:
        raise ValueError("give one column 'seed' (int) or 'z' (list of floats) per image")
    return z_from_seeds([int(seed) for seed in rows["seed"]], G.z_dim).numpy()


def _generate_images(
    G: torch.nn.Module, rows: Any, params: dict[str, Any], device: torch.device
) -> np.ndarray:
    z = torch.from_numpy(_latents_from_rows(G, rows)).float().to(device)
    psi = rows["psi"].fillna(1.0).to_numpy() if "psi" in rows.columns else np.ones(len(rows))
    c = torch.zeros(len(rows), G.c_dim, device=device)
    if G.c_dim > 0:
        if "class_idx" not in rows.columns:
            raise ValueError(
                f"this generator is conditional: add a column 'class_idx' in 0..{G.c_dim - 1}"
            )
        c[torch.arange(len(rows)), torch.as_tensor(rows["class_idx"].to_numpy().copy())] = 1
    noise_mode = params.get("noise_mode", "const")
    images = []
    with torch.no_grad():
        # Rows may ask for different psi values: one forward per distinct psi.
        for value in np.unique(psi):
            index = torch.from_numpy(np.flatnonzero(psi == value)).to(device)
            img_NCHW = G(z[index], c[index], truncation_psi=float(value), noise_mode=noise_mode)
            images.append((index, img_NCHW))
    img_NCHW = torch.empty(len(rows), *images[0][1].shape[1:], device=device)
    for index, part in images:
        img_NCHW[index] = part.float()
    return to_uint8(img_NCHW)


def _generator_signature(model_cfg: ModelConfig) -> ModelSignature:
    columns = [
        ColSpec("long", "seed", required=False),
        ColSpec(Array("double"), "z", required=False),
        ColSpec("double", "psi", required=False),
    ]
    if model_cfg.c_dim > 0:
        columns.append(ColSpec("long", "class_idx", required=False))
    res, channels = model_cfg.resolution, model_cfg.img_channels
    return ModelSignature(
        inputs=Schema(columns),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, res, res, channels))]),
        params=ParamSchema([ParamSpec("noise_mode", "string", "const")]),
    )


def log_generator_model(
    G_ema: torch.nn.Module,
    model_cfg: ModelConfig,
    run_id: str,
    tracking_uri: str,
    *,
    register_name: str = "",
) -> str:
    """Log G_ema to `run_id` as the pyfunc model 'generator'; returns its model URI.
    The weights travel as a tensor file plus the ModelConfig JSON, so loading them
    unpickles no code."""
    example = pd.DataFrame({"seed": [0, 1], "psi": [1.0, 0.7]})
    if model_cfg.c_dim > 0:
        example["class_idx"] = [0, 0]
    with tempfile.TemporaryDirectory(prefix="sg2dist-generator-") as tmp:
        weights = Path(tmp, "generator.pt")
        torch.save({k: v.detach().cpu() for k, v in G_ema.state_dict().items()}, weights)
        config_file = Path(tmp, "model_config.json")
        config_file.write_text(json.dumps(dataclasses.asdict(model_cfg)))
        mlflow.set_tracking_uri(tracking_uri)  # Model.log reads the process-wide URI
        info = Model.log(
            artifact_path=None,
            name="generator",
            flavor=mlflow.pyfunc,
            python_model=GeneratorModel(),
            artifacts={"weights": str(weights), "model_config": str(config_file)},
            code_paths=[str(Path(__file__).resolve().parent)],  # loads without sg2dist
            signature=_generator_signature(model_cfg),
            input_example=example,
            pip_requirements=["torch", "numpy", "pandas", "pyyaml"],
            registered_model_name=register_name or None,
            run_id=run_id,
        )
    return info.model_uri
