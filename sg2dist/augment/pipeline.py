"""The ADA augmentation pipeline (Karras et al. 2020, "Training Generative Adversarial
Networks with Limited Data"): 15 transforms, each applied to an image with probability
`multiplier x p`, with the paper's strengths.

    pipe = AdaPipeline.from_pipe("bgc")
    aug_NCHW = pipe(img_NCHW, p=0.3, generator=torch.Generator().manual_seed(1))

Stages, in order (each skipped when no image of the batch draws it):
- geometric (blit: x-flip, 90-degree rotations, integer translation; geom: isotropic
  scaling, arbitrary rotation, anisotropic scaling, fractional translation): the
  transforms are composed into one matrix per image and applied in ONE resampling
  (geometry.warp), so images are filtered once however many transforms they drew;
- colour (brightness, contrast, luma flip, hue rotation, saturation): one 4x4 colour
  matrix per image; grayscale images use the average of the RGB rows;
- image-space filtering: random gains for 4 frequency bands;
- corruptions: additive Gaussian noise, cutout.

Every random number comes from `generator`, so a step is reproducible from its seed. All
stages are linear in the pixels given the drawn parameters, and twice differentiable:
G's gradient and R1's gradient penalty flow through the augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sg2dist.augment import geometry as geo

GROUPS: dict[str, tuple[str, ...]] = {
    "blit": ("xflip", "rotate90", "xint"),
    "geom": ("scale", "rotate", "aniso", "xfrac"),
    "color": ("brightness", "contrast", "lumaflip", "hue", "saturation"),
    "filter": ("imgfilter",),
    "noise": ("noise",),
    "cutout": ("cutout",),
}
TRANSFORMS = tuple(name for group in GROUPS.values() for name in group)
_BGC = ("blit", "geom", "color")
# augment.pipe -> groups, as named by the official code (config.AUGMENT_PIPES lists them).
PIPES: dict[str, tuple[str, ...]] = {
    **{group: (group,) for group in GROUPS},
    "bg": ("blit", "geom"),
    "bgc": _BGC,
    "bgcf": (*_BGC, "filter"),
    "bgcfn": (*_BGC, "filter", "noise"),
    "bgcfnc": (*_BGC, "filter", "noise", "cutout"),
}

# The luma axis of RGB space: hue rotates about it, saturation scales away from it.
LUMA_AXIS = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64) / math.sqrt(3)
# Expected power of natural images in the 4 filter bands (a 1/f spectrum), lowest first.
BAND_POWER = (10 / 13, 1 / 13, 1 / 13, 1 / 13)


@dataclass(frozen=True)
class Strengths:
    """How strong each transform is when it fires (the paper's values)."""

    xint_max: float = 0.125  # integer translation: uniform, up to this fraction of the size
    scale_std: float = 0.2  # isotropic scaling: log2 std
    rotate_max: float = 1.0  # arbitrary rotation: uniform, up to this fraction of a full turn
    aniso_std: float = 0.2  # anisotropic scaling: log2 std
    xfrac_std: float = 0.125  # fractional translation: std, as a fraction of the size
    brightness_std: float = 0.2  # additive, in the [-1, 1] pixel range
    contrast_std: float = 0.5  # log2 std
    hue_max: float = 1.0  # uniform, up to this fraction of a full turn
    saturation_std: float = 1.0  # log2 std
    imgfilter_std: float = 1.0  # log2 std of each band's gain
    noise_std: float = 0.1  # the per-image noise sigma is |N(0, 1)| x this
    cutout_size: float = 0.5  # side of the cut-out square, as a fraction of the size


def filter_bank(num_bands: int = 4) -> np.ndarray:
    """[num_bands, taps] 1D filters that split a signal into octave bands (lowest first) and
    sum to a unit impulse. Built from the 4-tap Daubechies (db2 = sym2) wavelet: each level
    halves the band below with the half-band pair (lo2, hi2), lo2 + hi2 = impulse."""
    root3 = math.sqrt(3)
    lo = np.array([1 - root3, 3 - root3, 3 + root3, 1 + root3]) / (4 * math.sqrt(2))
    hi = lo * (-1) ** np.arange(len(lo))
    lo2, hi2 = np.convolve(lo, lo[::-1]) / 2, np.convolve(hi, hi[::-1]) / 2
    bank = np.zeros([num_bands, 1])
    bank[0, 0] = 1.0
    for band in range(1, num_bands):
        spread = np.zeros([num_bands, 2 * bank.shape[1] - 1])  # one octave lower: zero insertion
        spread[:, ::2] = bank
        bank = np.stack([np.convolve(row, lo2) for row in spread])
        centre = (bank.shape[1] - len(hi2)) // 2
        bank[band, centre : centre + len(hi2)] += hi2
    return bank


FILTER_TAPS = filter_bank().shape[1]


class _Draws:
    """Random numbers for one batch, all from one generator (reproducible from its seed)."""

    def __init__(self, generator: torch.Generator, n: int, device, dtype: torch.dtype):
        self.g, self.n, self.device, self.dtype = generator, n, device, dtype

    def uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand((self.n, *shape), generator=self.g, device=self.device, dtype=self.dtype)

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.randn((self.n, *shape), generator=self.g, device=self.device, dtype=self.dtype)

    def fires(self, probability: float, *shape: int) -> torch.Tensor:
        """Which images apply a transform: True with `probability`."""
        return self.uniform(*shape) < probability


class AdaPipeline:
    """The transforms named in `transforms` (probability multiplier 1 each, the others 0)."""

    def __init__(self, transforms: Iterable[str], strengths: Strengths | None = None):
        self.enabled = frozenset(transforms)
        unknown = self.enabled - set(TRANSFORMS)
        if unknown:
            raise ValueError(f"unknown transforms {sorted(unknown)}; known: {TRANSFORMS}")
        self.s = strengths or Strengths()

    @classmethod
    def from_pipe(cls, pipe: str) -> AdaPipeline:
        return cls(name for group in PIPES[pipe] for name in GROUPS[group])

    def __call__(self, images: torch.Tensor, p: float, generator: torch.Generator):
        """images [N, C, H, W] (C = 1 or 3, about [-1, 1]) as D sees them at strength p."""
        if p == 0:
            return images  # bit for bit: no resampling, no colour matrix, no draws
        N, C, H, W = images.shape
        draw = _Draws(generator, N, images.device, images.dtype)
        # Sync points: which images drew a geometric transform, whether any drew a colour one.
        G_inv = self._geometry(draw, p, H, W)
        moved = (G_inv != torch.eye(3, dtype=G_inv.dtype, device=G_inv.device)).flatten(1).any(1)
        if moved.any():
            # Only those images are resampled; the others stay bit for bit (cheaper at low p).
            rows = moved.nonzero().flatten()
            images = images.index_copy(0, rows, geo.warp(images[rows], G_inv[rows]))
        colour = self._colour(draw, p, C)
        if not _all_identity(colour):
            images = apply_colour(images, colour)
        if "imgfilter" in self.enabled:
            images = self._filter(draw, p, images)
        if "noise" in self.enabled:
            images = self._noise(draw, p, images)
        if "cutout" in self.enabled:
            images = self._cutout(draw, p, images)
        return images

    # ------------------------------------------------------------------ parameters

    def _geometry(self, draw: _Draws, p: float, H: int, W: int) -> torch.Tensor:
        """G_inv [N, 3, 3]: output pixel -> input point, composed from the drawn transforms
        (each factor is the inverse of the transform it names)."""
        on, s = self.enabled, self.s
        ones = torch.ones(draw.n, device=draw.device, dtype=draw.dtype)
        G_inv = geo.scale2d(ones, ones)
        if "xflip" in on:
            flip = torch.where(draw.fires(p), torch.floor(draw.uniform() * 2), 0)
            G_inv = G_inv @ geo.scale2d(1 - 2 * flip, ones)
        if "rotate90" in on:
            quarters = torch.where(draw.fires(p), torch.floor(draw.uniform() * 4), 0)
            G_inv = G_inv @ geo.rotate2d(-math.pi / 2 * quarters)
        if "xint" in on:
            shift = torch.where(draw.fires(p, 1), (draw.uniform(2) * 2 - 1) * s.xint_max, 0)
            G_inv = G_inv @ geo.translate2d(
                -torch.round(shift[:, 0] * W), -torch.round(shift[:, 1] * H)
            )
        if "scale" in on:
            k = torch.where(draw.fires(p), torch.exp2(draw.normal() * s.scale_std), 1)
            G_inv = G_inv @ geo.scale2d(1 / k, 1 / k)
        # Rotation runs before and after the anisotropic scaling, each with p_rot, so that
        # the probability of any rotation is p: 1 - (1 - p_rot)^2 = p.
        p_rot = 1 - math.sqrt(min(max(1 - p, 0.0), 1.0))
        if "rotate" in on:
            theta = (draw.uniform() * 2 - 1) * math.pi * s.rotate_max
            G_inv = G_inv @ geo.rotate2d(-torch.where(draw.fires(p_rot), theta, 0))
        if "aniso" in on:
            k = torch.where(draw.fires(p), torch.exp2(draw.normal() * s.aniso_std), 1)
            G_inv = G_inv @ geo.scale2d(1 / k, k)
        if "rotate" in on:
            theta = (draw.uniform() * 2 - 1) * math.pi * s.rotate_max
            G_inv = G_inv @ geo.rotate2d(-torch.where(draw.fires(p_rot), theta, 0))
        if "xfrac" in on:
            shift = torch.where(draw.fires(p, 1), draw.normal(2) * s.xfrac_std, 0)
            G_inv = G_inv @ geo.translate2d(-shift[:, 0] * W, -shift[:, 1] * H)
        return G_inv

    def _colour(self, draw: _Draws, p: float, channels: int) -> torch.Tensor:
        """C [N, 4, 4]: homogeneous RGB -> RGB, composed from the drawn transforms."""
        on, s = self.enabled, self.s
        identity = torch.eye(4, device=draw.device, dtype=draw.dtype).expand(draw.n, 4, 4)
        C = identity
        if "brightness" in on:
            C = geo.translate3d(torch.where(draw.fires(p), draw.normal() * s.brightness_std, 0)) @ C
        if "contrast" in on:
            k = torch.where(draw.fires(p), torch.exp2(draw.normal() * s.contrast_std), 1)
            C = geo.scale3d(k) @ C
        if "lumaflip" in on:
            flip = torch.floor(draw.uniform() * 2)
            mirror = _luma_matrices(1 - 2 * flip, torch.ones_like(flip))  # Householder
            C = torch.where(draw.fires(p)[:, None, None], mirror, identity) @ C
        if "hue" in on and channels > 1:
            theta = (draw.uniform() * 2 - 1) * math.pi * s.hue_max
            turn = geo.rotate3d(LUMA_AXIS, torch.where(draw.fires(p), theta, 0))
            C = turn @ C
        if "saturation" in on and channels > 1:
            k = torch.exp2(draw.normal() * s.saturation_std)
            scaled = _luma_matrices(torch.ones_like(k), k)
            C = torch.where(draw.fires(p)[:, None, None], scaled, identity) @ C
        return C

    # ------------------------------------------------------------------ pixel stages

    def _filter(self, draw: _Draws, p: float, images: torch.Tensor) -> torch.Tensor:
        """Amplify or attenuate each frequency band by a random gain; the gains are
        normalised so that the expected power of a natural image stays the same."""
        bank = torch.as_tensor(filter_bank(), device=draw.device, dtype=draw.dtype)
        power = torch.tensor(BAND_POWER, device=draw.device, dtype=draw.dtype)
        gains = torch.ones(draw.n, len(BAND_POWER), device=draw.device, dtype=draw.dtype)
        std = self.s.imgfilter_std
        for band in range(len(BAND_POWER)):
            t = torch.ones_like(gains)
            t[:, band] = torch.where(draw.fires(p), torch.exp2(draw.normal() * std), 1)
            gains = gains * t / (power * t.square()).sum(dim=1, keepdim=True).sqrt()
        return filter_separable(images, gains @ bank)

    def _noise(self, draw: _Draws, p: float, images: torch.Tensor) -> torch.Tensor:
        sigma = torch.where(draw.fires(p), draw.normal().abs() * self.s.noise_std, 0)
        N, C, H, W = images.shape
        return images + draw.normal(C, H, W) * sigma.reshape(N, 1, 1, 1)

    def _cutout(self, draw: _Draws, p: float, images: torch.Tensor) -> torch.Tensor:
        """Zero a square of side cutout_size x the image size at a random centre."""
        N, C, H, W = images.shape
        size = draw.fires(p, 1).to(draw.dtype) * self.s.cutout_size  # [N, 1]; 0 = no cutout
        centre = draw.uniform(2)
        xs = (torch.arange(W, device=draw.device, dtype=draw.dtype) + 0.5) / W
        ys = (torch.arange(H, device=draw.device, dtype=draw.dtype) + 0.5) / H
        outside_x = (xs[None] - centre[:, :1]).abs() >= size / 2  # [N, W]
        outside_y = (ys[None] - centre[:, 1:]).abs() >= size / 2  # [N, H]
        keep = outside_x[:, None, :] | outside_y[:, :, None]
        return images * keep[:, None].to(images.dtype)


def _all_identity(M: torch.Tensor) -> bool:
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    return torch.equal(M, eye.expand_as(M))


def _luma_matrices(along: torch.Tensor, across: torch.Tensor) -> torch.Tensor:
    """[N, 4, 4] colour matrices that scale RGB by `along` on the luma axis and by `across`
    orthogonal to it (along = -1: luma flip; across = k: saturation x k)."""
    v = LUMA_AXIS.to(device=along.device, dtype=along.dtype)
    on_axis = torch.outer(v, v)
    off_axis = torch.eye(3, device=along.device, dtype=along.dtype) - on_axis
    M = torch.eye(4, device=along.device, dtype=along.dtype).repeat(len(along), 1, 1)
    M[:, :3, :3] = along[:, None, None] * on_axis + across[:, None, None] * off_axis
    return M


def apply_colour(images: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """images [N, 3 or 1, H, W] through colour matrices C [N, 4, 4]. A grayscale pixel x is
    the colour (x, x, x); its new value is the mean of the transformed R, G and B."""
    N, channels, H, W = images.shape
    flat = images.reshape(N, channels, H * W)
    if channels == 3:
        out = C[:, :3, :3] @ flat + C[:, :3, 3:]
    else:
        gain = C[:, :3, :3].sum(dim=2).mean(dim=1)
        offset = C[:, :3, 3].mean(dim=1)
        out = flat * gain[:, None, None] + offset[:, None, None]
    return out.reshape(N, channels, H, W)


def filter_separable(images: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Filter each image along x then y with its own symmetric 1D filter taps [N, T]
    (reflect padding), as unfold + contraction: no per-image convolution groups."""
    T = taps.shape[1]
    x = F.pad(images, [T // 2] * 4, mode="reflect")
    x = torch.einsum("nchwt,nt->nchw", x.unfold(3, T, 1), taps)
    return torch.einsum("nchwt,nt->nchw", x.unfold(2, T, 1), taps)
