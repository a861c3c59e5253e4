"""FID/KID plumbing (sg2dist.metrics) on a tiny prepared dataset.

The real Inception weights (weights-inception-2015-12-05-6726825d.pth, 95,628,359 bytes)
cannot be downloaded on the test machines. The tests build their own weights file:
torch-fidelity's FeatureExtractorInceptionV3, randomly initialised with a fixed seed
(He-initialised convolutions, so features keep a usable scale), saved as a state dict
and passed as `inception_weights` exactly like a real copy. Scores are then not the
published FID scale, but every step of the plumbing is the real one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.datasets import METRICS_RESOLUTION as RESOLUTION
from support.datasets import copy_of
from support.lpips import lpips_by_definition
from support.ports import free_port
from support.tiny import tiny_model_config
from torch import nn
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from sg2dist.data import iter_images, open_manifest
from sg2dist.errors import UserError
from sg2dist.metrics import (
    CACHE_FOLDER,
    compute_metrics,
    frechet_distance,
    parse_metric,
    ppl_from_distances,
)
from sg2dist.model import build_networks

TINY_G = tiny_model_config(resolution=RESOLUTION, z_dim=16, w_dim=16)


def _sha256_prefix(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


class ReplayGenerator(nn.Module):
    """Returns the given images in order, whatever z: its 'generated' set is the dataset."""

    z_dim, c_dim = 8, 0

    def __init__(self, img_uint8_NCHW: torch.Tensor) -> None:
        super().__init__()
        self.images = img_uint8_NCHW.float() / 127.5 - 1
        self.next = 0

    def forward(self, z: torch.Tensor, c: torch.Tensor, **kwargs) -> torch.Tensor:
        img = self.images[self.next : self.next + len(z)]
        self.next += len(z)
        return img


class NoiseGenerator(nn.Module):
    """Uniform per-pixel noise images."""

    z_dim, c_dim = 8, 0

    def forward(self, z: torch.Tensor, c: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.rand(len(z), 3, RESOLUTION, RESOLUTION) * 2 - 1


def test_fid_is_zero_for_the_dataset_itself_large_for_noise_and_reals_come_from_the_cache(
    metrics_dataset: str, inception_weights: str, tmp_path: Path
) -> None:
    data_url = copy_of(metrics_dataset, tmp_path)
    reals = torch.from_numpy(np.stack([img for img, _ in iter_images(data_url)]))
    options = {"device": "cpu", "inception_weights": inception_weights, "batch": 8}

    rng_state = torch.get_rng_state()
    # fid8: the first 8 dataset images against the same 8 images "generated".
    itself = compute_metrics(ReplayGenerator(reals[:8]), data_url, ["fid8", "kid8"], **options)
    assert torch.equal(torch.get_rng_state(), rng_state)  # a training run's RNG is untouched
    cached = list((Path(data_url) / CACHE_FOLDER).iterdir())
    assert [path.name for path in cached] == [
        f"{open_manifest(data_url).manifest_hash[:16]}-8-inception-"
        f"{_sha256_prefix(inception_weights)}.npy"
    ]

    # With the shards gone, the real images can only come from the cache.
    for shard in open_manifest(data_url).shards:
        os.remove(Path(data_url, shard.name))
    noise = compute_metrics(NoiseGenerator(), data_url, ["fid8", "kid8"], **options)

    assert noise["fid8"] > 1.0 and noise["kid8"] > 0.01
    assert abs(itself["fid8"]) < 1e-4 * noise["fid8"]
    assert abs(itself["kid8"]) < 0.01 * noise["kid8"]


def test_missing_inception_weights_offline_is_one_error_naming_the_file(
    metrics_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached copy
    for var in ("https_proxy", "HTTPS_PROXY"):  # a proxy that refuses: offline, for sure
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    G = NoiseGenerator()
    with pytest.raises(UserError) as error:
        compute_metrics(G, metrics_dataset, ["fid16"], device="cpu")
    message = str(error.value)
    for fact in (
        "weights-inception-2015-12-05-6726825d.pth",
        "95,628,359 bytes",
        "6726825d0af5f729cebd5821db510",
        "metrics.inception_weights",
        "--inception-weights",
    ):
        assert fact in message
    assert "\n" not in message

    with pytest.raises(UserError, match="does not exist"):
        compute_metrics(
            G,
            metrics_dataset,
            ["fid16"],
            device="cpu",
            inception_weights=str(tmp_path / "missing.pth"),
        )


WORKER = """
import json, sys
import torch, torch.distributed as dist
from sg2dist.config import ModelConfig
from sg2dist.metrics import compute_metrics
from sg2dist.model import build_networks

