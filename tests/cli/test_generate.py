"""`sg2dist generate` on real (tiny, randomly initialised) checkpoints."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from support.generator_runs import RES, cell, generated, gif_frames, make_run, pixels, sg2dist

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


def test_trunc_cutoff_truncates_only_the_first_n_ws(rgb_run, tmp_path):
    from sg2dist.sampling import class_labels, synthesize, z_from_seeds
    from sg2dist.train.checkpoint import load_generator

    G, _cfg, _meta = load_generator(rgb_run)
    coarse = generated(rgb_run, "3", tmp_path / "coarse", "--trunc 0 --trunc-cutoff 4")[3]
    # By hand: psi 0 puts the average w into the 4 coarsest layers, the seed's w elsewhere.
    with torch.no_grad():
        ws = G.mapping(z_from_seeds([3], G.z_dim), class_labels(G.c_dim, None, 1))
        ws[:, :4] = G.mapping.w_avg
    by_hand = synthesize(
        G, ws, noise_mode="const", noise_seeds=[3], batch=1, device=torch.device("cpu"), desc=""
    )[0]
    assert np.abs(coarse.astype(int) - by_hand).max() <= 1
    everything = generated(rgb_run, "3", tmp_path / "all", "--trunc 0 --trunc-cutoff 8")[3]
    np.testing.assert_array_equal(
        everything, generated(rgb_run, "3", tmp_path / "psi0", "--trunc 0")[3]
    )
    assert np.abs(coarse.astype(int) - everything).max() > 10


def test_style_mix_and_interpolate_take_the_trunc_cutoff_too(gray_run, tmp_path):
    options = "--class 1 --trunc 0 --trunc-cutoff 3"
    images = generated(gray_run, "4,7", tmp_path / "gen", options)
    sg2dist(
        f"style-mix --checkpoint {gray_run} {options} --rows 4 --cols 7 --styles 0 "
        f"{tmp_path / 'mix.png'}"
    )
    figure = pixels(tmp_path / "mix.png")
    np.testing.assert_array_equal(cell(figure, 0, 1), images[7])
    np.testing.assert_array_equal(cell(figure, 1, 0), images[4])
    sg2dist(
        f"interpolate --checkpoint {gray_run} {options} --seeds 4,7 --frames 2 "
        f"{tmp_path / 'walk.gif'}"
    )
    frames = gif_frames(tmp_path / "walk.gif")
    np.testing.assert_array_equal(frames[0], images[4])
    np.testing.assert_array_equal(frames[2], images[7])
    untruncated = generated(gray_run, "4", tmp_path / "plain", "--class 1")[4]
    assert not np.array_equal(untruncated, images[4])


def test_ws_file_renders_the_same_images_as_the_seeds_it_came_from(gray_run, tmp_path):
    from sg2dist.sampling import class_labels, map_z, ws_npz_bytes, z_from_seeds
    from sg2dist.train.checkpoint import load_generator

    G, _cfg, _meta = load_generator(gray_run)
    ws = map_z(
        G,
        z_from_seeds([5, 9], G.z_dim),
        class_labels(G.c_dim, 2, 2),
        truncation_psi=1.0,
        batch=2,
        device=torch.device("cpu"),
    )
    (tmp_path / "ws.npz").write_bytes(ws_npz_bytes(ws))
    from_seeds = generated(gray_run, "5,9", tmp_path / "seeds", "--class 2")
    sg2dist(
        f"generate --checkpoint {gray_run} --ws {tmp_path / 'ws.npz'} --outdir {tmp_path / 'ws'} "
        f"--grid 2x1 {tmp_path / 'grid.png'}"
    )
    np.testing.assert_array_equal(pixels(tmp_path / "ws" / "ws0000.png"), from_seeds[5])
    np.testing.assert_array_equal(pixels(tmp_path / "ws" / "ws0001.png"), from_seeds[9])
    np.testing.assert_array_equal(cell(pixels(tmp_path / "grid.png"), 0, 1), from_seeds[9])


def test_ws_file_mistakes_are_one_clear_error(rgb_run, gray_run, tmp_path, capsys):
    from sg2dist.cli import main as cli
    from sg2dist.sampling import ws_npz_bytes

    (tmp_path / "short.npz").write_bytes(ws_npz_bytes(torch.zeros(1, 4, 32)))
    (tmp_path / "text.npz").write_text("not a zip")
    cases = {
        f"--ws {tmp_path / 'short.npz'}": "shape [1, 4, 32]; this model takes [N, 8, 32]",
        f"--ws {tmp_path / 'text.npz'}": "is not a ws file",
        f"--ws {tmp_path / 'short.npz'} --seeds 0": "either --seeds",
        "": "either --seeds",
        f"--ws {tmp_path / 'short.npz'} --class 0": "--class has no effect with --ws",
        "--seeds 0 --trunc-cutoff 9": "--trunc-cutoff 9 is out of range; this model has 8",
    }
    for options, words in cases.items():
        argv = f"generate --checkpoint {rgb_run} --outdir {tmp_path / 'out'} {options}".split()
        assert cli(argv) == 2, options
        err = capsys.readouterr().err.strip()
        assert err.startswith("sg2dist: error: ") and "\n" not in err, err
        assert words in err, (options, err)
    assert not (tmp_path / "out").exists()
