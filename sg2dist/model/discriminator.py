"""StyleGAN2 residual discriminator (config F): image [N, C, R, R] and labels c -> logits [N, 1]."""

from __future__ import annotations

import math

import torch
from torch import nn

from sg2dist.model.generator import (
    MappingNetwork,
    channels_per_resolution,
    compute_dtype,
    fp16_min_resolution,
)
from sg2dist.model.layers import Conv2dLayer, FullyConnected, conv_layout

SKIP_GAIN = math.sqrt(0.5)  # residual sum of two unit-variance branches stays unit variance
LABEL_MAPPING_LAYERS = 8  # the official label mapping of D keeps the MappingNetwork default


class DiscriminatorBlock(nn.Module):
    """Residual block at `resolution`: two 3x3 convs (the second downsamples 2x) plus a
    downsampling 1x1 skip, both branches scaled by sqrt(1/2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resolution: int,
        *,
        use_fp16: bool = False,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resolution = resolution
        self.use_fp16 = use_fp16
        self.conv0 = Conv2dLayer(
            in_channels, in_channels, 3, activation="lrelu", conv_clamp=conv_clamp
        )
        self.conv1 = Conv2dLayer(
            in_channels, out_channels, 3, activation="lrelu", down=True, conv_clamp=conv_clamp
        )
        self.skip = Conv2dLayer(in_channels, out_channels, 1, bias=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(self.use_fp16, self.conv0.weight))
        y = self.skip(x, gain=SKIP_GAIN)
        x = self.conv1(self.conv0(x), gain=SKIP_GAIN)
        return y.add_(x)


class MinibatchStd(nn.Module):
    """Appends `num_features` channels holding the std of features across groups of samples.

    Groups follow the official layout: with G = min(group_size, N), sample n belongs to group
    n mod (N / G), so N must be divisible by G.
    """

    def __init__(self, group_size: int, num_features: int = 1):
        super().__init__()
        self.group_size = group_size
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        G = min(self.group_size, N)
        F = self.num_features
        if N % G != 0:
            raise ValueError(
                f"minibatch-std group size {G} does not divide the batch of {N}; "
                "use a batch that is a multiple of model.mbstd_group"
            )
        y = x.reshape(G, -1, F, C // F, H, W)  # [G, n, F, c, H, W]
        y = (y - y.mean(dim=0)).square().mean(dim=0)  # variance over each group
        y = (y + 1e-8).sqrt().mean(dim=(2, 3, 4))  # [n, F]: mean std over channels and pixels
        y = y.reshape(-1, F, 1, 1).repeat(G, 1, H, W)  # [N, F, H, W]
        return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_features={self.num_features}"


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: minibatch std, 3x3 conv, FC, output FC (projected onto cmap when conditional)."""

    def __init__(
        self,
        in_channels: int,
        cmap_dim: int,
        *,
        mbstd_group: int = 4,
        mbstd_features: int = 1,
        conv_clamp: float | None = None,
        resolution: int = 4,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.mbstd = MinibatchStd(mbstd_group, mbstd_features) if mbstd_features > 0 else None
        self.conv = Conv2dLayer(
            in_channels + mbstd_features, in_channels, 3, activation="lrelu", conv_clamp=conv_clamp
        )
        self.fc = FullyConnected(in_channels * resolution**2, in_channels, activation="lrelu")
        self.out = FullyConnected(in_channels, cmap_dim if cmap_dim > 0 else 1)

    def forward(self, x: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:
        x = x.to(self.conv.weight.dtype)  # the head always runs in the parameters' precision
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.out(self.fc(self.conv(x).flatten(1)))
        if self.cmap_dim > 0:
            # Projection discriminator: score = <out, embedding of c> / sqrt(cmap_dim).
            assert cmap is not None  # the label mapping exists when cmap_dim > 0
            x = (x * cmap).sum(dim=1, keepdim=True) * (1.0 / math.sqrt(self.cmap_dim))
        return x


class Discriminator(nn.Module):
    """D(img, c) -> logits [N, 1]: fromRGB at the top resolution, residual blocks down to 4x4,
    then the epilogue (projection onto the label mapping when c_dim > 0)."""

    def __init__(
        self,
        c_dim: int,
        img_resolution: int,
        img_channels: int,
        *,
        channel_base: int = 32768,
        channel_max: int = 512,
        mbstd_group: int = 4,
        mbstd_features: int = 1,
        num_fp16_res: int = 0,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        fp16_from = fp16_min_resolution(img_resolution, num_fp16_res)
        self.top_fp16 = num_fp16_res > 0 and img_resolution >= fp16_from

        def channels(res: int) -> int:
            return channels_per_resolution(res, channel_base, channel_max)

        self.fromrgb = Conv2dLayer(
            img_channels, channels(img_resolution), 1, activation="lrelu", conv_clamp=conv_clamp
        )
        self.blocks = nn.ModuleDict()
        res = img_resolution
        while res > 4:
            self.blocks[f"b{res}"] = DiscriminatorBlock(
                channels(res),
                channels(res // 2),
                res,
                use_fp16=num_fp16_res > 0 and res >= fp16_from,
                conv_clamp=conv_clamp,
            )
            res //= 2
        cmap_dim = channels(4) if c_dim > 0 else 0
        self.mapping = None
        if c_dim > 0:
            self.mapping = MappingNetwork(
                0, c_dim, cmap_dim, None, num_layers=LABEL_MAPPING_LAYERS, w_avg_beta=None
            )
        self.epilogue = DiscriminatorEpilogue(
            channels(4),
            cmap_dim,
            mbstd_group=mbstd_group,
            mbstd_features=mbstd_features,
            conv_clamp=conv_clamp,
        )
        self.memory_format = "auto"  # `use_conv_layout_`

    def layers_from_top(self) -> list[nn.Module]:
        """The layers Freeze-D counts, in the official order: fromRGB, then conv0, conv1 and
        skip of each block from the top resolution down (the epilogue and the label mapping
        are never frozen)."""
        layers: list[nn.Module] = [self.fromrgb]
        for block in self.blocks.values():
            assert isinstance(block, DiscriminatorBlock)
            layers += [block.conv0, block.conv1, block.skip]
        return layers

    def forward(self, img: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        img = img.to(compute_dtype(self.top_fp16, self.fromrgb.weight))
        x = self.fromrgb(conv_layout(img, self.memory_format))
        for block in self.blocks.values():
            x = block(x)
        cmap = self.mapping(None, c) if self.mapping is not None else None
        return self.epilogue(x, cmap)
