"""Official networks -> sg2dist: the inferred config, the weights, and what is refused.

The pickles come from tests/support/official_pickle.py, which writes the official structure
from the weights of sg2dist networks; imported back, they must compute exactly what the
networks they were written from compute.
"""

from __future__ import annotations

import copy

import pytest
import torch
from support.official_pickle import (
    Persistent,
    dump_official,
    official_snapshot,
    random_networks,
)
from support.tiny import tiny_model_config

from sg2dist.errors import UserError
from sg2dist.interop import read_network_pickle
from sg2dist.model import build_networks

MODELS = {
    "unconditional RGB": {},
    "conditional, fp16 blocks, conv_clamp": {
        "c_dim": 4,
        "map_layers": 8,
        "num_fp16_res": 2,
        "conv_clamp": 256.0,
        "mbstd_group": 2,
    },
    "grayscale 32 px, no mbstd": {"resolution": 32, "img_channels": 1, "mbstd_features": 0},
}
# stylegan3's StyleGAN2 code pickles another layout of init kwargs and block attributes.
CASES = [(name, "ada") for name in MODELS] + [("conditional, fp16 blocks, conv_clamp", "stylegan3")]


def outputs(G, D, model, seed=0):
    """G's images for fixed z, c (const noise, truncation too) and D's logits on them."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, model.z_dim, generator=g)
    c = torch.eye(max(model.c_dim, 1))[torch.arange(4) % max(model.c_dim, 1)][:, : model.c_dim]
    with torch.no_grad():
        img = G(z, c, noise_mode="const")
        truncated = G(z, c, truncation_psi=0.5, noise_mode="const")
        return img, truncated, D(img, c)


def imported_networks(imported):
    G, D = build_networks(imported.model)
    G_ema, _ = build_networks(imported.model)
    G.load_state_dict(imported.G)
    D.load_state_dict(imported.D)
    G_ema.load_state_dict(imported.G_ema)
    return G.eval(), D.eval(), G_ema.eval()


@pytest.mark.parametrize(("name", "layout"), CASES)
def test_imported_networks_compute_exactly_what_they_were_written_from(tmp_path, name, layout):
    model = tiny_model_config(**MODELS[name])
    G, D, G_ema = random_networks(model, seed=1)
    path = dump_official(official_snapshot(G, D, G_ema, model, layout=layout), tmp_path / "n.pkl")
    imported = read_network_pickle(str(path))
    assert imported.model == model  # every setting read back from the pickle
    G2, D2, G_ema2 = imported_networks(imported)
    for mine, theirs in ((G2, G), (G_ema2, G_ema)):
        for a, b in zip(outputs(mine, D2, model), outputs(theirs, D, model), strict=True):
            assert torch.equal(a, b)
    # G and G_ema are told apart (G_ema is what generate uses).
    assert not torch.equal(outputs(G2, D2, model)[0], outputs(G_ema2, D2, model)[0])


def test_what_the_pickle_says_about_its_training_is_kept(tmp_path):
    model = tiny_model_config(c_dim=3)
    nets = random_networks(model)
    snapshot = official_snapshot(*nets, model, augment_p=0.375, xflip=False, freeze_layers=5)
    snapshot["progress"] = {"cur_nimg": 5}  # a key sg2dist does not use is listed
    imported = read_network_pickle(str(dump_official(snapshot, tmp_path / "n.pkl")))
    info = imported.info
    assert info["augment_p"] == 0.375 and info["augment_pipe"]["xflip"] == 1.0
    assert (info["xflip"], info["use_labels"], info["dataset_resolution"]) == (False, True, 16)
    assert info["freeze_d"] == 5 and info["ignored_keys"] == ["progress"]
    assert info["source_bytes"] == (tmp_path / "n.pkl").stat().st_size
    # Frozen official layers keep their weights as buffers: imported all the same.
    _, D2, _ = imported_networks(imported)
    assert torch.equal(outputs(nets[2], D2, model)[2], outputs(nets[2], nets[1], model)[2])
    no_pipe = official_snapshot(*nets, model, augment_p=None)
    info = read_network_pickle(str(dump_official(no_pipe, tmp_path / "m.pkl"))).info
    assert info["augment_p"] is None and info["augment_pipe"] == {}


def test_a_d_without_a_recorded_mbstd_group_gets_4_with_a_note(tmp_path):
    model = tiny_model_config()
    snapshot = official_snapshot(*random_networks(model), model)
    snapshot["D"].state["_modules"]["b4"].state["_modules"]["mbstd"].state["group_size"] = None
    imported = read_network_pickle(str(dump_official(snapshot, tmp_path / "n.pkl")))
    assert imported.model.mbstd_group == 4
    assert "minibatch-std group is unset" in imported.notes[0]


def module(snapshot, net: str, path: str) -> Persistent:
    obj = snapshot[net]
    for name in path.split(".") if path else []:
        obj = obj.state["_modules"][name]
    return obj


def stylegan3_generator(snapshot):
    """A G shaped like stylegan3-t: an input layer and L0..Ln synthesis layers."""
    synthesis = module(snapshot, "G_ema", "synthesis")
    synthesis.state["_modules"] = {
        "input": Persistent("SynthesisInput", attrs={"sampling_rate": 16.0}),
        "L0_36_32": Persistent("SynthesisLayer", attrs={"is_torgb": False}),
    }


def set_state(net: str, path: str, key: str, value):
    def change(snapshot):
        module(snapshot, net, path).state[key] = value

    return change


def add_tensor(net: str, path: str, name: str):
    def change(snapshot):
        module(snapshot, net, path).state["_parameters"][name] = torch.zeros(3)

    return change


def drop_buffer(net: str, path: str, name: str):
    def change(snapshot):
        del module(snapshot, net, path).state["_buffers"][name]

    return change


REFUSED = {
    "StyleGAN3": (stylegan3_generator, "G_ema is a StyleGAN3 .*SynthesisInput.*StyleGAN2"),
    "unknown class": (
        lambda s: setattr(module(s, "D", "b4.mbstd"), "class_name", "SelfAttention"),
        r"D\.b4\.mbstd is a SelfAttention, which is not part of StyleGAN2",
    ),
    "resnet G": (
        set_state("G", "synthesis.b8", "architecture", "resnet"),
        r"G\.synthesis\.b8: architecture='resnet', but sg2dist's generator needs "
        r"architecture='skip'",
    ),
    "orig D": (
        set_state("D", "b16", "architecture", "orig"),
        r"D\.b16: architecture='orig', but sg2dist's discriminator needs architecture='resnet'",
    ),
    "relu": (
        set_state("G_ema", "synthesis.b4.conv1", "activation", "relu"),
        r"G_ema\.synthesis\.b4\.conv1: activation='relu', but sg2dist's generator needs",
    ),
    "mapping lr": (
        set_state("G", "mapping.fc1", "bias_gain", 0.1),
        r"G\.mapping\.fc1: lr_multiplier=0\.1, but the rest of the network has lr_multiplier=0\.01",
    ),
    "D clamp differs from G": (
        set_state("D", "b16.conv0", "conv_clamp", 128),
        r"D\.b16\.conv0: conv_clamp=128\.0, but sg2dist's discriminator needs conv_clamp=None",
    ),
    "D channels differ from G": (
        lambda s: s["D"].state["_init_kwargs"].update(channel_max=64),
        r"D: channel_max=64, but G \(shared\) has channel_max=32",
    ),
    "extra tensor": (
        add_tensor("G_ema", "synthesis.b8.conv0", "gate"),
        r"G_ema\.synthesis\.b8\.conv0\.gate \[3\] has no counterpart in sg2dist's G_ema",
    ),
    "missing tensor": (
        drop_buffer("G", "synthesis.b8.conv1", "noise_const"),
        r"G of the pickle has no tensor for sg2dist's synthesis\.blocks\.b8\.conv1\.noise_const",
    ),
    "other filter": (
        lambda s: (
            module(s, "G", "synthesis.b8")
            .state["_buffers"]
            .update(resample_filter=torch.ones(4, 4) / 16)
        ),
        r"G\.synthesis\.b8\.resample_filter is not the \[1, 3, 3, 1\] FIR filter",
    ),
    "old persistence": (
        lambda s: s.update(G=_version(s["G"], 5)),
        "G was pickled by torch_utils.persistence version 5; sg2dist reads version 6",
    ),
    "not a snapshot": (lambda s: s.pop("G_ema"), "holds no G, D and G_ema networks"),
}


def _version(obj: Persistent, version: int) -> Persistent:
    class Versioned(Persistent):
        def __reduce__(self):
            func, (meta,) = super().__reduce__()
            return func, ({**meta, "version": version},)

    versioned = Versioned.__new__(Versioned)
    versioned.__dict__.update(obj.__dict__)
    return versioned


@pytest.fixture(scope="module")
def base_snapshot():
    model = tiny_model_config()
    return official_snapshot(*random_networks(model), model)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_sg2dist_cannot_build_is_one_error_naming_it(base_snapshot, tmp_path, case):
    change, message = REFUSED[case]
    snapshot = copy.deepcopy(base_snapshot)
    change(snapshot)
    path = dump_official(snapshot, tmp_path / "n.pkl")
    with pytest.raises(UserError, match=message) as exc:
        read_network_pickle(str(path))
    assert "\n" not in str(exc.value)
