"""The training loop: step, tick, snapshot until train.kimg, over a built Session.

Read `train()` top to bottom: it is the whole run. Building happens before it
(build.py), what a checkpoint holds is declared in checkpoint.py, and one
iteration's phases are in step.py. Helpers below are small and each does one
thing. Rank-0-only side effects (files, MLflow, printing) go through
`Session.on_main`.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from typing import Any

import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from sg2dist import __version__, storage
from sg2dist.config import Config, parse_grid
from sg2dist.errors import EXIT_RETRYABLE, TemporaryError, UserError
from sg2dist.sampling import snapshot_grid, write_png
from sg2dist.tracking import GENERATOR_TAG
from sg2dist.train import checkpoint as ckpt
from sg2dist.train.build import Session, snapshot_nimg
from sg2dist.train.peers import collective_failures_are_retryable
from sg2dist.train.step import collect_stats, train_step, update_ema


class NonFiniteError(UserError):
    """Too many steps in a row had non-finite losses or gradients."""


# A rank that checkpointed and stopped because ANOTHER rank was signalled. Non-zero so that an
# Indexed Job does not count this machine as finished and reruns it with the preempted one;
# not 2, which the Job treats as a fatal configuration error. (EX_TEMPFAIL from sysexits.h.)
EXIT_STOPPED_BY_PEER = EXIT_RETRYABLE

# The host reads device state (the non-finite streak, the stop flag of all ranks) only every
# this many steps: each read waits for the GPU to finish the work queued before it.
HOST_CHECK_STEPS = 4

TickMetrics = dict[str, float]


def train(session: Session) -> int:
    """Run (or continue) training until cfg.train.kimg; checkpoint on SIGTERM/SIGINT.

    Returns the exit code: 0 when done or stopped by a signal this process received,
    EXIT_STOPPED_BY_PEER when it stopped because another rank was signalled, EXIT_RETRYABLE
    when the stop checkpoint could not be written (S3 unreachable).
    """
    cfg, progress = session.cfg, session.progress
    total_nimg = int(cfg.train.kimg * 1000)
    if progress.cur_nimg >= total_nimg:
        return finish_complete_run(session)
    install_stop_handlers(session)
    session.on_main(print_start, session, total_nimg)
    with collective_failures_are_retryable(session.accelerator.process_index):
        done, landed = run_steps(session, total_nimg)
        if done and landed:
            session.peers.after_main("final model", lambda: log_final_generator(session))
    session.tracker.end("FINISHED" if done and landed else "KILLED")  # every rank: monitors
    session.peers.close()
    kimg = progress.cur_nimg / 1000
    if not landed:
        # Only an exit the Job retries gets this state saved: the restart resumes from the
        # last checkpoint that landed and trains these steps again, to the same result.
        if not session.is_main:
            return EXIT_RETRYABLE
        retries = "run.storage_retry_s" + ("" if done else ", at most half the shutdown grace")
        raise TemporaryError(
            f"{'finished' if done else 'stopped'} at kimg {kimg:g} without its checkpoint: "
            f"{cfg.run.dir} stayed unreachable through the retries ({retries}); the job runs "
            "again and resumes from the latest checkpoint that was written"
        )
    session.on_main(print, f"{'done' if done else 'stopped'} at kimg {kimg:g}", flush=True)
    if done or session.stop_requested:
        return 0
    print(
        f"rank {session.accelerator.process_index}: stopped at kimg {kimg:g} because another "
        f"rank was signalled; exit {EXIT_STOPPED_BY_PEER} so the job runs it again",
        flush=True,
    )
    return EXIT_STOPPED_BY_PEER


def run_steps(session: Session, total_nimg: int) -> tuple[bool, bool]:
    """Steps, ticks and snapshots until done or stopped: (done, last checkpoint landed)."""
    cfg, progress = session.cfg, session.progress
    bar = make_progress_bar(session, total_nimg)
    tick_start_time = time.time()
    landed = True
    while True:
        micro_batches = next_micro_batches(session)
        train_step(session.ctx, session.nets, session.step_state, progress.step, micro_batches)
        advance_counters(session)
        bar.update(cfg.train.batch / 1000)
        check_nonfinite(session)
        done = progress.cur_nimg >= total_nimg
        stop = sync_stop_flag(session)
        if stop and session.stop_deadline is None:  # stopped by another rank's signal
            session.stop_deadline = time.monotonic() + stop_write_budget_s(cfg)
        tick_due = progress.cur_nimg >= progress.tick_start_nimg + cfg.run.tick_kimg * 1000
        if tick_due or done or stop:
            report_tick(session, time.time() - tick_start_time, bar)
            tick_start_time = time.time()
        if progress.cur_nimg >= progress.next_snapshot_nimg or done or stop:
            landed = snapshot(session)
        if done or stop:
            bar.close()
            return done, landed


def finish_complete_run(session: Session) -> int:
    """A run already at train.kimg (its pod was killed after the final checkpoint, or the Job
    was started again): no step, no checkpoint; only what the end of a run does and may not
    have done yet (the final MLflow model and its tag). Exit 0 on every rank."""
    session.peers.after_main("final model", lambda: log_final_generator(session))
    session.tracker.end("FINISHED")
    session.peers.close()
    session.on_main(
        print,
        f"already complete at kimg {session.progress.cur_nimg / 1000:g} "
        f"(train.kimg {session.cfg.train.kimg:g}): nothing to train",
        flush=True,
    )
    return 0


# ---------------------------------------------------------------------------- per step


def next_micro_batches(session: Session) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`accum` micro-batches as (img float in [-1, 1], c) on the device; times the wait."""
    start = time.time()
    device = session.accelerator.device
    micro_batches = []
    for _ in range(session.accum):
        batch = next(session.loader)
        session.loader.state.update(batch)
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
    """Every HOST_CHECK_STEPS steps: stop after train.max_nonfinite_steps skipped in a row
    (a run may skip up to HOST_CHECK_STEPS - 1 more before it notices; they change nothing)."""
    if session.progress.step % HOST_CHECK_STEPS != 0:
        return
    limit = session.cfg.train.max_nonfinite_steps
    if int(session.step_state.nonfinite_in_row) >= limit:  # sync point
        # Skipped steps changed no weights: this checkpoint is the last good state.
        saved = "is checkpointed" if save(session) else "could not be checkpointed (S3 away)"
        raise NonFiniteError(
            f"{limit} steps in a row had non-finite losses or gradients (at kimg "
            f"{session.progress.cur_nimg / 1000:.1f}); the last good state {saved}. "
            "Lower train.g_lr/d_lr, raise train.r1_gamma, or use train.precision=bf16/no"
        )


