"""Losses and regularisers against values computed by hand on toy networks."""

import math

import torch
from support.tiny import TINY_8PX_MODEL, tiny_model_sets

from sg2dist.train import loss as L


class QuadraticD(torch.nn.Module):
    """D(x) = a * sum(x^2) + b, so dD/dx = 2 a x and R1 = 4 a^2 sum(x^2)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, img, c):
        return (self.a * img.square().sum(dim=[1, 2, 3]) + self.b).unsqueeze(1)


class LinearG(torch.nn.Module):
    """ws = z repeated over 2 layers; img = (sum of ws) @ M, so J_w^T y = M y per layer."""

    z_dim = 3

    def __init__(self, M: torch.Tensor):
        super().__init__()
        self.M = torch.nn.Parameter(M)
        self.eye = torch.nn.Parameter(torch.eye(3))

    def forward(self, z, c, style_mixing_prob=0.0, return_ws=False):
        ws = (z @ self.eye).unsqueeze(1).repeat(1, 2, 1)  # like a mapping net, ws need grad
        img = (ws.sum(dim=1) @ self.M).reshape(len(z), 1, 2, 2)
        return (img, ws) if return_ws else img


def test_r1_equals_the_hand_computed_penalty_times_gamma_half_and_interval():
    D = QuadraticD(a=0.3)
    x = torch.randn(4, 1, 2, 2)
    loss, stats = L.r1_loss(D, x, torch.zeros(4, 0), r1_gamma=10.0, gain=16)
    penalty = 4 * 0.3**2 * x.square().sum(dim=[1, 2, 3])
    assert torch.allclose(stats["loss_r1"], penalty.mean())
    assert torch.allclose(loss, (penalty * 10.0 / 2).mean() * 16)


def test_r1_gradient_reaches_every_discriminator_parameter():
    D = QuadraticD(a=0.3)
    loss, _ = L.r1_loss(D, torch.randn(4, 1, 2, 2), torch.zeros(4, 0), r1_gamma=1.0, gain=1)
    loss.backward()
    # d/da of (gamma/2) 4 a^2 sum x^2 is nonzero; b gets an explicit zero gradient (DDP needs it).
    assert D.a.grad is not None and D.a.grad.abs() > 0
    assert D.b.grad is not None and D.b.grad == 0


def test_path_lengths_equal_the_norm_of_the_jacobian_transpose_times_image_noise():
    M = torch.randn(3, 4)
    G = LinearG(M)
    z = torch.randn(5, 3)
    torch.manual_seed(7)
    lengths, _ = L.path_lengths(G, z, torch.zeros(5, 0), style_mixing_prob=0.0)
    torch.manual_seed(7)
    y = torch.randn(5, 1, 2, 2) / math.sqrt(4)
    expected = (y.reshape(5, 4) @ M.T).norm(dim=1)  # |M y| for each of the 2 identical layers
    assert torch.allclose(lengths, expected, atol=1e-6)


def test_path_length_penalty_uses_pl_mean_weight_and_interval():
    lengths = torch.tensor([1.0, 3.0])
    img = torch.zeros(2, 1, 2, 2)
    loss, stats = L.pl_loss(lengths, img, pl_mean=2.0, pl_weight=2.0, gain=4)
    assert torch.allclose(stats["loss_pl"], torch.tensor(1.0))  # ((1-2)^2 + (3-2)^2) / 2
    assert torch.allclose(loss, torch.tensor(1.0 * 2.0 * 4))


def test_pl_mean_moves_towards_the_batch_mean_by_the_decay():
    assert L.update_pl_mean(0.0, 2.0, 0.01) == 0.02
    pl_mean = 0.0
    for _ in range(2000):
        pl_mean = L.update_pl_mean(pl_mean, 2.0, 0.01)
    assert abs(pl_mean - 2.0) < 1e-6


def test_lazy_regularisation_scales_adam_lr_and_betas_by_interval_over_interval_plus_one():
    lr, betas = L.lazy_adam_hparams(0.002, [0.0, 0.99], 16)
    c = 16 / 17
    assert math.isclose(lr, 0.002 * c)
    assert betas == (0.0, 0.99**c)
    assert L.lazy_adam_hparams(0.002, [0.0, 0.99], 0) == (0.002, (0.0, 0.99))


def test_logistic_losses_are_softplus_of_the_logits():
    class ConstD(torch.nn.Module):
        def forward(self, img, c):
            return img.mean(dim=[1, 2, 3]).unsqueeze(1)

    real = torch.full((2, 1, 2, 2), 1.5)
    loss, stats = L.d_real_loss(ConstD(), real, torch.zeros(2, 0))
    assert torch.allclose(loss, torch.nn.functional.softplus(torch.tensor(-1.5)))
    assert torch.allclose(stats["D_real"], torch.tensor(1.5))


def test_one_d_call_on_fakes_and_reals_equals_two_separate_calls():
    from sg2dist.config import load_config
    from sg2dist.model import build_networks

    cfg = load_config(None, tiny_model_sets(TINY_8PX_MODEL))
    torch.manual_seed(0)
    G, D = build_networks(cfg.model)
    real, z, c = torch.randn(8, 3, 8, 8), torch.randn(8, 8), torch.zeros(8, 0)

    def grads_of(losses):
        D.zero_grad()
        for loss in losses:
            loss.backward()
        return [p.grad.clone() for p in D.parameters()]

    torch.manual_seed(1)  # the same noise inputs for G in both calls
    combined, stats = L.d_main_loss(G, D, real, c, z, c, 0.0, mbstd_group=4)
    torch.manual_seed(1)
    fake_loss, _ = L.d_fake_loss(G, D, z, c, 0.0)
    real_loss, real_stats = L.d_real_loss(D, real, c)
    assert torch.allclose(combined, fake_loss + real_loss, atol=1e-6)
    assert torch.allclose(stats["D_real"], real_stats["D_real"], atol=1e-6)
    for a, b in zip(grads_of([combined]), grads_of([fake_loss, real_loss]), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert L.can_combine_d_calls(8, 4) and not L.can_combine_d_calls(2, 4)


def test_pl_mean_on_the_device_in_float64_equals_the_python_float_update():
    pl_mean, length = 0.3712, torch.tensor(1.7654321, dtype=torch.float32)
    on_device = torch.tensor(pl_mean, dtype=torch.float64)
    for _ in range(50):
        pl_mean = L.update_pl_mean(pl_mean, float(length), 0.01)
        on_device = L.update_pl_mean(on_device, length, 0.01)
    assert on_device.dtype == torch.float64 and float(on_device) == pl_mean
    lengths = torch.tensor([1.0, 2.5, 3.25])
    img = torch.zeros(3, 1, 2, 2)
    by_float = L.pl_loss(lengths, img, pl_mean=pl_mean, pl_weight=2.0, gain=4)[0]
    by_tensor = L.pl_loss(lengths, img, pl_mean=on_device, pl_weight=2.0, gain=4)[0]
    assert by_tensor.dtype == torch.float32 and torch.equal(by_float, by_tensor)
