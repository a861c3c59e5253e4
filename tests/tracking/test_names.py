"""The grouped MLflow metric names (sg2dist.tracking.names)."""

from __future__ import annotations

from sg2dist.tracking.names import (
    TICK_METRIC_NAMES,
    mlflow_metric_name,
    score_metric_name,
)
from sg2dist.train.loop import TICK_LINE_ORDER


def test_tick_keys_map_to_one_section_each_and_unknown_keys_pass_unchanged() -> None:
    assert mlflow_metric_name("loss_G") == "loss/G"
    assert mlflow_metric_name("loss_r1") == "loss/r1"
    assert mlflow_metric_name("D_fake") == "D/fake"
    assert mlflow_metric_name("img_per_s") == "speed/img_per_s"
    assert mlflow_metric_name("data_wait_frac") == "data/wait_frac"
    assert mlflow_metric_name("peak_rss_gb") == "memory/peak_rss_gb"
    assert mlflow_metric_name("augment_p") == "augment/p"
    assert mlflow_metric_name("augment_rt") == "augment/rt"
    assert score_metric_name("ppl_wend") == "metrics/ppl_wend"
    assert mlflow_metric_name("system/node0/cpu") == "system/node0/cpu"
    assert mlflow_metric_name("something_new") == "something_new"
    names = list(TICK_METRIC_NAMES.values())
    assert len(set(names)) == len(names)
    assert all(name.count("/") == 1 for name in names)
    assert set(TICK_LINE_ORDER) <= set(TICK_METRIC_NAMES)
