"""launch/sg2dist-launch, the container entry point, run for real on loopback.

Two copies of the script on one machine play machine 0 and machine 1 of a 2-node job
(CPU, gloo). Most tests run `ddp_probe` (a tiny torch.distributed program, next to this
file) in place of `sg2dist train` through the script's SG2DIST_ENTRY_MODULE hook; the last
two train the quickstart for real.
"""

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from support.checkpoints import checkpoint_files
from support.ports import free_port

from sg2dist.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch" / "sg2dist-launch"
PROBE_DIR = Path(__file__).resolve().parent
LAUNCH_VARS = (
    "NNODES", "GPUS_PER_NODE", "NODE_RANK", "JOB_COMPLETION_INDEX", "MASTER_ADDR",
    "MASTER_PORT", "SG2DIST_CONFIG", "SG2DIST_SET", "SG2DIST_WAIT_S", "SG2DIST_ENTRY_MODULE",
    "SG2DIST_ACCELERATE_CONFIG", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "WORLD_SIZE", "RANK",
)  # fmt: skip
TIMEOUT_S = 180


def probe_env(out_dir: Path, **variables: str) -> dict[str, str]:
    """The environment of one launch running the probe; `variables` as a Job would set them."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(
        PYTHONPATH=str(PROBE_DIR),
        SG2DIST_ENTRY_MODULE="ddp_probe",
        PROBE_OUT=str(out_dir),
        SG2DIST_CONFIG=str(ROOT / "configs" / "quickstart.yaml"),
        CUDA_VISIBLE_DEVICES="",  # CPU path, also on a machine with GPUs
        OMP_NUM_THREADS="1",
        # Else a single machine takes a port from bind(0), in the ephemeral range, where any
        # outgoing connection on the machine may take it first.
        MASTER_PORT=str(free_port()),
    )
    env.update(variables)
    return env


@dataclass
class Launch:
    process: subprocess.Popen
    logs: Path  # stdout/stderr go to files: a full pipe would stall a rank, and with it both


def start(env: dict[str, str], *args: str) -> Launch:
    logs = Path(tempfile.mkdtemp(prefix="launch-", dir=env["PROBE_OUT"]))
    with (logs / "out").open("w") as out, (logs / "err").open("w") as err:
        process = subprocess.Popen(
            [sys.executable, str(LAUNCH), *args], env=env, cwd=ROOT, stdout=out, stderr=err
        )
    return Launch(process, logs)


def machine_processes(launch: Launch) -> list[psutil.Process]:
    """One machine: its launch script (torchrun's agent runs inside it) and every process
    below it (trainers, their data workers), found by parentage, never by name."""
    try:
        root = psutil.Process(launch.process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:  # it ended (and was reaped) already
        return []


def is_stopped(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def signal_all(processes: list[psutil.Process], signum: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def finish(launch: Launch) -> tuple[int, str, str]:
    timed_out = False
    try:
        launch.process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        signal_all(machine_processes(launch), signal.SIGKILL)  # its trainers too: no leftovers
        launch.process.wait()
        timed_out = True
    out, err = (launch.logs / "out").read_text(), (launch.logs / "err").read_text()
    if timed_out:
        pytest.fail(f"launch still running after {TIMEOUT_S} s:\n{out[-2000:]}\n{err[-3000:]}")
    return launch.process.returncode, out, err


def launch(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    return finish(start(env, *args))


def two_machines(env0: dict[str, str], env1: dict[str, str]) -> list[tuple[int, str, str]]:
    """Machines 0 and 1 side by side; machine 1 waits for machine 0's rendezvous port."""
    processes = [start(env0), start(env1)]
    return [finish(process) for process in processes]


def report(out_dir: Path, rank: int) -> dict:
    return json.loads((out_dir / f"rank{rank}.json").read_text())


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("sg2dist-launch: error:")]


