"""Small StyleGAN2 networks for fast tests (a few thousand parameters, 16 px by default)."""

import pytest
import torch

from sg2dist.config import ModelConfig
from sg2dist.model import build_networks

SMALL = dict(resolution=16, z_dim=32, w_dim=32, map_layers=2, channel_base=256, channel_max=32)


def small_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(**{**SMALL, **overrides})
    cfg.validate()
    return cfg


@pytest.fixture
def small_nets():
    """Factory: small_nets(**ModelConfig overrides) -> (G, D), seeded for repeatability."""

    def build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return build_networks(small_config(**overrides))

    return build
