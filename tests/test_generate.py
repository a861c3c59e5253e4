"""generate, style-mix and interpolate on real (tiny, randomly initialised) checkpoints.

Random weights make noise-like images, but deterministic ones, which is all these
tests need: they compare pixels between commands, runs and storage back ends. The
noise strengths are set non-zero so that the noise modes matter. Commands run
in-process through `sg2dist.cli.main` (one test runs a real subprocess); pytest's
temporary paths hold no spaces, so a command line is written as one string.
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from sg2dist import storage
from sg2dist.cli import main as cli
from sg2dist.config import load_config
from sg2dist.images import parse_seeds
from sg2dist.model import build_networks
from sg2dist.train.checkpoint import save_checkpoint

RES = 32
NUM_WS = 8  # at 32 px: 1 conv at 4 px, 2 per doubling, plus the last toRGB
TINY_MODEL = (
    f"model.resolution={RES} model.z_dim=32 model.w_dim=32 model.map_layers=2 "
    "model.channel_base=512 model.channel_max=32"
).split()


def make_run(run_url: str, *overrides: str, seed: int = 0) -> str:
    """Save a checkpoint of freshly initialised networks into `run_url` (local or s3://)."""
    torch.manual_seed(seed)
    cfg = load_config(None, TINY_MODEL + list(overrides))
    G, _D = build_networks(cfg.model)
    with torch.no_grad():
        for name, param in G.named_parameters():
            if name.endswith("noise_strength"):
                param.fill_(0.5)
    save_checkpoint(run_url, 0, {"G_ema": G.state_dict()}, {"config": cfg.to_dict()})
    return run_url


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory) -> str:
    """An unconditional RGB model."""
    return make_run(str(tmp_path_factory.mktemp("runs") / "rgb"))


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory) -> str:
    """A conditional (3 classes) grayscale model."""
    folder = tmp_path_factory.mktemp("runs") / "gray"
    return make_run(str(folder), "model.img_channels=1", "model.c_dim=3", seed=1)


def sg2dist(command: str) -> None:
    """Run one command in-process; on the CPU unless it names a device, since pixels are
    bit-exact across batch sizes there (a GPU may move them by a level)."""
    argv = command.split()
    if "--device" not in argv:
        argv += ["--device", "cpu"]
    assert cli(argv) == 0, command


def pixels(png) -> np.ndarray:
    """uint8 [H, W] (grayscale) or [H, W, 3] from a PNG path or bytes."""
    return np.array(Image.open(io.BytesIO(png) if isinstance(png, bytes) else png))


def generated(run_url: str, seeds: str, outdir, options: str = "") -> dict[int, np.ndarray]:
    """seed -> pixels of `sg2dist generate` for those seeds."""
    sg2dist(f"generate --checkpoint {run_url} --seeds {seeds} --outdir {outdir} {options}")
    return {int(name[4:-4]): pixels(os.path.join(outdir, name)) for name in os.listdir(outdir)}


def cell(figure: np.ndarray, row: int, col: int) -> np.ndarray:
    return figure[row * RES : (row + 1) * RES, col * RES : (col + 1) * RES]


# ---------------------------------------------------------------------------- generate


def test_seed_lists_mix_numbers_and_inclusive_ranges_in_order():
    assert parse_seeds("1,2,5-7") == [1, 2, 5, 6, 7]
    assert parse_seeds("9, 0-1") == [9, 0, 1]


