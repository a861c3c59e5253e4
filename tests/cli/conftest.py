"""Tiny generator checkpoints shared by the tests of the generator commands."""

import pytest
from support.generator_runs import make_run


@pytest.fixture(scope="session")
def rgb_run(tmp_path_factory) -> str:
    """An unconditional RGB model."""
    return make_run(str(tmp_path_factory.mktemp("runs") / "rgb"))


@pytest.fixture(scope="session")
def gray_run(tmp_path_factory) -> str:
    """A conditional (3 classes) grayscale model."""
    folder = tmp_path_factory.mktemp("runs") / "gray"
    return make_run(str(folder), "model.img_channels=1", "model.c_dim=3", seed=1)
