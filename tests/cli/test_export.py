"""`sg2dist export`: a checkpoint's G_ema logged as a registered MLflow model."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from support.mlflow_server import MlflowServer, tracking_config
from support.tiny import tiny_generator

from sg2dist import cli
from sg2dist.train.checkpoint import save_checkpoint


def test_export_command_logs_a_checkpoints_g_ema_as_a_registered_model(
    mlflow_server: MlflowServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    G, model_cfg = tiny_generator()
    cfg = tracking_config(tmp_path, "")
    cfg.model = model_cfg
    save_checkpoint(
        cfg.run.dir,
        2000,
        {"G_ema": G.state_dict()},
        {"config": cfg.to_dict(), "mlflow_run_id": "0f" * 16},
    )
    register_name = f"export-{uuid.uuid4().hex[:6]}"

    command = ["export", "--checkpoint", cfg.run.dir, "--register", register_name]
    assert cli.main([*command, "--tracking-uri", mlflow_server.uri]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    model_uri = re.search(r" as (\S+) \(run (\w+)\)", printed).group(1)
    run_id = re.search(r" as (\S+) \(run (\w+)\)", printed).group(2)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    images = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"seed": [3]}))
    z = torch.from_numpy(np.random.RandomState(3).randn(1, 16)).float()
    with torch.no_grad():
        expected = G(z, torch.zeros(1, 0), noise_mode="const")
    expected_uint8 = (expected * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    np.testing.assert_array_equal(images[0], expected_uint8[0].permute(1, 2, 0).numpy())

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "export-cats" and run.info.status == "FINISHED"
    assert run.data.tags["sg2dist.export_of"] == cfg.run.dir
    assert run.data.tags["sg2dist.training_run_id"] == "0f" * 16
    assert len(client.search_model_versions(f"name='{register_name}'")) == 1

    assert cli.main([*command, "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert "does not work" in capsys.readouterr().err
