"""Local paths and s3:// URLs behind one small API; the only module that knows boto3.

A URL is either a local path or `s3://bucket/key`. Every function takes either,
so callers never branch on where data lives. Local writes go through a temporary
file and `os.replace`, so a reader never sees half a file; on S3 a PUT is atomic
by itself. Files published on the web (`https://`, e.g. NVIDIA's network pickles) are
downloaded once into a local cache by `fetch_cached` and read from there.

S3 settings follow the standard AWS variables: the endpoint comes from
`AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`), credentials from the usual chain
(environment, profile, IRSA), the retry budget from `AWS_MAX_ATTEMPTS`. Failures a
user can fix (missing object or bucket, refused credentials) become one `UserError`
line naming the URL; secret values never appear in it. An endpoint that does not answer
or answers 5xx raises `StorageUnavailableError`, a `TemporaryError`: an outage that waiting
may end, so callers can retry it (`retry_unavailable`) and a command that gives up exits
with the retryable code instead of failing its Job for good.

Functions that talk to S3 accept an optional `client=`; without one they use
`s3_client()`, which keeps one client per process and environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import http.client
import io
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import boto3
import boto3.exceptions
import botocore.exceptions
from botocore.config import Config
from tqdm import tqdm

from sg2dist.errors import TemporaryError, UserError

S3_PREFIX = "s3://"
DEFAULT_MAX_ATTEMPTS = 10
# A streaming body that breaks mid-read is not retried by botocore; read_bytes
# re-requests the object this many times before giving up.
BODY_READ_ATTEMPTS = 3
READ_BUFFER_BYTES = 1 << 20
# retry_unavailable: the first pause after a failed attempt, doubled after each one up to the
# longest pause. The total is bounded by the caller's budget (run.storage_retry_s).
RETRY_FIRST_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 30.0

T = TypeVar("T")


class StorageUnavailableError(TemporaryError):
    """The S3 endpoint did not answer, or answered with a server error (5xx): an outage,
    not a mistake in the URL or the keys. Retrying later may succeed."""


_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_REFUSED_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "403",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
}
_SERVER_TROUBLE_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "500", "502", "503"}
_UNREACHABLE_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ProxyConnectionError,
)
# Errors of a body read that broke after the response started (server gone, reset).
STREAM_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    *_UNREACHABLE_ERRORS,
    ConnectionError,
)


# ---------------------------------------------------------------------------- URLs


def is_s3(url: str) -> bool:
    return str(url).startswith(S3_PREFIX)


def join(url: str, *parts: str) -> str:
    """Append path parts: `join("s3://b/runs", "x", "y.png")` -> `s3://b/runs/x/y.png`."""
    if not is_s3(url):
        return os.path.join(url, *parts)
    joined = url.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            joined += "/" + part
    return joined


def split_s3(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b"); the key has no leading or trailing slash."""
    bucket, _, key = url[len(S3_PREFIX) :].partition("/")
    if not bucket:
        raise UserError(f"{url} names no bucket; write s3://BUCKET/PREFIX")
    return bucket, key.strip("/")


# ---------------------------------------------------------------------------- S3 client


def _max_attempts() -> int:
    text = os.environ.get("AWS_MAX_ATTEMPTS", str(DEFAULT_MAX_ATTEMPTS))
    try:
        attempts = int(text)
    except ValueError:
        raise UserError(f"AWS_MAX_ATTEMPTS={text!r} is not an integer; set e.g. 10") from None
    return max(1, attempts)


# The variables a client's settings come from: a client is reused only while they are
# unchanged, so tests and tools that switch endpoints or keys get a fresh one.
_CLIENT_ENV_VARS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_MAX_ATTEMPTS",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def s3_client() -> Any:
    """A boto3 S3 client with settings that S3-compatible stores accept.

    Building a client costs ~0.1 s (a new botocore session loads its service
    models), so one is kept per process and environment; the process id in the key
    gives every forked data worker its own, as boto3 clients must not cross a
    fork. Clients are thread-safe once built.
    """
    settings = tuple(os.environ.get(name) for name in _CLIENT_ENV_VARS)
    return _client_for(os.getpid(), settings)


