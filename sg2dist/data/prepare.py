"""Images -> WebDataset tar shards + dataset.json (the library behind `sg2dist prepare`).

Flow: list the inputs in sorted order (sources.py) and mix them with a fixed-seed
permutation -> convert each one in a pool of --workers processes (imageops.py;
results come back in input order) -> write
the kept images into shards of --shard-size samples keyed `{index:08d}` -> publish
each shard as it closes (a rename for a local DEST, an upload in a background
thread for s3://, overlapping with writing the next shard) -> write dataset.json
last.

Same input, same settings -> byte-identical shards (sorted inputs, a fixed
permutation, fixed tar metadata, deterministic encoders). An interrupted run
leaves no manifest (an old one is removed before the first shard is written), so
nothing half-written is ever taken for a dataset; running the same command again
completes it.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from multiprocessing.pool import AsyncResult

import webdataset as wds
from tqdm import tqdm

from sg2dist import storage
from sg2dist.data.imageops import (
    IMAGE_EXTENSIONS,
    ConvertSettings,
    NotSquareError,
    SkippedImageError,
    convert_image,
)
from sg2dist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo
from sg2dist.data.sources import Source, list_inputs
from sg2dist.errors import UserError

TAR_MTIME = 0  # fixed tar member times make shards reproducible byte for byte
SHUFFLE_SEED = 0
STAGING_PREFIX = ".staging-"  # + pid: a local DEST's folder for shards being written
SHARD_TARGET_BYTES = 200e6
CHUNK_SIZE = 8  # images per worker task
CHUNKS_IN_FLIGHT_PER_WORKER = 4


def default_shard_size(resolution: int, channels: int, image_format: str) -> int:
    """Samples per shard for ~200 MB shards (PNG ~0.5 B/px/channel, JPEG ~0.15)."""
    bytes_per_image = resolution * resolution * channels * (0.5 if image_format == "png" else 0.15)
    return max(64, int(SHARD_TARGET_BYTES / bytes_per_image))


# ---------------------------------------------------------------------------- conversion


def _convert_chunk(
    settings: ConvertSettings, items: list[tuple[str, bytes]]
) -> list[tuple[str, bytes | str, bool]]:
    """Worker: [(name, file bytes)] -> [(name, encoded image or skip reason, fatal?)]."""
    results: list[tuple[str, bytes | str, bool]] = []
    for name, data in items:
        try:
            results.append((name, convert_image(data, settings, name), False))
        except SkippedImageError as exc:
            results.append((name, str(exc), False))
        except NotSquareError as exc:
            results.append((name, str(exc), True))
    return results


def _converted(
    source: Source, names: list[str], settings: ConvertSettings, workers: int
) -> Iterator[tuple[str, bytes | str]]:
    """(name, encoded bytes or skip reason) for every name, in input order.

    With several workers, a window of chunks is kept in flight so the workers never
    wait for this process; the window also bounds the input bytes held in memory.
    """
    chunks = [names[i : i + CHUNK_SIZE] for i in range(0, len(names), CHUNK_SIZE)]
    if workers <= 1:
        converted = (_convert_chunk(settings, [(n, source.read(n)) for n in c]) for c in chunks)
        yield from _checked(converted)
        return
    pool = multiprocessing.get_context().Pool(workers)
    try:
        pending: deque[AsyncResult] = deque()
        waiting = iter(chunks)

        def submit_next() -> None:
            chunk = next(waiting, None)
            if chunk is not None:
                items = [(name, source.read(name)) for name in chunk]
                pending.append(pool.apply_async(_convert_chunk, (settings, items)))

        for _ in range(CHUNKS_IN_FLIGHT_PER_WORKER * workers):
            submit_next()
        while pending:
            results = pending.popleft().get()
            submit_next()
            yield from _checked([results])
    finally:
        pool.terminate()
        pool.join()


def _checked(
    chunk_results: Iterable[list[tuple[str, bytes | str, bool]]],
) -> Iterator[tuple[str, bytes | str]]:
    for results in chunk_results:
        for name, result, fatal in results:
            if fatal:
                raise UserError(str(result))
            yield name, result


# ---------------------------------------------------------------------------- shard output


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_dead_staging(dest: str) -> None:
    """Remove staging folders that killed prepare runs left in a local DEST."""
    for entry in storage.listdir(dest):
        pid_text = entry.removeprefix(STAGING_PREFIX)
        if (
            entry.startswith(STAGING_PREFIX)
            and pid_text.isdigit()
            and not _is_running(int(pid_text))
        ):
            shutil.rmtree(os.path.join(dest, entry), ignore_errors=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class ShardOutput:
    """Writes samples into tar shards and publishes each shard as soon as it closes.

    Shards are written into a staging folder (inside DEST for a local DEST, so the
    publish is an atomic rename; a temporary folder for s3://). An S3 upload runs
    in one background thread while the next shard is written; at most one upload
    is in flight, which bounds the staging space to two shards.
    """

    def __init__(self, dest: str, name: str, shard_size: int) -> None:
        self.dest = dest
        self.name = name
        self.shard_size = shard_size
        self.shards: list[ShardInfo] = []
        self._written = 0
        self._writer: wds.ShardWriter | None = None
        if storage.is_s3(dest):
            self._staging = tempfile.mkdtemp(prefix="sg2dist-prepare-")
            self._uploader: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1)
        else:
            _remove_dead_staging(dest)
            self._staging = os.path.join(dest, f"{STAGING_PREFIX}{os.getpid()}")
            os.makedirs(self._staging, exist_ok=True)
            self._uploader = None
        self._upload: Future | None = None

    def write(self, encoded: bytes, extension: str, label: int | None) -> None:
        """Append one image; samples are keyed by their running index."""
        if self._writer is None:
            self._writer = wds.ShardWriter(
                os.path.join(self._staging, f"{self.name}-%06d.tar"),
                maxcount=self.shard_size,
                maxsize=float("inf"),
                post=self._publish,
                verbose=0,
                mtime=TAR_MTIME,
                encoder=False,
            )
        sample = {"__key__": f"{self._written:08d}", extension: encoded}
        if label is not None:
            sample["cls"] = str(label).encode("ascii")
        self._writer.write(sample)
        self._written += 1

    def _publish(self, staged_path: str) -> None:
        """ShardWriter's post hook: the shard at `staged_path` is complete."""
        shard = ShardInfo(
            name=os.path.basename(staged_path),
            count=self._written - sum(s.count for s in self.shards),
            sha256=_sha256_of(staged_path),
            bytes=os.path.getsize(staged_path),
        )
        self.shards.append(shard)
        url = storage.join(self.dest, shard.name)
        if self._uploader is None:
            os.replace(staged_path, url)
            return
        self._wait_for_upload()
        self._upload = self._uploader.submit(self._upload_and_remove, staged_path, url)

    @staticmethod
    def _upload_and_remove(staged_path: str, url: str) -> None:
        try:
            storage.upload_file(staged_path, url)
        finally:
            os.remove(staged_path)

    def _wait_for_upload(self) -> None:
        if self._upload is not None:
            self._upload.result()  # re-raises an upload error here, in the main thread
            self._upload = None

    def close(self) -> list[ShardInfo]:
        """Finish the last shard and wait until every shard is published."""
        if self._writer is not None:
            self._writer.close()
        self._wait_for_upload()
        self._cleanup()
        return self.shards

    def _cleanup(self) -> None:
        if self._uploader is not None:
            self._uploader.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._staging, ignore_errors=True)

    def abort(self) -> None:
        """Drop the shard being written (its staged file) after an error or interrupt."""
        self._cleanup()


