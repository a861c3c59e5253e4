"""StyleGAN2 building blocks: equalized-LR layers, FIR resampling, modulated convolution.

Conventions shared by every layer here:

- Equalized learning rate: weights are stored as N(0, 1) / lr_mult and multiplied at run
  time by lr_mult / sqrt(fan_in); biases are multiplied by lr_mult. Adam then moves every
  layer at the same effective speed whatever its fan-in.
- Activations: leaky ReLU (slope 0.2) followed by the gain sqrt(2) that keeps unit variance,
  or linear (gain 1). Because lrelu(z) * g == lrelu(z * g) for g > 0, layers fold the gain
  into their (small) weights, biases and scales instead of spending a pass over the
  activations on it.
- Each layer ends with one epilogue, `bias_act`: per-sample scale, noise, bias, activation,
  clamp; one Triton kernel on CUDA (`model.bias_act_kernel: auto`), else PyTorch ops.
- FIR resampling uses the separable [1, 3, 3, 1] filter with the padding and gain of the
  official `upfirdn2d`: 2x upsampling has gain 4 (so a constant image stays constant),
  2x downsampling gain 1. Every filter is one call, with a hand-written backward that
  keeps the second derivative (R1, path length) cheap: a Triton kernel on CUDA
  (`model.fir_kernel: auto`), else a depthwise convolution.
- On CPU, feature maps are kept in channels-last memory layout (the logical shape stays
  [N, C, H, W]): oneDNN convolves NHWC natively, whereas NCHW costs a reorder around every
  convolution and makes the depthwise FIR filters several times slower. On CUDA, NCHW
  measured faster, in fp32 and in bf16, so it stays by default (README, Performance);
  `train.memory_format` picks either layout on any device. Weights follow the layout of the
  feature map they are applied to.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
ACTIVATION_GAINS = {"linear": 1.0, "lrelu": LRELU_GAIN}
FIR_TAPS = (1.0, 3.0, 3.0, 1.0)

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def channels_last_on(device: torch.device, memory_format: str) -> bool:
    """Whether feature maps and conv weights go channels-last: `memory_format` is
    "channels_last", "contiguous" (NCHW) or "auto" (channels-last on CPU, NCHW elsewhere)."""
    if memory_format == "auto":
        return torch.device(device).type == "cpu"
    if memory_format not in ("channels_last", "contiguous"):
        raise ValueError(
            f"memory format '{memory_format}' is not one of auto, channels_last, contiguous"
        )
    return memory_format == "channels_last"


def conv_layout(x: torch.Tensor, memory_format: str = "auto") -> torch.Tensor:
    """The same tensor in the layout `channels_last_on` picks (no copy when it already is)."""
    if channels_last_on(x.device, memory_format):
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def layout_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`t` (a conv weight) in the layout of the feature map `x` it is applied to."""
    if x.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def use_conv_layout_(module: ModuleT, device: torch.device, memory_format: str = "auto") -> ModuleT:
    """Store the module's 4D weights in the layout `conv_layout` gives activations on `device`,
    and make its layers lay out activations the same way (`train.memory_format`).

    Equalized-LR weights are rescaled every call, and an elementwise op keeps its input's
    layout: channels-last weights on CPU come out of the rescale ready for oneDNN, where
    NCHW weights cost a reorder forward and another backward on every convolution.
    """
    _set_on_layers_(module, "memory_format", memory_format)
    if channels_last_on(device, memory_format):
        module.to(memory_format=torch.channels_last)
    return module


