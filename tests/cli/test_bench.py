"""`sg2dist bench step` options: a full step runs and is timed with augmentation on and in
another memory format; a setting that cannot apply to the device is one error."""

import re

import pytest

from sg2dist import cli

TINY_STEP_BENCH = [
    "bench", "step", "--resolution", "16", "--batch", "4", "--channel-base", "128",
    "--channel-max", "16", "--map-layers", "1", "--cycles", "1",
]  # fmt: skip


def run_tiny_step_bench(capsys, *options: str) -> str:
    """The printed line of a tiny step bench with `options`, after checking it timed steps."""
    assert cli.main([*TINY_STEP_BENCH, *options]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"sec_per_iter ([\d.]+)", out).group(1)) > 0
    return out


def test_bench_step_with_ada_runs_and_prints_its_setting(capsys):
    out = run_tiny_step_bench(capsys, "--augment", "ada", "--augment-p", "0.5")
    assert "augment ada p=0.5" in out


def test_bench_step_runs_in_the_memory_format_asked_and_prints_it(capsys):
    out = run_tiny_step_bench(capsys, "--memory-format", "contiguous")
    assert " fp32 contiguous on cpu" in out


@pytest.mark.parametrize("flag", ["--fir-kernel", "--bias-act-kernel"])
def test_bench_step_refuses_a_triton_kernel_on_cpu_with_one_line(flag, capsys):
    assert cli.main(["bench", "step", flag, "triton"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} triton runs on CUDA only" in err and "add --device cuda" in err
