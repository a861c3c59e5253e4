"""Official StyleGAN2 networks -> sg2dist: the model config and the weights, by rule.

The input is what `unpickler.load_official` returns: a dict with G, D, G_ema (OfficialObject
trees), augment_pipe and training_set_kwargs. Where each setting comes from:

- From the objects' states, which hold every value the official code computes with (the
  init kwargs leave out defaults, and the defaults differ between stylegan2-ada-pytorch and
  stylegan3's StyleGAN2 code, e.g. conv_clamp and w_avg_beta): resolution, image channels,
  z/w dims, labels, mapping depth and lr multiplier, w_avg_beta, conv_clamp, the fp16
  blocks, minibatch-std group and features.
- From the init kwargs: channel_base and channel_max (not kept in the state), then checked
  against every tensor's shape.

Weights are renamed by the rules below; sg2dist stores every weight exactly as the official
code does (equalized-LR weights as N(0, 1) / lr_mult with the gain applied at run time,
raw biases with lr_mult applied at run time, the affine biases initialised to 1, noise
strength and noise_const, w_avg), so values are copied unchanged. The FIR filter buffers
(`resample_filter`) are checked to be the [1, 3, 3, 1] filter that sg2dist computes itself.
Every official tensor must land on a sg2dist tensor of the same shape and every sg2dist
tensor must be filled: anything else is an error naming the tensor.

What sg2dist cannot build (another generator or discriminator architecture, activation,
filter, mapping depth of D, or settings that differ between G and D where sg2dist shares
one model key) is one error naming the setting and both values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from sg2dist.config import ModelConfig
from sg2dist.errors import UserError
from sg2dist.interop.unpickler import OfficialObject
from sg2dist.model import build_networks
from sg2dist.model.discriminator import LABEL_MAPPING_LAYERS
from sg2dist.model.generator import channels_per_resolution, fp16_min_resolution
from sg2dist.model.layers import fir_filter

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of stylegan2-ada-pytorch and stylegan3
DEFAULT_CHANNEL_BASE = 32768  # the official defaults when the init kwargs leave them out
DEFAULT_CHANNEL_MAX = 512
TF_MBSTD_GROUP = 4  # what TensorFlow StyleGAN2 trained with when a converted D records None

STYLEGAN2_CLASSES = {
    "Generator",
    "MappingNetwork",
    "FullyConnectedLayer",
    "SynthesisNetwork",
    "SynthesisBlock",
    "SynthesisLayer",
    "ToRGBLayer",
    "Conv2dLayer",
    "Discriminator",
    "DiscriminatorBlock",
    "DiscriminatorEpilogue",
    "MinibatchStdLayer",
}
STYLEGAN3_CLASSES = {"SynthesisInput"}

# official tensor name -> sg2dist state_dict key
MAPPING_RULES = (
    (r"mapping\.fc(\d+)\.(weight|bias)", r"mapping.layers.\1.\2"),
    (r"mapping\.(embed\.weight|embed\.bias|w_avg)", r"mapping.\1"),
)
G_RULES = (*MAPPING_RULES, (r"synthesis\.(b\d+)\.(.+)", r"synthesis.blocks.\1.\2"))


def d_rules(img_resolution: int) -> tuple[tuple[str, str], ...]:
    return (
        *MAPPING_RULES,
        (rf"b{img_resolution}\.fromrgb\.(weight|bias)", r"fromrgb.\1"),  # inside the top block
        (r"b4\.(conv|fc|out)\.(weight|bias)", r"epilogue.\1.\2"),  # b4 is the epilogue
        (r"(b\d+)\.(conv0|conv1|skip)\.(weight|bias)", r"blocks.\1.\2.\3"),
    )


FILTER_NAME = re.compile(r"(?:.+\.)?resample_filter")


@dataclass
class ImportedNetworks:
    """An official pickle converted: sg2dist's model config, the G, D and G_ema state dicts,
    and what else the pickle says (for meta.json "imported"); `notes` are printed."""

    model: ModelConfig
    G: dict[str, torch.Tensor]
    D: dict[str, torch.Tensor]
    G_ema: dict[str, torch.Tensor]
    info: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def convert_official(top: Any, source: str) -> ImportedNetworks:
    """The sg2dist equivalent of an official network pickle's top-level dict."""
    if not isinstance(top, dict) or not all(
        isinstance(top.get(key), OfficialObject) for key in ("G", "D", "G_ema")
    ):
        raise UserError(
            f"{source} holds no G, D and G_ema networks; pass a network pickle written by "
            "stylegan2-ada-pytorch or stylegan3 (e.g. network-snapshot-*.pkl)"
        )
    nets = {key: top[key] for key in ("G", "D", "G_ema")}
    for key, net in nets.items():
        _check_classes(key, net)
    notes: list[str] = []
    model = infer_model_config(nets["G_ema"], nets["D"], notes)
    for key in ("G", "G_ema"):
        _check_generator(key, nets[key], model)
    _check_discriminator(nets["D"], model)
    with torch.device("meta"):  # shapes and names only, no memory
        G_meta, D_meta = build_networks(model)
    G_target, D_target = G_meta.state_dict(), D_meta.state_dict()
    return ImportedNetworks(
        model=model,
        G=map_tensors("G", nets["G"], G_RULES, G_target),
        D=map_tensors("D", nets["D"], d_rules(model.resolution), D_target),
        G_ema=map_tensors("G_ema", nets["G_ema"], G_RULES, G_target),
        info=_pickle_facts(top, nets["D"]),
        notes=notes,
    )


