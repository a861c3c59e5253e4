"""Small StyleGAN2 networks for fast tests (a few thousand parameters, 16 px by default)."""

import pytest
import torch
from support.tiny import tiny_model_config

from sg2dist.model import build_networks


@pytest.fixture
def small_nets():
    """Factory: small_nets(**ModelConfig overrides) -> (G, D), seeded for repeatability;
    overrides apply to support.tiny.TINY_MODEL."""

    def build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return build_networks(tiny_model_config(**overrides))

    return build
