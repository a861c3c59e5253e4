"""A real MLflow tracking server for tests, started through `launch/local-stack`.

sqlite backend in a temporary folder, artifacts proxied to the SeaweedFS S3 of the
`s3_server` fixture. Only the server gets the S3 credentials; clients (the tests, a
training subprocess) need nothing but MLFLOW_TRACKING_URI, as in production.

    def test_x(mlflow_server):                  # one server for the whole session
        client = MlflowClient(mlflow_server.uri)
        subprocess.run([...], env={**os.environ, **mlflow_server.client_env()})

Tests that stop or restart a server build their own, which keeps its port and
database across restarts:

    server = MlflowServer(tmp_path, s3_server).start()
    server.stop(); server.start()
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.s3 import LOCAL_STACK, SeaweedFS, read_local_stack_exports


class MlflowServer:
    """`local-stack --services mlflow` in `workdir`, artifacts in s3://<bucket>/mlflow."""

    def __init__(self, workdir: str | Path, s3: SeaweedFS, *, bucket: str = "") -> None:
        self.workdir = str(workdir)
        self.s3 = s3
        self.bucket = bucket or s3.bucket  # must exist already
        self.port = 0  # chosen at the first start, kept across restarts
        self._process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        """Variables a subprocess needs to log to this server (merge into os.environ)."""
        return {"MLFLOW_TRACKING_URI": self.uri}

    def start(self, timeout_s: float = 90.0) -> MlflowServer:
        command = [
            sys.executable,
            str(LOCAL_STACK),
            "--dir",
            self.workdir,
            "--services",
            "mlflow",
            "--bucket",
            self.bucket,
            "--mlflow-port",
            str(self.port),
            "--timeout",
            str(timeout_s),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(self.s3.env())
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL
        )
        uri = self._read_exports(timeout_s + 10).get("MLFLOW_TRACKING_URI", "")
        self.port = int(uri.rsplit(":", 1)[1])
        return self

    def _read_exports(self, timeout_s: float) -> dict[str, str]:
        assert self._process is not None
        exports = read_local_stack_exports(self._process, timeout_s)
        if exports is not None:
            return exports
        self.stop()
        log = Path(self.workdir, "mlflow.log")
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"mlflow server did not start within {timeout_s}s; log tail:\n{tail}")

    def stop(self) -> None:
        """Stop local-stack, which stops the server and its worker processes."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None


@pytest.fixture(scope="session")
def mlflow_server(
    s3_server: SeaweedFS, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """A running MLflow tracking server for the whole session; stopped at the end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), s3_server).start()
    try:
        yield server
    finally:
        server.stop()