# ---------------------------------------------------------------------------- architecture


def _walk(obj: OfficialObject, path: str = "") -> list[tuple[str, OfficialObject]]:
    found = [(path, obj)]
    for name, child in obj.children().items():
        if not isinstance(child, OfficialObject):
            raise UserError(
                f"module {path}{name} of the pickle is a {type(child).__name__}, not a network "
                "object; the file is not an official StyleGAN2 network pickle"
            )
        found += _walk(child, f"{path}{name}.")
    return found


def _check_classes(net_name: str, net: OfficialObject) -> None:
    if net.version != PERSISTENCE_VERSION:
        raise UserError(
            f"{net_name} was pickled by torch_utils.persistence version {net.version}; "
            f"sg2dist reads version {PERSISTENCE_VERSION} (stylegan2-ada-pytorch, stylegan3)"
        )
    modules = _walk(net)
    names = {obj.class_name for _, obj in modules}
    if names & STYLEGAN3_CLASSES:
        raise UserError(
            f"{net_name} is a StyleGAN3 (alias-free, stylegan3-t/r) network "
            f"({', '.join(sorted(names & STYLEGAN3_CLASSES))}); sg2dist imports StyleGAN2 "
            "networks only (stylegan2-ada-pytorch, or stylegan3's --cfg=stylegan2)"
        )
    for path, obj in modules:
        if obj.class_name not in STYLEGAN2_CLASSES:
            raise UserError(
                f"{net_name}.{path.rstrip('.') or '<root>'} is a {obj.class_name}, which is not "
                "part of StyleGAN2; sg2dist imports StyleGAN2 networks only"
            )
    expected = "Discriminator" if net_name == "D" else "Generator"
    if net.class_name != expected:
        raise UserError(f"{net_name} of the pickle is a {net.class_name}, not a {expected}")


def _state(obj: OfficialObject, key: str, where: str) -> Any:
    if key not in obj.state:
        raise UserError(f"{where} has no '{key}' in its state; the pickle is not readable")
    return obj.state[key]


def _child(obj: OfficialObject, name: str, where: str) -> OfficialObject:
    child = obj.children().get(name)
    if child is None:
        raise UserError(
            f"{where} has no '{name}'; the network differs from StyleGAN2 config F "
            "(skip generator, resnet discriminator)"
        )
    return child


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _expect(where: str, key: str, value: Any, wanted: Any, who: str) -> None:
    if isinstance(wanted, float) or isinstance(value, float):
        same = value is not None and wanted is not None and math.isclose(float(value), wanted)
        same = same or (value is None and wanted is None)
    else:
        same = value == wanted
    if not same:
        raise UserError(f"{where}: {key}={value!r}, but {who} {key}={wanted!r}")


def _init_kwargs(obj: OfficialObject) -> dict[str, Any]:
    kwargs = obj.state.get("_init_kwargs") or {}
    return dict(kwargs) if isinstance(kwargs, dict) else {}


# ---------------------------------------------------------------------------- model config


