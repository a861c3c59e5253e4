"""`sg2dist import` and official pickles passed straight to --checkpoint: local, S3, HTTPS."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from support.generator_runs import generated, sg2dist
from support.official_pickle import (
    dump_official,
    official_snapshot,
    random_networks,
    write_official_pickle,
)
from support.tiny import tiny_model_config

from sg2dist import storage
from sg2dist.cli import main as cli
from sg2dist.train import checkpoint as ckpt

MODEL = tiny_model_config(resolution=32, channel_base=512, c_dim=3, conv_clamp=256.0)


@pytest.fixture(scope="module")
def official_pkl(tmp_path_factory) -> str:
    """A conditional 32 px official pickle (its networks' weights are all random)."""
    path = tmp_path_factory.mktemp("pickles") / "network-snapshot-000123.pkl"
    return str(write_official_pickle(path, *random_networks(MODEL, seed=5), MODEL, augment_p=0.5))


def test_import_writes_a_checkpoint_that_every_command_reads_like_the_pickle(
    official_pkl, tmp_path, capsys
):
    run = tmp_path / "imported"
    assert cli(["import", official_pkl, str(run)]) == 0
    out = capsys.readouterr().out
    sha256 = hashlib.sha256(Path(official_pkl).read_bytes()).hexdigest()
    assert f"(sha256 {sha256}," in out and "32 px, 3 channels, 3 classes" in out
    assert "augment p 0.5, xflip True, labels True" in out

    folder = run / "checkpoints" / "nimg-000000000000"
    assert (run / "checkpoints" / "latest").read_text() == folder.name
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["config"]["model"]["conv_clamp"] == 256.0 and meta["config"]["model"]["c_dim"] == 3
    assert meta["imported"]["source_sha256"] == sha256
    assert (meta["imported"]["augment_p"], meta["imported"]["xflip"]) == (0.5, True)
    state = torch.load(folder / "state.pt", weights_only=True)
    assert sorted(state) == ["D", "G", "G_ema"]
    assert "model:\n  resolution: 32" in (run / "config.yaml").read_text()

    # The run folder and the pickle itself give the same pictures.
    from_run = generated(str(run), "0-3", tmp_path / "a", "--class 1")
    from_pkl = generated(official_pkl, "0-3", tmp_path / "b", "--class 1")
    assert all(np.array_equal(from_run[s], from_pkl[s]) for s in range(4))
    sg2dist(f"style-mix --checkpoint {official_pkl} --class 2 --rows 1,2 --cols 3 {tmp_path}/m.png")
    assert (tmp_path / "m.png").is_file()

    # A second import must not overwrite a run's checkpoints.
    assert cli(["import", official_pkl, str(run)]) == 2
    assert "already holds checkpoints; import into a new run folder" in capsys.readouterr().err


def test_import_reads_and_writes_s3(official_pkl, s3_env, tmp_path):
    src = storage.join(s3_env.url, "pretrained", "net.pkl")
    storage.upload_file(official_pkl, src)
    run = storage.join(s3_env.url, "runs", "imported")
    assert cli(["import", src, run]) == 0
    latest = ckpt.find_latest(run)
    assert latest is not None and latest.meta["imported"]["source"] == src
    from_s3 = generated(run, "5", tmp_path / "s3", "--class 0")[5]
    assert np.array_equal(from_s3, generated(official_pkl, "5", tmp_path / "local", "--class 0")[5])


def test_an_https_pickle_is_downloaded_once_and_imported(
    official_pkl, https_server, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SG2DIST_CACHE_DIR", str(tmp_path / "cache"))
    (https_server.root / "ffhq.pkl").write_bytes(Path(official_pkl).read_bytes())
    url = f"{https_server.url}/ffhq.pkl"
    assert cli(["import", url, str(tmp_path / "run")]) == 0
    sha256 = hashlib.sha256(Path(official_pkl).read_bytes()).hexdigest()
    assert f"(sha256 {sha256})" in capsys.readouterr().err  # printed by the download
    meta = ckpt.find_latest(str(tmp_path / "run")).meta
    assert (meta["imported"]["source"], meta["imported"]["source_sha256"]) == (url, sha256)
    # --checkpoint takes the URL too; the second use reads the cached copy.
    images = generated(url, "0", tmp_path / "gen", "--class 2")
    assert images[0].shape == (32, 32, 3) and len(https_server.gets) == 1


def test_a_refused_or_truncated_pickle_is_one_error_line_and_nothing_runs(
    official_pkl, tmp_path, capsys
):
    marker = tmp_path / "marker"

    class Attack:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    snapshot = official_snapshot(*random_networks(MODEL), MODEL)
    snapshot["training_set_kwargs"]["path"] = Attack()
    evil = dump_official(snapshot, tmp_path / "evil.pkl")
    data = Path(official_pkl).read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    for src, message in [
        (evil, "refers to posix.system, which an official StyleGAN network pickle never needs"),
        (tmp_path / "cut.pkl", "is not a complete network pickle"),
    ]:
        assert cli(["import", str(src), str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sg2dist: error: ") and message in err and "\n" not in err
        assert not (tmp_path / "run").exists()
    assert not marker.exists()


def test_metrics_interpolate_and_export_take_the_pickle_directly(
    official_pkl, mlflow_server, tmp_path, capsys
):
    # metrics reads G_ema and the config from the pickle, which names no dataset (scoring
    # itself is the same whatever the checkpoint: tests/cli/test_metrics.py).
    assert cli(["metrics", "--checkpoint", official_pkl, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sg2dist: error: {official_pkl} records no data.url; pass --data DATASET_URL"
    sg2dist(
        f"interpolate --checkpoint {official_pkl} --class 0 --seeds 1,2 --frames 2 {tmp_path}/w.gif"
    )
    assert (tmp_path / "w.gif").is_file()
    export = ["export", "--checkpoint", official_pkl, "--tracking-uri", mlflow_server.uri]
    assert cli(export) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r" as models:/\S+ \(run \w+\)", printed), printed
