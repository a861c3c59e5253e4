"""`sg2dist train` end to end in subprocesses: exact resume, crashes, SIGTERM, the quickstart."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient
from support.s3 import SeaweedFS
from support.tiny import TRAIN_CLI_SETS, set_args

from sg2dist import storage
from sg2dist.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def train_cmd(run_dir: str, data_url: str, kimg: float, *extra: str, args=()) -> list[str]:
    sets = [*TRAIN_CLI_SETS, f"run.dir={run_dir}", f"data.url={data_url}", f"train.kimg={kimg}"]
    return [sys.executable, "-m", "sg2dist", "train", *set_args([*sets, *extra]), *args]


def run_train(
    run_dir, data_url, kimg, *extra, args=(), env=None, expect=0
) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    result = subprocess.run(
        train_cmd(str(run_dir), data_url, kimg, *extra, args=args),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def assert_same_state(a: ckpt.Checkpoint, b: ckpt.Checkpoint, atol: float) -> None:
    for net in ("G", "D", "G_ema"):
        for key, tensor in a.state[net].items():
            diff = (tensor.float() - b.state[net][key].float()).abs().max().item()
            assert diff <= atol, f"{net}.{key} differs by {diff}"
    for opt in ("G_opt", "D_opt"):
        for pid, slot in a.state[opt]["state"].items():
            for name, value in slot.items():
                other = b.state[opt]["state"][pid][name]
                assert torch.allclose(value.float(), other.float(), atol=atol), (
                    f"{opt}[{pid}].{name}"
                )
    assert a.meta["progress"] == b.meta["progress"]
    assert abs(a.meta["pl_mean"] - b.meta["pl_mean"]) <= atol


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resume_after_k_steps_matches_2k_uninterrupted_steps(where, tmp_path, digits_url, request):
    # s3_env points this process (and so the trainer subprocesses) at the SeaweedFS server.
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_env").url
    # 6 steps of batch 8 = 0.048 kimg; then resume to 12 steps.
    run_train(f"{base}/split", digits_url, 0.048)
    run_train(f"{base}/split", digits_url, 0.096)
    run_train(f"{base}/whole", digits_url, 0.096)
    split, whole = ckpt.find_latest(f"{base}/split"), ckpt.find_latest(f"{base}/whole")
    assert split.meta["progress"]["step"] == 12
    assert_same_state(split, whole, atol=1e-6)


def test_resume_with_ada_matches_an_uninterrupted_run_including_p(tmp_path, digits_url):
    # p starts at 0.3 and moves by 8 x 4 / 640 = 0.05 after every 4th step. The split after
    # step 5 falls mid-interval, so the r_t accumulator must survive the checkpoint too: the
    # snapshot after step 7 holds the accumulator of steps 5-7 in both runs. (A tick per step,
    # so that the split does not add a tick of its own.)
    ada = [
        "augment.mode=ada", "augment.p=0.3", "augment.speed_kimg=0.64", "run.snapshot_kimg=0.056",
        "run.tick_kimg=0.008",
    ]  # fmt: skip
    run_train(tmp_path / "split", digits_url, 0.040, *ada)
    halfway = ckpt.find_latest(str(tmp_path / "split"))
    assert halfway.meta["augment"]["rt_count"] > 0
    run_train(tmp_path / "split", digits_url, 0.096, *ada)
    run_train(tmp_path / "whole", digits_url, 0.096, *ada)
    for nimg in (56, 96):
        split, whole = (
            ckpt.load_checkpoint(str(tmp_path / run / "checkpoints" / ckpt.folder_name(nimg)))
            for run in ("split", "whole")
        )
        assert split.meta["augment"] == whole.meta["augment"], nimg
    assert split.meta["augment"]["p"] != 0.3  # 3 adjustments of +-0.05 cannot cancel out
    assert_same_state(split, whole, atol=1e-6)


def test_kill_during_checkpoint_write_resumes_from_the_previous_complete_one(tmp_path, digits_url):
    run_train(tmp_path / "crash", digits_url, 0.048)
    # Dies by SIGKILL after state.pt of the next checkpoint, before its meta.json.
    run_train(
        tmp_path / "crash",
        digits_url,
        0.096,
        env={"SG2DIST_FAILPOINT": "checkpoint-after-state"},
        expect=-signal.SIGKILL,
    )
    folders = sorted((tmp_path / "crash" / "checkpoints").glob("nimg-*"))
    assert len(folders) == 2 and not (folders[-1] / "meta.json").exists()
    assert ckpt.find_latest(str(tmp_path / "crash")).meta["progress"]["step"] == 6
    result = run_train(tmp_path / "crash", digits_url, 0.096)
    assert "resumed from" in result.stdout and "nimg-000000000048" in result.stdout
    run_train(tmp_path / "whole", digits_url, 0.096)
    assert_same_state(
        ckpt.find_latest(str(tmp_path / "crash")),
        ckpt.find_latest(str(tmp_path / "whole")),
        atol=1e-6,
    )


def test_sigterm_mid_run_writes_a_checkpoint_and_exits_0_within_the_grace_period(
    tmp_path, digits_url
):
    cmd = train_cmd(str(tmp_path / "run"), digits_url, 100.0)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    for line in proc.stdout:  # wait until it is really training: the first tick line
        if line.startswith("tick"):
            break
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert time.time() - sent < 30
    latest = ckpt.find_latest(str(tmp_path / "run"))
    assert latest is not None and latest.meta["progress"]["cur_nimg"] > 0
    assert "stopped at kimg" in output


def test_quickstart_config_runs_end_to_end_and_leaves_grids_checkpoints_and_config(tmp_path):
    run_dir = tmp_path / "runs" / "quickstart"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sg2dist",
            "train",
            "--config",
            "configs/quickstart.yaml",
            "--set",
            "train.kimg=0.128",
            "--set",
            "run.snapshot_kimg=0.064",
            "--set",
            "run.tick_kimg=0.032",
            "--set",
            f"run.dir={run_dir}",
            "--set",
            "tracking.enabled=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (run_dir / "config.yaml").is_file()
    assert len(list((run_dir / "grids").glob("fakes-*.png"))) >= 2
    latest = ckpt.find_latest(str(run_dir))
    assert latest.meta["progress"]["cur_nimg"] == 128
    assert json.loads(json.dumps(latest.meta))["config"]["model"]["resolution"] == 32
    assert (tmp_path / "runs" / "datasets" / "digits32" / "dataset.json").is_file()
    assert "tick" in result.stdout


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_with_a_checkpoint(
    tmp_path, digits_url
):
    # An absurd learning rate makes the first step blow the weights up to ~1e30: every later
    # step has non-finite losses and gradients, which must be skipped rather than applied.
    result = run_train(
        tmp_path / "nan",
        digits_url,
        1.0,
        "train.g_lr=1e30",
        "train.d_lr=1e30",
        "train.max_nonfinite_steps=3",
        expect=2,
    )
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("sg2dist: error: 3 steps in a row had non-finite")
    latest = ckpt.find_latest(str(tmp_path / "nan"))
    assert latest.meta["skipped_steps"] >= 3
    weights = [t for t in latest.state["G"].values() if t.is_floating_point()]
    assert all(bool(torch.isfinite(t).all()) for t in weights)  # skipped steps changed nothing


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path, digits_url):
    run_train(tmp_path / "pretrained", digits_url, 0.048)
    source = ckpt.find_latest(str(tmp_path / "pretrained"))
    # Another seed: a random initialisation would be far from the pretrained weights.
    result = run_train(
        tmp_path / "finetune",
        digits_url,
        0.008,
        "train.seed=1",
        args=["--init-from", str(tmp_path / "pretrained")],
    )
    assert "resumed from" not in result.stdout
    tuned = ckpt.find_latest(str(tmp_path / "finetune"))
    assert tuned.meta["progress"]["step"] == 1  # counters start fresh
    for key, weight in source.state["G"].items():
        if weight.is_floating_point() and weight.numel() > 1:
            # One Adam step away from the pretrained weights, not a random initialisation.
            assert (tuned.state["G"][key] - weight).abs().max() < 0.05, key


# ---------------------------------------------------------------------------- S3 outages


@pytest.fixture(scope="module")
def outage_s3(tmp_path_factory) -> Iterator[SeaweedFS]:
    """A SeaweedFS of this module's own, which tests stop and start again (same port, same
    data); each test leaves it running."""
    server = SeaweedFS(tmp_path_factory.mktemp("outage-s3")).start()
    try:
        yield server
    finally:
        server.stop()


def start_train(log_dir: Path, run_dir: str, data_url: str, kimg: float, *extra: str, env=None):
    """`sg2dist train` in the background, output to files (a stopped process must not find
    a full pipe when it resumes)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "out").open("w") as out, (log_dir / "err").open("w") as err:
        return subprocess.Popen(
            train_cmd(run_dir, data_url, kimg, *extra),
            cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
            stdout=out,
            stderr=err,
        )


