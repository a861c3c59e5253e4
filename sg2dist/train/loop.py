"""The training loop: build everything, restore, then step/tick/snapshot until train.kimg.

Read `train()` top to bottom: it is the whole run. Helpers below it are small and
each does one thing. Rank-0-only side effects (files, MLflow, printing) go through
`Session.on_main`.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
)
from tqdm import tqdm

from sg2dist import __version__, storage
from sg2dist.config import Config, dump_config, parse_grid
from sg2dist.data import build_loader, check_resolution, ensure_digits_dataset, open_manifest
from sg2dist.errors import UserError
from sg2dist.images import tile_grid, to_uint8, write_png, z_from_seeds
from sg2dist.model import build_networks
from sg2dist.model.layers import use_conv_layout_
from sg2dist.train import checkpoint as ckpt
from sg2dist.train.loss import lazy_adam_hparams
from sg2dist.train.step import Nets, StepContext, collect_stats, phase_table, train_step, update_ema


class NonFiniteError(UserError):
    """Too many steps in a row had non-finite losses or gradients."""


# A rank that checkpointed and stopped because ANOTHER rank was signalled. Non-zero so that an
# Indexed Job does not count this machine as finished and reruns it with the preempted one;
# not 2, which the Job treats as a fatal configuration error. (EX_TEMPFAIL from sysexits.h.)
EXIT_STOPPED_BY_PEER = 75


@dataclass
class Progress:
    """Counters that a checkpoint restores (paper vocabulary)."""

    cur_nimg: int = 0  # real images shown to D so far
    cur_tick: int = 0
    step: int = 0  # training iterations (one global batch each)
    tick_start_nimg: int = 0
    next_snapshot_nimg: int = 0
    metrics_done_period: int = -1  # index of the last metrics.every_kimg period scored


@dataclass
class Session:
    """Everything one run holds; built by `build_session`."""

    cfg: Config
    accelerator: Accelerator
    nets: Nets
    ctx: StepContext
    progress: Progress
    batch_gpu: int
    accum: int
    data: Any  # iterator of Batch
    stream_state: Any
    manifest: Any
    tracker: Any
    stop_requested: bool = False
    bar: Any = None  # tqdm progress bar (disabled off-terminal and on other ranks)
    data_wait_s: float = 0.0  # seconds spent waiting for batches since the last tick

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def on_main(self, fn, *args, **kwargs):
        """Run a side effect on the main process only; the others get None."""
        return fn(*args, **kwargs) if self.is_main else None


def train(cfg: Config, *, resume: str = "auto", init_from: str = "") -> int:
    """Run (or continue) training until cfg.train.kimg; checkpoint on SIGTERM/SIGINT.

    Returns the exit code: 0 when done or stopped by a signal this process received,
    EXIT_STOPPED_BY_PEER when it stopped because another rank was signalled.
    """
    session = build_session(cfg, resume=resume, init_from=init_from)
    install_stop_handlers(session)
    total_nimg = int(cfg.train.kimg * 1000)
    session.on_main(print_start, session, total_nimg)
    session.bar = make_progress_bar(session, total_nimg)
    tick_start_time = time.time()
    while True:
        micro_batches = next_micro_batches(session)
        train_step(session.ctx, session.nets, session.progress.step, micro_batches)
        advance_counters(session)
        session.bar.update(cfg.train.batch / 1000)
        check_nonfinite(session)
        done = session.progress.cur_nimg >= total_nimg
        stop = sync_stop_flag(session)
        tick_due = (
            session.progress.cur_nimg >= session.progress.tick_start_nimg + cfg.run.tick_kimg * 1000
        )
        if tick_due or done or stop:
            report_tick(session, time.time() - tick_start_time)
            tick_start_time = time.time()
        if session.progress.cur_nimg >= session.progress.next_snapshot_nimg or done or stop:
            snapshot(session)
        if done or stop:
            break
    session.bar.close()
    if done:
        session.on_main(log_final_generator, session)
    session.tracker.end(
        "FINISHED" if done else "KILLED"
    )  # every rank: other nodes stop their monitors
    session.accelerator.wait_for_everyone()
    kimg = session.progress.cur_nimg / 1000
    session.on_main(print, f"{'done' if done else 'stopped'} at kimg {kimg:g}", flush=True)
    if done or session.stop_requested:
        return 0
    print(
        f"rank {session.accelerator.process_index}: stopped at kimg {kimg:g} because another "
        f"rank was signalled; exit {EXIT_STOPPED_BY_PEER} so the job runs it again",
        flush=True,
    )
    return EXIT_STOPPED_BY_PEER


# ---------------------------------------------------------------------------- building


def make_accelerator(precision: str) -> Accelerator:
    use_cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if use_cuda and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not use_cuda:
        raise UserError("train.precision=fp16 needs a CUDA GPU; use no or bf16 on CPU")
    handlers = [
        # w_avg and noise buffers are not trained; broadcasting them every forward only costs time.
        DistributedDataParallelKwargs(broadcast_buffers=False),
        # Rank 0 alone computes metrics and writes checkpoints while the others wait.
        InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2)),
    ]
    return Accelerator(mixed_precision=precision, cpu=not use_cuda, kwargs_handlers=handlers)


def resolve_dataset(cfg: Config, accelerator: Accelerator):
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
    return manifest


def local_runs_root(cfg: Config) -> str:
    """The parent of a local run folder, else ./runs (built-in dataset, local MLflow store)."""
    if storage.is_s3(cfg.run.dir):
        return "runs"
    return os.path.dirname(os.path.normpath(cfg.run.dir)) or "."


def build_nets(cfg: Config, accelerator: Accelerator) -> Nets:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    G, D = build_networks(cfg.model)
    G, D = use_conv_layout_(G, accelerator.device), use_conv_layout_(D, accelerator.device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False).to(accelerator.device)
    t = cfg.train
    g_lr, g_betas = lazy_adam_hparams(t.g_lr, t.betas, t.pl_interval if t.pl_weight > 0 else 0)
    d_lr, d_betas = lazy_adam_hparams(t.d_lr, t.betas, t.r1_interval if t.r1_gamma > 0 else 0)
    # fused: one kernel for all parameters instead of ~10 ops per tensor (CPU and CUDA).
    G_opt = torch.optim.Adam(G.parameters(), lr=g_lr, betas=g_betas, eps=t.eps, fused=True)
    D_opt = torch.optim.Adam(D.parameters(), lr=d_lr, betas=d_betas, eps=t.eps, fused=True)
    G_ddp, D_ddp, G_opt, D_opt = accelerator.prepare(G, D, G_opt, D_opt)
    return Nets(
        G_ddp=G_ddp,
        D_ddp=D_ddp,
        G_net=accelerator.unwrap_model(G_ddp),
        D_net=accelerator.unwrap_model(D_ddp),
        G_ema=G_ema,
        G_opt=G_opt,
        D_opt=D_opt,
    )


def build_step_context(cfg: Config, accelerator: Accelerator) -> StepContext:
    def reduce_mean(x: torch.Tensor) -> torch.Tensor:
        return (
            accelerator.reduce(x.detach().float(), reduction="mean")
            if accelerator.num_processes > 1
            else x
        )

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
    )


def build_session(cfg: Config, *, resume: str, init_from: str) -> Session:
    accelerator = make_accelerator(cfg.train.precision)
    batch_gpu, accum = cfg.train.batch_layout(accelerator.num_processes)
    manifest = resolve_dataset(cfg, accelerator)
    nets = build_nets(cfg, accelerator)
    ctx = build_step_context(cfg, accelerator)
    progress = Progress(next_snapshot_nimg=snapshot_nimg(cfg))
    checkpoint = find_resume_checkpoint(cfg, resume)
    data_state, run_id = None, None
    if checkpoint is not None:
        data_state, run_id = restore(checkpoint, cfg, accelerator, nets, ctx, progress)
    elif init_from:
        load_weights_only(init_from, nets)
    session_data = build_loader(
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
    )
    tracker = start_tracker(cfg, accelerator, run_id, manifest)
    session = Session(
        cfg=cfg,
        accelerator=accelerator,
        nets=nets,
        ctx=ctx,
        progress=progress,
        batch_gpu=batch_gpu,
        accum=accum,
        data=iter(session_data),
        stream_state=session_data.state,
        manifest=manifest,
        tracker=tracker,
    )
    session.on_main(storage.write_text, storage.join(cfg.run.dir, "config.yaml"), dump_config(cfg))
    return session


def snapshot_nimg(cfg: Config) -> int:
    return max(int(cfg.run.snapshot_kimg * 1000), 1)


class NoTracking:
    """Stands in for the Tracker when tracking is off or on other ranks: every call is a no-op.

    Keeps MLflow (imported only by sg2dist.tracking) optional for runs that do not track.
    """

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id  # kept, so a checkpoint written without tracking keeps its run id

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def start_tracker(cfg: Config, accelerator: Accelerator, run_id: str | None, manifest):
    """The main process's Tracker; the other nodes' first processes log their system metrics."""
    tracker = _start_main_tracker(cfg, accelerator, run_id, manifest)
    if not cfg.tracking.enabled or accelerator.num_processes == 1:
        return tracker
    # Sync point: every rank learns the run id, so other nodes log into the same run.
    (shared_run_id,) = broadcast_object_list([tracker.run_id])
    if accelerator.is_local_main_process and not accelerator.is_main_process:
        from sg2dist.tracking import NodeSystemMetrics

        return NodeTracking(shared_run_id, NodeSystemMetrics(cfg, shared_run_id))
    return tracker


class NodeTracking(NoTracking):
    """Another node's first process: no logging of its own except system metrics."""

    def __init__(self, run_id: str | None, node_metrics):
        super().__init__(run_id)
        self.node_metrics = node_metrics

    def end(self, *args, **kwargs) -> None:
        self.node_metrics.end()


