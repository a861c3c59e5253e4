"""Transfer learning: `train --init-from` an official pickle, model.* from the source, Freeze-D."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from support.ddp import run_worker
from support.official_pickle import random_networks, write_official_pickle
from support.tiny import (
    TINY_DIGITS_MODEL,
    TRAIN_CLI_SETS,
    set_args,
    tiny_model_config,
    tiny_model_sets,
)

from sg2dist.cli import main as cli
from sg2dist.config import load_config
from sg2dist.errors import UserError
from sg2dist.model import build_networks
from sg2dist.train import checkpoint as ckpt
from sg2dist.train.build import freeze_d_layers, resolve_dataset

DIGITS_MODEL = tiny_model_config(TINY_DIGITS_MODEL)  # the shape of the digits dataset


def run_train(run_dir, data_url: str, kimg: float, *args: str) -> subprocess.CompletedProcess:
    sets = [*TRAIN_CLI_SETS, f"run.dir={run_dir}", f"data.url={data_url}", f"train.kimg={kimg}"]
    result = subprocess.run(
        [sys.executable, "-m", "sg2dist", "train", *set_args(sets), *args],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def digits_pkl(tmp_path_factory):
    """An official pickle of the digits' shape; G and G_ema differ, w_avg is not zero."""
    nets = random_networks(DIGITS_MODEL, seed=7)
    path = tmp_path_factory.mktemp("pickles") / "digits.pkl"
    return str(write_official_pickle(path, *nets, DIGITS_MODEL)), nets


def test_fine_tuning_from_an_official_pickle_trains_and_writes_a_checkpoint(
    digits_pkl, tmp_path, digits_url
):
    pkl, (G, _D, G_ema) = digits_pkl
    result = run_train(tmp_path / "ft", digits_url, 0.016, "--init-from", pkl)
    assert "resumed from" not in result.stdout
    tuned = ckpt.find_latest(str(tmp_path / "ft"))
    assert tuned.meta["progress"]["step"] == 2  # counters start fresh
    assert tuned.meta["config"]["model"] == dataclasses.asdict(DIGITS_MODEL)
    source_G, source_ema = G.state_dict(), G_ema.state_dict()
    for key in ("synthesis.blocks.b8.conv1.bias", "mapping.layers.1.bias"):
        # G_ema went on from the source's G_ema (G's differ from it by ~0.5), two EMA steps.
        assert (tuned.state["G_ema"][key] - source_ema[key]).abs().max() < 0.01, key
        assert (tuned.state["G_ema"][key] - source_G[key]).abs().max() > 0.1, key
        # G took two Adam steps from the source's G.
        assert 0 < (tuned.state["G"][key] - source_G[key]).abs().max() < 0.02, key
    # w_avg continues from the source's (it moves 0.5 % per step towards the batch's mean w).
    w_avg, source_w_avg = tuned.state["G"]["mapping.w_avg"], source_G["mapping.w_avg"]
    assert (w_avg - source_w_avg).norm() < 0.1 * source_w_avg.norm()