def next_pause(proc: subprocess.Popen) -> bool:
    """Wait until the trainer suspends itself at its failpoint (True) or exits (False)."""
    deadline = time.monotonic() + 300
    while proc.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED:
                return True
        assert time.monotonic() < deadline, "the trainer neither paused nor ended"
        time.sleep(0.1)
    return False


def test_s3_down_during_a_snapshot_training_goes_on_the_next_checkpoint_lands_and_resumes_exactly(
    tmp_path, digits_url, outage_s3, mlflow_server, monkeypatch
):
    for key, value in outage_s3.env().items():
        monkeypatch.setenv(key, value)  # this process reads the checkpoints too
    run = f"{outage_s3.prefix_url()}/run"
    # Snapshots at nimg 16, 32 and 48; the trainer suspends itself just before each
    # checkpoint write, so S3 goes away exactly while the first one is due. MLflow (its
    # artifacts in another S3) stays up.
    tracked = ["tracking.enabled=true", "tracking.experiment=s3-outage",
               "tracking.system_metrics=false"]  # fmt: skip
    proc = start_train(
        tmp_path / "logs", run, digits_url, 0.048, "run.snapshot_kimg=0.016",
        "run.storage_retry_s=2", *tracked,
        env={"SG2DIST_FAILPOINT": "checkpoint-before-write:stop", **mlflow_server.client_env()},
    )  # fmt: skip
    pauses = 0
    try:
        while next_pause(proc):
            pauses += 1
            if pauses == 1:
                outage_s3.stop()  # down during the snapshot at nimg 16 ...
            elif pauses == 2:
                outage_s3.start()  # ... and back before the one at nimg 32
            proc.send_signal(signal.SIGCONT)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if not outage_s3.running:
            outage_s3.start()
    out, err = (tmp_path / "logs" / "out").read_text(), (tmp_path / "logs" / "err").read_text()
    assert proc.returncode == 0 and pauses == 3, out[-2000:] + err[-3000:]
    assert "[storage] writing checkpoint" in err and "(attempt 1)" in err  # a line per try
    (failure,) = [line for line in out.splitlines() if "not written" in line]
    assert failure.startswith("checkpoint at kimg 0.016 not written (writing checkpoint ")
    assert failure.endswith("training goes on and the next snapshot tries again (1 failed so far)")
    assert "done at kimg 0.048" in out
    folders = storage.listdir(f"{run}/checkpoints")
    assert folders == ["latest", "nimg-000000000032", "nimg-000000000048"]  # nothing half-made
    final = ckpt.find_latest(run)
    assert final.meta["progress"]["cur_nimg"] == 48 and final.meta["checkpoint_failures"] == 1
    client = MlflowClient(mlflow_server.uri)
    (tracked_run,) = client.search_runs([client.get_experiment_by_name("s3-outage").experiment_id])
    assert tracked_run.data.tags["checkpoint_failures"] == "1"
    history = client.get_metric_history(tracked_run.info.run_id, "progress/checkpoint_failures")
    assert [(m.step, m.value) for m in history] == [(16, 1.0)]

    # The checkpoint written after the outage resumes exactly.
    resumed = f"{outage_s3.prefix_url()}/resumed"
    run_train(resumed, digits_url, 0.048, "run.snapshot_kimg=0.016",
              args=["--resume", f"{run}/checkpoints/nimg-000000000032"])  # fmt: skip
    assert_same_state(ckpt.find_latest(resumed), final, atol=0)


