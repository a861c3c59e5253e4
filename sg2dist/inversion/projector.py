"""Projection of a target image into the generator's latent space (W, or W+ per layer).

The official StyleGAN2 projector's method: start from the mean w of many mapped random
z, optimise w (and the per-layer noise inputs) with Adam to minimise the LPIPS distance
between G's image and the target plus a noise regulariser. The learning rate ramps up
over the first 5% of the steps and down (cosine) over the last 25%; w gets Gaussian noise
whose scale (relative to the spread of w) decays to zero over the first 75% of the steps,
so the search starts broad; after every step each noise map is renormalised to zero mean
and unit variance. The regulariser penalises the autocorrelation of each noise map with
its one-pixel shifts, at every scale of an average-pooling pyramid down to 8x8, so the
noise cannot learn to paint the image.

The noise maps optimised here belong to a private copy of G; the projected ws are meant
for the checkpoint's own constant noise (what `generate --ws` uses), and the distance
reported for the result is measured that way.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from sg2dist.data.imageops import (
    RESIZE_FILTERS,
    ConvertSettings,
    SkippedImageError,
    convert_image,
)
from sg2dist.errors import UserError
from sg2dist.inversion.lpips import LPIPS, lpips_distance
from sg2dist.sampling import class_labels

if TYPE_CHECKING:
    from sg2dist.model import Generator

W_STATS_BATCH = 1000  # mapped z per forward pass when estimating the mean w


@dataclass(frozen=True)
class ProjectionSettings:
    """The optimisation's knobs; the defaults are the official projector's."""

    steps: int = 1000
    w_plus: bool = False  # one w per layer (W+) instead of one w for all layers
    w_avg_samples: int = 10_000  # random z mapped to find the starting w and its spread
    initial_lr: float = 0.1
    initial_noise_factor: float = 0.05  # w noise at step 0, relative to the spread of w
    lr_rampup: float = 0.05  # fraction of the steps
    lr_rampdown: float = 0.25
    noise_ramp: float = 0.75  # fraction of the steps over which the w noise decays
    noise_reg_weight: float = 1e5

    def validate(self) -> None:
        if self.steps < 1:
            raise UserError(f"--steps {self.steps} must be >= 1 (1000 is the usual)")
        if self.w_avg_samples < 2:
            raise UserError(f"w_avg_samples={self.w_avg_samples} must be >= 2")


@dataclass
class Projection:
    ws_steps: torch.Tensor  # [steps, num_ws, w_dim] on the CPU: the ws after each step
    distances: list[float]  # LPIPS distance to the target at each step (before its update)

    @property
    def ws(self) -> torch.Tensor:
        """The projected ws [1, num_ws, w_dim]."""
        return self.ws_steps[-1:]


# ---------------------------------------------------------------------------- the target


def load_target(data: bytes, name: str, resolution: int, channels: int, resize_filter: str):
    """Image file bytes -> uint8 [channels, R, R]: upright, converted to L or RGB, centre-
    cropped to a square and resized with `resize_filter`, by prepare's own code."""
    if resize_filter not in RESIZE_FILTERS:
        raise UserError(
            f"--resize-filter {resize_filter}: use one of {', '.join(RESIZE_FILTERS)} "
            "(box, the default, is what prepare uses by default)"
        )
    settings = ConvertSettings(resolution, channels, "center", resize_filter, "png")
    try:
        png = convert_image(data, settings, name)
    except SkippedImageError as exc:
        raise UserError(f"target {name} cannot be used: {exc}; pass a PNG, JPEG or WebP") from None
    pixels = np.asarray(Image.open(io.BytesIO(png)))
    return np.array(pixels[np.newaxis] if channels == 1 else pixels.transpose(2, 0, 1))


# ---------------------------------------------------------------------------- pieces


