"""MLflow tracking of a training run: the `Tracker` the main process logs through.

`Tracker.start` opens (or resumes) one MLflow run and returns an object the trainer
calls every tick and snapshot. Other ranks, and runs with `tracking.enabled: false`,
get a `NullTracker` (sg2dist/tracking/__init__.py) instead; it lives apart from this
module so that runs without tracking never import MLflow. The first process of every
other node gets a `NodeTracker`, which logs only that machine's system metrics into
the same run.

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
costs seconds, not minutes, per attempt. Secrets are masked (sg2dist.tracking.redact).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from sg2dist import storage
from sg2dist.config import Config
from sg2dist.errors import UserError
from sg2dist.tracking import GENERATOR_TAG, NullTracker
from sg2dist.tracking.generator_model import GENERATOR_MODEL_NAME, log_generator_model
from sg2dist.tracking.names import mlflow_metric_name, score_metric_name
from sg2dist.tracking.redact import flatten_config, redact, redact_text

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


class Tracker(NullTracker):
    """One MLflow run seen from the main process; made by `start`."""

    run_id: str  # always set: `start` opens or continues a run

    retry_interval_s = 30.0  # after a failure, skip MLflow calls this long
    warn_interval_s = 60.0  # at most one "MLflow unreachable" warning per this many seconds

    def __init__(self, client: MlflowClient, run_id: str, uri: str) -> None:
        super().__init__(run_id)
        self._client = client
        self.uri = uri
        self._pending_metrics: list[Metric] = []
        self._pending_tags: dict[str, str] = {}
        self._offline_until = 0.0  # time.monotonic() before which calls are skipped
        self._last_warning = -float("inf")
        self._failing = False
        self._system_monitor: SystemMetricsMonitor | None = None

    @classmethod
    def start(cls, cfg: Config, *, run_id: str | None, tags: dict[str, str]) -> Tracker:
        """Open a new run, or continue `run_id` (from a checkpoint); UserError if the URI fails."""
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
            logged = self._client.get_run(self.run_id).data.params
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
            self._client.log_batch(self.run_id, params=items[first : first + 100])
        self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])

    def _start_system_metrics(self, *, resume: bool) -> None:
        # MLflow's monitor thread samples CPU, memory, disk, network (and GPUs that nvidia-ml-py
        # sees) every 10 s; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides.
        self._system_monitor = SystemMetricsMonitor(
            self.run_id, node_id=_node_id(), tracking_uri=self.uri, resume_logging=resume
        )
        self._system_monitor.start()

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
            outcome = self._call(self._client.log_batch, self.run_id, metrics=metrics, tags=tags)
            if outcome == KEPT:
                return
            del self._pending_metrics[: len(metrics)]  # sent, or refused (a bad key or value)
            for tag in tags:
                self._pending_tags.pop(tag.key, None)

    # ------------------------------------------------------------------ what the trainer calls

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at an explicit `step` (kimg or images seen), so curves continue on resume,
        under their grouped MLflow names (loss_G -> loss/G: names.py)."""
        timestamp_ms = int(time.time() * 1000)
        self._pending_metrics += [
            Metric(mlflow_metric_name(key), float(value), timestamp_ms, int(step))
            for key, value in metrics.items()
        ]
        overflow = len(self._pending_metrics) - _MAX_PENDING_METRICS
        if overflow > 0:
            del self._pending_metrics[:overflow]
        self._flush()

    def log_scores(self, scores: dict[str, float], step: int) -> None:
        self.log_metrics({score_metric_name(name): value for name, value in scores.items()}, step)

    def set_tag(self, key: str, value: str) -> None:
        self._pending_tags[key] = redact(key, value)
        self._flush()

    def log_image(self, image: Any, key: str, step: int) -> None:
        """One image of the series `key` (PIL image or HWC uint8 array); dropped while offline."""
        if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]  # MLflow takes greyscale as HW
        self._call(
            self._client.log_image, self.run_id, image, key=key, step=int(step), synchronous=True
        )

    def log_generator(self, G_ema: torch.nn.Module, cfg: Config, *, register_name: str = "") -> str:
        """G_ema as an MLflow pyfunc model (seeds or z, psi -> images); returns its model URI
        ("" when MLflow failed)."""
        model_uri = ""

        def log_generator() -> None:
            nonlocal model_uri
            model_uri = log_generator_model(
                G_ema, cfg.model, self.run_id, self.uri, register_name=register_name
            )

        # The final model is worth one attempt and a warning whatever the back-off says.
        self._offline_until, self._last_warning = 0.0, -float("inf")
        with _env({"MLFLOW_HTTP_REQUEST_TIMEOUT": str(_MODEL_UPLOAD_TIMEOUT_S)}):
            self._call(log_generator)
        return model_uri

    def log_file(self, local_path: str, artifact_folder: str) -> str:
        """One file (e.g. an exported ONNX model) as an artifact; its `runs:/` URI, "" when
        MLflow failed."""
        self._offline_until, self._last_warning = 0.0, -float("inf")
        with _env({"MLFLOW_HTTP_REQUEST_TIMEOUT": str(_MODEL_UPLOAD_TIMEOUT_S)}):
            outcome = self._call(
                self._client.log_artifact, self.run_id, local_path, artifact_folder
            )
        if outcome != SENT:
            return ""
        return f"runs:/{self.run_id}/{artifact_folder}/{Path(local_path).name}"

    def ensure_registered(self, model_uri: str, name: str) -> None:
        """Register `model_uri` under `name` unless a version of it is there already: a run
        killed between the model upload and its registration (both inside Model.log), then
        restarted, finds the logged model and registers it here."""
        model_id = model_uri.removeprefix("models:/")

        def register() -> None:
            versions = self._client.search_model_versions(f"name='{name}'")
            if any(v.source == model_uri or v.model_id == model_id for v in versions):
                return
            if not versions:
                try:
                    self._client.create_registered_model(name)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
            self._client.create_model_version(name, model_uri, self.run_id, model_id=model_id)

        self._offline_until, self._last_warning = 0.0, -float("inf")
        self._call(register)

    def logged_generator_uri(self) -> str:
        """The run's `generator_model_uri` tag, else the URI of a complete (READY) generator
        model logged by this run: a run killed after the upload but before the tag, then
        restarted, must set the tag, not upload a second model. "" when there is none, or
        when MLflow does not answer (then the model is logged again, which is harmless)."""
        found: list[str] = []

        def find_generator_model() -> None:
            run = self._client.get_run(self.run_id)
            if run.data.tags.get(GENERATOR_TAG):
                found.append(run.data.tags[GENERATOR_TAG])
                return
            models = self._client.search_logged_models(
                [run.info.experiment_id], filter_string=f"source_run_id = '{self.run_id}'"
            )
            found.extend(
                m.model_uri
                for m in models
                if m.name == GENERATOR_MODEL_NAME and m.status == LoggedModelStatus.READY
            )

        self._call(find_generator_model)
        return found[0] if found else ""

    def end(self, status: str = "FINISHED") -> None:
        """Flush, stop system metrics, mark the run FINISHED / FAILED / KILLED."""
        self._offline_until = 0.0  # one last try, whatever the back-off says
        self._flush()
        if self._system_monitor is not None:
            with _quiet_libraries():
                self._system_monitor.finish()
            self._system_monitor = None
        self._offline_until = 0.0
        self._call(self._client.set_terminated, self.run_id, status)


class NodeTracker(NullTracker):
    """System metrics of one more machine, logged into node 0's run under its own node id.

    Only the main process (node 0) tracks; the first process of every other node makes
    one of these with the run id broadcast from node 0, so the run shows every machine's
    CPU, memory and GPUs. Only for a shared tracking server: another machine's local
    sqlite file would never be seen. Failures only print a warning; training goes on.
    """

    def __init__(self, cfg: Config, run_id: str | None) -> None:
        super().__init__(run_id)
        self._monitor: SystemMetricsMonitor | None = None
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
        except Exception as exc:  # tracking must never stop training
            print(
                f"[tracking] system metrics of {_node_id()} off: {_one_line(exc)}", file=sys.stderr
            )
            self._monitor = None

    def end(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            with _quiet_libraries():
                self._monitor.finish()
            self._monitor = None
