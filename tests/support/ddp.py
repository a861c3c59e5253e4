"""Run tests/train/ddp_equivalence_worker.py on 1 process, or on N under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from support.ports import free_port

WORKER = Path(__file__).resolve().parents[1] / "train" / "ddp_equivalence_worker.py"


def run_worker(
    out: Path, batch: int, batch_gpu: int, steps: int, nproc: int, extra_sets: tuple = ()
) -> dict:
    """Train `steps` steps on the worker's fixed data; what rank 0 saved to `out`."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    launch = []
    if nproc > 1:
        # An explicit rendezvous port from the suite's picker (support/ports.py), not
        # --standalone, whose agent picks its ports from the ephemeral range.
        rendezvous = ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
        launch = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *rendezvous]
    cmd = [sys.executable, *launch, str(WORKER)]
    result = subprocess.run(
        [*cmd, str(out), str(batch), str(batch_gpu), str(steps), "no", *extra_sets],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Head and tail: a rank's own error comes first, torchrun's summary of it last.
    assert result.returncode == 0, f"{result.stderr[:4000]}\n[...]\n{result.stderr[-2000:]}"
    return torch.load(out, weights_only=True)


def threads_left(out: Path, rank: int) -> list[str]:
    """The threads a rank of `run_worker(out, ...)` still had after its main function."""
    return json.loads(Path(f"{out}.threads.rank{rank}.json").read_text())


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest difference between two state dicts' floating-point tensors."""
    return max(
        (a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point()
    )
