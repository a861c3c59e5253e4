"""NVIDIA's official StyleGAN2 network pickles, read as data and converted to sg2dist.

    imported = read_network_pickle("https://.../ffhq.pkl")   # or a local path, or s3://
    imported.model          # ModelConfig inferred from the pickle
    imported.G, imported.D, imported.G_ema                   # sg2dist state dicts
    imported.info           # source, sha256, augment_pipe.p, xflip, labels, ... (JSON)

`unpickler.py` reads the file without executing anything from it; `official.py` maps the
official networks onto sg2dist's by rule. Checkpoints are written by train/checkpoint.py.
"""

from __future__ import annotations

import hashlib
from typing import IO

from sg2dist import storage
from sg2dist.interop.official import ImportedNetworks, convert_official
from sg2dist.interop.unpickler import load_official

__all__ = ["ImportedNetworks", "is_network_pickle", "read_network_pickle"]

PICKLE_SUFFIX = ".pkl"


def is_network_pickle(url: str) -> bool:
    """Whether a --checkpoint / --init-from / import URL names a pickle (not a run folder):
    an http(s) URL or a name ending in .pkl."""
    return storage.is_http(url) or url.rstrip("/").lower().endswith(PICKLE_SUFFIX)


class _HashingReader:
    """A read-only file object that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.nbytes = 0

    def _seen(self, data: bytes) -> bytes:
        self.digest.update(data)
        self.nbytes += len(data)
        return data

    def read(self, size: int = -1) -> bytes:
        return self._seen(self.raw.read(size))

    def readline(self) -> bytes:
        return self._seen(self.raw.readline())

    def finish(self) -> str:
        """sha256 of the whole file (reads whatever follows the pickle's end)."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def read_network_pickle(url: str) -> ImportedNetworks:
    """Read an official network pickle (local path, s3:// or http(s)://) and convert it."""
    shown = storage.display_url(url)
    local = storage.fetch_cached(url)[0] if storage.is_http(url) else url
    with storage.open_read(local) as raw:
        reader = _HashingReader(raw)
        top = load_official(reader, shown)
        sha256 = reader.finish()
    imported = convert_official(top, shown)
    imported.info = {
        "source": shown,
        "source_sha256": sha256,
        "source_bytes": reader.nbytes,
        **imported.info,
    }
    return imported
