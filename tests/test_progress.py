"""What a person waiting for a run sees: studies done per stage, the rate and the time left."""

from __future__ import annotations

import pytest

from cohortflow.pipelines.run.progress import RunProgress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_run_reports_stages_rate_and_time_left_at_its_pace() -> None:
    clock = Clock()
    progress = RunProgress(4, ("anonymize", "deface", "release"), clock=clock)
    assert progress.fraction == 0.0 and progress.seconds_left() is None
    assert progress.line() == "anonymize 0/4 · deface 0/4 · release 0/4"
    for stage in ("anonymize", "anonymize", "deface", "release"):
        progress.finished(stage)
    clock.now += 120.0  # 4 of 12 study-stages in two minutes: four more minutes at that pace
    assert progress.fraction == 4 / 12
    assert progress.seconds_left() == pytest.approx(240.0)
    assert progress.studies_per_hour() == 30.0
    assert (
        progress.line()
        == "anonymize 2/4 · deface 1/4 · release 1/4 · 30 studies/h · about 4 min left"
    )


def test_a_finished_run_and_a_run_of_no_study_say_nothing_is_left() -> None:
    clock = Clock()
    done = RunProgress(1, ("anonymize", "release"), clock=clock)
    done.finished("anonymize")
    done.finished("release")
    clock.now += 30.0
    assert done.fraction == 1.0 and "left" not in done.line()
    assert done.line().endswith("120 studies/h")
    assert RunProgress(0, ("anonymize",), clock=clock).fraction == 1.0
