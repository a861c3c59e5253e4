"""Reading shards: the chunked tar reader, sample grouping and decoding into batch slots."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset.tariterators import group_by_keys

from sg2dist.data import open_manifest, shards
from sg2dist.data.imageops import BANDS_MIN_RESOLUTION, decode_into, decode_sample, encode
from sg2dist.data.shards import group_samples, read_shard, tar_members


def _tarfile_records(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def _shard_path(url: str, index: int = 0) -> str:
    return os.path.join(url, open_manifest(url).shards[index].name)


@pytest.mark.parametrize("chunk_bytes", [512, 700, 1500, 1 << 20])
def test_tar_reader_matches_tarfile_for_any_chunk_size(stream_dataset, monkeypatch, chunk_bytes):
    # 512: one block per read; 700 and 1500: headers and members cut at odd places;
    # members (~800 B PNGs) larger than 512 and 700 make the buffer grow.
    monkeypatch.setattr(shards, "READ_CHUNK_BYTES", chunk_bytes)
    path = _shard_path(stream_dataset)
    with open(path, "rb") as f:
        records = [(r["fname"], r["data"]) for r in tar_members(f, path)]
    assert records == _tarfile_records(path)


def test_tar_reader_reads_a_member_larger_than_a_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "READ_CHUNK_BYTES", 4096)
    path = str(tmp_path / "big.tar")
    payloads = {"a.bin": os.urandom(50_000), "b.bin": b"", "c.bin": os.urandom(513)}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in payloads.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        assert [(r["fname"], r["data"]) for r in tar_members(f, path)] == list(payloads.items())


def test_tar_reader_reports_a_damaged_header(stream_dataset):
    data = bytearray(Path(_shard_path(stream_dataset)).read_bytes())
    data[2] ^= 0x01  # a byte of the first member's name: the header checksum no longer fits
    with pytest.raises(ValueError, match="checksum mismatch"):
        list(tar_members(io.BytesIO(bytes(data)), "damaged.tar"))


def test_header_byte_sum_equals_sum_for_any_block():
    blocks = [bytes(512), b"\xff" * 512, os.urandom(512), bytes(range(256)) * 2]
    assert [shards._byte_sum(b) for b in blocks] == [sum(b) for b in blocks]


def test_grouping_gives_the_samples_webdataset_gives(stream_dataset):
    path = _shard_path(stream_dataset)  # labelled: a .cls and a .png per sample
    with open(path, "rb") as f:
        ours = list(group_samples(tar_members(f, path), path))
    with open(path, "rb") as f:
        theirs = list(group_by_keys(tar_members(f, path)))
    assert (
        ours == theirs and len(ours) == 16 and set(ours[0]) == {"__key__", "__url__", "cls", "png"}
    )


def test_grouping_keys_names_like_webdataset():
    names = ["d/x.PNG", "d/x.cls", "d/.hidden", "noext", ".c", "a.b/c.tar.gz", "a.b/c.json"]
    members = [{"fname": n, "data": n.encode(), "__url__": "u"} for n in names]
    assert list(group_samples(iter(members), "u")) == list(group_by_keys(iter(members)))


def test_grouping_refuses_a_repeated_extension():
    members = [{"fname": "k.png", "data": b"1", "__url__": "u"}] * 2
    with pytest.raises(ValueError, match="duplicate file name"):
        list(group_samples(iter(members), "u"))


def test_read_shard_gives_each_sample_of_a_local_shard(stream_dataset):
    path = _shard_path(stream_dataset)
    samples = list(read_shard(path))
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(16)]


def _encoded(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels), "png")


@pytest.mark.parametrize("resolution", [16, BANDS_MIN_RESOLUTION])  # HWC transpose; planes
@pytest.mark.parametrize("flip", [False, True])
def test_decode_into_writes_the_chw_image_mirrored_when_asked(resolution, flip):
    rgb = np.random.default_rng(resolution).integers(0, 256, (resolution, resolution, 3), np.uint8)
    out = np.zeros((3, resolution, resolution), np.uint8)
    decode_into(_encoded(rgb), out, flip=flip)
    expected = rgb.transpose(2, 0, 1)
    assert np.array_equal(out, expected[:, :, ::-1] if flip else expected)
    assert np.array_equal(decode_sample(_encoded(rgb), resolution, 3), expected)


def test_decode_into_a_grayscale_slot():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = np.zeros((1, 16, 16), np.uint8)
    decode_into(_encoded(gray), out, flip=True)
    assert np.array_equal(out[0], gray[:, ::-1])


@pytest.mark.parametrize("resolution", [16, BANDS_MIN_RESOLUTION])
def test_decode_into_leaves_the_slot_alone_for_a_wrong_or_broken_image(resolution):
    out = np.full((3, resolution, resolution), 7, np.uint8)
    wrong_size = _encoded(np.zeros((resolution // 2, resolution // 2, 3), np.uint8))
    wrong_mode = _encoded(np.zeros((resolution, resolution), np.uint8))
    for data in (wrong_size, wrong_mode, b"not a png", wrong_size[: len(wrong_size) // 2]):
        with pytest.raises(ValueError):
            decode_into(data, out, flip=False)
    assert (out == 7).all()
