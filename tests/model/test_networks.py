"""Generator and discriminator behaviour: shapes, noise, truncation, w_avg, style mixing, labels."""

import pytest
import torch

from sg2dist.model import count_params
from sg2dist.model.discriminator import MinibatchStd
from sg2dist.model.generator import SynthesisLayer, ToRGB
from sg2dist.model.layers import Conv2dLayer, use_conv_layout_


def latents(G, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, G.z_dim, generator=gen), torch.zeros(n, G.c_dim)


@pytest.mark.parametrize(
    ("resolution", "img_channels"),
    [(4, 3), (8, 1), (16, 3), (32, 3), (64, 1), (128, 3), (256, 3), (512, 1), (1024, 3)],
)
def test_output_shapes_and_finite_values_at_every_resolution(small_nets, resolution, img_channels):
    # channel_base 2048 keeps 2 channels at 1024 px; everything stays small and fast.
    G, D = small_nets(
        resolution=resolution,
        img_channels=img_channels,
        channel_base=2048,
        channel_max=16,
        z_dim=16,
        w_dim=16,
        mbstd_group=2,
    )
    z, c = latents(G, 2)
    with torch.no_grad():
        img, ws = G(z, c, return_ws=True)
        logits = D(img, c)
    expected_num_ws = 2 * (resolution.bit_length() - 3) + 2
    assert G.num_ws == expected_num_ws
    assert ws.shape == (2, expected_num_ws, 16)
    assert img.shape == (2, img_channels, resolution, resolution)
    assert img.dtype == torch.float32 and img.is_contiguous()
    assert logits.shape == (2, 1)
    assert torch.isfinite(img).all() and torch.isfinite(logits).all()


def test_const_noise_is_deterministic_and_random_noise_is_not(small_nets):
    G, _ = small_nets()
    with torch.no_grad():
        for layer in G.modules():
            if hasattr(layer, "noise_strength"):
                layer.noise_strength.fill_(0.5)  # zero at init: make the noise visible
        z, c = latents(G, 3)
        const_a, const_b = G(z, c, noise_mode="const"), G(z, c, noise_mode="const")
        random_a, random_b = G(z, c, noise_mode="random"), G(z, c, noise_mode="random")
        none = G(z, c, noise_mode="none")
    assert torch.equal(const_a, const_b)
    assert not torch.allclose(random_a, random_b)
    assert not torch.allclose(const_a, none)


def test_mapping_tracks_w_avg_with_beta_0_995_only_when_asked(small_nets):
    G, _ = small_nets()
    z, c = latents(G, 8)
    with torch.no_grad():
        w = G.mapping(z, c)[:, 0]
        assert torch.equal(G.mapping.w_avg, torch.zeros(G.w_dim))  # plain calls leave it alone
        G.mapping(z, c, update_emas=True)
        torch.testing.assert_close(G.mapping.w_avg, w.mean(0) * 0.005)
        G.mapping(z, c, update_emas=True)
        torch.testing.assert_close(G.mapping.w_avg, w.mean(0) * (0.005 + 0.995 * 0.005))


def test_truncation_psi_zero_yields_the_image_of_w_avg_for_every_z(small_nets):
    G, _ = small_nets()
    with torch.no_grad():
        for seed in range(5):  # move w_avg away from zero
            G.mapping(*latents(G, 16, seed), update_emas=True)
        z, c = latents(G, 4, seed=99)
        img = G(z, c, truncation_psi=0.0, noise_mode="const")
        ws_avg = G.mapping.w_avg.reshape(1, 1, -1).repeat(4, G.num_ws, 1)
        expected = G.synthesis(ws_avg, noise_mode="const")
    torch.testing.assert_close(img, expected)
    assert (img[1:] - img[0]).abs().max() < 1e-6
    assert G.mapping.w_avg.abs().max() > 0.01