def load_launch_module():
    loader = importlib.machinery.SourceFileLoader("sg2dist_launch", str(LAUNCH))
    spec = importlib.util.spec_from_loader("sg2dist_launch", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- mechanics


def test_two_machines_on_loopback_join_one_process_group(tmp_path):
    port = str(free_port())
    shared = dict(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, SG2DIST_WAIT_S="120",
                  SG2DIST_SET="train.kimg=1 'run.dir=/runs/a b'")  # fmt: skip
    results = two_machines(
        probe_env(tmp_path, NODE_RANK="0", **shared),
        # Kubernetes' own variable names the rank when NODE_RANK is unset.
        probe_env(tmp_path, JOB_COMPLETION_INDEX="1", **shared),
    )
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"machine {rank}:\n{out}\n{err[-3000:]}"
        command = next(line for line in out.splitlines() if "running:" in line)
        assert "ACCELERATE_USE_CPU=1 torchrun --nnodes 2" in command
        assert f"--node-rank {rank}" in command and f"--master-port {port}" in command
    reports = [report(tmp_path, rank) for rank in (0, 1)]
    for rank, seen in enumerate(reports):
        assert seen["world_size"] == 2 and seen["backend"] == "gloo"
        assert seen["rank_sum"] == 0 + 1  # the all-reduce crossed the two launches
        assert seen["env"]["GROUP_RANK"] == str(rank)  # machine rank
        assert seen["env"]["ACCELERATE_USE_CPU"] == "1"
        assert seen["command"] == "train"
        assert seen["config"] == str(ROOT / "configs" / "quickstart.yaml")
        assert seen["overrides"] == ["train.kimg=1", "run.dir=/runs/a b"]


def test_missing_rank_fails_with_the_named_error(tmp_path):
    env = probe_env(tmp_path, NNODES="2", MASTER_ADDR="127.0.0.1")
    code, _, err = launch(env)
    assert code == 2
    assert error_lines(err) == [
        "sg2dist-launch: error: NODE_RANK (or JOB_COMPLETION_INDEX) is not set but NNODES=2; "
        "set NODE_RANK to this machine's rank, 0..1"
    ]
    assert not list(tmp_path.glob("rank*.json"))  # nothing was launched


@pytest.mark.parametrize("variable", ["NODE_RANK", "JOB_COMPLETION_INDEX"])
def test_rank_out_of_range_fails_with_the_named_error(variable, tmp_path):
    env = probe_env(tmp_path, NNODES="2", MASTER_ADDR="127.0.0.1", **{variable: "2"})
    code, _, err = launch(env)
    assert code == 2
    assert error_lines(err) == [
        f"sg2dist-launch: error: {variable}=2 is out of range for NNODES=2; "
        "use 0..1 or raise NNODES"
    ]


def test_unreachable_main_address_fails_after_the_bounded_wait(tmp_path):
    # A socket bound but never listening: connections to it are refused, and no other
    # process can take the port while we hold it.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    env = probe_env(tmp_path, NNODES="2", NODE_RANK="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port), SG2DIST_WAIT_S="3")  # fmt: skip
    started = time.monotonic()
    with holder:
        code, out, err = launch(env)  # finish() fails the test if it never ends
    elapsed_s = time.monotonic() - started
    assert code == 3  # not 2: pod 0 may still be starting, so the Job retries this pod
    (line,) = error_lines(err)
    assert line.startswith(
        f"sg2dist-launch: error: MASTER_ADDR 127.0.0.1:{port} unreachable after 3 s"
    )
    assert "waiting up to 3 s for machine 0" in out
    assert elapsed_s >= 3  # it did wait the whole SG2DIST_WAIT_S


def test_sigterm_reaches_the_trainer_and_the_exit_stays_nonzero(tmp_path):
    machine = start(probe_env(tmp_path, PROBE_MODE="wait-for-sigterm"))
    deadline = time.monotonic() + TIMEOUT_S
    while not (tmp_path / "rank0.json").exists():
        assert machine.process.poll() is None, finish(machine)
        assert time.monotonic() < deadline, "the probe never started"
        time.sleep(0.2)
    machine.process.send_signal(signal.SIGTERM)
    code, _, err = finish(machine)
    assert report(tmp_path, 0)["events"] == ["started", "checkpointed after signal 15"]
    # The trainer exited 0 after checkpointing, yet this machine did not finish: 128+15 makes
    # an Indexed Job run the index again (and resume) instead of counting it complete.
    assert code == 143, err[-2000:]


@pytest.mark.parametrize(("trainer_exit", "launch_exit"), [(2, 2), (7, 7)])
def test_the_trainers_exit_code_survives_the_launcher(trainer_exit, launch_exit, tmp_path):
    code, _, err = launch(probe_env(tmp_path, PROBE_MODE=f"exit-{trainer_exit}"))
    assert code == launch_exit, err[-2000:]
    assert report(tmp_path, 0)["command"] == "train"


def test_gpu_machines_get_an_accelerate_command_that_accelerate_accepts(tmp_path):
    """No GPU here: build the GPU command and let accelerate's own parser and config loader
    read it (the GPU run itself is exercised on a GPU machine, see the README)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    module = load_launch_module()
    env = {
        "NNODES": "4",
        "NODE_RANK": "3",
        "MASTER_ADDR": "sg2dist-train-0.sg2dist-train",
        "SG2DIST_CONFIG": "/etc/sg2dist/train.yaml",
        "SG2DIST_SET": "train.batch=256",
    }
    layout = module.read_layout(env, count_gpus=lambda: 8)
    config = str(ROOT / "launch" / "accelerate" / "multi-node.yaml")
    command = module.launch_command(layout, module.trainer_arguments(env, []), config, 900)
    assert command[:2] == ["accelerate", "launch"]
    args = launch_command_parser().parse_args(command[2:])
    assert (args.num_machines, args.num_processes, args.machine_rank) == (4, 32, 3)
    assert (args.main_process_ip, args.main_process_port) == (
        "sg2dist-train-0.sg2dist-train",
        29500,
    )
    assert args.module and args.training_script == "sg2dist"
    assert args.training_script_args == [
        "train", "--config", "/etc/sg2dist/train.yaml", "--set", "train.batch=256"
    ]  # fmt: skip
    defaults = load_config_from_file(args.config_file)
    assert defaults.distributed_type == "MULTI_GPU" and defaults.rdzv_backend == "static"
    with pytest.raises(module.LaunchError, match="GPUS_PER_NODE=16 but only 8 GPUs"):
        module.read_layout({**env, "GPUS_PER_NODE": "16"}, count_gpus=lambda: 8)


# ---------------------------------------------------------------------------- the trainer


def test_two_machines_train_the_quickstart_together_and_write_one_checkpoint(tmp_path, digits_url):
    run_dir = tmp_path / "run"
    overrides = [
        "train.kimg=0.096",  # 3 steps of the global batch 32
        "train.batch=32",
        "train.batch_gpu=16",  # 16 per process x 2 processes
        f"data.url={digits_url}",
        f"run.dir={run_dir}",
        "tracking.enabled=false",
    ]
    port = str(free_port())
    shared = dict(NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                  SG2DIST_WAIT_S="120", SG2DIST_SET=shlex.join(overrides))  # fmt: skip
    results = two_machines(
        probe_env(tmp_path, NODE_RANK="0", SG2DIST_ENTRY_MODULE="sg2dist", **shared),
        probe_env(tmp_path, NODE_RANK="1", SG2DIST_ENTRY_MODULE="sg2dist", **shared),
    )
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"machine {rank}:\n{out[-3000:]}\n{err[-5000:]}"
    checkpoints = run_dir / "checkpoints"
    steps = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert len(steps) == 1, steps
    assert (checkpoints / "latest").read_text().strip().endswith(steps[0])
    meta = json.loads((checkpoints / steps[0] / "meta.json").read_text())
    assert meta["world_size"] == 2  # one process group across the two launches
    assert len(meta["data_states"]) == 2  # each rank streamed its own share
    assert meta["progress"]["cur_nimg"] == 96 and meta["progress"]["step"] == 3
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["batch_gpu"] == 16 and saved["tracking"]["enabled"] is False


def latest_progress(run_dir: Path) -> dict:
    checkpoints = run_dir / "checkpoints"
    name = (checkpoints / "latest").read_text().strip()
    return json.loads((checkpoints / name / "meta.json").read_text())["progress"]


def test_preempting_one_machine_checkpoints_both_and_neither_counts_as_finished(
    tmp_path, digits_url
):
    """Kubernetes preempts one node: SIGTERM to its launch script only. Both ranks must stop
    at the same step and checkpoint it, and both pods must exit non-zero (not 2) so that the
    Indexed Job runs both indexes again and they resume. Known gaps in the trainer are
    reported as xfail with the fix they need."""
    run_dir = tmp_path / "run"
    overrides = [
        "train.kimg=50",  # far more than the test lets it run
        "train.batch=32",
        "train.batch_gpu=16",
        "run.snapshot_kimg=0.064",  # a checkpoint every 2 steps shows the loop is running
        f"data.url={digits_url}",
        f"run.dir={run_dir}",
        "tracking.enabled=false",
    ]
    port = str(free_port())
    shared = dict(NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                  SG2DIST_WAIT_S="120", SG2DIST_SET=shlex.join(overrides))  # fmt: skip
    machine0 = start(probe_env(tmp_path, NODE_RANK="0", SG2DIST_ENTRY_MODULE="sg2dist", **shared))
    machine1 = start(probe_env(tmp_path, NODE_RANK="1", SG2DIST_ENTRY_MODULE="sg2dist", **shared))
    deadline = time.monotonic() + TIMEOUT_S
    while not (run_dir / "checkpoints" / "latest").exists():
        assert machine0.process.poll() is None, finish(machine0)
        assert machine1.process.poll() is None, finish(machine1)
        assert time.monotonic() < deadline, "training never reached its first checkpoint"
        time.sleep(0.5)
    first_nimg = latest_progress(run_dir)["cur_nimg"]
    machine1.process.send_signal(signal.SIGTERM)  # the preemption of one node
    code1, _, err1 = finish(machine1)
    assert code1 == 143, err1[-2000:]  # the preempted pod: DisruptionTarget, run again
    try:
        machine0.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        # After its trainer exited 0, torchrun on machine 0 waits up to 300 s for machine 1
        # at its exit barrier, deaf to SIGTERM; its trainer is gone, so kill it. Otherwise
        # its trainer still runs: SIGTERM makes torchrun stop it.
        stopped = latest_progress(run_dir)["cur_nimg"] > first_nimg
        machine0.process.send_signal(signal.SIGKILL if stopped else signal.SIGTERM)
    code0, out0, err0 = finish(machine0)
    if latest_progress(run_dir)["cur_nimg"] == first_nimg and "DataLoader worker" in err1:
        pytest.xfail(
            "torchrun signals the trainer's whole process group, which kills the DataLoader "
            "workers and crashes the trainer before it checkpoints; the workers need their "
            "own process group (os.setpgid(0, 0) in the DataLoader's worker_init_fn)"
        )
    # Both ranks stopped at the same step and checkpointed it.
    assert first_nimg < latest_progress(run_dir)["cur_nimg"] < 50_000, err1[-3000:]
    if "stopped at kimg" in out0 and code0 in (0, -signal.SIGKILL):
        pytest.xfail(
            "sg2dist train exits 0 on ranks that stopped because another rank was signalled, "
            "so an Indexed Job would count index 0 as complete and never rerun it; it must "
            "exit non-zero (not 2) when it stopped before train.kimg"
        )
    assert code0 not in (0, 2), f"machine 0 exited {code0}:\n{out0[-2000:]}\n{err0[-2000:]}"


def two_machine_training(
    tmp_path: Path, data_url: str, run_dir: Path, *overrides: str, **env1: str
) -> tuple[dict[str, str], dict[str, str]]:
    """The environments of machines 0 and 1 training the quickstart into `run_dir`
    (batch 32 = 16 per process x 2, a checkpoint every 2 steps); `env1` only for machine 1."""
    sets = [
        "train.batch=32",
        "train.batch_gpu=16",
        "run.snapshot_kimg=0.064",
        f"data.url={data_url}",
        f"run.dir={run_dir}",
        "tracking.enabled=false",
        *overrides,
    ]
    shared = dict(NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()), SG2DIST_WAIT_S="120",
                  SG2DIST_ENTRY_MODULE="sg2dist", SG2DIST_SET=shlex.join(sets))  # fmt: skip
    return probe_env(tmp_path, NODE_RANK="0", **shared), probe_env(
        tmp_path, NODE_RANK="1", **shared, **env1
    )


PEER_TIMEOUT_S = 8  # run.peer_timeout_s in the frozen-machine tests
FROZEN_RUN = ["train.kimg=0.192", f"run.peer_timeout_s={PEER_TIMEOUT_S}"]  # 6 steps


def freeze_one_machine(tmp_path: Path, data_url: str, frozen: int) -> tuple[int, str, str, float]:
    """Two machines train; machine `frozen` is stopped (every process, SIGSTOP) mid-run.
    Returns the other machine's exit code, stdout, stderr, and its seconds to exit after."""
    # The frozen machine's trainer suspends itself right after its first snapshot (nimg 64)
    # landed: a deterministic point mid-run. Then the test stops every other process of it.
    failpoint = {"SG2DIST_FAILPOINT": "snapshot-done:stop"}
    env0, env1 = two_machine_training(tmp_path, data_url, tmp_path / "run", *FROZEN_RUN)
    (env0 if frozen == 0 else env1).update(failpoint)
    machines = [start(env0), start(env1)]
    stopped: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not any(is_stopped(p) for p in machine_processes(machines[frozen])):
            for machine in machines:
                assert machine.process.poll() is None, finish(machine)
            assert time.monotonic() < deadline, "the trainer never reached its first snapshot"
            time.sleep(0.2)
        stopped = machine_processes(machines[frozen])
        signal_all(stopped, signal.SIGSTOP)
        stopped_at = time.monotonic()
        code, out, err = finish(machines[1 - frozen])
        return code, out, err, time.monotonic() - stopped_at
    finally:  # whatever happened: no stopped or running process is left behind
        signal_all(stopped, signal.SIGKILL)
        for machine in machines:
            if machine.process.poll() is None:
                signal_all(machine_processes(machine), signal.SIGKILL)
            machine.process.wait()


def the_error_line(err: str) -> str:
    (line,) = [line for line in err.splitlines() if line.startswith("sg2dist: error:")]
    return line


def test_a_frozen_machine_is_named_the_other_exits_75_and_both_resume_exactly(tmp_path, digits_url):
    """A node that hangs (here: every process of machine 1 stopped with SIGSTOP) must not hold
    the others for the 2-hour collective timeout: machine 0 names it and exits 75 within
    run.peer_timeout_s; restarted, both resume from the latest checkpoint and end exactly
    where an uninterrupted run ends. Restarting that finished run then trains nothing."""
    code0, out0, err0, waited_s = freeze_one_machine(tmp_path, digits_url, frozen=1)
    assert code0 == 75, f"machine 0 exited {code0}:\n{out0[-2000:]}\n{err0[-3000:]}"
    # Within the timeout plus a generous margin for the agent's shutdown on a busy machine;
    # without heartbeats it would wait for the collective timeout (2 x), or 2 hours before.
    assert waited_s < PEER_TIMEOUT_S + 30, waited_s
    line = the_error_line(err0)
    assert line.startswith("sg2dist: error: rank 1 (node1 on "), line
    assert "sent no heartbeat for" in line and f"(run.peer_timeout_s={PEER_TIMEOUT_S})" in line
    assert line.endswith("rank 0 (node0) exits 75 so the job restarts every node from the latest "
                         "checkpoint")  # fmt: skip
    assert latest_progress(tmp_path / "run")["cur_nimg"] == 64
    length = FROZEN_RUN

    # The Job restarts both machines: they resume from nimg 64 and finish.
    resumed = two_machines(*two_machine_training(tmp_path, digits_url, tmp_path / "run", *length))
    for rank, (code, out, err) in enumerate(resumed):
        assert code == 0, f"machine {rank}:\n{out[-2000:]}\n{err[-3000:]}"
    assert "resumed from" in resumed[0][1] and "nimg-000000000064" in resumed[0][1]
    whole = tmp_path / "whole"
    uninterrupted = two_machines(*two_machine_training(tmp_path, digits_url, whole, *length))
    for rank, (code, out, err) in enumerate(uninterrupted):
        assert code == 0, f"machine {rank}:\n{out[-2000:]}\n{err[-3000:]}"
    a, b = ckpt.find_latest(str(tmp_path / "run")), ckpt.find_latest(str(tmp_path / "whole"))
    assert a.meta["progress"] == b.meta["progress"] and a.meta["progress"]["cur_nimg"] == 192
    for part in ("G", "D", "G_ema"):
        for key, tensor in a.state[part].items():
            assert torch.equal(tensor, b.state[part][key]), f"{part}.{key}"
    for part in ("G_opt", "D_opt"):
        for index, slot in a.state[part]["state"].items():
            for name, value in slot.items():
                assert torch.equal(value, b.state[part]["state"][index][name]), f"{part}.{name}"

    # A finished run started again (a pod killed after its final checkpoint): no step on any
    # rank, every machine exits 0, the checkpoints stay byte for byte what they were.
    before = checkpoint_files(tmp_path / "whole")
    again = two_machines(*two_machine_training(tmp_path, digits_url, whole, *length))
    for rank, (code, out, err) in enumerate(again):
        assert code == 0, f"machine {rank}:\n{out[-2000:]}\n{err[-3000:]}"
        assert "tick" not in out
    assert "already complete at kimg 0.192" in again[0][1]
    assert checkpoint_files(tmp_path / "whole") == before


def test_a_frozen_machine_0_which_serves_the_rendezvous_store_is_named_too(tmp_path, digits_url):
    """Machine 0's launcher serves the store the heartbeats go through: when it freezes with
    its trainers, the store stops answering (its calls then block past their own timeout)."""
    code1, out1, err1, waited_s = freeze_one_machine(tmp_path, digits_url, frozen=0)
    assert code1 == 75, f"machine 1 exited {code1}:\n{out1[-2000:]}\n{err1[-3000:]}"
    assert waited_s < PEER_TIMEOUT_S + 30, waited_s
    line = the_error_line(err1)
    assert line.startswith("sg2dist: error: the rendezvous store at 127.0.0.1:"), line
    assert ", served by node0, has not answered for " in line
    assert line.endswith("rank 1 (node1) exits 75 so the job restarts every node from the latest "
                         "checkpoint")  # fmt: skip
