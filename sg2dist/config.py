"""Typed run configuration: YAML + `--set key=value` overrides -> validated dataclasses.

Each section owns its fields and its checks (`validate`). `load_config` rejects
unknown keys and wrong types with one line naming the key and the fix, before any
heavy work starts. The defaults are the paper's config F training settings; presets
in `configs/` list only what differs.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sg2dist.errors import UserError


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false, so `precision: no` stays a string."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)  # safe: a SafeLoader subclass


class ConfigError(UserError):
    """A config key is unknown, mistyped or inconsistent."""


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# The values of each model key in KERNEL_KEYS. auto: the Triton kernel on CUDA where `triton`
# is installed (measured faster: README, Performance), else PyTorch ops; torch: PyTorch ops
# everywhere; triton: the Triton kernel wherever it can run.
KERNELS = ("auto", "torch", "triton")
KERNEL_KEYS = ("fir_kernel", "bias_act_kernel")  # model keys that pick a PyTorch or Triton form
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@dataclass
class ModelConfig:
    resolution: int = 1024
    img_channels: int = 3
    z_dim: int = 512
    w_dim: int = 512
    c_dim: int = 0  # number of classes; 0 = unconditional. Set from the dataset labels.
    map_layers: int = 8
    map_lr_mult: float = 0.01
    w_avg_beta: float = 0.995  # decay of the tracked mean of w (truncation centre)
    channel_base: int = 32768
    channel_max: int = 512
    mbstd_group: int = 4
    mbstd_features: int = 1
    conv_clamp: float | None = (
        None  # clamp activations to +-conv_clamp (the official fp16 scheme uses 256)
    )
    num_fp16_res: int = 0  # run the N highest resolutions in fp16 (official scheme); 0 = off
    fused_modconv: bool = False  # grouped-conv form of modulated conv (fast for inference)
    fir_kernel: str = "auto"  # FIR resampling: auto (Triton on CUDA), torch or triton
    bias_act_kernel: str = "auto"  # the layer epilogue: auto (Triton on CUDA), torch or triton

    def validate(self) -> None:
        if not (4 <= self.resolution <= 1024 and _is_power_of_two(self.resolution)):
            raise ConfigError(
                f"model.resolution={self.resolution} is not a power of two in 4..1024; "
                "set it to e.g. 32, 256 or 1024"
            )
        if self.img_channels not in (1, 3):
            raise ConfigError(
                f"model.img_channels={self.img_channels}; use 1 (grayscale) or 3 (RGB)"
            )
        for key in ("z_dim", "w_dim", "map_layers", "channel_base", "channel_max", "mbstd_group"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
        if self.c_dim < 0:
            raise ConfigError(f"model.c_dim={self.c_dim} must be >= 0 (0 = unconditional)")
        if not 0.0 <= self.w_avg_beta <= 1.0:
            raise ConfigError(f"model.w_avg_beta={self.w_avg_beta} must be in [0, 1], e.g. 0.995")
        for key in KERNEL_KEYS:
            if getattr(self, key) not in KERNELS:
                raise ConfigError(
                    f"model.{key}='{getattr(self, key)}' is not one of {', '.join(KERNELS)}; "
                    "use auto (Triton on CUDA, PyTorch elsewhere) or torch (PyTorch ops only)"
                )


@dataclass
class DataConfig:
    url: str = ""  # local folder or s3://bucket/prefix holding dataset.json; "" = built-in digits
    mirror: bool = False  # random x-flips
    workers: int = 2  # data worker processes per rank (0: decode in the trainer process)
    shuffle_buffer: int = 256  # samples; the buffer never spans shards (keeps resume exact)
    use_labels: bool = False  # condition on the dataset's labels (sets model.c_dim)

    def validate(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"data.workers={self.workers} must be >= 0")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer={self.shuffle_buffer} must be >= 1")


@dataclass
class TrainConfig:
    kimg: float = 25000  # training length: thousands of real images shown to D
    batch: int = 32  # global batch = batch_gpu x accumulation steps x world size
    batch_gpu: int = 4  # per-GPU micro-batch
    precision: str = "auto"  # auto | no | bf16 | fp16 ; auto = bf16 on GPUs that support it
    # feature-map layout: auto (channels-last on CPU, NCHW on GPUs) | channels_last | contiguous
    memory_format: str = "auto"
    seed: int = 0
    g_lr: float = 0.002
    d_lr: float = 0.002
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    eps: float = 1e-8
    r1_gamma: float = 10.0
    r1_interval: int = 16  # lazy R1: every N D steps; 0 = no R1
    pl_weight: float = 2.0
    pl_interval: int = 4  # lazy path length: every N G steps; 0 = no path length
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    style_mixing_prob: float = 0.9
    ema_kimg: float = 10.0  # G_ema half-life in kimg
    ema_rampup: float | None = None  # e.g. 0.05: half-life <= rampup x cur_nimg
    max_nonfinite_steps: int = 10  # stop after this many skipped steps in a row
    freeze_d: int = 0  # Freeze-D: D's first N layers from the top resolution are not trained

    def validate(self) -> None:
        if self.precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(
                f"train.precision='{self.precision}'; use one of auto, no, bf16, fp16"
            )
        if self.memory_format not in MEMORY_FORMATS:
            raise ConfigError(
                f"train.memory_format='{self.memory_format}'; use one of "
                f"{', '.join(MEMORY_FORMATS)} (auto unless you measured another faster)"
            )
        if self.batch < 1 or self.batch_gpu < 1:
            raise ConfigError(
                f"train.batch={self.batch} and train.batch_gpu={self.batch_gpu} must be >= 1"
            )
        if self.kimg <= 0:
            raise ConfigError(f"train.kimg={self.kimg} must be > 0")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas={self.betas} must be two numbers, e.g. [0.0, 0.99]")
        if self.pl_interval > 0 and self.pl_batch_shrink > self.batch_gpu:
            raise ConfigError(
                f"train.pl_batch_shrink={self.pl_batch_shrink} > train.batch_gpu={self.batch_gpu}; "
                "lower pl_batch_shrink or raise batch_gpu"
            )
        if self.max_nonfinite_steps < 1:
            raise ConfigError("train.max_nonfinite_steps must be >= 1")
        if self.freeze_d < 0:
            raise ConfigError(f"train.freeze_d={self.freeze_d} must be >= 0 (0 = train all of D)")

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(batch_gpu, accumulation steps) for `world_size` processes, or a ConfigError."""
        per_round = self.batch_gpu * world_size
        if self.batch % per_round != 0:
            raise ConfigError(
                f"train.batch={self.batch} is not divisible by train.batch_gpu={self.batch_gpu} x "
                f"world size {world_size} = {per_round}; "
                f"set train.batch to a multiple of {per_round} "
                "or change train.batch_gpu"
            )
        return self.batch_gpu, self.batch // per_round


