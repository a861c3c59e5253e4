"""`sg2dist generate` on real (tiny, randomly initialised) checkpoints."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from support.generator_runs import RES, cell, generated, make_run, pixels, sg2dist

from sg2dist import storage


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
