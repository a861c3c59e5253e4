"""`sg2dist export`: a checkpoint's G_ema logged as a registered MLflow model."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from support.mlflow_server import MlflowServer, tracking_config
from support.tiny import tiny_generator

from sg2dist import cli, storage
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


def test_export_command_writes_a_checked_onnx_file_and_logs_it_to_mlflow(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    G, model_cfg = tiny_generator()
    cfg = tracking_config(tmp_path, "")
    cfg.model = model_cfg
    save_checkpoint(cfg.run.dir, 2000, {"G_ema": G.state_dict()}, {"config": cfg.to_dict()})
    output = tmp_path / "out" / "g.onnx"

    command = ["export", "--checkpoint", cfg.run.dir, "--format", "onnx", "--output", str(output)]
    assert cli.main([*command, "--log", "--tracking-uri", mlflow_server.uri]) == 0
    printed = capsys.readouterr().out
    assert f"wrote G_ema of {cfg.run.dir} to {output} (onnx, any batch)" in printed
    onnx.checker.check_model(onnx.load(str(output)), full_check=True)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    z = torch.from_numpy(np.random.RandomState(3).randn(2, 16)).float()
    (img,) = session.run(["img"], {"z": z.numpy(), "psi": np.array(0.7, dtype=np.float32)})
    with torch.no_grad():
        expected = G(z, torch.zeros(2, 0), truncation_psi=0.7, noise_mode="const")
    np.testing.assert_allclose(img, expected.numpy(), atol=1e-4, rtol=0)

    artifact_uri = re.search(r"logged \S+ to MLflow as (runs:/(\w+)/\S+)", printed)
    run_id = artifact_uri.group(2)
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(run_id).info.run_name == "export-cats"
    (logged,) = client.list_artifacts(run_id, "generator")
    assert logged.path == "generator/g.onnx" and logged.file_size == output.stat().st_size


def test_export_file_mistakes_are_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    G, model_cfg = tiny_generator()
    cfg = tracking_config(tmp_path, "")
    cfg.model = model_cfg
    save_checkpoint(cfg.run.dir, 2000, {"G_ema": G.state_dict()}, {"config": cfg.to_dict()})
    base = f"export --checkpoint {cfg.run.dir} --format onnx"
    out = tmp_path / "out"
    cases = {
        base: "--format onnx writes a file; pass --output FILE",
        f"{base} --output {out}/g.pt2": "--output '" + str(out) + "/g.pt2' must end in .onnx",
        f"{base} --output {out}/g.onnx --batch 0": "--batch 0: write a number >= 1, or dynamic",
        f"{base} --output {out}/g.onnx --noise-mode random": "noise mode 'random' cannot be",
        f"{base} --output {out}/g.onnx --trunc-cutoff 7": "--trunc-cutoff 7 is out of range",
        f"{base} --output {out}/g.onnx --register x": "use it with --format mlflow",
    }
    for command, words in cases.items():
        assert cli.main(command.split()) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith("sg2dist: error: ") and "\n" not in err, err
        assert words in err, err

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    assert cli.main(f"{base} --output {out}/g.onnx".split()) == 2
    err = capsys.readouterr().err
    assert "needs the 'onnxscript' package" in err and "pip install 'sg2dist[onnx]'" in err
    assert not out.exists()


def test_export_command_writes_a_torch_export_program_to_s3(s3_env, tmp_path: Path) -> None:
    G, model_cfg = tiny_generator()
    cfg = tracking_config(tmp_path, "")
    cfg.model = model_cfg
    save_checkpoint(cfg.run.dir, 2000, {"G_ema": G.state_dict()}, {"config": cfg.to_dict()})
    url = f"{s3_env.url}/models/g.pt2"
    command = f"export --checkpoint {cfg.run.dir} --format pt2 --output {url} --batch 3"
    assert cli.main(command.split()) == 0

    storage.download_file(url, str(tmp_path / "g.pt2"))
    program = torch.export.load(str(tmp_path / "g.pt2")).module()
    z = torch.from_numpy(np.random.RandomState(5).randn(3, 16)).float()
    with torch.no_grad():
        expected = G(z, torch.zeros(3, 0), truncation_psi=0.5, noise_mode="const")
        torch.testing.assert_close(program(z, torch.tensor(0.5)), expected, atol=1e-4, rtol=0)
