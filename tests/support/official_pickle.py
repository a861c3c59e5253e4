"""Network pickles in the official StyleGAN2 format, written without the official code.

Tests cannot download NVIDIA's pickles, so this module writes the same structure itself
from the weights of sg2dist networks: a top-level dict {G, D, G_ema, augment_pipe,
training_set_kwargs}; every network object reduced to a call of
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta {type: 'class',
version: 6, module_src, class_name, state}, where state is what a torch module's __dict__
holds (training, _parameters, _buffers, _non_persistent_buffers_set, the hook dicts,
_modules, its attributes, _init_args and _init_kwargs as dnnlib.util.EasyDict). Numbers the
official layers keep as numpy scalars (weight_gain, act_gain) are numpy scalars here too.

The names torch_utils.persistence and dnnlib.util exist only while a pickle is written:
stand-in modules in sys.modules for pickle's global lookup, removed afterwards.

`layout="stylegan3"` writes what stylegan3's StyleGAN2 code pickles instead: synthesis
init kwargs flattened into the Generator's, `fused_modconv_default` on every block.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sg2dist.config import ModelConfig

MODULE_SRC = "# the official networks.py would be here; it must never be executed\n"
FIR = torch.outer(torch.tensor([1.0, 3.0, 3.0, 1.0]), torch.tensor([1.0, 3.0, 3.0, 1.0])) / 64
SQRT2 = np.float64(math.sqrt(2))


def _reconstruct_persistent_obj(meta):
    """Named by the pickles; here it only rebuilds a Persistent (copy.deepcopy uses it)."""
    obj = Persistent.__new__(Persistent)
    obj.class_name, obj.module_src, obj.state = (
        meta["class_name"],
        meta["module_src"],
        meta["state"],
    )
    return obj


class EasyDict(dict):
    """Pickled under the official name dnnlib.util.EasyDict."""


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
EasyDict.__module__ = "dnnlib.util"


@contextlib.contextmanager
def official_names() -> Iterator[None]:
    """torch_utils.persistence and dnnlib.util as stand-in modules while pickling."""
    names = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")
    assert not any(name in sys.modules for name in names), "official code is imported"
    modules = {name: types.ModuleType(name) for name in names}
    modules["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj  # type: ignore[attr-defined]
    modules["dnnlib.util"].EasyDict = EasyDict  # type: ignore[attr-defined]
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


class Persistent:
    """One official network object: pickles as the persistence module's reconstruct call."""

    def __init__(
        self,
        class_name: str,
        attrs: dict[str, Any] | None = None,
        params: dict[str, torch.Tensor] | None = None,
        buffers: dict[str, torch.Tensor] | None = None,
        modules: dict[str, Persistent] | None = None,
        init_kwargs: dict[str, Any] | None = None,
        module_src: str = MODULE_SRC,
    ):
        self.class_name = class_name
        self.module_src = module_src
        self.state = {
            "training": False,
            "_parameters": OrderedDict(
                (k, torch.nn.Parameter(v.detach().clone(), requires_grad=False))
                for k, v in (params or {}).items()
            ),
            "_buffers": OrderedDict((k, v.detach().clone()) for k, v in (buffers or {}).items()),
            "_non_persistent_buffers_set": set(),
            "_backward_hooks": OrderedDict(),
            "_forward_hooks": OrderedDict(),
            "_forward_pre_hooks": OrderedDict(),
            "_state_dict_hooks": OrderedDict(),
            "_load_state_dict_pre_hooks": OrderedDict(),
            "_modules": OrderedDict(modules or {}),
            **(attrs or {}),
            "_init_args": (),
            "_init_kwargs": EasyDict(init_kwargs or {}),
        }

    def __reduce__(self):
        meta = {
            "type": "class",
            "version": 6,
            "module_src": self.module_src,
            "class_name": self.class_name,
            "state": self.state,
        }
        return _reconstruct_persistent_obj, (meta,)


# ---------------------------------------------------------------------------- layers


