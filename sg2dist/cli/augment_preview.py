"""`sg2dist augment-preview`: a grid of real images as D sees them under augmentation.

sg2dist augment-preview --data runs/datasets/digits32 --p 0.5 preview.png
sg2dist augment-preview --data s3://bucket/datasets/cats256 --p 0.8 --pipe bgcfnc out.png
sg2dist augment-preview --data URL --mode diffaugment out.png

The first COLSxROWS images of the dataset (manifest order) go through the same code as the
D inputs of a training step (augment.mode=fixed at strength --p, or DiffAugment). At high p,
look for what would leak into generated images: rotated or mirrored content, odd colours,
cut-out squares in most cells rather than in a few.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from sg2dist.augment import Augmenter
from sg2dist.cli.common import check_suffix
from sg2dist.config import AUGMENT_PIPES, AugmentConfig, parse_grid
from sg2dist.data import iter_images
from sg2dist.errors import UserError
from sg2dist.sampling import tile_grid, to_uint8, write_png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT.png", help="the grid image (local or s3://)")
    parser.add_argument("--data", required=True, metavar="URL", help="dataset (sg2dist prepare)")
    parser.add_argument("--p", type=float, default=0.5, help="ADA strength in [0, 1] (default 0.5)")
    parser.add_argument(
        "--pipe", default="bgc", choices=AUGMENT_PIPES, help="ADA transform groups (default bgc)"
    )
    parser.add_argument(
        "--mode", default="ada", choices=["ada", "diffaugment"], help="default ada (uses --p)"
    )
    parser.add_argument("--grid", default="8x8", metavar="COLSxROWS", help="default 8x8")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random transforms")


def main(args: argparse.Namespace) -> int:
    check_suffix(args.out, (".png",), "OUT")
    if not 0 <= args.p <= 1:
        raise UserError(f"--p {args.p} must be in [0, 1]")
    cols, rows = parse_grid(args.grid)
    count = cols * rows
    pixels = [img for img, _ in itertools.islice(iter_images(args.data), count)]
    if len(pixels) < count:
        raise UserError(
            f"--grid {args.grid} needs {count} images but {args.data} has {len(pixels)}; "
            "use a smaller --grid"
        )
    reals = torch.from_numpy(np.stack(pixels)).float() / 127.5 - 1  # as the trainer feeds D
    if args.mode == "ada":
        cfg = AugmentConfig(mode="fixed", pipe=args.pipe, p=str(args.p))
    else:
        cfg = AugmentConfig(mode="diffaugment")
    augment = Augmenter(cfg, batch=count).for_micro_batch(args.seed, p=args.p)
    with torch.no_grad():
        seen = augment(reals)
    write_png(args.out, tile_grid(to_uint8(seen), cols, rows))
    what = f"ADA {args.pipe} at p={args.p:g}" if args.mode == "ada" else "DiffAugment"
    print(f"wrote {count} images of {args.data} as D sees them ({what}) to {args.out}")
    return 0
