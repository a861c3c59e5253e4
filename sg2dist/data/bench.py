"""The data benchmark behind `sg2dist bench data`: the loader against a raw decode loop.

Rates are in images per wall second and per CPU second. The CPU figure counts the
loader's own processes (the trainer and its data workers), so other load on a shared
machine, or an S3 server on the same cores, does not distort it.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import psutil
from PIL import Image

from sg2dist.data.manifest import Manifest, open_manifest
from sg2dist.data.shards import image_key, read_shard
from sg2dist.data.stream import Batch, build_loader

RAW_DECODE_MAX_IMAGES = 2000


@dataclass
class Rate:
    images: int
    wall_s: float
    cpu_s: float  # CPU time of every process that did the work

    @property
    def per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def per_cpu_s(self) -> float:
        # A very short run can measure 0 CPU seconds at the clock's resolution.
        return self.images / max(self.cpu_s, 1e-6)


@dataclass
class DataBenchResult:
    manifest: Manifest
    loader: Rate
    raw_decode: Rate


def cpu_seconds() -> float:
    """CPU time of this process and its children alive now (the data workers)."""
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def loader_rate(loader: Iterator[Batch], batches: int) -> Rate:
    wall, cpu = time.perf_counter(), cpu_seconds()
    images = sum(batch.img_NCHW.shape[0] for batch in islice(loader, batches))
    return Rate(images, time.perf_counter() - wall, cpu_seconds() - cpu)


def raw_decode_rate(urls: list[str], num_images: int) -> Rate:
    """A plain PIL decode loop in this process, over image bytes already in memory."""
    encoded: list[bytes] = []
    while len(encoded) < num_images:
        for url in urls:
            images = [s[k] for s in read_shard(url) if (k := image_key(s)) is not None]
            encoded += images[: num_images - len(encoded)]
    wall, cpu = time.perf_counter(), time.process_time()
    for data in encoded:
        with Image.open(io.BytesIO(data)) as img:
            np.asarray(img)
    return Rate(num_images, time.perf_counter() - wall, time.process_time() - cpu)


def bench_data(
    url: str, *, batch: int, workers: int, batches: int, warmup: int, shuffle_buffer: int
) -> DataBenchResult:
    """Time `batches` loader batches after `warmup` ones, then a raw decode of as many images."""
    manifest = open_manifest(url)
    loader = build_loader(
        url,
        batch_gpu=batch,
        rank=0,
        world_size=1,
        seed=0,
        workers=workers,
        mirror=False,
        shuffle_buffer=shuffle_buffer,
        use_labels=False,
        manifest=manifest,
    )
    for _ in islice(loader, warmup):  # worker start-up and first shard opens
        pass
    streamed = loader_rate(loader, batches)
    loader.close()
    shard_urls = [manifest.shard_url(i) for i in range(len(manifest.shards))]
    raw = raw_decode_rate(shard_urls, min(streamed.images, RAW_DECODE_MAX_IMAGES))
    return DataBenchResult(manifest, streamed, raw)
