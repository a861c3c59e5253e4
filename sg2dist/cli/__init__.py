"""The `sg2dist` command: one entry point, one module per subcommand.

Each subcommand lives in its own module of this package that exposes
`add_arguments(parser)` and `main(args) -> int`; options several commands share are
defined once in `sg2dist.cli.common`. Command modules parse and call the library;
the library never imports this package. Modules are imported only when their command
runs, so `sg2dist --help` stays fast and a broken optional dependency cannot break
the other commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sg2dist.errors import UserError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("sg2dist.cli.prepare", "turn an image folder or zip into WebDataset shards"),
    "train": ("sg2dist.cli.train", "train StyleGAN2 (one process, or under accelerate launch)"),
    "summary": ("sg2dist.cli.summary", "print the G and D layer tables and parameter counts"),
    "generate": ("sg2dist.cli.generate", "write images or a grid from a checkpoint"),
    "style-mix": ("sg2dist.cli.style_mix", "draw the style-mixing figure from a checkpoint"),
    "interpolate": ("sg2dist.cli.interpolate", "render a looping latent walk (gif or mp4)"),
    "project": ("sg2dist.cli.project", "find the w whose image matches a target photo"),
    "metrics": ("sg2dist.cli.metrics", "score a checkpoint with FID/KID/PPL"),
    "export": ("sg2dist.cli.export", "G_ema of a checkpoint as an MLflow model, ONNX or pt2"),
    "bench": ("sg2dist.cli.bench", "benchmark a training step or the data loader"),
    "import": ("sg2dist.cli.import_pickle", "turn an official StyleGAN2 network pickle into a run"),
    "augment-preview": (
        "sg2dist.cli.augment_preview",
        "show real images as D sees them under ADA or DiffAugment",
    ),
}


def _top_level_help() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: sg2dist COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `sg2dist COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"sg2dist: error: unknown command '{name}'; choose one of: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"sg2dist {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except UserError as exc:
        print(f"sg2dist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("sg2dist: interrupted", file=sys.stderr)
        return 130
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """End the process group a command joined (train, bench, metrics under a launcher).

    PyTorch asks every program that starts a group to destroy it: NCCL then releases its
    communicators before interpreter shutdown instead of during it (where every rank warns
    "process group has NOT been destroyed"). Destroying is local to this rank, never a
    collective, so a rank that ends early or on an error does not wait for the others.
    """
    dist = sys.modules.get("torch.distributed")  # not imported: a command that never needed it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