@functools.lru_cache(maxsize=4)
def _client_for(pid: int, settings: tuple[str | None, ...]) -> Any:
    """A new client; the arguments only key the cache (boto3 reads the environment)."""
    # boto3 >= 1.36 sends CRC checksums by default, which S3-compatible stores
    # (SeaweedFS, older MinIO) reject; "when_required" keeps them off. Path-style
    # addressing works with any endpoint (no wildcard DNS needed).
    config = Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"mode": "standard", "max_attempts": _max_attempts()},
        s3={"addressing_style": "path"},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", config=config)


def _endpoint_for_display(client: Any) -> str:
    """The client's endpoint with any user:password@ part removed."""
    parts = urlsplit(client.meta.endpoint_url or "")
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) or "the default AWS endpoint"


def _translate(exc: Exception, url: str, client: Any) -> UserError | None:
    """The UserError a boto3 exception stands for, or None when it is not a user's to fix."""
    endpoint = _endpoint_for_display(client)
    if isinstance(exc, boto3.exceptions.S3UploadFailedError) and isinstance(
        exc.__context__, Exception
    ):
        return _translate(exc.__context__, url, client)
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "unknown"))
        if code in _NOT_FOUND_CODES:
            return UserError(f"{url} does not exist on {endpoint}; check the URL")
        if code == "NoSuchBucket":
            bucket, _ = split_s3(url)
            return UserError(
                f"bucket '{bucket}' of {url} does not exist on {endpoint}; create it or fix the URL"
            )
        if code in _REFUSED_CODES:
            return UserError(
                f"{endpoint} refused access to {url} ({code}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or the profile / role) and the bucket's permissions"
            )
        if code in _SERVER_TROUBLE_CODES:
            return StorageUnavailableError(
                f"S3 endpoint {endpoint} could not serve {url} ({code}, after {_max_attempts()} "
                "attempts); check the server's health, or raise AWS_MAX_ATTEMPTS"
            )
        return UserError(
            f"S3 request for {url} failed on {endpoint}: {code} {error.get('Message', '')}"
        )
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return UserError(
            f"no usable AWS credentials for {url}; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or a pod role)"
        )
    if isinstance(exc, _UNREACHABLE_ERRORS):
        return StorageUnavailableError(
            f"cannot reach S3 endpoint {endpoint} for {url} (after {_max_attempts()} attempts); "
            "check AWS_ENDPOINT_URL_S3 and that the server is up"
        )
    return None


@contextlib.contextmanager
def _s3_errors(url: str, client: Any) -> Iterator[None]:
    """Turn boto3 failures a user can fix into one UserError line naming `url`."""
    try:
        yield
    except (
        botocore.exceptions.BotoCoreError,
        botocore.exceptions.ClientError,
        boto3.exceptions.S3UploadFailedError,
    ) as exc:
        user_error = _translate(exc, url, client)
        if user_error is None:
            raise
        raise user_error from exc


def _missing_local(url: str) -> UserError:
    return UserError(f"{url} does not exist; check the path")


def retry_unavailable(fn: Callable[[], T], *, what: str, budget_s: float) -> T:
    """`fn()`, tried again while it raises StorageUnavailableError, until `budget_s` is spent.

    For work that must survive a short object-storage outage (a checkpoint, the resume at
    start). Pauses double from RETRY_FIRST_DELAY_S up to RETRY_MAX_DELAY_S; one line per
    failed attempt says what failed and when the next try comes. Every attempt is itself
    boto3's AWS_MAX_ATTEMPTS requests, so the whole takes at most `budget_s` plus one
    attempt. The last failure is raised as one StorageUnavailableError line naming `what`.
    Other errors (refused keys, a missing bucket) are raised at once: waiting cannot fix them.
    """
    started = time.monotonic()
    delay_s = RETRY_FIRST_DELAY_S
    attempt = 1
    while True:
        try:
            return fn()
        except StorageUnavailableError as exc:
            elapsed_s = time.monotonic() - started
            again = elapsed_s + delay_s <= budget_s
            print(
                f"[storage] {what} failed (attempt {attempt}): {exc}; "
                + (f"retrying in {delay_s:g} s" if again else "giving up"),
                file=sys.stderr,
                flush=True,
            )
            if not again:
                raise StorageUnavailableError(
                    f"{what} failed {attempt} time(s) over {elapsed_s:.0f} s: {exc}"
                ) from None
        time.sleep(delay_s)
        delay_s = min(2 * delay_s, RETRY_MAX_DELAY_S)
        attempt += 1


