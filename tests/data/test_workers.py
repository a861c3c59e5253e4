"""Data worker processes: ring reuse, forkserver, stopping, SIGTERM, dying and failing workers."""

from __future__ import annotations

import signal
import time
from itertools import islice

import psutil
import pytest

from sg2dist.data import stream
from sg2dist.data.workers import RING_SLOTS, WORKER_CHECK_S
from sg2dist.errors import EXIT_RETRYABLE, TemporaryError, UserError
from sg2dist.storage import StorageUnavailableError


def test_batches_kept_while_ring_slots_are_reused_equal_in_process_ones(stream_dataset, streams):
    # Far more batches than ring slots, all kept: a reused slot must not change a batch
    # already handed out, so each Batch owns a private copy of its images.
    count = 4 * RING_SLOTS
    from_ring = list(islice(streams.loader(stream_dataset, workers=1), count))
    in_process = list(islice(streams.loader(stream_dataset, workers=0), count))
    assert streams.same_batches(from_ring, in_process)
    assert not any(batch.img_NCHW.is_shared() for batch in from_ring)


@pytest.mark.timeout(120)
def test_workers_started_by_forkserver_survive_a_consumer_slower_than_their_ring(
    stream_dataset, streams, monkeypatch
):
    # Under forkserver (Python 3.14's default start method) a worker's OS parent is the
    # fork server, not this process; a worker waiting on a full ring must still wait.
    forkserver = stream.mp.get_context("forkserver")
    monkeypatch.setattr(stream.mp, "get_context", lambda *_: forkserver)
    slow = streams.loader(stream_dataset, workers=1)
    batches = []
    for batch in islice(slow, RING_SLOTS + 2):
        batches.append(batch)
        time.sleep(1.5 * WORKER_CHECK_S if len(batches) == 1 else 0)
    slow.close()
    in_process = list(islice(streams.loader(stream_dataset, workers=0), len(batches)))
    assert streams.same_batches(batches, in_process)


def _data_workers(loader) -> list[psutil.Process]:
    """The loader's own worker processes, by the ids it started them with (other children of
    this process, such as workers of another test's loader, are not among them)."""
    return [psutil.Process(pid) for pid in loader.worker_pids]


def _has_ended(process: psutil.Process) -> bool:
    """Exited (a zombie until its parent reaps it) or gone."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_closing_the_loader_stops_its_worker_processes(stream_dataset, streams):
    loader = streams.loader(stream_dataset, workers=2)
    next(loader)
    workers = _data_workers(loader)
    assert len(workers) == 2
    loader.close()
    assert all(_has_ended(p) for p in workers)
    assert loader.worker_pids == ()


@pytest.mark.timeout(60)
def test_workers_end_on_sigterm_even_when_the_trainer_handles_it(stream_dataset, streams):
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # as the trainer's stop flag
    try:
        loader = streams.loader(stream_dataset, workers=2)
        # One batch from each worker (they take turns): each has set up its own signal
        # handling before its first batch. A SIGTERM before that would reach the trainer's
        # handler, inherited through fork, and be ignored.
        assert {next(loader).worker for _ in range(2)} == {0, 1}
    finally:
        signal.signal(signal.SIGTERM, previous)
    workers = _data_workers(loader)
    for worker in workers:
        worker.terminate()
    # Polled, not waited for: the pool reaps its own workers. The deadline is a hang guard;
    # the default action of SIGTERM is immediate.
    deadline = time.monotonic() + 30
    while not all(_has_ended(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_has_ended(w) for w in workers)
    loader.close()


@pytest.mark.timeout(60)
def test_a_worker_that_dies_is_a_clear_error_not_a_hang(stream_dataset, streams):
    loader = streams.loader(stream_dataset, workers=2)
    next(loader)
    for worker in _data_workers(loader):
        worker.kill()
    with pytest.raises(RuntimeError, match=r"data worker \d \(pid \d+\) exited unexpectedly"):
        for _ in islice(loader, 100):
            pass


def test_an_unexpected_worker_exception_reaches_the_main_process(
    stream_dataset, streams, monkeypatch
):
    def broken(data, out, *, flip):
        raise RuntimeError("decoder bug")

    # The workers' batch builder (in stream.py) looks it up; forked workers inherit it.
    monkeypatch.setattr(stream, "decode_into", broken)
    with pytest.raises(RuntimeError, match="(?s)in data worker 0.*decoder bug"):
        next(streams.loader(stream_dataset, workers=1))


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (StorageUnavailableError("cannot reach S3 endpoint"), TemporaryError),
        (UserError("shard is damaged"), UserError),
    ],
)
def test_a_worker_error_keeps_whether_waiting_can_fix_it(
    stream_dataset, streams, monkeypatch, raised, expected
):
    # An S3 outage met by a data worker must end the trainer with the retryable exit code
    # (the Job resumes once storage is back), a damaged shard with the fatal one.
    def failing(data, out, *, flip):
        raise raised

    monkeypatch.setattr(stream, "decode_into", failing)  # forked workers inherit it
    with pytest.raises(UserError, match=str(raised)) as info:
        next(streams.loader(stream_dataset, workers=1))
    assert type(info.value) is expected
    assert (info.value.exit_code == EXIT_RETRYABLE) == (expected is TemporaryError)
