"""`sg2dist import`: an official StyleGAN2 network pickle -> an ordinary sg2dist checkpoint.

    sg2dist import https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/ffhq.pkl \
        runs/ffhq-official
    sg2dist generate --checkpoint runs/ffhq-official --seeds 0-7 --trunc 0.7 out/

The pickle is read as data (nothing in it is executed); the model config is inferred from
it. DEST receives config.yaml and checkpoints/nimg-000000000000/ (G, D, G_ema and meta.json),
so every command that takes --checkpoint, and `train --init-from`, can use it.
"""

from __future__ import annotations

import argparse

from sg2dist import storage
from sg2dist.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", metavar="SRC", help="network pickle: local path, s3:// or https:// URL"
    )
    parser.add_argument(
        "dest",
        metavar="DEST",
        help="run folder to create (local or s3://); must hold no checkpoints",
    )


def main(args: argparse.Namespace) -> int:
    from sg2dist.config import config_from_dict, dump_config
    from sg2dist.interop import is_network_pickle, read_network_pickle
    from sg2dist.model import build_networks, count_params
    from sg2dist.train import checkpoint as ckpt

    dest = args.dest.rstrip("/")
    if is_network_pickle(dest):
        raise UserError(f"DEST {dest} names a pickle; DEST is the run folder to create")
    if storage.listdir(ckpt.checkpoints_url(dest)):
        raise UserError(f"{dest} already holds checkpoints; import into a new run folder")
    imported = read_network_pickle(args.src)
    state, meta = ckpt.imported_contents(imported, run_dir=dest)
    folder = ckpt.save_checkpoint(dest, 0, state, meta)
    cfg = config_from_dict(meta["config"])
    storage.write_text(storage.join(dest, "config.yaml"), dump_config(cfg))

    G, D = build_networks(cfg.model)
    m, info = cfg.model, imported.info
    for note in imported.notes:
        print(f"note: {note}")
    print(
        f"imported {info['source']} (sha256 {info['source_sha256']}, {info['source_bytes']} bytes)"
    )
    print(
        f"model: {m.resolution} px, {m.img_channels} channels, "
        + (f"{m.c_dim} classes" if m.c_dim else "unconditional")
        + f", z/w {m.z_dim}/{m.w_dim}, mapping {m.map_layers} layers, "
        f"channel_base {m.channel_base}, channel_max {m.channel_max}, "
        f"num_fp16_res {m.num_fp16_res}, conv_clamp {m.conv_clamp}, "
        f"mbstd group {m.mbstd_group} x {m.mbstd_features}"
    )
    print(f"parameters: G {count_params(G):,}, D {count_params(D):,}")
    print(
        f"training: augment p {info['augment_p']}, xflip {info['xflip']}, "
        f"labels {info['use_labels']}"
        + (
            f", ignored pickle keys {', '.join(info['ignored_keys'])}"
            if info["ignored_keys"]
            else ""
        )
    )
    print(f"wrote {folder}")
    return 0
