"""`sg2dist project` end to end on tiny checkpoints with test-built LPIPS weights: the output
files, --w-plus, --video, the npz round trip through `generate --ws`, grayscale targets."""

from __future__ import annotations

import io
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image
from support.generator_runs import pixels, sg2dist
from support.tiny import tiny_model_sets

from sg2dist.cli import main as cli
from sg2dist.config import load_config
from sg2dist.data.imageops import ConvertSettings, convert_image
from sg2dist.model import build_networks
from sg2dist.sampling import ws_from_npz
from sg2dist.train.checkpoint import save_checkpoint

RES = 16


def tiny_run(folder, *overrides: str) -> str:
    torch.manual_seed(0)
    cfg = load_config(None, [*tiny_model_sets(resolution=RES), *overrides])
    G, _ = build_networks(cfg.model)
    save_checkpoint(str(folder), 0, {"G_ema": G.state_dict()}, {"config": cfg.to_dict()})
    return str(folder)


def video_frames(data: bytes, height: int, width: int) -> np.ndarray:
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", "-"]
    command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    decoded = subprocess.run(command, input=data, capture_output=True, check=True).stdout
    return np.frombuffer(decoded, np.uint8).reshape(-1, height, width, 3)


def test_w_plus_projection_writes_its_files_and_its_ws_render_again_with_generate(
    tmp_path, lpips_weights
):
    run = tiny_run(tmp_path / "run")
    sg2dist(f"generate --checkpoint {run} --seeds 3 --outdir {tmp_path / 'target'}")
    out = tmp_path / "out"
    sg2dist(
        f"project --checkpoint {run} --target {tmp_path / 'target' / 'seed0003.png'} "
        f"--outdir {out} --steps 4 --w-plus --video --lpips-weights {lpips_weights}"
    )
    ws = ws_from_npz((out / "projected_w.npz").read_bytes())
    assert ws.shape == (1, 6, 32)  # [1, num_ws, w_dim] of a 16 px model
    assert not torch.equal(ws[0, 0], ws[0, -1])  # W+: one w per layer
    np.testing.assert_array_equal(
        pixels(out / "target.png"), pixels(tmp_path / "target" / "seed0003.png")
    )
    side_by_side = pixels(out / "target_proj.png")
    np.testing.assert_array_equal(side_by_side[:, :RES], pixels(out / "target.png"))
    np.testing.assert_array_equal(side_by_side[:, RES:], pixels(out / "proj.png"))

    sg2dist(
        f"generate --checkpoint {run} --ws {out / 'projected_w.npz'} --outdir {tmp_path / 'again'}"
    )
    np.testing.assert_array_equal(
        pixels(tmp_path / "again" / "ws0000.png"), pixels(out / "proj.png")
    )

    frames = video_frames((out / "proj.mp4").read_bytes(), RES, 2 * RES)
    assert len(frames) == 4  # one frame per step: target | projection
    last = frames[-1, :, RES:].astype(int)
    assert np.abs(last - pixels(out / "proj.png")).mean() < 8  # H.264 is lossy


def test_a_grayscale_model_projects_a_grayscale_centre_crop_of_an_rgb_photo(
    tmp_path, lpips_weights, capsys
):
    run = tiny_run(tmp_path / "run", "model.img_channels=1", "model.c_dim=3")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))  # wide RGB
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    (tmp_path / "photo.png").write_bytes(buffer.getvalue())
    out = tmp_path / "out"
    sg2dist(
        f"project --checkpoint {run} --target {tmp_path / 'photo.png'} --class 2 --outdir {out} "
        f"--steps 2 --lpips-weights {lpips_weights}"
    )
    assert "LPIPS distance" in capsys.readouterr().out
    # What `prepare` makes of the photo for a 16 px grayscale dataset.
    expected = convert_image(buffer.getvalue(), ConvertSettings(RES, channels=1), "photo.png")
    np.testing.assert_array_equal(pixels(out / "target.png"), pixels(expected))
    assert pixels(out / "proj.png").shape == (RES, RES)
    assert ws_from_npz((out / "projected_w.npz").read_bytes()).shape == (1, 6, 32)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ("", "no LPIPS weights set; "),
        ("--lpips-weights {tmp}/missing.pth", "missing.pth do not exist; "),
        ("--lpips-weights {weights} --class 0", "this model is unconditional"),
        ("--lpips-weights {weights} --steps 0", "--steps 0 must be >= 1"),
    ],
)
def test_project_mistakes_are_one_clear_error(tmp_path, lpips_weights, capsys, options, words):
    run = tiny_run(tmp_path / "run")
    (tmp_path / "photo.png").write_bytes(pixels_png())
    argv = (
        f"project --checkpoint {run} --target {tmp_path / 'photo.png'} --outdir {tmp_path / 'out'} "
    )
    argv += options.format(tmp=tmp_path, weights=lpips_weights)
    assert cli(argv.split()) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sg2dist: error: ") and "\n" not in err, err
    assert words in err
    assert not (tmp_path / "out").exists()


def pixels_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (RES, RES), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()
