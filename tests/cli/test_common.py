"""What the generator commands share (sg2dist/cli/common.py): seed lists, checkpoints
local or in S3, devices, and one clear error line for every user mistake."""

from pathlib import Path

import numpy as np
import pytest
import torch
from support.generator_runs import cell, generated, make_run, mp4_frames, pixels, sg2dist

from sg2dist import storage
from sg2dist.cli import main as cli
from sg2dist.cli.common import parse_seeds


def test_seed_lists_mix_numbers_and_inclusive_ranges_in_order():
    assert parse_seeds("1,2,5-7") == [1, 2, 5, 6, 7]
    assert parse_seeds("9, 0-1") == [9, 0, 1]


def test_commands_read_and_write_s3_like_local_paths(s3_env, tmp_path):
    local_run = make_run(str(tmp_path / "run"), seed=3)
    s3_run = make_run(storage.join(s3_env.url, "run"), seed=3)  # the same weights
    out = storage.join(s3_env.url, "out")
    local = generated(local_run, "5,6", tmp_path / "local")

    sg2dist(f"generate --checkpoint {s3_run} --seeds 5,6 --outdir {out}")
    for seed in (5, 6):
        remote = storage.read_bytes(storage.join(out, f"seed{seed:04d}.png"))
        assert np.array_equal(pixels(remote), local[seed])

    sg2dist(f"style-mix --checkpoint {s3_run} --rows 5 --cols 6 {out}/mix.png")
    figure = pixels(storage.read_bytes(f"{out}/mix.png"))
    assert np.array_equal(cell(figure, 0, 1), local[6])
    assert np.array_equal(cell(figure, 1, 0), local[5])

    sg2dist(f"interpolate --checkpoint {s3_run} --seeds 5,6 --frames 2 {out}/walk.mp4")
    assert len(mp4_frames(storage.read_bytes(f"{out}/walk.mp4"))) == 2 * 2 + 1


def latest_folder(run_url: str) -> Path:
    checkpoints = Path(run_url, "checkpoints")
    return checkpoints / (checkpoints / "latest").read_text()


def corrupt_state(run_url: str) -> str:
    """Flip one byte of the checkpoint's state.pt; return the step folder."""
    state_pt = latest_folder(run_url) / "state.pt"
    state = bytearray(state_pt.read_bytes())
    state[-10] ^= 0xFF
    state_pt.write_bytes(bytes(state))
    return str(state_pt.parent)


def garble_meta(run_url: str) -> str:
    """Replace the checkpoint's meta.json with text that is not JSON; return the step folder."""
    meta_json = latest_folder(run_url) / "meta.json"
    meta_json.write_text("{not json")
    return str(meta_json.parent)


GEN = "generate --checkpoint {ckpt} --outdir {out}"
ERRORS = {
    # name: (checkpoint: "rgb", "gray", None (missing) or a function that breaks a fresh run,
    #        command line with {ckpt} and {out} placeholders, words the error line must hold)
    "missing checkpoint": (None, GEN + " --seeds 0", "no checkpoint found at"),
    "corrupt checkpoint": (corrupt_state, GEN + " --seeds 0", "incomplete or corrupt"),
    "unreadable meta.json": (garble_meta, GEN + " --seeds 0", "is incomplete or corrupt"),
    "seed range that does not parse": ("rgb", GEN + " --seeds 0-6x", "does not parse"),
    "backwards seed range": ("rgb", GEN + " --seeds 9-3", "runs backwards"),
    "class out of range": ("gray", GEN + " --seeds 0 --class 3", "out of range"),
    "negative class": ("gray", GEN + " --seeds 0 --class -1", "out of range"),
    "class on an unconditional model": ("rgb", GEN + " --seeds 0 --class 0", "unconditional"),
    "no class on a conditional model": ("gray", GEN + " --seeds 0", "pass --class N"),
    "grid the seeds do not fill": ("rgb", GEN + " --seeds 0-5 --grid 2x2 {out}/g.png", "holds 4"),
    "styles beyond the model's layers": (
        "rgb",
        "style-mix --checkpoint {ckpt} --rows 1 --cols 2 --styles 0-8 {out}/mix.png",
        "names layer 8",
    ),
    "walk to an unknown format": (
        "rgb",
        "interpolate --checkpoint {ckpt} --seeds 1,2 {out}/walk.avi",
        ".gif or .mp4",
    ),
    "walk through one seed": (
        "rgb",
        "interpolate --checkpoint {ckpt} --seeds 1 {out}/walk.gif",
        "two or more",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_mistakes_end_in_one_clear_error_line(case, rgb_run, gray_run, tmp_path, capsys):
    checkpoint, command, words = ERRORS[case]
    if checkpoint is None:
        ckpt = str(tmp_path / "no-such-run")
    elif callable(checkpoint):
        ckpt = checkpoint(make_run(str(tmp_path / "run")))
    else:
        ckpt = {"rgb": rgb_run, "gray": gray_run}[checkpoint]
    out = tmp_path / "out"
    assert cli(command.format(ckpt=ckpt, out=out).split()) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sg2dist: error: ") and "\n" not in err, err
    assert words in err
    assert not out.exists()  # nothing was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_clear_error(rgb_run, tmp_path, capsys):
    argv = f"generate --checkpoint {rgb_run} --seeds 0 --outdir {tmp_path} --device cuda"
    assert cli(argv.split()) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