# ---------------------------------------------------------------------------- queries


def exists(url: str, *, client: Any = None) -> bool:
    """True for an existing file or folder (on S3: an object, or a prefix holding objects)."""
    if not is_s3(url):
        return os.path.exists(url)
    client = client or s3_client()
    bucket, key = split_s3(url)
    with _s3_errors(url, client):
        if key:
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except botocore.exceptions.ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in _NOT_FOUND_CODES:
                    raise
        prefix = key + "/" if key else ""
        listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return listing.get("KeyCount", 0) > 0


def listdir(url: str, *, client: Any = None) -> list[str]:
    """Sorted names of the immediate children of a folder ("folders" included); [] if none."""
    if not is_s3(url):
        return sorted(os.listdir(url)) if os.path.isdir(url) else []
    client = client or s3_client()
    bucket, key = split_s3(url)
    prefix = key + "/" if key else ""
    names: set[str] = set()
    with _s3_errors(url, client):
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, Delimiter="/"
        )
        for page in pages:
            names.update(
                p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            )
            names.update(obj["Key"][len(prefix) :] for obj in page.get("Contents", []))
    names.discard("")  # a zero-byte "folder marker" object named like the prefix itself
    return sorted(names)


# ---------------------------------------------------------------------------- reading


def open_read(url: str, *, client: Any = None) -> IO[bytes]:
    """A binary file object to read `url` from the start (a streaming body on S3)."""
    if not is_s3(url):
        try:
            return open(url, "rb")  # the caller closes it
        except FileNotFoundError:
            raise _missing_local(url) from None
    client = client or s3_client()
    bucket, key = split_s3(url)
    with _s3_errors(url, client):
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
    # Large reads: a tar reader asks for 512-byte headers, and every small read of a
    # raw botocore body costs a round through urllib3.
    return io.BufferedReader(body, buffer_size=READ_BUFFER_BYTES)


def read_bytes(url: str, *, client: Any = None) -> bytes:
    if not is_s3(url):
        with open_read(url) as f:
            return f.read()
    client = client or s3_client()
    for attempt in range(1, BODY_READ_ATTEMPTS + 1):
        body = open_read(url, client=client)
        try:
            return body.read()
        except STREAM_ERRORS:
            if attempt == BODY_READ_ATTEMPTS:
                raise StorageUnavailableError(
                    f"reading {url} broke off {BODY_READ_ATTEMPTS} times; "
                    "check the S3 endpoint's health and retry"
                ) from None
        finally:
            body.close()
    raise AssertionError("unreachable")


def read_text(url: str, *, client: Any = None) -> str:
    return read_bytes(url, client=client).decode("utf-8")


def download_file(url: str, local_path: str, *, client: Any = None) -> None:
    """Copy `url` to `local_path`; the destination appears complete or not at all."""
    with _atomic_local_file(local_path) as tmp_path:
        if not is_s3(url):
            if not os.path.isfile(url):
                raise _missing_local(url)
            shutil.copyfile(url, tmp_path)
            return
        client = client or s3_client()
        bucket, key = split_s3(url)
        with _s3_errors(url, client):
            client.download_file(bucket, key, tmp_path)


def cached_local_copy(url: str, cache_dir: str | os.PathLike[str]) -> str:
    """A local path for `url`: the path itself, or for s3:// a copy downloaded once into
    `cache_dir` (named by a hash of the URL, so two buckets' files of one name do not clash)."""
    if not is_s3(url):
        return url
    url_hash = hashlib.sha256(url.encode()).hexdigest()[:12]
    local = os.path.join(cache_dir, f"{url_hash}-{url.rsplit('/', 1)[-1]}")
    if not os.path.isfile(local):
        download_file(url, local)
    return local


# ---------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _atomic_local_file(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one step."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 - umask).
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


def _current_umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return umask


def write_bytes(url: str, data: bytes, *, client: Any = None) -> None:
    if not is_s3(url):
        with _atomic_local_file(url) as tmp_path, open(tmp_path, "wb") as f:
            f.write(data)
        return
    client = client or s3_client()
    bucket, key = split_s3(url)
    with _s3_errors(url, client):
        client.put_object(Bucket=bucket, Key=key, Body=data)


def write_text(url: str, text: str, *, client: Any = None) -> None:
    write_bytes(url, text.encode("utf-8"), client=client)