def activation_gain(activation: str) -> float:
    if activation not in ACTIVATION_GAINS:
        raise ValueError(f"activation '{activation}' is not one of {', '.join(ACTIVATION_GAINS)}")
    return ACTIVATION_GAINS[activation]


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def bias_act(
    x: torch.Tensor,
    *,
    scale_NC: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    bias_C: torch.Tensor | None = None,
    activation: str = "linear",
    clamp: float | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """A layer's epilogue: clamp(act(x * scale_NC[:, :, None, None] + noise + bias_C)).

    `noise` is [N or 1, 1, H, W] or [H, W]; callers fold the activation gain into scale,
    noise and bias. `kernel` (see `bias_act_form`): the PyTorch form works in place where
    autograd allows (so `x` must be a fresh tensor that no autograd node saved, e.g. a
    convolution's output); the Triton form (`triton_kernels.bias_act`) saves its output for
    the backward, so callers must not modify that in place.
    """
    if activation == "linear" and all(v is None for v in (scale_NC, noise, bias_C, clamp)):
        return x  # nothing to do (D's skip connections)
    if bias_act_form(x, kernel) == "triton":
        return _triton().bias_act(
            x,
            scale_NC=scale_NC,
            noise=noise,
            bias_C=bias_C,
            lrelu=activation == "lrelu",
            clamp=clamp,
        )
    x = _add_noise_bias(x, noise, bias_C, scale_NC)
    if activation == "lrelu":
        # In place, the activation allocates no second full-size tensor; its backward and
        # double backward need only the result, which autograd keeps.
        x = F.leaky_relu_(x, LRELU_SLOPE)
    return x.clamp(-clamp, clamp) if clamp is not None else x


def bias_act_form(x: torch.Tensor, kernel: str) -> str:
    """How `bias_act` runs on `x` for `kernel` ("auto", "torch" or "triton"): "triton" where
    `triton_chosen`, else "torch"."""
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"bias_act kernel '{kernel}' is not one of auto, torch, triton")
    return "triton" if triton_chosen(x, kernel) else "torch"


# ---------------------------------------------------------------------------- FIR filter


def fir_filter(taps: tuple[float, ...] = FIR_TAPS) -> torch.Tensor:
    """The 2D low-pass filter [k, k] (outer product of `taps`), normalised to sum 1."""
    f_1d = torch.tensor(taps, dtype=torch.float32)
    f_2d = torch.outer(f_1d, f_1d)
    return f_2d / f_2d.sum()


def _depthwise(f_kk: torch.Tensor, x: torch.Tensor, gain: float) -> torch.Tensor:
    """Filter as a depthwise conv weight [C, 1, k, k] for `x`. The filter is symmetric, so the
    correlation torch computes equals the convolution upfirdn2d defines."""
    return layout_like((f_kk * gain).to(x.dtype).expand(x.shape[1], 1, *f_kk.shape), x)


def upsample2d(x: torch.Tensor, f_kk: torch.Tensor, *, kernel: str = "auto") -> torch.Tensor:
    """[N, C, H, W] -> [N, C, 2H, 2W]: zero insertion, pad (2, 1), filter with gain 4.

    A transposed depthwise convolution with stride 2 and padding 1 does exactly that in
    one call, without materialising the zero-filled image. `kernel`: see `fir_form`.
    """
    form = fir_form(x, kernel)
    if form == "triton":
        return _triton().upfirdn2d(x, f_kk * 4.0, up=2, pad=(2, 1))
    weight = _depthwise(f_kk, x, 4.0)
    N, C, H, W = x.shape
    if form == "native":
        return _FirAdjoint.apply(x, weight, 2, 1, (N, C, 2 * H, 2 * W))
    return _DepthwiseFIR.apply(x, weight, 2, 1, True)


