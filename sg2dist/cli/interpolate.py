"""`sg2dist interpolate`: a looping latent walk through seeds, as a GIF or an mp4.

The walk visits --seeds in order and returns to the first: --frames frames per
segment, slerp between the seeds' z (--space z) or lerp between their ws (--space
w, the default; straighter, since W is the disentangled space). Its first and last
frames are exactly the first seed's image. GIFs are written with Pillow, mp4s with
the ffmpeg binary that the imageio-ffmpeg package ships.
"""

from __future__ import annotations

import argparse

import numpy as np

from sg2dist import storage
from sg2dist.cli.common import (
    add_generator_arguments,
    check_suffix,
    map_z_as_asked,
    open_generator,
    parse_seeds,
)
from sg2dist.errors import UserError
from sg2dist.sampling import (
    encode_gif,
    encode_mp4,
    lerp,
    slerp,
    synthesize_batches,
    walk,
    z_from_seeds,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generator_arguments(parser)
    parser.add_argument("--seeds", required=True, help="seeds to visit in order, e.g. 1,2,3")
    parser.add_argument("--frames", type=int, default=60, help="frames per segment (seed to seed)")
    parser.add_argument(
        "--space",
        choices=("w", "z"),
        default="w",
        help="w: lerp between ws (default); z: slerp between z",
    )
    parser.add_argument("--fps", type=int, default=30, help="frames per second")
    parser.add_argument("file", metavar="FILE.gif|FILE.mp4", help="output video, local or s3://")


def main(args: argparse.Namespace) -> int:
    seeds = parse_seeds(args.seeds)
    suffix = check_suffix(args.file, (".gif", ".mp4"), "FILE")
    if len(seeds) < 2:
        raise UserError(
            f"--seeds '{args.seeds}' names one seed; a walk needs two or more, e.g. 1,2,3"
        )
    if args.frames < 1 or args.fps < 1:
        raise UserError(f"--frames {args.frames} and --fps {args.fps} must be >= 1")

    G, device = open_generator(args)

    z_keys = z_from_seeds(seeds, G.z_dim)
    if args.space == "z":
        ws = map_z_as_asked(G, walk(z_keys, args.frames, slerp), args, device)
    else:
        ws = walk(map_z_as_asked(G, z_keys, args, device), args.frames, lerp)
    # Under random noise every frame uses the first seed's noise, so the walk does not flicker.
    batches = synthesize_batches(
        G,
        ws,
        noise_mode=args.noise_mode,
        noise_seeds=[seeds[0]] * len(ws),
        batch=args.batch,
        device=device,
        desc="interpolate",
    )
    size_HWC = (G.img_resolution, G.img_resolution, G.img_channels)
    if suffix == ".gif":
        data = encode_gif(np.concatenate(list(batches)), args.fps)
    else:
        data = encode_mp4(batches, size_HWC, args.fps)
    storage.write_bytes(args.file, data)
    print(f"wrote {len(ws)} frames ({len(seeds)} seeds x {args.frames} + 1) to {args.file}")
    return 0
