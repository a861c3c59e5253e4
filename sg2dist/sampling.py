"""Generator -> images: the one path used by training snapshots, the commands, the MLflow
model and the metrics.

z from seeds, class labels, mapping with truncation, batched synthesis, uint8 images,
grids, PNG/GIF/mp4 bytes, and the latent paths of style mixing and interpolation.
Outputs go through `sg2dist.storage`, so they may be local or s3://. Nothing here
knows about checkpoints, configs or training.

Reproducibility: z for seed s is `np.random.RandomState(s).randn(z_dim)` (as the
official code), and the model's constant noise is the default, so a seed gives the
same image on every machine. Under noise_mode random the noise is drawn from torch
seeded with the image's seed, one image at a time, so an image never depends on its
batch-mates.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sg2dist import storage

if TYPE_CHECKING:
    from sg2dist.model import Generator

GRID_BATCH = 16  # images per forward pass of the training snapshot grid


# ---------------------------------------------------------------------------- latents, labels


def z_from_seeds(seeds: Sequence[int], z_dim: int) -> torch.Tensor:
    """z [N, z_dim] float32; seed s gives the same z on every machine (as the official code)."""
    z_NZ = np.stack([np.random.RandomState(seed).randn(z_dim) for seed in seeds])
    return torch.from_numpy(z_NZ).to(torch.float32)


def one_hot(class_idx_N: torch.Tensor, c_dim: int) -> torch.Tensor:
    """c [N, c_dim] float32 with a 1 at each row's class; [N, 0] for an unconditional model."""
    c_NC = torch.zeros(len(class_idx_N), c_dim, device=class_idx_N.device)
    if c_dim > 0:
        c_NC[torch.arange(len(c_NC), device=c_NC.device), class_idx_N] = 1
    return c_NC


def class_labels(c_dim: int, class_idx: int | Sequence[int] | None, num: int) -> torch.Tensor:
    """c [num, c_dim]: one class for all rows (int), one per row (sequence), or none."""
    if c_dim == 0 or class_idx is None:
        return torch.zeros([num, c_dim])
    if isinstance(class_idx, int):
        class_idx = [class_idx] * num
    return one_hot(torch.as_tensor(list(class_idx), dtype=torch.int64), c_dim)


@torch.no_grad()
def map_z(
    G: Generator,
    z: torch.Tensor,
    c: torch.Tensor,
    *,
    truncation_psi: float,
    batch: int,
    device: torch.device,
    truncation_cutoff: int | None = None,
) -> torch.Tensor:
    """ws [N, num_ws, w_dim] (on the CPU) for z [N, z_dim] and c [N, c_dim]; truncation
    pulls the first `truncation_cutoff` ws (all when None) towards the average w."""
    ws_chunks = [
        G.mapping(
            z[i : i + batch].to(device),
            c[i : i + batch].to(device),
            truncation_psi=truncation_psi,
            truncation_cutoff=truncation_cutoff,
        ).cpu()
        for i in range(0, len(z), batch)
    ]
    return torch.cat(ws_chunks)


@torch.no_grad()
def truncate_ws(
    G: Generator, ws: torch.Tensor, *, truncation_psi: float, truncation_cutoff: int | None = None
) -> torch.Tensor:
    """Given ws (e.g. a projection) truncated like `map_z` truncates mapped ones."""
    if truncation_psi == 1:
        return ws
    return G.mapping.truncate(
        ws.to(G.mapping.w_avg.device), truncation_psi, truncation_cutoff
    ).cpu()


# ---------------------------------------------------------------------------- ws files

WS_NPZ_KEY = "w"  # the official projector's projected_w.npz holds ws under this name


def ws_npz_bytes(ws: torch.Tensor) -> bytes:
    """ws [N, num_ws, w_dim] as an .npz file (float32 array `w`), as the official projector
    writes it, so its files and ours load in both."""
    buffer = io.BytesIO()
    np.savez(buffer, w=ws.detach().cpu().to(torch.float32).numpy())  # key WS_NPZ_KEY
    return buffer.getvalue()