def fc(sd: dict, prefix: str, *, activation: str = "linear", lr_mult: float = 1.0) -> Persistent:
    weight = sd[f"{prefix}.weight"]
    return Persistent(
        "FullyConnectedLayer",
        attrs={
            "activation": activation,
            "weight_gain": np.float64(lr_mult / math.sqrt(weight.shape[1])),
            "bias_gain": lr_mult,
        },
        params={"weight": weight, "bias": sd[f"{prefix}.bias"]},
        init_kwargs={"activation": activation, "lr_multiplier": lr_mult},
    )


def conv(
    sd: dict,
    prefix: str,
    *,
    activation: str,
    conv_clamp: float | None,
    down: int = 1,
    trainable: bool = True,
) -> Persistent:
    weight = sd[f"{prefix}.weight"]
    bias = sd.get(f"{prefix}.bias")
    tensors = {"weight": weight, **({"bias": bias} if bias is not None else {})}
    return Persistent(
        "Conv2dLayer",
        attrs={
            "activation": activation,
            "up": 1,
            "down": down,
            "conv_clamp": conv_clamp,
            "padding": weight.shape[-1] // 2,
            "weight_gain": np.float64(1 / math.sqrt(weight[0].numel())),
            "act_gain": SQRT2 if activation == "lrelu" else np.float64(1.0),
            **({} if bias is not None else {"bias": None}),
        },
        # Freeze-D in the official code keeps a frozen layer's weights as buffers.
        params=tensors if trainable else None,
        buffers={"resample_filter": FIR, **({} if trainable else tensors)},
    )


def mapping(
    sd: dict, prefix: str, *, z_dim: int, c_dim: int, num_ws, layers: int, lr: float, beta
) -> Persistent:
    modules = {
        f"fc{i}": fc(sd, f"{prefix}.layers.{i}", activation="lrelu", lr_mult=lr)
        for i in range(layers)
    }
    if c_dim > 0:
        modules = {"embed": fc(sd, f"{prefix}.embed"), **modules}
    w_dim = sd[f"{prefix}.layers.{layers - 1}.weight"].shape[0]
    return Persistent(
        "MappingNetwork",
        attrs={
            "z_dim": z_dim,
            "c_dim": c_dim,
            "w_dim": w_dim,
            "num_ws": num_ws,
            "num_layers": layers,
            "w_avg_beta": beta,
        },
        buffers={"w_avg": sd[f"{prefix}.w_avg"]} if beta is not None else None,
        modules=modules,
        init_kwargs={"num_layers": layers},
    )


def synthesis_layer(sd: dict, prefix: str, res: int, *, up: int, clamp) -> Persistent:
    return Persistent(
        "SynthesisLayer",
        attrs={
            "resolution": res,
            "up": up,
            "use_noise": True,
            "activation": "lrelu",
            "conv_clamp": clamp,
            "padding": 1,
            "act_gain": SQRT2,
        },
        params={k: sd[f"{prefix}.{k}"] for k in ("weight", "noise_strength", "bias")},
        buffers={"resample_filter": FIR, "noise_const": sd[f"{prefix}.noise_const"]},
        modules={"affine": fc(sd, f"{prefix}.affine")},
    )