def downsample2d(x: torch.Tensor, f_kk: torch.Tensor, *, kernel: str = "auto") -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H/2, W/2]: pad (1, 1), filter, keep every second pixel.

    The stride-2 convolution computes only the pixels that are kept.
    """
    form = fir_form(x, kernel)
    if form == "triton":
        return _triton().upfirdn2d(x, f_kk, down=2, pad=(1, 1))
    weight = _depthwise(f_kk, x, 1.0)
    if form == "native":
        return _FirConv.apply(x, weight, 2, 1)
    return _DepthwiseFIR.apply(x, weight, 2, 1, False)


def blur2d(
    x: torch.Tensor, f_kk: torch.Tensor, pad: int, gain: float = 1.0, *, kernel: str = "auto"
) -> torch.Tensor:
    """Filter each channel with symmetric zero padding `pad` (no resampling)."""
    form = fir_form(x, kernel)
    if form == "triton":
        return _triton().upfirdn2d(x, f_kk * gain, pad=(pad, pad))
    weight = _depthwise(f_kk, x, gain)
    if form == "native":
        return _FirConv.apply(x, weight, 1, pad)
    return _DepthwiseFIR.apply(x, weight, 1, pad, False)


def fir_form(x: torch.Tensor, kernel: str) -> str:
    """How the FIR filters run on `x` for the requested `kernel`.

    - "triton" where `triton_chosen` (CUDA with `triton` installed, for "auto" and "triton"):
      the Triton kernel (`triton_kernels.upfirdn2d`).
    - Otherwise, for "auto", "torch" and "triton": "depthwise" on CPU (`_DepthwiseFIR`, oneDNN
      runs both directions natively), "native" elsewhere (`_FirConv` / `_FirAdjoint`, no cuDNN
      grouped transposed conv). So a model trained with Triton still runs, exports and samples
      anywhere.
    - "depthwise" or "native": that form on any device (tests compare the forms on CPU).
    """
    if kernel not in ("auto", "torch", "triton", "depthwise", "native"):
        raise ValueError(
            f"FIR kernel '{kernel}' is not one of auto, torch, triton, depthwise, native"
        )
    if triton_chosen(x, kernel):
        return "triton"
    if kernel in ("depthwise", "native"):
        return kernel
    return "native" if x.is_cuda else "depthwise"


def triton_chosen(x: torch.Tensor, kernel: str) -> bool:
    """Whether a kernel setting runs sg2dist's Triton kernels on `x`: "triton" wherever they can
    run (`triton_runs_on`, Triton's CPU interpreter included); "auto" on CUDA only, where they
    measured faster than the PyTorch forms (README, Performance); "torch" never."""
    if kernel == "triton":
        return triton_runs_on(x)
    return kernel == "auto" and x.is_cuda and triton_runs_on(x)


def triton_runs_on(x: torch.Tensor) -> bool:
    """Whether sg2dist's Triton kernels can run on `x`: CUDA with `triton` installed (or a CPU
    tensor under TRITON_INTERPRET=1, as in the tests)."""
    return importlib.util.find_spec("triton") is not None and _triton().runs_on(x)


def _triton():
    # Imported on first use: only runs that ask for a Triton kernel need `triton`.
    return importlib.import_module("sg2dist.model.triton_kernels")


def use_kernels_(module: ModuleT, *, fir_kernel: str, bias_act_kernel: str) -> ModuleT:
    """Make every layer of `module` filter with `fir_kernel` and finish with `bias_act_kernel`
    ("auto", "torch" or "triton": `ModelConfig.fir_kernel`, `.bias_act_kernel`)."""
    _set_on_layers_(module, "fir_kernel", fir_kernel)
    _set_on_layers_(module, "bias_act_kernel", bias_act_kernel)
    return module


def _set_on_layers_(module: nn.Module, name: str, value: str) -> None:
    """Set the setting `name` on every layer of `module` that declares it (in __init__)."""
    for layer in module.modules():
        if isinstance(getattr(layer, name, None), str):
            setattr(layer, name, value)


def _fir_conv(x, kernel, stride: int, padding: int, transposed: bool, output_padding=0):
    channels = kernel.shape[0]
    if transposed:
        return F.conv_transpose2d(x, kernel, None, stride, padding, output_padding, channels)
    return F.conv2d(x, kernel, None, stride, padding, 1, channels)


class _DepthwiseFIR(torch.autograd.Function):
    """A fixed depthwise filter whose backward is the adjoint filter, run as a plain
    (differentiable) convolution. The CPU form: oneDNN runs both directions natively.

    Autograd's generic double backward of a convolution does extra work for the weight
    side even though the filter is a constant (several times the time of this form on
    CPU; README, Performance). Written as the adjoint convolution, the second derivative
    (R1, path length) runs the same depthwise kernels as the first derivative.
    """

    @staticmethod
    def forward(ctx, x, kernel, stride: int, padding: int, transposed: bool):
        ctx.save_for_backward(kernel)
        ctx.conf = (stride, padding, transposed, x.shape, x.dtype)
        return _fir_conv(x, kernel, stride, padding, transposed)

    @staticmethod
    def backward(ctx, grad):
        (kernel,) = ctx.saved_tensors
        stride, padding, transposed, x_shape, x_dtype = ctx.conf
        kernel = kernel.to(grad.dtype)
        if transposed:  # the adjoint of a transposed convolution is the convolution
            grad_x = _fir_conv(grad, kernel, stride, padding, False)
        else:  # a strided convolution drops trailing pixels; output_padding restores them
            k = kernel.shape[-1]
            output_padding = [
                x_shape[d] - ((grad.shape[d] - 1) * stride - 2 * padding + k) for d in (2, 3)
            ]
            grad_x = _fir_conv(grad, kernel, stride, padding, True, output_padding)
        return grad_x.to(x_dtype), None, None, None, None


class _FirConv(torch.autograd.Function):
    """y = depthwise FIR convolution of x (stride 1 or 2); its backward is `_FirAdjoint`,
    whose backward is this again, so every derivative of any order runs one of two native
    kernels. The CUDA form: cuDNN's grouped transposed convolution with one channel per
    group (the adjoint `_DepthwiseFIR` uses) is a slow path; these avoid it. A stride-1
    adjoint is the same filter, flipped, as a plain depthwise convolution; a stride-2
    adjoint is the input gradient of the strided depthwise convolution, which PyTorch
    computes with its own depthwise backward kernel."""

    @staticmethod
    def forward(ctx, x, kernel, stride: int, padding: int):
        ctx.save_for_backward(kernel)
        ctx.conf = (stride, padding, tuple(x.shape), x.dtype)
        return F.conv2d(x, kernel, None, stride, padding, 1, kernel.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (kernel,) = ctx.saved_tensors
        stride, padding, x_shape, x_dtype = ctx.conf
        grad_x = _FirAdjoint.apply(grad, kernel.to(grad.dtype), stride, padding, x_shape)
        return grad_x.to(x_dtype), None, None, None


class _FirAdjoint(torch.autograd.Function):
    """The adjoint of `_FirConv(·, kernel, stride, padding)` for inputs of `x_shape`."""

    @staticmethod
    def forward(ctx, g, kernel, stride: int, padding: int, x_shape: tuple[int, ...]):
        ctx.save_for_backward(kernel)
        ctx.conf = (stride, padding, g.dtype)
        channels, k = kernel.shape[0], kernel.shape[-1]
        if stride == 1:
            return F.conv2d(g, kernel.flip(2, 3), None, 1, k - 1 - padding, 1, channels)
        grad_input, _, _ = torch.ops.aten.convolution_backward(
            g,
            g.new_empty(x_shape),  # only its shape is read
            kernel,
            None,
            [stride, stride],
            [padding, padding],
            [1, 1],
            False,
            [0, 0],
            channels,
            [True, False, False],
        )
        return grad_input

    @staticmethod
    def backward(ctx, grad):
        (kernel,) = ctx.saved_tensors
        stride, padding, g_dtype = ctx.conf
        grad_g = _FirConv.apply(grad, kernel.to(grad.dtype), stride, padding)
        return grad_g.to(g_dtype), None, None, None, None


# ---------------------------------------------------------------------------- equalized LR


class FullyConnected(nn.Module):
    """Equalized-LR linear layer with bias and optional leaky ReLU."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        activation: str = "linear",
        lr_mult: float = 1.0,
        bias_init: float = 0.0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_mult)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_mult / math.sqrt(in_features)
        self.bias_gain = lr_mult
        self.act_gain = activation_gain(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x * g) @ W^T == x @ (g W)^T: scaling the [N, in] input instead of the [out, in]
        # weight is the smaller pass, forward and backward (the mapping network's weights
        # are 512 x 512 and its batches a few dozen rows).
        b = self.bias * (self.bias_gain * self.act_gain)
        x = x * (self.weight_gain * self.act_gain)
        x = torch.addmm(b.to(x.dtype), x, self.weight.to(x.dtype).t())
        if self.activation == "lrelu":
            x = F.leaky_relu_(x, LRELU_SLOPE)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.activation}"


