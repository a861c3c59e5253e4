"""Everything a run is made of, built from the config before the first step.

`build_session(cfg, resume=..., init_from=...)` makes the Accelerator, resolves the
dataset, builds G, D, G_ema and their optimizers (D's first train.freeze_d layers frozen),
restores a checkpoint (or loads --init-from weights), starts the data stream where the
checkpoint left it and opens the MLflow run. The loop (loop.py) only runs what this returns.
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import os
from dataclasses import dataclass
from typing import cast

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    broadcast_object_list,
)

from sg2dist import __version__, storage
from sg2dist.augment import Augmenter, AugmentState, initial_state
from sg2dist.config import KERNEL_KEYS, P_FROM_CHECKPOINT, Config, RunConfig, dump_config
from sg2dist.data import (
    Manifest,
    StreamLoader,
    build_loader,
    check_resolution,
    ensure_digits_dataset,
    open_manifest,
)
from sg2dist.errors import UserError
from sg2dist.model import Discriminator, Generator, build_networks
from sg2dist.model.layers import use_conv_layout_
from sg2dist.tracking import NullTracker, start_tracker
from sg2dist.train import checkpoint as ckpt
from sg2dist.train.loss import lazy_adam_hparams
from sg2dist.train.peers import Peers, collective_timeout_s, nccl_environment
from sg2dist.train.step import Nets, StepContext, StepState, phase_table


@dataclass
class Session:
    """Everything one run holds; made by `build_session`, run by `loop.train`."""

    cfg: Config
    accelerator: Accelerator
    nets: Nets
    ctx: StepContext
    progress: ckpt.Progress
    step_state: StepState
    batch_gpu: int
    accum: int
    loader: StreamLoader  # this rank's batches; loader.state is what the loop consumed
    manifest: Manifest
    tracker: NullTracker
    peers: Peers  # heartbeats, and the store waits for rank 0's long work (peers.py)
    stop_requested: bool = False  # set by a signal handler on this rank
    stop_deadline: float | None = None  # time.monotonic() by which a stop checkpoint must land
    checkpoint_failures: int = 0  # snapshots whose checkpoint could not be written (S3 down)
    data_wait_s: float = 0.0  # seconds spent waiting for batches since the last tick

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def on_main(self, fn, *args, **kwargs):
        """Run a side effect on the main process only; the others get None."""
        return fn(*args, **kwargs) if self.is_main else None


def build_session(cfg: Config, *, resume: str, init_from: ckpt.Checkpoint | None = None) -> Session:
    """`init_from`: the --init-from checkpoint (or imported pickle), already read, whose model
    config `cfg.model` was taken from (config.load_config(model_from=...))."""
    accelerator = make_accelerator(cfg.train.precision, cfg.run.peer_timeout_s)
    peers = Peers(
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        peer_timeout_s=cfg.run.peer_timeout_s,
    )
    peers.start()  # from here on, a rank that freezes is named within run.peer_timeout_s
    batch_gpu, accum = cfg.train.batch_layout(accelerator.num_processes)
    manifest = resolve_dataset(cfg, accelerator)
    nets = build_nets(cfg, accelerator)
    ctx = build_step_context(cfg, accelerator)
    progress = ckpt.Progress(next_snapshot_nimg=snapshot_nimg(cfg))
    step_state = StepState.on(accelerator.device)
    checkpoint = find_checkpoint_retrying(cfg, resume)
    data_state, run_id = None, None
    if checkpoint is not None:
        data_state = ckpt.restore_training(
            checkpoint,
            cfg=cfg,
            nets=nets,
            scaler=ctx.scaler,
            progress=progress,
            step_state=step_state,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        run_id = checkpoint.meta.get("mlflow_run_id")
        restarted = " (world size changed: data stream restarts from new positions)"
        accelerator.on_main_process(print)(
            f"resumed from {checkpoint.url} at kimg {progress.cur_nimg / 1000:.1f}"
            + ("" if checkpoint.meta["world_size"] == accelerator.num_processes else restarted),
            flush=True,
        )
    elif init_from is not None:
        ckpt.load_weights(init_from, nets)
    if checkpoint is None or "augment" not in checkpoint.meta:
        start = checkpoint if checkpoint is not None else init_from
        step_state.augment = initial_augment(
            cfg, start.meta if start else None, start.url if start else ""
        )
    elif cfg.augment.mode == "fixed" and cfg.augment.initial_p is not None:
        step_state.augment.p = cfg.augment.initial_p  # fixed: the config's p, even on resume
    loader = build_loader(
        cfg.data.url,
        batch_gpu=batch_gpu,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.train.seed,
        workers=cfg.data.workers,
        mirror=cfg.data.mirror,
        shuffle_buffer=cfg.data.shuffle_buffer,
        use_labels=cfg.data.use_labels,
        state=data_state,
        # Page-locked batches let the host-to-GPU copy run asynchronously (non_blocking).
        pin_memory=accelerator.device.type == "cuda",
    )
    session = Session(
        cfg=cfg,
        accelerator=accelerator,
        nets=nets,
        ctx=ctx,
        progress=progress,
        step_state=step_state,
        batch_gpu=batch_gpu,
        accum=accum,
        loader=loader,
        manifest=manifest,
        tracker=build_tracker(cfg, accelerator, run_id, manifest),
        peers=peers,
        checkpoint_failures=int(checkpoint.meta.get("checkpoint_failures", 0)) if checkpoint else 0,
    )
    session.on_main(storage.write_text, storage.join(cfg.run.dir, "config.yaml"), dump_config(cfg))
    return session


def make_accelerator(
    precision: str, peer_timeout_s: float = RunConfig.peer_timeout_s
) -> Accelerator:
    use_cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if use_cuda and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not use_cuda:
        raise UserError("train.precision=fp16 needs a CUDA GPU; use no or bf16 on CPU")
    if use_cuda:
        # Every step has the same shapes: let cuDNN time its algorithms once and keep the
        # fastest (as the official training loop does).
        torch.backends.cudnn.benchmark = True
    handlers = [
        # w_avg and noise buffers are not trained; broadcasting them every forward only costs time.
        DistributedDataParallelKwargs(broadcast_buffers=False),
        # Short: rank 0's long work is waited for in the store, not in collectives (peers.py).
        InitProcessGroupKwargs(
            timeout=datetime.timedelta(seconds=collective_timeout_s(peer_timeout_s))
        ),
    ]
    for key, value in nccl_environment(peer_timeout_s).items():
        os.environ.setdefault(key, value)  # read when the process group starts; user's win
    # Before the process group starts: imported after it (DDP imports it when it wraps a
    # network), torch._dynamo keeps 10 references to the group's Python object, so
    # destroy_process_group can no longer end it. Its gloo threads then live on into
    # interpreter shutdown, where now and then one aborts the finished process (SIGABRT,
    # "terminate called without an active exception"; 3 of 50 two-process runs).
    importlib.import_module("torch._dynamo")

    return Accelerator(mixed_precision=precision, cpu=not use_cuda, kwargs_handlers=handlers)


def resolve_dataset(cfg: Config, accelerator: Accelerator) -> Manifest:
    """The dataset manifest; builds the built-in digits on first use (main process first)."""
    if not cfg.data.url:
        folder = storage.join(local_runs_root(cfg), "datasets", "digits32")
        with accelerator.main_process_first():
            cfg.data.url = ensure_digits_dataset(folder)
    manifest = open_manifest(cfg.data.url)
    check_resolution(manifest, cfg.model.resolution, cfg.model.img_channels)
    if cfg.data.use_labels:
        if manifest.c_dim == 0:
            raise UserError(
                f"data.use_labels=true but {cfg.data.url} has no labels; set it to false"
            )
        cfg.model.c_dim = manifest.c_dim
    elif cfg.model.c_dim > 0:
        raise UserError(
            f"model.c_dim={cfg.model.c_dim} (a conditional model) needs labels; set "
            "data.use_labels=true with a dataset of that many classes"
        )
    return manifest


def local_runs_root(cfg: Config) -> str:
    """The parent of a local run folder, else ./runs (built-in dataset, local MLflow store)."""
    if storage.is_s3(cfg.run.dir):
        return "runs"
    return os.path.dirname(os.path.normpath(cfg.run.dir)) or "."


def snapshot_nimg(cfg: Config) -> int:
    return max(int(cfg.run.snapshot_kimg * 1000), 1)


def build_nets(cfg: Config, accelerator: Accelerator) -> Nets:
    for key in KERNEL_KEYS:
        if getattr(cfg.model, key) == "triton" and importlib.util.find_spec("triton") is None:
            # Checked here, not in the config: a model trained with it loads anywhere.
            raise UserError(
                f"model.{key}=triton needs the `triton` package (Linux builds of torch "
                f"install it); install it or set model.{key}=auto"
            )
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    G, D = build_networks(cfg.model)
    G = use_conv_layout_(G, accelerator.device, cfg.train.memory_format)
    D = use_conv_layout_(D, accelerator.device, cfg.train.memory_format)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False).to(accelerator.device)
    # Frozen before DDP wraps D: its reducer then leaves the frozen layers out.
    D_params = freeze_d_layers(D, cfg.train.freeze_d)
    t = cfg.train
    g_lr, g_betas = lazy_adam_hparams(t.g_lr, t.betas, t.pl_interval if t.pl_weight > 0 else 0)
    d_lr, d_betas = lazy_adam_hparams(t.d_lr, t.betas, t.r1_interval if t.r1_gamma > 0 else 0)
    # fused: one kernel for all parameters instead of ~10 ops per tensor (CPU and CUDA).
    G_opt = torch.optim.Adam(G.parameters(), lr=g_lr, betas=g_betas, eps=t.eps, fused=True)
    D_opt = torch.optim.Adam(D_params, lr=d_lr, betas=d_betas, eps=t.eps, fused=True)
    G_ddp, D_ddp, G_opt, D_opt = accelerator.prepare(G, D, G_opt, D_opt)
    return Nets(
        G_ddp=G_ddp,
        D_ddp=D_ddp,
        G_net=cast(Generator, accelerator.unwrap_model(G_ddp)),
        D_net=cast(Discriminator, accelerator.unwrap_model(D_ddp)),
        G_ema=G_ema,
        G_opt=G_opt,
        D_opt=D_opt,
    )


def freeze_d_layers(D: Discriminator, freeze_d: int) -> list[torch.nn.Parameter]:
    """Freeze-D: D's first `freeze_d` layers from the top resolution get no gradients; returns
    the parameters that are trained (the optimizer's)."""
    layers = D.layers_from_top()
    if freeze_d > len(layers):
        raise UserError(
            f"train.freeze_d={freeze_d}, but D has {len(layers)} layers that can be frozen "
            f"(fromRGB and 3 per block above 4x4); use at most {len(layers)}"
        )
    for layer in layers[:freeze_d]:
        layer.requires_grad_(False)
    return [p for p in D.parameters() if p.requires_grad]


def build_step_context(cfg: Config, accelerator: Accelerator) -> StepContext:
    def reduce_mean(x: torch.Tensor) -> torch.Tensor:
        return (
            accelerator.reduce(x.detach().float(), reduction="mean")
            if accelerator.num_processes > 1
            else x
        )

    augmenter = None
    if cfg.augment.mode != "none":
        augmenter = Augmenter(cfg.augment, batch=cfg.train.batch)
    return StepContext(
        train=cfg.train,
        phases=phase_table(cfg.train),
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        backward=accelerator.backward,
        no_sync=accelerator.no_sync,
        autocast=accelerator.autocast,
        reduce_mean=reduce_mean,
        scaler=accelerator.scaler,
        mbstd_group=cfg.model.mbstd_group,
        augmenter=augmenter,
    )


def initial_augment(cfg: Config, meta: dict | None, source: str) -> AugmentState:
    """A new run's augmentation state: p from the config, or with augment.p=from-checkpoint
    from the imported official pickle's augment_pipe.p recorded in the checkpoint we start from."""
    imported_p = ckpt.imported_augment_p(meta) if meta is not None else None
    if cfg.augment.initial_p is None and imported_p is None:
        fix = "or set augment.p to a number such as 0"
        if not source:
            raise UserError(
                f"augment.p={P_FROM_CHECKPOINT} needs --init-from a checkpoint imported from "
                f"an official pickle; {fix}"
            )
        raise UserError(
            f"augment.p={P_FROM_CHECKPOINT} but {source} records no imported augment_pipe.p "
            f"(meta.json imported.augment_p); --init-from a checkpoint imported from an "
            f"official pickle, {fix}"
        )
    return initial_state(cfg.augment, imported_p)


def find_checkpoint_retrying(cfg: Config, resume: str) -> ckpt.Checkpoint | None:
    """The checkpoint to resume from. An S3 outage at start must neither fail the Job for good
    (exit 2) nor start over an existing run: retry, then exit with the retryable code."""
    try:
        return storage.retry_unavailable(
            lambda: find_resume_checkpoint(cfg, resume),
            what=f"reading the checkpoints of {cfg.run.dir}",
            budget_s=cfg.run.storage_retry_s,
        )
    except storage.StorageUnavailableError as exc:
        raise storage.StorageUnavailableError(
            f"{exc}; nothing was started: exit 75, so the job tries again"
        ) from None


def find_resume_checkpoint(cfg: Config, resume: str) -> ckpt.Checkpoint | None:
    if resume == "none":
        return None
    if resume == "auto":
        return ckpt.find_latest(cfg.run.dir)
    return ckpt.load_checkpoint(resume)


def build_tracker(
    cfg: Config, accelerator: Accelerator, run_id: str | None, manifest: Manifest
) -> NullTracker:
    """The main process's Tracker; the other nodes' first processes log their system metrics."""
    tracker = start_tracker(
        cfg,
        is_main=accelerator.is_main_process,
        run_id=run_id,
        tags=run_tags(cfg, accelerator, manifest),
    )
    if not cfg.tracking.enabled or accelerator.num_processes == 1:
        return tracker
    # Sync point: every rank learns the run id, so other nodes log into the same run.
    (shared_run_id,) = broadcast_object_list([tracker.run_id])
    if accelerator.is_local_main_process and not accelerator.is_main_process:
        from sg2dist.tracking.tracker import NodeTracker

        return NodeTracker(cfg, shared_run_id)
    return tracker


def run_tags(cfg: Config, accelerator: Accelerator, manifest: Manifest) -> dict[str, str]:
    return {
        "sg2dist_version": __version__,
        "world_size": str(accelerator.num_processes),
        "nodes": str(max(accelerator.num_processes // max(torch.cuda.device_count(), 1), 1)),
        "precision": str(accelerator.mixed_precision),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dataset_url": cfg.data.url,
        "dataset_manifest_hash": str(manifest.manifest_hash),
        "run_dir": cfg.run.dir,
    }
