"""The PACS commands at the command line: own Orthanc start / status / stop, synth --pacs, and
the errors a user meets (unknown protocol, no selection yet, PACS down)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cohortflow.flows.cli import main
from cohortflow.pipelines.pacs import orthanc
from tests.ingest_helpers import free_port


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> Iterator[Path]:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COHORTFLOW_CACHE_DIR", str(model_cache))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    for name in ("ORTHANC__HTTP_PORT", "ORTHANC__DICOM_PORT", "RETRIEVE__SCP_PORT"):
        monkeypatch.setenv(f"COHORTFLOW_{name}", str(free_port()))
    yield tmp_path / "home"
    orthanc.stop_running(tmp_path / "home" / "orthanc")


@pytest.mark.integration
@pytest.mark.slow
def test_own_pacs_starts_loads_a_cohort_and_stops(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pacs", "start", "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["running"] and orthanc.running_pid(home / "orthanc") == state["pid"]
    assert main(["pacs", "start", "--json"]) == 0  # already running: the same server
    assert json.loads(capsys.readouterr().out)["pid"] == state["pid"]
    out = str(tmp_path / "c")
    code = main(["synth", "--out", out, "--studies", "2", "--seed", "3", "--pacs", "--json"])
    assert code == 0
    loaded = json.loads(capsys.readouterr().out)
    assert loaded["pacs"]["sent"] > 0 and not loaded["pacs"]["failed"]
    assert main(["select", "open", "--from", "1990-01-01", "--to", "2030-12-31", "--json"]) == 0
    selected = json.loads(capsys.readouterr().out)
    assert selected["selection_id"] == 1
    assert main(["pacs", "stop"]) == 0
    assert orthanc.running_pid(home / "orthanc") is None
    # the PACS is down: a failure (exit 1) with the reason, not a traceback
    assert main(["select", "open", "--from", "1990-01-01", "--to", "2030-12-31"]) == 1
    assert "did not answer" in capsys.readouterr().err


def test_usage_errors_name_what_is_wrong(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["select", "alzheimer", "--from", "2020-01-01", "--to", "2020-12-31"]) == 2
    assert "dementia" in capsys.readouterr().err  # the known protocols are listed
    assert main(["select", "ms", "--from", "2020-13-01", "--to", "2020-12-31"]) == 2
    assert main(["select", "ms", "--from", "2021-01-01", "--to", "2020-12-31"]) == 2
    assert "--to is before --from" in capsys.readouterr().err
    assert main(["retrieve"]) == 2
    assert "cohortflow select" in capsys.readouterr().err
    assert main(["retrieve", "--window", "weekdays", "--selection", "1"]) == 2
    assert "expected days" in capsys.readouterr().err
