"""Reading tar shards (local or s3://) with webdataset's tar iteration.

s3:// shards open through `sg2dist.storage` (boto3): a handler registered in
webdataset's `gopen_schemes` receives the caller's client, so every DataLoader
worker uses its own. A read that breaks off mid-shard (a reset connection, a
server restart) re-opens the shard and continues after the samples already
given out, so a consumer sees each sample exactly once; after READ_ATTEMPTS the
failure becomes one UserError naming the shard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander

from sg2dist import storage
from sg2dist.data.imageops import decode_sample
from sg2dist.data.manifest import open_manifest
from sg2dist.errors import UserError

log = logging.getLogger(__name__)

READ_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 1.0  # 1, 2, 4 s between attempts


def _gopen_s3(
    url: str, mode: str = "rb", bufsize: int = 8192, s3_client: Any = None, **_: Any
) -> IO[bytes]:
    if mode != "rb":
        raise ValueError(f"{url}: the s3 scheme only reads (mode 'rb'), got {mode!r}")
    return storage.open_read(url, client=s3_client)


def register_s3_scheme() -> None:
    """Let webdataset open s3:// URLs through storage's boto3 client (idempotent)."""
    gopen_schemes["s3"] = _gopen_s3


def _open_tar_samples(url: str, client: Any) -> tuple[IO[bytes], Iterator[dict[str, Any]]]:
    """The open stream and its samples: dicts of raw bytes by extension, plus __key__."""
    if storage.is_s3(url):
        register_s3_scheme()
        stream = gopen(url, "rb", s3_client=client)
    else:
        try:
            stream = gopen(url, "rb")
        except FileNotFoundError:
            raise UserError(
                f"shard {url} is missing; re-run `sg2dist prepare` for this dataset"
            ) from None
    return stream, group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def read_shard(url: str, *, client: Any = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard in tar order, re-opening after transient read failures."""
    client = client if client is not None or not storage.is_s3(url) else storage.s3_client()
    given = 0  # samples already yielded: a re-opened read skips these
    for attempt in range(1, READ_ATTEMPTS + 1):
        stream, samples = _open_tar_samples(url, client)
        try:
            for index, sample in enumerate(samples):
                if index >= given:
                    given += 1
                    yield sample
            return
        except Exception as exc:  # tarfile, urllib3 and botocore errors all mean "read broke"
            reason = f"{type(exc).__name__}: {exc.args[0] if exc.args else ''}"
            if not storage.is_s3(url):
                raise UserError(
                    f"shard {url} is damaged ({reason}); re-run `sg2dist prepare`"
                ) from None
            if attempt == READ_ATTEMPTS:
                raise UserError(
                    f"reading shard {url} failed {READ_ATTEMPTS} times ({reason}); "
                    "check the S3 endpoint (AWS_ENDPOINT_URL_S3) and that the object is intact"
                ) from None
            delay = RETRY_BASE_DELAY_S * 2 ** (attempt - 1)
            log.warning("reading %s broke off (%s); retrying in %.0f s", url, reason, delay)
            time.sleep(delay)
        finally:
            stream.close()


def image_key(sample: dict[str, Any]) -> str | None:
    """The extension under which a sample holds its image, or None."""
    for extension in ("png", "jpg", "jpeg", "webp"):
        if extension in sample:
            return extension
    return None


def iter_images(url: str) -> Iterator[tuple[np.ndarray, int | None]]:
    """Every image of a dataset in manifest order: (uint8 array [C, R, R], class or None).

    For whole-dataset passes such as real-image statistics; corrupt samples are
    skipped with a warning.
    """
    manifest = open_manifest(url)
    client = storage.s3_client() if storage.is_s3(manifest.url) else None
    for index in range(len(manifest.shards)):
        for sample in read_shard(manifest.shard_url(index), client=client):
            extension = image_key(sample)
            try:
                if extension is None:
                    raise ValueError("no image in sample")
                pixels = decode_sample(sample[extension], manifest.resolution, manifest.channels)
                label = int(sample["cls"]) if manifest.c_dim and "cls" in sample else None
            except ValueError as exc:
                log.warning("skipping corrupt sample %s of %s: %s", sample["__key__"], url, exc)
                continue
            yield pixels, label
