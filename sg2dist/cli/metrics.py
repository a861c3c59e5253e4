"""`sg2dist metrics`: score a checkpoint's G_ema with FID/KID (IS, precision/recall) and
its perceptual path length.

    sg2dist metrics --checkpoint s3://bucket/runs/cats --metrics fid50k,kid50k
    sg2dist metrics --checkpoint runs/quick --data runs/datasets/digits32 \
        --metrics fid10k --inception-weights /models/weights-inception-2015-12-05-6726825d.pth
    sg2dist metrics --checkpoint runs/quick --metrics ppl_wend --lpips-weights lpips-vgg16.pth

The dataset defaults to the run's data.url, the Inception and LPIPS weights to the run's
metrics.inception_weights and metrics.lpips_weights; real-image statistics are cached next
to the dataset. PPL needs no dataset.
"""

from __future__ import annotations

import argparse
import json

from sg2dist.cli.common import (
    add_batch_argument,
    add_checkpoint_argument,
    add_device_argument,
    check_batch,
    load_generator_or_explain,
    resolve_device,
)
from sg2dist.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--data", default="", help="dataset URL to compare with (default: the run's data.url)"
    )
    parser.add_argument(
        "--metrics",
        default="fid50k",
        help="comma-separated, KIND+COUNT generated images: fid50k,kid50k,is50k,"
        "pr50k, or perceptual path lengths ppl_wend, ppl_wend10k, ppl_zfull, ppl_wend_crop "
        "(default: fid50k)",
    )
    parser.add_argument(
        "--inception-weights",
        default="",
        help="local path or s3:// URL of weights-inception-2015-12-05-6726825d.pth "
        "(default: the run's metrics.inception_weights, else download)",
    )
    parser.add_argument(
        "--lpips-weights",
        default="",
        help="local path or s3:// URL of lpips-vgg16.pth, for PPL (default: the run's "
        "metrics.lpips_weights); README 'Perceptual similarity weights' says how to build it",
    )
    parser.add_argument(
        "--num-gen",
        type=int,
        default=None,
        help="generated images for every metric (quick, less precise scores)",
    )
    add_batch_argument(parser, default=64)
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    from sg2dist.metrics import compute_metrics, parse_metric

    names = [name.strip() for name in args.metrics.split(",") if name.strip()]
    if not names:
        raise UserError("--metrics is empty; write e.g. --metrics fid50k,kid50k")
    specs = [parse_metric(name) for name in names]  # before the slow checkpoint load
    if args.num_gen is not None and args.num_gen < 2:
        raise UserError(f"--num-gen {args.num_gen} is too small; use at least 2 (e.g. 10000)")
    check_batch(args.batch)
    device = resolve_device(args.device)
    G_ema, cfg, _meta = load_generator_or_explain(args.checkpoint, device)
    data_url = args.data or cfg.data.url
    if not data_url and any(spec.kind != "ppl" for spec in specs):
        raise UserError(f"{args.checkpoint} records no data.url; pass --data DATASET_URL")
    scores = compute_metrics(
        G_ema,
        data_url,
        names,
        device=device,
        inception_weights=args.inception_weights or cfg.metrics.inception_weights,
        lpips_weights=args.lpips_weights or cfg.metrics.lpips_weights,
        num_gen=args.num_gen,
        batch=args.batch,
    )
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "data": data_url, "metrics": scores}))
    else:
        width = max(len(name) for name in scores)
        for name, value in scores.items():
            print(f"{name:<{width}}  {value:.4f}")
    return 0
