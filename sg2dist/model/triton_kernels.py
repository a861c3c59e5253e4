"""sg2dist's Triton kernels: FIR resampling (upfirdn2d) and a layer's bias + activation epilogue.

Both are autograd.Functions whose derivatives are again these kernels (or reductions in
PyTorch), so R1 and path length, which differentiate twice, stay on them. Sums are kept in
float32 (in float64 for float64 tensors, which the tests use). One program handles a block of
one sample in memory order, NCHW or channels-last (outputs keep the input's layout), with
32-bit offsets within a sample and a 64-bit sample base.

Import this module only where `triton` is installed (Linux wheels of torch bring it). With
TRITON_INTERPRET=1 set before the import, the kernels run on CPU tensors in Triton's
interpreter: slowly, but exactly, which is how the CPU tests check them.

upfirdn2d(x, f_kk, up=, down=, pad=(before, after)) inserts `up - 1` zeros after every pixel,
pads zeros before and after, correlates each channel with the k x k filter `f_kk` and keeps
every `down`-th pixel. Its adjoint is the same operation with `up` and `down` swapped, padding
`k - 1 - pad` and the filter flipped, so no derivative goes through cuDNN's grouped
convolutions. Each output reads k x k taps; with `up = 2` three taps in four fall on inserted
zeros and are masked out, so they cost no memory traffic.

bias_act(x, scale_NC, noise, bias_C, lrelu, clamp) is clamp(act(x * scale + noise + bias)):
in PyTorch up to four passes over a layer's output (addcmul, bias add, leaky ReLU, clamp) and
two more in the backward (the clamp's and the activation's masks); here one pass forward, and
one pass `gz = grad * act'(y)` to start the backward, after which the small gradients (scale,
noise, bias) are reductions of gz. act' depends only on the sign of y and on whether the clamp
bit, so it is read from the saved output and is constant almost everywhere: the double
backward multiplies by the same mask (`_ActGrad` is its own derivative).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether a kernel is compiled or interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 256  # outputs per program
LRELU_SLOPE = 0.2  # = layers.LRELU_SLOPE (this module imports nothing from sg2dist)


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x`'s device in this process."""
    return x.is_cuda or (INTERPRETED and x.device.type == "cpu")


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels-last [N, C, H, W] tensor, else contiguous_format."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


# ---------------------------------------------------------------------------- upfirdn2d


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
    layout = layout_of(x)
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
        CHANNELS_LAST=layout == torch.channels_last,
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


# ---------------------------------------------------------------------------- bias_act


