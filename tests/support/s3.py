"""A real S3 server for tests: SeaweedFS started through `launch/local-stack`.

`s3_server` (session scope) starts one server on loopback with free ports and
enforced access keys, and stops it at the end of the session. `s3_env` (function
scope) points this process's environment at it (so `sg2dist.storage` and forked
DataLoader workers find it) and gives a fresh `s3://` prefix to write under.

    def test_x(s3_env):            # s3_env.url == "s3://sg2dist-test/<unique prefix>"
        storage.write_bytes(s3_env.url + "/a", b"...")

    def test_y(s3_server):         # subprocesses
        subprocess.run([...], env={**os.environ, **s3_server.env()})

Tests that must stop or restart a server build their own `SeaweedFS(tmp_path)`.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_STACK = REPO_ROOT / "launch" / "local-stack"
READY_LINE = "# local-stack ready"
DEFAULT_BUCKET = "sg2dist-test"


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


class SeaweedFS:
    """One SeaweedFS S3 gateway run by launch/local-stack in `workdir`."""

    def __init__(self, workdir: str | Path, *, bucket: str = DEFAULT_BUCKET) -> None:
        self.workdir = str(workdir)
        self.bucket = bucket
        self.exports: dict[str, str] = {}
        self.s3_port = 0
        self._process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def endpoint_url(self) -> str:
        return self.exports["AWS_ENDPOINT_URL_S3"]

    @property
    def access_key(self) -> str:
        return self.exports["AWS_ACCESS_KEY_ID"]

    @property
    def secret_key(self) -> str:
        return self.exports["AWS_SECRET_ACCESS_KEY"]

    def start(self, timeout_s: float = 60.0) -> SeaweedFS:
        """Start (or restart on the same port, data and keys) and wait until it serves."""
        command = [
            sys.executable,
            str(LOCAL_STACK),
            "--dir",
            self.workdir,
            "--services",
            "s3",
            "--bucket",
            self.bucket,
            "--s3-port",
            str(self.s3_port),
        ]
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
        )
        self.exports = self._read_exports(timeout_s)
        self.s3_port = int(self.endpoint_url.rsplit(":", 1)[1])
        return self

    def _read_exports(self, timeout_s: float) -> dict[str, str]:
        exports = read_local_stack_exports(self._process, timeout_s)
        if exports is not None:
            return exports
        self.stop()
        log = Path(self.workdir, "seaweedfs.log")
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"SeaweedFS did not start within {timeout_s}s; log tail:\n{tail}")

    def stop(self) -> None:
        """Stop local-stack, which stops weed (SIGKILL after a grace period)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    def env(self, **extra: str) -> dict[str, str]:
        """Variables a subprocess needs to use this server (merge into os.environ)."""
        return {
            **self.exports,
            # Keep any ~/.aws files and profiles on the machine out of the tests.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_MAX_ATTEMPTS": "3",
            **extra,
        }

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=config,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its s3:// URL."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def prefix_url(self) -> str:
        """A fresh, empty prefix in the default bucket."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}"


class S3Env:
    """What `s3_env` yields: the server plus a fresh prefix URL, env already applied."""

    def __init__(self, server: SeaweedFS, url: str) -> None:
        self.server = server
        self.url = url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> S3Env:
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return S3Env(s3_server, s3_server.prefix_url())
