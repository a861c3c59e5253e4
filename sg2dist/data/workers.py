"""Data worker processes, and how their batches reach the main process.

Each worker of a loader is a plain process that runs one worker stream (`batches` of a
`BatchStreams`, see stream.py) and decodes every batch straight into its `BatchRing`: a
few shared-memory batch slots that the main process makes once and the worker inherits.
Only a small description of each batch (`WorkerBatch`: ring slot, labels, keys, position)
crosses a pipe; the main process copies the images out of the slot and frees it.

Why not a torch DataLoader, and why not a pickled array or a fresh shared-memory tensor
per batch: each adds CPU work for every batch, and that work comes out of decoding (see
`WorkerPool` and `BatchRing`). Workers leave the trainer's process group, so the SIGTERM
of a preemption reaches only the trainer; they end when the trainer closes the pool or
dies.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import signal
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np
import torch
from torch._utils import ExceptionWrapper

from sg2dist.errors import TemporaryError, UserError

RING_SLOTS = 3  # batches a worker may have ready ahead of the main process (see BatchRing)
WORKER_CHECK_S = 1.0  # how often a waiting process checks that the other side still lives


@dataclass
class WorkerBatch:
    """A batch as it leaves a worker for the main process."""

    img_NCHW: np.ndarray | None  # noqa: N815 - uint8 [N, C, R, R]; None: in ring slot `slot`
    slot: int  # the worker's ring slot holding the images; -1 in process
    labels: np.ndarray  # int64 [N]
    keys: list[str]
    worker: int
    position: tuple[int, int]
    corrupt: int


@dataclass
class WorkerFailure:
    """A UserError raised in a worker, carried to the main process as one line."""

    message: str
    # A TemporaryError (S3 unreachable): the trainer must exit with the retryable code, so
    # that the Job resumes the run once storage is back, instead of failing it as a mistake.
    retryable: bool = False

    def error(self) -> UserError:
        return TemporaryError(self.message) if self.retryable else UserError(self.message)


class BatchRing:
    """Shared-memory batch slots of one worker stream, made once and reused batch after batch.

    How images reach the main process decides much of the loader's cost. Pickling an array
    copies it several times on its way; a fresh shared-memory tensor per batch costs its
    creation, an fd hand-over and a page fault per 4 KiB in both processes, every batch. A
    ring made once by the main process (the worker inherits it) costs one copy: the worker
    decodes straight into a slot, the main process copies the batch out and frees the slot.

    Each slot has a semaphore: the worker takes it before filling the slot, the main process
    gives it back after the copy, so a batch is never overwritten before it was taken. This
    is also the back-pressure: a worker runs at most RING_SLOTS batches ahead.
    """

    def __init__(self, shape: tuple[int, ...], context: Any) -> None:
        self.images = torch.empty((RING_SLOTS, *shape), dtype=torch.uint8).share_memory_()
        self._free = [context.Semaphore(1) for _ in range(RING_SLOTS)]
        self._next = 0  # the worker's next slot (only the worker uses it)

    def acquire(self) -> int:
        """In the worker: the next slot, once the main process has copied out its last batch."""
        slot = self._next
        while not self._free[slot].acquire(timeout=WORKER_CHECK_S):
            # parent_process(), not getppid(): under forkserver (Python 3.14's default) the
            # OS parent is the server, not the trainer.
            parent = mp.parent_process()
            assert parent is not None  # only worker processes take slots
            if not parent.is_alive():  # the trainer is gone; nobody frees it
                raise SystemExit(0)
        self._next = (slot + 1) % RING_SLOTS
        return slot

    def take_out(self, slot: int, pin_memory: bool) -> torch.Tensor:
        """In the main process: a private copy of the batch in `slot`; frees the slot."""
        img = torch.empty(self.images.shape[1:], dtype=torch.uint8, pin_memory=pin_memory)
        # numpy, not Tensor.copy_: torch spreads the copy over its OpenMP threads, which then
        # spin-wait, burning CPU time that the decoding workers need.
        np.copyto(img.numpy(), self.images[slot].numpy())
        self._free[slot].release()
        return img


class BatchStreams(Protocol):
    """What every worker process runs (stream.py's _WorkerStreams); pickled into each worker
    when processes are not forked."""

    def batches(
        self, loader_worker: int, ring: BatchRing | None
    ) -> Iterator[WorkerBatch | WorkerFailure]:
        """The batches of loader worker `loader_worker`, decoded into `ring` (None: in process)."""
        ...


def _worker_main(
    streams: BatchStreams, loader_worker: int, ring: BatchRing, sender: Connection
) -> None:
    """A worker process: batches into its ring, their descriptions to the main process.

    `None` after the last batch ends an epoch-mode worker; an unexpected exception
    travels as torch's ExceptionWrapper, which re-raises it in the main process with the
    worker's traceback (as in a DataLoader).
    """
    # torchrun and accelerate launch forward SIGTERM to the whole process group; a worker
    # killed by it makes the trainer fail before it can write its preemption checkpoint.
    # Workers still end with the trainer: it stops them, and they exit when it dies.
    os.setpgid(0, 0)
    # A forked worker inherits the trainer's handlers, which only flag a stop request; the
    # SIGTERM that stops a worker must end it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    torch.set_num_threads(1)  # decoding needs no torch threads (as in DataLoader workers)
    try:
        for item in streams.batches(loader_worker, ring):
            sender.send(item)
        sender.send(None)
    except (BrokenPipeError, ConnectionResetError):  # the main process is gone
        return
    except Exception:  # a bug, not a data problem: show it in the main process
        sender.send(ExceptionWrapper(where=f"in data worker {loader_worker}"))


class WorkerPool:
    """The worker processes of one pass over the stream, read in turn: batch k from worker
    k % W; a worker that finishes (epoch mode) drops out of the turn.

    Plain processes rather than a torch DataLoader: its per-batch protocol (an index
    queue, feeder threads in both processes, a profiler hook per batch) adds CPU time for
    every batch on top of the ring, time that comes out of decoding. Here a worker sends
    only a small description of each batch; the images wait in its ring.
    """

    def __init__(
        self, streams: BatchStreams, batch_shape: tuple[int, ...], workers: int, context: Any
    ) -> None:
        self.rings = [BatchRing(batch_shape, context) for _ in range(workers)]
        self._receivers: list[Connection] = []
        self._processes: list[Any] = []
        # Registered first, so that workers started before a failing start are stopped too.
        self._finalizer = weakref.finalize(self, _stop_workers, self._processes, self._receivers)
        for loader_worker, ring in enumerate(self.rings):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker_main,
                args=(streams, loader_worker, ring, sender),
                name=f"sg2dist-data-{loader_worker}",
                daemon=True,  # ends with the main process even if nobody closes the pool
            )
            process.start()
            sender.close()  # the worker's end: with it closed here, a dead worker reads as EOF
            self._receivers.append(receiver)
            self._processes.append(process)
        self._turn = collections.deque(range(workers))

    @property
    def pids(self) -> tuple[int, ...]:
        """The worker processes' ids, by loader worker (for tests and diagnostics)."""
        return tuple(process.pid for process in self._processes)

    def next_item(self) -> tuple[int, Any]:
        """(loader worker, its next item) in turn; StopIteration once every worker ended."""
        while self._turn:
            loader_worker = self._turn.popleft()
            item = self._receive(loader_worker)
            if item is None:  # this worker's epoch is over: it leaves the turn
                continue
            self._turn.append(loader_worker)
            return loader_worker, item
        raise StopIteration

    def _receive(self, loader_worker: int) -> Any:
        receiver, process = self._receivers[loader_worker], self._processes[loader_worker]
        try:
            while not receiver.poll(WORKER_CHECK_S):
                if not process.is_alive():
                    raise EOFError
            return receiver.recv()
        except EOFError:
            process.join(WORKER_CHECK_S)
            raise RuntimeError(
                f"data worker {loader_worker} (pid {process.pid}) exited unexpectedly "
                f"(exit code {process.exitcode}); see its output above"
            ) from None

    def close(self) -> None:
        self._finalizer()


def _stop_workers(processes: list[Any], receivers: list[Connection]) -> None:
    """Stop worker processes (they hold nothing worth a graceful end) and reap them."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(WORKER_CHECK_S)
        if process.is_alive():
            process.kill()
            process.join()
    for receiver in receivers:
        receiver.close()