def install_stop_handlers(session: Session) -> None:
    """SIGTERM (preemption) and SIGINT finish the current step, checkpoint and exit 0."""

    def request_stop(signum, _frame):
        session.stop_requested = True
        if session.stop_deadline is None:
            session.stop_deadline = time.monotonic() + stop_write_budget_s(session.cfg)
        session.on_main(
            print, f"received signal {signum}: checkpointing after this step", flush=True
        )

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


def stop_write_budget_s(cfg: Config) -> float:
    """How long the stop checkpoint may retry S3: run.storage_retry_s, and at most half of
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT (the launcher's wait after SIGTERM before it kills the
    trainer), so that the retries end, and the exit code is ours, inside the grace period."""
    grace_s = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or "inf")
    return min(cfg.run.storage_retry_s, grace_s / 2)


def sync_stop_flag(session: Session) -> bool:
    """Any rank's stop request stops all ranks at the same step: one tiny all-reduce every
    HOST_CHECK_STEPS steps (a signal waits at most that many steps)."""
    if session.accelerator.num_processes == 1:
        return session.stop_requested
    if session.progress.step % HOST_CHECK_STEPS != 0:
        return False
    # Sync point: the flag is read on the host.
    flag = torch.tensor([float(session.stop_requested)], device=session.accelerator.device)
    return bool(session.accelerator.reduce(flag, reduction="sum").item() > 0)


# ---------------------------------------------------------------------------- ticks & snapshots


