"""DiffAugment: colour, translation by up to 1/8 with zeros, cutout of half the size;
differentiable twice; one seed, one result."""

import torch
from torch.autograd import gradcheck, gradgradcheck

from sg2dist.augment import Augmenter, diff_augment
from sg2dist.augment.diffaugment import translate
from sg2dist.config import AugmentConfig


def test_translation_shifts_whole_pixels_and_fills_with_zeros():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float64).reshape(2, 1, 4, 4) + 1
    out = translate(images, torch.tensor([[1, 0], [0, -2]]))
    assert torch.equal(out[0, 0, :3], images[0, 0, 1:])  # row y shows input row y + 1
    assert torch.equal(out[0, 0, 3], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(out[1, 0, :, 2:], images[1, 0, :, :2])  # column x shows x - 2
    assert torch.equal(out[1, 0, :, :2], torch.zeros(4, 2, dtype=torch.float64))


def test_the_whole_policy_changes_colour_shifts_by_at_most_an_eighth_and_cuts_out_half():
    torch.manual_seed(0)
    images = torch.rand(16, 3, 32, 32) + 1  # positive everywhere: zeros come from the policy
    out = diff_augment(images, torch.Generator().manual_seed(1))
    zero_rows = (out == 0).all(dim=1)  # [N, H, W]: pixels zero in every channel
    for n in range(len(images)):
        zeros = int(zero_rows[n].sum())
        # Cutout (a 16 x 16 square, maybe partly outside) and translation (up to 4 rows and
        # 4 columns of zeros) leave between 0 and 16 x 16 + 2 x 4 x 32 zero pixels.
        assert 0 < zeros <= 16 * 16 + 2 * 4 * 32
    assert not torch.allclose(out.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)), atol=0.05)
    again = diff_augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # one seed, one result


def test_diffaugment_applies_to_every_image_whatever_p():
    augment = Augmenter(AugmentConfig(mode="diffaugment"), batch=4).for_micro_batch(3, p=0.0)
    images = torch.rand(4, 3, 16, 16)
    assert (augment(images) - images).abs().amax(dim=(1, 2, 3)).min() > 0


def test_first_and_second_derivatives_match_finite_differences():
    torch.manual_seed(0)
    images = (torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    weights = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def d_like(x):
        out = diff_augment(x, torch.Generator().manual_seed(5))
        return (torch.tanh(out) * weights).sum(dim=(1, 2, 3))

    assert gradcheck(d_like, (images,), fast_mode=True)
    assert gradgradcheck(d_like, (images,), fast_mode=True)
