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
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.local_stack import LocalStackService
from support.s3 import SeaweedFS

from sg2dist.config import Config


class MlflowServer(LocalStackService):
    """`local-stack --services mlflow` in `workdir`, artifacts in s3://<bucket>/mlflow."""

    services = "mlflow"
    port_flag = "--mlflow-port"
    port_export = "MLFLOW_TRACKING_URI"
    log_file = "mlflow.log"
    display_name = "mlflow server"
    start_timeout_s = 90.0
    # local-stack gets the start timeout itself (--timeout); allow it time to report.
    ready_grace_s = 10.0
    # The server has worker processes to stop too.
    stop_timeout_s = 30.0

    def __init__(self, workdir: str | Path, s3: SeaweedFS, *, bucket: str = "") -> None:
        super().__init__(workdir, bucket or s3.bucket)  # the bucket must exist already
        self.s3 = s3

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        """Variables a subprocess needs to log to this server (merge into os.environ)."""
        return {"MLFLOW_TRACKING_URI": self.uri}

    def _command(self, timeout_s: float) -> list[str]:
        return [*super()._command(timeout_s), "--timeout", str(timeout_s)]

    def _env(self) -> dict[str, str]:
        """This process's environment without MLFLOW_* (a tracking URI set by a test must
        not leak into the server), plus the S3 credentials, which only the server gets."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(self.s3.env())
        return env


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


def tracking_config(tmp_path: Path, uri: str) -> Config:
    """A Config that logs to `uri` under a fresh experiment, run folder tmp_path/runs/cats."""
    cfg = Config()
    cfg.run.dir = str(tmp_path / "runs" / "cats")
    cfg.tracking.uri = uri
    cfg.tracking.experiment = f"test-{uuid.uuid4().hex[:8]}"
    cfg.tracking.system_metrics = False
    return cfg
