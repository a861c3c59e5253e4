"""Small StyleGAN2 networks for fast tests (a few thousand parameters, 16 px by default), and
the Triton FIR kernel made runnable on CPU."""

import importlib
import sys

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


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """`sg2dist.model.triton_kernels` imported under Triton's interpreter for one test, so its
    kernel runs on CPU tensors (slowly, with the same arithmetic). Triton picks compiled or
    interpreted when a kernel is defined, hence the fresh import; the next test gets the
    module as it was."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(sys.modules, "sg2dist.model.triton_kernels", raising=False)
    module = importlib.import_module("sg2dist.model.triton_kernels")
    assert module.INTERPRETED
    yield module
    # Forget the interpreted module, also as the package's attribute, which `from sg2dist.model
    # import triton_kernels` would return without looking at sys.modules.
    sys.modules.pop("sg2dist.model.triton_kernels", None)
    vars(sys.modules["sg2dist.model"]).pop("triton_kernels", None)
