"""`sg2dist bench WHAT`: measure one part of the pipeline in isolation.

    sg2dist bench data URL --batch B --workers W [--batches N]
    sg2dist bench step --resolution R --batch B [--channel-base --channel-max] [--device cpu|cuda]
                       [--precision fp32|bf16|fp16] [--compile] [--fir-kernel auto|torch|triton]
                       [--bias-act-kernel auto|torch|triton]
                       [--memory-format auto|channels_last|contiguous]
                       [--augment ada --augment-p P]

The measurements live beside what they measure (sg2dist/data/bench.py,
sg2dist/train/bench.py); this module parses and prints.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from sg2dist import storage
from sg2dist.config import KERNELS, MEMORY_FORMATS
from sg2dist.errors import UserError

if TYPE_CHECKING:
    from sg2dist.train.bench import PhaseProfile

PROFILE_ORDER = ("Gmain", "Greg", "Dmain", "Dreg", "opt_G", "opt_D", "ema")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benches = parser.add_subparsers(dest="bench", required=True, metavar="WHAT")
    add_data_arguments(
        benches.add_parser("data", help="images/s of the data loader vs a raw PIL decode loop")
    )
    add_step_arguments(
        benches.add_parser("step", help="sec/iter, img/s and peak memory of full training steps")
    )


def main(args: argparse.Namespace) -> int:
    return args.run(args)


# ---------------------------------------------------------------------------- data


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="dataset: local folder or s3://bucket/prefix")
    parser.add_argument("--batch", type=int, default=32, help="batch_gpu (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="data worker processes (default 2)")
    parser.add_argument("--batches", type=int, default=50, help="batches timed (default 50)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="batches before timing (worker start-up; default 5)"
    )
    parser.add_argument("--shuffle-buffer", type=int, default=256, help="samples (default 256)")
    parser.set_defaults(run=run_data)


def run_data(args: argparse.Namespace) -> int:
    from sg2dist.data.bench import bench_data

    result = bench_data(
        args.url,
        batch=args.batch,
        workers=args.workers,
        batches=args.batches,
        warmup=args.warmup,
        shuffle_buffer=args.shuffle_buffer,
    )
    manifest, streamed, raw = result.manifest, result.loader, result.raw_decode
    streams = max(1, args.workers)
    where = "s3" if storage.is_s3(args.url) else "local"
    print(
        f"bench data: {args.url} ({where}; {manifest.resolution} px, {manifest.channels} ch, "
        f"{manifest.image_format}), batch {args.batch}, workers {args.workers}, "
        f"{args.batches} batches"
    )
    print(f"  loader      {streamed.per_s:9.1f} img/s  {streamed.per_cpu_s:9.1f} img/CPU-s")
    print(f"  raw decode  {raw.per_s:9.1f} img/s  {raw.per_cpu_s:9.1f} img/CPU-s  (PIL loop)")
    # Wall-clock ratio: what a training run sees. CPU ratio: the loader's own cost per
    # image, which other load on a shared machine does not distort.
    print(
        f"  per worker  {streamed.per_s / (streams * raw.per_s):9.2f}  wall "
        f"(loader / ({streams} x raw decode)), "
        f"{streamed.per_cpu_s / raw.per_cpu_s:.2f} CPU (loader img/CPU-s / raw img/CPU-s)"
    )
    return 0


# ---------------------------------------------------------------------------- step


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channel-base", type=int, default=4096)
    parser.add_argument("--channel-max", type=int, default=128)
    parser.add_argument("--channels", type=int, default=3, help="image channels")
    parser.add_argument("--map-layers", type=int, default=8)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every network call of Gmain and Dmain (R1 and path length stay eager)",
    )
    parser.add_argument(
        "--fir-kernel",
        choices=list(KERNELS),
        default="auto",
        help="model.fir_kernel: how the FIR filters run (default auto: Triton on CUDA, "
        "PyTorch convs elsewhere; torch: PyTorch convs on CUDA too)",
    )
    parser.add_argument(
        "--bias-act-kernel",
        choices=list(KERNELS),
        default="auto",
        help="model.bias_act_kernel: how each layer's scale, noise, bias, activation and clamp "
        "run (default auto: one Triton kernel on CUDA, PyTorch ops elsewhere; torch: PyTorch "
        "ops on CUDA too)",
    )
    parser.add_argument(
        "--memory-format",
        choices=list(MEMORY_FORMATS),
        default="auto",
        help="train.memory_format: feature-map layout (default auto: channels-last on CPU, "
        "NCHW on CUDA)",
    )
    parser.add_argument("--cycles", type=int, default=2, help="timed 16-iteration cycles")
    parser.add_argument(
        "--augment",
        choices=["none", "ada", "fixed", "diffaugment"],
        default="none",
        help="augment every D input (augment.mode); default none",
    )
    parser.add_argument(
        "--augment-p", type=float, default=0.5, help="p of --augment ada/fixed (default 0.5)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print milliseconds per phase (Gmain, Greg, Dmain, Dreg, opt_G, opt_D, ema) "
        "and the top operators / kernels (two more cycles, after the timed ones)",
    )
    parser.set_defaults(run=run_step)


def run_step(args: argparse.Namespace) -> int:
    import torch

    from sg2dist.train.bench import StepBenchSettings, run_step_bench

    for flag, kernel in (
        ("--fir-kernel", args.fir_kernel),
        ("--bias-act-kernel", args.bias_act_kernel),
    ):
        if kernel == "triton" and args.device != "cuda":
            raise UserError(
                f"{flag} triton runs on CUDA only (on a CPU the PyTorch forms run whatever the "
                f"setting); add --device cuda or drop {flag}"
            )
    settings = StepBenchSettings(
        resolution=args.resolution,
        batch=args.batch,
        channel_base=args.channel_base,
        channel_max=args.channel_max,
        channels=args.channels,
        map_layers=args.map_layers,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        fir_kernel=args.fir_kernel,
        bias_act_kernel=args.bias_act_kernel,
        memory_format=args.memory_format,
        cycles=args.cycles,
        augment=args.augment,
        augment_p=args.augment_p,
    )
    result, profile = run_step_bench(settings, profile=args.profile)
    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}"
    )
    variant = " compiled" if args.compile else ""
    variant += f" fir {args.fir_kernel}" if args.fir_kernel != "auto" else ""
    variant += f" bias_act {args.bias_act_kernel}" if args.bias_act_kernel != "auto" else ""
    variant += f" {args.memory_format}" if args.memory_format != "auto" else ""
    if args.augment != "none":
        p = f" p={args.augment_p:g}" if args.augment in ("ada", "fixed") else ""
        variant += f" augment {args.augment}{p}"
    print(
        f"bench step: {args.resolution}px batch {args.batch} base {args.channel_base} "
        f"max {args.channel_max} {args.precision}{variant} "
        f"on {device}: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items())
    )
    if profile is not None:
        print(format_profile(profile, result["sec_per_iter"]))
    return 0


def format_profile(profile: PhaseProfile, sec_per_iter: float) -> str:
    """Phase table (ms per call, calls per 16-step cycle, ms per iteration, share of the
    timed iteration), then the profiler's operator / kernel table."""
    lines = ["", "phase     ms/call  calls/cycle  ms/iter  share"]
    for name in PROFILE_ORDER:
        if name in profile.ms_per_call:
            per_iter = profile.ms_per_iter(name)
            lines.append(
                f"{name:<8} {profile.ms_per_call[name]:8.2f}  {profile.calls_per_cycle[name]:11d}"
                f"  {per_iter:7.2f}  {per_iter / (sec_per_iter * 1000):5.1%}"
            )
    timed = sum(profile.ms_per_iter(name) for name in profile.ms_per_call)
    lines.append(f"{'sum':<8} {'':8}  {'':11}  {timed:7.2f}  (phases timed one by one, synced)")
    return "\n".join([*lines, "", "top operators / kernels (one cycle):", profile.top_kernels])
