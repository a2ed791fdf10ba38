from __future__ import annotations

from pathlib import Path

import pytest

from flows.prefect_env import configure_prefect
from pipelines.synth.summary import UNDELIVERED_ACCESSION


@pytest.mark.integration
@pytest.mark.slow
def test_demo_flow_runs_in_prefect(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    configure_prefect(tmp_path)
    from prefect.testing.utilities import prefect_test_harness

    from flows.synth_flow import demo_flow

    with prefect_test_harness():
        summary, report = demo_flow(
            out_dir=tmp_path / "cohort", cache_dir=model_cache, studies=2, seed=5, workers=1
        )
    assert summary.studies == 2
    assert (tmp_path / "cohort" / "ground_truth.json").is_file()
    assert sum(summary.faults.values()) >= 1
    # the generated delivery was ingested, chunk by chunk, and accounted for
    assert report.files == summary.files
    assert report.studies == summary.studies and report.state == "complete"
    missing = [line for line in report.manifest_lines if line.status == "missing"]
    assert [line.accession_number for line in missing] == [UNDELIVERED_ACCESSION]
    assert report.manifest == "incomplete"
    assert (tmp_path / "home" / "index.sqlite").is_file()
    archived = list((tmp_path / "home" / "archive" / "blobs").rglob("*"))
    assert sum(p.is_file() for p in archived) == report.new_content


def test_prefect_home_is_created_with_its_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: on a fresh clone ./cohortflow-data did not exist and the ephemeral Prefect
    server failed with 'unable to open database file'."""
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    configure_prefect(tmp_path / "not" / "yet")
    assert (tmp_path / "not" / "yet" / "prefect").is_dir()