def test_truncation_cutoff_leaves_the_later_layers_untouched(small_nets):
    G, _ = small_nets()
    z, c = latents(G, 4)
    with torch.no_grad():
        G.mapping(z, c, update_emas=True)
        ws = G.mapping(z, c)
        truncated = G.mapping(z, c, truncation_psi=0.5, truncation_cutoff=2)
    w_avg = G.mapping.w_avg
    torch.testing.assert_close(truncated[:, :2], w_avg + 0.5 * (ws[:, :2] - w_avg))
    assert torch.equal(truncated[:, 2:], ws[:, 2:])


def test_style_mixing_replaces_ws_after_a_random_crossover_only(small_nets):
    G, _ = small_nets()
    z, c = latents(G, 4)
    crossovers = set()
    with torch.no_grad():
        plain = G.mapping(z, c)
        for seed in range(12):
            torch.manual_seed(seed)
            _, ws = G(z, c, style_mixing_prob=1.0, return_ws=True)
            same = (ws == plain).all(dim=2).all(dim=0)  # [num_ws]
            crossover = int(same.logical_not().nonzero()[0])
            assert 1 <= crossover < G.num_ws
            assert same[:crossover].all() and not same[crossover:].any()
            # The mixed part comes from one second w, broadcast like the first.
            assert torch.equal(ws[:, crossover:], ws[:, -1:].expand_as(ws[:, crossover:]))
            crossovers.add(crossover)
        _, unmixed = G(z, c, style_mixing_prob=0.0, return_ws=True)
    assert len(crossovers) > 1
    assert torch.equal(unmixed, plain)