class Conv2dLayer(nn.Module):
    """Equalized-LR convolution with bias, activation, optional FIR downsampling and clamp.

    `down=True` halves the resolution like the official conv2d_resample: a 3x3 kernel
    blurs (pad 2) and then convolves with stride 2; a 1x1 kernel downsamples first, which
    is 4x cheaper than convolving at full resolution.
    """

    fir: torch.Tensor  # buffer

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        bias: bool = True,
        activation: str = "linear",
        down: bool = False,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.down = down
        self.conv_clamp = conv_clamp
        self.weight = nn.Parameter(
            torch.randn([out_channels, in_channels, kernel_size, kernel_size])
        )
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.act_gain = activation_gain(activation)
        self.register_buffer("fir", fir_filter(), persistent=False)
        self.fir_kernel = "auto"  # `use_kernels_`
        self.bias_act_kernel = "auto"  # `use_kernels_`
        self.memory_format = "auto"  # `use_conv_layout_`

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        act_gain = self.act_gain * gain
        w = (self.weight * (self.weight_gain * act_gain)).to(x.dtype)
        w = conv_layout(w, self.memory_format)
        b = (self.bias * act_gain).to(x.dtype) if self.bias is not None else None
        # The Triton epilogue adds the bias in its single pass; otherwise the convolution does.
        b_conv, b_act = (
            (None, b) if bias_act_form(x, self.bias_act_kernel) == "triton" else (b, None)
        )
        if self.down and self.kernel_size == 1:
            x = F.conv2d(downsample2d(x, self.fir, kernel=self.fir_kernel), w, b_conv)
        elif self.down:
            x = F.conv2d(blur2d(x, self.fir, pad=2, kernel=self.fir_kernel), w, b_conv, stride=2)
        else:
            x = F.conv2d(x, w, b_conv, padding=self.kernel_size // 2)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(
            x, bias_C=b_act, activation=self.activation, clamp=clamp, kernel=self.bias_act_kernel
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels} -> {self.out_channels}, k={self.kernel_size}, "
            f"{self.activation}, down={self.down}"
        )


