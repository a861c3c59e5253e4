"""Config loading: defaults, overrides, and one-line errors that name the key and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest

from sg2dist.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "sg2dist", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_overrides_take_precedence_over_yaml_and_keep_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch: 64\n  r1_gamma: 1\nmodel:\n  resolution: 256\n")
    cfg = load_config(path, ["train.batch=128", "train.betas=0,0.9", "run.dir=s3://b/runs/x"])
    assert cfg.train.batch == 128
    assert cfg.train.r1_gamma == 1.0 and isinstance(cfg.train.r1_gamma, float)
    assert cfg.train.betas == [0, 0.9]
    assert cfg.model.resolution == 256
    assert cfg.run.dir == "s3://b/runs/x"


def test_float_keys_accept_exponents_without_a_dot(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  g_lr: 2e-3\n")
    cfg = load_config(path, ["train.d_lr=1e-4"])
    assert cfg.train.g_lr == 0.002 and cfg.train.d_lr == 0.0001


def test_config_round_trips_through_a_plain_dict():
    cfg = load_config(None, ["model.resolution=64", "train.ema_rampup=0.05"])
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.bach=8"], "unknown config key 'train.bach'"),
        (["trian.batch=8"], "unknown config key 'trian.batch'"),
        (["train.batch=lots"], "config key 'train.batch' must be int"),
        (["model.resolution=48"], "model.resolution=48 is not a power of two"),
        (["train.precision=fp8"], "train.precision='fp8'"),
        (["model.fir_kernel=cudnn"], "model.fir_kernel='cudnn' is not one of auto, torch, tr"),
        (["model.bias_act_kernel=cuda"], "model.bias_act_kernel='cuda' is not one of auto, to"),
        (["train.memory_format=nhwc"], "train.memory_format='nhwc'; use one of auto, channels_"),
        (["run.peer_timeout_s=0.5"], "run.peer_timeout_s=0.5 is too short"),
        (["run.storage_retry_s=-1"], "run.storage_retry_s=-1 must be >= 0"),
    ],
)
def test_bad_keys_and_values_raise_a_config_error_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_batch_layout_derives_accumulation_and_rejects_indivisible_batches():
    cfg = Config()
    cfg.train.batch, cfg.train.batch_gpu = 32, 4
    assert cfg.train.batch_layout(world_size=2) == (4, 4)
    cfg.train.batch = 36
    with pytest.raises(ConfigError, match="not divisible by train.batch_gpu=4 x world size 2 = 8"):
        cfg.train.batch_layout(world_size=2)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--set", "train.bach=8"], {}, "unknown config key 'train.bach'"),
        (["--set", "train.batch=many"], {}, "config key 'train.batch' must be int"),
        (
            ["--set", "train.batch=30", "--set", "train.batch_gpu=4"],
            {"WORLD_SIZE": "2"},
            "train.batch=30 is not divisible",
        ),
    ],
)
def test_train_cli_reports_config_errors_as_one_line_and_exit_2(args, env, expected):
    result = run_cli(
        "train", "--config", "configs/quickstart.yaml", "--dry-run", *args, env_extra=env
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sg2dist: error: ") and expected in lines[0]


def test_dry_run_prints_resolved_config_and_batch_layout():
    result = run_cli(
        "train",
        "--config",
        "configs/quickstart.yaml",
        "--dry-run",
        "--set",
        "train.batch=64",
        "--set",
        "train.batch_gpu=8",
        env_extra={"WORLD_SIZE": "4"},
    )
    assert result.returncode == 0, result.stderr
    assert "batch: 64" in result.stdout
    assert "global 64 = batch_gpu 8 x accumulation 2 x world size 4" in result.stdout
