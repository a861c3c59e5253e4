"""`sg2dist bench step`: time full training iterations (all four phases, Adam steps).

A lazy-regularisation cycle is 16 iterations (R1 every 16, path length every 4), so
the figure is averaged over whole cycles after one warm-up cycle. Reals are random
tensors: this measures the networks and the step, not the data loader
(`sg2dist bench data` does that).
"""

from __future__ import annotations

import resource
import time

import torch

from sg2dist.config import load_config
from sg2dist.train.loop import build_nets, build_step_context, make_accelerator
from sg2dist.train.step import train_step, update_ema


def add_step_arguments(parser) -> None:
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channel-base", type=int, default=4096)
    parser.add_argument("--channel-max", type=int, default=128)
    parser.add_argument("--channels", type=int, default=3, help="image channels")
    parser.add_argument("--map-layers", type=int, default=8)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile G and D")
    parser.add_argument("--cycles", type=int, default=2, help="timed 16-iteration cycles")


def _bench_config(args):
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[args.precision]
    return load_config(
        None,
        [
            f"model.resolution={args.resolution}",
            f"model.img_channels={args.channels}",
            f"model.channel_base={args.channel_base}",
            f"model.channel_max={args.channel_max}",
            f"model.map_layers={args.map_layers}",
            f"train.batch={args.batch}",
            f"train.batch_gpu={args.batch}",
            f"train.precision={precision}",
        ],
    )


def run_step_bench(args) -> dict[str, float]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sg2dist bench: --device cuda but no CUDA GPU is visible")
    if args.device == "cpu" and torch.cuda.is_available():
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # make_accelerator picks the CPU
    cfg = _bench_config(args)
    acc = make_accelerator(cfg.train.precision)
    nets = build_nets(cfg, acc)
    if args.compile:
        # Main phases compiled; R1 and path length (double backward) stay eager.
        nets.G_reg_ddp, nets.D_reg_ddp = nets.G_ddp, nets.D_ddp
        nets.G_ddp, nets.D_ddp = torch.compile(nets.G_ddp), torch.compile(nets.D_ddp)
    ctx = build_step_context(cfg, acc)
    shape = (args.batch, args.channels, args.resolution, args.resolution)
    reals = [
        (
            torch.rand(shape, device=acc.device) * 2 - 1,
            torch.zeros(args.batch, 0, device=acc.device),
        )
    ]

    def cycle(first_step: int) -> None:
        for step in range(first_step, first_step + 16):
            train_step(ctx, nets, step, reals)
            update_ema(
                nets.G_ema,
                nets.G_net,
                cur_nimg=(step + 1) * args.batch,
                batch=args.batch,
                ema_kimg=10,
                ema_rampup=None,
            )
        if acc.device.type == "cuda":
            torch.cuda.synchronize()

    cycle(0)  # warm-up: allocator, autotuning, compilation
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for c in range(args.cycles):
        cycle(16 * (c + 1))
    sec_per_iter = (time.perf_counter() - start) / (16 * args.cycles)
    result = {
        "sec_per_iter": sec_per_iter,
        "img_per_s": args.batch / sec_per_iter,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if acc.device.type == "cuda":
        result["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main_step(args) -> int:
    result = run_step_bench(args)
    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}"
    )
    print(
        f"bench step: {args.resolution}px batch {args.batch} base {args.channel_base} "
        f"max {args.channel_max} {args.precision}{' compiled' if args.compile else ''} "
        f"on {device}: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items())
    )
    return 0
