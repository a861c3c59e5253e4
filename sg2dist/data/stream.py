"""The training stream: deterministic, resumable batches for one rank.

Order is a pure function of (seed, rank, worker, position), never of time or pids:

- Each rank runs W workers (processes; W = 1 in-process when workers=0).
  Worker w of rank r walks an infinite sequence of shard visits; visit i reads the
  shard drawn by an RNG seeded with (seed, r, w, i): shards are resampled per rank
  and worker, so every rank sees a different stream and none runs dry.
- The samples of one visit pass through a shuffle buffer that never spans shards
  (seeded by (seed, r, w, i)), then get their x-flip from an RNG seeded the same way.
- Workers assemble whole batches of batch_gpu; the loader hands out batch k from
  worker k % W. Each Batch carries its worker's position after it: (visit i,
  samples of that visit consumed), plus the worker's corrupt-sample count.
- `StreamState` records, per worker, the position after the last batch the loop
  actually consumed (the loop calls `state.update(batch)`; prefetched batches do
  not count) and which worker is next. A loader built with that state resumes
  every worker there (it re-reads only the current shard and skips whole earlier
  visits without reading them) and rotates worker ids so that the batch sequence
  continues exactly as if never interrupted.

`resampled=False` gives one epoch instead: shards shuffled per epoch and split
across ranks, then workers (as webdataset's split_by_node / split_by_worker do),
each sample at most once, and every rank truncated to the same number of batches
(from the manifest's shard counts) so DDP never waits on a rank that ran out.

Workers are plain processes that decode into shared-memory rings (workers.py says why not
a torch DataLoader). The loader must not go through `accelerator.prepare`, which would
re-shard batches that are already per rank.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch._utils import ExceptionWrapper
from webdataset.filters import shuffle as wds_shuffle

from sg2dist import storage
from sg2dist.data.imageops import decode_into
from sg2dist.data.manifest import Manifest, open_manifest
from sg2dist.data.shards import OpenAhead, image_key, read_shard
from sg2dist.data.workers import BatchRing, WorkerBatch, WorkerFailure, WorkerPool
from sg2dist.errors import TemporaryError, UserError
from sg2dist.sampling import one_hot

log = logging.getLogger(__name__)

OPEN_AHEAD_MAX_BYTES = 64 << 20  # s3:// shards up to this size are opened a visit ahead


@dataclass
class Batch:
    img_NCHW: torch.Tensor  # noqa: N815 - uint8 [N, C, R, R]
    c: torch.Tensor  # float32 one-hot [N, c_dim]; [N, 0] without labels
    keys: list[str]  # sample keys (global image indices, "00000042")
    worker: int  # the worker stream that produced this batch
    position: tuple[int, int]  # that worker's (visit, samples consumed in it) after this batch
    corrupt: int  # that worker's corrupt samples skipped so far


@dataclass
class StreamState:
    """Where each worker of one rank stands after the last consumed batch (JSON-able)."""

    seed: int
    rank: int
    world_size: int
    num_workers: int  # worker streams (workers=0 runs one stream in-process)
    manifest_hash: str
    next_worker: int = 0
    positions: list[list[int]] = field(default_factory=list)  # per worker [visit, consumed]
    corrupt: list[int] = field(default_factory=list)  # per worker
    batches: int = 0  # batches consumed so far

    def __post_init__(self) -> None:
        self.positions = self.positions or [[0, 0] for _ in range(self.num_workers)]
        self.corrupt = self.corrupt or [0] * self.num_workers

    def update(self, batch: Batch) -> None:
        """Record that the loop consumed `batch`."""
        self.positions[batch.worker] = list(batch.position)
        self.corrupt[batch.worker] = batch.corrupt
        self.next_worker = (batch.worker + 1) % self.num_workers
        self.batches += 1

    @property
    def corrupt_samples(self) -> int:
        """Corrupt samples skipped so far on this rank (for logging)."""
        return sum(self.corrupt)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamState:
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> StreamState:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class _Spec:
    """Everything a worker needs (inherited by, or pickled into, each worker process)."""

    shard_urls: tuple[str, ...]
    shard_counts: tuple[int, ...]
    shard_bytes: tuple[int, ...]
    resolution: int
    channels: int
    c_dim: int  # 0 unless labels are used
    batch_gpu: int
    seed: int
    rank: int
    world_size: int
    num_workers: int
    mirror: bool
    shuffle_buffer: int
    epoch: int | None  # None = resampled (infinite); else one epoch with this number


def _rng(spec: _Spec, worker: int, visit: int, purpose: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and platforms.
    epoch = "" if spec.epoch is None else f"/epoch{spec.epoch}"
    return random.Random(f"{spec.seed}/{spec.rank}/{worker}/{visit}{epoch}/{purpose}")


class _BatchBuilder:
    """Collects decoded samples of one worker into batches of batch_gpu."""

    def __init__(self, spec: _Spec, worker: int, corrupt: int, ring: BatchRing | None) -> None:
        self.spec = spec
        self.worker = worker
        self.corrupt = corrupt
        self.ring = ring
        self._new_batch()

    def _new_batch(self) -> None:
        self._img: np.ndarray | None = None
        self._slot = -1
        self._labels = np.zeros(self.spec.batch_gpu, np.int64)
        self._keys: list[str] = []

    def _images(self) -> np.ndarray:
        # The ring slot is taken with the batch's first image, not when the previous batch
        # is handed over, so a worker holds a slot only while it fills it.
        if self._img is None:
            s = self.spec
            if self.ring is None:
                self._img = np.empty(
                    (s.batch_gpu, s.channels, s.resolution, s.resolution), np.uint8
                )
            else:
                self._slot = self.ring.acquire()
                self._img = self.ring.images[self._slot].numpy()
        return self._img

    def add(self, sample: dict[str, Any], flip: bool, url: str) -> bool:
        """Decode one sample into the batch; False (and counted) if it is corrupt."""
        try:
            extension = image_key(sample)
            if extension is None:
                raise ValueError("no image in sample")
            label = int(sample["cls"]) if self.spec.c_dim else 0
            if not 0 <= label < max(1, self.spec.c_dim):
                raise ValueError(f"label {label} outside 0..{self.spec.c_dim - 1}")
            decode_into(sample[extension], self._images()[len(self._keys)], flip=flip)
        except (ValueError, KeyError) as exc:
            self.corrupt += 1
            log.warning("skipping corrupt sample %s of %s: %s", sample.get("__key__"), url, exc)
            return False
        self._labels[len(self._keys)] = label
        self._keys.append(sample["__key__"])
        return True

    @property
    def full(self) -> bool:
        return len(self._keys) == self.spec.batch_gpu

    def take(self, position: tuple[int, int]) -> WorkerBatch:
        """The full batch (its buffers are handed over, not copied)."""
        img = self._img if self.ring is None else None
        batch = WorkerBatch(
            img, self._slot, self._labels, self._keys, self.worker, position, self.corrupt
        )
        self._new_batch()
        return batch


def _all_corrupt(url_hint: str, visits: int) -> UserError:
    return UserError(
        f"no decodable sample in {visits} shard visits (e.g. {url_hint}); the dataset looks "
        "corrupt: re-run `sg2dist prepare`"
    )


class _ShardReader:
    """Reads the shards of one worker's visits; opens each s3:// shard a visit ahead."""

    def __init__(self, spec: _Spec, client: Any) -> None:
        self.spec = spec
        self.client = client
        self._ahead: OpenAhead | None = None

    def samples(self, shard: int, next_shard: int) -> Iterator[dict[str, Any]]:
        """The samples of `shard`; starts opening `next_shard`, the one visited after it."""
        ahead, self._ahead = self._ahead, None
        next_url = self.spec.shard_urls[next_shard]
        # A large shard takes long enough to decode that its open time does not matter,
        # and an opened stream left unread that long may be dropped by the server.
        if storage.is_s3(next_url) and self.spec.shard_bytes[next_shard] <= OPEN_AHEAD_MAX_BYTES:
            self._ahead = OpenAhead(next_url, self.client)
        return read_shard(self.spec.shard_urls[shard], client=self.client, ahead=ahead)


