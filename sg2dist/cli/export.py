"""`sg2dist export`: a checkpoint's G_ema as an MLflow model, an ONNX file or a torch.export
program.

    sg2dist export --checkpoint s3://bucket/runs/cats --register cats-generator
    sg2dist export --checkpoint runs/cats --format onnx --output g.onnx [--batch 8] [--log]
    sg2dist export --checkpoint runs/cats --format pt2 --output g.pt2

--format mlflow (the default): a pyfunc that maps seeds (or z vectors) and truncation psi
to uint8 images (see sg2dist.tracking.generator_model). It goes into a new run named
`export-<run name>` of the run's experiment, tagged with the source checkpoint and
training run, so a training run that is still going is never touched. The tracking URI
is --tracking-uri, else the run's tracking.uri, else $MLFLOW_TRACKING_URI, else the local
sqlite store beside the run folder (as during training).

--format onnx | pt2: one file (local or s3://) holding mapping and synthesis, inputs z,
psi (and c for a conditional model), output the image (sg2dist.export.exportable says
exactly). --batch N fixes the batch size, the default is any. ONNX needs the optional
packages onnx and onnxscript (pip install 'sg2dist[onnx]'); the file is checked with
onnx's checker. --log also logs the file into an `export-<run name>` run as above.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from sg2dist import storage
from sg2dist.cli.common import add_checkpoint_argument, check_suffix, load_generator_or_explain
from sg2dist.errors import UserError

FILE_FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--format",
        choices=("mlflow", *FILE_FORMATS),
        default="mlflow",
        help="mlflow: a pyfunc model in MLflow (default); onnx or pt2: a file (--output)",
    )
    parser.add_argument("--output", metavar="FILE", help="the .onnx or .pt2 file (local or s3://)")
    parser.add_argument(
        "--batch",
        default="dynamic",
        help="images per call of the exported file: a number, or dynamic (default: any)",
    )
    parser.add_argument(
        "--noise-mode",
        default="const",
        help="per-pixel noise baked into the file: const (the model's own, default) or none",
    )
    parser.add_argument(
        "--trunc-cutoff",
        type=int,
        default=None,
        metavar="N",
        help="psi truncates only the first N ws layers (default: all)",
    )
    parser.add_argument(
        "--log", action="store_true", help="also log the file to MLflow (an export-... run)"
    )
    parser.add_argument(
        "--register",
        default="",
        help="mlflow format: also register the model under this name in the model registry",
    )
    parser.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow tracking URI (default: the run's, else $MLFLOW_TRACKING_URI)",
    )


def main(args: argparse.Namespace) -> int:
    if args.format == "mlflow":
        return export_mlflow(args)
    return export_file(args)


def parse_batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--batch {text}: write a number >= 1, or dynamic for any batch size")
    return int(text)


def export_file(args: argparse.Namespace) -> int:
    import torch

    from sg2dist.cli.common import check_trunc_cutoff
    from sg2dist.export.exportable import export_program, require_onnx, save_onnx, save_pt2

    if not args.output:
        raise UserError(f"--format {args.format} writes a file; pass --output FILE")
    if args.register:
        raise UserError("--register names an MLflow model; use it with --format mlflow")
    check_suffix(args.output, (FILE_FORMATS[args.format],), "--output")
    batch = parse_batch(args.batch)
    if args.format == "onnx":
        require_onnx()  # before the slow part
    G_ema, cfg, meta = load_generator_or_explain(args.checkpoint, torch.device("cpu"))
    check_trunc_cutoff(G_ema.num_ws, args.trunc_cutoff)
    program = export_program(
        G_ema, batch=batch, noise_mode=args.noise_mode, truncation_cutoff=args.trunc_cutoff
    )
    name = args.output.rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="sg2dist-export-") as tmp:
        local = os.path.join(tmp, name)
        if args.format == "onnx":
            save_onnx(program, G_ema, local)
        else:
            save_pt2(program, local)
        storage.upload_file(local, args.output)
        logged = log_file_to_mlflow(args, cfg, meta, local) if args.log else ""
    shape = "any batch" if batch is None else f"batch {batch}"
    print(f"wrote G_ema of {args.checkpoint} to {args.output} ({args.format}, {shape})")
    if logged:
        print(f"logged {args.output} to MLflow as {logged}")
    return 0


def start_export_run(args: argparse.Namespace, cfg: Any, meta: dict[str, Any]) -> Any:
    """A new MLflow run `export-<run name>` in the run's experiment."""
    from sg2dist.tracking.tracker import Tracker

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
    return Tracker.start(cfg, run_id=None, tags=tags)


def logging_failed(tracker: Any) -> UserError:
    from sg2dist.tracking.redact import redact_text

    return UserError(
        f"logging to MLflow at {redact_text(tracker.uri)} failed (see the warning above); "
        "check the server and retry"
    )


def log_file_to_mlflow(args: argparse.Namespace, cfg: Any, meta: dict[str, Any], path: str) -> str:
    tracker = start_export_run(args, cfg, meta)
    uri = tracker.log_file(path, "generator")
    tracker.end("FINISHED" if uri else "FAILED")
    if not uri:
        raise logging_failed(tracker)
    return uri


def export_mlflow(args: argparse.Namespace) -> int:
    import torch

    G_ema, cfg, meta = load_generator_or_explain(args.checkpoint, torch.device("cpu"))
    tracker = start_export_run(args, cfg, meta)
    model_uri = tracker.log_generator(G_ema, cfg, register_name=args.register)
    tracker.end("FINISHED" if model_uri else "FAILED")
    if not model_uri:
        raise logging_failed(tracker)
    registered = f", registered as '{args.register}'" if args.register else ""
    print(f"logged G_ema of {args.checkpoint} as {model_uri} (run {tracker.run_id}){registered}")
    return 0
