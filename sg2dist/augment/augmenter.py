"""What every D input goes through in a run, from `augment.*` of the config.

    augmenter = Augmenter(cfg.augment, batch=cfg.train.batch)
    augment = augmenter.for_micro_batch(seed, p=state.p)   # img_NCHW -> img_NCHW
    logits = D(augment(img), c)
    augmenter.after_step(state, completed_steps, reduce_mean) # ada: adjust p every interval

`for_micro_batch` draws every random number from a generator seeded by `seed`, which the
step derives from (train.seed, step, phase, global micro-batch): the augmentation of a
sample does not depend on how the batch is split over ranks, nor on a resume.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sg2dist.augment.ada import AugmentState, ReduceMean, maybe_adjust
from sg2dist.augment.diffaugment import diff_augment
from sg2dist.augment.pipeline import AdaPipeline
from sg2dist.config import AugmentConfig

Augment = Callable[[torch.Tensor], torch.Tensor]


def identity(img: torch.Tensor) -> torch.Tensor:
    return img


class Augmenter:
    def __init__(self, cfg: AugmentConfig, *, batch: int):
        self.cfg = cfg
        self.batch = batch  # global batch: the ADA step size is per image shown
        self.pipeline = AdaPipeline.from_pipe(cfg.pipe) if cfg.mode in ("ada", "fixed") else None

    @property
    def active(self) -> bool:
        return self.cfg.mode != "none"

    def for_micro_batch(self, seed: int, p: float) -> Augment:
        """The augmentation of one micro-batch's D inputs, in the order D sees them."""
        mode = self.cfg.mode
        if mode == "none" or (mode in ("ada", "fixed") and p == 0):
            return identity  # p = 0: D sees the images bit for bit, nothing is computed
        generators: dict[torch.device, torch.Generator] = {}

        def augment(img: torch.Tensor) -> torch.Tensor:
            if img.device not in generators:
                generators[img.device] = torch.Generator(img.device).manual_seed(seed)
            generator = generators[img.device]
            # fp32 whatever the autocast: colour matrices and resampling filters in bf16 would
            # visibly quantise the images D sees.
            with torch.autocast(img.device.type, enabled=False):
                if self.pipeline is not None:
                    return self.pipeline(img.float(), p, generator)
                return diff_augment(img.float(), generator)

        return augment

    def observe(self, state: AugmentState, sign_means: list[torch.Tensor]) -> None:
        """Add one phase's per-micro-batch means of sign(D(real)) to the r_t accumulator."""
        if self.cfg.mode == "ada":
            state.accumulate(sign_means)

    def after_step(
        self, state: AugmentState, completed_steps: int, reduce_mean: ReduceMean
    ) -> None:
        if self.cfg.mode != "ada":
            return
        c = self.cfg
        maybe_adjust(
            state, completed_steps, reduce_mean, target=c.target, batch=self.batch,
            interval=c.interval, speed_kimg=c.speed_kimg, p_max=c.p_max,
        )  # fmt: skip


def initial_state(cfg: AugmentConfig, imported_p: float | None = None) -> AugmentState:
    """The state of a new run: p from the config, or from an imported official pickle's
    augment_pipe.p (augment.p = from-checkpoint), capped at p_max."""
    p = cfg.initial_p if cfg.initial_p is not None else imported_p
    if p is None:
        raise ValueError("augment.p=from-checkpoint needs the imported p")
    return AugmentState(p=min(max(p, 0.0), cfg.p_max) if cfg.mode in ("ada", "fixed") else 0.0)
