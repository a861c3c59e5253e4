"""What a run is built from (sg2dist/train/build.py): settings that need a package say so."""

import sys

import pytest
import torch
from support.tiny import tiny_model_sets

from sg2dist.config import config_from_dict, load_config
from sg2dist.errors import UserError
from sg2dist.model.layers import fir_form
from sg2dist.train.build import build_nets, make_accelerator


@pytest.fixture
def without_triton(monkeypatch):
    """`triton` is not installed (as on macOS or Windows): importing it fails."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "sg2dist.model.fir_triton", raising=False)


def test_training_with_the_triton_fir_kernel_without_triton_is_one_error(without_triton):
    cfg = load_config(None, [*tiny_model_sets(), "model.fir_kernel=triton"])
    with pytest.raises(UserError, match="model.fir_kernel=triton needs the `triton` package"):
        build_nets(cfg, make_accelerator("no"))


def test_a_model_trained_with_the_triton_fir_kernel_loads_and_runs_without_triton(
    without_triton,
):
    trained = load_config(None, [*tiny_model_sets(), "model.fir_kernel=triton"])
    cfg = config_from_dict(trained.to_dict())
    assert cfg.model.fir_kernel == "triton"
    assert fir_form(torch.zeros(1, 2, 4, 4), cfg.model.fir_kernel) == "depthwise"
