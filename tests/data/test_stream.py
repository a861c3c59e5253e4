"""The training stream: determinism, exact resume, epoch coverage, corrupt and missing data."""

from __future__ import annotations

import io
import os
import tarfile
from itertools import islice

import pytest
import torch

from sg2dist.data import StreamState, check_resolution, open_manifest
from sg2dist.data.shards import tar_members
from sg2dist.errors import UserError


@pytest.mark.parametrize("consumed", [7, 12])
def test_resumed_stream_gives_exactly_the_batches_of_an_uninterrupted_one(
    stream_dataset, consumed, streams
):
    total = 22  # batches of 5 from shards of 16: batches straddle shard ends and visits
    reference = list(islice(streams.loader(stream_dataset), total))

    first = streams.loader(stream_dataset)
    for batch in islice(first, consumed):
        first.state.update(batch)
    next(first)  # fetched but never consumed: must not count
    saved = first.state.to_json()
    first.close()

    resumed = streams.loader(stream_dataset, state=StreamState.from_json(saved))
    continued = list(islice(resumed, total - consumed))
    assert streams.same_batches(reference[consumed:], continued)


def test_same_seed_gives_the_same_stream_and_every_rank_a_different_one(stream_dataset, streams):
    rank0 = list(islice(streams.loader(stream_dataset, world_size=2), 6))
    assert streams.same_batches(
        rank0, list(islice(streams.loader(stream_dataset, world_size=2), 6))
    )
    rank1 = list(islice(streams.loader(stream_dataset, world_size=2, rank=1), 6))
    other_seed = list(islice(streams.loader(stream_dataset, world_size=2, seed=1), 6))
    keys = [[b.keys for b in stream] for stream in (rank0, rank1, other_seed)]
    assert keys[0] != keys[1] and keys[0] != keys[2]


def test_workers_zero_runs_in_process_and_equals_one_worker(stream_dataset, streams):
    in_process = list(islice(streams.loader(stream_dataset, workers=0), 8))
    one_worker = list(islice(streams.loader(stream_dataset, workers=1), 8))
    assert streams.same_batches(in_process, one_worker)