# ---------------------------------------------------------------------------- modulated conv


def demodulation_coefficients(weight_OIkk: torch.Tensor, styles_NI: torch.Tensor) -> torch.Tensor:
    """1 / ||weight modulated by styles|| per sample and output channel: [N, O].

    sum_{i,k} (w[o,i,k] s[n,i])^2 == sum_i s[n,i]^2 sum_k w[o,i,k]^2, a small matmul, so the
    per-sample weights [N, O, I, k, k] never need to exist.
    """
    w_sq_OI = weight_OIkk.square().sum(dim=(2, 3))
    return (styles_NI.square() @ w_sq_OI.t() + 1e-8).rsqrt()


def modulated_conv2d(
    x_NIHW: torch.Tensor,
    weight_OIkk: torch.Tensor,
    styles_NI: torch.Tensor,
    *,
    demodulate: bool = True,
    out_gain: float = 1.0,
    up: bool = False,
    fir: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    bias_O: torch.Tensor | None = None,
    activation: str = "linear",
    clamp: float | None = None,
    fused: bool = False,
    fir_kernel: str = "auto",
    bias_act_kernel: str = "auto",
    memory_format: str = "auto",
) -> torch.Tensor:
    """clamp(act(conv(x, weight scaled per sample by `styles` on its input channels [and
    demodulated]) * out_gain + noise + bias)).

    `noise` ([N or 1, 1, H, W] or [H, W]) and `bias_O` are added as given (the caller scales
    them); the epilogue runs by `bias_act_kernel` (see `bias_act`). `up=True` doubles the
    resolution like the official code: a stride-2 transposed convolution followed by the FIR
    filter (pad 1, gain 4); it needs `fir`, run by `fir_kernel` (see `fir_form`).
    `memory_format`: the layout of x (`channels_last_on`).

    Two equivalent forms:
    - fused=False: scale the activations by the styles, run one convolution with the shared
      weight, scale the result per sample and channel (what training uses; the weight
      gradient is a single dense convolution gradient).
    - fused=True: build per-sample weights [N, O, I, k, k] and run one grouped convolution
      with the batch folded into the groups (the official code's choice for inference).
    A 1x1 kernel without upsampling is a per-sample matrix product: both forms use bmm.
    """
    N, in_channels, H, W = x_NIHW.shape
    out_channels, _, kh, kw = weight_OIkk.shape
    if x_NIHW.dtype == torch.float16 and demodulate:
        weight_OIkk, styles_NI = _fp16_prenormalise(weight_OIkk, styles_NI)
    scale_NO = demodulation_coefficients(weight_OIkk, styles_NI) if demodulate else None
    if out_gain != 1.0:
        scale_NO = (
            scale_NO * out_gain
            if scale_NO is not None
            else styles_NI.new_full([N, out_channels], out_gain)
        )
    dtype = x_NIHW.dtype

    pending_scale_NO = None  # per-sample scale not folded into the weights yet
    if kh == 1 and kw == 1 and not up:
        w_NOI = weight_OIkk.reshape(1, out_channels, in_channels) * styles_NI.unsqueeze(1)
        if scale_NO is not None:
            w_NOI = w_NOI * scale_NO.unsqueeze(2)
        y = _per_sample_matmul(x_NIHW, w_NOI.to(dtype))
    elif fused:
        y = _grouped_modulated_conv(x_NIHW, weight_OIkk, styles_NI, scale_NO, up)
    else:
        x = conv_layout(x_NIHW, memory_format) * styles_NI.to(dtype).reshape(N, in_channels, 1, 1)
        y = _conv_maybe_up(x, weight_OIkk.to(dtype), up, groups=1)
        pending_scale_NO = scale_NO.to(dtype) if scale_NO is not None else None
    if up:
        if fir is None:
            raise ValueError("modulated_conv2d(up=True) needs the FIR filter `fir`")
        # The per-channel scale commutes with the per-channel filter, so it can wait.
        y = blur2d(y, fir, pad=1, gain=4.0, kernel=fir_kernel)
    return bias_act(
        y,
        scale_NC=pending_scale_NO,
        noise=noise,
        bias_C=bias_O,
        activation=activation,
        clamp=clamp,
        kernel=bias_act_kernel,
    )


