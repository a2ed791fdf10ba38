"""Ingest on real DICOM files (pydicom's bundled ones) and on every kind of bad input."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from cohortflow.flows.cli import main
from cohortflow.models.database import SCHEMA_REVISION, IndexDB, head_revision, open_index
from cohortflow.models.errors import IndexDatabaseError, ManifestError
from cohortflow.models.ingest import FileStatus
from cohortflow.models.schema import Base, Blob, File, Instance, Scanner
from cohortflow.pipelines.dicom.reader import read_path
from cohortflow.pipelines.ingest.engine import ingest_chunk
from cohortflow.pipelines.ingest.manifest import read_manifest
from tests.ingest_helpers import PYDICOM_FILES, Archive, make_archive, open_at_once, pydicom_file


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    made = make_archive(tmp_path / "home")
    yield made
    made.index.dispose()


def _files(index: IndexDB, batch_id: int | None = None) -> list[File]:
    with index.session() as session:
        query = select(File).order_by(File.path)
        if batch_id is not None:
            query = query.where(File.batch_id == batch_id)
        return list(session.scalars(query))


# --- pydicom's bundled files: each lands with the right status and reason ---------------------

EXPECTED = {
    "MR_small.dcm": (FileStatus.MODERN, "ok"),
    "CT_small.dcm": (FileStatus.MODERN, "ok"),
    "MR_small_implicit.dcm": (FileStatus.MODERN, "ok"),
    "MR_small_bigendian.dcm": (FileStatus.MODERN, "ok"),
    "ExplVR_BigEnd.dcm": (FileStatus.MODERN, "ok"),
    "image_dfl.dcm": (FileStatus.MODERN, "ok"),  # deflated transfer syntax
    "MR_small_RLE.dcm": (FileStatus.MODERN, "ok"),
    "JPEG2000.dcm": (FileStatus.MODERN, "ok"),
    "badVR.dcm": (FileStatus.MODERN, "ok"),  # readable; the invalid value becomes a note
    "meta_missing_tsyntax.dcm": (FileStatus.MODERN, "no_identity"),
    "dicomdirtests/DICOMDIR": (FileStatus.MODERN, "ok"),
    # 4:2:2 chroma subsampling: two samples per pixel, not three (regression)
    "SC_ybr_full_422_uncompressed.dcm": (FileStatus.MODERN, "ok"),
    "ExplVR_BigEndNoMeta.dcm": (FileStatus.LEGACY, "no_preamble"),
    "ExplVR_LitEndNoMeta.dcm": (FileStatus.LEGACY, "no_preamble"),
    "rtstruct.dcm": (FileStatus.LEGACY, "no_preamble"),
    "MR_truncated.dcm": (FileStatus.CORRUPT, "truncated_pixel_data"),
    "rtplan_truncated.dcm": (FileStatus.CORRUPT, "truncated"),
    # CT_small without its file meta, but with one stray byte in front of the data set
    "no_meta.dcm": (FileStatus.CORRUPT, "misaligned"),
    "zipMR.gz": (FileStatus.NOT_DICOM, "not_dicom"),
    "README.txt": (FileStatus.NOT_DICOM, "not_dicom"),
    "crayons.icc": (FileStatus.NOT_DICOM, "not_dicom"),
    "test1.json": (FileStatus.NOT_DICOM, "not_dicom"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pydicom_file_classified(name: str) -> None:
    record, data = read_path(str(pydicom_file(name)))
    status, code = EXPECTED[name]
    assert (record.status, record.reason_code) == (status, code), record.reason
    assert data is not None and record.sha256 is not None and record.size == len(data)
    if status.is_dicom and code != "no_identity":
        assert record.header is not None and record.header.sop_instance_uid
    if status == FileStatus.LEGACY:
        assert "no 128-byte preamble" in record.reason and "endian" in record.reason
    if status == FileStatus.CORRUPT:
        assert record.reason and record.header is None


def test_reasons_name_what_is_wrong() -> None:
    assert "gzip" in read_path(str(pydicom_file("zipMR.gz")))[0].reason
    assert "text file" in read_path(str(pydicom_file("README.txt")))[0].reason
    assert "cut short" in read_path(str(pydicom_file("MR_truncated.dcm")))[0].reason
    assert "stray bytes" in read_path(str(pydicom_file("no_meta.dcm")))[0].reason
    bad_vr = read_path(str(pydicom_file("badVR.dcm")))[0]
    assert "invalid NumberOfFrames value '1A'" in bad_vr.notes


def test_header_fields_read_without_pixel_data() -> None:
    record, _ = read_path(str(pydicom_file("MR_small.dcm")))
    h = record.header
    assert h is not None
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    assert h.sop_instance_uid == ds.SOPInstanceUID
    assert h.series_instance_uid == ds.SeriesInstanceUID
    assert h.modality == "MR"
    assert (h.rows, h.columns) == (ds.Rows, ds.Columns)
    assert h.repetition_time == float(ds.RepetitionTime)
    assert h.echo_time == float(ds.EchoTime)
    assert h.pixel_spacing_row == float(ds.PixelSpacing[0])
    assert h.orientation == "axial"
    assert h.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID


def test_every_local_pydicom_file_lands_in_the_index(archive: Archive) -> None:
    outcome, report = archive.ingest(PYDICOM_FILES, batch="pydicom", workers=2)
    on_disk = sum(len(files) for _, _, files in os.walk(PYDICOM_FILES))
    assert outcome.seen == on_disk == report.files
    rows = _files(archive.index)
    assert len(rows) == on_disk == len({r.path for r in rows})
    assert all(r.status in {s.value for s in FileStatus} and r.reason_code for r in rows)
    assert not any(r.status == FileStatus.UNREADABLE.value for r in rows)
    by_name = {Path(r.path).relative_to(PYDICOM_FILES).as_posix(): r for r in rows}
    for name, (status, code) in EXPECTED.items():
        assert (by_name[name].status, by_name[name].reason_code) == (status.value, code), name
    # the DICOMDIR is DICOM but belongs to no series
    dicomdir = by_name["dicomdirtests/DICOMDIR"]
    assert "not placed in a series" in dicomdir.notes


# --- bad input: every path ends in the index with a status and a reason ------------------------


def _setuid_read(path: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    os.setgid(65534)
    os.setuid(65534)  # nobody: permission bits apply again (root ignores them)
    record, _ = read_path(path)
    queue.put((record.status.value, record.reason_code, record.reason))


def test_unreadable_permissions(tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="cohortflow-perm-"))
    try:
        folder.chmod(0o755)
        locked = folder / "IM0001.dcm"
        shutil.copy(pydicom_file("MR_small.dcm"), locked)
        locked.chmod(0)
        if os.geteuid() == 0:
            context = multiprocessing.get_context("fork")
            queue = context.Queue()
            child = context.Process(target=_setuid_read, args=(str(locked), queue))
            child.start()
            child.join(30)
            status, code, reason = queue.get(timeout=5)
        else:
            record, _ = read_path(str(locked))
            status, code, reason = record.status.value, record.reason_code, record.reason
        assert (status, code) == ("unreadable", "permission_denied")
        assert "permission denied" in reason
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_bad_input_of_every_kind(tmp_path: Path, archive: Archive) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "empty.dcm").write_bytes(b"")
    (drop / "garbage.dcm").write_bytes(os.urandom(5000))
    (drop / "tiny.dcm").write_bytes(b"\x08\x00")
    data = pydicom_file("MR_small.dcm").read_bytes()
    (drop / "cut.dcm").write_bytes(data[:200])  # inside the file meta
    (drop / "cut_header.dcm").write_bytes(data[:700])  # inside the data set
    (drop / "IM0002.dcm").mkdir()  # a directory named like a file, with a file inside
    (drop / "IM0002.dcm" / "IM0001").write_bytes(data)
    (drop / "dangling.dcm").symlink_to(drop / "nowhere")
    (drop / "passwd.dcm").symlink_to("/etc/passwd")  # out of the delivery: never archived
    os.mkfifo(drop / "fifo.dcm")  # reading it would block forever
    odd = os.path.join(os.fsencode(drop), b"odd name \xff\n\xc3\xa9.dcm")
    with open(odd, "wb") as handle:
        handle.write(data)

    outcome, report = archive.ingest(drop, batch="bad")
    rows = {Path(r.path).name: r for r in _files(archive.index)}
    assert outcome.seen == len(rows) == 10
    expect = {
        "empty.dcm": ("corrupt", "empty"),
        "garbage.dcm": ("not_dicom", "not_dicom"),
        "tiny.dcm": ("not_dicom", "not_dicom"),
        "dangling.dcm": ("unreadable", "symlink"),
        "passwd.dcm": ("unreadable", "symlink"),
        "fifo.dcm": ("unreadable", "not_regular_file"),
        "IM0001": ("modern", "ok"),
    }
    for name, (status, code) in expect.items():
        assert (rows[name].status, rows[name].reason_code) == (status, code), rows[name].reason
    assert rows["cut.dcm"].status == rows["cut_header.dcm"].status == "corrupt"
    odd_row = next(r for n, r in rows.items() if n.startswith("odd name"))
    assert odd_row.status == "modern" and "\\xff" in odd_row.path
    assert "/etc/passwd" in rows["passwd.dcm"].reason and rows["passwd.dcm"].sha256 is None
    assert report.failed  # corrupt and unreadable files: exit status 1 at the command line
    assert all(p.reason for p in report.problems)

    # a directory handed over explicitly as a file (as the retrieval step hands over paths)
    with archive.index.session() as session:
        batch_id = session.scalar(select(File.batch_id).limit(1))
    assert batch_id is not None
    ingest_chunk(
        archive.index, archive.store, batch_id, [str(drop / "IM0002.dcm")], archive.scanners
    )
    directory = next(r for r in _files(archive.index) if r.path.endswith("IM0002.dcm"))
    assert (directory.status, directory.reason_code) == ("unreadable", "is_directory")


def test_cli_never_raises_on_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "empty").write_bytes(b"")
    shutil.copy(pydicom_file("MR_small.dcm"), drop / "ok.dcm")
    assert main(["ingest", str(drop), "--workers", "1"]) == 1
    assert main(["ingest", str(tmp_path / "nope")]) == 2
    assert main(["ingest", str(drop), "--manifest", str(tmp_path / "missing.csv")]) == 2
    assert main(["report", "batch", "unknown"]) == 2


def test_ingest_json_is_one_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(pydicom_file("MR_small.dcm"), drop / "a.dcm")
    assert main(["ingest", str(drop), "--batch", "one", "--json", "--workers", "1"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["report"]["batch"] == "one"
    assert payload["report"]["manifest"] == "no manifest"
    assert payload["ingest"]["processed"] == 1
    assert main(["report", "batch", "one", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 1


# --- incremental, duplicates, conflicts ------------------------------------------------------


def test_rerun_does_no_work_and_changes_are_noticed(tmp_path: Path, archive: Archive) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    for name in ("MR_small.dcm", "CT_small.dcm", "MR_small_implicit.dcm"):
        shutil.copy(pydicom_file(name), drop / name)
    first, _ = archive.ingest(drop)
    assert first.processed == 3
    again, _ = archive.ingest(drop)
    assert (again.processed, again.unchanged) == (0, 3)

    touched = drop / "CT_small.dcm"
    os.utime(touched, ns=(1, 1))  # same content, new mtime: in doubt, the hash decides
    third, report = archive.ingest(drop)
    assert (third.processed, third.unchanged) == (1, 2)
    assert report.files == 3 and report.identical_copies == 0

    changed = drop / "MR_small.dcm"
    ds = pydicom.dcmread(changed)
    ds.SeriesDescription = "edited after delivery"
    ds.save_as(changed)
    fourth, report = archive.ingest(drop)
    assert fourth.processed == 1
    rows = _files(archive.index)
    assert len(rows) == 3  # still one row per path
    with archive.index.session() as session:
        assert session.scalar(select(func.count()).select_from(Blob)) == 4  # old kept too
    assert len(list(archive.store.iter_blob_files())) == 4


def test_identical_files_stored_once_and_batch_delivered_twice(
    tmp_path: Path, archive: Archive
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(pydicom_file("MR_small.dcm"), drop / "a.dcm")
    shutil.copy(pydicom_file("MR_small.dcm"), drop / "a_copy.dcm")
    shutil.copy(pydicom_file("CT_small.dcm"), drop / "b.dcm")
    _, first = archive.ingest(drop, batch="first")
    assert (first.new_content, first.identical_copies) == (2, 1)
    assert len(list(archive.store.iter_blob_files())) == 2

    again = tmp_path / "again"
    shutil.copytree(drop, again)  # the same delivery, sent again to another folder
    outcome, second = archive.ingest(again, batch="second")
    assert outcome.processed == 3 and second.new_content == 0
    assert second.delivered_before == ["first"]
    outcome, third = archive.ingest(drop, batch="third")  # the very same folder, another name
    assert (outcome.processed, outcome.reused) == (0, 3)
    assert third.delivered_before == ["first", "second"]
    assert len(list(archive.store.iter_blob_files())) == 2


def test_same_sop_instance_uid_with_other_content_keeps_both(
    tmp_path: Path, archive: Archive
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(pydicom_file("MR_small.dcm"), drop / "original.dcm")
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.WindowCenter = 1234  # same SOPInstanceUID, other content
    ds.save_as(drop / "resent.dcm")
    _, report = archive.ingest(drop)
    assert [(c.sop_instance_uid, c.versions) for c in report.sop_conflicts] == [
        (ds.SOPInstanceUID, 2)
    ]
    with archive.index.session() as session:
        flags = list(session.scalars(select(Instance.sop_conflict)))
    assert flags == [True, True]
    assert report.instances == 1 and report.new_content == 2


def test_unknown_scanner_recorded_and_alerted(tmp_path: Path, archive: Archive) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = (
        "SIEMENS",
        "Prisma_fit",
        "syngo MR E11",
    )
    ds.save_as(drop / "known.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()  # after a software upgrade
    ds.SoftwareVersions = "syngo MR XA99"
    ds.save_as(drop / "new_software.dcm")
    _, report = archive.ingest(drop)
    assert [(a.model, a.software_versions) for a in report.scanner_alerts] == [
        ("Prisma_fit", "syngo MR XA99")
    ]
    assert "software version" in report.scanner_alerts[0].reason
    with archive.index.session() as session:
        scanners = {(s.software_versions, s.known) for s in session.scalars(select(Scanner))}
    assert scanners == {("syngo MR E11", True), ("syngo MR XA99", False)}


# --- manifests ---------------------------------------------------------------------------------


def test_manifest_formats_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "m.csv"
    good.write_text("\ufeffAccession Number;Expected Files\nA1;3\nA2;\nA1;3\n", encoding="utf-8")
    rows = read_manifest(good).rows
    assert [(r.accession_number, r.expected_files) for r in rows] == [("A1", 3), ("A2", None)]
    bad = {
        "no_column.csv": ("PatientName,Files\nX,1\n", "no AccessionNumber column"),
        "bad_count.csv": ("AccessionNumber,ExpectedFiles\nA1,many\n", "line 2"),
        "conflict.csv": ("AccessionNumber,ExpectedFiles\nA1,3\nA1,4\n", "listed again"),
        "empty.csv": ("", "empty"),
    }
    for name, (text, message) in bad.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ManifestError, match=message) as caught:
            read_manifest(path)
        assert name in str(caught.value)


def test_manifest_accounting(tmp_path: Path, archive: Archive) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    base = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    for study, accession, count in (("1", "ACC1", 3), ("2", "ACC2", 2), ("3", "ACC9", 1)):
        study_uid = f"1.2.826.0.1.3680043.10.1.{study}"
        for i in range(count):
            base.StudyInstanceUID = study_uid
            base.SeriesInstanceUID = study_uid + ".1"
            base.SOPInstanceUID = f"{study_uid}.{i}"
            base.AccessionNumber = accession
            base.save_as(drop / f"s{study}_{i}.dcm")
    shutil.copy(drop / "s1_0.dcm", drop / "s1_0_again.dcm")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("AccessionNumber,ExpectedFiles\nACC1,3\nACC2,5\nACC3,1\n", encoding="utf-8")
    _, report = archive.ingest(drop, manifest=read_manifest(manifest))
    lines = {line.accession_number: line.status for line in report.manifest_lines}
    assert lines == {"ACC1": "duplicated", "ACC2": "incomplete", "ACC3": "missing"}
    assert [s.accession_number for s in report.unexpected_studies] == ["ACC9"]
    assert report.manifest == "incomplete" and report.failed

    _, without = archive.ingest(drop, batch="no-manifest")
    assert without.manifest == "no manifest" and not without.failed


# --- the index itself ----------------------------------------------------------------------------


def test_migrations_match_the_models(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    index = open_index(f"sqlite:///{tmp_path / 'i.sqlite'}")
    with index.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []
    with index.engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    index.dispose()
    with pytest.raises(IndexDatabaseError, match="newer cohortflow"):
        open_index(f"sqlite:///{tmp_path / 'i.sqlite'}")
    assert head_revision() == SCHEMA_REVISION


def test_verify_finds_changed_missing_and_untracked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("COHORTFLOW_HOME", str(home))
    drop = tmp_path / "drop"
    drop.mkdir()
    for name in ("MR_small.dcm", "CT_small.dcm", "rtplan.dcm", "rtdose.dcm"):
        shutil.copy(pydicom_file(name), drop / name)
    assert main(["ingest", str(drop), "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["verify", "--json"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert (clean["checked"], clean["ok"], clean["untracked"]) == (4, 4, 0)
    blobs = sorted((home / "archive" / "blobs").rglob("*"))
    files = [b for b in blobs if b.is_file()]
    files[0].chmod(0o644)
    files[0].write_bytes(b"tampered")
    files[1].unlink()
    stray = home / "archive" / "blobs" / "00" / ("0" * 64)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"x")
    assert main(["verify", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["checked"], result["ok"], result["changed"], result["missing"]) == (4, 2, 1, 1)
    assert result["untracked"] == 1


def test_move_hands_over_files_and_survives_a_crash_before_removal(
    tmp_path: Path, archive: Archive
) -> None:
    from cohortflow.pipelines.ingest import engine

    spool = tmp_path / "spool"
    spool.mkdir()
    names = ("MR_small.dcm", "ExplVR_LitEndNoMeta.dcm", "MR_truncated.dcm", "README.txt")
    originals = {}
    for name in names:
        shutil.copy(pydicom_file(name), spool / name)
        originals[name] = (spool / name).read_bytes()
    os.mkfifo(spool / "pipe")  # unreadable: must stay where it is

    # a crash after the index transaction, before the originals were removed
    batch_id = engine.begin(archive.index, "spool", str(spool))
    plan = engine.plan_chunk(archive.index, batch_id, list(engine.walk([spool])))
    records = engine.read_files([c.path for c in plan.to_read], str(archive.store.root), True)
    engine.record_chunk(archive.index, batch_id, plan, records, archive.scanners)
    assert sorted(p.name for p in spool.iterdir()) == sorted([*names, "pipe"])

    outcome, report = archive.ingest(spool, batch="spool", move=True)
    assert outcome.unchanged == len(names) and outcome.processed == 1  # the FIFO, read again
    assert [p.name for p in spool.iterdir()] == ["pipe"]
    assert report.files == len(names) + 1
    for name in names:
        row = next(r for r in _files(archive.index) if r.path.endswith(name))
        assert row.sha256 is not None
        assert archive.store.path_for(row.sha256).read_bytes() == originals[name]


def test_an_index_failure_mid_ingest_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The index database becomes unwritable mid-run: a message and exit 3 (stopped, not "done
    with failures"), then a clean rerun."""
    home = tmp_path / "home"
    monkeypatch.setenv("COHORTFLOW_HOME", str(home))
    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(pydicom_file("MR_small.dcm"), drop / "a.dcm")
    assert main(["ingest", str(drop), "--batch", "b", "--workers", "1"]) == 0
    shutil.copy(pydicom_file("CT_small.dcm"), drop / "b.dcm")
    index = open_index(f"sqlite:///{home / 'index.sqlite'}")
    with index.engine.begin() as connection:  # a real failure: the files table is gone
        connection.exec_driver_sql("ALTER TABLE files RENAME TO files_away")
    capsys.readouterr()
    assert main(["ingest", str(drop), "--batch", "b", "--workers", "1"]) == 3
    assert "rerun the same command" in capsys.readouterr().err
    with index.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE files_away RENAME TO files")
    index.dispose()
    assert main(["ingest", str(drop), "--batch", "b", "--workers", "1"]) == 0


def test_processes_opening_a_new_index_together_migrate_it_once(tmp_path: Path) -> None:
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'i{attempt}.sqlite'}"
        for done in open_at_once(url):
            assert done.returncode == 0, done.stderr[-2000:]
        index = open_index(url, upgrade=False)
        with index.engine.connect() as connection:
            versions = connection.exec_driver_sql("SELECT version_num FROM alembic_version")
            assert [row[0] for row in versions] == [SCHEMA_REVISION]
        index.dispose()
