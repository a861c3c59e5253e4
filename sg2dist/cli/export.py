"""`sg2dist export`: log a checkpoint's G_ema as an MLflow model.

    sg2dist export --checkpoint s3://bucket/runs/cats --register cats-generator

The model is a pyfunc that maps seeds (or z vectors) and truncation psi to uint8
images (see sg2dist.tracking.generator_model). It goes into a new run named
`export-<run name>` of the run's experiment, tagged with the source checkpoint and
training run, so a training run that is still going is never touched. The tracking
URI is --tracking-uri, else the run's tracking.uri, else $MLFLOW_TRACKING_URI, else the
local sqlite store beside the run folder (as during training).
"""

from __future__ import annotations

import argparse

from sg2dist.cli.common import add_checkpoint_argument, load_generator_or_explain
from sg2dist.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--register",
        default="",
        help="also register the model under this name in the model registry",
    )
    parser.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow tracking URI (default: the run's, else $MLFLOW_TRACKING_URI)",
    )


def main(args: argparse.Namespace) -> int:
    import torch

    from sg2dist.tracking.redact import redact_text
    from sg2dist.tracking.tracker import Tracker

    G_ema, cfg, meta = load_generator_or_explain(args.checkpoint, torch.device("cpu"))
    if args.tracking_uri:
        cfg.tracking.uri = args.tracking_uri
    cfg.tracking.enabled = True
    cfg.tracking.system_metrics = False
    run_name = cfg.tracking.run_name or cfg.run.dir.rstrip("/").rsplit("/", 1)[-1]
    cfg.tracking.run_name = f"export-{run_name}"
    tags = {
        "sg2dist.export_of": args.checkpoint,
        "sg2dist.training_run_id": str(meta.get("mlflow_run_id") or ""),
    }
    tracker = Tracker.start(cfg, run_id=None, tags=tags)
    model_uri = tracker.log_generator(G_ema, cfg, register_name=args.register)
    tracker.end("FINISHED" if model_uri else "FAILED")
    if not model_uri:
        where = redact_text(tracker.uri)
        raise UserError(
            f"logging the model to MLflow at {where} failed (see the warning above); "
            "check the server and retry"
        )
    registered = f", registered as '{args.register}'" if args.register else ""
    print(f"logged G_ema of {args.checkpoint} as {model_uri} (run {tracker.run_id}){registered}")
    return 0
