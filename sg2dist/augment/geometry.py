"""Geometric resampling for ADA: one warp per image, twice differentiable w.r.t. the pixels.

A batch of inverse homogeneous transforms `G_inv [N, 3, 3]` maps a pixel of the
output to the point of the input it is read from, both in centred pixel coordinates
(x right, y down, (0, 0) at the image centre). Resampling with an arbitrary transform
must neither blur the image nor let the image border leak into D's view, so the warp
works like the ADA paper's pipeline:

1. reflect-pad the input as far as any output pixel reaches (so no empty corners),
2. upsample 2x with a 12-tap orthogonal low-pass filter (Daubechies' least-asymmetric
   wavelet, "sym6"),
3. sample bilinearly at the transformed positions on a 2x grid,
4. low-pass and downsample 2x with the same filter.

Because the filter is orthogonal, steps 2 and 4 undo each other exactly: a transform that
moves pixels by whole pixels (an integer translation) reproduces the input up to rounding.
Mirrors and quarter turns come out close to, not exactly, the flipped pixels, since sym6
is not symmetric (the ADA paper's pipeline behaves the same).

Every step is linear in the pixels. R1 takes its gradient penalty through the warp, which
needs its second derivative; each step here has a backward that is itself differentiable:
padding and slicing natively, the filters and the bilinear sampling as pairs of custom
autograd Functions whose backward is the adjoint operation (torch's grid_sample has a
double backward only in recent releases; sg2dist supports torch >= 2.4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# sym6 low-pass filter (PyWavelets' reconstruction filter), sum sqrt(2); normalised to 1 below.
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)  # fmt: skip


# ---------------------------------------------------------------------------- matrices


def _matrices(rows: list[list[torch.Tensor | float]], like: torch.Tensor) -> torch.Tensor:
    """Per-sample matrices [N, R, C] from rows of constants and [N] tensors."""
    constants = [[0.0 if isinstance(x, torch.Tensor) else float(x) for x in row] for row in rows]
    M = torch.tensor(constants, dtype=like.dtype, device=like.device).repeat(len(like), 1, 1)
    for i, row in enumerate(rows):
        for j, x in enumerate(row):
            if isinstance(x, torch.Tensor):
                M[:, i, j] = x
    return M


def translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _matrices([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrices([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def rotate2d(theta: torch.Tensor) -> torch.Tensor:
    """Rotation by `theta` radians (clockwise on screen, since y points down)."""
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrices([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def translate3d(t: torch.Tensor) -> torch.Tensor:
    """Colour offset t added to R, G and B: [N, 4, 4]."""
    return _matrices([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], t)


def scale3d(s: torch.Tensor) -> torch.Tensor:
    return _matrices([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], s)


def rotate3d(axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotation by `theta` about the unit vector `axis` [3] (Rodrigues' formula), [N, 4, 4]."""
    x, y, z = (float(v) for v in axis)
    c, s = torch.cos(theta), torch.sin(theta)
    k = 1 - c
    return _matrices(
        [
            [x * x * k + c, x * y * k - z * s, x * z * k + y * s, 0],
            [y * x * k + z * s, y * y * k + c, y * z * k - x * s, 0],
            [z * x * k - y * s, z * y * k + x * s, z * z * k + c, 0],
            [0, 0, 0, 1],
        ],
        theta,
    )


# ---------------------------------------------------------------------------- the warp


