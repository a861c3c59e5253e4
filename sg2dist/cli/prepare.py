"""`sg2dist prepare SRC DEST --resolution R`: images -> WebDataset tar shards + dataset.json.

The flow (list, convert in worker processes, write and publish shards, manifest last)
and its guarantees (byte-identical output, nothing half-written taken for a dataset)
are described in sg2dist/data/prepare.py.
"""

from __future__ import annotations

import argparse
import os

from sg2dist.data.imageops import CROP_MODES, FORMATS, RESIZE_FILTERS, ConvertSettings
from sg2dist.data.prepare import prepare_dataset
from sg2dist.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder of images (searched recursively) or a zip")
    parser.add_argument("dest", help="output: local folder or s3://bucket/prefix")
    parser.add_argument("--resolution", type=int, required=True, help="output size R (R x R)")
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), default=3, help="3 = RGB, 1 = grayscale (default 3)"
    )
    parser.add_argument(
        "--crop",
        choices=CROP_MODES,
        default="center",
        help="center: square center crop; center-wide: keep the full width, "
        "letterbox wide images; none: inputs must be square (default center)",
    )
    parser.add_argument(
        "--resize-filter",
        choices=tuple(RESIZE_FILTERS),
        default="box",
        help="box reproduces the published FIDs (default box)",
    )
    parser.add_argument(
        "--format",
        dest="image_format",
        choices=FORMATS,
        default="png",
        help="png is lossless (default); jpg is smaller",
    )
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (default 95)")
    parser.add_argument(
        "--labels",
        default="auto",
        help="auto (dataset.json in SRC if any), none, folders, or FILE.csv "
        "with filename,label rows (default auto)",
    )
    parser.add_argument(
        "--shard-size", type=int, default=0, help="samples per shard (default: ~200 MB shards at R)"
    )
    parser.add_argument(
        "--min-size",
        type=int,
        default=0,
        help="skip images whose shorter side is below this many px (default 0)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="decoding processes (default: all cores)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset at DEST")
    parser.add_argument(
        "--no-shuffle",
        action="store_true",
        help="keep the sorted input order in the shards (default: a fixed-seed permutation)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    resolution = args.resolution
    if resolution < 4 or resolution & (resolution - 1):
        raise UserError(
            f"--resolution {resolution} is not a power of two >= 4; use e.g. 32, 256, 1024"
        )
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality {args.quality} is outside 1-100")
    if args.shard_size < 0 or args.min_size < 0:
        raise UserError("--shard-size and --min-size must be >= 0")
    settings = ConvertSettings(
        resolution=resolution,
        channels=args.channels,
        crop=args.crop,
        resize_filter=args.resize_filter,
        image_format=args.image_format,
        quality=args.quality,
        min_size=args.min_size,
    )
    prepare_dataset(
        args.src,
        args.dest,
        settings,
        labels=args.labels,
        shard_size=args.shard_size or None,
        workers=max(1, args.workers),
        shuffle=not args.no_shuffle,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return 0
