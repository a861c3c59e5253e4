"""`sg2dist generate`: one PNG per seed and/or a grid image from a checkpoint's G_ema.

sg2dist generate --checkpoint runs/quickstart --class 3 --seeds 0-63 --trunc 0.7 --outdir out/
sg2dist generate --checkpoint s3://bucket/runs/cats --seeds 0-63 --grid 8x8 grid.png
"""

from __future__ import annotations

import argparse

import numpy as np

from sg2dist import storage
from sg2dist.cli.common import add_generator_arguments, check_suffix, open_generator, parse_seeds
from sg2dist.config import parse_grid
from sg2dist.errors import UserError
from sg2dist.sampling import (
    class_labels,
    map_z,
    synthesize_batches,
    tile_grid,
    write_png,
    z_from_seeds,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generator_arguments(parser)
    parser.add_argument("--seeds", required=True, help="seeds, e.g. 0-63 or 1,2,5-7")
    parser.add_argument(
        "--outdir", metavar="DIR", help="write seedNNNN.png per seed here (local or s3://)"
    )
    parser.add_argument(
        "--grid",
        nargs=2,
        metavar=("COLSxROWS", "FILE"),
        help="write one grid image, e.g. --grid 8x8 grid.png (seeds row by row)",
    )


def check_grid(args: argparse.Namespace, seeds: list[int]) -> tuple[int, int, str]:
    """(cols, rows, file) of --grid, which must hold exactly the seeds."""
    layout, grid_url = args.grid
    cols, rows = parse_grid(layout)
    check_suffix(grid_url, (".png",), "--grid FILE")
    if cols * rows != len(seeds):
        raise UserError(
            f"--grid {layout} holds {cols * rows} images but --seeds '{args.seeds}' gives "
            f"{len(seeds)}; pass {cols * rows} seeds (e.g. --seeds 0-{cols * rows - 1}) "
            "or change --grid"
        )
    return cols, rows, grid_url


def main(args: argparse.Namespace) -> int:
    seeds = parse_seeds(args.seeds)
    if not args.outdir and not args.grid:
        raise UserError("nothing to write; pass --outdir DIR and/or --grid 8x8 FILE.png")
    grid = check_grid(args, seeds) if args.grid else None

    G, device = open_generator(args)
    c = class_labels(G.c_dim, args.class_idx, len(seeds))
    ws = map_z(
        G,
        z_from_seeds(seeds, G.z_dim),
        c,
        truncation_psi=args.trunc,
        batch=args.batch,
        device=device,
    )
    batches = synthesize_batches(
        G,
        ws,
        noise_mode=args.noise_mode,
        noise_seeds=seeds,
        batch=args.batch,
        device=device,
        desc="generate",
    )
    kept: list[np.ndarray] = []  # only a grid needs every image at once
    done = 0
    for img_NHWC in batches:
        if args.outdir:
            for seed, img_HWC in zip(seeds[done : done + len(img_NHWC)], img_NHWC, strict=True):
                write_png(storage.join(args.outdir, f"seed{seed:04d}.png"), img_HWC)
        if grid:
            kept.append(img_NHWC)
        done += len(img_NHWC)

    if args.outdir:
        print(f"wrote {len(seeds)} images to {args.outdir}")
    if grid:
        cols, rows, grid_url = grid
        write_png(grid_url, tile_grid(np.concatenate(kept), cols, rows))
        print(f"wrote the {args.grid[0]} grid to {grid_url}")
    return 0
