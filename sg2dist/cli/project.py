"""`sg2dist project`: find the w (or, with --w-plus, the per-layer ws) whose image matches
a target photo, as the official StyleGAN2 projector does.

    sg2dist project --checkpoint runs/ffhq --target photo.png --outdir out/
    sg2dist generate --checkpoint runs/ffhq --ws out/projected_w.npz --outdir out/

The target is centre-cropped and resized to the model's resolution with prepare's own code
(--resize-filter, box by default as in prepare) and converted to the model's channels.
The LPIPS weights come from --lpips-weights, else the run's metrics.lpips_weights.
Writes into --outdir (local or s3://): target.png (the crop), proj.png (the projection,
rendered with the checkpoint's constant noise as `generate --ws` renders it),
target_proj.png (the two side by side), projected_w.npz (array `w` [1, num_ws, w_dim]) and,
with --video, proj.mp4 (the target beside the projection after every step).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np
import torch

from sg2dist import storage
from sg2dist.cli.common import (
    add_checkpoint_argument,
    add_class_argument,
    add_device_argument,
    check_class,
    load_generator_or_explain,
    resolve_device,
)
from sg2dist.data.imageops import RESIZE_FILTERS
from sg2dist.inversion.lpips import LPIPS, load_lpips, lpips_distance
from sg2dist.inversion.projector import ProjectionSettings, load_target, project
from sg2dist.model import Generator
from sg2dist.sampling import encode_mp4, synthesize_batches, write_png, ws_npz_bytes

VIDEO_FPS = 10
RENDER_BATCH = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--target", required=True, help="image to project (local or s3://)")
    parser.add_argument("--outdir", required=True, help="output folder (local or s3://)")
    parser.add_argument("--steps", type=int, default=1000, help="optimisation steps (1000)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the starting noise and w statistics (0)"
    )
    add_class_argument(parser)
    parser.add_argument(
        "--w-plus", action="store_true", help="optimise one w per layer (W+) instead of one w"
    )
    parser.add_argument(
        "--video", action="store_true", help="also write proj.mp4 of the optimisation"
    )
    parser.add_argument(
        "--lpips-weights",
        default="",
        help="local path or s3:// URL of lpips-vgg16.pth (default: the run's "
        "metrics.lpips_weights); README 'Perceptual similarity weights' says how to build it",
    )
    parser.add_argument(
        "--resize-filter",
        choices=tuple(RESIZE_FILTERS),
        default="box",
        help="filter that resizes the target (default box, as prepare)",
    )
    add_device_argument(parser)


def main(args: argparse.Namespace) -> int:
    settings = ProjectionSettings(steps=args.steps, w_plus=args.w_plus)
    settings.validate()
    target_bytes = storage.read_bytes(args.target)
    device = resolve_device(args.device)
    G, cfg, _meta = load_generator_or_explain(args.checkpoint, device)
    check_class(G.c_dim, args.class_idx)
    target_CHW = load_target(
        target_bytes, args.target, G.img_resolution, G.img_channels, args.resize_filter
    )
    lpips = load_lpips(args.lpips_weights or cfg.metrics.lpips_weights, device)

    result = project(
        G,
        target_CHW,
        lpips,
        settings=settings,
        class_idx=args.class_idx,
        seed=args.seed,
        device=device,
    )
    target_HWC = target_CHW.transpose(1, 2, 0)
    (proj_HWC,) = next(render(G, result.ws, device, desc="render"))
    distance = uint8_distance(lpips, target_HWC, proj_HWC, device)
    write_png(storage.join(args.outdir, "target.png"), target_HWC)
    write_png(storage.join(args.outdir, "proj.png"), proj_HWC)
    side_by_side = np.concatenate([target_HWC, proj_HWC], axis=1)
    write_png(storage.join(args.outdir, "target_proj.png"), side_by_side)
    storage.write_bytes(storage.join(args.outdir, "projected_w.npz"), ws_npz_bytes(result.ws))
    if args.video:
        write_video(storage.join(args.outdir, "proj.mp4"), G, result.ws_steps, target_HWC, device)
    print(
        f"projected {args.target} in {settings.steps} steps: LPIPS distance {distance:.4f} "
        f"(with the checkpoint's noise; {result.distances[-1]:.4f} at the last step); "
        f"wrote {args.outdir}"
    )
    return 0


def render(G: Generator, ws: torch.Tensor, device: torch.device, desc: str) -> Iterator[np.ndarray]:
    """uint8 [n, H, W, C] batches of ws, with the checkpoint's constant noise."""
    return synthesize_batches(
        G,
        ws,
        noise_mode="const",
        noise_seeds=[0] * len(ws),
        batch=RENDER_BATCH,
        device=device,
        desc=desc,
        progress=desc == "video",
    )


def uint8_distance(
    lpips: LPIPS, img_a_HWC: np.ndarray, img_b_HWC: np.ndarray, device: torch.device
) -> float:
    """LPIPS distance of two uint8 images, as they are saved."""
    img_NCHW = torch.from_numpy(np.stack([img_a_HWC, img_b_HWC]).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        features = lpips(img_NCHW.to(device))
    return float(lpips_distance(features[:1], features[1:]))


def write_video(
    url: str, G: Generator, ws_steps: torch.Tensor, target_HWC: np.ndarray, device: torch.device
) -> None:
    """An mp4 of the target beside the projection after each step."""
    frames = (
        np.concatenate([np.broadcast_to(target_HWC, batch.shape), batch], axis=2)
        for batch in render(G, ws_steps, device, desc="video")
    )
    H, W, C = target_HWC.shape
    storage.write_bytes(url, encode_mp4(frames, (H, 2 * W, C), VIDEO_FPS))
