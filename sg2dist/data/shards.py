"""Reading tar shards (local or s3://): a lean tar reader and webdataset's sample grouping.

s3:// shards open through `sg2dist.storage` (boto3): a handler registered in
webdataset's `gopen_schemes` receives the caller's client, so every worker process
uses its own. A read that breaks off mid-shard (a reset connection, a server restart)
re-opens the shard and continues after the samples already given out, so a consumer
sees each sample exactly once; after READ_ATTEMPTS it becomes one StorageUnavailableError
naming the shard, which a trainer exits on with the retryable code (a Kubernetes Job then
resumes the run from its checkpoint). Bytes that arrive but are not a whole tar (a
truncated or damaged shard) are one UserError at once: no retry makes them whole.
`OpenAhead` opens the next s3:// shard while the current one is read.

Tar members are read by `tar_members`, not by webdataset's tar_file_iterator: that one
goes through `tarfile`'s stream mode, an order of magnitude slower per member than
chunked reads into one buffer with a checksum through zlib; `group_samples` groups
them as webdataset's group_by_keys does, in a fraction of its time. At 64 px these
costs are measurable against the PNG decode itself (`sg2dist bench data`; figures in
the README, Performance). Shards come
from `sg2dist prepare`, so plain USTAR with short names is all this reader needs;
anything else is reported, not guessed at.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
from webdataset.gopen import gopen, gopen_schemes

from sg2dist import storage
from sg2dist.data.imageops import decode_sample
from sg2dist.data.manifest import open_manifest
from sg2dist.errors import UserError

log = logging.getLogger(__name__)

TAR_BLOCK = 512
END_OF_ARCHIVE = bytes(TAR_BLOCK)  # the first of the two zero blocks that end a tar
READ_CHUNK_BYTES = 1 << 20
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


def _byte_sum(block: bytes) -> int:
    """sum(block) of a 512-byte tar header, without a Python loop over the bytes.

    Adler-32's low half is 1 + the byte sum modulo 65521, which is exact for 256 bytes
    (at most 256 * 255 = 65280).
    """
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _tar_header(block: bytes, url: str) -> tuple[bytes, int]:
    """(type flag, data size) of one 512-byte header; ValueError if it is damaged."""
    # The checksum counts its own 8-byte field as spaces; a mismatch means damage.
    stored = int(block[148:156].strip(b"\0 ") or b"0", 8)
    if stored != _byte_sum(block) - sum(block[148:156]) + 256:
        raise ValueError(f"{url}: tar header checksum mismatch (damaged shard)")
    kind = block[156:157]
    if kind in (b"x", b"g", b"L", b"K"):
        raise ValueError(
            f"{url}: extended tar headers are not supported; write shards with `sg2dist prepare`"
        )
    return kind, int(block[124:136].strip(b"\0 ") or b"0", 8)


class _ChunkReader:
    """Reads a stream READ_CHUNK_BYTES at a time into one reused buffer.

    Why: a read call per header and per member costs more Python than the parsing, and a
    fresh buffer per chunk costs a page fault per 4 KiB; one buffer filled with readinto
    costs neither.
    """

    def __init__(self, stream: IO[bytes], url: str) -> None:
        self.stream, self.url = stream, url
        self.buffer = bytearray(READ_CHUNK_BYTES)
        self.start = self.end = 0  # the unparsed bytes are buffer[start:end]

    def take(self, size: int) -> memoryview:
        """The next `size` bytes (valid until the next call); EOFError if the stream ends."""
        if self.end - self.start < size:
            self._fill(size)
        view = memoryview(self.buffer)[self.start : self.start + size]
        self.start += size
        return view

    def _fill(self, size: int) -> None:
        rest = self.end - self.start
        # The unread rest moves to the front; a member larger than a chunk needs a bigger
        # buffer (a new one: views handed out still point into the old).
        target = bytearray(size) if size > len(self.buffer) else self.buffer
        target[:rest] = self.buffer[self.start : self.end]
        self.buffer = target
        self.start, self.end = 0, rest
        view = memoryview(self.buffer)
        while self.end < size:
            read = self.stream.readinto(view[self.end :])  # type: ignore[attr-defined]
            if not read:  # cut before the end marker or inside a member
                raise EOFError(f"{self.url} ends early (truncated tar)")
            self.end += read


def tar_members(stream: IO[bytes], url: str) -> Iterator[dict[str, Any]]:
    """The regular files of a USTAR stream, in order, as webdataset's file records."""
    reader = _ChunkReader(stream, url)
    while True:
        header = bytes(reader.take(TAR_BLOCK))
        if header == END_OF_ARCHIVE:
            return
        kind, size = _tar_header(header, url)
        data = reader.take(size + (-size % TAR_BLOCK))  # data padded to a whole block
        if kind in (b"0", b"\0"):
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            yield {"fname": name, "data": bytes(data[:size]), "__url__": url}


