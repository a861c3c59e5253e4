"""The restricted unpickler: official pickles are read as data, nothing in them runs."""

from __future__ import annotations

import copy
import copyreg
import os
import pickle
import subprocess
from collections import OrderedDict

import pytest
import torch
from support.official_pickle import dump_official, official_snapshot, random_networks
from support.tiny import tiny_model_config

from sg2dist.errors import UserError
from sg2dist.interop import read_network_pickle
from sg2dist.interop.unpickler import OfficialObject


class Call:
    """Pickles as a call of `func(*args)`: what an attacker puts into a pickle."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def attacks(marker) -> dict[str, Call]:
    return {
        "posix.system": Call(os.system, f"touch {marker}"),
        "subprocess.Popen": Call(subprocess.Popen, ["touch", str(marker)]),
        "builtins.eval": Call(eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": Call(exec, f"open({str(marker)!r}, 'w')"),
        "builtins.getattr": Call(getattr, Call(__import__, "os"), "system"),
        # torch.load of untrusted bytes without weights_only would run them as a pickle.
        "torch.serialization.load": Call(torch.load, str(marker)),
    }


@pytest.fixture(scope="module")
def snapshot():
    model = tiny_model_config(resolution=8, channel_base=64, channel_max=16, z_dim=8, w_dim=8)
    return official_snapshot(*random_networks(model), model)


@pytest.mark.parametrize("name", sorted(attacks("x")))
@pytest.mark.parametrize("where", ["top level", "inside a layer's state"])
def test_any_other_global_is_refused_by_name_and_never_called(snapshot, tmp_path, name, where):
    marker = tmp_path / "marker"
    attack = attacks(marker)[name]
    top = copy.deepcopy(snapshot)
    if where == "top level":
        top["training_set_kwargs"] = {"path": attack}
    else:
        top["G_ema"].state["_modules"]["synthesis"].state["_modules"]["b4"].state["x"] = attack
    path = dump_official(top, tmp_path / "evil.pkl")
    with pytest.raises(UserError, match=f"refers to {name},.*refused without running it"):
        read_network_pickle(str(path))
    assert not marker.exists()


def test_module_src_in_the_pickle_is_never_executed(snapshot, tmp_path):
    marker = tmp_path / "marker"
    top = copy.deepcopy(snapshot)
    for key in ("G", "D", "G_ema"):
        top[key].module_src = f"open({str(marker)!r}, 'w').write('ran')\n"
    path = dump_official(top, tmp_path / "net.pkl")
    imported = read_network_pickle(str(path))
    assert imported.model.resolution == 8
    assert not marker.exists()


def test_setting_object_state_and_extension_codes_are_refused(tmp_path):
    class WithState:
        def __reduce__(self):  # OrderedDict() then BUILD with an attribute dict
            return OrderedDict, (), {"_hook": 1}

    path = tmp_path / "build.pkl"
    path.write_bytes(pickle.dumps({"G": WithState()}, protocol=4))
    with pytest.raises(UserError, match="sets the state of a OrderedDict object"):
        read_network_pickle(str(path))

    # An allowed global, but written as an extension code: refused all the same.
    copyreg.add_extension("collections", "OrderedDict", 241)
    try:
        path.write_bytes(pickle.dumps({"cls": OrderedDict}, protocol=4))
    finally:
        copyreg.remove_extension("collections", "OrderedDict", 241)
    assert pickle.EXT1 in path.read_bytes()
    with pytest.raises(UserError, match="uses pickle extension codes"):
        read_network_pickle(str(path))


@pytest.mark.parametrize("protocol", [3, 4])
def test_protocols_3_and_4_give_the_same_networks(snapshot, tmp_path, protocol):
    path = dump_official(snapshot, tmp_path / "net.pkl", protocol=protocol)
    assert path.read_bytes()[:2] == bytes([0x80, protocol])
    imported = read_network_pickle(str(path))
    reference = read_network_pickle(str(dump_official(snapshot, tmp_path / "ref.pkl", 4)))
    for net in ("G", "D", "G_ema"):
        mine, theirs = getattr(imported, net), getattr(reference, net)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_truncated_file_is_one_clear_error_wherever_it_is_cut(snapshot, tmp_path):
    data = dump_official(snapshot, tmp_path / "net.pkl").read_bytes()
    for cut in (0, 1, 100, len(data) // 3, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(data[:cut])
        with pytest.raises(UserError, match="truncated or damaged: download it again") as exc:
            read_network_pickle(str(path))
        assert "\n" not in str(exc.value)


def test_networks_come_back_as_class_names_and_states(snapshot, tmp_path):
    from sg2dist.interop.unpickler import load_official

    with open(dump_official(snapshot, tmp_path / "net.pkl"), "rb") as f:
        top = load_official(f, "net.pkl")
    G = top["G_ema"]
    assert isinstance(G, OfficialObject) and G.class_name == "Generator"
    assert G.state["_init_kwargs"]["synthesis_kwargs"]["channel_base"] == 64
    affine = G.children()["synthesis"].children()["b4"].children()["conv1"].children()["affine"]
    assert float(affine.state["weight_gain"]) == pytest.approx(1 / 8**0.5)
    assert top["training_set_kwargs"]["xflip"] is True
