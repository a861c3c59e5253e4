"""One training step (sg2dist/train/step.py): no host reads of device values, the
device-side skip of steps with non-finite gradients, the same result in either memory format."""

from __future__ import annotations

import collections
import copy
import sys
from collections.abc import Iterator

import pytest
import torch
from support.step import tiny_step_parts, tiny_step_reals

from sg2dist.train.step import train_step

HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")


@pytest.fixture
def host_reads(monkeypatch) -> Iterator[collections.Counter]:
    """(method, calling function) of every Tensor -> Python value conversion while active."""
    calls: collections.Counter = collections.Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def recorded(self, *args, _name=name, _original=original, **kwargs):
            calls[(_name, sys._getframe(1).f_code.co_name)] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recorded)
    yield calls


def test_a_training_step_reads_no_device_value_on_the_host(host_reads):
    nets, ctx, state = tiny_step_parts()
    for step in range(4):  # every phase, path length and R1 included
        train_step(ctx, nets, state, step, tiny_step_reals(step))
    # The only reads are the style-mixing coin flips, drawn from torch's CPU generator on
    # purpose (they never wait for a GPU); everything else stays on the device.
    assert set(host_reads) == {("item", "mix_styles")}


def test_non_finite_gradients_skip_the_update_on_the_device_and_count_it():
    nets, ctx, state = tiny_step_parts()
    train_step(ctx, nets, state, 1, tiny_step_reals(0))  # a normal step: Adam has state to compare
    D_before = copy.deepcopy(nets.D_net.state_dict())
    D_opt_before = copy.deepcopy(nets.D_opt.state_dict()["state"])
    G_before = copy.deepcopy(nets.G_net.state_dict())
    poisoned = [(torch.full((4, 3, 16, 16), float("nan")), torch.zeros(4, 0))]

    train_step(ctx, nets, state, 3, poisoned)  # NaN reals: D's gradients are NaN, G's are not
    for name, value in nets.D_net.state_dict().items():
        assert torch.equal(value, D_before[name]), name
    for index, moments in nets.D_opt.state_dict()["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, D_opt_before[index][key]), (index, key)
    assert any(not torch.equal(v, G_before[k]) for k, v in nets.G_net.state_dict().items())
    assert int(state.skipped_steps) == 1 and int(state.nonfinite_in_row) == 1

    train_step(ctx, nets, state, 5, tiny_step_reals(1))
    assert int(state.skipped_steps) == 1 and int(state.nonfinite_in_row) == 0
    assert any(not torch.equal(v, D_before[k]) for k, v in nets.D_net.state_dict().items())


def test_training_in_nchw_on_cpu_matches_the_channels_last_default():
    weights = []
    for memory_format in ("auto", "contiguous"):
        nets, ctx, state = tiny_step_parts(f"train.memory_format={memory_format}")
        conv_weight = nets.G_net.synthesis.blocks["b16"].conv1.weight
        assert conv_weight.is_contiguous() == (memory_format == "contiguous")
        for step in range(4):  # every phase, path length and R1 included
            train_step(ctx, nets, state, step, tiny_step_reals(step))
        weights.append(
            {f"{net}.{name}": value for net in ("G_net", "D_net")
             for name, value in getattr(nets, net).state_dict().items()}
        )  # fmt: skip
    channels_last, nchw = weights
    for name, value in channels_last.items():
        torch.testing.assert_close(nchw[name], value, rtol=1e-4, atol=1e-5, msg=name)
