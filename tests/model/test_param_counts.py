"""Trainable parameter counts match the official stylegan2-ada-pytorch figures exactly."""

import pytest
import torch

from sg2dist.config import ModelConfig
from sg2dist.model import build_networks, count_params


def build_on_meta(**overrides):
    with torch.device("meta"):
        return build_networks(ModelConfig(**overrides))


@pytest.mark.parametrize(
    ("resolution", "channel_base", "g_params", "d_params"),
    [
        (1024, 32768, 30_370_060, 29_012_513),  # config F
        (256, 16384, 24_767_458, 24_001_089),  # paper256
        (256, 32768, 30_034_338, 28_864_129),
    ],
)
def test_param_counts_match_the_official_figures(resolution, channel_base, g_params, d_params):
    G, D = build_on_meta(resolution=resolution, channel_base=channel_base, channel_max=512)
    assert count_params(G) == g_params
    assert count_params(D) == d_params


def test_config_f_splits_into_the_official_mapping_and_synthesis_counts():
    G, _ = build_on_meta()
    assert count_params(G.mapping) == 2_101_248
    assert count_params(G.synthesis) == 28_268_812
    assert G.num_ws == 18


def test_buffers_are_not_counted_as_parameters():
    G, _ = build_on_meta(resolution=64, channel_base=1024, channel_max=32)
    buffer_names = {name for name, _ in G.named_buffers()}
    assert "mapping.w_avg" in buffer_names
    assert any(name.endswith("noise_const") for name in buffer_names)
    assert not buffer_names & {name for name, _ in G.named_parameters()}
