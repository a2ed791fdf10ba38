from __future__ import annotations

from pathlib import Path

import pytest

from flows.prefect_env import configure_prefect


@pytest.mark.integration
@pytest.mark.slow
def test_demo_flow_runs_in_prefect(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    configure_prefect(tmp_path)
    from prefect.testing.utilities import prefect_test_harness

    from flows.synth_flow import demo_flow

    with prefect_test_harness():
        summary = demo_flow(
            out_dir=tmp_path / "cohort", cache_dir=model_cache, studies=2, seed=5, workers=1
        )
    assert summary.studies == 2
    assert (tmp_path / "cohort" / "ground_truth.json").is_file()
    assert sum(summary.faults.values()) >= 1


def test_prefect_home_is_created_with_its_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: on a fresh clone ./cohortflow-data did not exist and the ephemeral Prefect
    server failed with 'unable to open database file'."""
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    configure_prefect(tmp_path / "not" / "yet")
    assert (tmp_path / "not" / "yet" / "prefect").is_dir()