def group_samples(members: Iterator[dict[str, Any]], url: str) -> Iterator[dict[str, Any]]:
    """Consecutive members with the same key as one sample, as webdataset's group_by_keys.

    The key is the name up to the first dot of its last path component ("00000042" of
    "00000042.png"), the rest is the lower-cased extension; names without one are
    skipped and a repeated extension is a ValueError. Written out here because the generic
    version's regular expression and checks cost several us per member.
    """
    sample: dict[str, Any] | None = None
    for member in members:
        name = member["fname"]
        dot = name.find(".", name.rfind("/") + 1)
        if dot <= 0:
            continue
        key, extension = name[:dot], name[dot + 1 :].lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if extension in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {url}")
        sample[extension] = member["data"]
    if sample is not None:
        yield sample


class OpenAhead:
    """An s3:// shard opened in a background thread, one visit before it is read.

    A shard's GET costs a request and the server's time to first byte, paid in line
    before the first image of the shard. Opened ahead, it overlaps with the decoding of
    the shard before, and the body
    starts to arrive into the socket buffer meanwhile. The bytes are the same either way,
    so the stream stays a pure function of the seeds.
    """

    def __init__(self, url: str, client: Any) -> None:
        self.url = url
        self._stream: IO[bytes] | None = None
        self._abandoned = False
        self._lock = threading.Lock()
        self._opened = threading.Event()
        # A daemon thread, not an executor: an open stuck on a dead endpoint must not hold
        # up the process's exit.
        thread = threading.Thread(target=self._open, args=(client,), daemon=True)
        thread.start()

    def _open(self, client: Any) -> None:
        try:
            stream = storage.open_read(self.url, client=client)
        except Exception:  # the reader then opens the shard itself and reports any error
            stream = None
        with self._lock:
            if self._abandoned and stream is not None:
                stream.close()
            elif not self._abandoned:
                self._stream = stream
        self._opened.set()

    def take(self) -> IO[bytes] | None:
        """The opened stream (the caller closes it); None if the open failed."""
        self._opened.wait()
        with self._lock:
            stream, self._stream = self._stream, None
        return stream

    def close(self) -> None:
        """Give up a stream that will not be read (also one still being opened)."""
        with self._lock:
            self._abandoned = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


def _open_shard(url: str, client: Any) -> IO[bytes]:
    if storage.is_s3(url):
        register_s3_scheme()
        return gopen(url, "rb", s3_client=client)
    try:
        return gopen(url, "rb")
    except FileNotFoundError:
        raise UserError(
            f"shard {url} is missing; re-run `sg2dist prepare` for this dataset"
        ) from None


def _open_tar_samples(
    url: str, client: Any, ahead: OpenAhead | None
) -> tuple[IO[bytes], Iterator[dict[str, Any]]]:
    """The open stream and its samples: dicts of raw bytes by extension, plus __key__."""
    stream = ahead.take() if ahead is not None else None
    if stream is None:  # not opened ahead, or that open failed: this one reports why
        stream = _open_shard(url, client)
    return stream, group_samples(tar_members(stream, url), url)


def read_shard(
    url: str, *, client: Any = None, ahead: OpenAhead | None = None
) -> Iterator[dict[str, Any]]:
    """Samples of one shard in tar order, re-opening after transient read failures.

    `ahead`, if given, is this shard opened in advance; it serves the first attempt.
    """
    client = client if client is not None or not storage.is_s3(url) else storage.s3_client()
    if ahead is not None and ahead.url != url:
        ahead.close()
        ahead = None
    given = 0  # samples already yielded: a re-opened read skips these
    for attempt in range(1, READ_ATTEMPTS + 1):
        stream, samples = _open_tar_samples(url, client, ahead if attempt == 1 else None)
        try:
            for index, sample in enumerate(samples):
                if index >= given:
                    given += 1
                    yield sample
            return
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc.args[0] if exc.args else ''}"
            # The tar reader's errors (bytes that are not a whole tar) and any local read
            # error mean damage; the rest (urllib3, botocore) mean the S3 read broke off.
            if isinstance(exc, (ValueError, EOFError)) or not storage.is_s3(url):
                raise UserError(
                    f"shard {url} is damaged ({reason}); re-run `sg2dist prepare`"
                ) from None
            if attempt == READ_ATTEMPTS:
                raise storage.StorageUnavailableError(
                    f"reading shard {url} broke off {READ_ATTEMPTS} times ({reason}); check "
                    "the S3 endpoint (AWS_ENDPOINT_URL_S3): the run exits to be retried"
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
