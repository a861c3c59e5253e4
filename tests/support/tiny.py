"""Tiny StyleGAN2 configs for fast tests, in one place.

Real networks are far too slow for a 2-core test machine; these presets keep a model
under 100k parameters (G about 45k at 16 px) while every layer type still runs. Tests
that need other sizes on purpose (a 32 px model for the 32 px digits, an 8 px one for a
quick loss check) take a named preset or explicit overrides at the call site, so that the
numbers a test uses are visible either here or in the test itself.

    small = tiny_model_config()                        # ModelConfig, validated
    cfg = load_config(None, tiny_model_sets(resolution=32))   # "model.KEY=VALUE" strings
    subprocess.run(["sg2dist", "train", *set_args(TRAIN_CLI_SETS)])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from sg2dist.config import ModelConfig
from sg2dist.model import build_networks
from sg2dist.model.generator import Generator

ModelValues = Mapping[str, int]

# 16 px RGB: the default tiny model (model unit tests, the DDP equivalence worker).
TINY_MODEL: ModelValues = {
    "resolution": 16,
    "img_channels": 3,
    "z_dim": 32,
    "w_dim": 32,
    "map_layers": 2,
    "channel_base": 256,
    "channel_max": 32,
}

# 32 px grayscale: the shape of the built-in digits dataset that the training runs read.
TINY_DIGITS_MODEL: ModelValues = {**TINY_MODEL, "resolution": 32, "img_channels": 1}

# 8 px, smallest latents and one mapping layer: enough for comparing loss computations.
TINY_8PX_MODEL: ModelValues = {
    "resolution": 8,
    "channel_base": 64,
    "channel_max": 16,
    "z_dim": 8,
    "w_dim": 8,
    "map_layers": 1,
}


def tiny_model_values(preset: ModelValues = TINY_MODEL, /, **overrides: int) -> dict[str, int]:
    """`preset` with `overrides` applied, as ModelConfig keyword arguments."""
    return {**preset, **overrides}


def tiny_model_config(preset: ModelValues = TINY_MODEL, /, **overrides: int) -> ModelConfig:
    """A validated ModelConfig from `preset` and `overrides` (other fields at their defaults),
    so a bad override fails here with the product's own message, not deep inside a test."""
    cfg = ModelConfig(**tiny_model_values(preset, **overrides))
    cfg.validate()
    return cfg


def tiny_model_sets(preset: ModelValues = TINY_MODEL, /, **overrides: int) -> list[str]:
    """The same values as `model.KEY=VALUE` strings, for load_config() or `--set`."""
    return [f"model.{key}={value}" for key, value in tiny_model_values(preset, **overrides).items()]


def set_args(sets: Iterable[str]) -> list[str]:
    """`["a=1", "b=2"]` -> `["--set", "a=1", "--set", "b=2"]` for a command line."""
    return [arg for pair in sets for arg in ("--set", pair)]


# What `sg2dist train` gets in tests/train/test_loop.py: 2 workers and a small shuffle
# buffer exercise the real loader; pl/R1 every 2 steps so a few steps run every phase.
TRAIN_CLI_SETS: list[str] = [
    *tiny_model_sets(TINY_DIGITS_MODEL),
    "train.batch=8",
    "train.batch_gpu=4",
    "train.pl_interval=2",
    "train.r1_interval=2",
    "data.workers=2",
    "data.shuffle_buffer=32",
    "run.tick_kimg=0.016",
    "run.snapshot_kimg=10",
    "tracking.enabled=false",
]

# What `sg2dist train` gets in tests/train/test_loop_tracking.py: tracking stays on, and a
# snapshot every 0.032 kimg (4 steps) so short runs still log checkpoints to MLflow.
TRAIN_TRACKING_SETS: list[str] = [
    *tiny_model_sets(TINY_DIGITS_MODEL),
    "train.batch=8",
    "train.batch_gpu=8",
    "data.workers=1",
    "run.tick_kimg=0.016",
    "run.snapshot_kimg=0.032",
]


def tiny_generator(img_channels: int = 3) -> tuple[Generator, ModelConfig]:
    """A seeded tiny 16 px G (z, w 16-d) in eval mode, with its model config."""
    model_cfg = tiny_model_config(img_channels=img_channels, z_dim=16, w_dim=16)
    torch.manual_seed(0)
    G, _ = build_networks(model_cfg)
    return G.eval(), model_cfg
