"""Experiment tracking: the only package that knows MLflow.

The trainer logs through one object with the interface of `NullTracker`:

    NullTracker   every call does nothing: other ranks, and runs with tracking off
    Tracker       the main process's MLflow run (tracker.py)
    NodeTracker   another node's first process: its system metrics only (tracker.py)

`NullTracker` lives here, without MLflow, so that a run that does not track never
imports it (the GPU benchmark machines have no MLflow). `redact.py` keeps secrets out
of everything logged; `generator_model.py` is G_ema as an MLflow pyfunc model; `names.py`
maps the trainer's metric keys to the grouped MLflow names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sg2dist.config import Config


GENERATOR_TAG = "generator_model_uri"  # the run tag naming the final G_ema model


class NullTracker:
    """The tracker interface, doing nothing. Keeps the run id of a checkpoint written
    without tracking, so a later tracked resume can continue that MLflow run."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at an explicit `step` (images shown), so curves continue on resume; tick
        keys are logged under their grouped names (names.py)."""

    def log_scores(self, scores: dict[str, float], step: int) -> None:
        """Evaluation scores (fid50k, ppl_wend, ...) at `step`, under `metrics/<name>`."""

    def set_tag(self, key: str, value: str) -> None:
        """One run tag (e.g. the latest checkpoint URL)."""

    def log_image(self, image: Any, key: str, step: int) -> None:
        """One image of the series `key` (PIL image or HWC uint8 array)."""

    def log_generator(self, G_ema: torch.nn.Module, cfg: Config, *, register_name: str = "") -> str:
        """G_ema as a model; returns its model URI, "" when nothing was logged."""
        return ""

    def log_file(self, local_path: str, artifact_folder: str) -> str:
        """One file as a run artifact; returns its `runs:/` URI, "" when nothing was logged."""
        return ""

    def ensure_registered(self, model_uri: str, name: str) -> None:
        """Register a logged model under `name` unless a version of it is registered."""

    def logged_generator_uri(self) -> str:
        """The URI of the generator model this run logged already ("" if none), so that a run
        restarted after it finished does not log it twice."""
        return ""

    def end(self, status: str = "FINISHED") -> None:
        """Flush and close: FINISHED / FAILED / KILLED."""


def start_tracker(
    cfg: Config, *, is_main: bool, run_id: str | None, tags: dict[str, str]
) -> NullTracker:
    """The main process's MLflow `Tracker` when tracking is on, else a NullTracker."""
    if not (is_main and cfg.tracking.enabled):
        return NullTracker(run_id)
    from sg2dist.tracking.tracker import Tracker

    return Tracker.start(cfg, run_id=run_id, tags=tags)