def generator(G: torch.nn.Module, model: ModelConfig, layout: str) -> Persistent:
    sd = G.state_dict()
    clamp, res_max = model.conv_clamp, model.resolution
    fp16_from = max(2 ** (int(math.log2(res_max)) + 1 - model.num_fp16_res), 8)
    blocks, num_ws = {}, 0
    for i in range(2, int(math.log2(res_max)) + 1):
        res, p = 2**i, f"synthesis.blocks.b{2**i}"
        modules = (
            {} if res == 4 else {"conv0": synthesis_layer(sd, f"{p}.conv0", res, up=2, clamp=clamp)}
        )
        modules["conv1"] = synthesis_layer(sd, f"{p}.conv1", res, up=1, clamp=clamp)
        torgb_weight = sd[f"{p}.torgb.weight"]
        modules["torgb"] = Persistent(
            "ToRGBLayer",
            attrs={
                "conv_clamp": clamp,
                "weight_gain": np.float64(1 / math.sqrt(torgb_weight.shape[1])),
            },
            params={"weight": torgb_weight, "bias": sd[f"{p}.torgb.bias"]},
            modules={"affine": fc(sd, f"{p}.torgb.affine")},
        )
        attrs = {
            "in_channels": 0 if res == 4 else sd[f"{p}.conv0.weight"].shape[1],
            "resolution": res,
            "is_last": res == res_max,
            "architecture": "skip",
            "use_fp16": model.num_fp16_res > 0 and res >= fp16_from,
            "channels_last": False,
            "num_conv": 1 if res == 4 else 2,
            "num_torgb": 1,
        }
        if layout == "stylegan3":
            attrs["fused_modconv_default"] = "inference_only"
        num_ws += attrs["num_conv"]
        blocks[f"b{res}"] = Persistent(
            "SynthesisBlock",
            attrs=attrs,
            params={"const": sd[f"{p}.const"]} if res == 4 else None,
            buffers={"resample_filter": FIR},
            modules=modules,
        )
    num_ws += 1
    synthesis_kwargs = {
        "channel_base": model.channel_base,
        "channel_max": model.channel_max,
        "num_fp16_res": model.num_fp16_res,
        "conv_clamp": clamp,
    }
    dims = {
        "z_dim": model.z_dim,
        "c_dim": model.c_dim,
        "w_dim": model.w_dim,
        "img_resolution": res_max,
        "img_channels": model.img_channels,
    }
    mapping_kwargs = EasyDict(num_layers=model.map_layers)
    if layout == "stylegan3":
        init_kwargs = {**dims, "mapping_kwargs": mapping_kwargs, **synthesis_kwargs}
    else:
        init_kwargs = {
            **dims,
            "mapping_kwargs": mapping_kwargs,
            "synthesis_kwargs": EasyDict(synthesis_kwargs),
        }
    return Persistent(
        "Generator",
        attrs={**dims, "num_ws": num_ws},
        modules={
            "synthesis": Persistent(
                "SynthesisNetwork",
                attrs={
                    "w_dim": model.w_dim,
                    "img_resolution": res_max,
                    "img_channels": model.img_channels,
                    "num_ws": num_ws,
                },
                modules=blocks,
            ),
            "mapping": mapping(
                sd,
                "mapping",
                z_dim=model.z_dim,
                c_dim=model.c_dim,
                num_ws=num_ws,
                layers=model.map_layers,
                lr=model.map_lr_mult,
                beta=model.w_avg_beta,
            ),
        },
        init_kwargs=init_kwargs,
    )


def discriminator(D: torch.nn.Module, model: ModelConfig, freeze_layers: int = 0) -> Persistent:
    sd, clamp, res_max = D.state_dict(), model.conv_clamp, model.resolution
    fp16_from = max(2 ** (int(math.log2(res_max)) + 1 - model.num_fp16_res), 8)
    modules: dict[str, Persistent] = {}
    layer_idx = 0

    def trainable() -> bool:
        nonlocal layer_idx
        layer_idx += 1
        return layer_idx - 1 >= freeze_layers

    res = res_max
    while res > 4:
        p = f"blocks.b{res}"
        block_modules = {}
        first = layer_idx
        if res == res_max:
            block_modules["fromrgb"] = conv(
                sd, "fromrgb", activation="lrelu", conv_clamp=clamp, trainable=trainable()
            )
        block_modules["conv0"] = conv(
            sd, f"{p}.conv0", activation="lrelu", conv_clamp=clamp, trainable=trainable()
        )
        block_modules["conv1"] = conv(
            sd, f"{p}.conv1", activation="lrelu", conv_clamp=clamp, down=2, trainable=trainable()
        )
        block_modules["skip"] = conv(
            sd, f"{p}.skip", activation="linear", conv_clamp=None, down=2, trainable=trainable()
        )
        modules[f"b{res}"] = Persistent(
            "DiscriminatorBlock",
            attrs={
                "in_channels": 0 if res == res_max else sd[f"{p}.conv0.weight"].shape[1],
                "resolution": res,
                "first_layer_idx": first,
                "architecture": "resnet",
                "use_fp16": model.num_fp16_res > 0 and res >= fp16_from,
                "channels_last": False,
                "num_layers": layer_idx - first,
            },
            buffers={"resample_filter": FIR},
            modules=block_modules,
        )
        res //= 2
    cmap_dim = sd["epilogue.out.weight"].shape[0] if model.c_dim > 0 else 0
    if model.c_dim > 0:
        modules["mapping"] = mapping(
            sd, "mapping", z_dim=0, c_dim=model.c_dim, num_ws=None, layers=8, lr=0.01, beta=None
        )
    epilogue = {
        "mbstd": Persistent(
            "MinibatchStdLayer",
            attrs={"group_size": model.mbstd_group, "num_channels": model.mbstd_features},
        ),
        "conv": conv(sd, "epilogue.conv", activation="lrelu", conv_clamp=clamp),
        "fc": fc(sd, "epilogue.fc", activation="lrelu"),
        "out": fc(sd, "epilogue.out"),
    }
    if model.mbstd_features == 0:
        del epilogue["mbstd"]
    modules["b4"] = Persistent(
        "DiscriminatorEpilogue",
        attrs={"cmap_dim": cmap_dim, "resolution": 4, "architecture": "resnet"},
        modules=epilogue,
    )
    return Persistent(
        "Discriminator",
        attrs={"c_dim": model.c_dim, "img_resolution": res_max, "img_channels": model.img_channels},
        modules=modules,
        init_kwargs={
            "c_dim": model.c_dim,
            "img_resolution": res_max,
            "img_channels": model.img_channels,
            "channel_base": model.channel_base,
            "channel_max": model.channel_max,
            "num_fp16_res": model.num_fp16_res,
            "conv_clamp": clamp,
            "block_kwargs": EasyDict(freeze_layers=freeze_layers),
            "mapping_kwargs": EasyDict(),
            "epilogue_kwargs": EasyDict(mbstd_group_size=model.mbstd_group),
        },
    )


