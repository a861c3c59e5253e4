"""Gradients, including the double backward that R1 and path length regularisation need."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call


def r1_penalty(D, img, c):
    img = img.detach().requires_grad_(True)
    (grads,) = torch.autograd.grad(D(img, c).sum(), img, create_graph=True)
    return grads.square().sum(dim=(1, 2, 3)).mean()


def path_length_penalty(G, z, c):
    img, ws = G(z, c, style_mixing_prob=0.9, return_ws=True)
    y = torch.randn_like(img) / img.shape[2]
    (grads,) = torch.autograd.grad((img * y).sum(), ws, create_graph=True)
    lengths = grads.square().sum(dim=2).mean(dim=1).sqrt()
    return (lengths - lengths.detach().mean() * 0.9).square().mean()


def params_without_grad(module) -> list[str]:
    return [
        name
        for name, p in module.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().max() == 0
    ]


def test_gradients_reach_every_generator_parameter_through_adversarial_and_path_length_losses(
    small_nets,
):
    G, D = small_nets()
    D.requires_grad_(False)
    z, c = torch.randn(4, G.z_dim), torch.zeros(4, 0)
    adversarial = F.softplus(-D(G(z, c, style_mixing_prob=0.9), c)).mean()
    (adversarial + path_length_penalty(G, z[:2], c[:2])).backward()
    assert params_without_grad(G) == []
    assert all(p.grad is None for p in D.parameters())


def test_gradients_reach_every_discriminator_parameter_with_an_r1_penalty(small_nets):
    G, D = small_nets()
    z, c = torch.randn(4, G.z_dim), torch.zeros(4, 0)
    with torch.no_grad():
        fakes = G(z, c)
    reals = torch.randn(4, 3, 16, 16)
    loss = F.softplus(D(fakes, c)).mean() + F.softplus(-D(reals, c)).mean()
    (loss + r1_penalty(D, reals, c)).backward()
    assert params_without_grad(D) == []


def test_r1_penalty_alone_reaches_every_discriminator_weight(small_nets):
    _, D = small_nets()
    r1_penalty(D, torch.randn(4, 3, 16, 16), torch.zeros(4, 0)).backward()
    # Biases after the minibatch-std layer act on the input gradient only through the
    # piecewise-linear leaky ReLU masks, so their R1 gradient is exactly zero; every weight
    # must get one.
    missing = params_without_grad(D)
    assert [name for name in missing if not name.endswith(".bias")] == []
    assert set(missing) <= {"epilogue.conv.bias", "epilogue.fc.bias", "epilogue.out.bias"}


def test_r1_double_backward_matches_finite_differences(small_nets):
    _, D = small_nets(resolution=8, channel_base=32, channel_max=4, mbstd_group=2)
    D = D.double()
    img, c = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.float64)
    names = [
        "fromrgb.weight",
        "blocks.b8.conv0.weight",
        "blocks.b8.conv1.weight",
        "blocks.b8.skip.weight",
        "epilogue.conv.weight",
        "epilogue.fc.weight",
    ]
    params = dict(D.named_parameters())

    def penalty(*values):
        overrides = {**params, **dict(zip(names, values, strict=True))}
        return r1_penalty(lambda x, c: functional_call(D, overrides, (x, c)), img, c)

    inputs = tuple(params[name].detach().clone().requires_grad_(True) for name in names)
    assert torch.autograd.gradcheck(penalty, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


def test_path_length_double_backward_matches_finite_differences(small_nets):
    G, _ = small_nets(resolution=8, channel_base=32, channel_max=4, z_dim=4, w_dim=4)
    G = G.double()
    ws = torch.randn(2, G.num_ws, 4, dtype=torch.float64)
    y = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    names = [
        "blocks.b4.const",
        "blocks.b8.conv0.weight",
        "blocks.b8.conv0.affine.weight",
        "blocks.b8.conv1.weight",
        "blocks.b8.torgb.weight",
        "blocks.b8.conv1.noise_strength",
    ]
    params = dict(G.synthesis.named_parameters())

    def penalty(*values):
        overrides = {**params, **dict(zip(names, values, strict=True))}
        w = ws.detach().requires_grad_(True)
        img = functional_call(G.synthesis, overrides, (w,), {"noise_mode": "const"})
        (grads,) = torch.autograd.grad((img * y).sum(), w, create_graph=True)
        return grads.square().sum()

    inputs = tuple(params[name].detach().clone().requires_grad_(True) for name in names)
    with torch.no_grad():
        inputs[-1].fill_(0.3)  # noise strength is zero at init: test it off zero
    assert torch.autograd.gradcheck(penalty, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


# Triton calls in the 8 px networks' four forward passes (G: image and path length; D: loss
# and R1). FIR: per G an upsampling conv and an image upsampling, per D a blur and a skip
# downsampling. bias_act: per G 5 layers (b4 conv1, torgb; b8 conv0, conv1, torgb), per D 4
# (fromrgb, b8 conv0 and conv1, epilogue conv; the skip has nothing to add).
TRITON_CALLS = {"fir_kernel": ("upfirdn2d", 2 * 2 + 2 * 2), "bias_act_kernel": ("bias_act", 18)}


@pytest.mark.parametrize("kernel", TRITON_CALLS)
def test_triton_kernels_give_the_same_images_and_regularizer_gradients(
    kernel, small_nets, triton_on_cpu, monkeypatch
):
    spied, expected_calls = TRITON_CALLS[kernel]
    calls = []
    original = getattr(triton_on_cpu, spied)
    monkeypatch.setattr(
        triton_on_cpu, spied, lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    results = []
    for setting in ("auto", "triton"):
        # 8 px and few channels: the interpreter is slow. The clamp at 1 bites at init.
        G, D = small_nets(
            resolution=8, channel_base=64, channel_max=8, conv_clamp=1.0, **{kernel: setting}
        )
        torch.manual_seed(1)
        z, c = torch.randn(2, G.z_dim), torch.zeros(2, 0)
        img = G(z, c, noise_mode="random")
        loss = F.softplus(-D(img, c)).mean()
        loss = loss + r1_penalty(D, img, c) + path_length_penalty(G, z, c)
        loss.backward()
        grads = [p.grad for p in (*G.parameters(), *D.parameters())]
        results.append((img.detach(), loss.detach(), grads))
    assert len(calls) == expected_calls
    (img_auto, loss_auto, grads_auto), (img_triton, loss_triton, grads_triton) = results
    torch.testing.assert_close(img_triton, img_auto)
    torch.testing.assert_close(loss_triton, loss_auto)
    for triton_grad, auto_grad in zip(grads_triton, grads_auto, strict=True):
        torch.testing.assert_close(triton_grad, auto_grad, rtol=1e-4, atol=1e-6)
