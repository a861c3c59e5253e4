"""Layer-level behaviour: equalized LR, demodulation, both modulated-conv forms, FIR resampling."""

import math

import pytest
import torch
import torch.nn.functional as F

from sg2dist.model.layers import (
    Conv2dLayer,
    FullyConnected,
    bias_act,
    bias_act_form,
    blur2d,
    downsample2d,
    fir_filter,
    fir_form,
    modulated_conv2d,
    upsample2d,
)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def relative_error(measured: float, expected: float) -> float:
    return abs(measured - expected) / expected


# ---------------------------------------------------------------------------- equalized LR


@pytest.mark.parametrize("lr_mult", [1.0, 0.01])
def test_equalized_lr_stores_unit_weights_and_runs_them_at_std_gain_over_sqrt_fan_in(lr_mult):
    fan_in, fan_out = 512, 256
    fc = FullyConnected(fan_in, fan_out, lr_mult=lr_mult)
    with torch.no_grad():
        fc.bias.normal_()
        # The layer's response to the unit vectors, minus the bias, is its effective weight.
        effective = fc(torch.eye(fan_in)) - fc(torch.zeros(1, fan_in))
        bias_effect = fc(torch.zeros(1, fan_in))[0]
    assert relative_error(fc.weight.std().item(), 1 / lr_mult) < 0.05
    assert relative_error(effective.std().item(), 1 / math.sqrt(fan_in)) < 0.05
    torch.testing.assert_close(bias_effect, fc.bias.detach() * lr_mult)


def test_conv_layer_effective_kernel_has_std_one_over_sqrt_fan_in():
    conv = Conv2dLayer(64, 128, 3)
    with torch.no_grad():
        # An impulse in each input channel reads out the kernel (bias is zero at init).
        impulses = torch.zeros(64, 64, 3, 3)
        impulses[torch.arange(64), torch.arange(64), 1, 1] = 1
        effective = conv(impulses)
    assert relative_error(effective.std().item(), 1 / math.sqrt(64 * 9)) < 0.05


def test_lrelu_layers_keep_unit_second_moment_thanks_to_the_sqrt2_gain():
    fc = FullyConnected(1024, 1024, activation="lrelu")
    conv = Conv2dLayer(256, 256, 3, activation="lrelu")
    with torch.no_grad():
        fc_out = fc(torch.randn(512, 1024))
        conv_out = conv(torch.randn(8, 256, 16, 16))[:, :, 1:-1, 1:-1]  # skip zero-padded border
    # E[lrelu(y)^2] * 2 for y ~ N(0, 1) is (1 + 0.2^2) / 2 * 2 = 1.04.
    assert relative_error(fc_out.square().mean().item(), 1.04) < 0.05
    assert relative_error(conv_out.square().mean().item(), 1.04) < 0.05


# ---------------------------------------------------------------------------- modulated conv


@pytest.mark.parametrize("style_scale", [0.01, 1.0, 100.0, "spread"])
def test_demodulated_conv_keeps_unit_variance_whatever_the_style_scale(style_scale):
    x = torch.randn(4, 256, 16, 16)
    weight = torch.randn(64, 256, 3, 3)
    if style_scale == "spread":  # per-channel styles over four orders of magnitude
        styles = torch.exp(torch.randn(4, 256) * 2)
    else:
        styles = torch.randn(4, 256) * style_scale
    y = modulated_conv2d(x, weight, styles)[:, :, 1:-1, 1:-1]
    assert relative_error(y.var().item(), 1.0) < 0.1
    # Without demodulation the variance follows the styles (so the check above can fail).
    y_raw = modulated_conv2d(x, weight, styles, demodulate=False)[:, :, 1:-1, 1:-1]
    assert relative_error(y_raw.var().item(), 1.0) > 0.5


