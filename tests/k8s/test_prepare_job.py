"""The prepare Job's two containers, run for real with the pod's environment against a real
SeaweedFS: the init container fetches a zip of images from S3, `sg2dist prepare` turns it into
a dataset in S3; a missing zip fails with one line and exit code 2 (the Job's FailJob rule)."""

import io
import json
import subprocess
import zipfile

import numpy as np
from PIL import Image

SCRATCH = "/scratch"
NUM_IMAGES = 12


def images_zip() -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(NUM_IMAGES):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            png = io.BytesIO()
            Image.fromarray(pixels).save(png, format="PNG")
            archive.writestr(f"images/{i:03d}.png", png.getvalue())
    return buffer.getvalue()


def prepare_pods(render, local_pod, s3_server, tmp_path, source_url, dataset_url):
    objects = render("overlays/prepare")
    (job,) = [obj for obj in objects if obj["kind"] == "Job"]
    (settings,) = [obj["data"] for obj in objects if obj["kind"] == "ConfigMap"]
    spec = job["spec"]["template"]["spec"]
    (fetch,), (prepare,) = spec["initContainers"], spec["containers"]
    settings = {**settings, "AWS_ENDPOINT_URL_S3": s3_server.endpoint_url}
    secret = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    # The three values a user edits, as a user would: in the container env.
    values = {"SOURCE_URL": source_url, "DATASET_URL": dataset_url, "RESOLUTION": "32"}
    for container in (fetch, prepare):
        for item in container["env"]:
            item["value"] = values.get(item["name"], item["value"])
    (tmp_path / "scratch").mkdir()
    mounts = {SCRATCH: tmp_path / "scratch", "/tmp": tmp_path}
    return [local_pod(c, settings, secret, mounts) for c in (fetch, prepare)]


def run(pod, timeout_s: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        pod.argv(), env=pod.process_env(), capture_output=True, text=True, timeout=timeout_s
    )


def test_prepare_job_turns_a_zip_in_s3_into_a_dataset_in_s3(render, local_pod, s3_server, tmp_path):
    bucket = s3_server.create_bucket().removeprefix("s3://")
    s3_server.client().put_object(Bucket=bucket, Key="raw/small.zip", Body=images_zip())
    fetch, prepare = prepare_pods(
        render, local_pod, s3_server, tmp_path,
        source_url=f"s3://{bucket}/raw/small.zip", dataset_url=f"s3://{bucket}/datasets/small32",
    )  # fmt: skip
    fetched = run(fetch)
    assert fetched.returncode == 0, fetched.stderr
    assert zipfile.is_zipfile(tmp_path / "scratch" / "source.zip")
    prepared = run(prepare)
    assert prepared.returncode == 0, prepared.stdout[-2000:] + prepared.stderr[-3000:]
    body = s3_server.client().get_object(Bucket=bucket, Key="datasets/small32/dataset.json")["Body"]
    manifest = json.loads(body.read())
    assert manifest["num_images"] == NUM_IMAGES and manifest["resolution"] == 32


def test_prepare_job_fails_fast_with_one_line_when_the_zip_is_missing(
    render, local_pod, s3_server, tmp_path
):
    bucket = s3_server.create_bucket().removeprefix("s3://")
    fetch, _ = prepare_pods(
        render, local_pod, s3_server, tmp_path,
        source_url=f"s3://{bucket}/raw/missing.zip", dataset_url=f"s3://{bucket}/datasets/x",
    )  # fmt: skip
    fetched = run(fetch)
    assert fetched.returncode == 2  # the Job's podFailurePolicy: FailJob, no retries
    (line,) = fetched.stderr.strip().splitlines()
    assert line.startswith("fetch-source: error:") and "missing.zip" in line
