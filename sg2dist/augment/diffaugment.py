"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
Training"): the same random colour, translation and cutout for reals and fakes, every time
D sees an image, with no probability to tune.

    aug_NCHW = diff_augment(img_NCHW, generator)

- colour: brightness + U(-0.5, 0.5), saturation x U(0, 2) (about the per-pixel channel
  mean), contrast x U(0.5, 1.5) (about the image mean);
- translation: a whole-pixel shift of up to 1/8 of the size in x and y, zeros shifted in;
- cutout: a zeroed square of half the size, centred anywhere in the image (it may stick out).

All three are differentiable (translation is a gather, whose backward and double backward
are ordinary ops), so G's gradient and R1's penalty flow through them.
"""

from __future__ import annotations

import torch

TRANSLATION_RATIO = 1 / 8
CUTOUT_RATIO = 1 / 2


def diff_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    N, C, H, W = images.shape

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand((N, *shape), generator=generator, device=images.device).to(images.dtype)

    def integers(low: int, high: int, *shape: int) -> torch.Tensor:  # [low, high)
        return torch.randint(low, high, (N, *shape), generator=generator, device=images.device)

    x = images + (uniform(1, 1, 1) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (uniform(1, 1, 1) * 2) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    x = (x - mean) * (uniform(1, 1, 1) + 0.5) + mean

    max_shift_y, max_shift_x = int(H * TRANSLATION_RATIO + 0.5), int(W * TRANSLATION_RATIO + 0.5)
    shift = torch.cat(
        [integers(-max_shift_y, max_shift_y + 1, 1), integers(-max_shift_x, max_shift_x + 1, 1)],
        dim=1,
    )
    x = translate(x, shift)

    cut_h, cut_w = int(H * CUTOUT_RATIO + 0.5), int(W * CUTOUT_RATIO + 0.5)
    # Centres as in the reference code: a square of even side can reach one pixel further.
    centre = torch.cat(
        [integers(0, H + (1 - cut_h % 2), 1), integers(0, W + (1 - cut_w % 2), 1)], 1
    )
    return x * _cutout_mask(centre, (cut_h, cut_w), (H, W)).to(x.dtype)


def translate(images: torch.Tensor, shift_yx: torch.Tensor) -> torch.Tensor:
    """out[y, x] = images[y + dy, x + dx] (zero outside) per image; shift_yx [N, 2] ints."""
    N, C, H, W = images.shape
    rows = torch.arange(H, device=images.device)[None] + shift_yx[:, :1]  # [N, H]
    cols = torch.arange(W, device=images.device)[None] + shift_yx[:, 1:]  # [N, W]
    inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]
    out = images.gather(2, rows.clamp(0, H - 1)[:, None, :, None].expand(N, C, H, W))
    out = out.gather(3, cols.clamp(0, W - 1)[:, None, None, :].expand(N, C, H, W))
    return out * inside[:, None].to(images.dtype)


def _cutout_mask(centre_yx: torch.Tensor, size: tuple[int, int], shape: tuple[int, int]):
    """[N, 1, H, W] bool: False inside the square of `size` starting size // 2 before the
    centre (both in pixels)."""
    H, W = shape
    ys = torch.arange(H, device=centre_yx.device)[None] - (centre_yx[:, :1] - size[0] // 2)
    xs = torch.arange(W, device=centre_yx.device)[None] - (centre_yx[:, 1:] - size[1] // 2)
    inside = ((ys >= 0) & (ys < size[0]))[:, :, None] & ((xs >= 0) & (xs < size[1]))[:, None, :]
    return ~inside[:, None]
