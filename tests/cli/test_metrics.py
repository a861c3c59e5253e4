"""`sg2dist metrics`: a checkpoint scored against its dataset with test-built Inception
weights (see tests/support/inception.py), printed as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support.datasets import METRICS_RESOLUTION, copy_of
from support.tiny import tiny_model_config

from sg2dist import cli
from sg2dist.config import Config
from sg2dist.model import build_networks
from sg2dist.train.checkpoint import save_checkpoint

TINY_G = tiny_model_config(resolution=METRICS_RESOLUTION, z_dim=16, w_dim=16)


def test_metrics_command_scores_a_checkpoint_and_prints_json(
    metrics_dataset: str, inception_weights: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data_url = copy_of(metrics_dataset, tmp_path)
    cfg = Config()
    cfg.model = TINY_G
    cfg.data.url = data_url
    cfg.metrics.inception_weights = inception_weights  # the command's default
    torch.manual_seed(0)
    G, _ = build_networks(TINY_G)
    run_dir = str(tmp_path / "run")
    save_checkpoint(run_dir, 1000, {"G_ema": G.state_dict()}, {"config": cfg.to_dict()})

    code = cli.main(
        ["metrics", "--checkpoint", run_dir, "--metrics", "fid4,kid4", "--batch", "4", "--json"]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["checkpoint"] == run_dir and report["data"] == data_url
    assert set(report["metrics"]) == {"fid4", "kid4"}
    assert all(np.isfinite(v) and v > 0 for v in report["metrics"].values())

    assert cli.main(["metrics", "--checkpoint", run_dir, "--metrics", "fidd"]) == 2
    assert "metric 'fidd' is not known" in capsys.readouterr().err


def test_metrics_command_scores_ppl_without_a_dataset(
    lpips_weights: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = Config()
    cfg.model = TINY_G
    cfg.data.url = ""  # PPL needs no dataset
    torch.manual_seed(0)
    G, _ = build_networks(TINY_G)
    run_dir = str(tmp_path / "run")
    save_checkpoint(run_dir, 1000, {"G_ema": G.state_dict()}, {"config": cfg.to_dict()})
    command = ["metrics", "--checkpoint", run_dir, "--metrics", "ppl_wend4", "--batch", "2"]

    assert cli.main([*command, "--json"]) == 2
    assert "no LPIPS weights set; " in capsys.readouterr().err

    assert cli.main([*command, "--json", "--lpips-weights", lpips_weights]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["metrics"]) == {"ppl_wend4"}
    assert np.isfinite(report["metrics"]["ppl_wend4"]) and report["metrics"]["ppl_wend4"] > 0

    assert cli.main(["metrics", "--checkpoint", run_dir, "--metrics", "fid4"]) == 2
    assert "records no data.url; pass --data" in capsys.readouterr().err