def report_tick(session: Session, tick_seconds: float, bar: tqdm) -> None:
    p = session.progress
    tick_nimg = max(p.cur_nimg - p.tick_start_nimg, 1)
    metrics = collect_stats(session.ctx)
    metrics.update(
        kimg=p.cur_nimg / 1000,
        tick=p.cur_tick,
        sec_per_kimg=tick_seconds / (tick_nimg / 1000),
        img_per_s=tick_nimg / max(tick_seconds, 1e-9),
        pl_mean=float(session.step_state.pl_mean),
        augment_p=session.step_state.augment.p,
        skipped_steps=int(session.step_state.skipped_steps),
        data_wait_frac=session.data_wait_s / max(tick_seconds, 1e-9),
        corrupt_samples=session.loader.state.corrupt_samples,
        **peak_memory_gb(session.accelerator.device),
    )
    session.data_wait_s = 0.0
    p.cur_tick += 1
    p.tick_start_nimg = p.cur_nimg
    session.on_main(print_tick, metrics, bar)
    session.on_main(session.tracker.log_metrics, metrics, step=p.cur_nimg)


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    # ru_maxrss is in KiB on Linux.
    stats = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        stats["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return stats


def snapshot(session: Session) -> bool:
    """Metrics, a checkpoint and the sample grid; True when the checkpoint landed.

    Every rank takes part in gathering the state and in the metrics; then rank 0 alone
    writes, while the others wait in the store (peers.after_main), not in a collective:
    the write may outlast the collective timeout when S3 is slow or away.
    """
    p = session.progress
    if p.cur_nimg >= p.next_snapshot_nimg:
        period = snapshot_nimg(session.cfg)
        p.next_snapshot_nimg = (p.cur_nimg // period + 1) * period
    rank_states = gather_rank_states(session)
    scores = maybe_compute_metrics(session)
    folder = session.peers.after_main(
        "snapshot", lambda: write_snapshot(session, rank_states, scores)
    )
    ckpt.failpoint("snapshot-done")
    return bool(folder)


def save(session: Session) -> str:
    """A checkpoint of this moment (all ranks take part); its folder, "" if S3 was away."""
    rank_states = gather_rank_states(session)
    return session.peers.after_main(
        "checkpoint", lambda: write_checkpoint(session, rank_states, write_deadline(session))
    )


def gather_rank_states(session: Session) -> dict[str, Any]:
    # Sync point: every rank's RNG state and data stream position go into the checkpoint.
    # All ranks also average ADA's r_t accumulator, so the checkpoint holds the global one.
    augment = session.step_state.augment
    accumulator = augment.global_accumulator(session.ctx.reduce_mean, session.accelerator.device)
    return {
        "rng_cpu": gather_object([torch.get_rng_state()]),
        "data_states": gather_object([session.loader.state.to_dict()]),
        "augment": augment.to_dict(accumulator),
    }


def write_deadline(session: Session) -> float:
    """Until when this snapshot's writes may retry an unreachable S3 (time.monotonic())."""
    deadline = time.monotonic() + session.cfg.run.storage_retry_s
    if session.stop_deadline is not None:
        deadline = min(deadline, session.stop_deadline)
    return deadline


def write_snapshot(session: Session, rank_states: dict[str, Any], scores: dict[str, float]) -> str:
    """Rank 0: log the metric scores, write the checkpoint, then the grid; the folder or ""."""
    if scores:
        print("metrics " + "  ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True)
        session.tracker.log_scores(scores, step=session.progress.cur_nimg)
    deadline = write_deadline(session)
    folder = write_checkpoint(session, rank_states, deadline)
    if folder:
        session.tracker.set_tag("checkpoint", folder)
        save_grid(session, deadline)
    else:
        print("sample grid skipped as well: it goes to the same storage", flush=True)
    return folder


def write_checkpoint(session: Session, rank_states: dict[str, Any], deadline: float) -> str:
    """Rank 0: the checkpoint, retried while S3 is unreachable until `deadline`; its folder,
    or "" when it could not be written (counted and logged; training goes on)."""
    cfg, p = session.cfg, session.progress
    state, meta = ckpt.training_contents(
        nets=session.nets,
        scaler=session.ctx.scaler,
        progress=p,
        step_state=session.step_state,
        cfg=cfg,
        rng_cpu=rank_states["rng_cpu"],
        data_states=rank_states["data_states"],
        mlflow_run_id=session.tracker.run_id,
        checkpoint_failures=session.checkpoint_failures,
        augment=rank_states["augment"],
    )
    retry_s = max(deadline - time.monotonic(), 0.0)
    try:
        folder = ckpt.save_checkpoint(cfg.run.dir, p.cur_nimg, state, meta, retry_s=retry_s)
    except storage.StorageUnavailableError as exc:
        session.checkpoint_failures += 1
        print(
            f"checkpoint at kimg {p.cur_nimg / 1000:g} not written ({exc}); training goes on "
            f"and the next snapshot tries again ({session.checkpoint_failures} failed so far)",
            flush=True,
        )
        failures = session.checkpoint_failures
        session.tracker.log_metrics({"checkpoint_failures": failures}, step=p.cur_nimg)
        session.tracker.set_tag("checkpoint_failures", str(failures))
        return ""
    try:
        ckpt.prune_checkpoints(
            cfg.run.dir,
            keep_last=cfg.run.keep_last,
            keep_every=cfg.run.keep_every,
            snapshot_nimg=snapshot_nimg(cfg),
        )
    except storage.StorageUnavailableError as exc:  # old folders stay; the next snapshot prunes
        print(f"old checkpoints not pruned this time ({exc})", flush=True)
    return folder


def save_grid(session: Session, deadline: float) -> None:
    cols, rows = parse_grid(session.cfg.run.grid)
    img = snapshot_grid(session.nets.G_ema, cols, rows, session.accelerator.device)
    # Named by images shown, like the checkpoint folders: unique even for sub-kimg snapshots.
    url = storage.join(session.cfg.run.dir, "grids", f"fakes-{session.progress.cur_nimg:012d}.png")
    try:
        storage.retry_unavailable(
            lambda: write_png(url, img),
            what=f"writing {url}",
            budget_s=max(deadline - time.monotonic(), 0.0),
        )
    except storage.StorageUnavailableError as exc:  # a picture: nothing to resume depends on it
        print(f"sample grid not written ({exc})", flush=True)
    session.tracker.log_image(img, key="fakes", step=session.progress.cur_nimg)


def maybe_compute_metrics(session: Session) -> dict[str, float]:
    """Scores on rank 0 ({} elsewhere) when a metrics.every_kimg period ended, else {}."""
    m = session.cfg.metrics
    if m.every_kimg <= 0:
        return {}
    period = int(m.every_kimg * 1000)
    if session.progress.cur_nimg // period <= session.progress.metrics_done_period:
        return {}
    session.progress.metrics_done_period = session.progress.cur_nimg // period
    from sg2dist.metrics import compute_metrics

    # Every rank generates its share; rank 0 gathers and scores. The others do not wait for
    # the scores (minutes for 50k images): they go on to wait for the whole snapshot.
    acc = session.accelerator
    return compute_metrics(
        session.nets.G_ema,
        session.cfg.data.url,
        m.metrics,
        device=acc.device,
        inception_weights=m.inception_weights,
        lpips_weights=m.lpips_weights,
        rank=acc.process_index,
        world_size=acc.num_processes,
        scores_on_every_rank=False,
    )


def log_final_generator(session: Session) -> str:
    """G_ema as an MLflow model, once per run; its URI becomes a run tag so users (and tests)
    can load it. A run restarted after a kill during this (between the upload, the
    registration and the tag) finds the model it logged, registers it if asked and not yet
    done, and sets the tag. Returns the URI ("" without MLflow)."""
    cfg, tracker = session.cfg, session.tracker
    model_uri = tracker.logged_generator_uri()
    if not model_uri:
        model_uri = tracker.log_generator(
            session.nets.G_ema, cfg, register_name=cfg.tracking.register_model
        )
        ckpt.failpoint("final-model-logged")
    elif cfg.tracking.register_model:
        tracker.ensure_registered(model_uri, cfg.tracking.register_model)
    if model_uri:
        tracker.set_tag(GENERATOR_TAG, model_uri)
    return model_uri


# ---------------------------------------------------------------------------- printing


def print_start(session: Session, total_nimg: int) -> None:
    acc = session.accelerator
    cfg = session.cfg
    print(
        f"sg2dist {__version__}: {acc.num_processes} process(es) on {acc.device}, "
        f"precision {acc.mixed_precision}, batch {cfg.train.batch} = {session.batch_gpu} per "
        f"process x {session.accum} accumulation x {acc.num_processes}; data {cfg.data.url} "
        f"({session.manifest.num_images} images); run {cfg.run.dir}; "
        f"kimg {session.progress.cur_nimg / 1000:g} -> {total_nimg / 1000:g}",
        flush=True,
    )


TICK_LINE_ORDER = (
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
    "augment_p",
    "augment_rt",
    "skipped_steps",
    "data_wait_frac",
)


def print_tick(metrics: TickMetrics, bar: tqdm) -> None:
    parts = [f"{k} {metrics[k]:.4g}" for k in TICK_LINE_ORDER if k in metrics]
    parts += [f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("peak_")]
    line = "  ".join(parts)
    # On a terminal the line goes above the progress bar; in logs it is a plain line.
    if bar.disable:
        print(line, flush=True)
    else:
        bar.write(line)


def make_progress_bar(session: Session, total_nimg: int) -> tqdm:
    """A kimg progress bar on the main process when stderr is a terminal; disabled otherwise."""
    return tqdm(
        total=round(total_nimg / 1000, 3),
        initial=round(session.progress.cur_nimg / 1000, 3),
        unit="kimg",
        dynamic_ncols=True,
        disable=not (session.is_main and sys.stderr.isatty()),
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}]",
    )