def test_model_comes_from_the_source_and_a_conflicting_key_is_one_error(
    digits_pkl, digits_url, tmp_path, capsys
):
    pkl = digits_pkl[0]
    base = ["train", "--init-from", pkl, "--dry-run", "--set", f"data.url={digits_url}"]
    assert cli(base) == 0
    printed = capsys.readouterr().out
    assert "resolution: 32" in printed and "channel_base: 256" in printed
    assert "img_channels: 1" in printed
    # The same from the run folder that `sg2dist import` makes of the pickle.
    assert cli(["import", pkl, str(tmp_path / "imported")]) == 0
    capsys.readouterr()
    assert cli([*base[:2], str(tmp_path / "imported"), *base[3:]]) == 0
    assert capsys.readouterr().out == printed
    # Equal values and the free fused_modconv are fine; another value is not.
    same = [arg for s in tiny_model_sets(TINY_DIGITS_MODEL) for arg in ("--set", s)]
    assert cli([*base, *same, "--set", "model.fused_modconv=true"]) == 0
    assert "fused_modconv: true" in capsys.readouterr().out
    assert cli([*base, "--set", "model.channel_base=512"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"sg2dist: error: model.channel_base=512 in the config, but --init-from {pkl} has "
        "model.channel_base=256; drop model.channel_base from the config "
        "(model.* comes from --init-from)"
    )


def test_a_conditional_model_without_labels_is_one_error(digits_url):
    sets = [*tiny_model_sets(TINY_DIGITS_MODEL), f"data.url={digits_url}", "model.c_dim=10"]
    cfg = load_config(None, sets)
    with pytest.raises(UserError, match=r"model.c_dim=10 \(a conditional model\) needs labels"):
        resolve_dataset(cfg, accelerator=None)


def test_a_weights_only_checkpoint_cannot_be_resumed(digits_pkl):
    imported = ckpt.load_checkpoint(digits_pkl[0])
    with pytest.raises(
        UserError, match="holds weights only .*start a new run.dir with --init-from"
    ):
        ckpt.restore_training(
            imported,
            cfg=load_config(),
            nets=None,
            scaler=None,
            progress=ckpt.Progress(),
            step_state=None,
            rank=0,
            world_size=1,
        )


def test_freeze_d_counts_layers_from_the_top_like_the_official_code():
    _, D = build_networks(tiny_model_config(resolution=32))  # blocks 32, 16, 8
    trained = freeze_d_layers(D, 5)  # fromRGB + conv0, conv1, skip at 32 + conv0 at 16
    frozen = {n for n, p in D.named_parameters() if not p.requires_grad}
    assert frozen == {
        "fromrgb.weight",
        "fromrgb.bias",
        *(
            f"blocks.b32.{layer}.{kind}"
            for layer in ("conv0", "conv1")
            for kind in ("weight", "bias")
        ),
        "blocks.b32.skip.weight",
        "blocks.b16.conv0.weight",
        "blocks.b16.conv0.bias",
    }
    assert len(trained) == len(list(D.parameters())) - len(frozen)
    with pytest.raises(UserError, match="train.freeze_d=11, but D has 10 layers"):
        freeze_d_layers(D, 11)


def test_freeze_d_keeps_frozen_layers_bitwise_and_two_processes_equal_one(tmp_path):
    # 4 steps: Gmain, Greg, Dmain and Dreg (R1 through the frozen layers) all run.
    freeze = ("train.freeze_d=4",)
    single = run_worker(tmp_path / "one.pt", 8, 2, steps=4, nproc=1, extra_sets=freeze)
    double = run_worker(tmp_path / "two.pt", 8, 2, steps=4, nproc=2, extra_sets=freeze)
    frozen = {n for n in single["D"] if n.startswith(("fromrgb.", "blocks.b16."))}
    assert len(frozen) == 7 and set(single["D_trained"]) == set(single["D"]) - frozen
    for run in (single, double):
        for name, weight in run["D"].items():
            moved = (weight - run["D_init"][name]).abs().max().item()
            if name in frozen:
                assert torch.equal(weight, run["D_init"][name]), name
            else:
                assert moved > 1e-4, name
    # DDP all-reduces the trained tensors only.
    assert double["D_synced_tensors"] == len(single["D"]) - len(frozen)
    for net in ("G", "D", "G_ema"):
        diff = max((single[net][k] - double[net][k]).abs().max().item() for k in single[net])
        assert diff < 1e-5, net


def tiny_checkpoint(cfg, drop_keys=()):
    """A checkpoint of a tiny run at step 3 (config keys `drop_keys`, "section.key", removed
    as if it came from an older sg2dist) and restore(cfg) -> the data state it resumes."""
    import copy
    import json

    from sg2dist.train.step import Nets, StepState

    G, D = build_networks(cfg.model)
    G_ema = copy.deepcopy(G)
    opts = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    nets = Nets(G_ddp=G, D_ddp=D, G_net=G, D_net=D, G_ema=G_ema, G_opt=opts[0], D_opt=opts[1])
    state, meta = ckpt.training_contents(
        nets=nets,
        scaler=None,
        progress=ckpt.Progress(step=3),
        step_state=StepState.on("cpu"),
        cfg=cfg,
        rng_cpu=[torch.get_rng_state()],
        data_states=[{"position": 1}],
        mlflow_run_id=None,
    )
    for dotted in drop_keys:
        section, key = dotted.split(".")
        del meta["config"][section][key]
    old = ckpt.Checkpoint(url="old", state=state, meta=json.loads(json.dumps(meta)))
    progress = ckpt.Progress()

    def restore(cfg):
        return ckpt.restore_training(
            old,
            cfg=cfg,
            nets=nets,
            scaler=None,
            progress=progress,
            step_state=StepState.on("cpu"),
            rank=0,
            world_size=1,
        )

    return restore, progress


def test_checkpoints_from_before_w_avg_beta_and_freeze_d_still_resume():
    cfg = load_config(None, tiny_model_sets())
    restore, progress = tiny_checkpoint(cfg, ["model.w_avg_beta", "train.freeze_d"])
    assert restore(cfg) == {"position": 1} and progress.step == 3
    frozen = load_config(None, [*tiny_model_sets(), "train.freeze_d=2"])
    with pytest.raises(UserError, match="trained with train.freeze_d=0; resume with the same"):
        restore(frozen)


def test_a_resume_may_change_how_the_model_computes_but_not_its_weights():
    restore, progress = tiny_checkpoint(load_config(None, tiny_model_sets()))
    free = ["model.fir_kernel=triton", "model.bias_act_kernel=triton", "model.fused_modconv=true"]
    assert restore(load_config(None, [*tiny_model_sets(), *free])) == {"position": 1}
    assert progress.step == 3
    wider = load_config(None, tiny_model_sets(channel_max=64))
    with pytest.raises(UserError, match="trained with a different model config"):
        restore(wider)