def augment_pipe(p: float) -> Persistent:
    bgc = {
        k: 1.0
        for k in (
            "xflip",
            "rotate90",
            "xint",
            "scale",
            "rotate",
            "aniso",
            "xfrac",
            "brightness",
            "contrast",
            "lumaflip",
            "hue",
            "saturation",
        )
    }
    return Persistent(
        "AugmentPipe",
        attrs={**bgc, "imgfilter_bands": [1, 1, 1, 1]},
        buffers={"p": torch.tensor(p), "Hz_geom": torch.randn(12)},
        init_kwargs=bgc,
    )


# ---------------------------------------------------------------------------- files


def official_snapshot(
    G: torch.nn.Module,
    D: torch.nn.Module,
    G_ema: torch.nn.Module,
    model: ModelConfig,
    *,
    augment_p: float | None = 0.25,
    xflip: bool = True,
    layout: str = "ada",
    freeze_layers: int = 0,
) -> dict[str, Any]:
    """The top-level dict of an official network-snapshot-*.pkl."""
    return {
        "G": generator(G, model, layout),
        "D": discriminator(D, model, freeze_layers),
        "G_ema": generator(G_ema, model, layout),
        "augment_pipe": augment_pipe(augment_p) if augment_p is not None else None,
        "training_set_kwargs": {
            "class_name": "training.dataset.ImageFolderDataset",
            "path": "/data/dataset.zip",
            "use_labels": model.c_dim > 0,
            "max_size": 1000,
            "xflip": xflip,
            "resolution": model.resolution,
        },
    }


def dump_official(obj: Any, path: Path, protocol: int = 4) -> Path:
    """Pickle `obj` (with Persistent objects and EasyDicts inside) to `path`."""
    with official_names():
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def write_official_pickle(
    path: Path, G, D, G_ema, model: ModelConfig, *, protocol: int = 4, **snapshot_kwargs
) -> Path:
    return dump_official(official_snapshot(G, D, G_ema, model, **snapshot_kwargs), path, protocol)


# ---------------------------------------------------------------------------- test networks


def random_networks(model: ModelConfig, seed: int = 0):
    """sg2dist G, D, G_ema with every tensor mattering: random biases, noise strengths and
    w_avg (they start at zero or one), and a G_ema that differs from G."""
    from sg2dist.model import build_networks

    torch.manual_seed(seed)
    G, D = build_networks(model)
    G_ema, _ = build_networks(model)
    G_ema.load_state_dict(G.state_dict())
    with torch.no_grad():
        for net in (G, D, G_ema):
            for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
                if name.endswith(("bias", "noise_strength", "w_avg")):
                    tensor.add_(torch.randn_like(tensor) * 0.5)
    return G.eval(), D.eval(), G_ema.eval()
