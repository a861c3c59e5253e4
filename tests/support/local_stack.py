"""One service of `launch/local-stack` run as a subprocess, for test fixtures.

The test servers (SeaweedFS in support/s3.py, MLflow in support/mlflow_server.py) are
started by the same script developers use, so the tests exercise it too. They share one
lifecycle, kept here so that a fix to it (a swallowed ready line, a hung stop) reaches
both: start local-stack, read its `export` lines until the ready line, keep the port it
chose so a restart comes back on the same address, and stop it without leaving
processes behind. Subclasses only say what differs between the services.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar, Self

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_STACK = REPO_ROOT / "launch" / "local-stack"
READY_LINE = "# local-stack ready"


def read_local_stack_exports(process: subprocess.Popen, timeout_s: float) -> dict[str, str] | None:
    """The export lines `local-stack` prints before its ready line; None if it exited or
    was not ready within `timeout_s`."""
    assert process.stdout is not None
    # A reader thread, not select(): a buffered readline can swallow the ready line.
    lines: queue.Queue[str] = queue.Queue()
    stdout = process.stdout
    threading.Thread(
        target=lambda: [lines.put(line) for line in stdout] + [lines.put("")], daemon=True
    ).start()
    exports: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if not line:  # local-stack exited before it was ready
            return None
        if line.startswith("export "):
            key, _, value = line[len("export ") :].strip().partition("=")
            exports[key] = value
        elif line.startswith(READY_LINE):
            return exports
    return None


class LocalStackService:
    """`local-stack --services <services>` in `workdir`, serving on `port`.

    `port` is 0 (free port) until the first start, then the one read from the export
    named by `port_export`; later starts ask for it again, so a restarted server keeps its
    address (and, since `workdir` is reused, its data).
    """

    services: ClassVar[str]  # the --services value
    port_flag: ClassVar[str]  # the local-stack option that sets the port
    port_export: ClassVar[str]  # the export whose URL ends in the chosen port
    log_file: ClassVar[str]  # in workdir; its tail explains a failed start
    display_name: ClassVar[str]  # for error messages
    start_timeout_s: ClassVar[float] = 60.0
    # Extra time to wait for the ready line beyond the start timeout (for services that are
    # told the timeout themselves and need a moment to report it).
    ready_grace_s: ClassVar[float] = 0.0
    # local-stack stops its children itself; this is how long it may take before a kill.
    stop_timeout_s: ClassVar[float] = 20.0

    def __init__(self, workdir: str | Path, bucket: str) -> None:
        self.workdir = str(workdir)
        self.bucket = bucket
        self.exports: dict[str, str] = {}
        self.port = 0
        self._process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self, timeout_s: float) -> list[str]:
        """The local-stack command line; override to add options."""
        return [
            sys.executable,
            str(LOCAL_STACK),
            "--dir",
            self.workdir,
            "--services",
            self.services,
            "--bucket",
            self.bucket,
            self.port_flag,
            str(self.port),
        ]

    def _env(self) -> dict[str, str] | None:
        """The environment for local-stack; None inherits this process's."""
        return None

    def start(self, timeout_s: float | None = None) -> Self:
        """Start (or restart on the same port and workdir) and wait until it serves."""
        if timeout_s is None:
            timeout_s = self.start_timeout_s
        self._process = subprocess.Popen(
            self._command(timeout_s),
            stdout=subprocess.PIPE,
            text=True,
            env=self._env(),
            stdin=subprocess.DEVNULL,
        )
        self.exports = self._read_exports(timeout_s + self.ready_grace_s)
        self.port = int(self.exports[self.port_export].rsplit(":", 1)[1])
        return self

    def _read_exports(self, timeout_s: float) -> dict[str, str]:
        """The exports of a ready local-stack; otherwise stop it and raise with its log tail."""
        assert self._process is not None
        exports = read_local_stack_exports(self._process, timeout_s)
        if exports is not None:
            return exports
        self.stop()
        log = Path(self.workdir, self.log_file)
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(
            f"{self.display_name} did not start within {timeout_s}s; log tail:\n{tail}"
        )

    def stop(self) -> None:
        """Stop local-stack, which stops the service it started (SIGKILL after a grace
        period); a no-op when not started."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None