def test_style_mixing_is_repeatable_under_torch_manual_seed(small_nets):
    G, _ = small_nets()
    z, c = latents(G, 4)
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        with torch.no_grad():
            runs.append([G(z, c, style_mixing_prob=0.5, return_ws=True)[1] for _ in range(6)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_conditional_networks_use_the_labels_and_add_the_official_label_parameters(small_nets):
    c_dim = 5
    G0, D0 = small_nets()
    G, D = small_nets(c_dim=c_dim)
    w_dim, cmap_dim = G.w_dim, D.epilogue.in_channels
    # G: a linear label embedding (c_dim -> w_dim) concatenated to z widens the first FC layer.
    assert count_params(G) - count_params(G0) == (c_dim * w_dim + w_dim) + w_dim * w_dim
    # D: an 8-layer label mapping to cmap_dim, and a cmap_dim-wide output layer for the projection.
    d_mapping = (c_dim * cmap_dim + cmap_dim) + 8 * (cmap_dim * cmap_dim + cmap_dim)
    assert count_params(D) - count_params(D0) == d_mapping + (cmap_dim - 1) * (cmap_dim + 1)

    z, _ = latents(G, 4)
    c_a = torch.eye(c_dim)[[0, 1, 2, 3]]
    c_b = torch.eye(c_dim)[[4, 4, 4, 4]]
    with torch.no_grad():
        img_a, img_b = G(z, c_a, noise_mode="const"), G(z, c_b, noise_mode="const")
        logits_a, logits_b = D(img_a, c_a), D(img_a, c_b)
    assert img_a.shape == (4, 3, 16, 16) and logits_a.shape == (4, 1)
    assert not torch.allclose(img_a, img_b)
    assert not torch.allclose(logits_a, logits_b)


def test_minibatch_std_groups_samples_by_index_modulo_batch_over_group_size():
    # N=8, group 4: sample n is in group n mod 2. Make group 0 (even samples) identical.
    x = torch.randn(8, 6, 4, 4)
    x[0::2] = x[0]
    out = MinibatchStd(group_size=4, num_features=1)(x)
    assert out.shape == (8, 7, 4, 4)
    std_feature = out[:, 6]
    assert torch.allclose(std_feature[0::2], torch.full_like(std_feature[0::2], 1e-4))
    assert (std_feature[1::2] > 0.5).all()
    assert torch.equal(out[:, :6], x)


def test_minibatch_std_takes_the_whole_batch_when_smaller_than_the_group_and_rejects_ragged():
    mbstd = MinibatchStd(group_size=4)
    assert mbstd(torch.randn(2, 3, 4, 4)).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="multiple of model.mbstd_group"):
        mbstd(torch.randn(6, 3, 4, 4))


def test_synthesis_rejects_ws_of_the_wrong_shape_and_unknown_noise_modes(small_nets):
    G, _ = small_nets()
    with pytest.raises(ValueError, match=rf"expected \[N, {G.num_ws}, 32\]"):
        G.synthesis(torch.zeros(2, G.num_ws + 1, 32))
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(torch.zeros(2, G.num_ws, 32), noise_mode="fixed")


def test_fused_modconv_generator_matches_the_per_sample_form(small_nets):
    G, _ = small_nets()
    z, c = latents(G, 3)
    with torch.no_grad():
        fused = G(z, c, noise_mode="const", fused_modconv=True)
        per_sample = G(z, c, noise_mode="const", fused_modconv=False)
    assert (fused - per_sample).abs().max() < 1e-5


def test_model_kernels_reach_every_filtering_and_epilogue_layer_of_both_networks(small_nets):
    G, D = small_nets(resolution=32, fir_kernel="triton", bias_act_kernel="triton")
    filtering = [m for m in (*G.modules(), *D.modules()) if "fir" in m._buffers]
    b32, d32 = G.synthesis.blocks["b32"], D.blocks["b32"]
    # The upsampling conv, the image upsampling, the downsampling conv and skip among them.
    assert {id(b32.conv0), id(b32), id(d32.conv1), id(d32.skip)} <= {id(m) for m in filtering}
    assert {m.fir_kernel for m in filtering} == {"triton"}
    epilogues = [m for m in (*G.modules(), *D.modules()) if hasattr(m, "bias_act_kernel")]
    # Every synthesis layer and toRGB, every D conv (fromRGB, block convs, the epilogue's).
    kinds = (SynthesisLayer, ToRGB, Conv2dLayer)
    assert {id(m) for m in (*G.modules(), *D.modules()) if isinstance(m, kinds)} == {
        id(m) for m in epilogues
    }
    assert {m.bias_act_kernel for m in epilogues} == {"triton"}
    G_default, _ = small_nets(resolution=32)
    assert {m.fir_kernel for m in G_default.modules() if "fir" in m._buffers} == {"auto"}
    assert {getattr(m, "bias_act_kernel", "auto") for m in G_default.modules()} == {"auto"}


@pytest.mark.parametrize("memory_format", ["auto", "channels_last", "contiguous"])
def test_every_memory_format_gives_the_same_outputs_and_gradients(small_nets, memory_format):
    G_plain, D_plain = small_nets()  # weights NCHW, feature maps by device: channels-last on CPU
    G, D = small_nets()
    use_conv_layout_(G, torch.device("cpu"), memory_format)
    use_conv_layout_(D, torch.device("cpu"), memory_format)
    channels_last = memory_format != "contiguous"  # auto: channels-last on CPU
    conv_weight = G.synthesis.blocks["b16"].conv1.weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert conv_weight.is_contiguous() != channels_last
    feature_maps = []
    D.blocks["b16"].register_forward_hook(lambda m, i, out: feature_maps.append(out))
    G.synthesis.blocks["b16"].register_forward_hook(lambda m, i, out: feature_maps.append(out[0]))

    z, c = latents(G_plain, 4)
    grads = []
    for G_, D_ in ((G_plain, D_plain), (G, D)):
        D_(G_(z, c, noise_mode="const"), c).sum().backward()
        grads.append([p.grad for p in (*G_.parameters(), *D_.parameters())])
    assert len(feature_maps) == 2
    for x in feature_maps:  # [4, C, 16, 16] and [4, C, 8, 8], C > 1: the layouts differ
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert x.is_contiguous() != channels_last
    for plain, other in zip(*grads, strict=True):
        torch.testing.assert_close(other, plain, rtol=1e-5, atol=1e-6)
