"""StyleGAN2 generator (config F): mapping network z -> ws, skip-architecture synthesis ws -> image.

Shapes: z [N, z_dim], c [N, c_dim] (float one-hot, [N, 0] when unconditional),
ws [N, num_ws, w_dim], images [N, img_channels, R, R] in about [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from sg2dist.model.layers import (
    LRELU_GAIN,
    FullyConnected,
    conv_layout,
    fir_filter,
    modulated_conv2d,
    normalize_2nd_moment,
    upsample2d,
)

NOISE_MODES = ("random", "const", "none")


def channels_per_resolution(resolution: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // resolution, channel_max)


def fp16_min_resolution(img_resolution: int, num_fp16_res: int) -> int:
    """Blocks at this resolution and above run in fp16 (official scheme; never below 8)."""
    return max(2 ** (int(math.log2(img_resolution)) + 1 - num_fp16_res), 8)


def compute_dtype(use_fp16: bool, param: torch.Tensor) -> torch.dtype:
    """fp16 for the official mixed-precision blocks on CUDA, else the parameters' dtype.

    fp16 convolutions are slow or missing on CPU, so fp16 blocks fall back to fp32 there.
    """
    return torch.float16 if use_fp16 and param.device.type == "cuda" else param.dtype


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs (e.g. from autocast) become fp32; fp32/fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class MappingNetwork(nn.Module):
    """z (and c) -> w through `num_layers` leaky-ReLU FC layers with a low lr multiplier.

    With `num_ws` set, w is broadcast to ws [N, num_ws, w_dim] and `w_avg` (the running
    mean of w, beta 0.995) is kept for truncation. The discriminator reuses this class with
    z_dim=0 to embed labels (num_ws=None, no w_avg).
    """

    w_avg: torch.Tensor  # buffer, registered when num_ws and w_avg_beta are set

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int | None,
        *,
        num_layers: int = 8,
        lr_mult: float = 0.01,
        w_avg_beta: float | None = 0.995,
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.w_avg_beta = w_avg_beta
        embed_features = w_dim if c_dim > 0 else 0
        # Labels enter as a linear embedding, normalised like z and concatenated to it.
        self.embed = FullyConnected(c_dim, embed_features) if c_dim > 0 else None
        features = [z_dim + embed_features] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            FullyConnected(features[i], features[i + 1], activation="lrelu", lr_mult=lr_mult)
            for i in range(num_layers)
        )
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self,
        z: torch.Tensor | None,
        c: torch.Tensor,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        update_emas: bool = False,
    ) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            assert z is not None  # only the discriminator's label mapping (z_dim=0) has no z
            parts.append(normalize_2nd_moment(at_least_fp32(z)))
        if self.embed is not None:
            parts.append(normalize_2nd_moment(self.embed(at_least_fp32(c))))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for layer in self.layers:
            x = layer(x)

        if update_emas and self.w_avg_beta is not None:
            with torch.no_grad():
                tracked = (
                    x.detach().to(self.w_avg.dtype).mean(dim=0).lerp(self.w_avg, self.w_avg_beta)
                )
                # A diverged batch must not poison the truncation centre; where() needs no sync.
                self.w_avg.copy_(torch.where(tracked.isfinite(), tracked, self.w_avg))
        if self.num_ws is None:
            return x
        # A real copy per layer, not an expanded view: callers may write into ws.
        ws = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            ws = self.truncate(ws, truncation_psi, truncation_cutoff)
        return ws

    def truncate(self, ws: torch.Tensor, psi: float, cutoff: int | None) -> torch.Tensor:
        """Pull ws towards w_avg, w_avg + psi (w - w_avg), in the first `cutoff` layers only."""
        cutoff = self.num_ws if cutoff is None else cutoff
        truncated = self.w_avg.to(ws.dtype).lerp(ws[:, :cutoff], psi)
        return torch.cat([truncated, ws[:, cutoff:]], dim=1)


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x upsampling) + per-pixel noise + bias + leaky ReLU."""

    noise_const: torch.Tensor  # buffers
    fir: torch.Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        *,
        up: bool = False,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resolution = resolution
        self.up = up
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 3, 3]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn([resolution, resolution]))
        self.register_buffer("fir", fir_filter(), persistent=False)
        self.fir_kernel = "auto"  # `use_kernels_`
        self.bias_act_kernel = "auto"  # `use_kernels_`
        self.memory_format = "auto"  # `use_conv_layout_`

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: str = "random",
        fused_modconv: bool = False,
    ) -> torch.Tensor:
        styles = self.affine(w)
        # The activation gain rides on the demodulation scale, the noise and the bias:
        # all three are added before the (positively homogeneous) leaky ReLU.
        noise = None
        if noise_mode == "random":
            noise = torch.randn(
                [x.shape[0], 1, self.resolution, self.resolution], device=x.device, dtype=x.dtype
            )
            noise = noise * (self.noise_strength * LRELU_GAIN).to(x.dtype)
        elif noise_mode == "const":
            noise = self.noise_const * (self.noise_strength * LRELU_GAIN)
        return modulated_conv2d(
            x,
            self.weight,
            styles,
            out_gain=LRELU_GAIN,
            up=self.up,
            fir=self.fir,
            noise=noise,
            bias_O=self.bias * LRELU_GAIN,
            activation="lrelu",
            clamp=self.conv_clamp,
            fused=fused_modconv,
            fir_kernel=self.fir_kernel,
            bias_act_kernel=self.bias_act_kernel,
            memory_format=self.memory_format,
        )

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, res={self.resolution}, up={self.up}"


