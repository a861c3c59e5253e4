"""`sg2dist summary` prints the G and D tables and the totals the parameter-count test checks."""

from pathlib import Path

from sg2dist.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def run_summary(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["summary", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def totals(text: str) -> dict[str, str]:
    section = text.split("Trainable parameters", 1)[1]
    return {
        line.rsplit(None, 1)[0].strip(): line.split()[-1] for line in section.strip().splitlines()
    }


def test_summary_of_the_1024_preset_prints_the_config_f_totals(capsys):
    rc, out, _ = run_summary(capsys, "--config", str(CONFIGS / "ffhq1024.yaml"))
    assert rc == 0
    assert totals(out) == {
        "mapping": "2,101,248",
        "synthesis": "28,268,812",
        "G total": "30,370,060",
        "D total": "29,012,513",
    }
    # One table row per resolution, with its output shape.
    assert "b1024" in out and "[N, 32, 1024, 1024]" in out
    assert "b4" in out and "[N, 512, 4, 4]" in out


def test_summary_of_the_256_preset_and_an_override_print_the_official_totals(capsys):
    preset = str(CONFIGS / "ffhq256.yaml")
    _, out, _ = run_summary(capsys, "--config", preset)
    assert (totals(out)["G total"], totals(out)["D total"]) == ("24,767,458", "24,001,089")
    _, out, _ = run_summary(capsys, "--config", preset, "--set", "model.channel_base=32768")
    assert (totals(out)["G total"], totals(out)["D total"]) == ("30,034,338", "28,864,129")


def test_summary_names_a_channel_base_too_small_for_the_resolution_in_one_line(capsys):
    rc, out, err = run_summary(
        capsys, "--set", "model.resolution=256", "--set", "model.channel_base=128"
    )
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "model.channel_base=128" in err and "at least 256" in err
