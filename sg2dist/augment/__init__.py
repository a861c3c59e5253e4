"""Discriminator augmentation for small datasets: ADA and DiffAugment.

    augmenter = Augmenter(cfg.augment, batch=cfg.train.batch)
    augment = augmenter.for_micro_batch(seed, p)     # every D input goes through it
    AdaPipeline.from_pipe("bgc")(img_NCHW, p, generator)   # the ADA transforms themselves

Modules: pipeline.py (the ADA transforms), geometry.py (the resampling behind the
geometric ones), diffaugment.py, ada.py (p and its adjustment), augmenter.py (mode
dispatch and seeding). Like the model, this package imports nothing from train, data,
storage or tracking.
"""

from sg2dist.augment.ada import AugmentState, adjust_p
from sg2dist.augment.augmenter import Augment, Augmenter, identity, initial_state
from sg2dist.augment.diffaugment import diff_augment
from sg2dist.augment.pipeline import PIPES, TRANSFORMS, AdaPipeline

__all__ = [
    "PIPES",
    "TRANSFORMS",
    "AdaPipeline",
    "Augment",
    "AugmentState",
    "Augmenter",
    "adjust_p",
    "diff_augment",
    "identity",
    "initial_state",
]
