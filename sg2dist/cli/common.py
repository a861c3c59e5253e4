"""Options and argument parsing that several commands share, defined once.

`--config/--set` (train, summary), `--checkpoint`, `--device` and the sampling options
(`--trunc`, `--trunc-cutoff`, `--noise-mode`, `--class`, `--batch`) of the generator
commands, seed lists ("0-63", "1,2,5-7") and output suffix checks. Every mistake is a
UserError naming the option and the fix.
"""

from __future__ import annotations

import argparse
import pickle
from typing import Any

import torch

from sg2dist.config import Config
from sg2dist.errors import UserError
from sg2dist.model.generator import NOISE_MODES, Generator
from sg2dist.sampling import class_labels, map_z

MAX_SEED = 2**32 - 1  # np.random.RandomState accepts seeds in [0, 2**32)


# ---------------------------------------------------------------------------- options


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE and repeatable --set KEY=VALUE."""
    parser.add_argument("--config", help="YAML config file (defaults: the paper's config F)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.batch=64 (repeatable)",
    )


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="URL",
        help="run folder (its latest checkpoint) or checkpoint folder, local or s3://; or an "
        "official network pickle (.pkl path, s3:// or https:// URL), imported in memory",
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (cuda when available, else cpu), cpu, cuda or cuda:N",
    )


def add_batch_argument(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument("--batch", type=int, default=default, help="images per forward pass")


def add_class_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--class",
        dest="class_idx",
        type=int,
        default=None,
        metavar="N",
        help="class index for a conditional model (required there)",
    )


def add_generator_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every generator command takes: which G_ema, where it runs, how it samples."""
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--trunc",
        type=float,
        default=1.0,
        metavar="PSI",
        help="truncation psi: 1 = none, 0.7 = typical, 0 = the average image",
    )
    parser.add_argument(
        "--trunc-cutoff",
        type=int,
        default=None,
        metavar="N",
        help="truncate only the first N ws layers, the coarse ones (default: all)",
    )
    parser.add_argument(
        "--noise-mode",
        choices=NOISE_MODES,
        default="const",
        help="per-pixel noise: const (reproducible, default), random (seeded), none",
    )
    add_class_argument(parser)
    add_batch_argument(parser, default=16)
    add_device_argument(parser)


# ---------------------------------------------------------------------------- checks


def resolve_device(name: str) -> torch.device:
    """--device as a torch device; one clear error for a name or GPU that is not there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:")):
        raise UserError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: use auto, cpu, cuda or cuda:N") from None


def check_batch(batch: int) -> None:
    if batch < 1:
        raise UserError(f"--batch {batch} must be >= 1")


def check_class(c_dim: int, class_idx: int | None) -> None:
    if c_dim == 0 and class_idx is not None:
        raise UserError(f"--class {class_idx}: this model is unconditional; drop --class")
    if c_dim > 0 and class_idx is None:
        raise UserError(
            f"this model is conditional on {c_dim} classes; pass --class N with N in 0..{c_dim - 1}"
        )
    if c_dim > 0 and class_idx is not None and not 0 <= class_idx < c_dim:
        raise UserError(
            f"--class {class_idx} is out of range; this model has classes 0..{c_dim - 1}"
        )


def check_trunc_cutoff(num_ws: int, cutoff: int | None) -> None:
    if cutoff is not None and not 1 <= cutoff <= num_ws:
        raise UserError(
            f"--trunc-cutoff {cutoff} is out of range; this model has {num_ws} ws layers, "
            f"so use 1..{num_ws} (e.g. 4 truncates the 4 coarsest)"
        )


def parse_int_list(text: str, option: str) -> list[int]:
    """'1,2,5-7' -> [1, 2, 5, 6, 7]; ranges are inclusive, order and repeats are kept."""
    values: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            start = int(first)
            stop = int(last) if sep else start
        except ValueError:
            raise UserError(
                f"{option} '{text}' does not parse; write numbers and inclusive ranges "
                "such as 0-63 or 1,2,5-7"
            ) from None
        if stop < start:
            raise UserError(
                f"{option} '{text}': range {part.strip()} runs backwards; write {stop}-{start}"
            )
        values.extend(range(start, stop + 1))
    return values


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    seeds = parse_int_list(text, option)
    if max(seeds) > MAX_SEED:
        raise UserError(f"{option} '{text}': seeds must lie in 0..{MAX_SEED}")
    return seeds


def check_suffix(url: str, suffixes: tuple[str, ...], option: str) -> str:
    """The lower-case suffix of `url` if it is one of `suffixes`, else one clear error."""
    name = url.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix in suffixes:
        if name.endswith(suffix):
            return suffix
    raise UserError(f"{option} '{url}' must end in {' or '.join(suffixes)}")


# ---------------------------------------------------------------------------- loading


def open_generator(
    args: argparse.Namespace, *, class_required: bool = True
) -> tuple[Generator, torch.device]:
    """G_ema of `args.checkpoint` on `args.device`, after checking --batch, --trunc-cutoff
    and (unless the command's latents hold the class already) --class."""
    check_batch(args.batch)
    device = resolve_device(args.device)
    if device.type == "cuda":
        # TF32 rounds conv and matmul inputs to 10 mantissa bits: pixels would then move by
        # a few levels with the batch size and between GPU models.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    G, _cfg, _meta = load_generator_or_explain(args.checkpoint, device)
    if class_required:
        check_class(G.c_dim, args.class_idx)
    check_trunc_cutoff(G.num_ws, getattr(args, "trunc_cutoff", None))
    return G, device


def map_z_as_asked(
    G: Generator, z: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> torch.Tensor:
    """ws [N, num_ws, w_dim] of latents z [N, z_dim] with the command's --class, --trunc,
    --trunc-cutoff and --batch."""
    return map_z(
        G,
        z,
        class_labels(G.c_dim, args.class_idx, len(z)),
        truncation_psi=args.trunc,
        truncation_cutoff=args.trunc_cutoff,
        batch=args.batch,
        device=device,
    )


def load_generator_or_explain(
    url: str, device: torch.device
) -> tuple[Generator, Config, dict[str, Any]]:
    """`load_generator(url)`, with a file that is not a sg2dist G_ema as one clear error."""
    from sg2dist.train.checkpoint import load_generator

    try:
        return load_generator(url, device)
    except UserError:
        raise
    except (KeyError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        # A folder that passed the hash check but does not hold a G_ema for this code
        # (hand-edited meta.json, another project's file, a mismatched state dict).
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise UserError(
            f"checkpoint {url} could not be read as a sg2dist G_ema "
            f"({type(exc).__name__}: {reason}); "
            "pass a run folder or checkpoints/nimg-... folder written by `sg2dist train` "
            "or `sg2dist import`"
        ) from None
