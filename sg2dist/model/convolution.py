"""2D convolutions whose double backward runs on the ordinary (fast) convolution kernels.

R1 and path length regularisation differentiate a gradient (`autograd.grad(...,
create_graph=True)`), so every convolution is differentiated twice. Autograd's built-in
second derivative of a convolution computes its weight part as a convolution whose kernel
is a whole gradient image, dilated by the stride; cuDNN runs that shape very slowly (on an
H100 it made the regularisation phases 20-50x slower than the main phases).

Here the first backward is written with ordinary convolution ops instead:
- input gradient: the adjoint convolution (conv <-> transposed conv, same weight);
- weight gradient: `_WeightGrad`, one `convolution_backward` call whose own backward is
  again a convolution and an adjoint convolution.
So the second backward runs the same kernels as the first. A plain `backward()` (no
create_graph) takes one fused `convolution_backward` call, like autograd's own.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd import Function


class ConvSpec(NamedTuple):
    transposed: bool
    stride: int
    padding: int
    output_padding: int
    groups: int


def conv2d(x, weight, bias=None, *, stride: int = 1, padding: int = 0, groups: int = 1):
    """F.conv2d with a fast double backward."""
    return _apply(x, weight, bias, ConvSpec(False, stride, padding, 0, groups))


def conv_transpose2d(
    x,
    weight,
    bias=None,
    *,
    stride: int = 1,
    padding: int = 0,
    output_padding: int = 0,
    groups: int = 1,
):
    """F.conv_transpose2d (weight [in, out / groups, k, k]) with a fast double backward."""
    return _apply(x, weight, bias, ConvSpec(True, stride, padding, output_padding, groups))


def _apply(x, weight, bias, spec: ConvSpec):
    # Autocast would cast inside F.conv2d but not the tensors the backward sees; cast them
    # up front so forward and backward agree on one dtype.
    device_type = x.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(
        device_type
    )
    dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    bias = bias.to(dtype) if bias is not None else None
    return _Convolution.apply(x.to(dtype), weight.to(dtype), bias, spec)


def _forward(x, weight, bias, spec: ConvSpec):
    if spec.transposed:
        return F.conv_transpose2d(
            x, weight, bias, spec.stride, spec.padding, spec.output_padding, spec.groups
        )
    return F.conv2d(x, weight, bias, spec.stride, spec.padding, 1, spec.groups)


def _input_grad(grad_out, weight, spec: ConvSpec, input_shape):
    """The adjoint of x -> conv(x, weight): maps an output gradient to the input gradient."""
    if spec.transposed:
        return F.conv2d(grad_out, weight, None, spec.stride, spec.padding, 1, spec.groups)
    # A strided convolution drops trailing rows/columns; output_padding restores them.
    k = weight.shape[-1]
    output_padding = [
        input_shape[d] - ((grad_out.shape[d] - 1) * spec.stride - 2 * spec.padding + k)
        for d in (2, 3)
    ]
    return F.conv_transpose2d(
        grad_out, weight, None, spec.stride, spec.padding, output_padding, spec.groups
    )


def _convolution_backward(grad_out, x, weight, spec: ConvSpec, output_mask, bias_sizes=None):
    return torch.ops.aten.convolution_backward(
        grad_out,
        x,
        weight,
        bias_sizes,
        [spec.stride] * 2,
        [spec.padding] * 2,
        [1, 1],
        spec.transposed,
        [spec.output_padding] * 2,
        spec.groups,
        output_mask,
    )


class _Convolution(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: ConvSpec):
        ctx.save_for_backward(x, weight)
        ctx.spec = spec
        return _forward(x, weight, bias, spec)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        spec = ctx.spec
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not torch.is_grad_enabled():  # plain backward: no graph to build, one fused call
            grad_x, grad_w, grad_b = _convolution_backward(
                grad_out,
                x,
                weight,
                spec,
                [need_x, need_w, need_b],
                bias_sizes=[weight.shape[1] * spec.groups if spec.transposed else weight.shape[0]],
            )
            return grad_x, grad_w, grad_b, None
        grad_x = _input_grad(grad_out, weight, spec, x.shape) if need_x else None
        grad_w = _WeightGrad.apply(grad_out, x, weight, spec) if need_w else None
        grad_b = grad_out.sum(dim=(0, 2, 3)) if need_b else None
        return grad_x, grad_w, grad_b, None


class _WeightGrad(Function):
    """grad_w(grad_out, x), linear in each argument; its backward is two ordinary convolutions."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, spec: ConvSpec):
        ctx.save_for_backward(grad_out, x)
        ctx.spec = spec
        return _convolution_backward(grad_out, x, weight, spec, [False, True, False])[1]

    @staticmethod
    def backward(ctx, grad_grad_w):
        grad_out, x = ctx.saved_tensors
        spec = ctx.spec
        # <grad_grad_w, grad_w(g, x)> = <conv(x, grad_grad_w), g>: differentiate both sides.
        d_grad_out = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad_out = _forward(x, grad_grad_w, None, spec)
        if ctx.needs_input_grad[1]:
            d_x = _input_grad(grad_out, grad_grad_w, spec, x.shape)
        return d_grad_out, d_x, None, None
