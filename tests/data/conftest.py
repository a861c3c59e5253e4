"""Small image folders and prepared datasets for the data tests (built with prepare itself)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sg2dist.data import Batch, StreamLoader, build_loader
from sg2dist.data.imageops import ConvertSettings
from sg2dist.data.prepare import prepare_dataset

STREAM_RESOLUTION = 16


def random_images(count: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    """`count` distinct random RGB images of size (width, height), uint8 HWC."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(count)]


def write_class_folders(root: Path, images_by_class: dict[str, list[np.ndarray]]) -> None:
    """root/<class>/<class>_<i>.png for every image."""
    for name, images in images_by_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, pixels in enumerate(images):
            Image.fromarray(pixels).save(root / name / f"{name}_{i:03d}.png")


def build_dataset(
    root: Path, *, count: int, shard_size: int, classes: int = 3, seed: int = 0
) -> str:
    """A labelled 16 px RGB dataset of `count` random images in shards of `shard_size`."""
    images = random_images(count, (STREAM_RESOLUTION, STREAM_RESOLUTION), seed)
    by_class = {f"class{k}": images[k::classes] for k in range(classes)}
    write_class_folders(root / "src", by_class)
    dest = str(root / "dataset")
    settings = ConvertSettings(resolution=STREAM_RESOLUTION)
    prepare_dataset(
        str(root / "src"), dest, settings, labels="folders", shard_size=shard_size, progress=False
    )
    return dest


class ImageKit:
    """The helpers above, handed to tests through the `kit` fixture."""

    random_images = staticmethod(random_images)
    write_class_folders = staticmethod(write_class_folders)
    build_dataset = staticmethod(build_dataset)


@pytest.fixture(scope="session")
def kit() -> type[ImageKit]:
    return ImageKit


def stream_loader(url: str, **overrides: Any) -> StreamLoader:
    """The test datasets' loader: 2 workers, batches of 5, labels and flips on."""
    options: dict[str, Any] = dict(
        batch_gpu=5,
        rank=0,
        world_size=1,
        seed=0,
        workers=2,
        mirror=True,
        shuffle_buffer=8,
        use_labels=True,
    )
    options.update(overrides)
    return build_loader(url, **options)


def same_batches(a: Sequence[Batch], b: Sequence[Batch]) -> bool:
    return len(a) == len(b) and all(
        x.keys == y.keys and torch.equal(x.img_NCHW, y.img_NCHW) and torch.equal(x.c, y.c)
        for x, y in zip(a, b, strict=True)
    )


class StreamKit:
    """The loader helpers above, shared by the stream and worker tests (`streams` fixture)."""

    loader = staticmethod(stream_loader)
    same_batches = staticmethod(same_batches)


@pytest.fixture(scope="session")
def streams() -> type[StreamKit]:
    return StreamKit


@pytest.fixture(scope="session")
def stream_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """150 labelled images in 10 shards (9 x 16 + 6): batches span shard ends."""
    return build_dataset(tmp_path_factory.mktemp("stream"), count=150, shard_size=16)


@pytest.fixture(scope="session")
def even_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """96 images in 8 shards of 12: splits evenly over 2 ranks x 2 workers."""
    return build_dataset(tmp_path_factory.mktemp("even"), count=96, shard_size=12)


@pytest.fixture
def copy_dataset(tmp_path: Path) -> Callable[[str], str]:
    """Copy a local dataset folder so a test may damage it."""

    def copy(url: str) -> str:
        target = tmp_path / "copy" / os.path.basename(url)
        target.mkdir(parents=True)
        for name in os.listdir(url):
            (target / name).write_bytes(Path(url, name).read_bytes())
        return str(target)

    return copy