def _visit_samples(
    spec: _Spec, worker: int, visit: int, shards: tuple[int, int], skip: int, reader: _ShardReader
) -> Iterator[tuple[int, dict[str, Any] | None, bool]]:
    """(consumed count, sample or None while skipping, flip) for each sample of one visit.

    `shards` are this visit's shard and the next visit's. The shuffle and flip draws are
    replayed for skipped samples too (so the order matches an uninterrupted run), but
    skipped samples are not decoded.
    """
    order_rng = _rng(spec, worker, visit, "shuffle")
    flip_rng = _rng(spec, worker, visit, "flip")
    samples = reader.samples(*shards)
    shuffled = wds_shuffle(spec.shuffle_buffer, spec.shuffle_buffer, rng=order_rng)(samples)
    for consumed, sample in enumerate(shuffled, start=1):
        flip = spec.mirror and flip_rng.random() < 0.5
        yield consumed, (sample if consumed > skip else None), flip


def _visit_shard(spec: _Spec, worker: int, visit: int) -> int:
    return _rng(spec, worker, visit, "shard").randrange(len(spec.shard_urls))


def _resampled_batches(
    spec: _Spec, worker: int, start: list[int], corrupt: int, client: Any, ring: BatchRing | None
) -> Iterator[WorkerBatch]:
    builder = _BatchBuilder(spec, worker, corrupt, ring)
    reader = _ShardReader(spec, client)
    visit, skip = start
    barren_visits = 0  # visits in a row without one good sample
    while True:
        shard, next_shard = _visit_shard(spec, worker, visit), _visit_shard(spec, worker, visit + 1)
        url = spec.shard_urls[shard]
        good = False
        visit_samples = _visit_samples(spec, worker, visit, (shard, next_shard), skip, reader)
        for consumed, sample, flip in visit_samples:
            if sample is None:
                continue
            good = builder.add(sample, flip, url) or good
            if builder.full:
                # A finished visit is reported as the start of the next, so a resume
                # does not re-read a shard it has nothing left to take from.
                done = consumed == spec.shard_counts[shard]
                yield builder.take((visit + 1, 0) if done else (visit, consumed))
        # A resumed first visit may legitimately yield nothing new; do not count it.
        barren_visits = 0 if good or skip else barren_visits + 1
        if barren_visits > 2 * len(spec.shard_urls) + 8:
            raise _all_corrupt(url, barren_visits)
        visit, skip = visit + 1, 0


