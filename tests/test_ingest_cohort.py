"""Ingest of the synthetic cohort: every planted file fault lands with the right status and reason,
the index matches the ground truth, the accounting matches the manifest, a killed run resumes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cohortflow.models.ingest import BatchReport, FileStatus
from cohortflow.models.schema import File, Instance, Series, Study
from cohortflow.models.synth import Fault, SeriesTruth, StudyTruth
from cohortflow.pipelines.ingest.manifest import read_manifest
from cohortflow.pipelines.synth.cohort import CohortResult
from cohortflow.pipelines.synth.scanners import SCANNERS, UNKNOWN_SCANNERS
from cohortflow.pipelines.synth.summary import UNDELIVERED_ACCESSION, write_manifest
from tests.ingest_helpers import Archive, make_archive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ingested(
    cohort: CohortResult, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Archive, BatchReport]]:
    root = tmp_path_factory.mktemp("ingest")
    archive = make_archive(root)
    manifest = write_manifest(cohort.truth, root / "manifest.csv", undelivered=True)
    _, report = archive.ingest(
        cohort.out_dir / "dicom", batch="cohort", manifest=read_manifest(manifest), workers=2
    )
    yield archive, report
    archive.index.dispose()


def _studies(cohort: CohortResult) -> list[StudyTruth]:
    return [s for p in cohort.truth.patients for s in p.studies]


def _series(cohort: CohortResult) -> list[tuple[StudyTruth, SeriesTruth]]:
    return [(st, se) for st in _studies(cohort) for se in st.series]


def _rows(archive: Archive) -> dict[str, File]:
    with archive.index.session() as session:
        return {r.path: r for r in session.scalars(select(File))}


def test_planted_file_faults_land_with_the_right_status(
    cohort: CohortResult, ingested: tuple[Archive, BatchReport]
) -> None:
    archive, _ = ingested
    rows = _rows(archive)
    by_folder: dict[str, list[File]] = {}
    for path, row in rows.items():
        folder = Path(path).parent.relative_to(cohort.out_dir).as_posix()
        by_folder.setdefault(folder, []).append(row)
    checked: Counter[Fault] = Counter()
    for _, se in _series(cohort):
        files = by_folder[se.folder]
        assert len(files) == se.files, se.folder
        statuses = Counter(r.status for r in files)
        if Fault.TRUNCATED_FILE in se.faults:
            bad = [r for r in files if r.status == FileStatus.CORRUPT.value]
            assert len(bad) == 1 and bad[0].reason_code == "truncated_pixel_data"
            assert "cut short" in bad[0].reason
            checked[Fault.TRUNCATED_FILE] += 1
        if Fault.NO_PREAMBLE in se.faults:
            legacy = [r for r in files if r.status == FileStatus.LEGACY.value]
            assert len(legacy) >= se.files - 1  # all but a truncated one, if planted too
            assert all(r.reason_code == "no_preamble" for r in legacy)
            checked[Fault.NO_PREAMBLE] += 1
        else:
            assert statuses[FileStatus.LEGACY.value] == 0
        if Fault.DUPLICATE_INSTANCE in se.faults:
            hashes = Counter(r.sha256 for r in files)
            assert max(hashes.values()) == 2 and se.files == se.instances + 1
            assert sum(not r.new_content for r in files) == 1
            checked[Fault.DUPLICATE_INSTANCE] += 1
    for study in _studies(cohort):
        for name in study.non_dicom_files:
            row = rows[str(cohort.out_dir / name)]
            assert row.status == FileStatus.NOT_DICOM.value and row.reason.startswith("not DICOM")
            checked[Fault.NON_DICOM] += 1
    planted = cohort.truth.fault_counts
    for fault in (Fault.TRUNCATED_FILE, Fault.NO_PREAMBLE, Fault.DUPLICATE_INSTANCE):
        assert checked[fault] == planted[fault].planted >= 1, fault
    assert checked[Fault.NON_DICOM] >= planted[Fault.NON_DICOM].planted >= 1


def test_encodings_and_multiframe_indexed(
    cohort: CohortResult, ingested: tuple[Archive, BatchReport]
) -> None:
    archive, _ = ingested
    with archive.index.session() as session:
        for _, se in _series(cohort):
            series = session.scalar(
                select(Series).where(Series.series_instance_uid == se.series_instance_uid)
            )
            assert series is not None, se.folder
            assert series.protocol_name == se.protocol_name
            assert series.series_description == se.series_description
            assert (series.rows, series.columns) == (se.rows, se.columns)
            if se.orientation != "mixed" and se.kind != "burned_in_sc":  # SC: no geometry
                assert series.orientation == se.orientation, se.folder
            syntaxes = set(
                session.scalars(
                    select(Instance.transfer_syntax_uid).where(Instance.series_pk == series.id)
                )
            )
            assert syntaxes <= {se.transfer_syntax_uid}
            if Fault.ENHANCED_MULTIFRAME in se.faults:
                frames = session.scalar(
                    select(Instance.number_of_frames).where(Instance.series_pk == series.id)
                )
                assert frames == se.slices
                # taken from the functional groups, as for the classic series
                assert series.repetition_time and series.pixel_spacing_row
                assert series.slice_thickness and series.image_orientation


def test_index_matches_the_ground_truth(
    cohort: CohortResult, ingested: tuple[Archive, BatchReport]
) -> None:
    archive, report = ingested
    studies = _studies(cohort)
    truncated = cohort.truth.fault_counts[Fault.TRUNCATED_FILE].planted
    assert report.patients == len(cohort.truth.patients)
    assert report.studies == len(studies)
    assert report.series == sum(len(s.series) for s in studies)
    assert report.instances == sum(se.instances for _, se in _series(cohort)) - truncated
    assert report.files == sum(se.files for _, se in _series(cohort)) + sum(
        len(s.non_dicom_files) for s in studies
    )
    with archive.index.session() as session:
        dates = {
            uid: (d.strftime("%Y%m%d") if d else None, acc)
            for uid, d, acc in session.execute(
                select(Study.study_instance_uid, Study.study_date, Study.accession_number)
            )
        }
        blobs = session.scalar(select(func.count(func.distinct(File.sha256))))
    for study in studies:
        assert dates[study.study_instance_uid] == (study.study_date, study.accession_number)
    assert len(list(archive.store.iter_blob_files())) == blobs == report.new_content


def test_duplicate_accession_and_unknown_scanners_reported(
    cohort: CohortResult, ingested: tuple[Archive, BatchReport]
) -> None:
    _, report = ingested
    studies = _studies(cohort)
    accessions = Counter(s.accession_number for s in studies)
    shared = {a for a, n in accessions.items() if n > 1}
    assert shared and {c.accession_number for c in report.accession_conflicts} == shared
    for conflict in report.accession_conflicts:
        expected = {
            s.study_instance_uid for s in studies if s.accession_number == conflict.accession_number
        }
        assert set(conflict.study_instance_uids) == expected
    unknown = {(s.manufacturer, s.model) for s in UNKNOWN_SCANNERS}
    planted = {(s.manufacturer, s.model) for s in studies if Fault.UNKNOWN_SCANNER in s.faults}
    assert planted and planted <= unknown
    alerted = {(a.manufacturer, a.model) for a in report.scanner_alerts}
    assert alerted == planted
    assert not alerted & {(s.manufacturer, s.model) for s in SCANNERS}


def test_manifest_accounting_of_the_cohort(
    cohort: CohortResult, ingested: tuple[Archive, BatchReport]
) -> None:
    _, report = ingested
    lines = {line.accession_number: line for line in report.manifest_lines}
    assert lines[UNDELIVERED_ACCESSION].status == "missing"
    assert report.manifest == "incomplete" and report.unexpected_studies == []
    for study in _studies(cohort):
        line = lines[study.accession_number]
        faults = {
            f
            for other in _studies(cohort)
            if other.accession_number == study.accession_number
            for se in other.series
            for f in se.faults
        }
        if Fault.TRUNCATED_FILE in faults:
            assert line.status == "incomplete", line
        elif line.studies > 1:
            assert line.status == "duplicated" and "accession" in line.detail
        elif Fault.DUPLICATE_INSTANCE in faults:
            assert line.status == "duplicated" and "more than once" in line.detail
        else:
            assert line.status == "complete", line


def test_known_scanner_list_agrees_with_the_generator() -> None:
    from cohortflow.models.scanners import load_known_scanners

    known = load_known_scanners()
    for scanner in SCANNERS:
        verdict = known.check(scanner.manufacturer, scanner.model, scanner.software_versions)
        assert verdict.known, verdict.reason
    for scanner in UNKNOWN_SCANNERS:
        assert not known.check(scanner.manufacturer, scanner.model, scanner.software_versions).known


@pytest.mark.integration
def test_killed_ingest_resumes_with_one_row_per_file(cohort: CohortResult, tmp_path: Path) -> None:
    """SIGKILL in the middle of a batch, then a rerun: every file once, archive consistent."""
    home = tmp_path / "home"
    env = {**os.environ, "COHORTFLOW_HOME": str(home)}
    command = [
        sys.executable,
        "-m",
        "cohortflow",
        "ingest",
        str(cohort.out_dir / "dicom"),
        "--batch",
        "killed",
        "--workers",
        "2",
    ]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    database = home / "index.sqlite"
    deadline = time.monotonic() + 120
    indexed = 0
    while time.monotonic() < deadline and process.poll() is None:
        if database.exists():
            try:
                with sqlite3.connect(database, timeout=1) as connection:
                    indexed = connection.execute("SELECT count(*) FROM files").fetchone()[0]
            except sqlite3.OperationalError:
                indexed = 0
            if indexed >= 500:
                break
        time.sleep(0.05)
    assert process.poll() is None, "ingest finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    total = sum(1 for _, _, files in os.walk(cohort.out_dir / "dicom") for _ in files)
    assert 0 < indexed < total

    rerun = subprocess.run(
        [*command, "--json"], env=env, capture_output=True, text=True, check=False, timeout=600
    )
    assert rerun.returncode == 1, rerun.stderr  # the cohort has corrupt files: exit status 1
    with sqlite3.connect(database) as connection:
        rows, paths = connection.execute(
            "SELECT count(*), count(DISTINCT path) FROM files"
        ).fetchone()
        blobs = connection.execute("SELECT count(*) FROM blobs").fetchone()[0]
        state = connection.execute("SELECT state FROM batches").fetchone()[0]
    assert rows == paths == total
    assert state == "complete"
    stored = [p for p in (home / "archive" / "blobs").rglob("*") if p.is_file()]
    assert len([p for p in stored if not p.name.startswith(".")]) == blobs
    verify = subprocess.run(
        [sys.executable, "-m", "cohortflow", "verify", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert verify.returncode == 0, verify.stdout
