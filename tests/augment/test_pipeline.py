"""The ADA pipeline: p = 0 is the identity, each transform does what it names, and the whole
pipeline's first and second derivatives match finite differences (R1 through ADA)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from sg2dist.augment import PIPES, TRANSFORMS, AdaPipeline, Augmenter
from sg2dist.config import AugmentConfig

SIZE = 32
CENTRE = (SIZE - 1) / 2


def grid() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(
        torch.arange(SIZE, dtype=torch.float64),
        torch.arange(SIZE, dtype=torch.float64),
        indexing="ij",
    )


def blobs(n: int, x: float = 18.0, y: float = 13.0, sigma: float = 2.5) -> torch.Tensor:
    """n copies of one Gaussian blob (a different level per channel), off the centre and far
    from the border, so its moments tell where it went and how wide it is."""
    yy, xx = grid()
    blob = torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    levels = torch.tensor([1.0, 0.5, -0.3], dtype=torch.float64)[:, None, None]
    return (blob * levels).expand(n, 3, SIZE, SIZE).clone()


def colourful(n: int) -> torch.Tensor:
    """n copies of a smooth image with different content per channel, within [-1, 1]."""
    yy, xx = grid()
    r = torch.sin(xx / 5) * 0.6
    g = torch.cos(yy / 4) * 0.5 + 0.2
    b = (xx - yy) / SIZE
    return torch.stack([r, g, b]).expand(n, 3, SIZE, SIZE).clone()


def run(transform: str, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """`transform` alone, at probability 1 (multiplier 1, p = 1)."""
    return AdaPipeline([transform])(images, 1.0, torch.Generator().manual_seed(seed))


def per_image_max(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(dim=(1, 2, 3))


def moments(images: torch.Tensor):
    """Centroid (x, y) and variances (x, y) of channel 0 per image."""
    mass = images[:, 0]
    total = mass.sum(dim=(1, 2))
    yy, xx = grid()
    cx, cy = (mass * xx).sum(dim=(1, 2)) / total, (mass * yy).sum(dim=(1, 2)) / total
    vx = (mass * (xx - cx[:, None, None]) ** 2).sum(dim=(1, 2)) / total
    vy = (mass * (yy - cy[:, None, None]) ** 2).sum(dim=(1, 2)) / total
    return cx, cy, vx, vy


# ---------------------------------------------------------------------------- p = 0


@pytest.mark.parametrize("pipe", ["bgc", "bgcfnc"])
def test_p_zero_is_the_identity_bit_for_bit(pipe):
    images = colourful(4).float()
    out = AdaPipeline.from_pipe(pipe)(images, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, images)
    augment = Augmenter(AugmentConfig(mode="ada", pipe=pipe), batch=4).for_micro_batch(7, p=0.0)
    assert torch.equal(augment(images), images)


def test_every_pipe_name_of_the_config_is_a_known_pipeline():
    from sg2dist.config import AUGMENT_PIPES

    assert set(PIPES) == set(AUGMENT_PIPES)
    assert len(AdaPipeline.from_pipe("bgcfnc").enabled) == len(TRANSFORMS) == 15
    assert AdaPipeline.from_pipe("bgc").enabled == set(TRANSFORMS[:12])


# ---------------------------------------------------------------------------- pixel blitting


def test_xflip_mirrors_some_images_and_leaves_the_others():
    images = blobs(8)
    out = run("xflip", images)
    assert per_image_max(images - images.flip(3)).min() > 0.5  # a mirror is easy to tell
    mirrored = per_image_max(out - images.flip(3)) < 0.05
    unchanged = per_image_max(out - images) < 1e-9
    assert (mirrored ^ unchanged).all() and mirrored.any() and unchanged.any()


def test_rotate90_turns_each_image_by_a_multiple_of_90_degrees():
    images = blobs(8)
    out = run("rotate90", images)
    distances = torch.stack(
        [per_image_max(out - torch.rot90(images, k, dims=(2, 3))) for k in range(4)], dim=1
    )
    assert (distances.min(dim=1).values < 0.05).all()
    turns = distances.argmin(dim=1)
    assert len(set(turns.tolist())) >= 3  # several different rotations drawn


def test_integer_translation_shifts_by_whole_pixels_with_reflect_padding():
    images = colourful(8)
    out = run("xint", images)
    pad = round(0.125 * SIZE)
    padded = F.pad(images, [pad] * 4, mode="reflect")
    shifts = []
    for n in range(len(images)):
        matches = [
            (dx, dy)
            for dy in range(-pad, pad + 1)
            for dx in range(-pad, pad + 1)
            if (out[n] - padded[n, :, pad + dy : pad + dy + SIZE, pad + dx : pad + dx + SIZE])
            .abs()
            .max()
            < 1e-9
        ]
        assert len(matches) == 1, n  # exactly one whole-pixel shift reproduces the output
        shifts.append(matches[0])
    assert any(shift != (0, 0) for shift in shifts)


# ---------------------------------------------------------------------------- general geometry


def test_isotropic_scaling_zooms_about_the_centre_equally_in_x_and_y():
    images = blobs(8)
    cx, cy, vx, vy = moments(images)
    ox, oy, wx, wy = moments(run("scale", images))
    zoom_x, zoom_y = (wx / vx).sqrt(), (wy / vy).sqrt()
    assert torch.allclose(zoom_x, zoom_y, rtol=0.02)
    assert ((zoom_x - 1).abs() > 0.05).any()
    # The blob's offset from the centre scales by the same factor.
    assert torch.allclose((ox - CENTRE) / (cx - CENTRE), zoom_x, rtol=0.03)
    assert torch.allclose((oy - CENTRE) / (cy - CENTRE), zoom_x, rtol=0.03)


def test_anisotropic_scaling_stretches_x_and_squeezes_y_by_the_same_factor():
    images = blobs(8)
    _, _, vx, vy = moments(images)
    _, _, wx, wy = moments(run("aniso", images))
    stretch_x, stretch_y = (wx / vx).sqrt(), (wy / vy).sqrt()
    assert torch.allclose(stretch_x * stretch_y, torch.ones_like(stretch_x), rtol=0.02)
    assert ((stretch_x - 1).abs() > 0.05).any()


def test_arbitrary_rotation_moves_the_blob_around_the_centre_without_resizing_it():
    # A narrow blob: at 45 degrees the corners show reflected copies of a wide one.
    images = blobs(8, sigma=1.5)
    cx, cy, vx, _ = moments(images)
    ox, oy, wx, wy = moments(run("rotate", images))
    radius_in = math.hypot(float(cx[0]) - CENTRE, float(cy[0]) - CENTRE)
    radius_out = ((ox - CENTRE) ** 2 + (oy - CENTRE) ** 2).sqrt()
    # Resampling (bilinear on a 2x grid, then low-pass) moves and widens a blob by a few
    # hundredths of a pixel; a rotation keeps the radius to within that.
    assert torch.allclose(radius_out, torch.full_like(radius_out, radius_in), atol=0.15)
    assert torch.allclose(wx, vx, rtol=0.06) and torch.allclose(wy, vx, rtol=0.06)
    angle_in = math.atan2(float(cy[0]) - CENTRE, float(cx[0]) - CENTRE)
    turned = (torch.atan2(oy - CENTRE, ox - CENTRE) - angle_in).abs()
    assert (turned > 0.3).sum() >= 4  # most images turned visibly (p_rot twice)


def test_fractional_translation_moves_the_blob_by_non_whole_pixels_without_resizing_it():
    images = blobs(8, sigma=1.5)
    cx, cy, vx, vy = moments(images)
    ox, oy, wx, wy = moments(run("xfrac", images))
    moved = torch.stack([ox - cx, oy - cy], dim=1)
    assert (moved.abs() > 0.5).any()
    assert ((moved - moved.round()).abs() > 0.1).any()
    assert torch.allclose(wx, vx, rtol=0.05) and torch.allclose(wy, vy, rtol=0.05)


# ---------------------------------------------------------------------------- colour


def test_brightness_adds_one_offset_per_image():
    images = colourful(8)
    delta = run("brightness", images) - images
    offset = delta[:, :1, :1, :1]
    assert torch.allclose(delta, offset.expand_as(delta), atol=1e-12)
    assert (offset.abs() > 0.01).any()


def test_contrast_multiplies_each_image_by_one_factor():
    images = colourful(8)
    out = run("contrast", images)
    factor = (out * images).sum(dim=(1, 2, 3)) / images.square().sum(dim=(1, 2, 3))
    assert torch.allclose(out, images * factor[:, None, None, None], atol=1e-12)
    assert (factor > 0).all() and ((factor - 1).abs() > 0.05).any()


def luma(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=1, keepdim=True)


def test_luma_flip_mirrors_colours_through_the_grey_axis_or_leaves_them():
    images = colourful(8)
    out = run("lumaflip", images)
    mirrored = per_image_max(out - (images - 2 * luma(images))) < 1e-12
    unchanged = per_image_max(out - images) < 1e-12
    assert (mirrored ^ unchanged).all() and mirrored.any() and unchanged.any()
    grey = images[:, :1]  # a grayscale image: the luma flip negates it
    grey_out = run("lumaflip", grey)
    assert (
        (per_image_max(grey_out + grey) < 1e-12) | (per_image_max(grey_out - grey) < 1e-12)
    ).all()


def test_hue_rotation_keeps_luma_and_chroma_length_and_turns_the_chroma():
    images = colourful(8)
    out = run("hue", images)
    assert torch.allclose(luma(out), luma(images), atol=1e-12)
    chroma_in, chroma_out = images - luma(images), out - luma(out)
    assert torch.allclose(chroma_out.norm(dim=1), chroma_in.norm(dim=1), atol=1e-12)
    assert (per_image_max(chroma_out - chroma_in) > 0.05).any()


def test_saturation_keeps_luma_and_scales_the_chroma_by_one_factor_per_image():
    images = colourful(8)
    out = run("saturation", images)
    assert torch.allclose(luma(out), luma(images), atol=1e-12)
    chroma_in, chroma_out = images - luma(images), out - luma(out)
    factor = (chroma_out * chroma_in).sum(dim=(1, 2, 3)) / chroma_in.square().sum(dim=(1, 2, 3))
    assert torch.allclose(chroma_out, chroma_in * factor[:, None, None, None], atol=1e-12)
    assert ((factor - 1).abs() > 0.1).any()


# ---------------------------------------------------------------------------- filter, noise, cutout


def test_image_filter_gains_differ_between_the_lowest_and_the_highest_band():
    flat = torch.full((8, 3, SIZE, SIZE), 0.5, dtype=torch.float64)
    yy, xx = grid()
    checker = ((-1) ** (xx + yy)).expand(8, 3, SIZE, SIZE) * 0.5
    out_flat, out_checker = run("imgfilter", flat), run("imgfilter", checker)
    # A constant and a checkerboard pass a (symmetric, reflect-padded) filter unchanged in
    # shape: each is scaled by the gain of its band.
    gain_low = out_flat[:, 0, 0, 0] / 0.5
    gain_high = out_checker[:, 0, 0, 0] / checker[:, 0, 0, 0]
    assert torch.allclose(out_flat, gain_low[:, None, None, None] * flat, atol=1e-9)
    assert torch.allclose(out_checker, gain_high[:, None, None, None] * checker, atol=1e-9)
    assert ((gain_low - gain_high).abs() > 0.05).any()


def test_noise_adds_zero_mean_gaussian_noise_of_a_random_strength_per_image():
    images = colourful(8)
    noise = run("noise", images) - images
    sigma = noise.std(dim=(1, 2, 3))
    assert (sigma > 0.005).any() and (sigma < 0.5).all()
    assert (noise.mean(dim=(1, 2, 3)).abs() < 4 * sigma / math.sqrt(3 * SIZE * SIZE) + 1e-12).all()


def test_cutout_zeroes_one_square_of_half_the_size_and_keeps_the_rest():
    images = colourful(8) + 2  # no pixel is 0 before the cutout
    out = run("cutout", images)
    zeroed = out == 0
    assert torch.equal(out[~zeroed], images[~zeroed])
    for n in range(len(images)):
        rows = zeroed[n, 0].any(dim=1).nonzero().flatten()
        cols = zeroed[n, 0].any(dim=0).nonzero().flatten()
        # A square of side 16 px, clipped where it crosses the border.
        assert zeroed[n, :, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
        assert int(zeroed[n, 0].sum()) == len(rows) * len(cols) > 0
        assert len(rows) <= SIZE // 2 and len(cols) <= SIZE // 2
        assert len(rows) == SIZE // 2 or rows[0] == 0 or rows[-1] == SIZE - 1


# ---------------------------------------------------------------------------- derivatives


@pytest.mark.parametrize("channels", [3, 1])
def test_first_and_second_derivatives_of_the_whole_pipeline_match_finite_differences(channels):
    # float64, 24 px (the image filter's 43 taps need at least 22 px), p = 0.8 with every
    # group on, a fixed seed: the same random transforms on every evaluation.
    torch.manual_seed(0)
    images = (torch.rand(2, channels, 24, 24, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    pipe = AdaPipeline.from_pipe("bgcfnc")
    weights = torch.randn(2, channels, 24, 24, dtype=torch.float64)

    def d_like(x):  # a nonlinear "discriminator" of the augmented images: R1's setting
        out = pipe(x, 0.8, torch.Generator().manual_seed(3))
        return (torch.tanh(out) * weights).sum(dim=(1, 2, 3))

    assert gradcheck(d_like, (images,), fast_mode=True)
    assert gradgradcheck(d_like, (images,), fast_mode=True)
    # The augmentation itself really ran (the check would be trivial on the identity).
    out = pipe(images.detach(), 0.8, torch.Generator().manual_seed(3))
    assert (out - images.detach()).abs().max() > 0.1
