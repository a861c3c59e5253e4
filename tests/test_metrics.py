"""FID/KID plumbing (sg2dist.metrics) on a tiny prepared dataset.

The real Inception weights (weights-inception-2015-12-05-6726825d.pth, 95,628,359 bytes)
cannot be downloaded on the test machines. The tests build their own weights file:
torch-fidelity's FeatureExtractorInceptionV3, randomly initialised with a fixed seed
(He-initialised convolutions, so features keep a usable scale), saved as a state dict
and passed as `inception_weights` exactly like a real copy. Scores are then not the
published FID scale, but every step of the plumbing is the real one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.datasets import METRICS_RESOLUTION as RESOLUTION
from support.datasets import copy_of
from support.ports import free_port
from support.tiny import tiny_model_config
from torch import nn
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from sg2dist.data import iter_images, open_manifest
from sg2dist.errors import UserError
from sg2dist.metrics import CACHE_FOLDER, compute_metrics, frechet_distance, parse_metric
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

rank, world_size, init, data_url, weights, out, model_json = sys.argv[1:]
dist.init_process_group("gloo", init_method=init, rank=int(rank), world_size=int(world_size))
torch.manual_seed(0)
G, _ = build_networks(ModelConfig(**json.loads(model_json)))
scores = compute_metrics(G, data_url, ["fid6", "kid6", "is6"], device="cpu",
                         inception_weights=weights, batch=2, rank=int(rank),
                         world_size=int(world_size))
with open(out, "w") as f:
    json.dump(scores, f)
dist.destroy_process_group()
"""


def test_two_ranks_split_the_work_and_get_the_single_process_scores(
    metrics_dataset: str, inception_weights: str, tmp_path: Path
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
        ["fid6", "kid6", "is6"],
        device="cpu",
        inception_weights=inception_weights,
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