def _start_main_tracker(cfg: Config, accelerator: Accelerator, run_id: str | None, manifest):
    if not (cfg.tracking.enabled and accelerator.is_main_process):
        return NoTracking(run_id)
    from sg2dist.tracking import Tracker

    tags = {
        "sg2dist_version": __version__,
        "world_size": str(accelerator.num_processes),
        "nodes": str(max(accelerator.num_processes // max(torch.cuda.device_count(), 1), 1)),
        "precision": str(accelerator.mixed_precision),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dataset_url": cfg.data.url,
        "dataset_manifest_hash": str(manifest.manifest_hash),
        "run_dir": cfg.run.dir,
    }
    return Tracker.start(cfg, is_main=accelerator.is_main_process, run_id=run_id, tags=tags)


# ---------------------------------------------------------------------------- checkpoints


def find_resume_checkpoint(cfg: Config, resume: str):
    if resume == "none":
        return None
    if resume == "auto":
        return ckpt.find_latest(cfg.run.dir)
    return ckpt.load_checkpoint(resume)


def restore(
    checkpoint,
    cfg: Config,
    accelerator: Accelerator,
    nets: Nets,
    ctx: StepContext,
    progress: Progress,
):
    """Load every piece of state; returns (this rank's data stream state, MLflow run id)."""
    meta, state = checkpoint.meta, checkpoint.state
    saved_model = meta["config"]["model"]
    if saved_model != dataclasses.asdict(cfg.model):
        raise UserError(
            f"checkpoint {checkpoint.url} was trained with a different model config; "
            "use a new run.dir, or --init-from to fine-tune its weights"
        )
    nets.G_net.load_state_dict(state["G"])
    nets.D_net.load_state_dict(state["D"])
    nets.G_ema.load_state_dict(state["G_ema"])
    nets.G_opt.load_state_dict(state["G_opt"])
    nets.D_opt.load_state_dict(state["D_opt"])
    if ctx.scaler is not None and state.get("scaler"):
        ctx.scaler.load_state_dict(state["scaler"])
    for key in dataclasses.asdict(progress):
        setattr(progress, key, int(meta["progress"][key]))
    ctx.pl_mean = float(meta["pl_mean"])
    ctx.skipped_steps = int(meta["skipped_steps"])
    rank, same_world = accelerator.process_index, meta["world_size"] == accelerator.num_processes
    if same_world:
        torch.set_rng_state(state["rng_cpu"][rank])
    data_state = meta["data_states"][rank] if same_world else None
    accelerator.on_main_process(print)(
        f"resumed from {checkpoint.url} at kimg {progress.cur_nimg / 1000:.1f}"
        + ("" if same_world else " (world size changed: data stream restarts from new positions)"),
        flush=True,
    )
    return data_state, meta.get("mlflow_run_id")


def load_weights_only(url: str, nets: Nets) -> None:
    """--init-from: G, D and G_ema weights for fine-tuning; counters and optimizers start fresh."""
    checkpoint = ckpt.load_checkpoint(url)
    try:
        nets.G_net.load_state_dict(checkpoint.state["G"])
        nets.D_net.load_state_dict(checkpoint.state["D"])
        nets.G_ema.load_state_dict(checkpoint.state["G_ema"])
    except RuntimeError as exc:
        raise UserError(
            f"--init-from {url}: its networks do not match model.* of this config "
            f"({str(exc)[:120]}...); "
            "use the same model settings as that run"
        ) from None


def save(session: Session) -> str | None:
    """Gather per-rank state, then the main process writes one checkpoint."""
    acc, nets, ctx = session.accelerator, session.nets, session.ctx
    rng_cpu = gather_object([torch.get_rng_state()])
    data_states = gather_object([session.stream_state.to_dict()])
    folder = None
    if session.is_main:
        state = {
            "G": nets.G_net.state_dict(),
            "D": nets.D_net.state_dict(),
            "G_ema": nets.G_ema.state_dict(),
            "G_opt": nets.G_opt.state_dict(),
            "D_opt": nets.D_opt.state_dict(),
            "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else {},
            "rng_cpu": rng_cpu,
        }
        meta = {
            "format": 1,
            "sg2dist_version": __version__,
            "progress": dataclasses.asdict(session.progress),
            "pl_mean": ctx.pl_mean,
            "skipped_steps": ctx.skipped_steps,
            "world_size": acc.num_processes,
            "data_states": data_states,
            "mlflow_run_id": session.tracker.run_id,
            "config": session.cfg.to_dict(),
        }
        folder = ckpt.save_checkpoint(session.cfg.run.dir, session.progress.cur_nimg, state, meta)
        ckpt.prune_checkpoints(
            session.cfg.run.dir,
            keep_last=session.cfg.run.keep_last,
            keep_every=session.cfg.run.keep_every,
            snapshot_nimg=snapshot_nimg(session.cfg),
        )
    acc.wait_for_everyone()
    return folder


# ---------------------------------------------------------------------------- per step


def next_micro_batches(session: Session):
    """`accum` micro-batches as (img float in [-1, 1], c) on the device; times the wait."""
    start = time.time()
    device = session.accelerator.device
    micro_batches = []
    for _ in range(session.accum):
        batch = next(session.data)
        session.stream_state.update(batch)
        img = batch.img_NCHW.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
        micro_batches.append((img, batch.c.to(device, non_blocking=True)))
    session.data_wait_s += time.time() - start
    return micro_batches


def advance_counters(session: Session) -> None:
    p, t = session.progress, session.cfg.train
    p.cur_nimg += t.batch
    p.step += 1
    update_ema(
        session.nets.G_ema,
        session.nets.G_net,
        cur_nimg=p.cur_nimg,
        batch=t.batch,
        ema_kimg=t.ema_kimg,
        ema_rampup=t.ema_rampup,
    )


def check_nonfinite(session: Session) -> None:
    limit = session.cfg.train.max_nonfinite_steps
    if session.ctx.nonfinite_in_row >= limit:
        # Skipped steps changed no weights: this checkpoint is the last good state.
        save(session)
        raise NonFiniteError(
            f"{limit} steps in a row had non-finite losses or gradients (at kimg "
            f"{session.progress.cur_nimg / 1000:.1f}); the last good state is checkpointed. "
            "Lower train.g_lr/d_lr, raise train.r1_gamma, or use train.precision=bf16/no"
        )


def install_stop_handlers(session: Session) -> None:
    """SIGTERM (preemption) and SIGINT finish the current step, checkpoint and exit 0."""

    def request_stop(signum, _frame):
        session.stop_requested = True
        session.on_main(
            print, f"received signal {signum}: checkpointing after this step", flush=True
        )

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


def sync_stop_flag(session: Session) -> bool:
    """Any rank's stop request stops all ranks at the same step (one tiny all-reduce)."""
    if session.accelerator.num_processes == 1:
        return session.stop_requested
    flag = torch.tensor([float(session.stop_requested)], device=session.accelerator.device)
    return bool(session.accelerator.reduce(flag, reduction="sum").item() > 0)


# ---------------------------------------------------------------------------- ticks & snapshots


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    # ru_maxrss is in KiB on Linux.
    stats = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        stats["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return stats


def report_tick(session: Session, tick_seconds: float) -> None:
    p = session.progress
    tick_nimg = max(p.cur_nimg - p.tick_start_nimg, 1)
    metrics = collect_stats(session.ctx)
    metrics.update(
        kimg=p.cur_nimg / 1000,
        tick=p.cur_tick,
        sec_per_kimg=tick_seconds / (tick_nimg / 1000),
        img_per_s=tick_nimg / max(tick_seconds, 1e-9),
        pl_mean=session.ctx.pl_mean,
        skipped_steps=session.ctx.skipped_steps,
        data_wait_frac=session.data_wait_s / max(tick_seconds, 1e-9),
        corrupt_samples=session.stream_state.corrupt_samples,
        **peak_memory_gb(session.accelerator.device),
    )
    session.data_wait_s = 0.0
    p.cur_tick += 1
    p.tick_start_nimg = p.cur_nimg
    session.on_main(print_tick, metrics, session.bar)
    session.on_main(session.tracker.log_metrics, metrics, step=p.cur_nimg)


def snapshot(session: Session) -> None:
    """Sample grid (main process) and a checkpoint (all ranks take part)."""
    p = session.progress
    if p.cur_nimg >= p.next_snapshot_nimg:
        period = snapshot_nimg(session.cfg)
        p.next_snapshot_nimg = (p.cur_nimg // period + 1) * period
    session.on_main(save_grid, session)
    maybe_compute_metrics(session)
    folder = save(session)
    session.on_main(session.tracker.set_tag, "checkpoint", folder)


def log_final_generator(session: Session) -> None:
    """G_ema as an MLflow model; its URI becomes a run tag so users (and tests) can load it."""
    cfg = session.cfg
    model_uri = session.tracker.log_generator(
        session.nets.G_ema, cfg, register_name=cfg.tracking.register_model
    )
    if model_uri:
        session.tracker.set_tag("generator_model_uri", model_uri)


def maybe_compute_metrics(session: Session) -> None:
    m = session.cfg.metrics
    if m.every_kimg <= 0:
        return
    period = int(m.every_kimg * 1000)
    if session.progress.cur_nimg // period <= session.progress.metrics_done_period:
        return
    session.progress.metrics_done_period = session.progress.cur_nimg // period
    from sg2dist.metrics import compute_metrics

    # Every rank generates its share; rank 0 gathers, scores and broadcasts the result.
    acc = session.accelerator
    scores = compute_metrics(
        session.nets.G_ema,
        session.cfg.data.url,
        m.metrics,
        device=acc.device,
        inception_weights=m.inception_weights,
        rank=acc.process_index,
        world_size=acc.num_processes,
    )
    session.on_main(
        print, "metrics " + "  ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True
    )
    session.on_main(session.tracker.log_metrics, scores, step=session.progress.cur_nimg)


@torch.no_grad()
def render_grid(G, grid: str, device) -> np.ndarray:
    """A grid image (HWC uint8) of G's images for fixed seeds 0..cols*rows-1."""
    cols, rows = parse_grid(grid)
    n = cols * rows
    z = z_from_seeds(list(range(n)), G.z_dim)
    c = torch.zeros(n, G.c_dim)
    if G.c_dim > 0:
        c[torch.arange(n), torch.arange(n) % G.c_dim] = 1
    images = [
        to_uint8(G(z[i : i + 16].to(device), c[i : i + 16].to(device), noise_mode="const"))
        for i in range(0, n, 16)
    ]
    return tile_grid(np.concatenate(images), cols, rows)


def save_grid(session: Session) -> None:
    img = render_grid(session.nets.G_ema, session.cfg.run.grid, session.accelerator.device)
    # Named by images shown, like the checkpoint folders: unique even for sub-kimg snapshots.
    url = storage.join(session.cfg.run.dir, "grids", f"fakes-{session.progress.cur_nimg:012d}.png")
    write_png(url, img)
    session.tracker.log_image(img, key="fakes", step=session.progress.cur_nimg)


# ---------------------------------------------------------------------------- printing


def print_start(session: Session, total_nimg: int) -> None:
    acc = session.accelerator
    cfg = session.cfg
    print(
        f"sg2dist {__version__}: {acc.num_processes} process(es) on {acc.device}, "
        f"precision {acc.mixed_precision}, batch {cfg.train.batch} = {session.batch_gpu} per "
        f"process x {session.accum} accumulation x {acc.num_processes}; data {cfg.data.url} "
        f"({session.manifest.num_images} images); run {session.cfg.run.dir}; "
        f"kimg {session.progress.cur_nimg / 1000:g} -> {total_nimg / 1000:g}",
        flush=True,
    )


def print_tick(metrics: dict[str, float], bar) -> None:
    order = [
        "tick",
        "kimg",
        "sec_per_kimg",
        "img_per_s",
        "loss_G",
        "loss_D_real",
        "loss_D_fake",
        "loss_r1",
        "loss_pl",
        "pl_mean",
        "D_real",
        "D_fake",
        "skipped_steps",
        "data_wait_frac",
    ]
    parts = [f"{k} {metrics[k]:.4g}" for k in order if k in metrics]
    parts += [f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("peak_")]
    line = "  ".join(parts)
    # On a terminal the line goes above the progress bar; in logs it is a plain line.
    if bar.disable:
        print(line, flush=True)
    else:
        bar.write(line)


def make_progress_bar(session: Session, total_nimg: int):
    """A kimg progress bar on the main process when stderr is a terminal; disabled otherwise."""
    return tqdm(
        total=round(total_nimg / 1000, 3),
        initial=round(session.progress.cur_nimg / 1000, 3),
        unit="kimg",
        dynamic_ncols=True,
        disable=not (session.is_main and sys.stderr.isatty()),
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}]",
    )