def _epoch_shards(spec: _Spec, rank: int, worker: int) -> list[int]:
    """This (rank, worker)'s shards of the epoch: split by node, then by worker."""
    order = list(range(len(spec.shard_urls)))
    random.Random(f"{spec.seed}/epoch{spec.epoch}/shards").shuffle(order)
    return order[rank :: spec.world_size][worker :: spec.num_workers]


def _epoch_batch_counts(spec: _Spec) -> list[list[int]]:
    """Whole batches each (rank, worker) can make in one epoch, from the manifest counts."""
    return [
        [
            sum(spec.shard_counts[s] for s in _epoch_shards(spec, rank, worker)) // spec.batch_gpu
            for worker in range(spec.num_workers)
        ]
        for rank in range(spec.world_size)
    ]


def _epoch_batches(
    spec: _Spec, worker: int, client: Any, ring: BatchRing | None
) -> Iterator[WorkerBatch]:
    shards = _epoch_shards(spec, spec.rank, worker)
    limit = _epoch_batch_counts(spec)[spec.rank][worker]
    builder = _BatchBuilder(spec, worker, 0, ring)
    reader = _ShardReader(spec, client)
    made, visit, made_at_pass_start = 0, 0, 0
    # Corrupt samples could leave a worker short of `limit` batches, and a rank with
    # fewer batches would hang DDP; so the worker wraps around its shards until it
    # has `limit`. Without corrupt samples the first pass always suffices.
    while made < limit:
        if visit % len(shards) == 0:
            if visit > 0 and made == made_at_pass_start:
                raise _all_corrupt(spec.shard_urls[shards[0]], visit)
            made_at_pass_start = made
        shard, next_shard = shards[visit % len(shards)], shards[(visit + 1) % len(shards)]
        visit_samples = _visit_samples(spec, worker, visit, (shard, next_shard), 0, reader)
        for consumed, sample, flip in visit_samples:
            assert sample is not None
            builder.add(sample, flip, spec.shard_urls[shard])
            if builder.full:
                yield builder.take((visit, consumed))
                made += 1
                if made == limit:
                    return
        visit += 1


