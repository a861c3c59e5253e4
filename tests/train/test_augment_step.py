"""Augmentation in the losses and the step: every D input goes through it, R1 differentiates
through it, and ADA at p = 0 trains bit for bit like no augmentation."""

import contextlib
import copy

import torch
from support.tiny import TINY_8PX_MODEL, tiny_model_sets

from sg2dist.augment import Augmenter
from sg2dist.config import AugmentConfig, load_config
from sg2dist.model import build_networks
from sg2dist.train import loss as L
from sg2dist.train.step import Nets, StepContext, StepState, phase_table, train_step


class MeanD(torch.nn.Module):
    def forward(self, img, c):
        return img.mean(dim=[1, 2, 3]).unsqueeze(1)


class QuadraticD(torch.nn.Module):
    """D(x) = a * sum(x^2)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))

    def forward(self, img, c):
        return (self.a * img.square().sum(dim=[1, 2, 3])).unsqueeze(1)


class Recorder:
    """An augmentation that doubles images and counts what it saw."""

    def __init__(self):
        self.seen: list[int] = []

    def __call__(self, img):
        self.seen.append(len(img))
        return img * 2


class ConstG(torch.nn.Module):
    z_dim = 2

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, z, c, style_mixing_prob=0.0, update_emas=False):
        return (z.sum(dim=1) * self.w).reshape(len(z), 1, 1, 1).expand(len(z), 1, 2, 2)


def test_every_discriminator_input_goes_through_the_augmentation():
    G, D = ConstG(), MeanD()
    z, c = torch.ones(4, 2), torch.zeros(4, 0)
    real = torch.full((4, 1, 2, 2), 0.25)
    aug = Recorder()
    _, stats = L.g_main_loss(G, D, z, c, 0.0, aug)
    assert torch.allclose(stats["D_fake_G"], torch.tensor(4.0))  # D saw 2 x G(z) = 2 x 2
    _, stats = L.d_fake_loss(G, D, z, c, 0.0, aug)
    assert torch.allclose(stats["D_fake"], torch.tensor(4.0))
    _, stats = L.d_real_loss(D, real, c, aug)
    assert torch.allclose(stats["D_real"], torch.tensor(0.5))
    _, stats = L.d_main_loss(G, D, real, c, z, c, 0.0, 4, aug)
    assert torch.allclose(stats["D_fake"], torch.tensor(4.0))
    assert torch.allclose(stats["D_real"], torch.tensor(0.5))
    _, stats = L.r1_loss(D, real, c, r1_gamma=1.0, gain=1, augment=aug)
    assert torch.allclose(stats["D_real_r1"], torch.tensor(0.5))
    assert aug.seen == [4] * 6  # G main, D fake, D real, D main (fakes, reals), R1
    assert stats["augment_rt"] == 1.0  # every real logit positive


def test_r1_takes_the_gradient_through_the_augmentation_with_respect_to_the_reals():
    # D(2x) = 4 a sum(x^2): dD/dx = 8 a x, so R1 = 64 a^2 sum(x^2).
    D, x = QuadraticD(a=0.3), torch.randn(4, 1, 2, 2)
    loss, stats = L.r1_loss(D, x, torch.zeros(4, 0), r1_gamma=2.0, gain=1, augment=Recorder())
    expected = 64 * 0.3**2 * x.square().sum(dim=[1, 2, 3])
    assert torch.allclose(stats["loss_r1"], expected.mean())
    loss.backward()  # the penalty's gradient reaches D through the augmentation
    assert torch.allclose(D.a.grad, (2 * 64 * 0.3 * x.square().sum(dim=[1, 2, 3])).mean())


def test_one_d_call_equals_two_separate_calls_with_ada_on():
    cfg = load_config(None, tiny_model_sets(TINY_8PX_MODEL))
    torch.manual_seed(0)
    G, D = build_networks(cfg.model)
    real, z, c = torch.randn(8, 3, 8, 8), torch.randn(8, 8), torch.zeros(8, 0)
    augmenter = Augmenter(AugmentConfig(mode="fixed", p="1"), batch=8)
    torch.manual_seed(1)
    combined, stats = L.d_main_loss(
        G, D, real, c, z, c, 0.0, mbstd_group=4, augment=augmenter.for_micro_batch(5, p=1.0)
    )
    torch.manual_seed(1)
    separate = augmenter.for_micro_batch(5, p=1.0)  # fakes first, then reals: the same draws
    fake_loss, _ = L.d_fake_loss(G, D, z, c, 0.0, separate)
    real_loss, real_stats = L.d_real_loss(D, real, c, separate)
    assert torch.allclose(combined, fake_loss + real_loss, atol=1e-6)
    assert torch.allclose(stats["D_real"], real_stats["D_real"], atol=1e-6)
    unaugmented, _ = L.d_real_loss(D, real, c)
    assert not torch.allclose(real_loss, unaugmented, atol=1e-4)  # the augmentation ran


def tiny_training(augment: AugmentConfig | None):
    """Tiny G and D with plain (single-process) step plumbing."""
    cfg = load_config(
        None,
        [*tiny_model_sets(TINY_8PX_MODEL), "train.batch=8", "train.batch_gpu=4",
         "train.r1_interval=1", "train.pl_interval=2", "train.r1_gamma=1"],
    )  # fmt: skip
    torch.manual_seed(0)
    G, D = build_networks(cfg.model)
    nets = Nets(
        G_ddp=G, D_ddp=D, G_net=G, D_net=D, G_ema=copy.deepcopy(G),
        G_opt=torch.optim.Adam(G.parameters(), lr=0.01, betas=(0.0, 0.99), fused=True),
        D_opt=torch.optim.Adam(D.parameters(), lr=0.01, betas=(0.0, 0.99), fused=True),
    )  # fmt: skip
    ctx = StepContext(
        train=cfg.train, phases=phase_table(cfg.train), rank=0, world_size=1,
        backward=lambda loss: loss.backward(), no_sync=lambda _: contextlib.nullcontext(),
        autocast=contextlib.nullcontext, reduce_mean=lambda x: x, mbstd_group=4,
        augmenter=Augmenter(augment, batch=8) if augment is not None else None,
    )  # fmt: skip
    return nets, ctx


def test_ada_at_p_zero_trains_bit_for_bit_like_no_augmentation():
    reals = torch.rand(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    micro_batches = [(reals[i], torch.zeros(4, 0)) for i in range(2)]
    results = []
    for augment in (None, AugmentConfig(mode="ada", p="0", speed_kimg=1e6)):
        nets, ctx = tiny_training(augment)
        state = StepState.on("cpu")
        for step in range(2):  # Gmain, Greg, Dmain and Dreg all run
            train_step(ctx, nets, state, step, micro_batches)
        results.append(
            [p.detach().clone() for p in [*nets.G_net.parameters(), *nets.D_net.parameters()]]
        )
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