def test_batches_are_uint8_images_with_one_hot_labels_and_flips_follow_the_seed(
    stream_dataset, streams
):
    plain = next(streams.loader(stream_dataset, mirror=False, workers=0))
    mirrored = next(streams.loader(stream_dataset, mirror=True, workers=0))
    assert plain.img_NCHW.dtype == torch.uint8 and plain.img_NCHW.shape == (5, 3, 16, 16)
    assert plain.c.shape == (5, 3) and torch.equal(plain.c.sum(1), torch.ones(5))
    assert plain.keys == mirrored.keys
    flipped = [
        torch.equal(m, p.flip(-1)) for m, p in zip(mirrored.img_NCHW, plain.img_NCHW, strict=True)
    ]
    kept = [torch.equal(m, p) for m, p in zip(mirrored.img_NCHW, plain.img_NCHW, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped)
    unlabelled = next(streams.loader(stream_dataset, use_labels=False, workers=0))
    assert unlabelled.c.shape == (5, 0)


def _epoch_keys(streams, url: str, batch_gpu: int) -> list[list[str]]:
    """Keys each of 2 ranks x 2 workers streams in one epoch of the non-resampled order."""
    per_rank = []
    for rank in (0, 1):
        loader = streams.loader(
            url, rank=rank, world_size=2, workers=2, batch_gpu=batch_gpu, resampled=False
        )
        batches = list(loader)
        assert len(batches) == loader.batches_per_epoch
        per_rank.append([key for batch in batches for key in batch.keys])
    return per_rank


def test_epoch_over_two_ranks_and_two_workers_covers_an_even_dataset_exactly_once(
    even_dataset, streams
):
    rank0, rank1 = _epoch_keys(streams, even_dataset, batch_gpu=4)
    assert len(rank0) == len(rank1) == 48
    assert sorted(rank0 + rank1) == [f"{i:08d}" for i in range(96)]


def test_epoch_over_uneven_shards_gives_equal_batch_counts_and_no_duplicates(
    stream_dataset, streams
):
    rank0, rank1 = _epoch_keys(streams, stream_dataset, batch_gpu=4)
    assert len(rank0) == len(rank1) > 0
    assert len(set(rank0 + rank1)) == len(rank0) + len(rank1)  # nothing seen twice
    assert len(rank0) + len(rank1) >= 150 - 2 * 2 * 4 - 16  # truncation loses little


def _rewrite_shard(path: str, damage) -> list[str]:
    """Rewrite a shard in place through `damage(key, ext, data)`; returns the keys it changed."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    hit = []
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            key, ext = member.name.split(".", 1)
            new = damage(key, ext, data)
            if new is not data:
                hit.append(key)
            member.size = len(new)
            tar.addfile(member, io.BytesIO(new))
    return sorted(set(hit))


def test_corrupt_samples_are_skipped_and_counted_never_a_crash(
    stream_dataset, copy_dataset, streams
):
    url = copy_dataset(stream_dataset)
    manifest = open_manifest(url)
    bad = {f"{i:08d}" for i in (0, 3)}
    damaged = _rewrite_shard(
        os.path.join(url, manifest.shards[0].name),
        lambda key, ext, data: b"not a png" if key in bad and ext == "png" else data,
    )
    assert damaged == sorted(bad)

    loader = streams.loader(url, workers=2)
    keys_seen = set()
    for batch in islice(loader, 120):  # 600 samples: shard 0 is visited many times
        loader.state.update(batch)
        assert batch.img_NCHW.shape[0] == 5
        keys_seen.update(batch.keys)
    shard0_keys = {f"{i:08d}" for i in range(16)}
    assert keys_seen & shard0_keys and not keys_seen & bad  # shard 0 was read, bad ones skipped
    assert loader.state.corrupt_samples >= 2


def test_missing_shard_is_one_clear_error_naming_it(stream_dataset, copy_dataset, streams):
    url = copy_dataset(stream_dataset)
    missing = os.path.join(url, open_manifest(url).shards[4].name)
    os.remove(missing)
    with pytest.raises(UserError) as info:
        for _ in streams.loader(url, workers=2, resampled=False, world_size=1):
            pass
    assert f"shard {missing} is missing" in str(info.value) and "\n" not in str(info.value)


def test_truncated_shard_is_one_clear_error_naming_it(stream_dataset, copy_dataset, streams):
    url = copy_dataset(stream_dataset)
    damaged = os.path.join(url, open_manifest(url).shards[2].name)
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    with pytest.raises(UserError, match=f"shard {damaged} is damaged .*truncated"):
        for _ in streams.loader(url, workers=0, resampled=False):
            pass


def test_tar_reader_returns_what_tarfile_reads_from_a_prepared_shard(stream_dataset):
    shard = os.path.join(stream_dataset, open_manifest(stream_dataset).shards[0].name)
    with tarfile.open(shard) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with open(shard, "rb") as f:
        records = [(r["fname"], r["data"]) for r in tar_members(f, shard)]
    assert records == expected and len(records) == 2 * 16  # .cls and .png per sample


def test_resume_with_another_worker_count_is_refused(stream_dataset, streams):
    loader = streams.loader(stream_dataset, workers=2)
    loader.state.update(next(loader))
    with pytest.raises(UserError, match="num_workers=2 but this run has 3"):
        streams.loader(stream_dataset, workers=3, state=loader.state.to_dict())


def test_check_resolution_names_the_mismatch_and_the_fix(stream_dataset):
    manifest = open_manifest(stream_dataset)
    check_resolution(manifest, 16, 3)
    with pytest.raises(UserError, match="16 px images but model.resolution=32"):
        check_resolution(manifest, 32, 3)
    with pytest.raises(UserError, match="3-channel images but model.img_channels=1"):
        check_resolution(manifest, 16, 1)


def test_labels_requested_from_an_unlabelled_dataset_is_an_error(tmp_path, kit, streams):
    kit.write_class_folders(tmp_path / "src", {"a": kit.random_images(4, (16, 16), seed=9)})
    from sg2dist.data.imageops import ConvertSettings
    from sg2dist.data.prepare import prepare_dataset

    prepare_dataset(
        str(tmp_path / "src"),
        str(tmp_path / "ds"),
        ConvertSettings(16),
        labels="none",
        progress=False,
    )
    with pytest.raises(UserError, match="has no labels; set data.use_labels=false"):
        streams.loader(str(tmp_path / "ds"), use_labels=True)


def test_iterating_a_missing_dataset_names_the_url(tmp_path, streams):
    with pytest.raises(UserError, match=f"no dataset at {tmp_path}"):
        streams.loader(str(tmp_path))


def test_stream_state_round_trips_through_json():
    state = StreamState(seed=1, rank=0, world_size=2, num_workers=2, manifest_hash="abc")
    state.positions[1] = [4, 3]
    assert StreamState.from_json(state.to_json()) == state
    assert state.positions == [[0, 0], [4, 3]] and state.corrupt == [0, 0]
