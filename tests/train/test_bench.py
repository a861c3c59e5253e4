"""`sg2dist bench step`: timed cycles, with --profile the per-phase table and the profiler's
operator table, and with --compile every main-phase network call compiled."""

from __future__ import annotations

import contextlib
import re
from collections import Counter

import torch
from support.step import tiny_step_parts, tiny_step_reals

from sg2dist import cli
from sg2dist.train.bench import compile_main_phases
from sg2dist.train.step import train_step

TINY_BENCH = ["--resolution", "8", "--batch", "4", "--channel-base", "64", "--channel-max", "16"]


def test_bench_step_profile_prints_every_phase_with_its_calls_per_cycle(capsys):
    argv = ["bench", "step", *TINY_BENCH, "--map-layers", "1", "--cycles", "1", "--profile"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    figures = dict(re.findall(r"(sec_per_iter|img_per_s) ([\d.]+)", out))
    assert float(figures["sec_per_iter"]) > 0 and float(figures["img_per_s"]) > 0
    rows = {
        name: (float(ms), int(calls))
        for name, ms, calls in re.findall(
            r"^(\w+)\s+([\d.]+)\s+(\d+)\s+[\d.]+\s+[\d.]+%", out, re.M
        )
    }
    # One 16-step cycle: path length every 4 G steps, R1 every 16 D steps; the optimizers
    # step once per phase run, EMA once per step.
    expected_calls = {
        "Gmain": 16, "Greg": 4, "Dmain": 16, "Dreg": 1, "opt_G": 20, "opt_D": 17, "ema": 16,
    }  # fmt: skip
    assert {name: calls for name, (_, calls) in rows.items()} == expected_calls
    assert all(ms > 0 for ms, _ in rows.values())
    assert "top operators / kernels" in out and "aten::" in out


def _run_steps(nets, ctx, state, steps: int) -> dict[str, torch.Tensor]:
    for step in range(steps):
        train_step(ctx, nets, state, step, tiny_step_reals(step))
    return {
        f"{net}.{name}": value.detach().clone()
        for net in ("G_net", "D_net")
        for name, value in getattr(nets, net).state_dict().items()
    }


class _Recorded(torch.nn.Module):
    """What a recording "compiler" returns: the module, counting calls per running phase."""

    def __init__(self, module: torch.nn.Module, calls: Counter, phase: list[str]) -> None:
        super().__init__()
        self.module, self.calls, self.phase, self.role = module, calls, phase, "?"

    def forward(self, *args, **kwargs):
        self.calls[(self.phase[0], self.role)] += 1
        return self.module(*args, **kwargs)


def test_compile_main_phases_routes_every_main_phase_call_through_a_compiled_module():
    nets, ctx, state = tiny_step_parts()
    eager_G, eager_D = nets.G_ddp, nets.D_ddp
    calls: Counter = Counter()  # (phase, role) of every call of a "compiled" module
    phase = [""]

    @contextlib.contextmanager
    def phase_timer(name):
        phase[0] = name
        calls[(name, "ran")] += 1
        yield

    ctx.phase_timer = phase_timer
    compiled = compile_main_phases(nets, lambda module: _Recorded(module, calls, phase))
    for role in ("G_ddp", "D_ddp", "G_fixed", "D_fixed"):
        getattr(compiled, role).role = role
    assert compiled.G_reg_ddp is eager_G and compiled.D_reg_ddp is eager_D
    _run_steps(compiled, ctx, state, steps=4)
    # Gmain: G trained through its DDP wrapper, D a fixed function; Dmain the other way
    # round (fakes and reals in one D call). R1 and path length ran, on the eager modules.
    assert {key: n for key, n in calls.items() if key[1] != "ran"} == {
        ("Gmain", "G_ddp"): 4, ("Gmain", "D_fixed"): 4,
        ("Dmain", "G_fixed"): 4, ("Dmain", "D_ddp"): 4,
    }  # fmt: skip
    assert calls[("Greg", "ran")] == 2 and calls[("Dreg", "ran")] == 2


def test_compiled_main_phases_train_to_the_same_weights_as_eager():
    eager = _run_steps(*tiny_step_parts(), steps=4)
    nets, ctx, state = tiny_step_parts()
    # aot_eager: Dynamo's graphs and AOT autograd's backward, without generated C++ code,
    # which would take minutes to build on a test machine; the numerics are eager's.
    compiled = compile_main_phases(nets, lambda m: torch.compile(m, backend="aot_eager"))
    for name, value in _run_steps(compiled, ctx, state, steps=4).items():
        torch.testing.assert_close(value, eager[name], rtol=1e-4, atol=1e-5, msg=name)