class _WorkerStreams:
    """What every worker runs (a workers.BatchStreams): the batches of one logical worker stream."""

    def __init__(self, spec: _Spec, state: StreamState | None) -> None:
        self.spec = spec
        self.state = state

    def batches(
        self, loader_worker: int, ring: BatchRing | None
    ) -> Iterator[WorkerBatch | WorkerFailure]:
        try:
            # One boto3 client per worker process, created here, after the fork.
            client = storage.s3_client() if storage.is_s3(self.spec.shard_urls[0]) else None
            if self.spec.epoch is not None:
                yield from _epoch_batches(self.spec, loader_worker, client, ring)
                return
            # Rotate ids so the first batch (from loader worker 0) comes from the worker
            # the saved stream would have used next.
            rotation = self.state.next_worker if self.state else 0
            worker = (loader_worker + rotation) % self.spec.num_workers
            start = self.state.positions[worker] if self.state else [0, 0]
            corrupt = self.state.corrupt[worker] if self.state else 0
            yield from _resampled_batches(self.spec, worker, start, corrupt, client, ring)
        except UserError as exc:
            yield WorkerFailure(str(exc), retryable=isinstance(exc, TemporaryError))


class StreamLoader:
    """Iterator of Batch for one rank; `state` is the StreamState the loop updates."""

    def __init__(self, spec: _Spec, state: StreamState, workers: int, pin_memory: bool) -> None:
        self.spec = spec
        self.state = state
        self._pin_memory = pin_memory
        self._limit = None
        if spec.epoch is not None:
            self._limit = min(sum(per_worker) for per_worker in _epoch_batch_counts(spec))
        self._streams = _WorkerStreams(
            spec, None if spec.epoch is not None else StreamState.from_dict(state.to_dict())
        )
        self._workers = workers
        self._pool: WorkerPool | None = None  # started on the first batch
        self._in_process: Iterator[Any] | None = None  # workers=0
        self._delivered = 0

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches this rank yields in epoch mode (equal on every rank); None when resampled."""
        return self._limit

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of this loader's worker processes, by loader worker; () before the first
        batch starts them, after close(), and with workers=0."""
        return self._pool.pids if self._pool is not None else ()

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> Batch:
        if self._limit is not None and self._delivered >= self._limit:
            self.close()
            raise StopIteration
        loader_worker, item = self._next_item()
        if isinstance(item, WorkerFailure):
            self.close()
            raise item.error()
        if isinstance(item, ExceptionWrapper):
            self.close()
            item.reraise()
        self._delivered += 1
        return self._to_batch(item, loader_worker)

    def _next_item(self) -> tuple[int, Any]:
        if self._workers == 0:
            if self._in_process is None:
                self._in_process = self._streams.batches(0, None)
            return 0, next(self._in_process)
        if self._pool is None:
            s = self.spec
            shape = (s.batch_gpu, s.channels, s.resolution, s.resolution)
            # The context that starts the workers also makes the rings' semaphores.
            self._pool = WorkerPool(self._streams, shape, self._workers, mp.get_context())
        return self._pool.next_item()

    def _to_batch(self, raw: WorkerBatch, loader_worker: int) -> Batch:
        pin = self._pin_memory and torch.cuda.is_available()  # faster, asynchronous GPU copies
        if raw.img_NCHW is None:
            assert self._pool is not None
            img = self._pool.rings[loader_worker].take_out(raw.slot, pin)
        else:
            img = torch.from_numpy(raw.img_NCHW)
            img = img.pin_memory() if pin else img
        c = one_hot(torch.from_numpy(raw.labels[: len(raw.keys)]), self.spec.c_dim)
        c = c.pin_memory() if pin else c
        return Batch(img, c, raw.keys, raw.worker, raw.position, raw.corrupt)

    def close(self) -> None:
        """Stop the worker processes (also happens when the loader is garbage-collected)."""
        if self._pool is not None:
            self._pool.close()
        self._pool, self._in_process = None, None


