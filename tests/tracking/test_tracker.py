"""sg2dist.tracking against a real `mlflow server` (sqlite + SeaweedFS artifacts) and a
local sqlite store; everything is read back through MlflowClient."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from support.mlflow_server import MlflowServer, tracking_config

from sg2dist.config import Config
from sg2dist.errors import UserError
from sg2dist.tracking import NullTracker, start_tracker
from sg2dist.tracking.tracker import Tracker

SECRETS = ("SECRETPASS42", "SECRETTOKEN42", "SECRETTAG42", "SECRETENV42", "SECRETKEY42")


def test_start_logs_flattened_config_and_tags_with_every_secret_redacted(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRETENV42")
    cfg = tracking_config(tmp_path, mlflow_server.uri)
    cfg.data.url = "https://loader:SECRETPASS42@data.example.com/cats?token=SECRETTOKEN42"
    cfg.metrics.inception_weights = "s3://weights/inception.pth?X-Amz-Credential=SECRETENV42"
    tags = {
        "sg2dist.version": "0.1.0",
        "world_size": "2",
        "dataset_url": cfg.data.url,
        "api_key": "SECRETKEY42",
    }

    tracker = Tracker.start(cfg, run_id=None, tags=tags)
    tracker.set_tag("checkpoint", "https://u:SECRETTAG42@store/ckpt/000100")
    tracker.log_metrics({"Loss/G": 0.5}, step=1)
    tracker.end()

    run = MlflowClient(mlflow_server.uri).get_run(tracker.run_id)
    params, run_tags = run.data.params, run.data.tags
    assert params["train.batch"] == "32"
    assert params["model.resolution"] == "1024"
    assert params["data.url"] == "https://***@data.example.com/cats?token=***"
    assert params["metrics.inception_weights"] == "s3://weights/inception.pth?X-Amz-Credential=***"
    assert run_tags["world_size"] == "2" and run_tags["api_key"] == "***"
    assert run_tags["checkpoint"] == "https://***@store/ckpt/000100"
    assert run.info.status == "FINISHED"
    everything = repr((params, run_tags, run.data.metrics))
    for secret in SECRETS:
        assert secret not in everything


def test_metrics_logged_at_explicit_steps_read_back_in_order(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    tracker = Tracker.start(tracking_config(tmp_path, mlflow_server.uri), run_id=None, tags={})
    for step, loss in [(4, 1.5), (8, 1.25), (12, 1.0)]:
        tracker.log_metrics({"Loss/G": loss, "Progress/kimg": step}, step=step)
    tracker.end()

    history = MlflowClient(mlflow_server.uri).get_metric_history(tracker.run_id, "Loss/G")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (4, 1.5),
        (8, 1.25),
        (12, 1.0),
    ]


def test_a_metric_the_server_refuses_is_dropped_and_logging_goes_on(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tracker = Tracker.start(tracking_config(tmp_path, mlflow_server.uri), run_id=None, tags={})
    tracker.log_metrics({"Loss/G": 1.0}, step=1)
    tracker.log_metrics({"bad|name": 2.0}, step=2)  # MLflow allows no "|" in metric names
    tracker.log_metrics({"Loss/G": 3.0}, step=3)
    tracker.end()

    assert "refused log_batch" in capsys.readouterr().err
    history = MlflowClient(mlflow_server.uri).get_metric_history(tracker.run_id, "Loss/G")
    assert sorted(m.step for m in history) == [1, 3]


def test_image_series_stored_in_s3_through_the_server_with_exact_pixels(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    tracker = Tracker.start(tracking_config(tmp_path, mlflow_server.uri), run_id=None, tags={})
    rng = np.random.default_rng(0)
    grid_step4 = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    grid_step8 = rng.integers(0, 256, (24, 32, 1), dtype=np.uint8)  # greyscale dataset
    tracker.log_image(grid_step4, key="fakes", step=4)
    tracker.log_image(Image.fromarray(grid_step8[:, :, 0]), key="fakes", step=8)
    tracker.end()

    client = MlflowClient(mlflow_server.uri)
    pngs = sorted(
        f.path for f in client.list_artifacts(tracker.run_id, "images") if f.path.endswith(".png")
    )
    assert len(pngs) == 2 and all("fakes" in path for path in pngs)
    # MLflow names series images images/<key>+step+<step>+timestamp+... (older: % for +)
    by_step = {int(re.search(r"[+%]step[+%](\d+)", path).group(1)): path for path in pngs}
    assert sorted(by_step) == [4, 8]
    local = client.download_artifacts(tracker.run_id, by_step[4], str(tmp_path))
    np.testing.assert_array_equal(np.asarray(Image.open(local)), grid_step4)
    # The artifact went through the server's proxy into SeaweedFS, not to a local folder.
    keys = [
        obj["Key"]
        for page in mlflow_server.s3.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=mlflow_server.bucket, Prefix="mlflow/")
        for obj in page.get("Contents", [])
    ]
    assert any(tracker.run_id in key and key.endswith(".png") for key in keys)


def test_resumed_run_id_appends_metrics_to_the_same_run(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    cfg = tracking_config(tmp_path, mlflow_server.uri)
    first = Tracker.start(cfg, run_id=None, tags={})
    first.log_metrics({"Loss/D": 2.0}, step=1)
    first.end("KILLED")  # e.g. a preempted pod

    cfg.train.kimg = 50.0  # a resume may change the config; params keep their first values
    second = Tracker.start(cfg, run_id=first.run_id, tags={})
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    second.log_metrics({"Loss/D": 1.0}, step=2)
    second.end()

    assert second.run_id == first.run_id
    history = client.get_metric_history(first.run_id, "Loss/D")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.0)]
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert client.get_run(first.run_id).data.params["train.kimg"] == str(Config().train.kimg)


def test_server_down_mid_run_warns_once_per_minute_keeps_metrics_and_resumes(
    s3_server, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    server = MlflowServer(tmp_path / "mlflow", s3_server).start()
    try:
        tracker = Tracker.start(tracking_config(tmp_path, server.uri), run_id=None, tags={})
        tracker.retry_interval_s = 0.2  # retry quickly; keep the 60 s warning interval
        tracker.log_metrics({"Loss/G": 1.0}, step=1)
        server.stop()

        slowest_call_s = 0.0
        for step in range(2, 8):
            started = time.monotonic()
            tracker.log_metrics({"Loss/G": float(step)}, step=step)
            tracker.log_image(np.zeros((8, 8, 3), np.uint8), key="fakes", step=step)
            slowest_call_s = max(slowest_call_s, time.monotonic() - started)
            time.sleep(0.3)  # past the retry interval: every step tries the server again
        warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert len(warnings) == 1 and "training goes on" in warnings[0]
        # A refused request costs about a second with the tracker's HTTP settings; MLflow's
        # defaults (7 retries, backoff factor 2) would spend over 4 minutes per call. The
        # bound is far from both, so a busy machine does not decide the outcome.
        assert slowest_call_s < 30.0

        server.start()
        time.sleep(0.3)
        tracker.log_metrics({"Loss/G": 8.0}, step=8)
        assert "logging resumed" in capsys.readouterr().err
        tracker.end()
        history = MlflowClient(server.uri).get_metric_history(tracker.run_id, "Loss/G")
    finally:
        server.stop()
    assert sorted(m.step for m in history) == list(range(1, 9))


def test_unusable_uri_at_start_is_one_user_error_without_secrets(tmp_path: Path) -> None:
    cfg = tracking_config(tmp_path, "http://admin:SECRETPASS42@127.0.0.1:9")  # nothing listens
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        Tracker.start(cfg, run_id=None, tags={})
    message = str(error.value)
    assert "MLflow tracking URI 'http://***@127.0.0.1:9' does not work" in message
    assert "tracking.uri" in message and "\n" not in message
    assert "SECRETPASS42" not in message
    assert time.monotonic() - started < 60  # seconds, not MLflow's default minutes of retries

    cfg.tracking.uri = "nosuchscheme://x"
    with pytest.raises(UserError, match="does not work"):
        Tracker.start(cfg, run_id=None, tags={})


def test_unknown_resume_run_id_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tracking_config(tmp_path, "")
    with pytest.raises(UserError, match="is not in the tracking store"):
        Tracker.start(cfg, run_id="0123456789abcdef0123456789abcdef", tags={})


def test_default_store_is_sqlite_beside_the_run_dir_with_system_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    cfg = tracking_config(tmp_path, "")
    cfg.tracking.system_metrics = True
    tracker = Tracker.start(cfg, run_id=None, tags={})
    assert tracker.uri == f"sqlite:///{tmp_path / 'runs'}/mlflow.db"
    tracker.log_metrics({"Loss/G": 3.0}, step=2)
    tracker.log_image(np.full((4, 4, 3), 7, np.uint8), key="fakes", step=2)
    client = MlflowClient(tracker.uri)
    deadline = time.monotonic() + 60  # a hang guard: samples come every 0.5 s
    while not any(key.startswith("system/") for key in client.get_run(tracker.run_id).data.metrics):
        assert time.monotonic() < deadline, "no system metrics were logged"
        time.sleep(0.2)
    tracker.end()

    run = client.get_run(tracker.run_id)
    assert run.data.metrics["Loss/G"] == 3.0
    assert run.info.run_name == "cats"
    assert any(key.startswith("system/node0/cpu_utilization") for key in run.data.metrics)
    assert list((tmp_path / "runs" / "mlartifacts").rglob("*.png"))


def test_non_main_rank_and_disabled_tracking_get_a_null_tracker(tmp_path: Path) -> None:
    cfg = tracking_config(tmp_path, "http://127.0.0.1:9")  # never contacted
    not_main = start_tracker(cfg, is_main=False, run_id=None, tags={})
    cfg.tracking.enabled = False
    disabled = start_tracker(cfg, is_main=True, run_id=None, tags={})
    for tracker in (not_main, disabled):
        assert type(tracker) is NullTracker and tracker.run_id is None
        tracker.log_metrics({"Loss/G": 1.0}, step=1)
        tracker.log_image(np.zeros((4, 4, 3), np.uint8), key="fakes", step=1)
        tracker.set_tag("checkpoint", "x")
        assert tracker.log_generator(torch.nn.Linear(1, 1), cfg) == ""
        tracker.end()
    assert not (tmp_path / "runs").exists()
