"""`sg2dist bench WHAT`: measure one part of the pipeline in isolation.

    sg2dist bench data URL --batch B --workers W [--batches N]

Each benchmark is a subcommand that registers its own `run` function, so `main`
only dispatches.
"""

from __future__ import annotations

import argparse
import io
import time
from itertools import islice

import numpy as np
from PIL import Image

from sg2dist import storage

# ---------------------------------------------------------------------------- data


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="dataset: local folder or s3://bucket/prefix")
    parser.add_argument("--batch", type=int, default=32, help="batch_gpu (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--batches", type=int, default=50, help="batches timed (default 50)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="batches before timing (worker start-up; default 5)"
    )
    parser.add_argument("--shuffle-buffer", type=int, default=256, help="samples (default 256)")
    parser.set_defaults(run=_bench_data)


def _raw_decode_rate(urls: list[str], num_images: int) -> float:
    """img/s of a plain PIL decode loop in this process, over bytes already in memory."""
    from sg2dist.data.shards import image_key, read_shard

    encoded: list[bytes] = []
    while len(encoded) < num_images:
        for url in urls:
            encoded += [s[image_key(s)] for s in read_shard(url)][: num_images - len(encoded)]
    started = time.perf_counter()
    for data in encoded:
        with Image.open(io.BytesIO(data)) as img:
            np.asarray(img)
    return num_images / (time.perf_counter() - started)


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
    started = time.perf_counter()
    images = sum(batch.img_NCHW.shape[0] for batch in islice(loader, args.batches))
    loader_rate = images / (time.perf_counter() - started)
    loader.close()

    shard_urls = [manifest.shard_url(i) for i in range(len(manifest.shards))]
    raw_rate = _raw_decode_rate(shard_urls, min(images, 2000))
    streams = max(1, args.workers)
    where = "s3" if storage.is_s3(args.url) else "local"
    print(
        f"bench data: {args.url} ({where}; {manifest.resolution} px, {manifest.channels} ch, "
        f"{manifest.image_format}), batch {args.batch}, workers {args.workers}, "
        f"{args.batches} batches"
    )
    print(f"  loader      {loader_rate:9.1f} img/s")
    print(f"  raw decode  {raw_rate:9.1f} img/s  (PIL loop in one process, no loader)")
    print(
        f"  per worker  {loader_rate / (streams * raw_rate):9.2f}  "
        f"(loader / ({streams} x raw decode))"
    )
    return 0


# ---------------------------------------------------------------------------- dispatch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benches = parser.add_subparsers(dest="bench", required=True, metavar="WHAT")
    _add_data_arguments(
        benches.add_parser("data", help="images/s of the data loader vs a raw PIL decode loop")
    )


def main(args: argparse.Namespace) -> int:
    return args.run(args)
