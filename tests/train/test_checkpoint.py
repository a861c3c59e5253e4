"""Checkpoint folders: the pointer is trusted only for intact folders; retention; safe loading."""

import io
import json
import os
from pathlib import Path

import pytest
import torch

from sg2dist.errors import UserError
from sg2dist.train import checkpoint as ckpt


def save(run_dir, nimg: int) -> str:
    state = {"G": {"w": torch.full((2,), float(nimg))}, "rng_cpu": [torch.get_rng_state()]}
    return ckpt.save_checkpoint(str(run_dir), nimg, state, {"progress": {"cur_nimg": nimg}})


def test_latest_pointer_is_written_last_and_names_the_newest_folder(tmp_path):
    save(tmp_path, 100)
    save(tmp_path, 200)
    assert (tmp_path / "checkpoints" / "latest").read_text() == ckpt.folder_name(200)
    latest = ckpt.find_latest(str(tmp_path))
    assert latest.meta["progress"]["cur_nimg"] == 200
    assert latest.state["G"]["w"][0] == 200


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path):
    save(tmp_path, 100)
    folder = save(tmp_path, 200)
    state_path = os.path.join(folder, "state.pt")
    data = bytearray(Path(state_path).read_bytes())
    data[-10] ^= 0xFF  # one flipped byte: the sha256 in meta.json no longer matches
    Path(state_path).write_bytes(bytes(data))
    assert ckpt.find_latest(str(tmp_path)).meta["progress"]["cur_nimg"] == 100


def test_garbled_meta_json_counts_as_broken_and_falls_back(tmp_path):
    save(tmp_path, 100)
    folder = save(tmp_path, 200)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        f.write('{"progress": {"cur_ni')  # torn write
    assert ckpt.find_latest(str(tmp_path)).meta["progress"]["cur_nimg"] == 100


def test_folder_newer_than_the_pointer_is_ignored_even_if_it_looks_complete(tmp_path):
    save(tmp_path, 100)
    save(tmp_path, 200)
    (tmp_path / "checkpoints" / "latest").write_text(ckpt.folder_name(100))
    assert ckpt.find_latest(str(tmp_path)).meta["progress"]["cur_nimg"] == 100


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint found at"):
        ckpt.load_checkpoint(str(tmp_path / "nothing-here"))


def test_prune_keeps_the_last_n_and_every_mth_snapshot(tmp_path):
    for nimg in range(100, 1100, 100):  # snapshots 1..10 at 100 images each
        save(tmp_path, nimg)
    save(tmp_path, 1050)  # an off-grid checkpoint (e.g. SIGTERM)
    ckpt.prune_checkpoints(str(tmp_path), keep_last=2, keep_every=4, snapshot_nimg=100)
    left = sorted(p.name for p in (tmp_path / "checkpoints").glob("nimg-*"))
    assert left == [ckpt.folder_name(n) for n in (400, 800, 1000, 1050)]


def test_checkpoint_state_loads_with_weights_only_and_meta_is_plain_json(tmp_path):
    folder = save(tmp_path, 100)
    raw = Path(folder, "state.pt").read_bytes()
    state = torch.load(io.BytesIO(raw), weights_only=True)
    assert torch.equal(state["G"]["w"], torch.full((2,), 100.0))
    meta = json.loads(Path(folder, "meta.json").read_text())
    assert meta["state_bytes"] == len(raw)
