"""The parts of one training step on the tiny model, for tests that run `train_step` directly."""

from __future__ import annotations

import torch
from support.tiny import tiny_model_sets

from sg2dist.config import load_config
from sg2dist.train.build import build_nets, build_step_context, make_accelerator
from sg2dist.train.step import StepState


def tiny_step_parts(*extra_sets: str):
    """(nets, ctx, state) for train_step: the tiny 16 px model, batch 4 in one micro-batch,
    fp32 on the CPU, path length and R1 every 2 steps (`extra_sets` override)."""
    cfg = load_config(
        None,
        [
            *tiny_model_sets(),
            "train.batch=4",
            "train.batch_gpu=4",
            "train.pl_interval=2",
            "train.r1_interval=2",
            "train.precision=no",
            *extra_sets,
        ],
    )
    acc = make_accelerator("no")
    return build_nets(cfg, acc), build_step_context(cfg, acc), StepState.on(acc.device)


def tiny_step_reals(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`train_step`'s micro-batches for `tiny_step_parts`: one of 4 random 16 px images."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1, torch.zeros(4, 0))]
