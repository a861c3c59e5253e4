"""`sg2dist style-mix`: the figure's layout and its cells, against `generate`'s images."""

import numpy as np
from support.generator_runs import NUM_WS, RES, cell, generated, pixels, sg2dist


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