# ---------------------------------------------------------------------------- prepare


def _shard_name_prefix(dest: str) -> str:
    base = os.path.basename(dest.rstrip("/")) or "dataset"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "dataset"


def _clear_destination(dest: str, overwrite: bool) -> None:
    manifest_url = storage.join(dest, MANIFEST_NAME)
    if storage.exists(manifest_url):
        if not overwrite:
            raise UserError(
                f"{dest} already holds a dataset ({MANIFEST_NAME}); pass --overwrite to replace "
                "it or choose another DEST"
            )
        storage.remove_tree(manifest_url)  # before any shard changes, so no stale manifest


def prepare_dataset(
    src: str,
    dest: str,
    settings: ConvertSettings,
    *,
    labels: str = "auto",
    shard_size: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    shuffle: bool = True,
    progress: bool = True,
) -> Manifest:
    """Convert the images of `src` into shards + manifest at `dest`; returns the manifest."""
    _clear_destination(dest, overwrite)
    shard_size = shard_size or default_shard_size(
        settings.resolution, settings.channels, settings.image_format
    )
    started = time.monotonic()
    with Source(src) as source:
        inputs = list_inputs(source, labels)
        label_of = dict(inputs.images)
        names = [name for name, _ in inputs.images]
        if shuffle:
            # Sorted input puts whole classes (or sessions) into one shard; a fixed-seed
            # permutation mixes them and keeps the output reproducible.
            random.Random(SHUFFLE_SEED).shuffle(names)
        skipped = list(inputs.skipped)
        output = ShardOutput(dest, _shard_name_prefix(dest), shard_size)
        # disable=None: a bar only when attached to a terminal (no \r noise in logs)
        bar = tqdm(total=len(names), unit="img", desc="prepare", disable=not progress or None)
        try:
            for name, result in _converted(source, names, settings, workers):
                if isinstance(result, str):
                    skipped.append({"file": name, "reason": result})
                else:
                    label = label_of[name] if inputs.label_names else None
                    output.write(result, settings.image_format, label)
                bar.update(1)
            shards = output.close()
        except BaseException:
            output.abort()
            raise
        finally:
            bar.close()
    if not shards:
        reasons = "; ".join(sorted({s["reason"] for s in skipped})[:3]) or "no files found"
        raise UserError(
            f"no usable images in {src} ({len(skipped)} files skipped: {reasons}); point SRC "
            f"at a folder or zip of {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images"
        )
    manifest = Manifest(
        url=dest,
        resolution=settings.resolution,
        channels=settings.channels,
        image_format=settings.image_format,
        shards=shards,
        c_dim=len(inputs.label_names),
        label_names=inputs.label_names,
        source={"path": os.path.abspath(src), "kind": source.kind, "labels": inputs.labels_from},
        settings={**asdict(settings), "shard_size": shard_size, "shuffled": shuffle},
        skipped=sorted(skipped, key=lambda s: s["file"]),
    )
    storage.write_text(storage.join(dest, MANIFEST_NAME), manifest.to_json())
    elapsed = time.monotonic() - started
    print(
        f"prepare: {manifest.num_images} images in {len(shards)} shards at {dest} "
        f"({settings.resolution} px, {manifest.c_dim} classes, {len(skipped)} files skipped, "
        f"{manifest.num_images / max(elapsed, 1e-9):.0f} img/s)"
    )
    return manifest