def test_same_checkpoint_and_seed_give_the_identical_png_twice(rgb_run, tmp_path):
    sg2dist(f"generate --checkpoint {rgb_run} --seeds 0-3 --outdir {tmp_path / 'a'}")
    sg2dist(f"generate --checkpoint {rgb_run} --seeds 0-3 --outdir {tmp_path / 'b'}")
    for name in ("seed0000.png", "seed0002.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Another batch size and other batch-mates: the CPU convolution may pick another
    # algorithm for another batch size, so allow one level of rounding difference.
    sg2dist(f"generate --checkpoint {rgb_run} --seeds 2,0 --batch 1 --outdir {tmp_path / 'c'}")
    for name in ("seed0000.png", "seed0002.png"):
        diff = pixels(tmp_path / "a" / name).astype(int) - pixels(tmp_path / "c" / name)
        assert np.abs(diff).max() <= 1
    first = pixels(tmp_path / "a" / "seed0000.png")
    assert first.shape == (RES, RES, 3)
    assert not np.array_equal(first, pixels(tmp_path / "a" / "seed0001.png"))


def test_trunc_zero_gives_the_same_image_for_every_seed(rgb_run, tmp_path):
    average = generated(rgb_run, "0-4", tmp_path / "psi0", "--trunc 0")
    assert sorted(average) == [0, 1, 2, 3, 4]
    assert all(np.array_equal(img, average[0]) for img in average.values())
    varied = generated(rgb_run, "0-4", tmp_path / "psi1", "--trunc 1")
    assert not np.array_equal(varied[0], average[0])


def test_random_noise_is_reproducible_per_seed_and_differs_from_const_noise(rgb_run, tmp_path):
    random_a = generated(rgb_run, "0-2", tmp_path / "ra", "--noise-mode random")
    random_b = generated(rgb_run, "2", tmp_path / "rb", "--noise-mode random")
    const = generated(rgb_run, "2", tmp_path / "c")
    assert np.array_equal(random_a[2], random_b[2])
    assert not np.array_equal(random_a[2], const[2])


def test_grid_tiles_the_seed_images_row_by_row(rgb_run, tmp_path):
    sg2dist(
        f"generate --checkpoint {rgb_run} --seeds 10-15 --outdir {tmp_path / 'imgs'} "
        f"--grid 3x2 {tmp_path / 'grid.png'}"
    )
    grid = pixels(tmp_path / "grid.png")
    assert grid.shape == (2 * RES, 3 * RES, 3)
    for i, seed in enumerate(range(10, 16)):
        single = pixels(tmp_path / "imgs" / f"seed{seed:04d}.png")
        assert np.array_equal(cell(grid, i // 3, i % 3), single), seed


def test_conditional_grayscale_model_gives_grayscale_images_per_class(gray_run, tmp_path):
    class0 = generated(gray_run, "0", tmp_path / "c0", "--class 0")[0]
    class2 = generated(gray_run, "0", tmp_path / "c2", "--class 2")[0]
    assert class0.shape == (RES, RES)  # a PNG in mode "L"
    assert not np.array_equal(class0, class2)


# ---------------------------------------------------------------------------- style-mix


def test_style_mix_figure_has_the_expected_size_and_the_source_images_on_its_borders(
    rgb_run, tmp_path
):
    rows, cols = [85, 100, 75], [55, 821]
    sg2dist(
        f"style-mix --checkpoint {rgb_run} --rows 85,100,75 --cols 55,821 --styles 0-3 "
        f"{tmp_path / 'mix.png'}"
    )
    figure = pixels(tmp_path / "mix.png")
    assert figure.shape == ((len(rows) + 1) * RES, (len(cols) + 1) * RES, 3)
    reference = generated(rgb_run, "85,100,75,55,821", tmp_path / "ref")
    assert not cell(figure, 0, 0).any()  # the empty top-left cell
    for j, seed in enumerate(cols):
        assert np.array_equal(cell(figure, 0, j + 1), reference[seed]), seed
    for i, seed in enumerate(rows):
        assert np.array_equal(cell(figure, i + 1, 0), reference[seed]), seed
    mixed = cell(figure, 1, 1)  # row 85's coarse styles over column 55
    assert not np.array_equal(mixed, reference[85])
    assert not np.array_equal(mixed, reference[55])


def test_style_mix_with_every_layer_from_the_rows_repeats_each_row_image(rgb_run, tmp_path):
    sg2dist(
        f"style-mix --checkpoint {rgb_run} --rows 1,2 --cols 3,4 --styles 0-{NUM_WS - 1} "
        f"{tmp_path / 'mix.png'}"
    )
    figure = pixels(tmp_path / "mix.png")
    for i in (1, 2):
        for j in (1, 2):
            assert np.array_equal(cell(figure, i, j), cell(figure, i, 0))


# ---------------------------------------------------------------------------- interpolate


def gif_frames(path) -> list[np.ndarray]:
    return [np.array(frame.convert("L")) for frame in ImageSequence.Iterator(Image.open(path))]


def mp4_frames(data: bytes) -> np.ndarray:
    """Decode with the bundled ffmpeg -> uint8 [T, H, W, 3]."""
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", "-"]
    command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    decoded = subprocess.run(command, input=data, capture_output=True, check=True).stdout
    return np.frombuffer(decoded, np.uint8).reshape(-1, RES, RES, 3)


def luma(img_HW3: np.ndarray) -> np.ndarray:
    return img_HW3.astype(float) @ np.array([0.299, 0.587, 0.114])


@pytest.mark.parametrize("space", ["w", "z"])
def test_gif_walk_starts_and_ends_on_the_first_seed_image(gray_run, tmp_path, space):
    # A grayscale GIF keeps every gray level, so its frames compare exactly.
    reference = generated(gray_run, "7,8,9", tmp_path / "ref", "--class 1")
    sg2dist(
        f"interpolate --checkpoint {gray_run} --class 1 --seeds 7,8,9 --frames 4 "
        f"--space {space} {tmp_path / 'walk.gif'}"
    )
    frames = gif_frames(tmp_path / "walk.gif")
    assert len(frames) == 3 * 4 + 1
    assert np.array_equal(frames[0], reference[7]) and np.array_equal(frames[-1], reference[7])
    assert np.array_equal(frames[4], reference[8]) and np.array_equal(frames[8], reference[9])
    assert not np.array_equal(frames[1], reference[7])


def test_mp4_walk_starts_and_ends_close_to_the_first_seed_image(rgb_run, tmp_path):
    reference = generated(rgb_run, "1,2", tmp_path / "ref")
    sg2dist(f"interpolate --checkpoint {rgb_run} --seeds 1,2 --frames 3 {tmp_path / 'walk.mp4'}")
    frames = mp4_frames((tmp_path / "walk.mp4").read_bytes())
    assert len(frames) == 2 * 3 + 1
    # H.264 in yuv420p is lossy and keeps colour at half resolution, which noise-like
    # images feel most: compare luma, close to the first seed's image, far from the second's.
    for frame in (frames[0], frames[-1]):
        assert np.abs(luma(frame) - luma(reference[1])).mean() < 12
        assert np.abs(luma(frame) - luma(reference[2])).mean() > 30


# ---------------------------------------------------------------------------- S3


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


def test_generate_runs_as_a_subprocess_against_s3(s3_env, tmp_path):
    # s3_env has put the server's endpoint and keys into os.environ: the child inherits them.
    s3_run = make_run(storage.join(s3_env.url, "run"), seed=4)
    grid_url = storage.join(s3_env.url, "grid.png")
    command = f"generate --checkpoint {s3_run} --seeds 0-3 --grid 2x2 {grid_url} --device cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "sg2dist", *command.split()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote the 2x2 grid to {grid_url}" in proc.stdout
    local = generated(make_run(str(tmp_path / "run"), seed=4), "0-3", tmp_path / "local")
    assert np.array_equal(cell(pixels(storage.read_bytes(grid_url)), 1, 0), local[2])
    assert s3_env.server.secret_key not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- errors


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_images_match_cpu_images_within_one_or_two_levels(rgb_run, tmp_path, monkeypatch):
    # generate turns TF32 off for the process; give other tests back the setting they had.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    monkeypatch.setattr(
        torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32
    )
    cpu = generated(rgb_run, "0-7", tmp_path / "cpu")
    cuda = generated(rgb_run, "0-7", tmp_path / "cuda", "--device cuda")
    for seed in range(8):
        assert np.abs(cpu[seed].astype(int) - cuda[seed]).max() <= 2, seed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_clear_error(rgb_run, tmp_path, capsys):
    argv = f"generate --checkpoint {rgb_run} --seeds 0 --outdir {tmp_path} --device cuda"
    assert cli(argv.split()) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