@triton.jit
def _bias_act_kernel(
    x_ptr,
    scale_ptr,
    noise_ptr,
    bias_ptr,
    y_ptr,
    channels,
    pixels,
    clamp,
    HAS_SCALE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    NOISE_PER_SAMPLE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LRELU: tl.constexpr,
    SLOPE: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC_F64: tl.constexpr,
):
    # One program: a block of one sample in memory order (32-bit offsets within the sample,
    # a 64-bit sample base), so loads and stores coalesce in either layout.
    sample = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < channels * pixels
    if CHANNELS_LAST:
        c = offs % channels
        p = offs // channels
    else:
        c = offs // pixels
        p = offs % pixels
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    base = sample * channels * pixels
    v = tl.load(x_ptr + base + offs, mask=inside, other=0.0).to(acc_dtype)
    if HAS_SCALE:
        v *= tl.load(scale_ptr + sample * channels + c, mask=inside, other=0.0).to(acc_dtype)
    if HAS_NOISE:
        noise_base = sample * pixels if NOISE_PER_SAMPLE else 0
        v += tl.load(noise_ptr + noise_base + p, mask=inside, other=0.0).to(acc_dtype)
    if HAS_BIAS:
        v += tl.load(bias_ptr + c, mask=inside, other=0.0).to(acc_dtype)
    if LRELU:
        v = tl.where(v > 0, v, v * SLOPE)
    if HAS_CLAMP:
        v = tl.minimum(tl.maximum(v, -clamp), clamp)
    tl.store(y_ptr + base + offs, v.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _act_grad_kernel(
    g_ptr,
    y_ptr,
    out_ptr,
    per_sample,
    clamp,
    LRELU: tl.constexpr,
    SLOPE: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    base = tl.program_id(1).to(tl.int64) * per_sample
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < per_sample
    g = tl.load(g_ptr + base + offs, mask=inside, other=0.0)
    y = tl.load(y_ptr + base + offs, mask=inside, other=0.0)
    # The same masks PyTorch's leaky_relu and clamp backward apply, read from the output.
    gz = g
    if LRELU:
        gz = tl.where(y > 0, g, g * SLOPE)
    if HAS_CLAMP:
        gz = tl.where(tl.abs(y) < clamp, gz, 0.0)
    tl.store(out_ptr + base + offs, gz.to(out_ptr.dtype.element_ty), mask=inside)


def _bias_act(x, scale_NC, noise, bias_C, lrelu: bool, clamp: float | None) -> torch.Tensor:
    N, C, H, W = x.shape
    layout = layout_of(x)
    x = x.contiguous(memory_format=layout)  # no copy in either layout the network uses
    y = torch.empty_like(x, memory_format=layout)
    f64 = x.dtype == torch.float64
    # Absent operands get a valid pointer that the kernel never reads.
    scale = scale_NC.contiguous() if scale_NC is not None else x
    noise_NP = noise.reshape(-1, H * W).contiguous() if noise is not None else x
    bias = bias_C.contiguous() if bias_C is not None else x
    _bias_act_kernel[(triton.cdiv(C * H * W, BLOCK), N)](
        x,
        scale,
        noise_NP,
        bias,
        y,
        C,
        H * W,
        float(clamp or 0.0),
        HAS_SCALE=scale_NC is not None,
        HAS_NOISE=noise is not None,
        NOISE_PER_SAMPLE=noise is not None and noise_NP.shape[0] > 1,
        HAS_BIAS=bias_C is not None,
        LRELU=lrelu,
        SLOPE=LRELU_SLOPE,
        HAS_CLAMP=clamp is not None,
        CHANNELS_LAST=layout == torch.channels_last,
        BLOCK=BLOCK,
        ACC_F64=f64,
    )
    return y


class _ActGrad(torch.autograd.Function):
    """grad * act'(y): linear in grad with a mask that is constant almost everywhere, so its
    derivative with respect to grad is itself and with respect to y is zero."""

    @staticmethod
    def forward(ctx, grad, y, lrelu: bool, clamp: float | None):
        ctx.save_for_backward(y)
        ctx.conf = (lrelu, clamp)
        grad = grad.contiguous(memory_format=layout_of(y))  # an expanded grad becomes dense
        out = torch.empty_like(y)
        per_sample = y[0].numel()
        _act_grad_kernel[(triton.cdiv(per_sample, BLOCK), y.shape[0])](
            grad,
            y,
            out,
            per_sample,
            float(clamp or 0.0),
            LRELU=lrelu,
            SLOPE=LRELU_SLOPE,
            HAS_CLAMP=clamp is not None,
            BLOCK=BLOCK,
        )
        return out

    @staticmethod
    def backward(ctx, grad_grad):
        (y,) = ctx.saved_tensors
        return _ActGrad.apply(grad_grad, y, *ctx.conf), None, None, None


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale_NC, noise, bias_C, lrelu: bool, clamp: float | None):
        y = _bias_act(x, scale_NC, noise, bias_C, lrelu, clamp)
        # x is needed only for the scale's gradient (a reduction of gz * x).
        ctx.save_for_backward(x if scale_NC is not None else None, scale_NC, y)
        ctx.conf = (lrelu, clamp, None if noise is None else noise.shape)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, scale_NC, y = ctx.saved_tensors
        lrelu, clamp, noise_shape = ctx.conf
        gz = _ActGrad.apply(grad, y, lrelu, clamp)
        need_x, need_scale, need_noise, need_bias = ctx.needs_input_grad[:4]
        grad_x = grad_scale = grad_noise = grad_bias = None
        if need_x:
            grad_x = gz * scale_NC.to(gz.dtype)[:, :, None, None] if scale_NC is not None else gz
        if need_scale:
            grad_scale = (gz * x).sum(dim=(2, 3))
        if need_noise:
            # Noise is [N or 1, 1, H, W] or [H, W]: one value per pixel, shared by channels.
            grad_noise = gz.sum(dim=1, keepdim=True)
            if len(noise_shape) < 4 or noise_shape[0] == 1:
                grad_noise = grad_noise.sum(dim=0, keepdim=True)
            grad_noise = grad_noise.reshape(noise_shape)
        if need_bias:
            grad_bias = gz.sum(dim=(0, 2, 3))
        return grad_x, grad_scale, grad_noise, grad_bias, None, None


def bias_act(
    x: torch.Tensor,
    *,
    scale_NC: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    bias_C: torch.Tensor | None = None,
    lrelu: bool = False,
    clamp: float | None = None,
) -> torch.Tensor:
    """clamp(act(x [N, C, H, W] * scale_NC [N, C] + noise + bias_C [C]), -clamp, clamp).

    `noise` is [N or 1, 1, H, W] or [H, W]; act is leaky ReLU (slope 0.2, no gain: callers
    fold the gain into scale, noise and bias) or linear. The output keeps x's layout and dtype.
    """
    return _BiasAct.apply(x, scale_NC, noise, bias_C, lrelu, clamp)
