"""Session-wide test datasets built with the product's own prepare code."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sg2dist.data.imageops import ConvertSettings
from sg2dist.data.prepare import prepare_dataset

METRICS_RESOLUTION = 16
METRICS_NUM_IMAGES = 16


@pytest.fixture(scope="session")
def digits_url(tmp_path_factory) -> str:
    """The built-in quickstart dataset (1,797 digits, 32 px, labelled), built once per session."""
    from sg2dist.data import ensure_digits_dataset

    return ensure_digits_dataset(str(tmp_path_factory.mktemp("datasets") / "digits32"))


@pytest.fixture(scope="session")
def metrics_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """16 smooth random RGB images, 16 px, in 3 shards, made by `prepare`'s own code."""
    root = tmp_path_factory.mktemp("metrics-data")
    rng = np.random.default_rng(0)
    (root / "src").mkdir()
    for i in range(METRICS_NUM_IMAGES):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(
            (METRICS_RESOLUTION, METRICS_RESOLUTION), Image.BILINEAR
        )
        image.save(root / "src" / f"{i:02d}.png")
    settings = ConvertSettings(resolution=METRICS_RESOLUTION)
    prepare_dataset(
        str(root / "src"),
        str(root / "dataset"),
        settings,
        labels="none",
        shard_size=6,
        progress=False,
    )
    return str(root / "dataset")


def copy_of(dataset_url: str, folder: Path) -> str:
    """A private copy the test may damage (and whose cache starts empty)."""
    return str(shutil.copytree(dataset_url, folder / "dataset"))
