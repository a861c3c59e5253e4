"""`sg2dist prepare`: image folders and zips -> shards + manifest, locally and on SeaweedFS."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sg2dist import cli
from sg2dist.data import build_loader, iter_images, open_manifest
from sg2dist.data.imageops import ConvertSettings
from sg2dist.data.manifest import MANIFEST_NAME
from sg2dist.data.prepare import prepare_dataset
from sg2dist.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _prepare(src: Path, dest: Path, resolution: int = 8, **kw) -> object:
    settings_keys = {"channels", "crop", "resize_filter", "image_format", "quality", "min_size"}
    settings = ConvertSettings(resolution, **{k: kw.pop(k) for k in list(kw) if k in settings_keys})
    return prepare_dataset(str(src), str(dest), settings, progress=False, **kw)


def test_prepare_to_seaweedfs_then_stream_gives_back_the_exact_resized_pixels_and_labels(
    s3_env, tmp_path
):
    R = 16
    rng = np.random.default_rng(1)
    expected: dict[bytes, str] = {}  # CHW pixels of each resized input -> its class
    for cls in ("cat", "dog"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(6):
            small = rng.integers(0, 256, (R, R, 3), dtype=np.uint8)
            big = small.repeat(2, axis=0).repeat(2, axis=1)  # box-filter 2x down gives `small` back
            if i % 3 == 0:
                pixels = small  # already R x R: stored as is
            elif i % 3 == 1:
                pixels = big
            else:  # 2R x 3R: the center crop removes R/2 random columns on each side
                margin = rng.integers(0, 256, (2 * R, R, 3), dtype=np.uint8)
                pixels = np.concatenate([margin[:, : R // 2], big, margin[:, R // 2 :]], axis=1)
            Image.fromarray(pixels).save(tmp_path / "src" / cls / f"{i}.png")
            expected[small.transpose(2, 0, 1).tobytes()] = cls
    url = s3_env.url + "/pets16"

    command = [sys.executable, "-m", "sg2dist", "prepare", str(tmp_path / "src"), url]
    command += ["--resolution", str(R), "--labels", "folders", "--shard-size", "5"]
    command += ["--workers", "2", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr

    manifest = open_manifest(url)
    assert [shard.count for shard in manifest.shards] == [5, 5, 2]
    assert manifest.label_names == ["cat", "dog"] and manifest.c_dim == 2
    loader = build_loader(
        url,
        batch_gpu=3,
        rank=0,
        world_size=1,
        seed=0,
        workers=1,
        mirror=False,
        shuffle_buffer=4,
        use_labels=True,
        resampled=False,
    )
    streamed: dict[bytes, str] = {}
    for batch in loader:
        for img, c in zip(batch.img_NCHW, batch.c, strict=True):
            streamed[img.numpy().tobytes()] = manifest.label_names[int(c.argmax())]
    assert streamed == expected


def test_mixed_quality_folder_keeps_usable_images_and_lists_each_skipped_file_with_reason(
    tmp_path,
):
    src = tmp_path / "mixed"
    src.mkdir()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(src / "rgb.png")
    Image.new("L", (20, 20), 77).save(src / "gray.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(src / "transparent.png")  # -> white
    Image.new("CMYK", (20, 20), (255, 0, 0, 0)).save(src / "cmyk.jpg", quality=100)  # -> cyan
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    palette.save(src / "palette.png")
    Image.fromarray(np.full((20, 30), 25700, np.uint16)).save(src / "sixteen.png")  # 16-bit
    Image.new("RGB", (3, 3), (0, 0, 255)).save(src / "tiny.bmp")
    Image.new("RGB", (20, 20), (5, 250, 5)).save(src / "green.webp", lossless=True)
    (src / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(
        jpeg, "JPEG"
    )
    (src / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (src / "empty.png").write_bytes(b"")
    (src / "notes.txt").write_text("not an image")

    manifest = _prepare(src, tmp_path / "out", resolution=8, workers=2)

    reasons = {entry["file"]: entry["reason"] for entry in manifest.skipped}
    assert set(reasons) == {"corrupt.png", "truncated.jpg", "empty.png", "notes.txt"}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["notes.txt"] == "not an image file (.txt)"
    assert "truncated" in reasons["truncated.jpg"]
    assert "not a readable image" in reasons["corrupt.png"]
    assert json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["num_skipped"] == 4

    colors = []
    for pixels, label in iter_images(str(tmp_path / "out")):
        assert pixels.shape == (3, 8, 8) and label is None
        assert (pixels == pixels[:, :1, :1]).all(), "a solid input stays solid"
        colors.append(tuple(int(v) for v in pixels[:, 0, 0]))
    lossless = {
        (200, 10, 10),
        (77, 77, 77),
        (255, 255, 255),
        (10, 20, 30),
        (100, 100, 100),
        (0, 0, 255),
        (5, 250, 5),
    }
    assert lossless <= set(colors) and len(colors) == 8
    (cmyk,) = set(colors) - lossless
    assert np.abs(np.subtract(cmyk, (0, 255, 255))).max() <= 3


def test_min_size_skips_tiny_images_and_says_so(tmp_path):
    (tmp_path / "src").mkdir()
    Image.new("RGB", (3, 3)).save(tmp_path / "src" / "tiny.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "src" / "ok.png")
    manifest = _prepare(tmp_path / "src", tmp_path / "out", resolution=8, min_size=8)
    assert manifest.num_images == 1
    assert manifest.skipped == [{"file": "tiny.png", "reason": "too small (3x3 < --min-size 8)"}]


def test_rerun_writes_byte_identical_shards_whatever_the_worker_count(tmp_path, kit):
    kit.write_class_folders(tmp_path / "src", {"a": kit.random_images(30, (24, 20), seed=3)})
    first = _prepare(tmp_path / "src", tmp_path / "one" / "ds", workers=1, shard_size=7)
    second = _prepare(tmp_path / "src", tmp_path / "two" / "ds", workers=2, shard_size=7)
    names = sorted(os.listdir(tmp_path / "one" / "ds"))
    assert names == sorted(os.listdir(tmp_path / "two" / "ds")) and len(names) == 6  # 5 + manifest
    for name in names:
        assert (tmp_path / "one" / "ds" / name).read_bytes() == (
            tmp_path / "two" / "ds" / name
        ).read_bytes()
    assert first.manifest_hash == second.manifest_hash


def test_interrupted_prepare_leaves_no_manifest_and_a_rerun_completes(tmp_path, kit):
    kit.write_class_folders(tmp_path / "src", {"x": kit.random_images(500, (128, 128), seed=4)})
    dest = tmp_path / "ds"
    command = [sys.executable, "-m", "sg2dist", "prepare", str(tmp_path / "src"), str(dest)]
    command += ["--resolution", "64", "--shard-size", "10", "--workers", "1", "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (dest.exists() and any(n.endswith(".tar") for n in os.listdir(dest))):
        assert time.monotonic() < deadline and process.poll() is None, "prepare wrote no shard"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()

    assert not (dest / MANIFEST_NAME).exists()
    with pytest.raises(UserError, match="dataset.json is missing"):
        open_manifest(str(dest))

    manifest = _prepare(tmp_path / "src", dest, resolution=64, shard_size=10, workers=2)
    assert manifest.num_images == 500 and len(manifest.shards) == 50
    assert open_manifest(str(dest)).manifest_hash == manifest.manifest_hash
    assert sorted(os.listdir(dest)) == sorted([s.name for s in manifest.shards] + [MANIFEST_NAME])


def test_existing_dataset_is_only_replaced_with_overwrite(tmp_path, kit):
    kit.write_class_folders(tmp_path / "src", {"a": kit.random_images(3, (8, 8), seed=5)})
    _prepare(tmp_path / "src", tmp_path / "ds")
    with pytest.raises(UserError, match="already holds a dataset.*--overwrite"):
        _prepare(tmp_path / "src", tmp_path / "ds")
    assert _prepare(tmp_path / "src", tmp_path / "ds", overwrite=True).num_images == 3


def _solid(color: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (color, color, color))


def test_labels_from_a_csv_file_number_text_labels_in_sorted_order(tmp_path):
    (tmp_path / "src").mkdir()
    for name, color in (("a.png", 10), ("b.png", 20), ("c.png", 30), ("unlisted.png", 40)):
        _solid(color).save(tmp_path / "src" / name)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("filename,label\na.png,zebra\nb.png,ant\nc.png,zebra\n")

    manifest = _prepare(tmp_path / "src", tmp_path / "ds", labels=str(csv_path))

    assert manifest.label_names == ["ant", "zebra"] and manifest.c_dim == 2
    assert manifest.skipped == [{"file": "unlisted.png", "reason": "no label in csv:labels.csv"}]
    labels = {int(px[0, 0, 0]): label for px, label in iter_images(str(tmp_path / "ds"))}
    assert labels == {10: 1, 20: 0, 30: 1}


def test_official_stylegan_zip_brings_its_dataset_json_labels(tmp_path):
    archive = tmp_path / "official.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        pairs = []
        for i, color in enumerate((50, 60, 70)):
            name = f"00000/img{i:08d}.png"
            buffer = io.BytesIO()
            _solid(color).save(buffer, "PNG")
            zf.writestr(name, buffer.getvalue())
            pairs.append([name, [3, 0, 1][i]])
        zf.writestr("dataset.json", json.dumps({"labels": pairs}))

    manifest = _prepare(archive, tmp_path / "ds")

    assert manifest.c_dim == 4 and manifest.source["kind"] == "zip"
    assert manifest.source["labels"] == "dataset.json" and manifest.skipped == []
    labels = {int(px[0, 0, 0]): label for px, label in iter_images(str(tmp_path / "ds"))}
    assert labels == {50: 3, 60: 0, 70: 1}


def test_crop_none_with_a_non_square_image_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "src").mkdir()
    Image.new("RGB", (12, 8)).save(tmp_path / "src" / "wide.png")
    with pytest.raises(UserError, match=r"wide\.png is 12x8, not square.*--crop center"):
        _prepare(tmp_path / "src", tmp_path / "ds", crop="none")
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists()


def test_center_wide_keeps_the_full_width_and_letterboxes(tmp_path):
    (tmp_path / "src").mkdir()
    Image.new("RGB", (32, 16), (250, 250, 250)).save(tmp_path / "src" / "wide.png")
    _prepare(tmp_path / "src", tmp_path / "ds", resolution=16, crop="center-wide")
    ((pixels, _),) = list(iter_images(str(tmp_path / "ds")))
    assert (pixels[:, :4] == 0).all() and (pixels[:, 12:] == 0).all()  # black bars
    assert (pixels[:, 4:12] == 250).all()  # the whole image, scaled to 16 x 8


def test_jpeg_output_holds_jpg_members_that_the_loader_decodes(tmp_path, kit):
    kit.write_class_folders(tmp_path / "src", {"a": kit.random_images(4, (8, 8), seed=6)})
    manifest = _prepare(tmp_path / "src", tmp_path / "ds", image_format="jpg", quality=90)
    with tarfile.open(tmp_path / "ds" / manifest.shards[0].name) as tar:
        assert sorted(tar.getnames()) == [f"{i:08d}.jpg" for i in range(4)]
    loader = build_loader(
        str(tmp_path / "ds"),
        batch_gpu=4,
        rank=0,
        world_size=1,
        seed=0,
        workers=0,
        mirror=False,
        shuffle_buffer=4,
        use_labels=False,
    )
    assert next(loader).img_NCHW.shape == (4, 3, 8, 8)


def test_folder_without_a_usable_image_is_an_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.md").write_text("# nothing")
    (tmp_path / "src" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match="no usable images in .*2 files skipped"):
        _prepare(tmp_path / "src", tmp_path / "ds")
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists()


def test_cli_rejects_a_resolution_that_is_not_a_power_of_two_in_one_line(tmp_path, capsys):
    code = cli.main(["prepare", str(tmp_path), str(tmp_path / "ds"), "--resolution", "100"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--resolution 100 is not a power of two" in err
