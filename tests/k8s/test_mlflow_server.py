"""The MLflow Deployment's command, run for real: the rendered `mlflow server` arguments,
with the pod's environment (settings ConfigMap + credentials Secret) pointed at a real
SeaweedFS, accept the Service's host names, refuse others, and put artifacts in S3."""

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support.ports import free_port

START_TIMEOUT_S = 120


def request(url: str, host: str, method: str = "GET", data: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=data, method=method, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for_health(base_url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not come up:\n{log.read_text()[-3000:]}")
        try:
            if request(f"{base_url}/health", "localhost") == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server and its workers (their own process group), SIGKILL if stuck."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_rendered_mlflow_server_serves_its_service_names_and_stores_artifacts_in_s3(
    render, local_pod, s3_server, tmp_path
):
    objects = render("mlflow")
    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment"]
    (config_map,) = [obj for obj in objects if obj["kind"] == "ConfigMap"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    bucket = s3_server.create_bucket().removeprefix("s3://")
    settings = {
        **config_map["data"],
        "AWS_ENDPOINT_URL_S3": s3_server.endpoint_url,
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/mlflow",
    }
    secret = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    pod = local_pod(container, settings, secret)
    # Here the server binds loopback on a free port and keeps its database in tmp_path;
    # every other argument is the manifest's.
    port = free_port()
    swaps = {
        "--host=": "--host=127.0.0.1",
        "--port=": f"--port={port}",
        "--backend-store-uri=": f"--backend-store-uri=sqlite:///{tmp_path}/mlflow.db",
    }
    command = [
        next((new for old, new in swaps.items() if a.startswith(old)), a) for a in pod.argv()
    ]
    assert command[1:3] == ["server", "--host=127.0.0.1"]
    log = tmp_path / "mlflow.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            env=pod.process_env(),
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers too are stopped below
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_health(base, process, log)
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        for host in (
            "sg2dist-mlflow:5000",
            f"sg2dist-mlflow.{local_pod.NAMESPACE}.svc.cluster.local:5000",
            "localhost:5000",
        ):
            assert request(search, host) == 200, host
        assert request(search, "attacker.example.com") == 403
        artifact = f"{base}/api/2.0/mlflow-artifacts/artifacts/k8s-test/hello.txt"
        assert request(artifact, "sg2dist-mlflow:5000", "PUT", b"hello from k8s") == 200
        stored = s3_server.client().get_object(Bucket=bucket, Key="mlflow/k8s-test/hello.txt")
        assert stored["Body"].read() == b"hello from k8s"
    finally:
        stop_group(process)
