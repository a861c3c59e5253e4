"""The dataset manifest: `dataset.json` next to the shards it lists.

A dataset is a URL (local folder or s3:// prefix) holding `dataset.json` and the
tar shards it names. The manifest is the truth: prepare writes it last, so a URL
with a manifest always has every shard complete, and readers trust nothing else.
`manifest_hash` (sha256 of the shard list) identifies the exact shard contents; a
stream position saved in a checkpoint is only valid for the same hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sg2dist import storage
from sg2dist.errors import UserError

MANIFEST_NAME = "dataset.json"
FORMAT = "sg2dist-dataset/1"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name inside the dataset URL, e.g. "digits-000003.tar"
    count: int  # samples in the shard
    sha256: str
    bytes: int


@dataclass
class Manifest:
    url: str  # where the dataset lives (the folder holding dataset.json)
    resolution: int
    channels: int  # 1 (grayscale) or 3 (RGB)
    image_format: str  # "png" or "jpg"
    shards: list[ShardInfo]
    c_dim: int = 0  # number of classes; 0 = no labels
    label_names: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # crop, filter, ... as prepared
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}

    @property
    def num_images(self) -> int:
        return sum(shard.count for shard in self.shards)

    @property
    def manifest_hash(self) -> str:
        return shard_list_hash(self.shards)

    def shard_url(self, index: int) -> str:
        return storage.join(self.url, self.shards[index].name)

    def to_json(self) -> str:
        document = {
            "format": FORMAT,
            "resolution": self.resolution,
            "channels": self.channels,
            "image_format": self.image_format,
            "num_images": self.num_images,
            "c_dim": self.c_dim,
            "label_names": self.label_names,
            "shards": [vars(shard) for shard in self.shards],
            "manifest_hash": self.manifest_hash,
            "source": self.source,
            "settings": self.settings,
            "num_skipped": len(self.skipped),
            "skipped": self.skipped,
        }
        return json.dumps(document, indent=1) + "\n"


def shard_list_hash(shards: list[ShardInfo]) -> str:
    """sha256 over the ordered (name, count, sha256) of every shard."""
    text = json.dumps([[s.name, s.count, s.sha256] for s in shards], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _parse(url: str, text: str) -> Manifest:
    where = storage.join(url, MANIFEST_NAME)
    try:
        doc = json.loads(text)
        if doc.get("format") != FORMAT:
            raise UserError(
                f"{where} is not an sg2dist dataset manifest (format {doc.get('format')!r}); "
                "create the dataset with `sg2dist prepare`"
            )
        manifest = Manifest(
            url=url,
            resolution=int(doc["resolution"]),
            channels=int(doc["channels"]),
            image_format=str(doc["image_format"]),
            shards=[ShardInfo(**shard) for shard in doc["shards"]],
            c_dim=int(doc.get("c_dim", 0)),
            label_names=list(doc.get("label_names", [])),
            source=dict(doc.get("source", {})),
            settings=dict(doc.get("settings", {})),
            skipped=list(doc.get("skipped", [])),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{where} is damaged ({type(exc).__name__}: {exc}); re-run `sg2dist prepare`"
        ) from None
    if manifest.manifest_hash != doc.get("manifest_hash"):
        raise UserError(
            f"{where} has a manifest_hash that does not match its shard list; re-run prepare"
        )
    if not manifest.shards or manifest.num_images == 0:
        raise UserError(f"{where} lists no images; prepare it again from a folder with images")
    return manifest


def open_manifest(url: str) -> Manifest:
    """Read and check the manifest of the dataset at `url` (local folder or s3:// prefix)."""
    url = url.rstrip("/") if storage.is_s3(url) else url
    where = storage.join(url, MANIFEST_NAME)
    if not storage.exists(where):
        raise UserError(
            f"no dataset at {url}: {MANIFEST_NAME} is missing (an unfinished `sg2dist prepare` "
            "leaves none); run `sg2dist prepare SRC {url} --resolution R` to create it"
        )
    return _parse(url, storage.read_text(where))


def check_resolution(manifest: Manifest, model_resolution: int, img_channels: int) -> None:
    """Raise a UserError when the dataset's images do not fit the model."""
    if manifest.resolution != model_resolution:
        raise UserError(
            f"dataset {manifest.url} has {manifest.resolution} px images but "
            f"model.resolution={model_resolution}; set model.resolution={manifest.resolution} "
            f"or prepare the data with --resolution {model_resolution}"
        )
    if manifest.channels != img_channels:
        raise UserError(
            f"dataset {manifest.url} has {manifest.channels}-channel images but "
            f"model.img_channels={img_channels}; set model.img_channels={manifest.channels} "
            f"or prepare the data with --channels {img_channels}"
        )
