"""`sg2dist bench step`: timed cycles, and with --profile the per-phase table and the
profiler's operator table."""

from __future__ import annotations

import re

from sg2dist import cli

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