def test_sigterm_while_s3_is_down_exits_75_within_the_grace_and_a_restart_never_starts_over(
    tmp_path, digits_url, outage_s3, monkeypatch
):
    for key, value in outage_s3.env().items():
        monkeypatch.setenv(key, value)
    run = f"{outage_s3.prefix_url()}/run"
    # The trainer suspends itself after each snapshot; the first one (nimg 16) lands.
    proc = start_train(
        tmp_path / "logs", run, digits_url, 100.0, "run.snapshot_kimg=0.016",
        "run.storage_retry_s=60",  # longer than the grace allows: the grace must win
        env={"SG2DIST_FAILPOINT": "snapshot-done:stop", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "4"},
    )  # fmt: skip
    pauses = 0
    try:
        while next_pause(proc):
            pauses += 1
            if pauses == 1:
                outage_s3.stop()
                proc.send_signal(signal.SIGTERM)  # preempted while S3 is down
            proc.send_signal(signal.SIGCONT)
        out, err = (tmp_path / "logs" / "out").read_text(), (tmp_path / "logs" / "err").read_text()
        assert proc.returncode == 75, out[-2000:] + err[-3000:]
        (line,) = [line for line in err.splitlines() if line.startswith("sg2dist: error:")]
        assert line.startswith("sg2dist: error: stopped at kimg 0.024 without its checkpoint: ")
        # Retried for half the shutdown grace (TORCH_ELASTIC_SHUTDOWN_TIMEOUT=4: one or two
        # tries), not for run.storage_retry_s (60 s: at least four tries).
        (tries,) = re.findall(r"writing checkpoint \S+ failed (\d+) time\(s\)", out)
        assert int(tries) <= 2

        # The replacement pod starts while S3 is still down: retries, then exit 75, and
        # above all no fresh start over the existing run.
        started = run_train(run, digits_url, 100.0, "run.storage_retry_s=2", expect=75)
        attempts = [line for line in started.stderr.splitlines() if "failed (attempt" in line]
        assert attempts and all(
            line.startswith(f"[storage] reading the checkpoints of {run} failed (attempt ")
            for line in attempts
        )
        (line,) = [x for x in started.stderr.splitlines() if x.startswith("sg2dist: error:")]
        assert line.startswith(f"sg2dist: error: reading the checkpoints of {run} failed ")
        assert "cannot reach S3 endpoint" in line and "tick" not in started.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not outage_s3.running:
            outage_s3.start()
    assert storage.listdir(f"{run}/checkpoints") == ["latest", "nimg-000000000016"]
