"""Two ranks under torchrun: rank 0 works alone for longer than the collective timeout.

Usage (by test_peers.py): torchrun --nproc-per-node 2 peers_worker.py OUT_DIR
First inside `Peers.after_main` (rank 1 waits in the store): the collective after it must
succeed, and no heartbeat may call rank 0 silent meanwhile. Then the same wait in a plain
collective, the old way: it must time out. Each rank writes OUT_DIR/rank<R>.json.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sg2dist.errors import TemporaryError
from sg2dist.train import peers as peers_module
from sg2dist.train.build import make_accelerator
from sg2dist.train.peers import Peers, collective_failures_are_retryable

PEER_TIMEOUT_S = 3.0
# The product keeps at least 30 s between the heartbeat and the collective timeouts; a test
# that must outlast the collective timeout shortens that to keep the suite fast: 6 s here.
peers_module.MIN_COLLECTIVE_SLACK_S = 0.0
LONG_WORK_S = 2.5 * PEER_TIMEOUT_S  # longer than the collective timeout (2 x 3 s)


def rank0_works_alone(store: dist.TCPStore, step: str) -> str:
    """Rank 0's long work; it starts only once rank 1 is waiting (no race on who is first)."""
    store.wait([f"test/{step}/rank1-waiting"])
    time.sleep(LONG_WORK_S)
    return "written"


def main() -> None:
    out = Path(sys.argv[1])
    make_accelerator("no", PEER_TIMEOUT_S)  # the trainer's process group: its timeout
    rank = dist.get_rank()
    peers = Peers(rank=rank, world_size=dist.get_world_size(), peer_timeout_s=PEER_TIMEOUT_S)
    peers.start()
    store = peers._connect(60)  # for the test's own ordering keys
    watchdog = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC",
                "TORCH_FR_DUMP_ON_TIMEOUT")  # fmt: skip
    report: dict = {"env": {name: os.environ.get(name) for name in watchdog}}

    if rank == 1:
        store.set("test/fence/rank1-waiting", "1")
    report["fenced"] = peers.after_main("work", lambda: rank0_works_alone(store, "fence"))
    total = torch.ones(1)
    dist.all_reduce(total)
    report["all_reduce_after_fence"] = total.item()

    try:
        with collective_failures_are_retryable(rank):
            if rank == 0:
                rank0_works_alone(store, "collective")
            else:
                store.set("test/collective/rank1-waiting", "1")
            dist.all_reduce(total)
        report["collective"] = "completed"
    except TemporaryError as exc:
        report["collective"] = str(exc)
    peers.close()  # ended on purpose: the other rank must not take this for a silent peer
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    os._exit(0)  # the group is broken now; tearing it down could wait on the dead peer


if __name__ == "__main__":
    main()
