"""ADA state in checkpoints: saved and restored, old checkpoints still load, and the p of an
imported official pickle is read defensively."""

import copy

import pytest
import torch
from support.tiny import TINY_8PX_MODEL, tiny_model_sets

from sg2dist.augment import AugmentState
from sg2dist.config import load_config
from sg2dist.errors import UserError
from sg2dist.model import build_networks
from sg2dist.train import checkpoint as ckpt
from sg2dist.train.build import initial_augment
from sg2dist.train.step import Nets, StepState


def contents(augment):
    cfg = load_config(None, tiny_model_sets(TINY_8PX_MODEL))
    G, D = build_networks(cfg.model)
    nets = Nets(
        G_ddp=G, D_ddp=D, G_net=G, D_net=D, G_ema=copy.deepcopy(G),
        G_opt=torch.optim.Adam(G.parameters()), D_opt=torch.optim.Adam(D.parameters()),
    )  # fmt: skip
    state, meta = ckpt.training_contents(
        nets=nets, scaler=None, progress=ckpt.Progress(), step_state=StepState.on("cpu"), cfg=cfg,
        rng_cpu=[torch.get_rng_state()], data_states=[{}], mlflow_run_id=None, augment=augment,
    )  # fmt: skip
    return cfg, nets, ckpt.Checkpoint(url="mem://", state=state, meta=meta)


def restore(augment, step_state: StepState) -> StepState:
    cfg, nets, checkpoint = contents(augment)
    ckpt.restore_training(
        checkpoint, cfg=cfg, nets=nets, scaler=None, progress=ckpt.Progress(),
        step_state=step_state, rank=0, world_size=1,
    )  # fmt: skip
    return step_state


def test_p_and_the_r_t_accumulator_are_restored():
    saved = {"p": 0.375, "rt_sum": 2.5, "rt_count": 4.0, "rt": 0.7}
    state = restore(saved, StepState.on("cpu"))
    assert (state.augment.p, state.augment.rt_sum, state.augment.rt_count) == (0.375, 2.5, 4.0)
    assert state.augment.rt == 0.7


def test_a_checkpoint_from_before_augmentation_keeps_the_runs_initial_state():
    _, _, checkpoint = contents(None)
    assert "augment" not in checkpoint.meta
    state = restore(None, StepState.on("cpu", AugmentState(p=0.2)))
    assert state.augment.p == 0.2 and state.augment.rt_count == 0


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"imported": {"augment_p": 0.3}}, 0.3),
        ({"imported": {"augment_p": 0}}, 0.0),
        ({"imported": {"augment_p": 1.7}}, 1.0),
        ({"imported": {"augment_p": float("nan")}}, None),
        ({"imported": {"augment_p": "0.3"}}, None),
        ({"imported": {"augment_p": True}}, None),
        ({"imported": {"augment_p": None}}, None),
        ({"imported": "official.pkl"}, None),
        ({"imported": {}}, None),
        ({}, None),
    ],
)
def test_the_imported_augment_p_is_read_defensively(meta, expected):
    assert ckpt.imported_augment_p(meta) == expected


def test_p_from_checkpoint_without_an_imported_p_is_one_clear_error():
    cfg = load_config(None, ["augment.mode=ada", "augment.p=from-checkpoint"])
    with pytest.raises(UserError, match="augment.p=from-checkpoint but runs/x records no"):
        initial_augment(cfg, {"config": {}}, "runs/x")
    with pytest.raises(UserError, match="from-checkpoint needs --init-from a checkpoint imported"):
        initial_augment(cfg, None, "")
    assert initial_augment(cfg, {"imported": {"augment_p": 0.4}}, "runs/x").p == 0.4