def _check_resume_state(state: StreamState, fresh: StreamState) -> None:
    for key in ("seed", "rank", "world_size", "num_workers", "manifest_hash"):
        saved, now = getattr(state, key), getattr(fresh, key)
        if saved != now:
            raise UserError(
                f"the saved data stream has {key}={saved} but this run has {now}; resume with the "
                f"same data.url, seed, world size and data.workers, or start the stream afresh"
            )


def build_loader(
    url: str,
    *,
    batch_gpu: int,
    rank: int,
    world_size: int,
    seed: int,
    workers: int,
    mirror: bool,
    shuffle_buffer: int,
    use_labels: bool,
    state: StreamState | dict[str, Any] | None = None,
    resampled: bool = True,
    epoch: int = 0,
    pin_memory: bool = False,
    manifest: Manifest | None = None,
) -> StreamLoader:
    """The batch stream of `rank` over the dataset at `url` (see the module docstring)."""
    manifest = manifest or open_manifest(url)
    if use_labels and manifest.c_dim == 0:
        raise UserError(
            f"dataset {manifest.url} has no labels; set data.use_labels=false or prepare it "
            "with --labels folders / --labels FILE.csv"
        )
    if batch_gpu < 1 or not 0 <= rank < world_size:
        raise UserError(
            f"batch_gpu={batch_gpu}, rank={rank}, world_size={world_size} are inconsistent"
        )
    num_workers = max(1, workers)
    spec = _Spec(
        shard_urls=tuple(manifest.shard_url(i) for i in range(len(manifest.shards))),
        shard_counts=tuple(s.count for s in manifest.shards),
        shard_bytes=tuple(s.bytes for s in manifest.shards),
        resolution=manifest.resolution,
        channels=manifest.channels,
        c_dim=manifest.c_dim if use_labels else 0,
        batch_gpu=batch_gpu,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        mirror=mirror,
        shuffle_buffer=max(1, shuffle_buffer),
        epoch=None if resampled else epoch,
    )
    fresh = StreamState(seed, rank, world_size, num_workers, manifest.manifest_hash)
    if not resampled:
        if state is not None:
            raise UserError("epoch mode (resampled=False) does not resume from a stream state")
        if min(sum(per_worker) for per_worker in _epoch_batch_counts(spec)) == 0:
            raise UserError(
                f"dataset {manifest.url} ({len(manifest.shards)} shards) is too small to give "
                f"every one of {world_size} ranks x {num_workers} workers a batch of {batch_gpu}; "
                "use fewer workers, a smaller batch, or prepare with a smaller --shard-size"
            )
    if state is not None:
        state = StreamState.from_dict(state) if isinstance(state, dict) else state
        _check_resume_state(state, fresh)
    return StreamLoader(spec, state or fresh, workers, pin_memory)
