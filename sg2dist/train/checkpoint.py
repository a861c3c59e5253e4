"""Checkpoints: immutable step folders in the run folder, a `latest` pointer written last.

Layout under `<run.dir>/checkpoints/`:

    nimg-000012800/state.pt    tensors only (torch.save of a dict; loads with weights_only=True)
    nimg-000012800/meta.json   counters, config, data stream positions, MLflow run id,
                               and the sha256 + size of state.pt; written after state.pt
    latest                     the name of the newest complete folder; written last

A reader trusts a folder only when its meta.json exists and state.pt matches the
recorded hash, so a process killed mid-write can never leave a checkpoint that
looks complete. If `latest` names a broken folder, the newest verified one wins.

What a training checkpoint holds is declared here, in one place (`training_contents`,
`restore_training`): G, D, G_ema, both optimizers, the fp16 gradient scaler, the CPU
RNG state of every rank (state.pt); the loop counters, pl_mean, skipped steps, ADA's p
and r_t accumulator, every rank's data stream position, the MLflow run id and the resolved
config (meta.json).
That is everything needed to continue exactly as if never interrupted.

An official network pickle (`sg2dist import`, or a .pkl / https:// URL wherever a checkpoint
URL is taken) becomes a weights-only checkpoint (`imported_contents`): G, D, G_ema and the
inferred config, with what the pickle says about its training under meta.json "imported".
It can start a run (--init-from) but not resume one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sg2dist import __version__, interop, storage
from sg2dist.config import Config, ModelConfig, config_from_dict, same_weights
from sg2dist.errors import UserError
from sg2dist.train.step import Nets, StepState

if TYPE_CHECKING:
    from sg2dist.model import Generator

STATE_FILE = "state.pt"
META_FILE = "meta.json"
POINTER_FILE = "latest"
FOLDER_PREFIX = "nimg-"


FORMAT = 1  # meta.json "format"; bump when a reader can no longer read older folders


@dataclass
class Progress:
    """Counters of the loop (paper vocabulary), restored from meta.json."""

    cur_nimg: int = 0  # real images shown to D so far
    cur_tick: int = 0
    step: int = 0  # training iterations (one global batch each)
    tick_start_nimg: int = 0
    next_snapshot_nimg: int = 0
    metrics_done_period: int = -1  # index of the last metrics.every_kimg period scored


@dataclass
class Checkpoint:
    url: str  # the step folder
    state: dict[str, Any]  # tensors and plain containers of tensors/numbers
    meta: dict[str, Any]  # JSON


def checkpoints_url(run_dir: str) -> str:
    return storage.join(run_dir, "checkpoints")


def folder_name(cur_nimg: int) -> str:
    return f"{FOLDER_PREFIX}{cur_nimg:012d}"


def save_checkpoint(
    run_dir: str, cur_nimg: int, state: dict[str, Any], meta: dict[str, Any], *, retry_s: float = 0
) -> str:
    """Write state.pt, then meta.json, then the `latest` pointer. Main process only.

    While S3 is unreachable the three writes are tried again as one, for up to `retry_s`
    (storage.retry_unavailable); then StorageUnavailableError. A failed attempt leaves at
    most a folder without a matching meta.json, never read as a checkpoint, or a complete
    one that `latest` does not name yet.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    state_bytes = buffer.getvalue()
    folder = storage.join(checkpoints_url(run_dir), folder_name(cur_nimg))
    meta = dict(
        meta,
        state_sha256=hashlib.sha256(state_bytes).hexdigest(),
        state_bytes=len(state_bytes),
    )
    meta_text = json.dumps(meta, indent=1, sort_keys=True)

    def write_folder() -> None:
        storage.write_bytes(storage.join(folder, STATE_FILE), state_bytes)
        failpoint("checkpoint-after-state")
        storage.write_text(storage.join(folder, META_FILE), meta_text)
        storage.write_text(
            storage.join(checkpoints_url(run_dir), POINTER_FILE), folder_name(cur_nimg)
        )

    failpoint("checkpoint-before-write")
    storage.retry_unavailable(write_folder, what=f"writing checkpoint {folder}", budget_s=retry_s)
    return folder


def failpoint(name: str) -> None:
    """Stop this process here when SG2DIST_FAILPOINT names this point.

    `SG2DIST_FAILPOINT=NAME` kills it (SIGKILL); `NAME:stop` suspends it (SIGSTOP) until a
    SIGCONT, every time it passes. Fault tests use it to die exactly between two writes, or
    to take S3 away exactly while a checkpoint is due, which a timed signal would hit only
    by luck.
    """
    wanted, _, action = os.environ.get("SG2DIST_FAILPOINT", "").partition(":")
    if wanted == name:
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


