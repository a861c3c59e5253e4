"""`sg2dist bench data`: loader and raw-decode rates are measured and printed."""

from __future__ import annotations

import re

import pytest

from sg2dist import cli


def test_bench_data_prints_loader_and_raw_decode_rates(stream_dataset, capsys):
    argv = ["bench", "data", stream_dataset, "--batch", "8", "--workers", "1", "--batches", "6"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rates = {
        name: float(value)
        for name, value in re.findall(r"^\s+(loader|raw decode|per worker)\s+([\d.]+)", out, re.M)
    }
    assert set(rates) == {"loader", "raw decode", "per worker"}
    assert rates["loader"] > 0 and rates["raw decode"] > 0
    expected_ratio = rates["loader"] / rates["raw decode"]  # one worker
    assert rates["per worker"] == pytest.approx(expected_ratio, rel=0.02, abs=0.01)
