"""`sg2dist train`: parse, build, run. Works alone or under `accelerate launch`/torchrun."""

from __future__ import annotations

import argparse
import os

from sg2dist.cli.common import add_config_arguments
from sg2dist.config import dump_config, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and batch layout, then exit",
    )
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto (continue from run.dir's latest checkpoint if any), none, or a checkpoint URL",
    )
    parser.add_argument(
        "--init-from",
        default="",
        metavar="URL",
        help="start a new run from these weights (fine-tuning): a run or checkpoint folder, or "
        "an official network pickle (.pkl path, s3:// or https:// URL); model.* comes from it",
    )


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    # torchrun and accelerate launch both export WORLD_SIZE; checked before any heavy import.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    batch_gpu, accum = cfg.train.batch_layout(world_size)
    init_from = None
    if args.init_from:
        from sg2dist.train.checkpoint import load_checkpoint, source_model

        init_from = load_checkpoint(args.init_from)
        cfg = load_config(
            args.config,
            args.overrides,
            model_from=source_model(init_from),
            model_source=init_from.url,  # a URL without credentials or query
        )
    if args.dry_run:
        print(dump_config(cfg), end="")
        print(
            f"# batch layout: global {cfg.train.batch} = batch_gpu {batch_gpu} x accumulation "
            f"{accum} x world size {world_size}"
        )
        return 0
    from sg2dist.train.build import build_session
    from sg2dist.train.loop import train

    session = build_session(cfg, resume=args.resume, init_from=init_from)
    return train(session)
