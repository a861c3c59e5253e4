"""`sg2dist interpolate`: looping walks as GIF and mp4, against `generate`'s images."""

import numpy as np
import pytest
from support.generator_runs import generated, gif_frames, luma, mp4_frames, sg2dist


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
