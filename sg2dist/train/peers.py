"""The processes of a multi-process run watch each other; rank 0's long work is waited for
outside the collectives.

Why: every collective (the gradient all-reduce, the stop flag) blocks until all ranks join
it. A rank that crashes closes its sockets and the others fail within seconds, but a rank
that hangs (its node frozen under memory pressure, a network partition, a GPU or driver
hang) leaves them blocked for as long as the process-group timeout, with every GPU of the
job held. That timeout used to be 2 hours, because rank 0 alone writes checkpoints and
scores metrics while the others wait.

What this module does instead, so that the training step gains no synchronisation at all:

- Heartbeats in the rendezvous store. A daemon thread in every process adds 1 to its own
  counter in the TCPStore that torchrun already serves on MASTER_ADDR:MASTER_PORT, and reads
  every rank's counter in the same round trip, every `beat_interval_s`. A second thread
  judges what the first last saw: a counter that has not moved for `run.peer_timeout_s`
  names a silent rank; a store that has not answered for that long means node 0 (which
  serves it) is silent. Two threads, because a store call to a frozen host can block well
  past its own timeout. The judge prints one line naming the rank and node and ends the
  process with the retryable exit code (75), so the Job restarts every node and they
  resume from the latest checkpoint. The threads run beside the main thread (torch releases
  the GIL in kernels and collectives), so a long step, a long checkpoint write or a blocked
  collective does not stop them, and they cost the step nothing.
- Rank-0-only work is waited for in the store, not in a collective (`after_main`): the other
  ranks block in a store wait bounded by LONG_WORK_LIMIT_S, while the heartbeats tell them
  within `peer_timeout_s` if rank 0 died or froze meanwhile. Only the spans that can be long
  (a snapshot: grid, checkpoint and metrics scores; the final model upload) pay for this
  one extra round trip; a step or a tick pays nothing.
- A short collective timeout as the backstop: `collective_timeout_s`, `peer_timeout_s` plus
  max(`peer_timeout_s`, 30 s), instead of 2 hours. It catches the one case heartbeats cannot
  see (a process whose heartbeat thread lives while its main thread is stuck, e.g. in a hung
  GPU kernel), and gives heartbeats a head start so that a frozen peer is named, not just
  timed out. On GPUs the NCCL watchdog enforces it (`nccl_environment`).

Also considered: a monitored barrier after each rank-0 span (gloo only, and it names ranks
that do not arrive, while here the slow one is rank 0 itself), and sharing the work (a
checkpoint is one writer's job). One process (world size 1) has no peers: everything here
is then a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch.distributed as dist

from sg2dist.errors import EXIT_RETRYABLE, TemporaryError

# The longest rank-0-only span (checkpoint write, metrics scoring, final model upload) the
# others wait for; rank 0 dying or freezing meanwhile is caught by heartbeats much sooner.
LONG_WORK_LIMIT_S = 2 * 3600.0
MIN_COLLECTIVE_SLACK_S = 30.0
_FAILED = "failed"  # what rank 0 leaves in a fence when its work raised
_LEFT = b"left"  # a rank's heartbeat value once it finished normally


def collective_timeout_s(peer_timeout_s: float) -> float:
    """The process-group timeout: longer than a heartbeat needs to name a silent peer."""
    return peer_timeout_s + max(peer_timeout_s, MIN_COLLECTIVE_SLACK_S)


def beat_interval_s(peer_timeout_s: float) -> float:
    """About ten heartbeats per timeout: a silent peer is named within ~1.1 x the timeout."""
    return min(max(peer_timeout_s / 10, 0.2), 10.0)


def nccl_environment(peer_timeout_s: float) -> dict[str, str]:
    """NCCL settings for a hung GPU collective, applied (unless set already) before the process
    group starts. The NCCL watchdog, not the main thread, notices a collective that ran past
    the timeout; these make it act on it."""
    timeout_s = str(int(collective_timeout_s(peer_timeout_s)))
    return {
        # Abort the communicators and end the process on a timed-out or failed collective,
        # instead of leaving the rank blocked: its exit (134) is retried by the Job.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        # If the watchdog thread itself stops (a driver hang), the monitor ends the process.
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": timeout_s,
        # Flight recorder: every rank records its last collectives and dumps them on a
        # timeout (to TORCH_FR_DUMP_TEMP_FILE, default /tmp/nccl_trace_rank_<rank>), which
        # shows the rank that never joined (`torchfrtrace`).
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_FR_DUMP_ON_TIMEOUT": "1",
    }


@contextlib.contextmanager
def collective_failures_are_retryable(rank: int) -> Iterator[None]:
    """A collective that failed (a peer died, or one alive but stuck made it time out) becomes
    one line and the retryable exit code instead of a traceback and exit 1."""
    try:
        yield
    except RuntimeError as exc:
        # NCCL and store failures raise DistError; gloo raises a plain RuntimeError whose
        # message starts with the gloo source file that failed.
        if not (isinstance(exc, dist.DistError) or "/gloo/" in str(exc)):
            raise
        lines = str(exc).strip().splitlines()
        raise TemporaryError(
            f"rank {rank} ({node_name()}): a collective failed ({lines[0] if lines else exc!r}): "
            "a peer process died, or is alive but stuck; restart the job to resume from the "
            "latest checkpoint"
        ) from None


@dataclass
class _PeerView:
    """What the beating thread last saw in the store; read by the judging thread."""

    answered: float  # time.monotonic() of the store's last complete answer
    moved: dict[int, float]  # rank -> when its beat count last changed (or our start)
    counts: dict[int, bytes] = field(default_factory=dict)
    who: dict[int, str] = field(default_factory=dict)  # rank -> "nodeN on HOST, pid P"
    left: set[int] = field(default_factory=set)  # ranks that finished normally


def node_name() -> str:
    """'node<machine rank>' as torchrun (GROUP_RANK) or a Kubernetes Indexed Job sets it."""
    for var in ("GROUP_RANK", "NODE_RANK", "JOB_COMPLETION_INDEX"):
        if os.environ.get(var, "").isdigit():
            return f"node{os.environ[var]}"
    return "node0"


class Peers:
    """Heartbeats and rank-0 fences of one process; see the module docstring.

    `start()` begins beating and watching, `after_main(name, work)` runs `work` on rank 0 while
    the others wait in the store, `close()` tells the others this rank finished normally.
    """

    def __init__(self, *, rank: int, world_size: int, peer_timeout_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.peer_timeout_s = peer_timeout_s
        self.beat_interval_s = beat_interval_s(peer_timeout_s)
        self._address = (os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", 0)))
        # Keys of one launch: a torchrun restart gets fresh ones in the same agent store.
        self._prefix = f"sg2dist/peers/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._fences = 0
        self._fence_store: dist.TCPStore | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards _view
        self._view = _PeerView(answered=0.0, moved={})

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ setup

    def _connect(self, timeout_s: float) -> dist.TCPStore:
        """Our own client of the rendezvous store (one per thread: clients are not shared)."""
        host, port = self._address
        return dist.TCPStore(
            host,
            port,
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )

    def start(self) -> None:
        """Announce this rank and begin beating and watching (after the process group is up)."""
        if not self.active:
            return
        if not self._address[0] or not self._address[1]:
            raise TemporaryError(
                "MASTER_ADDR / MASTER_PORT are not set in a multi-process run; "
                "start it with torchrun, accelerate launch or launch/sg2dist-launch"
            )
        self._fence_store = self._connect(LONG_WORK_LIMIT_S)
        identity = f"{node_name()} on {socket.gethostname()}, pid {os.getpid()}"
        self._fence_store.set(self._key("who", self.rank), identity)
        self._fence_store.add(self._key("beat", self.rank), 1)
        now = time.monotonic()
        others = [r for r in range(self.world_size) if r != self.rank]
        self._view = _PeerView(answered=now, moved=dict.fromkeys(others, now))
        for target in (self._beat, self._judge):
            thread = threading.Thread(target=target, name=f"sg2dist-peers-{target.__name__[1:]}")
            thread.daemon = True  # never keeps a finished or failed process alive
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """This rank finished normally: stop watching, and tell the others not to wait for its
        heartbeats (ranks end a few moments apart)."""
        if not self._threads:
            return
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=2 * self.beat_interval_s + 1)
        self._threads = []
        assert self._fence_store is not None
        with contextlib.suppress(dist.DistError):  # the store is gone: the others end too
            self._fence_store.set(self._key("beat", self.rank), _LEFT.decode())

    def _key(self, kind: str, rank: int) -> str:
        return f"{self._prefix}/{kind}/{rank}"

    # ------------------------------------------------------------------ rank-0 work

    def after_main(self, name: str, work: Callable[[], str]) -> str:
        """`work()` on rank 0 while the other ranks wait in the store; every rank returns its
        result (a short string). Every rank must call this at the same point, like a
        collective. Used for rank-0 spans that may outlast the collective timeout."""
        if not self.active:
            return work()
        self._fences += 1
        key = f"{self._prefix}/fence/{self._fences}/{name}"
        assert self._fence_store is not None, "start() first"
        if self.rank == 0:
            try:
                result = work()
            except BaseException:
                self._fence_store.set(key, _FAILED)  # release the others: they end too
                raise
            self._fence_store.set(key, result)
            return result
        try:
            self._fence_store.wait([key], datetime.timedelta(seconds=LONG_WORK_LIMIT_S))
        except dist.DistError:
            raise TemporaryError(
                f"rank 0 did not finish its {name} within {LONG_WORK_LIMIT_S:.0f} s although "
                "it still sends heartbeats; restart the job to resume from the latest checkpoint"
            ) from None
        result = self._fence_store.get(key).decode()
        if result == _FAILED:
            raise TemporaryError(
                f"rank 0 failed during its {name} (its own error says why); this rank stops too"
            )
        return result

    # ------------------------------------------------------------------ the two threads

    def _beat(self) -> None:
        """Beat, and read every rank's beat count (and once, who they are) into the view."""
        others = sorted(self._view.moved)
        beat_keys = {r: self._key("beat", r) for r in others}
        store: dist.TCPStore | None = None
        missing = set(others)  # not beaten yet (still starting)
        while not self._stopping.wait(self.beat_interval_s):
            try:
                store = store or self._connect(self.beat_interval_s + 1)
                store.add(self._key("beat", self.rank), 1)
                missing = {r for r in missing if not store.check([beat_keys[r]])}
                present = [r for r in others if r not in missing]
                values = store.multi_get([beat_keys[r] for r in present]) if present else []
                counts = dict(zip(present, values, strict=True))
                who = {}
                if not missing and not self._view.who:  # every rank announced itself
                    names = store.multi_get([self._key("who", r) for r in others])
                    who = {r: name.decode() for r, name in zip(others, names, strict=True)}
            except (RuntimeError, OSError):  # DistError and friends: retry with a new client
                store = None  # one that timed out may be out of step
                continue
            now = time.monotonic()
            with self._lock:
                view = self._view
                view.answered = now
                view.who = view.who or who
                for r, count in counts.items():
                    if count == _LEFT:
                        view.left.add(r)
                    elif count != view.counts.get(r):
                        view.counts[r], view.moved[r] = count, now

    def _judge(self) -> None:
        """End the process when the store or a rank has been silent for peer_timeout_s."""
        while not self._stopping.wait(self.beat_interval_s):
            now = time.monotonic()
            with self._lock:
                view = self._view
                store_quiet_s = now - view.answered
                silent = sorted(
                    r
                    for r, moved in view.moved.items()
                    if r not in view.left and now - moved > self.peer_timeout_s
                )
                who = dict(view.who)
                quiet_s = now - max((view.moved[r] for r in silent), default=now)
            if store_quiet_s > self.peer_timeout_s:  # then no rank can be judged
                self._give_up(self._silent_store_message(store_quiet_s))
            if silent:
                names = ", ".join(f"rank {r} ({who.get(r, 'not started')})" for r in silent)
                self._give_up(
                    f"{names} sent no heartbeat for {quiet_s:.0f} s "
                    f"(run.peer_timeout_s={self.peer_timeout_s:g}): frozen, hung or cut off"
                )

    def _silent_store_message(self, quiet_s: float) -> str:
        host, port = self._address
        return (
            f"the rendezvous store at {host}:{port}, served by node0, has not answered for "
            f"{quiet_s:.0f} s (run.peer_timeout_s={self.peer_timeout_s:g}): node0 is frozen, "
            "hung or cut off"
        )

    def _give_up(self, why: str) -> None:
        # The main thread may be blocked in a collective with the silent peer, so it cannot
        # be asked to stop: end the process from here. Nothing half-written is ever taken for
        # a checkpoint, so ending mid-write is safe.
        print(
            f"sg2dist: error: {why}; rank {self.rank} ({node_name()}) exits {EXIT_RETRYABLE} so "
            "the job restarts every node from the latest checkpoint",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_RETRYABLE)
