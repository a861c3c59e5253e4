"""`sg2dist generate`: one PNG per seed (or per given w) and/or a grid image from a
checkpoint's G_ema.

sg2dist generate --checkpoint runs/quickstart --class 3 --seeds 0-63 --trunc 0.7 --outdir out/
sg2dist generate --checkpoint s3://bucket/runs/cats --seeds 0-63 --grid 8x8 grid.png
sg2dist generate --checkpoint runs/quickstart --ws out/projected_w.npz --outdir out/
"""

from __future__ import annotations

import argparse
import zipfile

import numpy as np
import torch

from sg2dist import storage
from sg2dist.cli.common import (
    add_generator_arguments,
    check_suffix,
    map_z_as_asked,
    open_generator,
    parse_seeds,
)
from sg2dist.config import parse_grid
from sg2dist.errors import UserError
from sg2dist.model import Generator
from sg2dist.sampling import (
    synthesize_batches,
    tile_grid,
    truncate_ws,
    write_png,
    ws_from_npz,
    z_from_seeds,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generator_arguments(parser)
    parser.add_argument("--seeds", help="seeds, e.g. 0-63 or 1,2,5-7")
    parser.add_argument(
        "--ws",
        metavar="FILE.npz",
        help="render these ws instead of seeds: array 'w' [N, num_ws, w_dim], e.g. the "
        "projected_w.npz of `sg2dist project` (or of the official projector)",
    )
    parser.add_argument(
        "--outdir",
        metavar="DIR",
        help="write seedNNNN.png per seed (wsNNNN.png per row of --ws) here (local or s3://)",
    )
    parser.add_argument(
        "--grid",
        nargs=2,
        metavar=("COLSxROWS", "FILE"),
        help="write one grid image, e.g. --grid 8x8 grid.png (images row by row)",
    )


def check_grid(args: argparse.Namespace, count: int, what: str) -> tuple[int, int, str]:
    """(cols, rows, file) of --grid, which must hold exactly the `count` images."""
    layout, grid_url = args.grid
    cols, rows = parse_grid(layout)
    check_suffix(grid_url, (".png",), "--grid FILE")
    if cols * rows != count:
        raise UserError(
            f"--grid {layout} holds {cols * rows} images but {what} gives {count}; "
            f"pass {cols * rows} (e.g. --seeds 0-{cols * rows - 1}) or change --grid"
        )
    return cols, rows, grid_url


def read_ws(url: str, G: Generator) -> torch.Tensor:
    """ws [N, num_ws, w_dim] from an .npz file, or one clear error."""
    try:
        ws = ws_from_npz(storage.read_bytes(url))
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(
            f"--ws {url} is not a ws file ({exc}); pass the projected_w.npz that "
            "`sg2dist project` wrote"
        ) from None
    expected = (G.num_ws, G.w_dim)
    if ws.ndim != 3 or tuple(ws.shape[1:]) != expected or len(ws) == 0:
        raise UserError(
            f"--ws {url} holds ws of shape {list(ws.shape)}; this model takes "
            f"[N, {G.num_ws}, {G.w_dim}]: project with this checkpoint"
        )
    return ws


def main(args: argparse.Namespace) -> int:
    if bool(args.seeds) == bool(args.ws):
        raise UserError("pass either --seeds (random z) or --ws FILE.npz (given ws), not both")
    if not args.outdir and not args.grid:
        raise UserError("nothing to write; pass --outdir DIR and/or --grid 8x8 FILE.png")
    if args.ws:
        if args.class_idx is not None:
            raise UserError("--class has no effect with --ws (the ws hold the class); drop it")
        check_suffix(args.ws, (".npz",), "--ws")
        G, device = open_generator(args, class_required=False)
        ws = truncate_ws(
            G, read_ws(args.ws, G), truncation_psi=args.trunc, truncation_cutoff=args.trunc_cutoff
        )
        names = [f"ws{index:04d}.png" for index in range(len(ws))]
        noise_seeds = list(range(len(ws)))
        grid = check_grid(args, len(ws), f"--ws {args.ws}") if args.grid else None
    else:
        seeds = parse_seeds(args.seeds)
        grid = check_grid(args, len(seeds), f"--seeds '{args.seeds}'") if args.grid else None
        G, device = open_generator(args)
        ws = map_z_as_asked(G, z_from_seeds(seeds, G.z_dim), args, device)
        names = [f"seed{seed:04d}.png" for seed in seeds]
        noise_seeds = seeds
    write_images(args, G, ws, names, noise_seeds, grid, device)
    return 0


def write_images(
    args: argparse.Namespace,
    G: Generator,
    ws: torch.Tensor,
    names: list[str],
    noise_seeds: list[int],
    grid: tuple[int, int, str] | None,
    device: torch.device,
) -> None:
    batches = synthesize_batches(
        G,
        ws,
        noise_mode=args.noise_mode,
        noise_seeds=noise_seeds,
        batch=args.batch,
        device=device,
        desc="generate",
    )
    kept: list[np.ndarray] = []  # only a grid needs every image at once
    done = 0
    for img_NHWC in batches:
        if args.outdir:
            for name, img_HWC in zip(names[done : done + len(img_NHWC)], img_NHWC, strict=True):
                write_png(storage.join(args.outdir, name), img_HWC)
        if grid:
            kept.append(img_NHWC)
        done += len(img_NHWC)

    if args.outdir:
        print(f"wrote {len(names)} images to {args.outdir}")
    if grid:
        cols, rows, grid_url = grid
        write_png(grid_url, tile_grid(np.concatenate(kept), cols, rows))
        print(f"wrote the {args.grid[0]} grid to {grid_url}")
