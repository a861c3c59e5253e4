"""The fast-double-backward convolutions equal torch's own, to the second derivative."""

import pytest
import torch
import torch.nn.functional as F

from sg2dist.model.convolution import conv2d, conv_transpose2d

# (transposed, stride, padding, groups): 3x3 'same', D's stride-2 conv, grouped, G's up conv.
SPECS = [(False, 1, 1, 1), (False, 2, 0, 1), (False, 1, 1, 2), (True, 2, 0, 1), (True, 2, 0, 2)]


def make(spec, dtype=torch.float64):
    transposed, stride, padding, groups = spec
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7, dtype=dtype, requires_grad=True)
    shape = (4, 6 // groups, 3, 3) if transposed else (6, 4 // groups, 3, 3)
    w = torch.randn(shape, dtype=dtype, requires_grad=True)
    b = torch.randn(6, dtype=dtype, requires_grad=True)
    kwargs = dict(stride=stride, padding=padding, groups=groups)
    if transposed:
        return (
            x,
            w,
            b,
            lambda x, w, b: conv_transpose2d(x, w, b, **kwargs),
            lambda x, w, b: F.conv_transpose2d(x, w, b, **kwargs),
        )
    return (
        x,
        w,
        b,
        lambda x, w, b: conv2d(x, w, b, **kwargs),
        lambda x, w, b: F.conv2d(x, w, b, **kwargs),
    )


@pytest.mark.parametrize("spec", SPECS)
def test_output_and_first_derivatives_equal_torch_conv(spec):
    x, w, b, ours, reference = make(spec)
    y = ours(x, w, b)
    torch.testing.assert_close(y, reference(x, w, b))
    r = torch.randn_like(y)
    grads = torch.autograd.grad((y * r).sum(), (x, w, b))
    expected = torch.autograd.grad((reference(x, w, b) * r).sum(), (x, w, b))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("spec", SPECS)
def test_gradient_penalty_derivatives_equal_torch_double_backward(spec):
    # An R1-style penalty: |d<conv(x, w), r>/dx|^2, differentiated w.r.t. w, x and r.
    def penalty_grads(conv):
        x, w, b, ours, reference = make(spec)
        fn = ours if conv == "ours" else reference
        y = fn(x, w, b)
        r = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape).requires_grad_(True)
        (gx,) = torch.autograd.grad((torch.tanh(y) * r).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (w, x, r, b))

    for got, want in zip(penalty_grads("ours"), penalty_grads("reference"), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("spec", SPECS[:2] + SPECS[3:4])
def test_second_derivatives_pass_gradgradcheck(spec):
    x, w, b, ours, _ = make(spec)
    assert torch.autograd.gradgradcheck(ours, (x, w, b), fast_mode=True)


def test_autocast_runs_forward_and_double_backward_in_the_autocast_dtype():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv2d(x, w, padding=1)
        (gx,) = torch.autograd.grad(y.float().sum(), x, create_graph=True)
    assert y.dtype == torch.bfloat16
    gx.float().square().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
