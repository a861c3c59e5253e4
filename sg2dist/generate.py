"""`sg2dist generate`: one PNG per seed and/or a grid image from a checkpoint's G_ema.

Also home of what the three generator commands share (style-mix and interpolate
import it): the common options, loading G_ema on a device, class labels, seeds -> ws
and batched synthesis -> uint8 images.

Reproducibility: z for seed s is `np.random.RandomState(s).randn(z_dim)` and noise
is the model's constant noise by default, so a seed gives the same image on every
machine. With `--noise-mode random` the noise is drawn from torch seeded with the
image's seed, one image at a time, so an image never depends on its batch-mates.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from sg2dist import storage
from sg2dist.config import parse_grid
from sg2dist.errors import UserError
from sg2dist.images import check_suffix, parse_seeds, tile_grid, to_uint8, write_png, z_from_seeds

NOISE_MODES = ("const", "random", "none")


# ---------------------------------------------------------------------------- shared parts


def add_generator_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every generator command takes: which G_ema, where it runs, how it samples."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="URL",
        help="run folder (its latest checkpoint) or checkpoint folder, local or s3://",
    )
    parser.add_argument(
        "--trunc",
        type=float,
        default=1.0,
        metavar="PSI",
        help="truncation psi: 1 = none, 0.7 = typical, 0 = the average image",
    )
    parser.add_argument(
        "--noise-mode",
        choices=NOISE_MODES,
        default="const",
        help="per-pixel noise: const (reproducible, default), random (seeded), none",
    )
    parser.add_argument(
        "--class",
        dest="class_idx",
        type=int,
        default=None,
        metavar="N",
        help="class index for a conditional model (required there)",
    )
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto = cuda when available, else cpu",
    )


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        # TF32 rounds conv and matmul inputs to 10 mantissa bits: pixels would then move by
        # a few levels with the batch size and between GPU models (seen on an H100).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device(name)


def open_generator(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.device]:
    """G_ema of `args.checkpoint` on `args.device`, after checking --batch and --class."""
    if args.batch < 1:
        raise UserError(f"--batch {args.batch} must be >= 1")
    device = resolve_device(args.device)
    from sg2dist.train.checkpoint import load_generator

    try:
        G, _cfg, _meta = load_generator(args.checkpoint, device)
    except UserError:
        raise
    except (KeyError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        # A folder that passed the hash check but does not hold a G_ema for this code
        # (hand-edited meta.json, another project's file, a mismatched state dict).
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise UserError(
            f"checkpoint {args.checkpoint} could not be read as a sg2dist G_ema "
            f"({type(exc).__name__}: {reason}); "
            "pass a run folder or checkpoints/nimg-... folder written by `sg2dist train`"
        ) from None
    check_class(G.c_dim, args.class_idx)
    return G, device


def check_class(c_dim: int, class_idx: int | None) -> None:
    if c_dim == 0 and class_idx is not None:
        raise UserError(f"--class {class_idx}: this model is unconditional; drop --class")
    if c_dim > 0 and class_idx is None:
        raise UserError(
            f"this model is conditional on {c_dim} classes; pass --class N with N in 0..{c_dim - 1}"
        )
    if c_dim > 0 and not 0 <= class_idx < c_dim:
        raise UserError(
            f"--class {class_idx} is out of range; this model has classes 0..{c_dim - 1}"
        )


def class_labels(c_dim: int, class_idx: int | None, num: int) -> torch.Tensor:
    """c [num, c_dim]: one-hot rows for `class_idx`, or [num, 0] for an unconditional model."""
    c = torch.zeros([num, c_dim])
    if c_dim > 0:
        c[:, class_idx] = 1
    return c


@torch.no_grad()
def map_z(G, z: torch.Tensor, args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """ws [N, num_ws, w_dim] (on the CPU) for z [N, z_dim], with --class and --trunc."""
    c = class_labels(G.c_dim, args.class_idx, len(z))
    ws_chunks = [
        G.mapping(
            z[i : i + args.batch].to(device),
            c[i : i + args.batch].to(device),
            truncation_psi=args.trunc,
        ).cpu()
        for i in range(0, len(z), args.batch)
    ]
    return torch.cat(ws_chunks)


def map_seeds(G, seeds: list[int], args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    return map_z(G, z_from_seeds(seeds, G.z_dim), args, device)


@torch.no_grad()
def synthesize_batches(
    G,
    ws: torch.Tensor,
    *,
    noise_mode: str,
    noise_seeds: list[int],
    batch: int,
    device: torch.device,
    desc: str,
) -> Iterator[np.ndarray]:
    """Yield uint8 [n, H, W, C] image batches for ws [N, num_ws, w_dim], in order.

    `noise_seeds[i]` seeds the noise of image i under noise_mode random; those images
    are made one at a time so that each one's noise comes from its seed alone.
    """
    step = 1 if noise_mode == "random" else batch
    with tqdm(total=len(ws), unit="img", desc=desc) as progress:
        for i in range(0, len(ws), step):
            if noise_mode == "random":
                torch.manual_seed(noise_seeds[i])
            img_NCHW = G.synthesis(ws[i : i + step].to(device), noise_mode=noise_mode)
            yield to_uint8(img_NCHW)
            progress.update(len(img_NCHW))


def synthesize(G, ws: torch.Tensor, **kwargs) -> np.ndarray:
    """All images of `synthesize_batches` as one uint8 [N, H, W, C] array."""
    return np.concatenate(list(synthesize_batches(G, ws, **kwargs)))


# ---------------------------------------------------------------------------- generate


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


def main(args: argparse.Namespace) -> int:
    seeds = parse_seeds(args.seeds)
    if not args.outdir and not args.grid:
        raise UserError("nothing to write; pass --outdir DIR and/or --grid 8x8 FILE.png")
    if args.grid:
        layout, grid_url = args.grid
        cols, rows = parse_grid(layout)
        check_suffix(grid_url, (".png",), "--grid FILE")
        if cols * rows != len(seeds):
            raise UserError(
                f"--grid {layout} holds {cols * rows} images but --seeds '{args.seeds}' gives "
                f"{len(seeds)}; pass {cols * rows} seeds (e.g. --seeds 0-{cols * rows - 1}) "
                "or change --grid"
            )

    G, device = open_generator(args)
    ws = map_seeds(G, seeds, args, device)
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
        if args.grid:
            kept.append(img_NHWC)
        done += len(img_NHWC)

    if args.outdir:
        print(f"wrote {len(seeds)} images to {args.outdir}")
    if args.grid:
        write_png(grid_url, tile_grid(np.concatenate(kept), cols, rows))
        print(f"wrote the {layout} grid to {grid_url}")
    return 0
