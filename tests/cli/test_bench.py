"""`sg2dist bench step` options: a full step runs and is timed with augmentation on and in
another memory format; a setting that cannot apply to the device is one error."""

import re

from sg2dist import cli


def test_bench_step_with_ada_runs_and_prints_its_setting(capsys):
    argv = [
        "bench", "step", "--resolution", "16", "--batch", "4", "--channel-base", "128",
        "--channel-max", "16", "--map-layers", "1", "--cycles", "1",
        "--augment", "ada", "--augment-p", "0.5",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "augment ada p=0.5" in out
    assert float(re.search(r"sec_per_iter ([\d.]+)", out).group(1)) > 0


def test_bench_step_runs_in_the_memory_format_asked_and_prints_it(capsys):
    argv = [
        "bench", "step", "--resolution", "8", "--batch", "4", "--channel-base", "64",
        "--channel-max", "8", "--map-layers", "1", "--cycles", "1",
        "--memory-format", "contiguous",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert " fp32 contiguous on cpu" in out
    assert float(re.search(r"sec_per_iter ([\d.]+)", out).group(1)) > 0


def test_bench_step_refuses_the_triton_fir_kernel_on_cpu_with_one_line(capsys):
    assert cli.main(["bench", "step", "--fir-kernel", "triton"]) == 2
    err = capsys.readouterr().err
    assert "--fir-kernel triton runs on CUDA only" in err and "add --device cuda" in err
