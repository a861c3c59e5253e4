"""`sg2dist interpolate`: a looping latent walk through seeds, as a GIF or an mp4.

The walk visits --seeds in order and returns to the first: --frames frames per
segment, slerp between the seeds' z (--space z) or lerp between their ws (--space
w, the default; straighter, since W is the disentangled space). Its first and last
frames are exactly the first seed's image. GIFs are written with Pillow, mp4s with
the ffmpeg binary that the imageio-ffmpeg package ships (raw frames on its stdin).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import tempfile
from collections.abc import Iterable

import numpy as np
import torch

from sg2dist import storage
from sg2dist.errors import UserError
from sg2dist.generate import (
    add_generator_arguments,
    map_seeds,
    map_z,
    open_generator,
    synthesize_batches,
)
from sg2dist.images import check_suffix, parse_seeds, to_pil, z_from_seeds


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


def segment_weights(frames: int) -> torch.Tensor:
    """t = 0, 1/frames, ..., (frames-1)/frames: the next seed starts the next segment."""
    return torch.arange(frames, dtype=torch.float64) / frames


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of a, b [D] at weights t [T] -> [T, D]; t=0 gives a exactly."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    cos_omega = torch.dot(a64 / a64.norm(), b64 / b64.norm()).clamp(-1, 1)
    omega = torch.arccos(cos_omega)
    if omega < 1e-6:  # (nearly) parallel: slerp degenerates to lerp
        path = a64 + t[:, None] * (b64 - a64)
    else:
        path = (torch.sin((1 - t) * omega) / torch.sin(omega))[:, None] * a64 + (
            torch.sin(t * omega) / torch.sin(omega)
        )[:, None] * b64
    return path.to(a.dtype)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of a, b [...] at weights t [T] -> [T, ...]; t=0 gives a exactly."""
    t = t.to(a.dtype).reshape(-1, *([1] * a.ndim))
    return a + t * (b - a)


def walk(keys: torch.Tensor, frames: int, interpolate) -> torch.Tensor:
    """Keyframes [K, ...] -> the closed loop [K * frames + 1, ...], ending on keys[0]."""
    t = segment_weights(frames)
    segments = [interpolate(keys[k], keys[(k + 1) % len(keys)], t) for k in range(len(keys))]
    return torch.cat(segments + [keys[:1]])


def encode_gif(frames_NHWC: np.ndarray, fps: int) -> bytes:
    images = [to_pil(frame) for frame in frames_NHWC]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=round(1000 / fps),
        loop=0,
    )
    return buffer.getvalue()


def encode_mp4(batches: Iterable[np.ndarray], size_HWC: tuple[int, int, int], fps: int) -> bytes:
    """H.264 mp4 (yuv420p, plays everywhere) from uint8 frame batches, streamed to ffmpeg."""
    import imageio_ffmpeg

    H, W, C = size_HWC
    with tempfile.TemporaryDirectory(prefix="sg2dist-interp-") as tmp:
        path = os.path.join(tmp, "walk.mp4")
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "gray" if C == 1 else "rgb24", "-s", f"{W}x{H}",
            "-r", str(fps), "-i", "-",
            "-an", "-c:v", "libx264", "-crf", "15", "-pix_fmt", "yuv420p",
            "-movflags", "+faststart", path,
        ]  # fmt: skip
        with subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE) as ffmpeg:
            try:
                for frames_NHWC in batches:
                    ffmpeg.stdin.write(np.ascontiguousarray(frames_NHWC).tobytes())
            except BrokenPipeError:
                pass  # ffmpeg died; its stderr below says why
            ffmpeg.stdin.close()
            stderr = ffmpeg.stderr.read().decode(errors="replace").strip()
        if ffmpeg.returncode != 0:
            raise RuntimeError(f"ffmpeg failed with exit code {ffmpeg.returncode}: {stderr}")
        with open(path, "rb") as f:
            return f.read()


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
    if args.space == "z":
        ws = map_z(G, walk(z_from_seeds(seeds, G.z_dim), args.frames, slerp), args, device)
    else:
        ws = walk(map_seeds(G, seeds, args, device), args.frames, lerp)
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