def ws_from_npz(data: bytes) -> torch.Tensor:
    """ws [N, ...] float32 from .npz bytes (no pickles); ValueError if there is no array `w`."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if WS_NPZ_KEY not in npz.files:
            raise ValueError(f"no array '{WS_NPZ_KEY}' (it holds {', '.join(npz.files) or 'none'})")
        return torch.from_numpy(npz[WS_NPZ_KEY].astype(np.float32))


# ---------------------------------------------------------------------------- synthesis


@torch.no_grad()
def synthesize_batches(
    G: Generator,
    ws: torch.Tensor,
    *,
    noise_mode: str,
    noise_seeds: Sequence[int],
    batch: int,
    device: torch.device,
    desc: str,
    progress: bool = True,
) -> Iterator[np.ndarray]:
    """Yield uint8 [n, H, W, C] image batches for ws [N, num_ws, w_dim], in order.

    `noise_seeds[i]` seeds the noise of image i under noise_mode random; those images
    are made one at a time so that each one's noise comes from its seed alone.
    """
    step = 1 if noise_mode == "random" else batch
    with tqdm(total=len(ws), unit="img", desc=desc, disable=not progress) as bar:
        for i in range(0, len(ws), step):
            if noise_mode == "random":
                torch.manual_seed(noise_seeds[i])
            img_NCHW = G.synthesis(ws[i : i + step].to(device), noise_mode=noise_mode)
            yield to_uint8(img_NCHW)
            bar.update(len(img_NCHW))


def synthesize(G: Generator, ws: torch.Tensor, **kwargs) -> np.ndarray:
    """All images of `synthesize_batches` as one uint8 [N, H, W, C] array."""
    return np.concatenate(list(synthesize_batches(G, ws, **kwargs)))


def snapshot_grid(G: Generator, cols: int, rows: int, device: torch.device) -> np.ndarray:
    """The training snapshot grid (HWC uint8): seeds 0..cols*rows-1, class i % c_dim for
    image i, no truncation, constant noise, so grids of one run compare image by image."""
    seeds = list(range(cols * rows))
    c = class_labels(G.c_dim, [i % max(G.c_dim, 1) for i in seeds], len(seeds))
    ws = map_z(
        G, z_from_seeds(seeds, G.z_dim), c, truncation_psi=1.0, batch=GRID_BATCH, device=device
    )
    img_NHWC = synthesize(
        G,
        ws,
        noise_mode="const",
        noise_seeds=seeds,
        batch=GRID_BATCH,
        device=device,
        desc="grid",
        progress=False,
    )
    return tile_grid(img_NHWC, cols, rows)


# ---------------------------------------------------------------------------- latent paths


def mixed_ws(
    ws_by_seed: dict[int, torch.Tensor],
    row_seeds: Sequence[int],
    col_seeds: Sequence[int],
    styles: Sequence[int],
) -> torch.Tensor:
    """ws [rows x cols, num_ws, w_dim], row-major: column ws with the row's `styles` layers."""
    cells = []
    for row_seed in row_seeds:
        for col_seed in col_seeds:
            ws = ws_by_seed[col_seed].clone()
            ws[list(styles)] = ws_by_seed[row_seed][list(styles)]
            cells.append(ws)
    return torch.stack(cells)


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


def walk(
    keys: torch.Tensor,
    frames: int,
    interpolate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Keyframes [K, ...] -> the closed loop [K * frames + 1, ...], ending on keys[0]."""
    t = segment_weights(frames)
    segments = [interpolate(keys[k], keys[(k + 1) % len(keys)], t) for k in range(len(keys))]
    return torch.cat(segments + [keys[:1]])


# ---------------------------------------------------------------------------- pixels and files


def to_uint8_nchw(img_NCHW: torch.Tensor) -> torch.Tensor:
    """Generator output (about [-1, 1]) -> uint8 [N, C, H, W] on its device."""
    return (img_NCHW.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_uint8(img_NCHW: torch.Tensor) -> np.ndarray:
    """Generator output (about [-1, 1]) -> uint8 [N, H, W, C] on the CPU."""
    return to_uint8_nchw(img_NCHW).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(img_HWC: np.ndarray) -> Image.Image:
    """uint8 [H, W, 1|3] -> a grayscale ("L") or RGB PIL image."""
    if img_HWC.shape[2] == 1:
        return Image.fromarray(img_HWC[:, :, 0], mode="L")
    return Image.fromarray(img_HWC, mode="RGB")


def tile_grid(img_NHWC: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """N = cols x rows images, row-major -> one uint8 [rows*H, cols*W, C] image."""
    N, H, W, C = img_NHWC.shape
    if cols * rows != N:
        raise ValueError(f"{N} images do not fill a {cols}x{rows} grid")
    grid = img_NHWC.reshape(rows, cols, H, W, C).transpose(0, 2, 1, 3, 4)
    return grid.reshape(rows * H, cols * W, C)


def png_bytes(img_HWC: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    to_pil(img_HWC).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(url: str, img_HWC: np.ndarray) -> None:
    """One PNG, local or s3://; storage writes it whole (readers never see half a file)."""
    storage.write_bytes(url, png_bytes(img_HWC))


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
    """H.264 mp4 (yuv420p, plays everywhere) from uint8 frame batches, streamed to the ffmpeg
    binary that the imageio-ffmpeg package ships (raw frames on its stdin)."""
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
            assert ffmpeg.stdin is not None and ffmpeg.stderr is not None
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
