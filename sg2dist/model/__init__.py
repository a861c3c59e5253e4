"""StyleGAN2 networks (paper config F): `build_networks(model_cfg) -> (G, D)`.

G(z, c, truncation_psi=1, truncation_cutoff=None, noise_mode="random", update_emas=False,
style_mixing_prob=0.0, return_ws=False) -> img [N, C, R, R] (or (img, ws)); D(img, c) -> [N, 1].
Build on `torch.device("meta")` to count parameters without allocating memory:

    with torch.device("meta"):
        G, D = build_networks(cfg.model)
"""

from __future__ import annotations

from sg2dist.config import KERNEL_KEYS, ConfigError, ModelConfig
from sg2dist.model.discriminator import Discriminator
from sg2dist.model.generator import Generator
from sg2dist.model.layers import use_kernels_

__all__ = ["Discriminator", "Generator", "build_networks", "count_params"]


def build_networks(model_cfg: ModelConfig) -> tuple[Generator, Discriminator]:
    res = model_cfg.resolution
    if min(model_cfg.channel_base // res, model_cfg.channel_max) < 1:
        raise ConfigError(
            f"model.channel_base={model_cfg.channel_base} leaves no channels at {res} px "
            f"(channels = min(channel_base / resolution, channel_max)); "
            f"set model.channel_base to at least {res}"
        )
    G = Generator(
        z_dim=model_cfg.z_dim,
        c_dim=model_cfg.c_dim,
        w_dim=model_cfg.w_dim,
        img_resolution=model_cfg.resolution,
        img_channels=model_cfg.img_channels,
        map_layers=model_cfg.map_layers,
        map_lr_mult=model_cfg.map_lr_mult,
        w_avg_beta=model_cfg.w_avg_beta,
        channel_base=model_cfg.channel_base,
        channel_max=model_cfg.channel_max,
        num_fp16_res=model_cfg.num_fp16_res,
        conv_clamp=model_cfg.conv_clamp,
        fused_modconv=model_cfg.fused_modconv,
    )
    D = Discriminator(
        c_dim=model_cfg.c_dim,
        img_resolution=model_cfg.resolution,
        img_channels=model_cfg.img_channels,
        channel_base=model_cfg.channel_base,
        channel_max=model_cfg.channel_max,
        mbstd_group=model_cfg.mbstd_group,
        mbstd_features=model_cfg.mbstd_features,
        num_fp16_res=model_cfg.num_fp16_res,
        conv_clamp=model_cfg.conv_clamp,
    )
    kernels = {key: getattr(model_cfg, key) for key in KERNEL_KEYS}
    return use_kernels_(G, **kernels), use_kernels_(D, **kernels)


def count_params(module) -> int:
    """Trainable parameters (what the paper and the official code report)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