rank, world_size, init, data_url, weights, lpips, out, model_json = sys.argv[1:]
dist.init_process_group("gloo", init_method=init, rank=int(rank), world_size=int(world_size))
torch.manual_seed(0)
G, _ = build_networks(ModelConfig(**json.loads(model_json)))
scores = compute_metrics(G, data_url, ["fid6", "kid6", "is6", "ppl_wend6"], device="cpu",
                         inception_weights=weights, lpips_weights=lpips, batch=2,
                         rank=int(rank), world_size=int(world_size))
with open(out, "w") as f:
    json.dump(scores, f)
dist.destroy_process_group()
"""


def test_two_ranks_split_the_work_and_get_the_single_process_scores(
    metrics_dataset: str, inception_weights: str, lpips_weights: str, tmp_path: Path
) -> None:
    split_data = copy_of(metrics_dataset, tmp_path / "split")
    (tmp_path / "worker.py").write_text(WORKER)
    init = f"tcp://127.0.0.1:{free_port()}"
    model_json = json.dumps(dataclasses.asdict(TINY_G))
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(tmp_path / "worker.py"),
                str(rank),
                "2",
                init,
                split_data,
                inception_weights,
                lpips_weights,
                str(tmp_path / f"rank{rank}.json"),
                model_json,
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # 2 workers + this process on 2 cores
        )
        for rank in range(2)
    ]
    torch.manual_seed(0)
    G, _ = build_networks(TINY_G)
    single_data = copy_of(metrics_dataset, tmp_path / "single")
    single = compute_metrics(
        G,
        single_data,
        ["fid6", "kid6", "is6", "ppl_wend6"],
        device="cpu",
        inception_weights=inception_weights,
        lpips_weights=lpips_weights,
        batch=2,
    )
    for worker in workers:
        assert worker.wait(timeout=300) == 0
    by_rank = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    assert by_rank[0] == by_rank[1]
    assert by_rank[0].keys() == single.keys()
    for name, value in single.items():
        assert np.isfinite(value)
        assert by_rank[0][name] == pytest.approx(value, rel=1e-4, abs=1e-6)
    # The real features gathered from both ranks are the single process's, in dataset order.
    (split_cache,) = (Path(split_data) / CACHE_FOLDER).iterdir()
    (single_cache,) = (Path(single_data) / CACHE_FOLDER).iterdir()
    np.testing.assert_allclose(np.load(split_cache), np.load(single_cache), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_a, num_b", [(16, 12), (100, 80)])  # both routes of the formula
def test_frechet_distance_equals_torch_fidelitys(num_a: int, num_b: int) -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(num_a, 32, generator=generator)
    b = torch.randn(num_b, 32, generator=generator) * 1.3 + 0.2
    reference = fid_statistics_to_metric(
        fid_features_to_statistics(a), fid_features_to_statistics(b), verbose=False
    )
    assert frechet_distance(a, b) == pytest.approx(
        reference["frechet_inception_distance"], rel=1e-6
    )


def test_metric_names_give_the_generated_image_count_and_bad_names_are_user_errors() -> None:
    assert parse_metric("fid50k").count == 50_000
    assert (parse_metric("KID10k").kind, parse_metric("KID10k").count) == ("kid", 10_000)
    assert parse_metric("is200").count == 200 and parse_metric("pr50k").kind == "pr"
    for bad in ("fid", "fid50m", "ssim10k", "fid1"):
        with pytest.raises(UserError, match="fid50k"):
            parse_metric(bad)


# ---------------------------------------------------------------------------- path length

PPL_EPS = 1e-4


def _slerp_by_hand(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """The textbook slerp of the two directions, in float64."""
    a, b = a.double() / a.double().norm(), b.double() / b.double().norm()
    omega = torch.arccos((a * b).sum())
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def _ppl_samples_by_hand(G, name: str, n: int, seed: int, state) -> list[float]:
    """The documented draws of batch `seed` (sg2dist.metrics.ppl_images), then each sample's
    formula one at a time: two images at t and t + eps along the path, same noise, LPIPS by
    its definition (support/lpips.py) divided by eps^2."""
    spec = parse_metric(name)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn([2 * n, G.z_dim], generator=generator)
    classes = torch.randint(G.c_dim, (n,), generator=generator)
    t_all = torch.rand([n], generator=generator)
    G_noise = copy.deepcopy(G)
    for buffer_name, buf in G_noise.synthesis.named_buffers():
        if buffer_name.endswith("noise_const"):
            buf.copy_(torch.randn(buf.shape, generator=generator))
    distances = []
    for i in range(n):
        t = float(t_all[i]) if spec.sampling == "full" else 0.0
        c = torch.nn.functional.one_hot(classes[i : i + 1], G.c_dim).float()
        if spec.space == "w":
            w0, w1 = G_noise.mapping(z[i : i + 1], c), G_noise.mapping(z[n + i : n + i + 1], c)
            ws = torch.cat([w0 + t * (w1 - w0), w0 + (t + PPL_EPS) * (w1 - w0)])
        else:
            z_t = [_slerp_by_hand(z[i], z[n + i], tt).float() for tt in (t, t + PPL_EPS)]
            ws = G_noise.mapping(torch.stack(z_t), torch.cat([c, c]))
        img = G_noise.synthesis(ws, noise_mode="const")
        if spec.crop:  # 16 px: rows 6..13, columns 4..11, enlarged 2x for VGG
            img = img[:, :, 6:14, 4:12].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        img = (img.expand(-1, 3, -1, -1) + 1) * 127.5
        distances.append(float(lpips_by_definition(state, img[:1], img[1:])) / PPL_EPS**2)
    return distances


@pytest.mark.parametrize("name", ["ppl_wend5", "ppl_zfull5_crop"])
def test_ppl_equals_a_hand_computation_of_the_formula_on_the_same_samples(
    name: str, lpips_weights: str
) -> None:
    torch.manual_seed(0)
    G, _ = build_networks(
        tiny_model_config(resolution=16, z_dim=16, w_dim=16, c_dim=3, img_channels=1)
    )
    with torch.no_grad():
        for param_name, param in G.named_parameters():
            if param_name.endswith("noise_strength"):
                param.fill_(0.5)  # noise matters: both images of a sample must share it
    G.eval()

    scores = compute_metrics(G, "", [name], device="cpu", lpips_weights=lpips_weights, batch=3)

    state = torch.load(lpips_weights, weights_only=True)
    with torch.no_grad():  # batches of 3 and 2 samples, batch i drawn from seed i
        batches = [_ppl_samples_by_hand(G, name, n, seed, state) for seed, n in ((0, 3), (1, 2))]
    samples = [d for batch in batches for d in batch]
    # The two images of a sample differ by about 1e-4: float32 rounding (1e-7) of G's
    # convolutions, which depends on the batch size, moves each distance by about 1e-3.
    assert scores[name] == pytest.approx(_mean_within_percentiles(samples), rel=1e-2)


def _mean_within_percentiles(samples: list[float]) -> float:
    """The mean of the samples from the 1st to the 99th percentile, the percentiles taken as
    the sorted samples at ranks floor(0.01 (n - 1)) and ceil(0.99 (n - 1))."""
    ordered = sorted(samples)
    lo = ordered[math.floor(0.01 * (len(ordered) - 1))]
    hi = ordered[math.ceil(0.99 * (len(ordered) - 1))]
    kept = [d for d in samples if lo <= d <= hi]
    return sum(kept) / len(kept)


def test_ppl_leaves_out_the_samples_below_the_1st_and_above_the_99th_percentile() -> None:
    distances = np.random.default_rng(0).lognormal(size=301)
    distances[7] = 1e6  # one huge jump must not rule the score
    expected = _mean_within_percentiles(list(distances))
    assert ppl_from_distances(distances) == pytest.approx(expected, rel=1e-12)
    assert expected < 10  # 3 smallest and 3 largest left out


def test_ppl_names_select_space_sampling_count_and_crop() -> None:
    spec = parse_metric("ppl_wend")
    assert (spec.kind, spec.space, spec.sampling, spec.count, spec.crop) == (
        "ppl", "w", "end", 100_000, False,
    )  # fmt: skip
    spec = parse_metric("PPL_zfull10k_crop")
    assert (spec.space, spec.sampling, spec.count, spec.crop) == ("z", "full", 10_000, True)
    for bad in ("ppl", "ppl_wmid", "ppl_wend1", "ppl_wend_face"):
        with pytest.raises(UserError, match="ppl_wend"):
            parse_metric(bad)
