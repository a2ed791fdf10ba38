from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import build_parser, main


def test_help_on_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"synth", "demo"} <= set(commands)
    for name in commands:
        assert main([name, "--help"]) == 0
        assert "usage: cohortflow " + name in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["synth"],  # --out missing
        ["synth", "--out", "x", "--fault-rate", "bogus=0.1"],
        ["synth", "--out", "x", "--fault-rate", "motion=2"],
        ["synth", "--out", "x", "--studies", "0"],
        ["nonsense"],
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    assert main(argv) == 2


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workers: -1\n")
    assert main(["--config", str(cfg), "synth", "--out", str(tmp_path / "o")]) == 2
    assert str(cfg) in capsys.readouterr().err


@pytest.mark.slow
def test_synth_json_and_refuses_to_overwrite(
    tmp_path: Path,
    model_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COHORTFLOW_CACHE_DIR", str(model_cache))
    out = tmp_path / "c"
    argv = [
        "synth",
        "--out",
        str(out),
        "--studies",
        "1",
        "--seed",
        "3",
        "--no-faults",
        "--workers",
        "1",
        "--json",
    ]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["studies"] == 1 and doc["patients"] == 1
    assert all(v == 0 for v in doc["faults"].values())
    assert (out / "ground_truth.json").is_file()
    assert main(argv) == 2  # not empty: refuses without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
