"""What a run is built from (sg2dist/train/build.py): settings that need a package say so."""

import sys

import pytest
import torch
from support.tiny import tiny_model_sets

from sg2dist.config import config_from_dict, load_config
from sg2dist.errors import UserError
from sg2dist.model import build_networks
from sg2dist.model.layers import bias_act_form, fir_form
from sg2dist.train.build import build_nets, make_accelerator


@pytest.fixture
def without_triton(monkeypatch):
    """`triton` is not installed (as on macOS or Windows): importing it fails."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "sg2dist.model.triton_kernels", raising=False)


@pytest.mark.parametrize("key", ["fir_kernel", "bias_act_kernel"])
def test_training_with_a_triton_kernel_without_triton_is_one_error(key, without_triton):
    cfg = load_config(None, [*tiny_model_sets(), f"model.{key}=triton"])
    with pytest.raises(UserError, match=f"model.{key}=triton needs the `triton` package"):
        build_nets(cfg, make_accelerator("no"))


def test_a_model_trained_with_triton_kernels_loads_and_runs_without_triton(without_triton):
    kernels = ["model.fir_kernel=triton", "model.bias_act_kernel=triton"]
    trained = load_config(None, [*tiny_model_sets(), *kernels])
    cfg = config_from_dict(trained.to_dict())
    assert (cfg.model.fir_kernel, cfg.model.bias_act_kernel) == ("triton", "triton")
    x = torch.zeros(1, 2, 4, 4)
    assert fir_form(x, cfg.model.fir_kernel) == "depthwise"
    assert bias_act_form(x, cfg.model.bias_act_kernel) == "torch"
    G, D = build_networks(cfg.model)
    img = G(torch.randn(2, G.z_dim), torch.zeros(2, 0))
    assert torch.isfinite(D(img, torch.zeros(2, 0))).all()