def infer_model_config(G: OfficialObject, D: OfficialObject, notes: list[str]) -> ModelConfig:
    """sg2dist's ModelConfig for the official G (G_ema) and D."""
    resolution = int(_state(G, "img_resolution", "G"))
    synthesis = _child(G, "synthesis", "G")
    mapping = _child(G, "mapping", "G")
    map_layers = int(_state(mapping, "num_layers", "G.mapping"))
    if map_layers < 1:
        raise UserError("G.mapping has no layers; sg2dist's mapping network needs at least one")
    w_avg_beta = _state(mapping, "w_avg_beta", "G.mapping")
    if w_avg_beta is None:
        raise UserError("G.mapping tracks no w_avg (w_avg_beta=None); sg2dist needs w_avg")
    kwargs = _init_kwargs(G)
    synthesis_kwargs = kwargs.get("synthesis_kwargs") or kwargs  # stylegan3 flattens them
    model = ModelConfig(
        resolution=resolution,
        img_channels=int(_state(G, "img_channels", "G")),
        z_dim=int(_state(G, "z_dim", "G")),
        w_dim=int(_state(G, "w_dim", "G")),
        c_dim=int(_state(G, "c_dim", "G")),
        map_layers=map_layers,
        map_lr_mult=float(
            _state(_child(mapping, "fc0", "G.mapping"), "bias_gain", "G.mapping.fc0")
        ),
        w_avg_beta=float(w_avg_beta),
        channel_base=int(synthesis_kwargs.get("channel_base", DEFAULT_CHANNEL_BASE)),
        channel_max=int(synthesis_kwargs.get("channel_max", DEFAULT_CHANNEL_MAX)),
        conv_clamp=_optional_float(
            _state(_child(_child(synthesis, "b4", "G.synthesis"), "conv1", "b4"), "conv_clamp", "G")
        ),
        num_fp16_res=_num_fp16_res(G, D, resolution, synthesis_kwargs),
    )
    _read_mbstd(D, model, notes)
    d_kwargs = _init_kwargs(D)
    for key in ("channel_base", "channel_max"):
        if key in d_kwargs:
            _expect("D", key, int(d_kwargs[key]), getattr(model, key), "G (shared) has")
    model.validate()
    return model


def _fp16_blocks(net: OfficialObject, where: str) -> set[int]:
    return {
        int(_state(block, "resolution", f"{where}.{name}"))
        for name, block in net.children().items()
        if block.class_name in ("SynthesisBlock", "DiscriminatorBlock")
        and block.state.get("use_fp16")
    }


def _num_fp16_res(
    G: OfficialObject, D: OfficialObject, resolution: int, synthesis_kwargs: dict[str, Any]
) -> int:
    """sg2dist's num_fp16_res that runs exactly the blocks the pickle runs in fp16; the recorded
    value when it does (the official formula is the same), else the count of fp16 blocks."""
    G_fp16 = _fp16_blocks(_child(G, "synthesis", "G"), "G.synthesis")
    D_fp16 = _fp16_blocks(D, "D")

    def blocks(num_fp16_res: int, lowest: int) -> set[int]:
        first = fp16_min_resolution(resolution, num_fp16_res)
        levels = range(int(math.log2(lowest)), int(math.log2(resolution)) + 1)
        return {2**i for i in levels if num_fp16_res > 0 and 2**i >= first}

    recorded = synthesis_kwargs.get("num_fp16_res")
    for candidate in ([int(recorded)] if recorded is not None else []) + [len(G_fp16)]:
        if blocks(candidate, 4) == G_fp16:
            if blocks(candidate, 8) != D_fp16:
                raise UserError(
                    f"D runs the blocks {sorted(D_fp16)} px in fp16 and G {sorted(G_fp16)} px; "
                    "sg2dist uses one model.num_fp16_res for both"
                )
            return candidate
    raise UserError(
        f"G runs the blocks {sorted(G_fp16)} px in fp16, which is not the N highest "
        "resolutions; sg2dist's model.num_fp16_res cannot express it"
    )


def _read_mbstd(D: OfficialObject, model: ModelConfig, notes: list[str]) -> None:
    epilogue = _child(D, "b4", "D")
    mbstd = epilogue.children().get("mbstd")
    if mbstd is None:
        model.mbstd_features = 0
        return
    model.mbstd_features = int(_state(mbstd, "num_channels", "D.b4.mbstd"))
    group = _state(mbstd, "group_size", "D.b4.mbstd")
    if group is None:
        # A D converted from TensorFlow without a recorded group: the official PyTorch code
        # then groups each GPU's whole batch; TensorFlow StyleGAN2 trained with groups of 4.
        model.mbstd_group = TF_MBSTD_GROUP
        notes.append(
            f"D's minibatch-std group is unset (whole batch per GPU in the official PyTorch "
            f"code); using model.mbstd_group={TF_MBSTD_GROUP}, what TensorFlow StyleGAN2 "
            f"trained with (the same as the official code at train.batch_gpu={TF_MBSTD_GROUP})"
        )
    else:
        model.mbstd_group = int(group)


