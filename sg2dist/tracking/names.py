"""MLflow metric names: the trainer's internal keys, grouped into sections with `/`.

The MLflow UI puts every metric whose name has a `/` into the section named by its first
part, so a run shows `loss`, `D`, `pl`, `speed`, `progress`, `data`, `memory`, `augment`
and `metrics` sections instead of one flat block of charts. The trainer keeps its short
internal keys (the progress line prints those); `Tracker` renames them here when it logs.
A key that is not in the table (or already holds a `/`) is logged as it is.
"""

from __future__ import annotations

# internal tick key -> MLflow metric name
TICK_METRIC_NAMES: dict[str, str] = {
    "loss_G": "loss/G",
    "loss_D_real": "loss/D_real",
    "loss_D_fake": "loss/D_fake",
    "loss_r1": "loss/r1",
    "loss_pl": "loss/pl",
    "D_real": "D/real",  # mean D logit of the reals in the Dmain phase
    "D_fake": "D/fake",  # ... of the fakes in the Dmain phase
    "D_fake_G": "D/fake_G",  # ... of the fakes in the Gmain phase
    "D_real_r1": "D/real_r1",  # ... of the reals in the Dreg (R1) phase
    "pl_mean": "pl/mean",
    "pl_length": "pl/length",
    "kimg": "progress/kimg",
    "tick": "progress/tick",
    "skipped_steps": "progress/skipped_steps",
    "checkpoint_failures": "progress/checkpoint_failures",  # snapshots S3 did not take
    "sec_per_kimg": "speed/sec_per_kimg",
    "img_per_s": "speed/img_per_s",
    "data_wait_frac": "data/wait_frac",
    "corrupt_samples": "data/corrupt_samples",
    "peak_rss_gb": "memory/peak_rss_gb",
    "peak_cuda_gb": "memory/peak_cuda_gb",
    "augment_p": "augment/p",
    "augment_rt": "augment/rt",
}
SCORES_SECTION = "metrics"  # FID, KID, IS, precision/recall, PPL: metrics/fid50k, ...


def mlflow_metric_name(key: str) -> str:
    """The MLflow name of one tick metric key."""
    return TICK_METRIC_NAMES.get(key, key)


def score_metric_name(name: str) -> str:
    """The MLflow name of an evaluation score such as fid50k or ppl_wend."""
    return f"{SCORES_SECTION}/{name}"
