from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cohortflow.flows.cli import build_parser, main


def test_help_on_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"synth", "demo"} <= set(commands)
    for name in commands:
        assert main([name, "--help"]) == 0
        assert "usage: cohortflow " + name in capsys.readouterr().out


def test_python_m_answers_every_command_and_its_subcommands(tmp_path: Path) -> None:
    """``python -m cohortflow`` is the command line too (every command and sub-command, in a
    fresh interpreter); ``--version`` prints the installed version."""
    import subprocess
    import sys
    from importlib.metadata import version

    env = {**os.environ, "COHORTFLOW_HOME": str(tmp_path / "home")}
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    argvs = [["--version"]]
    for name, command in commands.items():
        argvs.append([name, "--help"])
        if command._subparsers is not None:
            for what in command._subparsers._group_actions[0].choices:
                argvs.append([name, what, "--help"])
    # one interpreter for all: each argv through runpy, as ``python -m cohortflow`` runs it
    script = (
        "import json, runpy, sys\n"
        "codes = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    sys.argv = ['cohortflow', *argv]\n"
        "    try:\n"
        "        runpy.run_module('cohortflow', run_name='__main__')\n"
        "        codes.append(None)\n"
        "    except SystemExit as exc:\n"
        "        codes.append(exc.code)\n"
        "print(json.dumps(codes))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(argvs)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(argvs) > 30
    assert dict(zip(map(" ".join, argvs), codes, strict=True)) == {" ".join(a): 0 for a in argvs}
    assert f"cohortflow {version('cohortflow')}" in done.stdout
    # the real ``python -m``, once
    direct = subprocess.run(
        [sys.executable, "-m", "cohortflow", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert direct.returncode == 0, direct.stderr[-2000:]


def test_every_command_registers_its_handler() -> None:
    """Each command without sub-commands sets the function that runs it
    (``set_defaults(handler=...)``): ``main`` calls that and nothing else."""
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in commands.values():
        leaves = (
            command._subparsers._group_actions[0].choices.values()
            if command._subparsers is not None
            else [command]
        )
        for leaf in leaves:
            assert callable(leaf.get_default("handler")), leaf.prog
    assert callable(parser.parse_args(["users", "list"]).handler)
    assert parser.parse_args(["status"]).handler is not parser.parse_args(["demo"]).handler


def test_verbose_is_accepted_after_the_command_too() -> None:
    parser = build_parser()
    assert parser.parse_args(["-v", "status"]).verbose is True
    assert parser.parse_args(["status", "-v"]).verbose is True
    assert parser.parse_args(["report", "batch", "b1", "--verbose"]).verbose is True
    assert parser.parse_args(["status"]).verbose is False


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


def test_every_benchmark_starts_from_the_command_line() -> None:
    """``python benchmarks/X.py`` puts benchmarks/ first on the path: no benchmark may be named
    like a package of ours (benchmarks/qc.py hid the qc package from the others)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    ours = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    scripts = sorted((root / "benchmarks").glob("*.py"))
    assert not {p.stem for p in scripts} & ours
    for script in scripts:
        done = subprocess.run(
            [sys.executable, str(script), "--help"],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            cwd=root,
        )
        assert done.returncode == 0, f"{script.name}: {done.stderr[-2000:]}"
        assert "usage:" in done.stdout


def test_the_volumetry_table_shows_its_verdict_in_colour_not_as_markup(tmp_path: Path) -> None:
    """The QC column once printed ``[green]pass[/]``: the safe table escaped its markup."""
    from rich.console import Console

    from cohortflow.flows.report import print_volumetry_report
    from cohortflow.models.volumes import Volumes
    from cohortflow.pipelines.volumetry.method import Parameters
    from cohortflow.pipelines.volumetry.run import VolumetryReport, VolumetryResult
    from cohortflow.pipelines.volumetry.source import Source
    from cohortflow.qc.findings import finding

    volumes = Volumes(1500.0, 600.0, 500.0, 400.0, 1100.0, 0.733)
    results = (
        VolumetryResult(Source(tmp_path / "a.nii.gz", "a"), (), volumes),
        VolumetryResult(
            Source(tmp_path / "b.nii.gz", "b"),
            (finding("volumetry.thick_slices", "slices 6 mm apart"),),
            volumes,
        ),
    )
    console = Console(record=True, width=200, color_system="truecolor")
    print_volumetry_report(VolumetryReport(results, Parameters()), console, "t", tmp_path)
    text = console.export_text(clear=False)
    assert "[green]" not in text and "[/]" not in text and "[yellow]" not in text
    assert "pass" in text and "warn volumetry.thick_slices" in text
    styled = console.export_text(styles=True)
    assert "\x1b[" in styled  # the verdict is coloured


def test_volumetry_says_when_its_overlays_go_where_the_dashboard_does_not_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dashboard shows pictures from under the outputs only: ``--out`` elsewhere is said."""
    from cohortflow.pipelines.volumetry import run
    from cohortflow.pipelines.volumetry.method import Parameters

    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "400")  # the note on one line
    monkeypatch.setattr(
        run, "volumetry_configured", lambda *_, **__: run.VolumetryReport((), Parameters())
    )
    source = tmp_path / "empty"
    source.mkdir()
    main(["volumetry", str(source), "--out", str(tmp_path / "elsewhere")])
    assert "the dashboard will not show them" in capsys.readouterr().err
    main(["volumetry", str(source), "--out", str(tmp_path / "home" / "outputs" / "v")])
    main(["volumetry", str(source)])
    main(["volumetry", str(source), "--out", str(tmp_path / "elsewhere"), "--no-record"])
    assert "the dashboard will not show them" not in capsys.readouterr().err


def test_a_crash_exits_3_and_says_why_in_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command that stops on an unexpected error no longer exits 1 like "done with failures";
    with ``--json`` the reason is the document, not plain text."""
    import cohortflow.flows.cli.run

    def boom(*_: object) -> int:
        raise RuntimeError("disk on fire")

    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path))
    monkeypatch.setattr(cohortflow.flows.cli.run, "_status", boom)
    assert main(["status", "--json"]) == 3
    captured = capsys.readouterr()
    error = json.loads(captured.out)["error"]
    assert error["kind"] == "internal" and error["exit"] == 3
    assert "RuntimeError: disk on fire" in error["message"]
    assert "status stopped" in captured.err
    assert main(["status"]) == 3
    captured = capsys.readouterr()
    assert captured.out == "" and "disk on fire" in captured.err


def test_a_configuration_error_in_json_is_a_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: [not a number\n")
    assert main(["--config", str(bad), "status", "--json"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == "configuration" and error["exit"] == 2 and error["message"]


def test_reports_off_a_terminal_keep_every_character_of_a_table_cell(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # rich's default of 80 columns off a terminal cut an ingest report's paths and cohort
    # list's pseudonyms ("pseudo..."); a report written to a file or a pipe keeps them whole
    from cohortflow.flows.output import SafeTable, stdout_console

    monkeypatch.delenv("COLUMNS", raising=False)
    path = "/data/incoming/" + "/".join(f"series-{i:03d}" for i in range(20)) + "/IM0001.dcm"
    table = SafeTable("file", "reason")
    table.add_row(path, "truncated: the pixel data ends 1,024 bytes early")
    stdout_console().print(table)
    out = capsys.readouterr().out
    assert path in out and "1,024 bytes early" in out and "…" not in out