@dataclass
class RunConfig:
    dir: str = "runs/default"  # local path or s3://bucket/prefix/run-name
    tick_kimg: float = 4.0  # progress line + metrics every N kimg
    snapshot_kimg: float = 200.0  # sample grid + checkpoint every N kimg
    keep_last: int = 3  # checkpoints kept: the last N ...
    keep_every: int = 10  # ... plus every M-th snapshot (0 = none)
    grid: str = "8x8"  # sample grid layout, columns x rows
    # A peer process that sends no heartbeat for this long (frozen, its node hung or cut off)
    # stops the run with exit 75 so the Job restarts every node; collectives fail after
    # twice this (at least +30 s). Shorter frees stalled GPUs sooner; longer tolerates
    # longer stalls of a node (swapping, a slow network). See README, Run on Kubernetes.
    peer_timeout_s: float = 300.0
    # How long a checkpoint or grid write, and the resume at start, keep retrying an
    # unreachable S3 before the snapshot is skipped (training goes on) or the start exits 75.
    storage_retry_s: float = 120.0

    def validate(self) -> None:
        if not self.dir:
            raise ConfigError(
                "run.dir is empty; set it to a local folder or s3://bucket/prefix/name"
            )
        if self.tick_kimg <= 0 or self.snapshot_kimg <= 0:
            raise ConfigError("run.tick_kimg and run.snapshot_kimg must be > 0")
        if self.keep_last < 1:
            raise ConfigError(f"run.keep_last={self.keep_last} must be >= 1")
        if self.peer_timeout_s < 1:
            raise ConfigError(
                f"run.peer_timeout_s={self.peer_timeout_s:g} is too short to tell a silent peer "
                "from a busy one; set it to at least 1 (default 300)"
            )
        if self.storage_retry_s < 0:
            raise ConfigError(f"run.storage_retry_s={self.storage_retry_s:g} must be >= 0")
        parse_grid(self.grid)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<run dir parent>/mlflow.db
    experiment: str = "sg2dist"
    run_name: str = ""  # "" = the run folder's name
    system_metrics: bool = True
    register_model: str = ""  # register G_ema under this name at the end ("" = don't)


