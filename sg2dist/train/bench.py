"""The step benchmark behind `sg2dist bench step`: full training iterations, timed.

All four phases run with their Adam steps and the EMA update. A lazy-regularisation
cycle is 16 iterations (R1 every 16, path length every 4), so the figure is averaged
over whole cycles after one warm-up cycle. Reals are random tensors: this measures
the networks and the step, not the data loader (`sg2dist bench data` does that).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch

from sg2dist.augment import initial_state
from sg2dist.config import Config, load_config
from sg2dist.train.build import build_nets, build_step_context, make_accelerator
from sg2dist.train.step import Nets, StepContext, StepState, train_step, update_ema

PRECISION_MODES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # bench name -> config value
CYCLE_STEPS = 16
TOP_KERNELS = 25  # rows of the profiler table


@dataclass(frozen=True)
class StepBenchSettings:
    resolution: int = 32
    batch: int = 16
    channel_base: int = 4096
    channel_max: int = 128
    channels: int = 3  # image channels
    map_layers: int = 8
    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16
    compile: bool = False  # torch.compile every call of the main phases (not R1 / path length)
    fir_kernel: str = "auto"  # model.fir_kernel: auto | torch | triton
    bias_act_kernel: str = "auto"  # model.bias_act_kernel: auto | torch | triton
    memory_format: str = "auto"  # train.memory_format: auto | channels_last | contiguous
    cycles: int = 2  # timed 16-iteration cycles
    augment: str = "none"  # augment.mode: none | ada | fixed | diffaugment
    augment_p: float = 0.5  # p of ada (its start) and fixed; ADA's p moves little in a bench


def bench_config(settings: StepBenchSettings) -> Config:
    augment = [f"augment.mode={settings.augment}"]
    if settings.augment in ("ada", "fixed"):
        augment.append(f"augment.p={settings.augment_p}")
    return load_config(
        None,
        [
            *augment,
            f"model.resolution={settings.resolution}",
            f"model.img_channels={settings.channels}",
            f"model.channel_base={settings.channel_base}",
            f"model.channel_max={settings.channel_max}",
            f"model.map_layers={settings.map_layers}",
            f"model.fir_kernel={settings.fir_kernel}",
            f"model.bias_act_kernel={settings.bias_act_kernel}",
            f"train.batch={settings.batch}",
            f"train.batch_gpu={settings.batch}",
            f"train.precision={PRECISION_MODES[settings.precision]}",
            f"train.memory_format={settings.memory_format}",
        ],
    )


@dataclass
class PhaseProfile:
    """Where one 16-iteration cycle spends its time (`sg2dist bench step --profile`)."""

    ms_per_call: dict[str, float]  # phase or optimizer step -> mean milliseconds per call
    calls_per_cycle: dict[str, int]
    top_kernels: str  # torch.profiler's table of the most expensive operators / kernels

    def ms_per_iter(self, name: str) -> float:
        return self.ms_per_call[name] * self.calls_per_cycle[name] / CYCLE_STEPS


class PhaseTimer:
    """`StepContext.phase_timer`: wall milliseconds per named span. Synchronises the device
    before and after each span (it is for profiling only: the syncs cost time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total_ms: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        with torch.profiler.record_function(name):
            yield
        self._sync()
        self.total_ms[name] += (time.perf_counter() - start) * 1000
        self.calls[name] += 1


def _torch_compile(module: torch.nn.Module) -> torch.nn.Module:
    # torch.compile's stub returns a plain callable; for a Module it is an OptimizedModule.
    return cast(torch.nn.Module, torch.compile(module))


def compile_main_phases(
    nets: Nets, compile_fn: Callable[[torch.nn.Module], torch.nn.Module] = _torch_compile
) -> Nets:
    """`nets` with every network call of Gmain and Dmain compiled: the trained network (its
    DDP wrapper) and the other one, called as a fixed function. R1 and path length need
    double backward, which torch.compile does not support: they keep the eager modules."""
    return dataclasses.replace(
        nets,
        G_ddp=compile_fn(nets.G_ddp),
        D_ddp=compile_fn(nets.D_ddp),
        G_fixed=compile_fn(nets.G_net),
        D_fixed=compile_fn(nets.D_net),
        G_reg_ddp=nets.G_ddp,
        D_reg_ddp=nets.D_ddp,
    )


def run_step_bench(
    settings: StepBenchSettings, *, profile: bool = False
) -> tuple[dict[str, float], PhaseProfile | None]:
    """(figures, profile): sec_per_iter, img_per_s, peak_rss_gib (and cuda_max_allocated_gib
    on a GPU) over `settings.cycles` timed cycles; with `profile`, one more cycle timed per
    phase and one under torch.profiler, after the timed ones (they do not change them)."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sg2dist bench: --device cuda but no CUDA GPU is visible")
    if settings.device == "cpu" and torch.cuda.is_available():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # make_accelerator picks the CPU
    cfg = bench_config(settings)
    acc = make_accelerator(cfg.train.precision)
    nets = build_nets(cfg, acc)
    if settings.compile:
        nets = compile_main_phases(nets)
    ctx = build_step_context(cfg, acc)
    state = StepState.on(acc.device, initial_state(cfg.augment))
    batch = settings.batch
    shape = (batch, settings.channels, settings.resolution, settings.resolution)
    reals = [
        (torch.rand(shape, device=acc.device) * 2 - 1, torch.zeros(batch, 0, device=acc.device))
    ]

    def cycle(first_step: int) -> None:
        for step in range(first_step, first_step + CYCLE_STEPS):
            train_step(ctx, nets, state, step, reals)
            with ctx.phase_timer("ema"):
                update_ema(
                    nets.G_ema,
                    nets.G_net,
                    cur_nimg=(step + 1) * batch,
                    batch=batch,
                    ema_kimg=10,
                    ema_rampup=None,
                )
        if acc.device.type == "cuda":
            torch.cuda.synchronize()

    cycle(0)  # warm-up: allocator, autotuning, compilation
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for c in range(settings.cycles):
        cycle(CYCLE_STEPS * (c + 1))
    sec_per_iter = (time.perf_counter() - start) / (CYCLE_STEPS * settings.cycles)
    figures = {
        "sec_per_iter": sec_per_iter,
        "img_per_s": batch / sec_per_iter,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if acc.device.type == "cuda":
        figures["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if not profile:
        return figures, None
    next_step = CYCLE_STEPS * (settings.cycles + 1)
    return figures, profile_cycles(ctx, acc.device, cycle, next_step)


def profile_cycles(
    ctx: StepContext, device: torch.device, cycle: Callable[[int], None], first_step: int
) -> PhaseProfile:
    """One cycle with every phase timed alone, then one under torch.profiler."""
    timer = PhaseTimer(device)
    ctx.phase_timer = timer
    cycle(first_step)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    ctx.phase_timer = _record_only
    with torch.profiler.profile(activities=activities) as prof:
        cycle(first_step + CYCLE_STEPS)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=TOP_KERNELS)
    ms_per_call = {name: timer.total_ms[name] / timer.calls[name] for name in timer.calls}
    return PhaseProfile(ms_per_call, dict(timer.calls), table)


@contextlib.contextmanager
def _record_only(name: str) -> Iterator[None]:
    with torch.profiler.record_function(name):
        yield
