"""`sg2dist summary`: G and D tables (blocks per resolution) and parameter counts for a config.

The networks are built and run on the meta device: shapes and counts come from the real
modules, yet nothing is allocated, so even config F at 1024 px prints in about a second.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from sg2dist.cli.common import add_config_arguments
from sg2dist.config import load_config
from sg2dist.model import build_networks, count_params
from sg2dist.model.discriminator import Discriminator
from sg2dist.model.generator import Generator
from sg2dist.model.layers import FullyConnected

Row = tuple[str, str, str, int]  # block, channels, output shape, parameters
Entry = tuple[str, nn.Module, str]  # block, module, channels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    with torch.device("meta"):
        G, D = build_networks(cfg.model)
    print(format_summary(G, D))
    return 0


def format_summary(G: Generator, D: Discriminator) -> str:
    mapping, synthesis = count_params(G.mapping), count_params(G.synthesis)
    g_title = (
        f"Generator: {G.img_resolution}x{G.img_resolution}x{G.img_channels}, "
        f"z {G.z_dim}, w {G.w_dim}, c {G.c_dim}, {G.num_ws} ws"
    )
    d_title = f"Discriminator: {D.img_resolution}x{D.img_resolution}x{D.img_channels}, c {D.c_dim}"
    totals = [
        ("mapping", mapping),
        ("synthesis", synthesis),
        ("G total", mapping + synthesis),
        ("D total", count_params(D)),
    ]
    width = max(len(name) for name, _ in totals)
    lines = [
        _table(g_title, generator_rows(G)),
        "",
        _table(d_title, discriminator_rows(D)),
        "",
        "Trainable parameters",
        *(f"  {name:<{width}}  {count:>12,}" for name, count in totals),
    ]
    return "\n".join(lines)


def generator_rows(G: Generator) -> list[Row]:
    device = cast(FullyConnected, G.mapping.layers[0]).weight.device
    z = torch.zeros([1, G.z_dim], device=device)
    c = torch.zeros([1, G.c_dim], device=device)
    mapping_in = f"{G.z_dim}" + (f"+{G.c_dim}" if G.c_dim else "")
    entries: list[Entry] = [("mapping", G.mapping, f"{mapping_in} -> {G.w_dim}")]
    for name, block in G.synthesis.blocks.items():
        source = "const" if block.in_channels == 0 else str(block.in_channels)
        entries.append((name, block, f"{source} -> {block.out_channels}"))
    return _rows(entries, lambda: G(z, c, noise_mode="const"))


def discriminator_rows(D: Discriminator) -> list[Row]:
    device = D.fromrgb.weight.device
    img = torch.zeros([1, D.img_channels, D.img_resolution, D.img_resolution], device=device)
    c = torch.zeros([1, D.c_dim], device=device)
    entries: list[Entry] = [("fromrgb", D.fromrgb, f"{D.img_channels} -> {D.fromrgb.out_channels}")]
    for name, block in D.blocks.items():
        entries.append((name, block, f"{block.in_channels} -> {block.out_channels}"))
    if D.mapping is not None:
        entries.append(("label mapping", D.mapping, f"{D.c_dim} -> {D.mapping.w_dim}"))
    entries.append(("epilogue (b4)", D.epilogue, f"{D.epilogue.in_channels} -> 1"))
    return _rows(entries, lambda: D(img, c))


def _rows(entries: list[Entry], run: Callable[[], object]) -> list[Row]:
    shapes = _output_shapes({name: module for name, module, _ in entries}, run)
    return [(name, ch, shapes[name], count_params(module)) for name, module, ch in entries]


def _output_shapes(modules: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, str]:
    """Run `run()` once and record each module's output shape, batch dim shown as N."""
    shapes: dict[str, str] = {}

    def record(name: str):
        def hook(_module, _inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            shapes[name] = "[" + ", ".join(["N", *map(str, tensor.shape[1:])]) + "]"

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _table(title: str, rows: list[Row]) -> str:
    header = ("block", "channels", "output", "params")
    cells = [header] + [(name, ch, shape, f"{params:,}") for name, ch, shape, params in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]

    def fmt(row) -> str:
        name, ch, shape, params = row
        return (
            f"  {name:<{widths[0]}}  {ch:<{widths[1]}}  {shape:<{widths[2]}}  {params:>{widths[3]}}"
        )

    rule = "  " + "-" * (sum(widths) + 6)
    return "\n".join([title, fmt(header), rule, *(fmt(row) for row in cells[1:])])