@dataclass
class MetricsConfig:
    every_kimg: float = 0.0  # 0 = no metrics during training
    metrics: list[str] = field(default_factory=lambda: ["fid50k"])
    inception_weights: str = ""  # local path or s3:// URL of the torch-fidelity Inception weights
    lpips_weights: str = ""  # local path or s3:// URL of lpips-vgg16.pth (PPL, `sg2dist project`)

    def validate(self) -> None:
        if self.every_kimg < 0:
            raise ConfigError("metrics.every_kimg must be >= 0 (0 = off)")


AUGMENT_MODES = ("none", "ada", "fixed", "diffaugment")
# The official ADA pipelines: groups b(lit), g(eom), c(olor), f(ilter), n(oise), c(utout).
AUGMENT_PIPES = (
    "blit", "geom", "color", "filter", "noise", "cutout", "bg", "bgc", "bgcf", "bgcfn", "bgcfnc",
)  # fmt: skip
P_FROM_CHECKPOINT = "from-checkpoint"


@dataclass
class AugmentConfig:
    """Discriminator augmentation for small datasets (ADA, Karras et al. 2020; DiffAugment)."""

    mode: str = "none"  # none (config F) | ada (adaptive p) | fixed (constant p) | diffaugment
    pipe: str = "bgc"  # ada/fixed: which transform groups, as in the official code
    target: float = 0.6  # ada: the r_t = E[sign(D(real))] that p steers towards
    speed_kimg: float = 500.0  # ada: kimg for p to move by 1
    p_max: float = 1.0  # ada: upper bound of p (below ~0.8 augmentations do not leak)
    # Initial p (ada) or the constant p (fixed): a number in [0, p_max], or "from-checkpoint"
    # (the augment_pipe.p of an imported official pickle). A string so both forms fit.
    p: str = "0"
    interval: int = 4  # ada: adjust p every N steps

    @property
    def initial_p(self) -> float | None:
        """p as a number, or None for from-checkpoint."""
        return None if self.p == P_FROM_CHECKPOINT else float(self.p)

    def validate(self) -> None:
        if self.mode not in AUGMENT_MODES:
            raise ConfigError(f"augment.mode='{self.mode}'; use one of {', '.join(AUGMENT_MODES)}")
        if self.pipe not in AUGMENT_PIPES:
            raise ConfigError(
                f"augment.pipe='{self.pipe}'; use one of {', '.join(AUGMENT_PIPES)} (default bgc)"
            )
        if not 0 <= self.target <= 1:
            raise ConfigError(f"augment.target={self.target} must be in [0, 1] (default 0.6)")
        if self.speed_kimg <= 0:
            raise ConfigError(f"augment.speed_kimg={self.speed_kimg} must be > 0 (default 500)")
        if not 0 < self.p_max <= 1:
            raise ConfigError(f"augment.p_max={self.p_max} must be in (0, 1] (default 1)")
        if self.interval < 1:
            raise ConfigError(f"augment.interval={self.interval} must be >= 1 (default 4)")
        self._validate_p()

    def _validate_p(self) -> None:
        try:
            p = self.initial_p
        except ValueError:
            raise ConfigError(
                f"augment.p='{self.p}' is neither a number nor {P_FROM_CHECKPOINT}; "
                "set e.g. --set augment.p=0.2"
            ) from None
        uses_p = self.mode in ("ada", "fixed")
        if not uses_p and (p is None or p != 0):
            raise ConfigError(
                f"augment.p={self.p} has no effect with augment.mode={self.mode}; "
                "set augment.mode=ada or fixed, or leave augment.p at 0"
            )
        if p is not None and not 0 <= p <= self.p_max:
            raise ConfigError(f"augment.p={self.p} must be in [0, augment.p_max={self.p_max}]")
        if self.mode == "fixed" and p == 0:
            raise ConfigError(
                "augment.mode=fixed with augment.p=0 augments nothing; "
                "set augment.p (e.g. 0.2), or augment.mode=ada to let p adapt"
            )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        self._check_augment_fits_the_model()
        group = min(self.model.mbstd_group, self.train.batch_gpu)
        if self.train.batch_gpu % group != 0:
            raise ConfigError(
                f"train.batch_gpu={self.train.batch_gpu} is not a multiple of the minibatch-stddev "
                f"group model.mbstd_group={self.model.mbstd_group}; use a multiple of {group}"
            )

    def _check_augment_fits_the_model(self) -> None:
        # The image-space filter bank has 43 taps; reflect padding needs 21 pixels each side.
        filtered = self.augment.pipe in ("filter", "bgcf", "bgcfn", "bgcfnc")
        if self.augment.mode in ("ada", "fixed") and filtered and self.model.resolution < 32:
            raise ConfigError(
                f"augment.pipe={self.augment.pipe} filters images with 43 taps and needs "
                f"model.resolution >= 32 (got {self.model.resolution}); use augment.pipe=bgc"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_grid(text: str) -> tuple[int, int]:
    """'8x4' -> (8 columns, 4 rows)."""
    try:
        cols, rows = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"grid '{text}' is not COLSxROWS; write e.g. 8x8") from None
    if cols < 1 or rows < 1:
        raise ConfigError(f"grid '{text}' needs at least 1 column and 1 row")
    return cols, rows


