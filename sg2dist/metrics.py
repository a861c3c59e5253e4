"""FID, KID, IS and precision/recall of a generator against its dataset (torch-fidelity),
and its perceptual path length (PPL).

Metric names are `<kind><count>[k]`: fid50k, kid50k, fid10k, is50k, pr50k. The count is
the number of generated images; the real images are the whole dataset when it is
smaller, else its first `count` images in manifest order.

PPL names are `ppl_<space><sampling>[<count>[k]][_crop]`: ppl_wend is the StyleGAN2
paper's (W space, path endpoints, 100k samples; ppl_wend10k takes 10k), ppl_zfull the
StyleGAN paper's (Z space, anywhere along the path); `_crop` first crops images to the
face region as the official code does for FFHQ. One sample: two latents, their images at
t and t + 1e-4 along the path between them (lerp in W, slerp in Z; t = 0 for `end`, else
uniform), with the same per-pixel noise, and the LPIPS distance of the two images divided
by 1e-4 squared; the score is the mean of the samples between the 1st and 99th
percentiles. It needs no dataset, only the LPIPS weights (`metrics.lpips_weights`).

Work split: with world_size > 1 every rank calls it, generates and embeds the batches
whose index i has i % world_size == rank; rank 0 gathers the Inception features
(torch.distributed gather_object), computes the scores and broadcasts them, so every
rank returns the same dict. With the defaults (rank 0, world size 1) one process does
everything. Scoring on rank 0 can take minutes: a caller that keeps a short collective
timeout passes `scores_on_every_rank=False`, so the other ranks return {} right after
their share and wait for rank 0 some other way (the trainer: in the store). Batch i always draws its
latents from seed i: scores do not depend on the world size. All of it runs on a forked
RNG, so the caller's RNG state is left as it was (exact resume).

Real-image features are computed once per (dataset manifest hash, real image count,
feature extractor) and cached next to the dataset as
`<data url>/metrics-cache/<hash>-<count>-<extractor>.npy` (local or S3, via storage),
reused by every later evaluation of every run. A dataset location that cannot be
written only costs a recomputation next time.

Inception weights: torch-fidelity downloads them on first use. Offline clusters set
`metrics.inception_weights` (local path or s3://, copied once to the torch hub cache)
to a copy of weights-inception-2015-12-05-6726825d.pth. The LPIPS weights are never
downloaded (sg2dist/inversion/lpips.py).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch_fidelity import FeatureExtractorInceptionV3
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part
from tqdm import tqdm

from sg2dist import storage
from sg2dist.data import iter_images, open_manifest
from sg2dist.errors import UserError
from sg2dist.inversion.lpips import LPIPS, load_lpips, lpips_distance
from sg2dist.sampling import one_hot, to_uint8_nchw

if TYPE_CHECKING:
    from sg2dist.model import Generator
    from sg2dist.model.generator import SynthesisBlock

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_BYTES = 95_628_359
INCEPTION_SHA256_PREFIX = "6726825d0af5f729cebd5821db510"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
FEATURE_LAYER = {"fid": "2048", "kid": "2048", "pr": "2048", "is": "logits_unbiased"}
CACHE_FOLDER = "metrics-cache"
KID_SUBSET_SIZE = 1000  # the KID paper's subset size; lowered for smaller image counts
PR_NEIGHBORHOOD = 3  # k of the k-NN balls in improved precision/recall
PPL_EPSILON = 1e-4  # step along the path between the two images of a PPL sample
PPL_DEFAULT_COUNT = 100_000  # PPL samples in the StyleGAN papers
PPL_PERCENTILES = (1, 99)  # PPL averages the samples between these


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as the user wrote it, also the key of the result
    kind: str  # fid | kid | is | pr | ppl
    count: int  # generated images (PPL: samples, each a pair of images)
    real_count: int  # real images (at most the dataset's size; 0 for PPL)
    space: str = "w"  # PPL: the latent space of the path, z or w
    sampling: str = "end"  # PPL: t = 0 (end) or uniform in [0, 1] (full)
    crop: bool = False  # PPL: crop to the face region first (the official FFHQ setting)


def parse_metric(name: str) -> MetricSpec:
    text = name.strip().lower()
    ppl = re.fullmatch(r"ppl_(z|w)(end|full)(?:(\d+)(k?))?(_crop)?", text)
    if ppl is not None:
        space, sampling, number, thousands, crop = ppl.groups()
        count = PPL_DEFAULT_COUNT if number is None else int(number) * (1000 if thousands else 1)
        if count < 2:
            raise UserError(f"metric '{name}' needs at least 2 samples; write e.g. ppl_wend10k")
        return MetricSpec(name.strip(), "ppl", count, 0, space, sampling, crop is not None)
    match = re.fullmatch(r"(fid|kid|is|pr)(\d+)(k?)", text)
    if match is None:
        raise UserError(
            f"metric '{name}' is not known; write KIND+COUNT with KIND one of fid, kid, is, pr "
            "and COUNT the generated images, e.g. fid50k, kid50k, fid10k, is50k, pr50k, or a "
            "perceptual path length: ppl_wend (ppl_wend10k, ppl_zfull, ppl_wend_crop)"
        )
    kind, number, thousands = match.groups()
    count = int(number) * (1000 if thousands else 1)
    if count < 2:
        raise UserError(f"metric '{name}' needs at least 2 images; write e.g. fid50k")
    return MetricSpec(name.strip(), kind, count, count)


# ---------------------------------------------------------------------------- feature extractor


def _local_weights(url: str) -> str:
    """A local path for `url`; an s3:// file is copied once into the torch hub cache."""
    local = storage.cached_local_copy(url, Path(torch.hub.get_dir()) / "sg2dist")
    if not os.path.isfile(local):
        raise UserError(
            f"metrics.inception_weights={url} does not exist; point it (or --inception-weights) "
            f"at a copy of {INCEPTION_FILE}"
        )
    return local


