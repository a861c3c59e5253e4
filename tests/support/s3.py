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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.local_stack import LocalStackService

DEFAULT_BUCKET = "sg2dist-test"


class SeaweedFS(LocalStackService):
    """One SeaweedFS S3 gateway run by launch/local-stack in `workdir`."""

    services = "s3"
    port_flag = "--s3-port"
    port_export = "AWS_ENDPOINT_URL_S3"
    log_file = "seaweedfs.log"
    display_name = "SeaweedFS"
    start_timeout_s = 60.0
    stop_timeout_s = 20.0

    def __init__(self, workdir: str | Path, *, bucket: str = DEFAULT_BUCKET) -> None:
        super().__init__(workdir, bucket)

    @property
    def s3_port(self) -> int:
        """The S3 gateway's port (0 before the first start); kept across restarts."""
        return self.port

    @s3_port.setter
    def s3_port(self, value: int) -> None:
        self.port = value

    @property
    def endpoint_url(self) -> str:
        return self.exports["AWS_ENDPOINT_URL_S3"]

    @property
    def access_key(self) -> str:
        return self.exports["AWS_ACCESS_KEY_ID"]

    @property
    def secret_key(self) -> str:
        return self.exports["AWS_SECRET_ACCESS_KEY"]

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
