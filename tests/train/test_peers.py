"""Peers of a multi-process run (sg2dist/train/peers.py): rank 0's long work waits outside the
collectives. A frozen peer named and the exit code are tested end to end with two launches
of the launch script (tests/launch/test_launch.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from support.ports import free_port

WORKER = Path(__file__).with_name("peers_worker.py")


def test_rank0_work_longer_than_the_collective_timeout_is_waited_for_in_the_store(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] = "123"  # a user's own setting
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(WORKER), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        # Rank 1 waited in the store, heartbeats kept both alive, and the group still works.
        assert report["fenced"] == "written" and report["all_reduce_after_fence"] == 2.0
    assert "silent" not in result.stderr and "no heartbeat" not in result.stderr
    # The same wait inside a collective (rank 1 first): it times out, as one clear line.
    assert reports[1]["collective"].startswith("rank 1 (node0): a collective failed (")
    # ... after the process group's timeout: 2 x run.peer_timeout_s here, not 2 hours.
    assert "Timed out waiting 6000ms" in reports[1]["collective"]
    # The NCCL watchdog settings are in place before the process group starts; a user's win.
    assert reports[0]["env"] == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "123",
        "TORCH_FR_DUMP_ON_TIMEOUT": "1",
    }
