"""QC on the synthetic cohort: every planted fault caught by the right check, clean series pass;
the command line, the index records (idempotent) and the outlier comparison with the index."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import cache
from pathlib import Path

import pytest

from cohortflow.flows.cli import main
from cohortflow.models.database import open_index
from cohortflow.models.scanners import load_known_scanners
from cohortflow.models.settings import load_settings
from cohortflow.models.stages import StageRecord, record_stages, stage_records
from cohortflow.models.synth import Fault
from cohortflow.pipelines.atlas.template import Template, load_brain_template
from cohortflow.pipelines.dicom.keys import ProjectKey
from cohortflow.pipelines.dicom.protocols import load_protocols
from cohortflow.pipelines.quality.folder import HEADER, IMAGE, QcReport, qc_folder
from cohortflow.pipelines.synth.cohort import CohortResult
from cohortflow.pipelines.synth.scoring import QC_EXPECTED, score_qc


@pytest.fixture(scope="module")
def cohort_qc(cohort: CohortResult, model_cache: Path) -> QcReport:
    template = cache(lambda: load_brain_template(model_cache))
    return qc_folder(cohort.out_dir / "dicom", load_protocols(), load_known_scanners(), template)


@pytest.mark.slow
def test_every_planted_fault_is_caught_by_its_check_and_clean_series_pass(
    cohort: CohortResult, cohort_qc: QcReport, figures: Callable[[str], None]
) -> None:
    score = score_qc(cohort.truth, cohort_qc.series)
    figures(
        "QC confusion table (test cohort)\n"
        + "\n".join(
            f"{cls.name:20s} series {cls.series:3d} caught {cls.caught:3d} reason {cls.decided:3d} "
            f"rejected {cls.rejected:3d} checks {dict(sorted(cls.checks.items()))}"
            for cls in score.classes
        )
    )
    assert score.unmatched == 0
    planted = {
        f for p in cohort.truth.patients for st in p.studies for se in st.series for f in se.faults
    }
    planted |= {f for p in cohort.truth.patients for st in p.studies for f in st.faults}
    for fault in QC_EXPECTED:
        cls = score.of(fault.value)
        assert cls is not None
        if fault not in planted or cls.series == 0:
            continue
        assert cls.caught == cls.series, f"{fault.value}: {cls.caught} of {cls.series} caught"
        if fault is not Fault.UNKNOWN_SCANNER:
            assert cls.rejected == cls.series, fault.value
    assert {f.value for f in QC_EXPECTED if f in planted} - {"truncated_file"} <= {
        c.name for c in score.classes if c.series
    }
    clean = score.of("clean")
    assert clean is not None and clean.series >= 20
    assert clean.rejected <= 0.02 * clean.series, clean.checks
    # every series that failed says why, in words and with its check id
    for series in cohort_qc.series:
        if series.verdict.value != "pass":
            assert series.reason is not None and series.reason.message


@pytest.mark.slow
def test_each_3d_t1_gets_both_stages_and_the_others_header_qc_only(
    cohort: CohortResult, cohort_qc: QcReport
) -> None:
    roles = {s.role for s in cohort_qc.series}
    assert {"t1_3d", "flair"} <= roles
    for s in cohort_qc.series:
        names = [st.stage for st in s.stages]
        assert names == ([HEADER, IMAGE] if s.role == "t1_3d" else [HEADER]), s.folder
        if s.role == "t1_3d":
            metrics = s.stages[1].metrics
            if not any(f.check == "image.unreadable" for f in s.stages[1].findings):
                assert {"snrd_wm", "cnr", "cjv", "efc", "fber", "wm2max", "qi1"} <= set(metrics)
    reasons = {n.reason_code for n in cohort_qc.not_checked}
    assert reasons <= {"not_selected", "no_protocol", "unreadable"}
    body = any(st.protocol in ("knee", "spine") for p in cohort.truth.patients for st in p.studies)
    assert ("no_protocol" in reasons) == body  # knee and spine studies match no brain protocol


@pytest.mark.slow
def test_cli_records_results_in_the_index_once_and_compares_with_them(
    cohort: CohortResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    model_cache: Path,
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("COHORTFLOW_HOME", str(home))
    monkeypatch.setenv("COHORTFLOW_CACHE_DIR", str(model_cache))
    truth = cohort.truth
    study = next(  # a brain study whose T1 carries no fault QC should reject
        st
        for p in truth.patients
        for st in p.studies
        if st.volumes is not None
        and not set(st.faults) & set(QC_EXPECTED)
        and any(se.kind == "t1_3d" and not set(se.faults) & set(QC_EXPECTED) for se in st.series)
    )
    folder = cohort.out_dir / study.folder
    code = main(["qc", str(folder), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == (1 if out["failed"] else 0)
    t1 = next(s for s in out["series"] if s["role"] == "t1_3d")
    assert t1["verdict"] == "pass" and t1["protocol"] == study.protocol
    assert [st["stage"] for st in t1["stages"]] == [HEADER, IMAGE]
    assert t1["stages"][1]["metrics"]["snrd_wm"] > 8
    index = open_index(f"sqlite:///{home / 'index.sqlite'}")
    key = ProjectKey.load(str(load_settings().pseudonym_key_source))
    try:
        with index.session() as session:
            first = stage_records(session)
        assert len(first) == sum(len(s["stages"]) for s in out["series"])
        # the folder was not de-identified: its results are kept under the UIDs the anonymizer
        # gives it, and no real UID reaches the de-identified side (the dashboard reads these)
        real = {s["series"] for s in out["series"]} | {s["study"] for s in out["series"]}
        assert not real & ({r.series_uid for r in first} | {r.study_uid for r in first})
        assert {r.series_uid for r in first} == {key.uid(s["series"]) for s in out["series"]}
        t1_pseudo = key.uid(t1["series"])
        row = next(r for r in first if r.series_uid == t1_pseudo and r.stage == IMAGE)
        assert row.status == "pass" and row.protocol == study.protocol and row.input_sha256
        assert row.metrics["snrd_wm"] == t1["stages"][1]["metrics"]["snrd_wm"]
        # a rerun replaces, never duplicates
        assert main(["qc", str(folder)]) == code
        capsys.readouterr()
        with index.session() as session:
            again = stage_records(session)
        assert len(again) == len(first)
        # ten earlier T1s of the same protocol and scanner with a much higher SNR: this one is
        # now an outlier (a warning), judged against the index
        peers = [
            StageRecord(
                series_uid=f"2.25.{n}",
                study_uid=f"2.25.{n}0",
                stage=IMAGE,
                status="pass",
                method_version="qc-1",
                protocol=study.protocol,
                manufacturer=row.manufacturer,
                model=row.model,
                metrics={"snrd_wm": 200.0 + n},
            )
            for n in range(12)
        ]
        with index.session() as session:
            record_stages(session, peers)
        assert main(["qc", str(folder), "--json", "--no-record"]) == code
        out = json.loads(capsys.readouterr().out)
        t1 = next(s for s in out["series"] if s["role"] == "t1_3d")
        checks = [f["check"] for f in t1["stages"][1]["findings"]]
        assert "image.outlier.snrd_wm" in checks and t1["verdict"] == "warn"
        with index.session() as session:
            assert len(stage_records(session)) == len(first) + len(peers)  # --no-record
    finally:
        index.dispose()


def test_cli_usage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    assert main(["qc", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["qc", str(tmp_path / "empty"), "--protocol", "dementa"]) == 2


@pytest.mark.slow
def test_a_failure_in_one_series_never_stops_the_others(
    cohort: CohortResult, tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cohortflow.pipelines.quality import folder as quality

    study = next(st for p in cohort.truth.patients for st in p.studies if st.protocol == "ms")
    source = tmp_path / "study"
    shutil.copytree(cohort.out_dir / study.folder, source)
    real = quality.image_stage

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(quality, "image_stage", broken)
    template: Template = load_brain_template(model_cache)
    report = qc_folder(source, load_protocols(), None, lambda: template)
    monkeypatch.setattr(quality, "image_stage", real)
    t1 = [s for s in report.series if s.role == "t1_3d"]
    others = [s for s in report.series if s.role != "t1_3d"]
    assert t1 and others
    for s in t1:
        assert s.reason is not None and s.reason.check == "qc.internal_error"
        assert "RuntimeError: disk on fire" in s.reason.message
    for s in others:  # checked as usual
        assert [st.stage for st in s.stages] == [HEADER]
        assert not any(f.check == "qc.internal_error" for f in s.stages[0].findings)


@pytest.mark.slow
def test_qc_flow_runs_in_prefect_and_returns_counts_only(
    cohort: CohortResult,
    tmp_path: Path,
    model_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    prefect_harness: Callable[[], AbstractContextManager[None]],
) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COHORTFLOW_CACHE_DIR", str(model_cache))
    from cohortflow.flows.qc_flow import qc_flow

    study = next(st for p in cohort.truth.patients for st in p.studies if st.protocol == "ms")
    source = tmp_path / "delivery"
    shutil.copytree(cohort.out_dir / study.folder, source / Path(study.folder).name)
    with prefect_harness():
        summary = qc_flow(source=source)
    assert summary.checked == len(
        [se for se in study.series if se.kind not in ("localizer", "burned_in_sc")]
    )
    assert summary.passed + summary.warned + summary.failed == summary.checked
    assert summary.not_checked.get("not_selected", 0) >= 1  # the localizer
    assert all(k.startswith(("header.", "image.", "qc.")) for k in summary.reasons)
    index = open_index(f"sqlite:///{tmp_path / 'home' / 'index.sqlite'}")
    try:
        with index.session() as session:
            assert len({r.series_uid for r in stage_records(session, HEADER)}) == summary.checked
    finally:
        index.dispose()


@pytest.mark.slow
def test_a_study_without_its_t1_fails_but_one_series_folder_is_judged_alone(
    cohort: CohortResult, tmp_path: Path
) -> None:
    study = next(
        st
        for p in cohort.truth.patients
        for st in p.studies
        if st.volumes is not None
        and any(se.kind == "flair_2d" and not se.faults for se in st.series)
    )
    flair = next(se for se in study.series if se.kind == "flair_2d" and not se.faults)
    without_t1 = tmp_path / "study"
    for se in study.series:
        if se.kind not in ("t1_3d", "t1_post"):
            shutil.copytree(cohort.out_dir / se.folder, without_t1 / Path(se.folder).name)
    protocols, never = load_protocols(), lambda: pytest.fail("no T1: no template needed")
    report = qc_folder(without_t1, protocols, None, never)  # type: ignore[arg-type,return-value]
    checked = [s for s in report.series if s.series == flair.series_instance_uid]
    assert checked and checked[0].reason is not None
    assert checked[0].reason.check == "header.missing_required_series"
    assert checked[0].reason.value == "t1_3d"
    alone = qc_folder(cohort.out_dir / flair.folder, protocols, None, never)  # type: ignore[arg-type,return-value]
    (series,) = alone.series
    assert series.role == "flair" and series.verdict.value == "pass", series.stages
