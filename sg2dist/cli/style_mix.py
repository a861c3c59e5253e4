"""`sg2dist style-mix`: the style-mixing figure of the StyleGAN papers.

Cell (row r, column c) is synthesized from column seed c's ws with the layers named
by --styles (0-6 = the coarse ones: pose, face shape) taken from row seed r. The
figure has an empty top-left cell, the column seeds' own images along the top and
the row seeds' own images down the left, as in the official code.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sg2dist.cli.common import (
    add_generator_arguments,
    check_suffix,
    map_z_as_asked,
    open_generator,
    parse_int_list,
    parse_seeds,
)
from sg2dist.errors import UserError
from sg2dist.sampling import (
    mixed_ws,
    synthesize,
    tile_grid,
    write_png,
    z_from_seeds,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generator_arguments(parser)
    parser.add_argument("--rows", required=True, help="row seeds (give the styles), e.g. 85,100,75")
    parser.add_argument(
        "--cols", required=True, help="column seeds (give the rest), e.g. 55,821,1789"
    )
    parser.add_argument(
        "--styles",
        default="0-6",
        help="ws layer indices taken from the row seeds (default 0-6: coarse styles)",
    )
    parser.add_argument("file", metavar="FILE.png", help="output image, local or s3://")


def figure_cells(
    img_NHWC: np.ndarray, source_seeds: list[int], row_seeds: list[int], col_seeds: list[int]
) -> np.ndarray:
    """[(rows + 1) x (cols + 1), H, W, C]: blank corner, column images, then per row its own
    image and its mixed cells. `img_NHWC` holds the source images, then the mixed cells."""
    source_img = dict(zip(source_seeds, img_NHWC[: len(source_seeds)], strict=True))
    mixed_img = img_NHWC[len(source_seeds) :]
    cells = [np.zeros_like(img_NHWC[0])] + [source_img[s] for s in col_seeds]
    for r, row_seed in enumerate(row_seeds):
        cells += [source_img[row_seed]] + list(
            mixed_img[r * len(col_seeds) : (r + 1) * len(col_seeds)]
        )
    return np.stack(cells)


def main(args: argparse.Namespace) -> int:
    row_seeds = parse_seeds(args.rows, "--rows")
    col_seeds = parse_seeds(args.cols, "--cols")
    styles = parse_int_list(args.styles, "--styles")
    check_suffix(args.file, (".png",), "FILE")

    G, device = open_generator(args)
    if max(styles) >= G.num_ws:
        raise UserError(
            f"--styles '{args.styles}' names layer {max(styles)} but this model has ws layers "
            f"0..{G.num_ws - 1}; pick indices in that range"
        )
    source_seeds = list(dict.fromkeys(col_seeds + row_seeds))
    source_ws = map_z_as_asked(G, z_from_seeds(source_seeds, G.z_dim), args, device)
    ws_by_seed = dict(zip(source_seeds, source_ws, strict=True))
    cell_ws = mixed_ws(ws_by_seed, row_seeds, col_seeds, styles)
    # One pass for the border images and the mixed cells; under random noise a source
    # image uses its own seed (as in `generate`) and a mixed cell its column's seed.
    all_ws = torch.cat([torch.stack([ws_by_seed[s] for s in source_seeds]), cell_ws])
    noise_seeds = source_seeds + [col for _ in row_seeds for col in col_seeds]
    img_NHWC = synthesize(
        G,
        all_ws,
        noise_mode=args.noise_mode,
        noise_seeds=noise_seeds,
        batch=args.batch,
        device=device,
        desc="style-mix",
    )
    cells = figure_cells(img_NHWC, source_seeds, row_seeds, col_seeds)
    write_png(args.file, tile_grid(cells, len(col_seeds) + 1, len(row_seeds) + 1))
    print(f"wrote a {len(row_seeds)}x{len(col_seeds)} style-mixing figure to {args.file}")
    return 0
