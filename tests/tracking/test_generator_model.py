"""G_ema as an MLflow pyfunc model, logged to a real `mlflow server` and loaded back."""

from __future__ import annotations

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

from sg2dist.tracking.tracker import Tracker


def tiny_generator_and_config(mlflow_server: MlflowServer, tmp_path: Path):
    """A tiny G and a config tracking to `mlflow_server` whose model section describes it."""
    G, model_cfg = tiny_generator()
    cfg = tracking_config(tmp_path, mlflow_server.uri)
    cfg.model = model_cfg
    return G, cfg


def test_logged_generator_loads_back_as_pyfunc_and_reproduces_g_ema_images(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    G, cfg = tiny_generator_and_config(mlflow_server, tmp_path)
    register_name = f"g-ema-{uuid.uuid4().hex[:6]}"
    tracker = Tracker.start(cfg, run_id=None, tags={})
    model_uri = tracker.log_generator(G, cfg, register_name=register_name)
    tracker.end()
    assert model_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    model = mlflow.pyfunc.load_model(model_uri)
    images = model.predict(pd.DataFrame({"seed": [0, 1, 2], "psi": [1.0, 0.5, 1.0]}))
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    z = torch.from_numpy(np.random.RandomState(1).randn(1, 16)).float()
    with torch.no_grad():
        expected = G(z, torch.zeros(1, 0), truncation_psi=0.5, noise_mode="const")
    expected_uint8 = (expected * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    np.testing.assert_array_equal(images[1], expected_uint8[0].permute(1, 2, 0).numpy())
    by_z = model.predict(pd.DataFrame({"z": [z[0].tolist()], "psi": [0.5]}))
    np.testing.assert_array_equal(by_z[0], images[1])

    assert model.metadata.get_input_schema().input_names() == ["seed", "z", "psi"]
    versions = MlflowClient(mlflow_server.uri).search_model_versions(f"name='{register_name}'")
    assert [v.version for v in versions] == ["1"]


def test_a_run_finds_the_generator_it_logged_and_ignores_an_unfinished_upload(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    G, cfg = tiny_generator_and_config(mlflow_server, tmp_path)
    tracker = Tracker.start(cfg, run_id=None, tags={})
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.get_run(tracker.run_id).info.experiment_id
    # An upload killed half way leaves a PENDING model: not a generator to reuse.
    client.create_logged_model(experiment_id, name="generator", source_run_id=tracker.run_id)
    assert tracker.logged_generator_uri() == ""
    model_uri = tracker.log_generator(G, cfg)
    # Found before its tag exists (a kill between the upload and the tag) ...
    assert tracker.logged_generator_uri() == model_uri
    # ... and in the run's own experiment, where the MLflow UI lists it with the run.
    assert client.get_logged_model(model_uri.removeprefix("models:/")).experiment_id == (
        experiment_id
    )
    tracker.set_tag("generator_model_uri", model_uri)
    assert tracker.logged_generator_uri() == model_uri
    tracker.end()


def test_a_logged_generator_is_registered_once_however_often_registration_is_ensured(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    # A run killed between the model upload and its registration, then restarted, finds the
    # logged model and must register it: once, and never a second version of a registered one.
    G, cfg = tiny_generator_and_config(mlflow_server, tmp_path)
    client = MlflowClient(mlflow_server.uri)
    tracker = Tracker.start(cfg, run_id=None, tags={})
    unregistered, registered = (f"g-ema-{uuid.uuid4().hex[:6]}" for _ in range(2))

    model_uri = tracker.log_generator(G, cfg)  # logged, registration never happened
    assert client.search_model_versions(f"name='{unregistered}'") == []
    for _ in range(2):
        tracker.ensure_registered(model_uri, unregistered)
    versions = client.search_model_versions(f"name='{unregistered}'")
    assert [(v.version, v.run_id) for v in versions] == [("1", tracker.run_id)]

    model_uri = tracker.log_generator(G, cfg, register_name=registered)  # registered by Model.log
    tracker.ensure_registered(model_uri, registered)
    assert [v.version for v in client.search_model_versions(f"name='{registered}'")] == ["1"]
    tracker.end()