class ToRGB(nn.Module):
    """Modulated 1x1 conv to image channels, no demodulation, linear."""

    def __init__(
        self, in_channels: int, img_channels: int, w_dim: int, *, conv_clamp: float | None = None
    ):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn([img_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([img_channels]))
        self.weight_gain = 1.0 / math.sqrt(in_channels)
        self.bias_act_kernel = "auto"  # `use_kernels_`

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = False):
        styles = self.affine(w) * self.weight_gain
        return modulated_conv2d(
            x,
            self.weight,
            styles,
            demodulate=False,
            bias_O=self.bias,
            clamp=self.conv_clamp,
            fused=fused_modconv,
            bias_act_kernel=self.bias_act_kernel,
        )


class SynthesisBlock(nn.Module):
    """One resolution: (const 4x4 | conv0 with 2x up), conv1, toRGB added to the upsampled image."""

    fir: torch.Tensor  # buffer

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        *,
        use_fp16: bool = False,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resolution = resolution
        self.use_fp16 = use_fp16
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
            self.conv0 = None
        else:
            self.conv0 = SynthesisLayer(
                in_channels, out_channels, w_dim, resolution, up=True, conv_clamp=conv_clamp
            )
        self.conv1 = SynthesisLayer(
            out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp
        )
        self.torgb = ToRGB(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2
        self.register_buffer("fir", fir_filter(), persistent=False)
        self.fir_kernel = "auto"  # `use_kernels_`
        self.memory_format = "auto"  # `use_conv_layout_`

    def forward(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        ws: torch.Tensor,
        noise_mode: str = "random",
        fused_modconv: bool = False,
    ):
        """ws [N, num_conv + 1, w_dim] -> (features [N, C, R, R], img [N, img_channels, R, R]).

        The image stays in the dtype of ws (fp32) even when the block runs in fp16.
        """
        dtype = compute_dtype(self.use_fp16, self.conv1.weight)
        if self.conv0 is None:
            x = self.const.to(dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            x = conv_layout(x, self.memory_format)
            x = self.conv1(x, ws[:, 0], noise_mode, fused_modconv)
        else:
            assert x is not None  # every block but the first (conv0 None) gets features
            x = self.conv0(x.to(dtype), ws[:, 0], noise_mode, fused_modconv)
            x = self.conv1(x, ws[:, 1], noise_mode, fused_modconv)
        y = self.torgb(x, ws[:, self.num_conv], fused_modconv).to(ws.dtype)
        # Not in place: the Triton epilogue saved y (its output) for the backward.
        img = y if img is None else y + upsample2d(img, self.fir, kernel=self.fir_kernel)
        return x, img


class SynthesisNetwork(nn.Module):
    """ws -> image: a block per resolution 4, 8, ..., img_resolution (skip architecture)."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        *,
        channel_base: int = 32768,
        channel_max: int = 512,
        num_fp16_res: int = 0,
        conv_clamp: float | None = None,
        fused_modconv: bool = False,
    ):
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.fused_modconv = fused_modconv
        resolutions = [2**i for i in range(2, int(math.log2(img_resolution)) + 1)]
        fp16_from = fp16_min_resolution(img_resolution, num_fp16_res)
        self.blocks = nn.ModuleDict()
        for res in resolutions:
            in_channels = (
                channels_per_resolution(res // 2, channel_base, channel_max) if res > 4 else 0
            )
            self.blocks[f"b{res}"] = SynthesisBlock(
                in_channels,
                channels_per_resolution(res, channel_base, channel_max),
                w_dim,
                res,
                img_channels,
                use_fp16=num_fp16_res > 0 and res >= fp16_from,
                conv_clamp=conv_clamp,
            )
        # Each block's toRGB shares its w with the next block's first conv.
        blocks = cast("Iterable[SynthesisBlock]", self.blocks.values())
        self.num_ws = sum(block.num_conv for block in blocks) + 1

    def forward(
        self, ws: torch.Tensor, noise_mode: str = "random", fused_modconv: bool | None = None
    ) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode '{noise_mode}' is not one of {', '.join(NOISE_MODES)}")
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(
                f"ws has shape {list(ws.shape)}; expected [N, {self.num_ws}, {self.w_dim}]"
            )
        fused = self.fused_modconv if fused_modconv is None else fused_modconv
        ws = at_least_fp32(ws)
        x = img = None
        w_idx = 0
        for block in cast("Iterable[SynthesisBlock]", self.blocks.values()):
            block_ws = ws.narrow(1, w_idx, block.num_conv + 1)
            x, img = block(x, img, block_ws, noise_mode, fused)
            w_idx += block.num_conv
        assert img is not None  # there is always a 4x4 block
        return img.contiguous()  # callers get a plain NCHW image


class Generator(nn.Module):
    """G(z, c) -> image: mapping network, optional style mixing, synthesis network."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        *,
        map_layers: int = 8,
        map_lr_mult: float = 0.01,
        w_avg_beta: float = 0.995,
        channel_base: int = 32768,
        channel_max: int = 512,
        num_fp16_res: int = 0,
        conv_clamp: float | None = None,
        fused_modconv: bool = False,
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(
            w_dim,
            img_resolution,
            img_channels,
            channel_base=channel_base,
            channel_max=channel_max,
            num_fp16_res=num_fp16_res,
            conv_clamp=conv_clamp,
            fused_modconv=fused_modconv,
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(
            z_dim,
            c_dim,
            w_dim,
            self.num_ws,
            num_layers=map_layers,
            lr_mult=map_lr_mult,
            w_avg_beta=w_avg_beta,
        )

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: str = "random",
        update_emas: bool = False,
        style_mixing_prob: float = 0.0,
        return_ws: bool = False,
        fused_modconv: bool | None = None,
    ):
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff, update_emas)
        if style_mixing_prob > 0:
            ws = self.mix_styles(ws, z, c, style_mixing_prob, truncation_psi, truncation_cutoff)
        # fp32 ws: wrappers that cast outputs to fp32 (accelerate under autocast) then return
        # this very tensor, so path-length gradients w.r.t. the returned ws reach the graph.
        ws = at_least_fp32(ws)
        img = self.synthesis(ws, noise_mode, fused_modconv)
        return (img, ws) if return_ws else img

    def mix_styles(
        self,
        ws: torch.Tensor,
        z: torch.Tensor,
        c: torch.Tensor,
        prob: float,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
    ):
        """With probability `prob`, ws after a random crossover layer in [1, num_ws) come
        from the mapping of a second random z (the same for the whole batch).

        The draws use torch's global CPU generator, so seeding torch makes them repeatable,
        and deciding on the CPU avoids a device sync.
        """
        if torch.rand([]).item() >= prob:
            return ws
        crossover = int(torch.randint(1, self.num_ws, []).item())
        ws2 = self.mapping(torch.randn_like(z), c, truncation_psi, truncation_cutoff)
        return torch.cat([ws[:, :crossover], ws2[:, crossover:]], dim=1)
