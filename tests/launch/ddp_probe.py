"""Stand-in for `sg2dist train` in the launch tests (SG2DIST_ENTRY_MODULE=ddp_probe).

Called as `python -m ddp_probe train --config FILE --set K=V ...` by the launcher. It joins
the process group the launcher set up, all-reduces its rank, and writes what it saw to
$PROBE_OUT/rank<RANK>.json. PROBE_MODE picks a behaviour:
  allreduce (default)  join, all-reduce, write, exit 0
  exit-<N>             write, then exit with code N (no process group)
  wait-for-sigterm     write "started", then on SIGTERM write "checkpointed" and exit 0
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

WAIT_LIMIT_S = 120  # a probe left waiting must still end


def write_report(report: dict) -> None:
    out = Path(os.environ["PROBE_OUT"]) / f"rank{os.environ['RANK']}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(out)


def base_report(args: argparse.Namespace) -> dict:
    env_names = (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "GROUP_RANK",
        "MASTER_ADDR",
        "ACCELERATE_USE_CPU",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
    )
    return {
        "command": args.command,
        "config": args.config,
        "overrides": args.overrides,
        "env": {name: os.environ.get(name) for name in env_names},
    }


def wait_for_sigterm(report: dict) -> int:
    def checkpoint_and_exit(signum, _frame):
        report["events"].append(f"checkpointed after signal {signum}")
        write_report(report)
        sys.exit(0)

    signal.signal(signal.SIGTERM, checkpoint_and_exit)
    report["events"] = ["started"]
    write_report(report)
    time.sleep(WAIT_LIMIT_S)
    return 1  # no signal came: the test fails on the exit code


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    report = base_report(args)
    mode = os.environ.get("PROBE_MODE", "allreduce")
    if mode.startswith("exit-"):
        write_report(report)
        return int(mode.removeprefix("exit-"))
    if mode == "wait-for-sigterm":
        return wait_for_sigterm(report)
    # GPU launches (accelerate launch) get NCCL; CPU launches (torchrun) say ACCELERATE_USE_CPU=1.
    use_cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU") != "1"
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank_sum = torch.tensor([float(dist.get_rank())], device="cuda" if use_cuda else "cpu")
    dist.all_reduce(rank_sum)
    report["world_size"] = dist.get_world_size()
    report["rank_sum"] = rank_sum.item()
    report["backend"] = dist.get_backend()
    dist.destroy_process_group()
    write_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
