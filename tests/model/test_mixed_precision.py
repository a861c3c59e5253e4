"""Official mixed precision: fp16 in the top resolutions on CUDA, fp32 on CPU, clamping."""

import pytest
import torch

from sg2dist.model.generator import SynthesisBlock
from sg2dist.model.layers import Conv2dLayer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def record_outputs(module, kinds) -> list[tuple[str, torch.Tensor]]:
    """Attach hooks that keep (name, first output) of every submodule of the given kinds."""
    seen = []
    for name, sub in module.named_modules():
        if isinstance(sub, kinds):
            sub.register_forward_hook(
                lambda _m, _i, out, name=name: seen.append(
                    (name, out[0] if isinstance(out, tuple) else out)
                )
            )
    return seen


def test_fp16_blocks_fall_back_to_fp32_on_cpu_with_identical_results(small_nets):
    G16, D16 = small_nets(num_fp16_res=2, conv_clamp=256.0)
    G32, D32 = small_nets(num_fp16_res=0, conv_clamp=256.0)
    # The 2 highest resolutions (8 and 16 px) are the fp16 blocks.
    assert [b.use_fp16 for b in G16.synthesis.blocks.values()] == [False, True, True]
    assert [b.use_fp16 for b in D16.blocks.values()] == [True, True]
    z, c = torch.randn(4, G16.z_dim), torch.zeros(4, 0)
    with torch.no_grad():
        img16, img32 = G16(z, c, noise_mode="const"), G32(z, c, noise_mode="const")
        assert img16.dtype == torch.float32
        assert torch.equal(img16, img32)
        assert torch.equal(D16(img16, c), D32(img32, c))


def test_conv_clamp_bounds_every_synthesis_and_discriminator_activation(small_nets):
    G, D = small_nets(conv_clamp=0.05)
    for layer in G.modules():
        if hasattr(layer, "noise_strength"):
            layer.noise_strength.data.fill_(1.0)
    g_outputs = record_outputs(G, SynthesisBlock)
    d_outputs = record_outputs(D, Conv2dLayer)
    z, c = torch.randn(4, G.z_dim), torch.zeros(4, 0)
    with torch.no_grad():
        D(G(z, c) * 100, c)
    assert g_outputs and d_outputs
    for _, out in g_outputs:
        assert out.abs().max() <= 0.05
    for name, out in d_outputs:
        # The residual branches are clamped at conv_clamp * sqrt(1/2) and the skip is unclamped.
        if not name.endswith("skip"):
            assert out.abs().max() <= 0.05 + 1e-7, name
    assert max(out.abs().max() for _, out in g_outputs) == pytest.approx(0.05)


@needs_cuda
def test_fp16_blocks_run_in_half_precision_on_cuda_and_track_the_fp32_result(small_nets):
    G16, D16 = small_nets(num_fp16_res=2, conv_clamp=256.0)
    G32, D32 = small_nets(num_fp16_res=0, conv_clamp=256.0)
    for net in (G16, D16, G32, D32):
        net.cuda()
    features = record_outputs(G16, SynthesisBlock)
    z, c = torch.randn(4, G16.z_dim, device="cuda"), torch.zeros(4, 0, device="cuda")
    img16, img32 = G16(z, c, noise_mode="const"), G32(z, c, noise_mode="const")
    assert [out.dtype for _, out in features] == [torch.float32, torch.float16, torch.float16]
    assert img16.dtype == torch.float32
    assert (img16 - img32).abs().max() < 0.05 * img32.abs().max()
    logits16 = D16(img16, c)
    assert logits16.dtype == torch.float32
    assert (logits16 - D32(img16, c)).abs().max() < 0.05 * D32(img16, c).abs().max() + 1e-3
    logits16.sum().backward()
    for net in (G16, D16):
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_networks_train_under_bf16_autocast_including_both_double_backwards(small_nets):
    G, D = small_nets()
    z, c = torch.randn(4, G.z_dim), torch.zeros(4, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, ws = G(z, c, style_mixing_prob=0.9, return_ws=True)
        assert img.dtype == torch.float32 and ws.dtype == torch.float32
        (pl_grads,) = torch.autograd.grad(
            (img * torch.randn(img.shape)).sum(), ws, create_graph=True
        )
        reals = torch.randn(4, 3, 16, 16, requires_grad=True)
        logits = D(reals, c)
        (r1_grads,) = torch.autograd.grad(logits.sum(), reals, create_graph=True)
    (pl_grads.square().sum() + r1_grads.float().square().sum() + D(img, c).mean()).backward()
    for net in (G, D):
        for name, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