def upload_file(local_path: str, url: str, *, client: Any = None) -> None:
    """Copy a local file to `url` (multipart on S3 for large files)."""
    if not is_s3(url):
        with _atomic_local_file(url) as tmp_path:
            shutil.copyfile(local_path, tmp_path)
        return
    client = client or s3_client()
    bucket, key = split_s3(url)
    with _s3_errors(url, client):
        client.upload_file(local_path, bucket, key)


def remove_tree(url: str, *, client: Any = None) -> None:
    """Delete a file or a folder with everything under it; a missing one is fine."""
    if not is_s3(url):
        if os.path.isdir(url):
            shutil.rmtree(url)
        elif os.path.lexists(url):
            os.remove(url)
        return
    client = client or s3_client()
    bucket, key = split_s3(url)
    if not key:
        raise UserError(f"refusing to delete the whole bucket {url}; name a prefix inside it")
    with _s3_errors(url, client):
        keys = [key]  # the object itself, if `url` names one
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=key + "/"
        ):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        _delete_keys(client, bucket, keys, url)
        # Stores with real folders (SeaweedFS) keep emptied ones, which would still be
        # listed as children; deleting "folder/" markers deepest first removes them. On
        # AWS S3 these keys do not exist and the deletes are no-ops.
        folders = {key + "/"}
        for object_key in keys[1:]:
            parent = object_key.rpartition("/")[0]
            while len(parent) > len(key):
                folders.add(parent + "/")
                parent = parent.rpartition("/")[0]
        _delete_keys(client, bucket, sorted(folders, key=lambda f: -f.count("/")), url)


def _delete_keys(client: Any, bucket: str, keys: list[str], url: str) -> None:
    for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        chunk = [{"Key": k} for k in keys[start : start + 1000]]
        reply = client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
        if reply.get("Errors"):
            first = reply["Errors"][0]
            raise UserError(
                f"could not delete {len(reply['Errors'])} objects under {url} "
                f"(first: {first.get('Key')}: {first.get('Code')}); check write permissions"
            )


# ---------------------------------------------------------------------------- http(s)

HTTP_PREFIXES = ("https://", "http://")
DOWNLOAD_CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 60


def is_http(url: str) -> bool:
    return str(url).lower().startswith(HTTP_PREFIXES)


def display_url(url: str) -> str:
    """`url` fit for logs and metadata: no user:password@, no query (signed URLs carry tokens)."""
    if not is_http(url):
        return url
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def cache_dir() -> str:
    """Where downloads are kept: $SG2DIST_CACHE_DIR, else $XDG_CACHE_HOME/sg2dist, else
    ~/.cache/sg2dist."""
    if os.environ.get("SG2DIST_CACHE_DIR"):
        return os.environ["SG2DIST_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sg2dist")


def fetch_cached(url: str) -> tuple[str, str]:
    """(local path, sha256) of an http(s) URL, downloaded into the cache folder on first use
    with a progress bar; the sha256 is printed either way.

    The file appears in the cache complete or not at all. A lock file makes concurrent
    processes of one machine (the ranks of a training run) download it once.
    """
    name = os.path.basename(urlsplit(url).path) or "download"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    url_key = hashlib.sha256(url.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), "downloads", f"{url_key}-{name}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if os.path.isfile(path):
            sha256 = _file_sha256(path)
            print(f"using cached {path} (sha256 {sha256})", file=sys.stderr, flush=True)
            return path, sha256
        sha256 = _download(url, path)
    print(f"downloaded {display_url(url)} to {path} (sha256 {sha256})", file=sys.stderr)
    return path, sha256


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(DOWNLOAD_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, path: str) -> str:
    shown = display_url(url)
    digest = hashlib.sha256()
    try:
        with (
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
            _atomic_local_file(path) as tmp_path,
            open(tmp_path, "wb") as out,
        ):
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                for chunk in iter(lambda: response.read(DOWNLOAD_CHUNK_BYTES), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and bar.n != total:
                raise UserError(
                    f"download of {shown} ended after {bar.n} of {total} bytes; try again"
                )
    except urllib.error.HTTPError as exc:
        raise UserError(f"{shown} answered HTTP {exc.code} {exc.reason}; check the URL") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UserError(
            f"cannot download {shown} ({reason}); check the URL and the network, or download "
            "the file yourself and pass its local path"
        ) from None
    return digest.hexdigest()
