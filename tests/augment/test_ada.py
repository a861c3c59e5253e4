"""ADA's p: up when D is confident on reals, down otherwise, by the official step, capped."""

import math

import pytest
import torch

from sg2dist.augment import Augmenter, AugmentState, adjust_p, initial_state
from sg2dist.config import AugmentConfig, ConfigError, load_config

BATCH, INTERVAL, SPEED_KIMG = 64, 4, 500
STEP = BATCH * INTERVAL / (SPEED_KIMG * 1000)  # the official step: 64 x 4 / 500k = 0.000512


def adjust(p: float, rt: float, p_max: float = 1.0) -> float:
    return adjust_p(
        p, rt, target=0.6, batch=BATCH, interval=INTERVAL, speed_kimg=SPEED_KIMG, p_max=p_max
    )


def test_p_rises_by_the_official_step_when_d_is_confident_on_reals():
    assert adjust(0.2, rt=0.9) == pytest.approx(0.2 + STEP, abs=1e-15)


def test_p_falls_by_the_official_step_when_d_is_not_confident_and_stops_at_zero():
    assert adjust(0.2, rt=0.1) == pytest.approx(0.2 - STEP, abs=1e-15)
    assert adjust(STEP / 2, rt=-1.0) == 0.0


def test_p_stays_when_r_t_is_exactly_the_target():
    assert adjust(0.2, rt=0.6) == 0.2


def test_p_max_caps_p():
    assert adjust(0.5, rt=1.0, p_max=0.5) == 0.5
    assert adjust(0.5 - STEP / 2, rt=1.0, p_max=0.5) == 0.5


def ada(**overrides) -> Augmenter:
    cfg = AugmentConfig(mode="ada", speed_kimg=SPEED_KIMG, interval=INTERVAL, **overrides)
    cfg.validate()
    return Augmenter(cfg, batch=BATCH)


def mean(x: float) -> torch.Tensor:
    return torch.tensor(x)


def test_the_augmenter_adjusts_p_once_per_interval_from_the_mean_sign_of_the_interval():
    augmenter, state = ada(), AugmentState(p=0.3)
    for completed in range(1, INTERVAL + 1):
        # Dmain's two micro-batches per step: D right on 3/4 and 4/4 of the reals.
        augmenter.observe(state, [mean(0.5), mean(1.0)])
        augmenter.after_step(state, completed, reduce_mean=lambda x: x)
        if completed < INTERVAL:
            assert state.p == 0.3  # no adjustment between intervals
    assert state.rt == pytest.approx(0.75)  # r_t = mean over the interval's micro-batches
    assert state.p == pytest.approx(0.3 + STEP)
    assert state.rt_count == 0  # the accumulator starts over


def test_r_t_averages_over_ranks_so_every_rank_gets_the_same_p():
    # Two ranks, each with its own signs; reduce_mean stands in for the all-reduce.
    states = [AugmentState(p=0.3), AugmentState(p=0.3)]
    augmenter = ada()
    augmenter.observe(states[0], [mean(1.0)])  # rank 0: r = 1.0
    augmenter.observe(states[1], [mean(0.0)])  # rank 1: r = 0.0 -> global r_t 0.5 < 0.6
    both = torch.stack(
        [torch.stack([torch.as_tensor(s.rt_sum), torch.tensor(s.rt_count)]) for s in states]
    )

    def reduce_mean(x: torch.Tensor) -> torch.Tensor:
        return both.mean(dim=0)

    for state in states:
        augmenter.after_step(state, INTERVAL, reduce_mean)
    assert states[0].p == states[1].p == pytest.approx(0.3 - STEP)
    assert states[0].rt == states[1].rt == pytest.approx(0.5)


def test_fixed_mode_never_moves_p():
    cfg = AugmentConfig(mode="fixed", p="0.25")
    cfg.validate()
    augmenter, state = Augmenter(cfg, batch=BATCH), initial_state(cfg)
    for completed in range(1, 3 * INTERVAL + 1):
        augmenter.observe(state, [mean(1.0)])
        augmenter.after_step(state, completed, reduce_mean=lambda x: x)
    assert state.p == 0.25


def test_the_state_round_trips_through_json_with_the_reduced_accumulator():
    state = AugmentState(p=0.125)
    state.accumulate([mean(0.5), mean(-0.25)])
    accumulator = state.global_accumulator(lambda x: x, torch.device("cpu"))
    restored = AugmentState()
    restored.load_dict(state.to_dict(accumulator))
    assert (restored.p, restored.rt_sum, restored.rt_count) == (0.125, 0.25, 2.0)
    assert math.isnan(restored.rt)  # no adjustment yet


def test_initial_p_comes_from_the_config_or_the_imported_pickle_capped_at_p_max():
    assert initial_state(AugmentConfig(mode="ada", p="0.2")).p == 0.2
    imported = AugmentConfig(mode="ada", p="from-checkpoint", p_max=0.6)
    assert initial_state(imported, imported_p=0.45).p == 0.45
    assert initial_state(imported, imported_p=0.9).p == 0.6


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["augment.mode=adaptive"], "augment.mode='adaptive'; use one of none, ada, fixed"),
        (["augment.mode=ada", "augment.pipe=xyz"], "augment.pipe='xyz'; use one of blit"),
        (["augment.mode=ada", "augment.p=high"], "augment.p='high' is neither a number nor"),
        (
            ["augment.mode=ada", "augment.p=0.9", "augment.p_max=0.8"],
            "must be in [0, augment.p_max",
        ),
        (["augment.mode=fixed"], "augment.mode=fixed with augment.p=0 augments nothing"),
        (["augment.p=0.3"], "has no effect with augment.mode=none"),
        (["augment.mode=ada", "augment.target=1.5"], "augment.target=1.5 must be in [0, 1]"),
        (["augment.mode=ada", "augment.speed_kimg=0"], "augment.speed_kimg=0.0 must be > 0"),
        (["augment.mode=ada", "augment.interval=0"], "augment.interval=0 must be >= 1"),
        (
            ["augment.mode=ada", "augment.pipe=bgcf", "model.resolution=16"],
            "needs model.resolution",
        ),
    ],
)
def test_bad_augment_settings_are_one_clear_error(sets, message):
    with pytest.raises(ConfigError, match=None) as error:
        load_config(None, sets)
    assert message in str(error.value)