# ---------------------------------------------------------------------------- layer checks

# Who asks for a value, in the error lines of `_expect`.
SG2_G = "sg2dist's generator needs"
SG2_D = "sg2dist's discriminator needs"
SAME_NET = "the rest of the network has"
MODEL_FP16 = "model.num_fp16_res read from G_ema gives"


def _check_fc(where: str, fc: OfficialObject, activation: str, lr_mult: float, who: str) -> None:
    _expect(where, "activation", fc.state.get("activation"), activation, who)
    _expect(where, "lr_multiplier", _optional_float(fc.state.get("bias_gain")), lr_mult, who)


def _check_mapping(
    where: str, mapping: OfficialObject, num_layers: int, lr_mult: float, who: str
) -> None:
    _expect(where, "num_layers", int(_state(mapping, "num_layers", where)), num_layers, who)
    for i in range(num_layers):
        _check_fc(f"{where}.fc{i}", _child(mapping, f"fc{i}", where), "lrelu", lr_mult, who)
    embed = mapping.children().get("embed")
    if embed is not None:
        _check_fc(f"{where}.embed", embed, "linear", 1.0, who)


def _check_generator(net_name: str, G: OfficialObject, model: ModelConfig) -> None:
    synthesis = _child(G, "synthesis", net_name)
    first_fp16 = fp16_min_resolution(model.resolution, model.num_fp16_res)
    for i in range(2, int(math.log2(model.resolution)) + 1):
        res = 2**i
        where = f"{net_name}.synthesis.b{res}"
        block = _child(synthesis, f"b{res}", f"{net_name}.synthesis")
        _expect(where, "architecture", block.state.get("architecture"), "skip", SG2_G)
        use_fp16 = bool(block.state.get("use_fp16"))
        wanted_fp16 = model.num_fp16_res > 0 and res >= first_fp16
        _expect(where, "use_fp16", use_fp16, wanted_fp16, MODEL_FP16)
        for name in ("conv0", "conv1") if res > 4 else ("conv1",):
            layer, at = _child(block, name, where), f"{where}.{name}"
            _expect(at, "activation", layer.state.get("activation"), "lrelu", SG2_G)
            _expect(at, "use_noise", layer.state.get("use_noise"), True, SG2_G)
            clamp = _optional_float(layer.state.get("conv_clamp"))
            _expect(at, "conv_clamp", clamp, model.conv_clamp, SAME_NET)
        torgb = _child(block, "torgb", where)
        clamp = _optional_float(torgb.state.get("conv_clamp"))
        _expect(f"{where}.torgb", "conv_clamp", clamp, model.conv_clamp, SAME_NET)
    mapping = _child(G, "mapping", net_name)
    where = f"{net_name}.mapping"
    _check_mapping(where, mapping, model.map_layers, model.map_lr_mult, SAME_NET)
    w_avg_beta = _optional_float(mapping.state.get("w_avg_beta"))
    _expect(where, "w_avg_beta", w_avg_beta, model.w_avg_beta, SAME_NET)


def _check_conv(where: str, conv: OfficialObject, activation: str, clamp: float | None) -> None:
    _expect(where, "activation", conv.state.get("activation"), activation, SG2_D)
    value = _optional_float(conv.state.get("conv_clamp"))
    # sg2dist's D takes G's model.conv_clamp (the official code clamps neither skip).
    _expect(where, "conv_clamp", value, clamp, SG2_D)


def _check_discriminator(D: OfficialObject, model: ModelConfig) -> None:
    first_fp16 = fp16_min_resolution(model.resolution, model.num_fp16_res)
    res = model.resolution
    while res > 4:
        where = f"D.b{res}"
        block = _child(D, f"b{res}", "D")
        _expect(where, "architecture", block.state.get("architecture"), "resnet", SG2_D)
        use_fp16 = bool(block.state.get("use_fp16"))
        _expect(
            where, "use_fp16", use_fp16, model.num_fp16_res > 0 and res >= first_fp16, MODEL_FP16
        )
        layers = {"fromrgb": "lrelu"} if res == model.resolution else {}
        for name, activation in {**layers, "conv0": "lrelu", "conv1": "lrelu"}.items():
            _check_conv(f"{where}.{name}", _child(block, name, where), activation, model.conv_clamp)
        _check_conv(f"{where}.skip", _child(block, "skip", where), "linear", None)
        res //= 2
    epilogue = _child(D, "b4", "D")
    _expect("D.b4", "architecture", epilogue.state.get("architecture"), "resnet", SG2_D)
    cmap_dim = channels_per_resolution(4, model.channel_base, model.channel_max)
    cmap = int(_state(epilogue, "cmap_dim", "D.b4"))
    _expect("D.b4", "cmap_dim", cmap, cmap_dim if model.c_dim > 0 else 0, SG2_D)
    _check_conv("D.b4.conv", _child(epilogue, "conv", "D.b4"), "lrelu", model.conv_clamp)
    _check_fc("D.b4.fc", _child(epilogue, "fc", "D.b4"), "lrelu", 1.0, SG2_D)
    _check_fc("D.b4.out", _child(epilogue, "out", "D.b4"), "linear", 1.0, SG2_D)
    if model.c_dim > 0:
        mapping = _child(D, "mapping", "D")
        _check_mapping("D.mapping", mapping, LABEL_MAPPING_LAYERS, 0.01, SG2_D)