def _sha256_prefix(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def missing_weights_message(reason: str) -> str:
    return (
        f"FID/KID need torch-fidelity's Inception weights {INCEPTION_FILE} ({INCEPTION_BYTES:,} "
        f"bytes, sha256 {INCEPTION_SHA256_PREFIX}...), which could not be downloaded ({reason}); "
        f"copy it from {INCEPTION_URL} onto this machine or into S3 and set "
        "metrics.inception_weights=PATH_OR_S3_URL (sg2dist metrics: --inception-weights), "
        f"or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}"
    )


def load_feature_extractor(
    weights: str, layers: list[str], device: torch.device
) -> tuple[FeatureExtractorInceptionV3, str]:
    """(Inception feature extractor on `device`, id naming its weights for cache keys)."""
    path = _local_weights(weights) if weights else None
    try:
        extractor = FeatureExtractorInceptionV3(
            "inception-v3-compat", layers, feature_extractor_weights_path=path, verbose=False
        )
    except OSError as exc:  # URLError, HTTPError, connection errors: no internet
        if path is not None:
            raise UserError(f"cannot read Inception weights {weights} ({exc})") from None
        raise UserError(missing_weights_message(f"{type(exc).__name__}: {exc}")) from None
    except (RuntimeError, KeyError, ValueError) as exc:
        raise UserError(
            f"{weights or 'the downloaded file'} is not torch-fidelity's Inception weights "
            f"file {INCEPTION_FILE} ({str(exc).splitlines()[0][:200]}); replace it"
        ) from None
    weights_id = _sha256_prefix(path) if path else INCEPTION_SHA256_PREFIX[:12]
    return extractor.to(device), f"inception-{weights_id}"


def _embed(
    extractor: FeatureExtractorInceptionV3, img_uint8_NCHW: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Features per layer name (CPU float32) of uint8 images with 1 or 3 channels."""
    if img_uint8_NCHW.shape[1] == 1:
        img_uint8_NCHW = img_uint8_NCHW.expand(-1, 3, -1, -1)
    with torch.no_grad():
        features = extractor(img_uint8_NCHW)
    return {
        name: f.float().cpu() for name, f in zip(extractor.features_list, features, strict=True)
    }


# ---------------------------------------------------------------------------- ranks


def _owned(batch_index: int, rank: int, world_size: int) -> bool:
    return batch_index % world_size == rank


def _gather_features(
    parts: list[tuple[int, dict[str, torch.Tensor]]], rank: int, world_size: int
) -> dict[str, torch.Tensor] | None:
    """All ranks' (batch index, features) concatenated in batch order on rank 0 (None
    elsewhere), so that a prefix is the same image set whatever the world size."""
    if world_size > 1:
        gathered: list[Any] | None = [None] * world_size if rank == 0 else None
        dist.gather_object(parts, gathered, dst=0)
        if rank != 0:
            return None
        assert gathered is not None  # rank 0 made the list
        parts = sorted(
            (part for rank_parts in gathered for part in rank_parts), key=lambda part: part[0]
        )
    names = parts[0][1].keys()
    return {name: torch.cat([features[name] for _, features in parts]) for name in names}


def _broadcast(value: Any, world_size: int) -> Any:
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _forked_rng(device: torch.device) -> Any:
    """Seed freely inside; the caller's CPU (and CUDA) RNG state comes back untouched."""
    if device.type != "cuda":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.random.fork_rng(devices=[index])


# ---------------------------------------------------------------------------- images


def _real_batches(
    data_url: str, num_real: int, batch: int, rank: int, world_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(batch index, uint8 NCHW images) of the first `num_real` dataset images, for the
    batches owned by `rank`."""
    images: list[np.ndarray] = []
    batch_index = 0
    for index, (img_CHW, _label) in enumerate(iter_images(data_url)):
        if index == num_real:
            break
        images.append(img_CHW)
        if len(images) == batch or index == num_real - 1:
            if _owned(batch_index, rank, world_size):
                yield batch_index, torch.from_numpy(np.stack(images))
            images, batch_index = [], batch_index + 1


def _generated_batches(
    G: Generator, num_gen: int, batch: int, device: torch.device, rank: int, world_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(batch index, uint8 NCHW images) from G with random z (and uniformly random
    classes), batch i drawn from seed i, for the batches owned by `rank`."""
    num_batches = -(-num_gen // batch)
    for batch_index in range(num_batches):
        if not _owned(batch_index, rank, world_size):
            continue
        n = min(batch, num_gen - batch_index * batch)
        with torch.no_grad():
            torch.manual_seed(batch_index)  # also seeds G's per-layer noise
            z = torch.randn([n, G.z_dim], device=device)
            class_idx = torch.zeros(n, dtype=torch.int64, device=device)
            if G.c_dim > 0:
                class_idx = torch.randint(G.c_dim, (n,), device=device)
            img = G(z, one_hot(class_idx, G.c_dim), noise_mode="random")
        yield batch_index, to_uint8_nchw(img)


def _features(
    batches: Iterator[tuple[int, torch.Tensor]],
    extractor: FeatureExtractorInceptionV3,
    device: torch.device,
    total: int,
    what: str,
    rank: int,
    world_size: int,
) -> dict[str, torch.Tensor] | None:
    parts = []
    with tqdm(
        total=total, desc=what, unit="img", disable=True if rank else None, leave=False
    ) as progress:
        for batch_index, img_uint8_NCHW in batches:
            parts.append((batch_index, _embed(extractor, img_uint8_NCHW.to(device))))
            progress.update(len(img_uint8_NCHW) * world_size)
    return _gather_features(parts, rank, world_size)


# ---------------------------------------------------------------------------- real statistics


def _cache_url(data_url: str, manifest_hash: str, num_real: int, extractor_id: str) -> str:
    name = f"{manifest_hash[:16]}-{num_real}-{extractor_id}.npy"
    return storage.join(data_url, CACHE_FOLDER, name)


def _read_cache(url: str, num_real: int) -> torch.Tensor | None:
    if not storage.exists(url):
        return None
    features = np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)
    if features.shape != (num_real, 2048) or features.dtype != np.float32:
        print(f"[metrics] ignoring {url}: shape {features.shape} {features.dtype}; recomputing")
        return None
    return torch.from_numpy(features)


def _write_cache(url: str, features: torch.Tensor) -> None:
    buffer = io.BytesIO()
    np.save(buffer, features.numpy().astype(np.float32), allow_pickle=False)
    try:
        storage.write_bytes(url, buffer.getvalue())
    except (UserError, OSError) as exc:  # e.g. a read-only dataset bucket
        print(
            f"[metrics] could not cache real-image features at {url} ({exc}); "
            "they will be recomputed next time"
        )


def real_features(
    data_url: str,
    manifest_hash: str,
    num_real: int,
    extractor: FeatureExtractorInceptionV3,
    extractor_id: str,
    *,
    device: torch.device,
    batch: int,
    rank: int,
    world_size: int,
) -> torch.Tensor | None:
    """[num_real, 2048] Inception features of the dataset on rank 0 (None elsewhere),
    from the cache next to the dataset when there is one."""
    cache_url = _cache_url(data_url, manifest_hash, num_real, extractor_id)
    cached = _read_cache(cache_url, num_real) if rank == 0 else None
    if _broadcast(cached is not None, world_size):
        return cached
    batches = _real_batches(data_url, num_real, batch, rank, world_size)
    features = _features(batches, extractor, device, num_real, "real images", rank, world_size)
    if features is None:
        return None
    _write_cache(cache_url, features["2048"])
    return features["2048"]


# ---------------------------------------------------------------------------- path length


def slerp_rows(a_NZ: torch.Tensor, b_NZ: torch.Tensor, t_N1: torch.Tensor) -> torch.Tensor:
    """Unit vectors at fraction t of the great circle from a's direction towards b's, row by
    row (the mapping normalises z, so only directions matter)."""
    a = a_NZ / a_NZ.norm(dim=1, keepdim=True)
    b = b_NZ / b_NZ.norm(dim=1, keepdim=True)
    cos_omega = (a * b).sum(dim=1, keepdim=True)
    towards_b = b - cos_omega * a  # the part of b orthogonal to a
    towards_b = towards_b / towards_b.norm(dim=1, keepdim=True)
    angle = t_N1 * torch.acos(cos_omega)
    path = a * torch.cos(angle) + towards_b * torch.sin(angle)
    return path / path.norm(dim=1, keepdim=True)


def ppl_images(G: Generator, spec: MetricSpec, n: int, seed: int) -> torch.Tensor:
    """[2n, C, H, W] images of n PPL samples: the images at t, then those at t + epsilon.

    Draws, in this order, from a CPU generator seeded with `seed`: z [2n, z_dim] (the path
    ends: first n rows, then last n), classes [n] (conditional models), t [n] (uniform, used
    for `full`), then one map per noise_const buffer of G in module order. G's constant
    noise is overwritten: pass a copy.
    """
    generator = torch.Generator().manual_seed(seed)
    device = G.mapping.w_avg.device
    z0, z1 = torch.randn([2 * n, G.z_dim], generator=generator).to(device).chunk(2)
    class_idx = torch.zeros(n, dtype=torch.int64)
    if G.c_dim > 0:
        class_idx = torch.randint(G.c_dim, (n,), generator=generator)
    t_N1 = torch.rand([n, 1], generator=generator).to(device)
    if spec.sampling == "end":
        t_N1 = torch.zeros_like(t_N1)
    for name, buf in G.synthesis.named_buffers():
        if name.endswith("noise_const"):
            buf.copy_(torch.randn(buf.shape, generator=generator))
    c = one_hot(class_idx, G.c_dim).to(device)
    c_pair = torch.cat([c, c])
    if spec.space == "w":
        w0, w1 = G.mapping(torch.cat([z0, z1]), c_pair).chunk(2)
        t = t_N1.unsqueeze(2)
        ws = torch.cat([w0.lerp(w1, t), w0.lerp(w1, t + PPL_EPSILON)])
    else:
        z_t = torch.cat([slerp_rows(z0, z1, t_N1), slerp_rows(z0, z1, t_N1 + PPL_EPSILON)])
        ws = G.mapping(z_t, c_pair)
    return G.synthesis(ws, noise_mode="const")


def ppl_distances(
    lpips: LPIPS, img_pairs: torch.Tensor, spec: MetricSpec, img_resolution: int
) -> torch.Tensor:
    """[n] LPIPS distance / epsilon^2 of each sample's two images ([2n, C, H, W] as
    `ppl_images` returns them), after the optional face crop and a box downsampling of
    images larger than 256 px."""
    img = img_pairs
    if spec.crop:  # the face region of FFHQ, as the official code crops it
        c = img.shape[2] // 8
        img = img[:, :, c * 3 : c * 7, c * 2 : c * 6]
    factor = img_resolution // 256
    if factor > 1:
        N, C, H, W = img.shape
        img = img.reshape(N, C, H // factor, factor, W // factor, factor).mean(dim=(3, 5))
    features_t0, features_t1 = lpips((img + 1) * 127.5).chunk(2)
    return lpips_distance(features_t0, features_t1) / PPL_EPSILON**2


def ppl_from_distances(distances: np.ndarray) -> float:
    """Mean of the distances between the 1st and 99th percentiles (inclusive), as the
    official code: it keeps a few huge jumps (a seam between modes) from ruling the score."""
    lo = np.percentile(distances, PPL_PERCENTILES[0], method="lower")
    hi = np.percentile(distances, PPL_PERCENTILES[1], method="higher")
    return float(distances[(distances >= lo) & (distances <= hi)].mean())


def fp32_copy(G: Generator) -> Generator:
    """A private copy of G that runs every block in fp32 (PPL's epsilon step is far below
    fp16's resolution) and whose noise buffers may be overwritten."""
    G = copy.deepcopy(G).eval().requires_grad_(False)
    for block in G.synthesis.blocks.values():
        cast("SynthesisBlock", block).use_fp16 = False
    return G


def _ppl_score(
    G_ema: Generator,
    spec: MetricSpec,
    lpips: LPIPS,
    batch: int,
    rank: int,
    world_size: int,
) -> dict[str, float]:
    """{spec.name: PPL} on rank 0 ({} elsewhere); batch i is drawn from seed i."""
    G = fp32_copy(G_ema)
    parts = []
    num_batches = -(-spec.count // batch)
    with tqdm(
        total=spec.count, desc=spec.name, unit="sample", disable=True if rank else None, leave=False
    ) as progress:
        for batch_index in range(num_batches):
            if not _owned(batch_index, rank, world_size):
                continue
            n = min(batch, spec.count - batch_index * batch)
            with torch.no_grad():
                img_pairs = ppl_images(G, spec, n, seed=batch_index)
                distances = ppl_distances(lpips, img_pairs, spec, G.img_resolution)
            parts.append((batch_index, {"ppl": distances.double().cpu()}))
            progress.update(n * world_size)
    gathered = _gather_features(parts, rank, world_size)
    if gathered is None:
        return {}
    return {spec.name: ppl_from_distances(gathered["ppl"].numpy())}


# ---------------------------------------------------------------------------- scores


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID of two feature sets: |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrtm(S_a S_b).

    The same value as torch-fidelity's (tested), computed faster. tr sqrtm(S_a S_b) is
    the sum of the square roots of the eigenvalues of S_a S_b. With S = X^T X for the
    centred, scaled features X, those are the eigenvalues of the symmetric R S_b R,
    R = sqrtm(S_a) (two symmetric eigensolves instead of one general eigensolve of a
    2048 x 2048 matrix, several times faster); when both sets have fewer images than
    features they are the squared singular values of B A^T, a tiny matrix.
    """
    a, b = features_a.double().numpy(), features_b.double().numpy()
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    A = (a - mu_a) / np.sqrt(len(a) - 1)  # S_a = A^T A, the unbiased covariance
    B = (b - mu_b) / np.sqrt(len(b) - 1)
    if max(len(a), len(b)) <= a.shape[1]:
        tr_sqrt = np.linalg.svd(B @ A.T, compute_uv=False).sum()
    else:
        eigenvalues, eigenvectors = np.linalg.eigh(A.T @ A)
        R = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(R @ (B.T @ B) @ R), 0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.sum(A**2) + np.sum(B**2) - 2 * tr_sqrt)


def _score(
    spec: MetricSpec, gen: dict[str, torch.Tensor], real: torch.Tensor | None
) -> dict[str, float]:
    """One metric from the features of the first spec.count generated images."""
    gen_features = gen[FEATURE_LAYER[spec.kind]][: spec.count]
    if spec.kind == "is":
        splits = min(10, len(gen_features))  # the usual 10 splits, fewer for tiny counts
        return {spec.name: isc_features_to_metric(gen_features, splits)["inception_score_mean"]}
    assert real is not None  # every metric but IS has real features
    real = real[: spec.real_count]
    if spec.kind == "fid":
        return {spec.name: frechet_distance(gen_features, real)}
    if spec.kind == "kid":
        subset = min(KID_SUBSET_SIZE, len(gen_features), len(real))
        kid = kid_features_to_metric(gen_features, real, kid_subset_size=subset, verbose=False)
        return {spec.name: kid["kernel_inception_distance_mean"]}
    precision, recall = calculate_precision_recall_part(gen_features, real, PR_NEIGHBORHOOD)
    return {f"{spec.name}_precision": precision, f"{spec.name}_recall": recall}


def compute_metrics(
    G_ema: Generator,
    data_url: str,
    metrics: list[str],
    *,
    device: torch.device | str,
    inception_weights: str = "",
    lpips_weights: str = "",
    num_gen: int | None = None,
    batch: int = 64,
    rank: int = 0,
    world_size: int = 1,
    scores_on_every_rank: bool = True,
) -> dict[str, float]:
    """Scores of G_ema against the dataset at `data_url`, e.g. {'fid50k': 3.1}; the same
    dict on every rank (rank 0 only, {} elsewhere, with scores_on_every_rank=False).
    `num_gen` overrides the generated image (PPL: sample) count of every metric. PPL alone
    needs no dataset (`data_url` may be ""). With world_size > 1 every rank must call it
    (torch.distributed collectives)."""
    device = torch.device(device)
    specs = [parse_metric(name) for name in metrics]
    if num_gen is not None:
        specs = [dataclasses.replace(spec, count=num_gen) for spec in specs]
    # Building the networks and generating images draw random numbers: keep them off the
    # caller's RNG streams, which an exact training resume depends on.
    with _forked_rng(device):
        scores: dict[str, float] = {}
        fidelity = [spec for spec in specs if spec.kind != "ppl"]
        if fidelity:
            scores.update(
                _fidelity_scores(
                    G_ema, data_url, fidelity, device, inception_weights, batch, rank, world_size
                )
            )
        path_lengths = [spec for spec in specs if spec.kind == "ppl"]
        if path_lengths:
            lpips = load_lpips(lpips_weights, device)
            for spec in path_lengths:
                scores.update(_ppl_score(G_ema, spec, lpips, batch, rank, world_size))
    return _broadcast(scores, world_size) if scores_on_every_rank else scores


def _fidelity_scores(
    G_ema: Generator,
    data_url: str,
    specs: list[MetricSpec],
    device: torch.device,
    inception_weights: str,
    batch: int,
    rank: int,
    world_size: int,
) -> dict[str, float]:
    """The Inception-based scores on rank 0 ({} elsewhere)."""
    manifest = open_manifest(data_url)
    layers = sorted({FEATURE_LAYER[spec.kind] for spec in specs})
    extractor, extractor_id = load_feature_extractor(inception_weights, layers, device)

    gen_count = max(spec.count for spec in specs)
    gen_batches = _generated_batches(G_ema, gen_count, batch, device, rank, world_size)
    gen = _features(gen_batches, extractor, device, gen_count, "generated images", rank, world_size)
    real = None
    paired = [spec for spec in specs if spec.kind != "is"]
    if paired:
        num_real = min(max(spec.real_count for spec in paired), manifest.num_images)
        real = real_features(
            data_url,
            manifest.manifest_hash,
            num_real,
            extractor,
            extractor_id,
            device=device,
            batch=batch,
            rank=rank,
            world_size=world_size,
        )
    scores: dict[str, float] = {}
    if rank == 0:
        assert gen is not None  # rank 0 holds the gathered features
        for spec in specs:
            scores.update(_score(spec, gen, real))
    return scores
