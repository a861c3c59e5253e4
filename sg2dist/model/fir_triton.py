"""FIR resampling (upfirdn2d) as one Triton kernel whose backward is the same kernel.

`upfirdn2d(x, f_kk, up=, down=, pad=(before, after))` inserts `up - 1` zeros after every
pixel, pads zeros before and after, correlates each channel with the k x k filter `f_kk`
and keeps every `down`-th pixel. Its adjoint is the same operation
with `up` and `down` swapped, padding `k - 1 - pad` and the filter flipped, so one
autograd.Function serves every derivative order (R1 and path length differentiate twice)
and no derivative goes through cuDNN's grouped convolutions.

One program computes a block of outputs of one sample, NCHW or channels-last (the output
keeps the input's layout). Each output reads k x k taps; with `up = 2` three taps in four
fall on inserted zeros and are masked out, so they cost no memory traffic. Sums are kept in
float32 (in float64 for float64 tensors, which the tests use).

Import this module only where `triton` is installed (Linux wheels of torch bring it). With
TRITON_INTERPRET=1 set before the import, the kernel runs on CPU tensors in Triton's
interpreter: slowly, but exactly, which is how the CPU tests check it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether a kernel is compiled or interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 256  # outputs per program


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernel can run on `x`'s device in this process."""
    return x.is_cuda or (INTERPRETED and x.device.type == "cpu")


@triton.jit
def _upfirdn2d_kernel(
    x_ptr,
    f_ptr,
    y_ptr,
    channels,
    in_h,
    in_w,
    out_h,
    out_w,
    UP: tl.constexpr,
    DOWN: tl.constexpr,
    PAD: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    ACC_F64: tl.constexpr,
):
    # Lanes walk y of one sample in its memory order, so loads and stores coalesce: ox fastest
    # in NCHW, the channel fastest in channels-last. 32-bit offsets within a sample; the
    # sample's base is 64-bit.
    sample = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < channels * out_h * out_w
    if CHANNELS_LAST:
        c = offs % channels
        ox = (offs // channels) % out_w
        oy = offs // (channels * out_w)
    else:
        ox = offs % out_w
        oy = (offs // out_w) % out_h
        c = offs // (out_w * out_h)
    x_sample = x_ptr + sample * channels * in_h * in_w
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    acc = tl.full([BLOCK], 0.0, acc_dtype)
    for ky in tl.static_range(K):
        # Row of the zero-inserted, padded image this tap reads; real rows are multiples of UP.
        zy = oy * DOWN + ky - PAD
        row_ok = (zy >= 0) & (zy < in_h * UP) & (zy % UP == 0)
        iy = tl.where(row_ok, zy, 0) // UP
        for kx in tl.static_range(K):
            zx = ox * DOWN + kx - PAD
            ok = inside & row_ok & (zx >= 0) & (zx < in_w * UP) & (zx % UP == 0)
            ix = tl.where(ok, zx, 0) // UP
            if CHANNELS_LAST:
                x_offs = (iy * in_w + ix) * channels + c
            else:
                x_offs = (c * in_h + iy) * in_w + ix
            tap = tl.load(f_ptr + ky * K + kx)
            v = tl.load(x_sample + x_offs, mask=ok, other=0.0)
            acc += v.to(acc_dtype) * tap.to(acc_dtype)
    y_sample = y_ptr + sample * channels * out_h * out_w
    tl.store(y_sample + offs, acc.to(y_ptr.dtype.element_ty), mask=inside)


def _launch(x: torch.Tensor, f_kk: torch.Tensor, up: int, down: int, pad: int, out_hw):
    N, C, H, W = x.shape
    out_h, out_w = out_hw
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)  # no copy in either layout the network uses
    y = torch.empty([N, C, out_h, out_w], dtype=x.dtype, device=x.device, memory_format=layout)
    f64 = x.dtype == torch.float64
    f = f_kk.to(device=x.device, dtype=torch.float64 if f64 else torch.float32).contiguous()
    grid = (triton.cdiv(C * out_h * out_w, BLOCK), N)
    _upfirdn2d_kernel[grid](
        x,
        f,
        y,
        C,
        H,
        W,
        out_h,
        out_w,
        UP=up,
        DOWN=down,
        PAD=pad,
        K=f.shape[-1],
        BLOCK=BLOCK,
        CHANNELS_LAST=channels_last,
        ACC_F64=f64,
    )
    return y


class _UpFirDn2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f_kk, up: int, down: int, pad: int, out_hw: tuple[int, int]):
        ctx.save_for_backward(f_kk)
        ctx.conf = (up, down, pad, tuple(x.shape[2:]))
        return _launch(x, f_kk, up, down, pad, out_hw)

    @staticmethod
    def backward(ctx, grad):
        (f_kk,) = ctx.saved_tensors
        up, down, pad, in_hw = ctx.conf
        k = f_kk.shape[-1]
        grad_x = _UpFirDn2d.apply(grad, f_kk.flip(0, 1), down, up, k - 1 - pad, in_hw)
        return grad_x, None, None, None, None, None


def upfirdn2d(
    x: torch.Tensor,
    f_kk: torch.Tensor,
    *,
    up: int = 1,
    down: int = 1,
    pad: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, (H*up + pad[0] + pad[1] - k) // down + 1, ...] (same for W).

    `f_kk` is the k x k filter with its gain included (float32, any device); `pad` is the
    zero padding (before, after) of the zero-inserted image, the same on both axes.
    """
    k = f_kk.shape[-1]
    out_hw = tuple((size * up + sum(pad) - k) // down + 1 for size in x.shape[2:])
    return _UpFirDn2d.apply(x, f_kk, up, down, pad[0], out_hw)