# ---------------------------------------------------------------------------- tensors


def official_tensors(net: OfficialObject) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of an official network, by its dotted name."""
    tensors: dict[str, torch.Tensor] = {}
    for path, obj in _walk(net):
        for name, value in obj.tensors().items():
            if not isinstance(value, torch.Tensor):
                raise UserError(
                    f"{path}{name} of the pickle is a {type(value).__name__}, not a tensor"
                )
            tensors[f"{path}{name}"] = value
    return tensors


def _rename(name: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def _check_filter(where: str, value: torch.Tensor) -> None:
    expected = fir_filter()
    if value.shape != expected.shape or not torch.allclose(value.float(), expected, atol=1e-6):
        raise UserError(
            f"{where} is not the [1, 3, 3, 1] FIR filter of StyleGAN2; sg2dist supports only it"
        )


def map_tensors(
    net_name: str,
    net: OfficialObject,
    rules: tuple[tuple[str, str], ...],
    target: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """sg2dist's state dict for `target` (names and shapes) filled from the official tensors."""
    mapped: dict[str, torch.Tensor] = {}
    for name, value in official_tensors(net).items():
        if FILTER_NAME.fullmatch(name):
            _check_filter(f"{net_name}.{name}", value)
            continue
        key = _rename(name, rules)
        if key is None or key not in target:
            raise UserError(
                f"{net_name}.{name} {list(value.shape)} has no counterpart in sg2dist's "
                f"{net_name}; the network differs from StyleGAN2 config F"
            )
        if tuple(value.shape) != tuple(target[key].shape):
            raise UserError(
                f"{net_name}.{name} has shape {list(value.shape)}, but sg2dist's {key} is "
                f"{list(target[key].shape)} for the settings read from the pickle"
            )
        mapped[key] = value.detach().to(target[key].dtype).clone()
    missing = sorted(set(target) - set(mapped))
    if missing:
        raise UserError(
            f"{net_name} of the pickle has no tensor for sg2dist's {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return mapped


# ---------------------------------------------------------------------------- other facts


def _json_scalar(value: Any) -> Any:
    """A JSON-safe copy of a scalar setting (numpy numbers become Python numbers)."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return None


def _pickle_facts(top: dict[str, Any], D: OfficialObject) -> dict[str, Any]:
    """What the ADA and fine-tuning code may want to know: the augmentation strength and
    settings, the dataset's x-flips and labels, Freeze-D of the source run."""
    pipe = top.get("augment_pipe")
    augment_p, augment_kwargs = None, {}
    if isinstance(pipe, OfficialObject):
        p = pipe.tensors().get("p")
        augment_p = float(p) if isinstance(p, torch.Tensor) and p.numel() == 1 else None
        augment_kwargs = {
            key: _json_scalar(value)
            for key, value in _init_kwargs(pipe).items()
            if _json_scalar(value) is not None
        }
    dataset = top.get("training_set_kwargs")
    dataset = dict(dataset) if isinstance(dataset, dict) else {}
    block_kwargs = _init_kwargs(D).get("block_kwargs") or {}
    return {
        "augment_p": augment_p,
        "augment_pipe": augment_kwargs,
        "xflip": _json_scalar(dataset.get("xflip")),
        "use_labels": _json_scalar(dataset.get("use_labels")),
        "dataset_resolution": _json_scalar(dataset.get("resolution")),
        "dataset_max_size": _json_scalar(dataset.get("max_size")),
        "freeze_d": int(block_kwargs.get("freeze_layers", 0) or 0),
        "ignored_keys": sorted(
            str(key)
            for key in top
            if key not in ("G", "D", "G_ema", "augment_pipe", "training_set_kwargs")
        ),
    }
