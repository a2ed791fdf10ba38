"""Success rates from the index: every selected series ends with biomarkers or a reason."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cohortflow.models.database import IndexDB, open_index
from cohortflow.models.outcomes import protocol_outcome
from cohortflow.models.retrieval import ChosenSeries, save_selection, update_retrieval
from cohortflow.models.runs import DONE, ERROR, StepRecord, record_step, step_records
from cohortflow.models.stages import BiomarkerRecord, StageRecord, record_biomarkers, record_stages
from cohortflow.models.volumes import Volumes
from cohortflow.pipelines.dicom.protocols import load_protocols
from cohortflow.pipelines.quality.cohort import recheck_outliers


@pytest.fixture
def index(tmp_path: Path) -> Iterator[IndexDB]:
    db = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield db
    db.dispose()


STAGES = ("anonymize", "deface", "header_qc", "image_qc", "convert", "volumetry", "release")


def _stage(series: str, stage: str, status: str = "pass", code: str | None = None) -> StageRecord:
    return StageRecord(
        series_uid=f"p{series}",
        study_uid="pstudy",
        stage=stage,
        status=status,
        method_version="test",
        protocol="dementia",
        manufacturer="SIEMENS",
        model="Skyra",
        reason_code=code,
    )


def _volumes(series: str, qc: str = "pass") -> BiomarkerRecord:
    return BiomarkerRecord(
        f"p{series}",
        "pstudy",
        Volumes(1500, 700, 500, 200, 1200, 0.8),
        "m",
        "1",
        qc,
        "normal",
        protocol="dementia",
    )


def test_every_selected_series_is_counted_with_its_reason(index: IndexDB) -> None:
    """Six T1s in three studies: measured; failed by header QC; failed by volumetry; never
    retrieved; its study's deface step crashed; retrieved but not yet processed. A FLAIR that
    went through (no image QC or volumetry for it) counts as done, not as stopped."""
    chosen = [
        ChosenSeries("S1", "t1-ok", None, None, "t1_3d", 10),
        ChosenSeries("S1", "flair", None, None, "flair", 10),
        ChosenSeries("S1", "t1-header", None, None, "t1_3d", 10),
        ChosenSeries("S2", "t1-volumetry", None, None, "t1_3d", 10),
        ChosenSeries("S2", "t1-gone", None, None, "t1_3d", 10),
        ChosenSeries("S3", "t1-crash", None, None, "t1_3d", 10),
        ChosenSeries("S4", "t1-later", None, None, "t1_3d", 10),
    ]
    with index.session() as session:
        save_selection(
            session,
            protocol="dementia",
            date_from=dt.date(2020, 1, 1),
            date_to=dt.date(2020, 12, 31),
            pacs="TEST",
            protocols_file="protocols.yaml",
            protocols_sha256="0" * 64,
            studies=4,
            series=chosen,
        )
        for c in chosen:
            status = "failed" if c.series_instance_uid == "t1-gone" else "complete"
            update_retrieval(
                session, c.series_instance_uid, status=status, archived=10, method="move"
            )
        for study, series in (
            ("S1", ["t1-ok", "flair", "t1-header"]),
            ("S2", ["t1-volumetry", "t1-gone"]),
            ("S3", ["t1-crash"]),
            ("S4", ["t1-later"]),
        ):
            linked = {s: f"p{s}" for s in series}
            record_step(
                session,
                StepRecord(
                    "dementia",
                    study,
                    "anonymize",
                    "k",
                    "v",
                    DONE,
                    outputs={"_linked_series": linked},
                ),
            )
        record_step(
            session,
            StepRecord(
                "dementia", "S3", "deface", "k", "v", ERROR, reason_code="deface.internal_error"
            ),
        )
        rows = [_stage("t1-ok", s) for s in STAGES]
        rows += [
            _stage("flair", s) for s in ("anonymize", "deface", "header_qc", "convert", "release")
        ]
        rows += [
            _stage("t1-header", "anonymize"),
            _stage("t1-header", "deface"),
            _stage("t1-header", "header_qc", "fail", "header.missing_slices"),
        ]
        rows += [_stage("t1-volumetry", s) for s in STAGES if s != "volumetry"]
        rows += [_stage("t1-volumetry", "volumetry", "fail", "volumetry.icv_range")]
        rows += [_stage("t1-crash", "anonymize")]
        rows += [_stage("t1-later", "anonymize"), _stage("t1-later", "deface")]
        record_stages(session, rows)
        record_biomarkers(session, [_volumes("t1-ok"), _volumes("t1-volumetry", "fail")])
    with index.session() as session:
        outcome = protocol_outcome(session, "dementia")
    assert (outcome.studies_selected, outcome.studies_with_biomarkers) == (4, 1)
    assert (outcome.t1_series, outcome.t1_with_biomarkers) == (6, 1)
    assert outcome.series_retrieved == 6
    assert outcome.t1_reasons == {
        "header.missing_slices": 1,
        "volumetry.icv_range": 1,
        "retrieve.failed": 1,
        "deface.internal_error": 1,
        "not_processed": 1,
    }
    assert outcome.reason_stage["not_processed"] == "header_qc"
    assert outcome.reason_stage["retrieve.failed"] == "retrieve"
    assert "flair" not in str(outcome.series_reasons)  # the FLAIR went through
    stages = {s.stage: s for s in outcome.stages}
    assert (stages["header_qc"].reached, stages["header_qc"].failed) == (4, 1)
    assert stages["retrieve"].failed == 1 and stages["volumetry"].rate == 0.5
    assert [(g.group, g.t1_series, g.with_biomarkers) for g in outcome.scanners] == [
        ("unknown scanner", 6, 1)  # no series rows in this index
    ]
    assert outcome.as_dict()["t1_rate"] == pytest.approx(1 / 6)


def test_steps_are_replaced_not_added_on_rerun(index: IndexDB) -> None:
    with index.session() as session:
        record_step(session, StepRecord("dementia", "S1", "qc", "k1", "v", ERROR, "qc.error"))
    with index.session() as session:
        record_step(session, StepRecord("dementia", "S1", "qc", "k2", "v", DONE))
    with index.session() as session:
        rows = step_records(session, "dementia")
    assert [(r.step, r.input_key, r.status, r.reason_code) for r in rows] == [
        ("qc", "k2", DONE, None)
    ]


def _image_row(uid: str, snr: float) -> StageRecord:
    return StageRecord(
        series_uid=uid,
        study_uid="s",
        stage="image_qc",
        status="pass",
        method_version="qc-1",
        protocol="dementia",
        manufacturer="SIEMENS",
        model="Skyra",
        metrics={"snrd_wm": snr, "cnr": 3.0, "cjv": 0.4, "efc": 0.5, "fber": 900.0},
    )


def test_outliers_over_a_run_do_not_depend_on_order_and_are_not_added_twice() -> None:
    protocols = load_protocols()
    rows = [_image_row(f"s{i}", 20.0 + 0.1 * i) for i in range(11)] + [_image_row("odd", 2.0)]
    changed = recheck_outliers(rows, protocols, None)
    assert [r.series_uid for r in changed] == ["odd"]
    flagged = changed[0]
    assert flagged.reason_code == "image.outlier.snrd_wm" and flagged.status in ("warn", "fail")
    backwards = recheck_outliers(list(reversed(rows)), protocols, None)
    assert backwards == changed
    # judged again with its outlier finding stored: nothing changes, nothing is added
    again = [flagged if r.series_uid == "odd" else r for r in rows]
    assert recheck_outliers(again, protocols, None) == []


def test_a_run_left_running_is_marked_interrupted_by_the_next(index: IndexDB) -> None:
    from cohortflow.models.runs import finish_run, run_records, start_run

    with index.session() as session:
        killed = start_run(session, "dementia", {}, {})
        other = start_run(session, "ms", {}, {})
    with index.session() as session:
        again = start_run(session, "dementia", {}, {})
        finish_run(session, again, "completed", {"outcome": {}})
    with index.session() as session:
        states = {r.id: r.state for r in run_records(session)}
    assert states == {killed: "interrupted", other: "running", again: "completed"}


def test_a_t1_failed_by_the_run_wide_outlier_check_yields_no_biomarkers(index: IndexDB) -> None:
    """Regression: outliers are judged after volumetry; a T1 they fail had volumes recorded
    and was counted as a success."""
    chosen = [ChosenSeries("S1", "t1", None, None, "t1_3d", 10)]
    with index.session() as session:
        save_selection(
            session,
            protocol="dementia",
            date_from=dt.date(2020, 1, 1),
            date_to=dt.date(2020, 12, 31),
            pacs="TEST",
            protocols_file="protocols.yaml",
            protocols_sha256="0" * 64,
            studies=1,
            series=chosen,
        )
        update_retrieval(session, "t1", status="complete", archived=10, method="move")
        record_step(
            session,
            StepRecord(
                "dementia",
                "S1",
                "anonymize",
                "k",
                "v",
                DONE,
                outputs={"_linked_series": {"t1": "pt1"}},
            ),
        )
        rows = [_stage("t1", s) for s in STAGES if s != "image_qc"]
        rows.append(_stage("t1", "image_qc", "fail", "image.outlier.cjv"))
        record_stages(session, rows)
        record_biomarkers(session, [_volumes("t1")])
    with index.session() as session:
        outcome = protocol_outcome(session, "dementia")
    assert (outcome.t1_series, outcome.t1_with_biomarkers) == (1, 0)
    assert outcome.t1_reasons == {"image.outlier.cjv": 1}
    # nor do its volumes enter the run's biomarker summary
    from cohortflow.pipelines.run.outcome import usable_biomarkers

    with index.session() as session:
        assert usable_biomarkers(session, "dementia") == []


def test_run_and_status_usage_errors_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cohortflow.flows.cli import main

    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    assert main(["run", "nosuch"]) == 2
    assert "protocol 'nosuch'" in capsys.readouterr().err.replace("\n", " ")
    assert main(["run", "dementia", "--from", "2020-02-01", "--to", "2020-01-01"]) == 2
    assert main(["run", "dementia", "--workers", "0"]) == 2
    assert main(["status", "dementia"]) == 2  # never selected
    assert "no selection" in capsys.readouterr().err
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"protocols": []}


def test_a_step_that_crashed_is_redone_and_a_done_one_is_skipped(
    index: IndexDB, tmp_path: Path
) -> None:
    """The resume rule of every flow step: an error row is redone by the next run, a done row
    with the same input key and method version is skipped, a changed key is redone."""
    from cohortflow.models.settings import load_settings
    from cohortflow.pipelines.run.plan import StudyPlan
    from cohortflow.pipelines.run.steps import RunContext, _run_step
    from cohortflow.pipelines.run.workorder import WorkOrder

    ctx = RunContext(load_settings(None, home=tmp_path), "dementia", 1)
    plan = StudyPlan(7, "dementia", "S1", "", "content", ())
    calls: list[str] = []

    def crash() -> tuple[WorkOrder, dict[str, object]]:
        calls.append("crash")
        raise OSError("disk full")

    def work() -> tuple[WorkOrder, dict[str, object]]:
        calls.append("work")
        return WorkOrder(study="2.25.1", folders=("out",)), {"linked_series": {"a": "b"}}

    first = _run_step(ctx, index, plan, "deface", "k1", "v1", crash)
    assert (first.status, first.reason_code) == (ERROR, "deface.internal_error")
    assert "disk full" in (first.message or "")
    second = _run_step(ctx, index, plan, "deface", "k1", "v1", work)
    assert second.done and not second.reused and second.order.folders == ("out",)
    third = _run_step(ctx, index, plan, "deface", "k1", "v1", work)
    # the stored order is read back as it was; the identified extras stay out of it
    assert third.reused and third.order == second.order
    fourth = _run_step(ctx, index, plan, "deface", "k2", "v1", work)  # new input: redone
    assert not fourth.reused
    gone = _run_step(ctx, index, plan, "deface", "k2", "v1", work, lambda _: False)
    assert not gone.reused  # its outputs were removed: redone
    assert calls == ["crash", "work", "work", "work"]
    with index.session() as session:
        rows = step_records(session, "dementia")
    assert len(rows) == 1 and rows[0].outputs["_linked_series"] == {"a": "b"}


def test_a_scanner_without_a_name_is_compared_with_its_kind(index: IndexDB) -> None:
    """Stage rows store a manufacturer or model the header does not give as unknown (None;
    rows of earlier versions hold ""): image QC's cohort of such a series still finds them."""
    from dataclasses import replace

    from cohortflow.models.series import SeriesDescriptor
    from cohortflow.models.stages import StageRecord, cohort_metrics, record_stages

    def row(uid: str, manufacturer: str | None) -> StageRecord:
        d = SeriesDescriptor("dementia", "t1_3d", manufacturer, "", None)
        return StageRecord(
            uid,
            "2.25.1",
            "image_qc",
            "pass",
            "qc-2",
            d.protocol,
            d.role,
            d.manufacturer,
            d.model,
            metrics={"uid": uid},
        )

    old = StageRecord("2.25.12", "2.25.1", "image_qc", "pass", "qc-2", "dementia", "t1_3d", "", "")
    with index.session() as session:
        record_stages(
            session,
            [row("2.25.10", ""), row("2.25.11", "GE"), replace(old, metrics={"uid": "2.25.12"})],
        )
    with index.session() as session:
        found = cohort_metrics(session, "image_qc", "dementia", "", "", ())
        assert sorted(m["uid"] for m in found) == ["2.25.10", "2.25.12"]
        assert [
            m["uid"] for m in cohort_metrics(session, "image_qc", "dementia", "GE", "", ())
        ] == ["2.25.11"]