def _filter(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    taps = torch.tensor(SYM6, dtype=torch.float64)
    return (taps / taps.sum()).to(device=device, dtype=dtype)


def _up_offset(taps: torch.Tensor) -> int:
    """Where the 2x upsampling puts the filter so that input pixel u lands on up-pixel 2u:
    the filter's centroid (5.1 of 0..11 for sym6) shifted to 0, rounded to a whole tap.

    The residual 0.1 up-pixel is why mirrored and rotated images are close to, not exactly,
    the flipped pixels (sym6 is not symmetric); aligning at 0 rather than at the centroid or
    at 0.5 gave the smallest flip error, as in the ADA paper's pipeline.
    """
    centroid = float((torch.arange(len(taps), dtype=taps.dtype, device=taps.device) * taps).sum())
    return -round(centroid)


def _zero_insert(x: torch.Tensor, dim: int, stride: int) -> torch.Tensor:
    """x -> z along `dim` with z[stride * u] = x[u] and zeros between (length stride*(L-1)+1)."""
    if stride == 1:
        return x
    shape = list(x.shape)
    shape[dim] = stride * (shape[dim] - 1) + 1
    z = x.new_zeros(shape)
    every = [slice(None)] * x.ndim
    every[dim] = slice(None, None, stride)
    z[tuple(every)] = x
    return z


class _Correlate(torch.autograd.Function):
    """Valid depthwise correlation of x [1, G, H, W] with a constant kernel [G, 1, kh, kw]
    and a stride, whose backward is its adjoint (zero insertion, padding and the flipped
    kernel) built from this same Function: derivatives of any order run the fast stride-1 /
    strided convolutions, never the slow transposed or grouped double-backward paths."""

    @staticmethod
    def forward(ctx, x, kernel, stride: tuple[int, int]):
        ctx.save_for_backward(kernel)
        ctx.conf = (stride, x.shape)
        return F.conv2d(x, kernel, stride=stride, groups=kernel.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (kernel,) = ctx.saved_tensors
        stride, x_shape = ctx.conf
        for d in (0, 1):
            grad = _zero_insert(grad, d + 2, stride[d])
        kh, kw = kernel.shape[2], kernel.shape[3]
        # Full correlation with the flipped kernel; inputs past the last window get zeros.
        extra_h = x_shape[2] - (grad.shape[2] + kh - 1)
        extra_w = x_shape[3] - (grad.shape[3] + kw - 1)
        grad = F.pad(grad, [kw - 1, kw - 1 + extra_w, kh - 1, kh - 1 + extra_h])
        return _Correlate.apply(grad, kernel.flip(2, 3), (1, 1)), None, None


def _planes(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [1, N*C, H, W]: one depthwise group per plane (fast on CPU and GPU)."""
    return x.reshape(1, x.shape[0] * x.shape[1], x.shape[2], x.shape[3])


def _upsample2x(x: torch.Tensor, taps: torch.Tensor, offset: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, 2H, 2W]: up[k] = 2 sum_u x[u] taps[k - 2u - offset] per axis
    (zero insertion, then the filter with gain 2), along W and then along H."""
    N, C, H, W = x.shape
    t = len(taps)
    # up[k] = 2 sum_j flipped[j] z[k - offset - (t - 1) + j] for the zero-inserted z: a
    # correlation whose window for output k starts `before` samples ahead of z[k].
    flipped = (2 * taps).flip(0)
    before = t - 1 + offset
    z = _zero_insert(_planes(x), 3, 2)  # [1, NC, H, 2W - 1]
    z = F.pad(z, [before, t - before])
    z = _Correlate.apply(z, flipped.reshape(1, 1, 1, t).expand(N * C, 1, 1, t), (1, 1))
    z = _zero_insert(z, 2, 2)  # [1, NC, 2H - 1, 2W]
    z = F.pad(z, [0, 0, before, t - before])
    z = _Correlate.apply(z, flipped.reshape(1, 1, t, 1).expand(N * C, 1, t, 1), (1, 1))
    return z.reshape(N, C, 2 * H, 2 * W)


def _downsample2x(z: torch.Tensor, taps: torch.Tensor, start: int, size: tuple[int, int]):
    """out[o] = sum_t taps[t] z[2o + t + start] per axis; `size` = output (H, W)."""
    N, C = z.shape[:2]
    H, W = size
    t = len(taps)
    z = _planes(z[:, :, start : start + 2 * H - 2 + t, start : start + 2 * W - 2 + t])
    z = _Correlate.apply(z, taps.reshape(1, 1, 1, t).expand(N * C, 1, 1, t), (1, 2))
    z = _Correlate.apply(z, taps.reshape(1, 1, t, 1).expand(N * C, 1, t, 1), (2, 1))
    return z.reshape(N, C, H, W)


class _BilinearSample(torch.autograd.Function):
    """grid_sample (bilinear, zeros outside) whose backward is its adjoint, itself a Function
    whose backward is grid_sample again: derivatives of any order w.r.t. the image, on every
    supported torch version (grid_sample's own double backward exists only in recent ones).
    The sampling grid is a constant: augmentation parameters are random, not learned."""

    @staticmethod
    def forward(ctx, img, grid):
        ctx.save_for_backward(grid)
        ctx.img_shape = img.shape
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    @staticmethod
    def backward(ctx, grad):
        (grid,) = ctx.saved_tensors
        return _BilinearSampleAdjoint.apply(grad, grid, ctx.img_shape), None


class _BilinearSampleAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, grid, img_shape):
        ctx.save_for_backward(grid)
        # The input's values are not read for the input gradient; only its shape and dtype.
        shape_like = grad.new_empty(img_shape)
        grad_img, _ = torch.ops.aten.grid_sampler_2d_backward(
            grad, shape_like, grid, 0, 0, False, [True, False]
        )
        return grad_img

    @staticmethod
    def backward(ctx, grad_grad):
        (grid,) = ctx.saved_tensors
        return _BilinearSample.apply(grad_grad, grid), None, None


def bilinear_sample(img: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """img [N, C, H, W] read at continuous pixel positions kx, ky [N, Ho, Wo] (pixel centres
    at integers; zeros outside): [N, C, Ho, Wo]."""
    H, W = img.shape[2], img.shape[3]
    # grid_sample's normalised coordinates with align_corners=False: pixel k <-> (2k + 1) / W - 1.
    grid = torch.stack([(2 * kx + 1) / W - 1, (2 * ky + 1) / H - 1], dim=-1)
    return _BilinearSample.apply(img, grid)


def _padding(G_inv: torch.Tensor, H: int, W: int, margin: int) -> tuple[int, int, int, int]:
    """Reflect padding (left, right, top, bottom) that covers every input point the output
    corners map to, plus `margin` pixels for the filters; at most size - 1 (reflect's limit)."""
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor(
        [[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]],
        dtype=G_inv.dtype,
        device=G_inv.device,
    )
    mapped = G_inv @ corners.T  # [N, 3, 4]
    xs, ys = mapped[:, 0].flatten(), mapped[:, 1].flatten()
    # Sync point: pad sizes are Python ints (one small device-to-host copy per warp).
    reach = torch.stack([(-xs).max(), xs.max(), (-ys).max(), ys.max()]).tolist()
    limits = (cx, cx, cy, cy)
    sizes = (W - 1, W - 1, H - 1, H - 1)
    pads = [
        min(max(math.ceil(r - lim + margin), 0), size)
        for r, lim, size in zip(reach, limits, sizes, strict=True)
    ]
    return pads[0], pads[1], pads[2], pads[3]


def warp(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
    """Resample images [N, C, H, W] so that output pixel p shows input point G_inv @ p."""
    N, C, H, W = images.shape
    taps = _filter(images.device, images.dtype)
    offset = _up_offset(taps)
    # Output margin (in output pixels) so the final low-pass filter has every tap it reads.
    m = math.ceil(max(-offset, offset - 2 + len(taps)) / 2)
    G_inv = G_inv.to(images.dtype)
    pl, pr, pt, pb = _padding(G_inv, H, W, margin=2 * m)
    padded = F.pad(images, [pl, pr, pt, pb], mode="reflect")
    up = _upsample2x(padded, taps, offset)

    # Positions of the 2x output grid (index q <-> output pixel q / 2 - m), centred, mapped
    # into the input, then into the upsampled padded image (pixel u <-> up-pixel 2u).
    qy = torch.arange(2 * (H + 2 * m), device=images.device, dtype=images.dtype)
    qx = torch.arange(2 * (W + 2 * m), device=images.device, dtype=images.dtype)
    centred_y = qy / 2 - m - (H - 1) / 2
    centred_x = qx / 2 - m - (W - 1) / 2
    yy, xx = torch.meshgrid(centred_y, centred_x, indexing="ij")
    out_xy1 = torch.stack([xx.flatten(), yy.flatten(), torch.ones_like(xx.flatten())])  # [3, P]
    in_xy = G_inv[:, :2] @ out_xy1  # [N, 2, P]
    kx = 2 * (in_xy[:, 0] + (W - 1) / 2 + pl)
    ky = 2 * (in_xy[:, 1] + (H - 1) / 2 + pt)
    sampled = bilinear_sample(up, kx.reshape(N, len(qy), len(qx)), ky.reshape(N, len(qy), len(qx)))
    return _downsample2x(sampled, taps, offset + 2 * m, (H, W))