@torch.no_grad()
def w_statistics(
    G: Generator, c_1C: torch.Tensor, samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    """(mean w [1, w_dim], spread: the root mean squared distance of w from that mean) of
    `samples` random z mapped with the class c."""
    device = c_1C.device
    ws = []
    for first in range(0, samples, W_STATS_BATCH):
        n = min(W_STATS_BATCH, samples - first)
        z = torch.randn([n, G.z_dim], generator=generator).to(device)
        ws.append(G.mapping(z, c_1C.expand(n, -1))[:, 0].to(torch.float32))
    w_NW = torch.cat(ws)
    w_avg = w_NW.mean(dim=0, keepdim=True)
    w_std = float((w_NW - w_avg).square().sum(dim=1).mean().sqrt())
    return w_avg, w_std


def noise_regularization(noise_maps: list[torch.Tensor]) -> torch.Tensor:
    """Sum over noise maps and pyramid scales (down to 8x8) of the squared mean products of
    the map with itself shifted by one pixel, along each axis."""
    total = torch.zeros([], device=noise_maps[0].device)
    for noise_HW in noise_maps:
        x = noise_HW[None, None]
        while True:
            total = total + (x * torch.roll(x, shifts=1, dims=3)).mean().square()
            total = total + (x * torch.roll(x, shifts=1, dims=2)).mean().square()
            if x.shape[2] <= 8:
                break
            x = F.avg_pool2d(x, kernel_size=2)
    return total


def learning_rate(settings: ProjectionSettings, step: int) -> float:
    t = step / settings.steps
    ramp = min(1.0, (1.0 - t) / settings.lr_rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp *= min(1.0, t / settings.lr_rampup)
    return settings.initial_lr * ramp


def w_noise_scale(settings: ProjectionSettings, step: int, w_std: float) -> float:
    t = step / settings.steps
    return w_std * settings.initial_noise_factor * max(0.0, 1.0 - t / settings.noise_ramp) ** 2


def to_lpips_range(img_NCHW: torch.Tensor) -> torch.Tensor:
    """Generator output (about [-1, 1]) -> LPIPS's [0, 255] range, unclamped (gradients)."""
    return (img_NCHW + 1) * 127.5


# ---------------------------------------------------------------------------- projection


def project(
    G: Generator,
    target_CHW: np.ndarray,
    lpips: LPIPS,
    *,
    settings: ProjectionSettings,
    class_idx: int | None,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> Projection:
    """Project `target_CHW` (uint8, G's channels and resolution) into W (or W+)."""
    settings.validate()
    expected = (G.img_channels, G.img_resolution, G.img_resolution)
    if tuple(target_CHW.shape) != expected:
        raise ValueError(f"target has shape {target_CHW.shape}; expected {expected}")
    G = copy.deepcopy(G).eval().requires_grad_(False).to(device)
    generator = torch.Generator().manual_seed(seed)
    c_1C = class_labels(G.c_dim, class_idx, 1).to(device)
    w_avg, w_std = w_statistics(G, c_1C, settings.w_avg_samples, generator)

    noise_maps = [b for n, b in G.synthesis.named_buffers() if n.endswith("noise_const")]
    for noise_HW in noise_maps:
        noise_HW.copy_(torch.randn(noise_HW.shape, generator=generator))
        noise_HW.requires_grad_(True)
    layers = G.num_ws if settings.w_plus else 1
    w_opt = w_avg.detach().unsqueeze(1).repeat(1, layers, 1).requires_grad_(True)
    optimizer = torch.optim.Adam([w_opt, *noise_maps], betas=(0.9, 0.999), lr=settings.initial_lr)
    with torch.no_grad():
        target_features = lpips(torch.from_numpy(target_CHW).unsqueeze(0).to(device))

    ws_steps, distances = [], []
    with tqdm(total=settings.steps, desc="project", unit="step", disable=not progress) as bar:
        for distance in _steps(
            G, lpips, target_features, w_opt, noise_maps, optimizer, settings, w_std, generator
        ):
            ws_steps.append(w_opt.detach().expand(1, G.num_ws, -1).to("cpu", copy=True))
            distances.append(distance)
            bar.set_postfix(dist=f"{distance:.4f}", refresh=False)
            bar.update()
    return Projection(torch.cat(ws_steps), distances)


def _steps(
    G: Generator,
    lpips: LPIPS,
    target_features: torch.Tensor,
    w_opt: torch.Tensor,
    noise_maps: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    settings: ProjectionSettings,
    w_std: float,
    generator: torch.Generator,
) -> Iterator[float]:
    """Run the optimisation; yield the LPIPS distance of each step once w_opt is updated."""
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        w_noise = torch.randn(w_opt.shape, generator=generator).to(w_opt.device)
        w = w_opt + w_noise * w_noise_scale(settings, step, w_std)
        img = G.synthesis(w.expand(1, G.num_ws, -1), noise_mode="const")
        distance = lpips_distance(lpips(to_lpips_range(img)), target_features).sum()
        loss = distance + settings.noise_reg_weight * noise_regularization(noise_maps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # back to zero mean and unit variance
            for noise_HW in noise_maps:
                noise_HW -= noise_HW.mean()
                noise_HW *= noise_HW.square().mean().rsqrt()
        yield distance.item()
