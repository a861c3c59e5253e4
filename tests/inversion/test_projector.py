"""The projector (sg2dist.inversion.projector) on a tiny 16 px generator with test-built
LPIPS weights: an image the model made from a known w is found again."""

from __future__ import annotations

import numpy as np
import torch
from support.tiny import tiny_model_config

from sg2dist.inversion.lpips import load_lpips, lpips_distance
from sg2dist.inversion.projector import ProjectionSettings, noise_regularization, project
from sg2dist.model import build_networks
from sg2dist.sampling import class_labels, map_z, synthesize, z_from_seeds

CPU = torch.device("cpu")
STEPS = 20


def images_of(G, ws: torch.Tensor) -> np.ndarray:
    """uint8 [N, C, H, W] of ws with the model's constant noise."""
    img_NHWC = synthesize(
        G, ws, noise_mode="const", noise_seeds=[0] * len(ws), batch=8, device=CPU, desc="",
        progress=False,
    )  # fmt: skip
    return np.ascontiguousarray(img_NHWC.transpose(0, 3, 1, 2))


def test_projection_of_a_generated_image_gets_close_to_it(lpips_weights: str) -> None:
    torch.manual_seed(0)
    G, _ = build_networks(tiny_model_config(resolution=16))
    G.eval()
    seeds = list(range(8))
    ws = map_z(
        G, z_from_seeds(seeds, G.z_dim), class_labels(0, None, 8), truncation_psi=0.7, batch=8,
        device=CPU,
    )  # fmt: skip
    images = images_of(G, ws)
    target = images[0]  # made from the known w of seed 0
    lpips = load_lpips(lpips_weights)

    result = project(
        G, target, lpips, settings=ProjectionSettings(steps=STEPS), class_idx=None, seed=0,
        device=CPU, progress=False,
    )  # fmt: skip

    assert result.ws_steps.shape == (STEPS, G.num_ws, G.w_dim)
    assert torch.equal(result.ws[0, 0], result.ws[0, -1])  # one w for all layers (W)
    first, last = np.mean(result.distances[:3]), np.mean(result.distances[-3:])
    assert last < 0.5 * first, result.distances
    with torch.no_grad():
        features = lpips(torch.from_numpy(np.concatenate([images, images_of(G, result.ws)])))
    to_target = lpips_distance(features[:1], features).numpy()  # 0, the other seeds, the result
    first_step = images_of(G, result.ws_steps[:1])
    after_first_step = lpips_distance(features[:1], lpips(torch.from_numpy(first_step)))
    # Measured 0.11 (after the first step 0.30, the other seeds' images 0.38 and more).
    assert to_target[-1] < 0.25
    assert to_target[-1] < 0.5 * float(after_first_step)
    assert to_target[-1] < to_target[1:-1].min()


def test_noise_regularization_is_zero_for_uncorrelated_maps_and_grows_with_correlation() -> None:
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(4, 4)  # 8x8, mean product -1
    smooth = torch.ones(8, 8)  # mean product 1
    assert float(noise_regularization([checker])) == 2.0
    assert float(noise_regularization([smooth, checker])) == 4.0
    white = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    assert float(noise_regularization([white])) < 1e-3