@pytest.mark.parametrize(
    ("kernel", "up", "demodulate"),
    [(3, False, True), (3, True, True), (3, False, False), (1, False, False), (1, False, True)],
)
def test_grouped_and_per_sample_modulated_conv_agree(kernel, up, demodulate):
    x = torch.randn(5, 48, 8, 8)
    weight = torch.randn(40, 48, kernel, kernel)
    styles = torch.randn(5, 48) / math.sqrt(48 * kernel * kernel)
    noise = torch.randn(5, 1, 16 if up else 8, 16 if up else 8)
    bias = torch.randn(40)
    kwargs = dict(
        demodulate=demodulate,
        up=up,
        fir=fir_filter(),
        noise=noise,
        bias_O=bias,
        out_gain=math.sqrt(2),
    )
    grouped = modulated_conv2d(x, weight, styles, fused=True, **kwargs)
    per_sample = modulated_conv2d(x, weight, styles, fused=False, **kwargs)
    assert grouped.shape == (5, 40, 16 if up else 8, 16 if up else 8)
    assert (grouped - per_sample).abs().max().item() < 1e-5


def test_modulated_conv_equals_convolving_with_explicit_per_sample_weights():
    x = torch.randn(3, 16, 8, 8)
    weight = torch.randn(24, 16, 3, 3)
    styles = torch.randn(3, 16)
    y = modulated_conv2d(x, weight, styles)
    for n in range(3):
        w_n = weight * styles[n].reshape(1, 16, 1, 1)
        w_n = w_n / w_n.square().sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
        expected = F.conv2d(x[n : n + 1], w_n, padding=1)
        torch.testing.assert_close(y[n : n + 1], expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- FIR resampling


def filter_same(x: torch.Tensor, f_kk: torch.Tensor) -> torch.Tensor:
    """Reference valid filtering from shifted slices: out[y, x] = sum f[i, j] x[y+i, x+j]."""
    k = f_kk.shape[0]
    H, W = x.shape[2] - k + 1, x.shape[3] - k + 1
    return sum(f_kk[i, j] * x[:, :, i : i + H, j : j + W] for i in range(k) for j in range(k))


def zero_insert(x: torch.Tensor) -> torch.Tensor:
    N, C, H, W = x.shape
    z = x.new_zeros(N, C, 2 * H, 2 * W)
    z[:, :, ::2, ::2] = x
    return z


def test_fir_filter_is_the_normalised_outer_product_of_1_3_3_1():
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    torch.testing.assert_close(fir_filter(), torch.outer(taps, taps) / 64)


def test_upsample_matches_zero_insertion_padding_2_1_and_filter_with_gain_4():
    x = torch.randn(2, 3, 5, 5)
    expected = filter_same(F.pad(zero_insert(x), [2, 1, 2, 1]), fir_filter() * 4)
    torch.testing.assert_close(upsample2d(x, fir_filter()), expected)


def test_downsample_matches_padding_1_filter_and_dropping_every_second_pixel():
    x = torch.randn(2, 3, 8, 8)
    expected = filter_same(F.pad(x, [1, 1, 1, 1]), fir_filter())[:, :, ::2, ::2]
    torch.testing.assert_close(downsample2d(x, fir_filter()), expected)


def test_resampling_keeps_a_constant_image_constant_away_from_the_border():
    x = torch.full((1, 2, 8, 8), 3.0)
    torch.testing.assert_close(
        upsample2d(x, fir_filter())[:, :, 2:-2, 2:-2], torch.full((1, 2, 12, 12), 3.0)
    )
    torch.testing.assert_close(
        downsample2d(x, fir_filter())[:, :, 1:-1, 1:-1], torch.full((1, 2, 2, 2), 3.0)
    )


def test_upsampling_conv_equals_zero_insertion_fir_then_3x3_convolution():
    # The official reference order (upfirdn2d pad (3, 2), then a true convolution) must equal
    # the fused transposed conv + blur the layer runs.
    x = torch.randn(2, 8, 6, 6)
    weight = torch.randn(12, 8, 3, 3)
    styles = torch.ones(2, 8)
    y = modulated_conv2d(x, weight, styles, demodulate=False, up=True, fir=fir_filter())
    upsampled = filter_same(F.pad(zero_insert(x), [3, 2, 3, 2]), fir_filter() * 4)
    expected = F.conv2d(upsampled, weight.flip([2, 3]))
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_downsampling_conv_equals_3x3_convolution_fir_then_dropping_pixels():
    conv = Conv2dLayer(8, 12, 3, down=True)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        y = conv(x)
        full = F.conv2d(F.pad(x, [2, 2, 2, 2]), conv.weight * conv.weight_gain)
        expected = filter_same(full, fir_filter())[:, :, ::2, ::2]
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


FIR_OPS = {  # ours (in the given form, see layers.fir_form), reference built from padding,
    # zero insertion and shifted slices
    "upsample": (
        lambda x, form: upsample2d(x, fir_filter(), kernel=form),
        lambda x: filter_same(F.pad(zero_insert(x), [2, 1, 2, 1]), fir_filter() * 4),
    ),
    "downsample": (
        lambda x, form: downsample2d(x, fir_filter(), kernel=form),
        lambda x: filter_same(F.pad(x, [1, 1, 1, 1]), fir_filter())[:, :, ::2, ::2],
    ),
    "blur-pad2": (
        lambda x, form: blur2d(x, fir_filter(), pad=2, kernel=form),
        lambda x: filter_same(F.pad(x, [2, 2, 2, 2]), fir_filter()),
    ),
    "blur-pad1-gain4": (
        lambda x, form: blur2d(x, fir_filter(), pad=1, gain=4.0, kernel=form),
        lambda x: filter_same(F.pad(x, [1, 1, 1, 1]), fir_filter() * 4),
    ),
}


def fir_penalty_grads(op, shape=(2, 3, 6, 6)):
    """Output, input gradient (as R1 takes it) and the gradients of its squared norm."""
    torch.manual_seed(1)
    x = torch.randn(*shape, requires_grad=True)
    y = op(x)
    r = torch.randn(y.shape).requires_grad_(True)  # not randn_like: layouts differ
    (gx,) = torch.autograd.grad((torch.tanh(y) * r).sum(), x, create_graph=True)
    return (y, gx, *torch.autograd.grad(gx.square().sum(), (x, r)))


# depthwise: the CPU form (_DepthwiseFIR); native: the CUDA form (_FirConv / _FirAdjoint).
@pytest.mark.parametrize("form", ["depthwise", "native"])
@pytest.mark.parametrize("name", FIR_OPS)
def test_fir_filters_have_the_reference_first_and_second_derivatives(name, form):
    op, reference = FIR_OPS[name]

    def ours(x):
        return op(x, form)

    for got, want in zip(fir_penalty_grads(ours), fir_penalty_grads(reference), strict=True):
        torch.testing.assert_close(got, want)
    x64 = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(ours, (x64,))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", FIR_OPS)
def test_triton_fir_kernel_has_the_reference_first_and_second_derivatives(
    name, layout, triton_on_cpu
):
    op, reference = FIR_OPS[name]

    def ours(x):
        x = x.contiguous(memory_format=layout)
        assert fir_form(x, "triton") == "triton"
        y = op(x, "triton")
        assert y.is_contiguous(memory_format=layout)  # the input's layout, without a copy
        return y

    # An odd size too: the upsampling conv hands the blur 2H + 1 pixels.
    for shape in [(2, 3, 6, 6), (1, 2, 7, 7)]:
        got, want = fir_penalty_grads(ours, shape), fir_penalty_grads(reference, shape)
        for got_t, want_t in zip(got, want, strict=True):
            torch.testing.assert_close(got_t, want_t)


def test_triton_fir_kernel_is_used_only_where_it_can_run():
    pytest.importorskip("triton")
    cpu = torch.zeros(1, 1, 4, 4)
    assert fir_form(cpu, "triton") == "depthwise"  # compiled Triton needs a GPU: CPU form
    assert fir_form(cpu, "auto") == "depthwise"
    assert fir_form(cpu, "torch") == "depthwise"
    with pytest.raises(ValueError, match="FIR kernel 'cudnn' is not one of"):
        fir_form(cpu, "cudnn")


def test_auto_picks_triton_on_cuda_only_and_never_the_cpu_interpreter(triton_on_cpu):
    # Under the interpreter the kernels can run on this CPU tensor, but only "triton" asks for
    # them there: "auto" means Triton on CUDA, and the interpreter is a test device.
    cpu = torch.zeros(1, 1, 4, 4)
    assert [fir_form(cpu, k) for k in ("auto", "torch", "triton")] == [
        "depthwise",
        "depthwise",
        "triton",
    ]
    assert [bias_act_form(cpu, k) for k in ("auto", "torch", "triton")] == [
        "torch",
        "torch",
        "triton",
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_runs_the_triton_kernels_on_cuda_and_torch_the_pytorch_forms():
    pytest.importorskip("triton")
    gpu = torch.zeros(1, 1, 4, 4, device="cuda")
    assert [fir_form(gpu, k) for k in ("auto", "torch", "triton")] == ["triton", "native", "triton"]
    assert [bias_act_form(gpu, k) for k in ("auto", "torch", "triton")] == [
        "triton",
        "torch",
        "triton",
    ]


# ---------------------------------------------------------------------------- bias + activation

EPILOGUES = {  # which operands bias_act gets, as each layer type calls it
    "synthesis": dict(scale=True, noise=(2, 1, 5, 5), activation="lrelu", clamp=1.0),
    "synthesis-const-noise": dict(scale=True, noise=(5, 5), activation="lrelu", clamp=None),
    "discriminator": dict(scale=False, noise=None, activation="lrelu", clamp=1.0),
    "torgb": dict(scale=False, noise=None, activation="linear", clamp=1.0),
}


def reference_bias_act(x, scale_NC, noise, bias_C, activation, clamp):
    if scale_NC is not None:
        x = x * scale_NC[:, :, None, None]
    if noise is not None:
        x = x + noise
    x = x + bias_C[None, :, None, None]
    if activation == "lrelu":
        x = F.leaky_relu(x, 0.2)
    return x.clamp(-clamp, clamp) if clamp is not None else x


def epilogue_penalty_grads(op, spec):
    """Output, the gradients of a penalty with respect to every operand (create_graph, as R1
    and path length take them), and the gradients of their squared norm (second order)."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 5, 5) * 2  # about a third of the values beyond the clamp at 1
    operands = [
        x,
        torch.rand(2, 3) + 0.5 if spec["scale"] else None,
        torch.randn(*spec["noise"]) * 0.5 if spec["noise"] else None,
        torch.randn(3) * 0.5,
    ]
    inputs = [t.requires_grad_(True) for t in operands if t is not None]
    y = op(*operands, spec["activation"], spec["clamp"])
    r = torch.randn(y.shape).requires_grad_(True)
    first = torch.autograd.grad((torch.tanh(y) * r).sum(), inputs, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in first), [*inputs, r])
    return (y, *first, *second)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel", ["auto", "triton"])
@pytest.mark.parametrize("name", EPILOGUES)
def test_bias_act_has_the_reference_first_and_second_derivatives(name, kernel, layout, request):
    if kernel == "triton":
        request.getfixturevalue("triton_on_cpu")

    def ours(x, scale_NC, noise, bias_C, activation, clamp):
        x = x.clone(memory_format=layout)  # "auto" works in place on a fresh tensor
        assert bias_act_form(x, kernel) == ("triton" if kernel == "triton" else "torch")
        y = bias_act(
            x,
            scale_NC=scale_NC,
            noise=noise,
            bias_C=bias_C,
            activation=activation,
            clamp=clamp,
            kernel=kernel,
        )
        assert y.is_contiguous(memory_format=layout)
        return y

    got = epilogue_penalty_grads(ours, EPILOGUES[name])
    want = epilogue_penalty_grads(reference_bias_act, EPILOGUES[name])
    for got_t, want_t in zip(got, want, strict=True):
        torch.testing.assert_close(got_t, want_t)


def test_triton_bias_act_is_used_only_where_it_can_run():
    pytest.importorskip("triton")
    cpu = torch.zeros(1, 1, 4, 4)
    assert [bias_act_form(cpu, k) for k in ("auto", "torch", "triton")] == ["torch"] * 3
    with pytest.raises(ValueError, match="bias_act kernel 'cuda' is not one of auto, torch, tri"):
        bias_act_form(cpu, "cuda")
