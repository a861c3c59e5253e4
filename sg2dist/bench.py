"""`sg2dist bench WHAT`: measure one part of the pipeline in isolation.

    sg2dist bench data URL --batch B --workers W [--batches N]
    sg2dist bench step --resolution R --batch B [--channel-base --channel-max] [--device cpu|cuda]
                       [--precision fp32|bf16|fp16] [--compile]

Each benchmark is a subcommand that registers its own `run` function, so `main`
only dispatches.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import psutil
from PIL import Image

from sg2dist import storage

# ---------------------------------------------------------------------------- data


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="dataset: local folder or s3://bucket/prefix")
    parser.add_argument("--batch", type=int, default=32, help="batch_gpu (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="data worker processes (default 2)")
    parser.add_argument("--batches", type=int, default=50, help="batches timed (default 50)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="batches before timing (worker start-up; default 5)"
    )
    parser.add_argument("--shuffle-buffer", type=int, default=256, help="samples (default 256)")
    parser.set_defaults(run=_bench_data)


@dataclass
class _Rate:
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


def _cpu_seconds() -> float:
    """CPU time of this process and its children alive now (the data workers)."""
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _loader_rate(loader: Iterator[Any], batches: int) -> _Rate:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    images = sum(batch.img_NCHW.shape[0] for batch in islice(loader, batches))
    return _Rate(images, time.perf_counter() - wall, _cpu_seconds() - cpu)


def _raw_decode_rate(urls: list[str], num_images: int) -> _Rate:
    """A plain PIL decode loop in this process, over image bytes already in memory."""
    from sg2dist.data.shards import image_key, read_shard

    encoded: list[bytes] = []
    while len(encoded) < num_images:
        for url in urls:
            encoded += [s[image_key(s)] for s in read_shard(url)][: num_images - len(encoded)]
    wall, cpu = time.perf_counter(), time.process_time()
    for data in encoded:
        with Image.open(io.BytesIO(data)) as img:
            np.asarray(img)
    return _Rate(num_images, time.perf_counter() - wall, time.process_time() - cpu)


def _bench_data(args: argparse.Namespace) -> int:
    from sg2dist.data import build_loader, open_manifest

    manifest = open_manifest(args.url)
    loader = build_loader(
        args.url,
        batch_gpu=args.batch,
        rank=0,
        world_size=1,
        seed=0,
        workers=args.workers,
        mirror=False,
        shuffle_buffer=args.shuffle_buffer,
        use_labels=False,
        manifest=manifest,
    )
    for _ in islice(loader, args.warmup):  # worker start-up and first shard opens
        pass
    streamed = _loader_rate(loader, args.batches)
    loader.close()
    shard_urls = [manifest.shard_url(i) for i in range(len(manifest.shards))]
    raw = _raw_decode_rate(shard_urls, min(streamed.images, 2000))

    streams = max(1, args.workers)
    where = "s3" if storage.is_s3(args.url) else "local"
    print(
        f"bench data: {args.url} ({where}; {manifest.resolution} px, {manifest.channels} ch, "
        f"{manifest.image_format}), batch {args.batch}, workers {args.workers}, "
        f"{args.batches} batches"
    )
    print(f"  loader      {streamed.per_s:9.1f} img/s  {streamed.per_cpu_s:9.1f} img/CPU-s")
    print(f"  raw decode  {raw.per_s:9.1f} img/s  {raw.per_cpu_s:9.1f} img/CPU-s  (PIL loop)")
    # Wall-clock ratio: what a training run sees. CPU ratio: the loader's own cost per
    # image, which other load on a shared machine does not distort.
    print(
        f"  per worker  {streamed.per_s / (streams * raw.per_s):9.2f}  wall "
        f"(loader / ({streams} x raw decode)), "
        f"{streamed.per_cpu_s / raw.per_cpu_s:.2f} CPU (loader img/CPU-s / raw img/CPU-s)"
    )
    return 0


# ---------------------------------------------------------------------------- dispatch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benches = parser.add_subparsers(dest="bench", required=True, metavar="WHAT")
    _add_data_arguments(
        benches.add_parser("data", help="images/s of the data loader vs a raw PIL decode loop")
    )
    _add_step_arguments(
        benches.add_parser("step", help="sec/iter, img/s and peak memory of full training steps")
    )


def _add_step_arguments(parser: argparse.ArgumentParser) -> None:
    # The step benchmark lives beside the loop it times; imported only when it runs.
    def run(args: argparse.Namespace) -> int:
        from sg2dist.train.bench_step import main_step

        return main_step(args)

    from sg2dist.train.bench_step import add_step_arguments

    add_step_arguments(parser)
    parser.set_defaults(run=run)


def main(args: argparse.Namespace) -> int:
    return args.run(args)
