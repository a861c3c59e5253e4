"""Small image helpers shared by generate, style-mix and interpolate.

Seed lists ("0-63", "1,2,5-7"), latent z from seeds, float images -> uint8, grid
tiling and PNG writing through `sg2dist.storage` (so an output may be local or s3://).
Nothing here knows about checkpoints or networks.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from sg2dist import storage
from sg2dist.errors import UserError

MAX_SEED = 2**32 - 1  # np.random.RandomState accepts seeds in [0, 2**32)


def parse_int_list(text: str, option: str) -> list[int]:
    """'1,2,5-7' -> [1, 2, 5, 6, 7]; ranges are inclusive, order and repeats are kept."""
    values: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            start = int(first)
            stop = int(last) if sep else start
        except ValueError:
            raise UserError(
                f"{option} '{text}' does not parse; write numbers and inclusive ranges "
                "such as 0-63 or 1,2,5-7"
            ) from None
        if stop < start:
            raise UserError(
                f"{option} '{text}': range {part.strip()} runs backwards; write {stop}-{start}"
            )
        values.extend(range(start, stop + 1))
    return values


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    seeds = parse_int_list(text, option)
    if max(seeds) > MAX_SEED:
        raise UserError(f"{option} '{text}': seeds must lie in 0..{MAX_SEED}")
    return seeds


def z_from_seeds(seeds: list[int], z_dim: int) -> torch.Tensor:
    """z [N, z_dim] float32; seed s gives the same z on every machine (as the official code)."""
    z_NZ = np.stack([np.random.RandomState(seed).randn(z_dim) for seed in seeds])
    return torch.from_numpy(z_NZ).to(torch.float32)


def to_uint8(img_NCHW: torch.Tensor) -> np.ndarray:
    """Generator output (about [-1, 1]) -> uint8 [N, H, W, C] on the CPU."""
    img_NCHW = (img_NCHW.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return img_NCHW.permute(0, 2, 3, 1).cpu().numpy()


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


def check_suffix(url: str, suffixes: tuple[str, ...], option: str) -> str:
    """The lower-case suffix of `url` if it is one of `suffixes`, else one clear error."""
    name = url.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix in suffixes:
        if name.endswith(suffix):
            return suffix
    raise UserError(f"{option} '{url}' must end in {' or '.join(suffixes)}")