def _read_verified(folder: str) -> Checkpoint | None:
    """The checkpoint in `folder` if it is complete and intact, else None."""
    meta_url = storage.join(folder, META_FILE)
    if not storage.exists(meta_url):
        return None
    try:
        meta = json.loads(storage.read_text(meta_url))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a garbled meta.json is a broken checkpoint, not a crash
    state_url = storage.join(folder, STATE_FILE)
    if not isinstance(meta, dict) or not storage.exists(state_url):
        return None
    state_bytes = storage.read_bytes(state_url)
    if hashlib.sha256(state_bytes).hexdigest() != meta.get("state_sha256"):
        return None
    state = torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True)
    return Checkpoint(url=folder, state=state, meta=meta)


def _step_folders(run_dir: str) -> list[str]:
    root = checkpoints_url(run_dir)
    if not storage.exists(root):
        return []
    names = [n.rstrip("/") for n in storage.listdir(root)]
    return sorted(n for n in names if n.startswith(FOLDER_PREFIX))


def find_latest(run_dir: str) -> Checkpoint | None:
    """The newest complete checkpoint of a run folder: `latest` if intact, else a fallback."""
    root = checkpoints_url(run_dir)
    pointer = storage.join(root, POINTER_FILE)
    candidates = list(reversed(_step_folders(run_dir)))
    if storage.exists(pointer):
        named = storage.read_text(pointer).strip()
        # Only folders at or before the pointer: a newer folder may be a half-written one.
        candidates = [named] + [n for n in candidates if n < named]
    for name in candidates:
        checkpoint = _read_verified(storage.join(root, name))
        if checkpoint is not None:
            return checkpoint
    return None


def load_checkpoint(url: str) -> Checkpoint:
    """A run folder (its latest checkpoint) or one step folder; one clear error if neither.
    An official network pickle (.pkl or http(s) URL) is imported in memory."""
    if interop.is_network_pickle(url):
        state, meta = imported_contents(interop.read_network_pickle(url))
        return Checkpoint(url=storage.display_url(url), state=state, meta=meta)
    url = url.rstrip("/")
    if storage.exists(storage.join(url, META_FILE)):
        checkpoint = _read_verified(url)
        if checkpoint is None:
            raise UserError(
                f"checkpoint {url} is incomplete or corrupt (state.pt does not match meta.json); "
                "pass the run folder to use its newest intact checkpoint"
            )
        return checkpoint
    checkpoint = find_latest(url)
    if checkpoint is None:
        raise UserError(
            f"no checkpoint found at {url}; pass a run folder that holds checkpoints/ "
            "or a checkpoints/nimg-... folder"
        )
    return checkpoint


def prune_checkpoints(
    run_dir: str, *, keep_last: int, keep_every: int, snapshot_nimg: int
) -> list[str]:
    """Delete all but the last `keep_last` folders and every `keep_every`-th snapshot.

    "Every M-th" is decided from the folder's image count (nimg is a multiple of
    M x snapshot_nimg), so it stays stable however many folders were deleted before.
    Checkpoints written off the snapshot grid (SIGTERM, end of run) count only as "last".
    """
    names = _step_folders(run_dir)
    keep = set(names[-keep_last:])
    if keep_every > 0:
        period_nimg = keep_every * snapshot_nimg
        keep |= {n for n in names if int(n[len(FOLDER_PREFIX) :]) % period_nimg == 0}
    removed = [name for name in names if name not in keep]
    for name in removed:
        storage.remove_tree(storage.join(checkpoints_url(run_dir), name))
    return removed


def load_generator(
    url: str, device: str | torch.device = "cpu"
) -> tuple[Generator, Config, dict[str, Any]]:
    """(G_ema in eval mode on `device`, the run's Config, meta) from a run or step folder."""
    from sg2dist.model import build_networks

    checkpoint = load_checkpoint(url)
    cfg: Config = config_from_dict(checkpoint.meta["config"])
    G_ema, _ = build_networks(cfg.model)
    G_ema.load_state_dict(checkpoint.state["G_ema"])
    return G_ema.eval().requires_grad_(False).to(device), cfg, checkpoint.meta


