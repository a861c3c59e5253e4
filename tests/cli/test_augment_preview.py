"""`sg2dist augment-preview`: real images as D sees them, a grid PNG."""

import numpy as np
from PIL import Image

from sg2dist import cli
from sg2dist.data import iter_images


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_preview_at_p_zero_shows_the_real_images_unchanged(digits_url, tmp_path, capsys):
    out = tmp_path / "p0.png"
    assert (
        cli.main(["augment-preview", "--data", digits_url, "--p", "0", "--grid", "4x2", str(out)])
        == 0
    )
    grid = read(out)
    assert grid.shape == (2 * 32, 4 * 32)  # grayscale digits, 4 columns x 2 rows
    first = next(iter_images(digits_url))[0][0]
    assert np.array_equal(grid[:32, :32], first)
    assert "as D sees them" in capsys.readouterr().out


def test_preview_at_high_p_augments_and_diffaugment_differs_again(digits_url, tmp_path):
    paths = {name: tmp_path / f"{name}.png" for name in ("p0", "p1", "diff")}
    base = ["augment-preview", "--data", digits_url, "--grid", "4x2"]
    assert cli.main([*base, "--p", "0", str(paths["p0"])]) == 0
    assert cli.main([*base, "--p", "1", "--pipe", "bgcfnc", str(paths["p1"])]) == 0
    assert cli.main([*base, "--mode", "diffaugment", str(paths["diff"])]) == 0
    p0, p1, diff = (read(paths[name]).astype(int) for name in ("p0", "p1", "diff"))
    for augmented in (p1, diff):
        cells = augmented.reshape(2, 32, 4, 32) != p0.reshape(2, 32, 4, 32)
        assert cells.any(axis=(1, 3)).all()  # every image changed


def test_preview_errors_name_the_option(digits_url, tmp_path, capsys):
    assert (
        cli.main(["augment-preview", "--data", digits_url, "--p", "1.5", str(tmp_path / "x.png")])
        == 2
    )
    assert "--p 1.5 must be in [0, 1]" in capsys.readouterr().err
    assert cli.main(["augment-preview", "--data", digits_url, str(tmp_path / "x.jpg")]) == 2
    assert "must end in .png" in capsys.readouterr().err
