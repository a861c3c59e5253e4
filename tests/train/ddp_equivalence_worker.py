"""Runs a few real training steps on fixed data; launched by test_distributed.py.

Usage: python ddp_equivalence_worker.py OUT.pt BATCH BATCH_GPU STEPS [PRECISION [KEY=VALUE ...]]
Under torchrun each rank takes the micro-batches that the global layout assigns it
(global micro-batch j = round * world_size + rank), so any layout sees the same samples.
"""

import json
import os
import sys
from pathlib import Path

import torch

# Run as a script (`python ddp_equivalence_worker.py`, or by torchrun), so pytest's
# `pythonpath = ["tests"]` does not apply: put tests/ on the path for `support`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.tiny import tiny_model_sets

from sg2dist.augment import initial_state
from sg2dist.cli import leave_process_group
from sg2dist.config import load_config
from sg2dist.train.build import build_nets, build_step_context, make_accelerator
from sg2dist.train.step import StepState, train_step, update_ema


def ddp_parameter_tensors(module: torch.nn.Module) -> int | None:
    if not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return None
    return int(module._get_ddp_logging_data()["num_parameter_tensors"])


def main() -> None:
    out, batch, batch_gpu, steps = sys.argv[1], *map(int, sys.argv[2:5])
    precision = sys.argv[5] if len(sys.argv) > 5 else "no"
    extra_sets = sys.argv[6:]  # more config overrides, e.g. augment.mode=ada
    cfg = load_config(
        None,
        [
            *tiny_model_sets(),
            f"train.batch={batch}",
            f"train.batch_gpu={batch_gpu}",
            f"train.precision={precision}",
            "train.pl_interval=2",
            "train.r1_interval=2",
            "train.r1_gamma=1.0",
            "train.pl_batch_shrink=2",
            "train.style_mixing_prob=0.9",
            *extra_sets,
        ],
    )
    acc = make_accelerator(cfg.train.precision)
    _, accum = cfg.train.batch_layout(acc.num_processes)
    nets = build_nets(cfg, acc)
    D_init = {name: p.detach().clone() for name, p in nets.D_net.named_parameters()}
    ctx = build_step_context(cfg, acc)
    state = StepState.on(acc.device, initial_state(cfg.augment))
    data = torch.Generator().manual_seed(1234)
    reals = torch.rand(steps * batch, 3, 16, 16, generator=data) * 2 - 1
    rts: list[float] = []
    for step in range(steps):
        micro_batches = []
        for round_idx in range(accum):
            j = round_idx * acc.num_processes + acc.process_index
            start = step * batch + j * batch_gpu
            micro_batches.append((reals[start : start + batch_gpu], torch.zeros(batch_gpu, 0)))
        train_step(ctx, nets, state, step, micro_batches)
        rts.append(state.augment.rt)  # r_t of this step's ADA adjustment (nan if none)
        update_ema(
            nets.G_ema,
            nets.G_net,
            cur_nimg=(step + 1) * batch,
            batch=batch,
            ema_kimg=0.01,
            ema_rampup=None,
        )
    if acc.is_main_process:
        # Parameters only: buffers such as w_avg are running statistics each rank keeps for its
        # own fakes (as in the official code); they do not feed back into training.
        def params(net):
            return {name: p.detach() for name, p in net.named_parameters()}

        trained = {id(p) for group in nets.D_opt.param_groups for p in group["params"]}
        torch.save(
            {
                "G": params(nets.G_net),
                "D": params(nets.D_net),
                "G_ema": params(nets.G_ema),
                "pl_mean": float(state.pl_mean),
                "augment_p": state.augment.p,
                "augment_rt": rts,
                "D_init": D_init,
                "D_trained": [n for n, p in nets.D_net.named_parameters() if id(p) in trained],
                # How many tensors DDP's reducer all-reduces (None on one process: no DDP).
                "D_synced_tensors": ddp_parameter_tensors(nets.D_ddp),
            },
            out,
        )
    leave_process_group()  # as the `sg2dist` command does


def record_threads_left(out: str) -> None:
    """The names of this process's threads besides the main one, for the test to read: what
    would still run while Python shuts down (main() has returned, its networks are freed)."""
    tids = [tid for tid in os.listdir("/proc/self/task") if int(tid) != os.getpid()]
    names = sorted(Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in tids)
    Path(f"{out}.threads.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(names))


if __name__ == "__main__":
    main()
    record_threads_left(sys.argv[1])
