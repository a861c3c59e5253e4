"""A short training run logs to a real MLflow server; a resume continues the same MLflow run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from support.checkpoints import checkpoint_files
from support.ports import free_port
from support.tiny import TRAIN_TRACKING_SETS, set_args

from sg2dist.tracking import GENERATOR_TAG
from sg2dist.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def train(run_dir: str, data_url: str, kimg: float, env: dict, *extra: str, expect: int = 0):
    sets = [
        *TRAIN_TRACKING_SETS,
        f"run.dir={run_dir}",
        f"data.url={data_url}",
        f"train.kimg={kimg}",
        "tracking.experiment=e2e",
        "tracking.system_metrics=true",
        *extra,
    ]
    result = subprocess.run(
        [sys.executable, "-m", "sg2dist", "train", *set_args(sets)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_training_run_is_fully_visible_in_mlflow_and_resume_appends_to_the_same_run(
    s3_env, mlflow_server, digits_url, inception_weights, lpips_weights, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    env = dict(os.environ, OMP_NUM_THREADS="1", **mlflow_server.client_env())
    run_dir = f"{s3_env.url}/runs/tracked"
    # FID and PPL during training, with test-built Inception and LPIPS weights files (see
    # support/inception.py, support/lpips.py).
    fid = [
        "metrics.every_kimg=0.032",
        "metrics.metrics=fid64,ppl_wend8",
        f"metrics.inception_weights={inception_weights}",
        f"metrics.lpips_weights={lpips_weights}",
    ]
    train(run_dir, digits_url, 0.032, env, *fid)
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([experiment.experiment_id])

    assert run.data.params["train.batch"] == "8"
    assert run.data.params["data.url"] == digits_url
    assert run.data.tags["world_size"] == "1"
    assert run.data.tags["dataset_manifest_hash"]
    assert run.data.tags["checkpoint"].startswith(run_dir + "/checkpoints/nimg-")
    history = client.get_metric_history(run.info.run_id, "loss/G")
    assert [m.step for m in history] == [16, 32]
    names = set(run.data.metrics)
    assert {
        "progress/kimg", "speed/img_per_s", "speed/sec_per_kimg", "loss/D_real", "loss/r1",
        "D/real", "D/fake", "pl/mean", "data/wait_frac", "memory/peak_rss_gb",
    } <= names  # fmt: skip
    # Every metric sits in a section of the MLflow UI: the trainer's keys are all renamed.
    assert all("/" in name for name in names), sorted(names)
    (fid_at_32,) = client.get_metric_history(run.info.run_id, "metrics/fid64")
    assert fid_at_32.step == 32 and fid_at_32.value > 0
    (ppl_at_32,) = client.get_metric_history(run.info.run_id, "metrics/ppl_wend8")
    assert ppl_at_32.step == 32 and ppl_at_32.value > 0
    images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    assert any("fakes" in path for path in images), images
    generator = mlflow.pyfunc.load_model(run.data.tags["generator_model_uri"])
    images = generator.predict(pd.DataFrame({"seed": [0, 1], "psi": [1.0, 0.5]}))
    assert images.shape[:3] == (2, 32, 32) and images.dtype == np.uint8

    # A run from before the grouped names has its losses under the old flat names.
    client.log_metric(run.info.run_id, "loss_G", 0.7, step=8)

    # Kill-and-resume stands in as "a later invocation": it must continue the same MLflow run.
    train(run_dir, digits_url, 0.064, env, *fid)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]

    def steps(name):
        return [m.step for m in client.get_metric_history(run.info.run_id, name)]

    assert steps("loss/G") == [16, 32, 48, 64]
    assert steps("metrics/fid64") == steps("metrics/ppl_wend8") == [32, 64]
    # The old series stays readable as it was; the resumed run goes on under the new names.
    (old,) = client.get_metric_history(run.info.run_id, "loss_G")
    assert (old.step, old.value) == (8, 0.7)

    # No secret value anywhere: params, tags, metric names.
    final = client.get_run(run.info.run_id)
    secret = s3_env.server.secret_key
    everything = [*final.data.params.items(), *final.data.tags.items(), *final.data.metrics]
    assert not any(secret in str(item) for item in everything)


def test_two_node_run_logs_system_metrics_of_every_node_into_one_run(
    tmp_path, mlflow_server, digits_url
):
    port = free_port()
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="1",
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5",
        MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING="1",
        **mlflow_server.client_env(),
    )
    sets = [
        *TRAIN_TRACKING_SETS, "train.batch=16", f"run.dir={tmp_path / 'run'}",
        f"data.url={digits_url}", "train.kimg=0.096", "tracking.experiment=two-nodes",
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "sg2dist",
                "train",
                *set_args(sets),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("two-nodes")
    (run,) = client.search_runs([experiment.experiment_id])
    keys = set(run.data.metrics)
    assert any(k.startswith("system/node0/") for k in keys), sorted(keys)
    assert any(k.startswith("system/node1/") for k in keys), sorted(keys)
    assert run.data.tags["world_size"] == "2"


def test_a_run_killed_while_logging_its_final_model_restarted_logs_it_once_and_trains_nothing(
    tmp_path, mlflow_server, digits_url
):
    env = dict(os.environ, OMP_NUM_THREADS="1", **mlflow_server.client_env())
    run_dir = tmp_path / "run"
    sets = ["tracking.experiment=finished-run", "tracking.system_metrics=false"]
    # Trains to the end, checkpoints, uploads G_ema, then dies (SIGKILL) before the model's
    # tag is set: a pod killed during the final model logging.
    killed = dict(env, SG2DIST_FAILPOINT="final-model-logged")
    train(str(run_dir), digits_url, 0.032, killed, *sets, expect=-signal.SIGKILL)
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("finished-run")
    (run,) = client.search_runs([experiment.experiment_id])
    assert GENERATOR_TAG not in run.data.tags

    def generator_models() -> list:
        return list(
            client.search_logged_models(
                [experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
            )
        )

    (uploaded,) = generator_models()
    before = checkpoint_files(run_dir)
    assert ckpt.find_latest(str(run_dir)).meta["progress"]["cur_nimg"] == 32

    result = train(str(run_dir), digits_url, 0.032, env, *sets)  # the replacement pod
    assert "already complete at kimg 0.032" in result.stdout
    assert "tick" not in result.stdout  # no step
    assert checkpoint_files(run_dir) == before  # byte for byte
    assert [m.model_id for m in generator_models()] == [uploaded.model_id]  # logged once
    finished = client.get_run(run.info.run_id)
    assert finished.data.tags[GENERATOR_TAG] == uploaded.model_uri
    assert finished.info.status == "FINISHED"


def test_ada_p_seeded_from_an_imported_pickle_is_logged_every_tick_and_on_the_tick_line(
    tmp_path, mlflow_server, digits_url, monkeypatch
):
    from sg2dist.config import load_config
    from sg2dist.model import build_networks
    from sg2dist.train import checkpoint as ckpt

    # A checkpoint as the official-pickle importer writes it: weights, config, and the
    # pickle's augment_pipe.p under meta.json "imported".
    cfg = load_config(None, TRAIN_TRACKING_SETS)
    G, D = build_networks(cfg.model)
    weights = {"G": G.state_dict(), "D": D.state_dict(), "G_ema": G.state_dict()}
    meta = {"config": cfg.to_dict(), "imported": {"augment_p": 0.25}}
    ckpt.save_checkpoint(str(tmp_path / "imported"), 0, weights, meta)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    env = dict(os.environ, OMP_NUM_THREADS="1", **mlflow_server.client_env())
    sets = [
        *TRAIN_TRACKING_SETS, f"run.dir={tmp_path / 'run'}", f"data.url={digits_url}",
        "train.kimg=0.032", "tracking.experiment=augment", "tracking.system_metrics=false",
        "augment.mode=ada", "augment.p=from-checkpoint",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "sg2dist", "train", *set_args(sets),
         "--init-from", str(tmp_path / "imported")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ticks = [line for line in result.stdout.splitlines() if line.startswith("tick")]
    assert len(ticks) == 2 and " augment_p 0.25 " in ticks[0], ticks  # before any adjustment
    assert all(" augment_p " in line and " augment_rt " in line for line in ticks)

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("augment").experiment_id])
    p_history = client.get_metric_history(run.info.run_id, "augment/p")
    rt_history = client.get_metric_history(run.info.run_id, "augment/rt")
    assert [m.step for m in p_history] == [m.step for m in rt_history] == [16, 32]
    assert all(abs(m.value - 0.25) < 1e-3 for m in p_history)  # moves 6.4e-5 per 4 steps
    assert all(-1 <= m.value <= 1 for m in rt_history)
    assert run.data.params["augment.p"] == "from-checkpoint"
