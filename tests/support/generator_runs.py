"""Tiny generator checkpoints and helpers for the tests of the generator commands.

Random weights make noise-like images, but deterministic ones, which is all these
tests need: they compare pixels between commands, runs and storage back ends. The
noise strengths are set non-zero so that the noise modes matter. Commands run
in-process through `sg2dist.cli.main`; pytest's temporary paths hold no spaces, so a
command line is written as one string.
"""

import io
import os
import subprocess

import numpy as np
import torch
from PIL import Image, ImageSequence
from support.tiny import tiny_model_sets

from sg2dist.cli import main as cli
from sg2dist.config import load_config
from sg2dist.model import build_networks
from sg2dist.train.checkpoint import save_checkpoint

RES = 32
NUM_WS = 8  # at 32 px: 1 conv at 4 px, 2 per doubling, plus the last toRGB
TINY_MODEL = tiny_model_sets(resolution=RES, channel_base=512)


def make_run(run_url: str, *overrides: str, seed: int = 0) -> str:
    """Save a checkpoint of freshly initialised networks into `run_url` (local or s3://)."""
    torch.manual_seed(seed)
    cfg = load_config(None, TINY_MODEL + list(overrides))
    G, _D = build_networks(cfg.model)
    with torch.no_grad():
        for name, param in G.named_parameters():
            if name.endswith("noise_strength"):
                param.fill_(0.5)
    save_checkpoint(run_url, 0, {"G_ema": G.state_dict()}, {"config": cfg.to_dict()})
    return run_url


def sg2dist(command: str) -> None:
    """Run one command in-process; on the CPU unless it names a device, since pixels are
    bit-exact across batch sizes there (a GPU may move them by a level)."""
    argv = command.split()
    if "--device" not in argv:
        argv += ["--device", "cpu"]
    assert cli(argv) == 0, command


def pixels(png) -> np.ndarray:
    """uint8 [H, W] (grayscale) or [H, W, 3] from a PNG path or bytes."""
    return np.array(Image.open(io.BytesIO(png) if isinstance(png, bytes) else png))


def generated(run_url: str, seeds: str, outdir, options: str = "") -> dict[int, np.ndarray]:
    """seed -> pixels of `sg2dist generate` for those seeds."""
    sg2dist(f"generate --checkpoint {run_url} --seeds {seeds} --outdir {outdir} {options}")
    return {int(name[4:-4]): pixels(os.path.join(outdir, name)) for name in os.listdir(outdir)}


def cell(figure: np.ndarray, row: int, col: int) -> np.ndarray:
    return figure[row * RES : (row + 1) * RES, col * RES : (col + 1) * RES]


def gif_frames(path) -> list[np.ndarray]:
    return [np.array(frame.convert("L")) for frame in ImageSequence.Iterator(Image.open(path))]


def mp4_frames(data: bytes) -> np.ndarray:
    """Decode with the bundled ffmpeg -> uint8 [T, H, W, 3]."""
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", "-"]
    command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    decoded = subprocess.run(command, input=data, capture_output=True, check=True).stdout
    return np.frombuffer(decoded, np.uint8).reshape(-1, RES, RES, 3)


def luma(img_HW3: np.ndarray) -> np.ndarray:
    return img_HW3.astype(float) @ np.array([0.299, 0.587, 0.114])