def imported_contents(
    imported: interop.ImportedNetworks, run_dir: str = ""
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a weights-only checkpoint made from an official network pickle (to
    be saved into `run_dir`, if given)."""
    cfg = Config()
    cfg.run.dir = run_dir or cfg.run.dir
    cfg.model = imported.model
    cfg.data.use_labels = imported.model.c_dim > 0
    cfg.data.mirror = bool(imported.info.get("xflip"))
    cfg.validate()
    state = {"G": imported.G, "D": imported.D, "G_ema": imported.G_ema}
    meta = {
        "format": FORMAT,
        "sg2dist_version": __version__,
        "config": cfg.to_dict(),
        "imported": imported.info,
    }
    return state, meta


def source_model(checkpoint: Checkpoint) -> ModelConfig:
    """The model config of the run or pickle that --init-from names."""
    return config_from_dict(checkpoint.meta["config"]).model


# ---------------------------------------------------------------------------- training contents


def training_contents(
    *,
    nets: Nets,
    scaler: torch.amp.GradScaler | None,
    progress: Progress,
    step_state: StepState,
    cfg: Config,
    rng_cpu: list[torch.Tensor],
    data_states: list[dict[str, Any]],
    mlflow_run_id: str | None,
    checkpoint_failures: int = 0,
    augment: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a training checkpoint. `rng_cpu` and `data_states` hold one entry
    per rank, gathered by the caller; `augment` is AugmentState.to_dict with the r_t
    accumulator already reduced over ranks."""
    state = {
        "G": nets.G_net.state_dict(),
        "D": nets.D_net.state_dict(),
        "G_ema": nets.G_ema.state_dict(),
        "G_opt": nets.G_opt.state_dict(),
        "D_opt": nets.D_opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng_cpu": rng_cpu,
    }
    meta = {
        "format": FORMAT,
        "sg2dist_version": __version__,
        "progress": dataclasses.asdict(progress),
        "pl_mean": float(step_state.pl_mean),
        "skipped_steps": int(step_state.skipped_steps),
        "world_size": len(rng_cpu),
        "data_states": data_states,
        "mlflow_run_id": mlflow_run_id,
        "checkpoint_failures": checkpoint_failures,  # absent in older checkpoints: 0
        "config": cfg.to_dict(),
    }
    if augment is not None:
        meta["augment"] = augment
    return state, meta


def restore_training(
    checkpoint: Checkpoint,
    *,
    cfg: Config,
    nets: Nets,
    scaler: torch.amp.GradScaler | None,
    progress: Progress,
    step_state: StepState,
    rank: int,
    world_size: int,
) -> dict[str, Any] | None:
    """Load every piece of `training_contents` into the given parts; returns this rank's
    data stream state (None when the world size changed: the stream restarts)."""
    meta, state = checkpoint.meta, checkpoint.state
    if "G_opt" not in state:
        raise UserError(
            f"checkpoint {checkpoint.url} holds weights only (an imported network); "
            f"start a new run.dir with --init-from {checkpoint.url}"
        )
    # Through config_from_dict: keys added since the checkpoint was written get defaults.
    trained = config_from_dict(meta["config"])
    if not same_weights(trained.model, cfg.model):
        raise UserError(
            f"checkpoint {checkpoint.url} was trained with a different model config; "
            "use a new run.dir, or --init-from to fine-tune its weights"
        )
    if trained.train.freeze_d != cfg.train.freeze_d:
        raise UserError(
            f"checkpoint {checkpoint.url} was trained with train.freeze_d="
            f"{trained.train.freeze_d}; resume with the same value (its D optimizer holds "
            "the unfrozen layers only)"
        )
    nets.G_net.load_state_dict(state["G"])
    nets.D_net.load_state_dict(state["D"])
    nets.G_ema.load_state_dict(state["G_ema"])
    nets.G_opt.load_state_dict(state["G_opt"])
    nets.D_opt.load_state_dict(state["D_opt"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    for key in dataclasses.asdict(progress):
        setattr(progress, key, int(meta["progress"][key]))
    step_state.pl_mean.fill_(float(meta["pl_mean"]))
    step_state.skipped_steps.fill_(int(meta["skipped_steps"]))
    if "augment" in meta:  # absent in checkpoints written before augmentation existed
        step_state.augment.load_dict(meta["augment"])
    if meta["world_size"] != world_size:
        return None
    torch.set_rng_state(state["rng_cpu"][rank])
    return meta["data_states"][rank]


def imported_augment_p(meta: dict[str, Any]) -> float | None:
    """The augment_pipe.p of an official pickle this checkpoint was imported from (meta.json
    `imported.augment_p`), or None when it was not imported or recorded no usable p."""
    imported = meta.get("imported")
    value = imported.get("augment_p") if isinstance(imported, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return min(max(float(value), 0.0), 1.0)
    return None


def load_weights(checkpoint: Checkpoint, nets: Nets) -> None:
    """--init-from: G, D and G_ema weights (w_avg included) for fine-tuning; counters and
    optimizers start fresh."""
    try:
        nets.G_net.load_state_dict(checkpoint.state["G"])
        nets.D_net.load_state_dict(checkpoint.state["D"])
        nets.G_ema.load_state_dict(checkpoint.state["G_ema"])
    except RuntimeError as exc:
        raise UserError(
            f"--init-from {checkpoint.url}: its networks do not match model.* of this config "
            f"({str(exc)[:120]}...); "
            "use the same model settings as that run"
        ) from None