# ---------------------------------------------------------------------------- loading


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [opt for opt in options if opt is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):  # --set train.betas=0,0.99
            value = [load_yaml(part) for part in value.split(",")]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(item, item_type, key) for item in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML reads 1e-4 (no dot) as a string; for a float field it is clearly a number.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key '{key}' must be {annotation.__name__}, got {value!r} "
            f"({type(value).__name__}); fix it in the YAML or with --set {key}=..."
        )
    return value


def _apply(cfg: Config, key: str, value: Any) -> None:
    section_name, _, field_name = key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    if section_name not in sections or not field_name:
        raise ConfigError(
            f"unknown config key '{key}'; keys look like SECTION.NAME with SECTION one of "
            f"{', '.join(sections)}"
        )
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if field_name not in hints:
        raise ConfigError(
            f"unknown config key '{key}'; valid keys in {section_name}: {', '.join(hints)}"
        )
    setattr(section, field_name, _coerce(value, hints[field_name], key))


def _flatten(tree: dict[str, Any], path: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in tree.items():
        if not isinstance(body, dict):
            raise ConfigError(
                f"{path}: top-level key '{section}' must be a section mapping "
                "(model, data, train, run, tracking, metrics, augment)"
            )
        for name, value in body.items():
            flat[f"{section}.{name}"] = value
    return flat


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['train.batch=64', ...] -> {'train.batch': 64}; values are YAML scalars."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set '{pair}' is not KEY=VALUE; write e.g. --set train.batch=64")
        overrides[key.strip()] = load_yaml(text) if text else ""
    return overrides


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    model_from: ModelConfig | None = None,
    model_source: str = "",
) -> Config:
    """Defaults <- YAML file <- --set overrides, then validated.

    `model_from` is the model of the run or pickle that `--init-from` names (`model_source`):
    model.* then comes from it, and a model key that the YAML or --set gives another value is
    an error naming the key and both values.
    """
    cfg = Config()
    set_keys: set[str] = set()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} not found; pass --config with an existing YAML file"
            )
        try:
            tree = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML ({exc}); fix the syntax") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(tree).__name__}")
        for key, value in _flatten(tree, str(path)).items():
            _apply(cfg, key, value)
            set_keys.add(key)
    for key, value in parse_overrides(overrides or []).items():
        _apply(cfg, key, value)
        set_keys.add(key)
    if model_from is not None:
        _take_model(cfg, model_from, set_keys, model_source)
    cfg.validate()
    return cfg


# Model keys that change how the same weights are computed, not which weights exist: a config
# may set them whatever the --init-from source used, and a resumed run may change them.
FREE_MODEL_KEYS = ("fused_modconv", *KERNEL_KEYS)


def same_weights(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether two model configs describe the same weights (they may differ in FREE_MODEL_KEYS)."""
    return dataclasses.replace(a, **{key: getattr(b, key) for key in FREE_MODEL_KEYS}) == b


def _take_model(cfg: Config, source: ModelConfig, set_keys: set[str], source_name: str) -> None:
    for key in sorted(k for k in set_keys if k.startswith("model.")):
        name = key.partition(".")[2]
        mine, theirs = getattr(cfg.model, name), getattr(source, name)
        if name not in FREE_MODEL_KEYS and mine != theirs:
            raise ConfigError(
                f"{key}={mine} in the config, but --init-from {source_name} has {key}={theirs}; "
                f"drop {key} from the config (model.* comes from --init-from)"
            )
    free = {
        name: getattr(cfg.model, name) for name in FREE_MODEL_KEYS if f"model.{name}" in set_keys
    }
    cfg.model = dataclasses.replace(source, **free)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    for key, value in _flatten(tree, "<dict>").items():
        _apply(cfg, key, value)
    cfg.validate()
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