def _fp16_prenormalise(weight_OIkk: torch.Tensor, styles_NI: torch.Tensor):
    """Weights and styles rescaled so that fp16 products stay finite; demodulation is
    scale-invariant, so the demodulated result is the same."""
    _, in_channels, kh, kw = weight_OIkk.shape
    weight_OIkk = weight_OIkk * (
        1.0 / math.sqrt(in_channels * kh * kw) / weight_OIkk.abs().amax(dim=(1, 2, 3), keepdim=True)
    )
    return weight_OIkk, styles_NI / styles_NI.abs().amax(dim=1, keepdim=True)


def _conv_maybe_up(x: torch.Tensor, weight_OIkk: torch.Tensor, up: bool, groups: int):
    """Plain 'same' convolution, or (up) a stride-2 transposed conv whose output [2H+1] the
    FIR blur (pad 1) later brings to 2H."""
    if not up:
        return F.conv2d(
            x, layout_like(weight_OIkk, x), padding=weight_OIkk.shape[-1] // 2, groups=groups
        )
    out_per_group = weight_OIkk.shape[0] // groups
    in_per_group, k = weight_OIkk.shape[1], weight_OIkk.shape[-1]
    # conv_transpose2d wants [in, out/groups, k, k]; swap the channel axes within each group.
    weight_IOkk = (
        weight_OIkk.reshape(groups, out_per_group, in_per_group, k, k)
        .transpose(1, 2)
        .reshape(groups * in_per_group, out_per_group, k, k)
    )
    return F.conv_transpose2d(x, layout_like(weight_IOkk, x), stride=2, groups=groups)


def _per_sample_matmul(x_NIHW: torch.Tensor, w_NOI: torch.Tensor) -> torch.Tensor:
    """1x1 convolution with a different weight per sample, as one batched matmul on a view
    of x in whichever layout it is stored (no copy)."""
    N, in_channels, H, W = x_NIHW.shape
    out_channels = w_NOI.shape[1]
    if x_NIHW.is_contiguous(memory_format=torch.channels_last):
        x_NPI = x_NIHW.permute(0, 2, 3, 1).reshape(N, H * W, in_channels)
        y_NPO = torch.bmm(x_NPI, w_NOI.transpose(1, 2))
        return y_NPO.reshape(N, H, W, out_channels).permute(0, 3, 1, 2)
    y = torch.bmm(w_NOI, x_NIHW.reshape(N, in_channels, H * W))
    return y.reshape(N, out_channels, H, W)


def _grouped_modulated_conv(x_NIHW, weight_OIkk, styles_NI, scale_NO, up):
    N, in_channels, H, W = x_NIHW.shape
    out_channels, _, kh, kw = weight_OIkk.shape
    w = weight_OIkk.unsqueeze(0) * styles_NI.reshape(N, 1, in_channels, 1, 1)
    if scale_NO is not None:
        w = w * scale_NO.reshape(N, out_channels, 1, 1, 1)
    w = w.reshape(N * out_channels, in_channels, kh, kw).to(x_NIHW.dtype)
    y = _conv_maybe_up(x_NIHW.reshape(1, N * in_channels, H, W), w, up, groups=N)
    return y.reshape(N, out_channels, *y.shape[2:])


def _add_noise_bias(y, noise, bias_O, scale_NO):
    """y * scale + noise + bias with as few full-size passes as the inputs allow."""
    if scale_NO is not None:
        scale = scale_NO.reshape(*scale_NO.shape, 1, 1)
        if noise is not None:
            y = torch.addcmul(noise.to(y.dtype), y, scale)
        elif bias_O is not None:
            return torch.addcmul(bias_O.to(y.dtype).reshape(1, -1, 1, 1), y, scale)
        else:
            return y * scale
    elif noise is not None:
        y = y + noise.to(y.dtype)
    if bias_O is not None:
        y = y.add_(bias_O.to(y.dtype).reshape(1, -1, 1, 1))
    return y
