"""Hostile and broken input: regression tests named after what broke (issue 21).

Each builds the entry that once stopped, hung or misled a command and checks that it now gets
a status and a reason while the other files go through.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from cohortflow.models.linkage import LinkageRecord
from cohortflow.pipelines.anonymize.deidentify import Deidentifier
from cohortflow.pipelines.anonymize.files import FolderReport, anonymize_folder
from cohortflow.pipelines.anonymize.profile import load_profile
from cohortflow.pipelines.dicom.keys import ProjectKey
from cohortflow.pipelines.dicom.reader import classify
from tests.ingest_helpers import PYDICOM_FILES, pydicom_file

KEY = ProjectKey(b"h" * 32, "hostile")


def _anonymize(source: Path, out: Path, **options: Any) -> FolderReport:
    return anonymize_folder(source, out, Deidentifier(load_profile(), KEY), **options)


def _committing(out: Path, linked: set[str]) -> Callable[[list[LinkageRecord]], None]:
    """A linkage store that checks no file of a patient was published before its commit."""

    def commit(records: list[LinkageRecord]) -> None:
        for record in records:
            if record.pseudonym not in linked:  # (a rerun commits the known ones again)
                assert not (out / record.pseudonym).exists(), "published before its linkage"
            linked.add(record.pseudonym)

    return commit


def _mr(**changes: object) -> bytes:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    for keyword, value in changes.items():
        if keyword.startswith("meta_"):
            setattr(ds.file_meta, keyword[5:], value)
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _outcomes(report: FolderReport) -> dict[str, tuple[str, str | None]]:
    listed = [*report.skipped, *report.excluded, *report.failed]
    return {Path(o.source).name: (o.status, o.reason_code) for o in listed}


def test_a_transfer_syntax_uid_that_is_no_transfer_syntax_stops_nothing(tmp_path: Path) -> None:
    """Once: "ValueError: UID is not a transfer syntax" from classify(), exit 1, every rerun."""
    bad = _mr(meta_TransferSyntaxUID="1.2.3.4")
    verdict = classify(bad)
    assert (verdict.status.value, verdict.reason_code) == ("corrupt", "unknown_transfer_syntax")
    src = tmp_path / "in"
    src.mkdir()
    (src / "bad.dcm").write_bytes(bad)
    (src / "good.dcm").write_bytes(_mr())
    report = _anonymize(src, tmp_path / "out")
    assert report.written == 1
    assert _outcomes(report) == {"bad.dcm": ("skipped", "corrupt")}


def test_anonymize_announces_its_file_total_before_the_first_chunk(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "bad.dcm").write_bytes(_mr(meta_TransferSyntaxUID="1.2.3.4"))
    (src / "good.dcm").write_bytes(_mr())
    (src / "notes.txt").write_text("not DICOM")
    heard: list[object] = []
    _anonymize(
        src,
        tmp_path / "out",
        progress=lambda n: heard.append(("done", n)),
        expect=heard.append,
    )
    assert heard == [3, ("done", 3)]  # every file counts, skipped ones too


def test_a_fifo_does_not_hang_anonymize(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    os.mkfifo(src / "pipe.dcm")
    (src / "good.dcm").write_bytes(_mr())
    done: list[FolderReport] = []
    worker = threading.Thread(
        target=lambda: done.append(_anonymize(src, tmp_path / "out")), daemon=True
    )
    worker.start()
    worker.join(60)
    assert done, "anonymize blocked on a FIFO"
    assert done[0].written == 1
    assert _outcomes(done[0]) == {"pipe.dcm": ("skipped", "not_regular_file")}


def test_symlinks_out_of_the_input_are_not_read_by_anonymize(tmp_path: Path) -> None:
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(_mr(PatientName="Outside^Tree"))
    src = tmp_path / "in"
    src.mkdir()
    (src / "link.dcm").symlink_to(outside)
    report = _anonymize(src, tmp_path / "out")
    assert report.written == 0
    assert _outcomes(report) == {"link.dcm": ("skipped", "symlink")}


@pytest.mark.parametrize(
    "options",
    [
        {},  # published directly (no linkage to commit)
        {"staged": True},  # staged, the linkage committed, then promoted: one chunk
        {"staged": True, "chunk_size": 1},  # a chunk each: promoted before the next is made
        {"staged": True, "chunk_size": 1, "workers": 2},
    ],
    ids=["direct", "staged", "staged-chunks", "staged-workers"],
)
def test_the_same_sop_instance_uid_with_other_content_is_reported_not_overwritten(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    """Once: the last file silently won (60 written, 25 on disk)."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.dcm").write_bytes(_mr(SeriesDescription="first"))
    (src / "b.dcm").write_bytes(_mr(SeriesDescription="second"))
    (src / "c.dcm").write_bytes(_mr(SeriesDescription="first"))  # a true copy of a.dcm
    out = tmp_path / "out"
    linked: set[str] = set()
    if options.pop("staged", False):
        options["commit"] = _committing(out, linked)
    report = _anonymize(src, out, **options)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 1
    assert report.written == 2  # a.dcm, and its copy c.dcm (the same output, unchanged)
    assert _outcomes(report) == {"b.dcm": ("failed", "conflicting_instance")}
    assert pydicom.dcmread(files[0]).SeriesDescription == "first"
    assert linked == ({files[0].relative_to(out).parts[0]} if "commit" in options else set())
    again = _anonymize(src, out, **options)  # a rerun: the same outcome, nothing overwritten
    assert (again.written, _outcomes(again)) == (2, _outcomes(report))


@pytest.mark.parametrize(
    "name",
    [
        "UN_sequence.dcm",
        "priv_SQ.dcm",
        "nested_priv_SQ.dcm",
        "meta_missing_tsyntax.dcm",
        "no_meta_group_length.dcm",
        "empty_charset_LEI.dcm",
    ],
)
def test_pydicom_files_without_a_study_uid_are_skipped_with_a_reason(
    tmp_path: Path, name: str
) -> None:
    """Once: internal_error: AttributeError: 'FileDataset' object has no attribute
    'StudyInstanceUID'."""
    src = tmp_path / "in"
    src.mkdir()
    (src / name).write_bytes(pydicom_file(name).read_bytes())
    report = _anonymize(src, tmp_path / "out")
    listed = [*report.skipped, *report.excluded, *report.failed]
    assert report.written + len(listed) == 1
    assert all(o.reason_code != "internal_error" for o in listed), listed


def test_no_pydicom_test_file_is_an_internal_error(tmp_path: Path) -> None:
    """pydicom's bundled test files through anonymize: each written or not with a specific
    reason, none internal_error."""
    src = tmp_path / "in"
    src.mkdir()
    names = sorted(p.name for p in PYDICOM_FILES.glob("*.dcm"))
    for name in names:
        (src / name).write_bytes((PYDICOM_FILES / name).read_bytes())
    report = _anonymize(src, tmp_path / "out")
    listed = [*report.skipped, *report.excluded, *report.failed]
    assert report.written + len(listed) == len(names) >= 70
    internal = [(o.source, o.reason) for o in listed if o.reason_code == "internal_error"]
    assert internal == []
    assert all(o.reason for o in listed)


def test_a_dataset_without_uids_is_never_given_a_path(tmp_path: Path) -> None:
    ds = Dataset()
    ds.PatientName = "No^Uids"
    ds.Modality = "MR"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    src = tmp_path / "in"
    src.mkdir()
    (src / "x.dcm").write_bytes(buffer.getvalue())
    report = _anonymize(src, tmp_path / "out")
    assert _outcomes(report) == {"x.dcm": ("skipped", "no_uids")}
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.dcm"))


def test_a_fifo_named_like_a_t1_does_not_hang_volumetry(tmp_path: Path) -> None:
    from cohortflow.pipelines.volumetry.errors import VolumetryError
    from cohortflow.pipelines.volumetry.run import nifti_sources, read_t1

    os.mkfifo(tmp_path / "sub-1_T1w.nii.gz")
    (source,) = nifti_sources(tmp_path)
    with pytest.raises(VolumetryError, match="FIFO"):
        read_t1(source.image, source.root)


def test_a_nifti_declaring_terabytes_is_refused_before_reading(tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    from cohortflow.pipelines.volumetry.errors import VolumetryError
    from cohortflow.pipelines.volumetry.run import read_t1

    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    img.header.set_data_shape((20000, 20000, 20000))  # 32 TB declared in a few hundred bytes
    path = tmp_path / "bomb_T1w.nii"
    path.write_bytes(img.header.binaryblock + b"\0" * 4 + b"\0" * 32)
    with pytest.raises(VolumetryError, match="declares"):
        read_t1(path)


def test_index_folder_names_what_it_cannot_read_and_keeps_the_rest(tmp_path: Path) -> None:
    """The folder walk under qc, convert, deface and volumetry: a FIFO, a link out of the
    tree, a directory named x.dcm and a bad transfer syntax each named, the good file kept."""
    from cohortflow.pipelines.dicomfolder import SkippedFile, index_folder

    (tmp_path / "good.dcm").write_bytes(_mr())
    os.mkfifo(tmp_path / "pipe.dcm")
    (tmp_path / "passwd.dcm").symlink_to("/etc/passwd")
    (tmp_path / "x.dcm").mkdir()
    (tmp_path / "bad_ts.dcm").write_bytes(_mr(meta_TransferSyntaxUID="1.2.3.4"))
    skipped: list[SkippedFile] = []
    studies = index_folder(tmp_path, skipped)
    assert sum(len(f) for series in studies.values() for f in series.values()) == 1
    assert {Path(s.source).name: s.reason_code for s in skipped} == {
        "pipe.dcm": "not_regular_file",
        "passwd.dcm": "symlink",
        "bad_ts.dcm": "corrupt",
    }


def _storage_scp(tmp_path: Path, allowed: tuple[str, ...] | None) -> tuple[object, int, Path]:
    from cohortflow.pipelines.pacs.scp import Spool, StorageSCP
    from tests.ingest_helpers import free_port

    port = free_port()
    spool = tmp_path / "spool" / "listen"
    scp = StorageSCP(Spool(spool), "COHORTFLOW", port, "127.0.0.1", allowed).start()
    return scp, port, spool


def _push(port: int, files: list[Path], calling: str) -> object:
    from cohortflow.pipelines.pacs.dimse import PacsNode, store_files

    return store_files(PacsNode("COHORTFLOW", "127.0.0.1", port), files, calling)


@pytest.mark.integration
def test_the_storage_scp_takes_associations_from_the_allowed_ae_titles_only(
    tmp_path: Path,
) -> None:
    """Once: any calling AE title was accepted (nothing set ``allowed_aets``)."""
    from cohortflow.pipelines.pacs.errors import PacsError

    good = tmp_path / "good.dcm"
    good.write_bytes(_mr())
    scp, port, spool = _storage_scp(tmp_path, ("ORTHANC",))
    try:
        with pytest.raises(PacsError):
            _push(port, [good], "INTRUDER")
        assert not any(spool.rglob("*.dcm"))
        sent = _push(port, [good], "ORTHANC")
        assert sent.sent == 1  # type: ignore[attr-defined]
        assert len(list(spool.rglob("*.dcm"))) == 1
    finally:
        scp.stop()  # type: ignore[attr-defined]


@pytest.mark.integration
def test_a_study_uid_of_dot_dot_is_refused_and_nothing_leaves_the_spool(tmp_path: Path) -> None:
    """Once: a study and series UID of ``..`` passed the UID check and wrote outside
    ``spool/listen``."""
    files = []
    for i, (study, series) in enumerate([("..", ".."), ("1..2", "1.2"), ("1.2.3", "1.2./..")]):
        path = tmp_path / f"evil{i}.dcm"
        path.write_bytes(_mr(StudyInstanceUID=study, SeriesInstanceUID=series))
        files.append(path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    scp, port, spool = _storage_scp(tmp_path, None)
    try:
        sent = _push(port, files, "ANY")
    finally:
        scp.stop()  # type: ignore[attr-defined]
    assert sent.sent == 0 and len(sent.failed) == 3  # type: ignore[attr-defined]
    after = sorted(
        p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.is_relative_to(spool.parent)
    )
    assert after == before
    assert not any(p.is_file() for p in spool.parent.rglob("*"))


def test_only_the_configured_pacs_may_store_by_default() -> None:
    from cohortflow.models.settings import PacsSettings, RetrieveSettings, Settings

    assert Settings(home=Path("/tmp/h")).storage_callers() == ("ORTHANC",)
    pacs = PacsSettings(aet="HOSPITALPACS", host="pacs", port=104)
    assert Settings(home=Path("/tmp/h"), pacs=pacs).storage_callers() == ("HOSPITALPACS",)
    anyone = RetrieveSettings(calling_aets=("*",))
    assert Settings(home=Path("/tmp/h"), retrieve=anyone).storage_callers() is None


def test_a_file_name_cannot_forge_a_report_row_or_restyle_it() -> None:
    """Once: a file name with a newline and escape sequences was printed raw and forged a
    table row. Tables now escape control characters and show square brackets as text."""
    from rich.console import Console

    from cohortflow.flows.output import SafeTable

    forged = "a.dcm\n| ok | forged row |\x1b[2J[red]bold claim[/red]"
    table = SafeTable(title="files")
    table.add_column("path")
    table.add_column("status")
    table.add_row(forged, "unreadable")
    console = Console(record=True, width=300, color_system=None)
    console.print(table)
    text = console.export_text()
    body = [line for line in text.splitlines() if "a.dcm" in line]
    assert len(body) == 1  # one row, one line
    assert "\x1b" not in text and "\\x1b[2J" in text and "\\x0a" in text
    assert "[red]bold claim[/red]" in text  # shown as typed, not applied


def test_a_deflate_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    """Once: a 613 KB deflated file holding a 600 MB element took 7.1 GB in ingest (reported
    "modern ok") and 3.2 GB in anonymize."""
    import json
    import sys

    from tests.ingest_helpers import deflate_bomb, run_measured

    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflate_bomb())
    assert bomb.stat().st_size < 1 << 20
    code = (
        "import json, sys\n"
        "from cohortflow.pipelines.dicom.reader import read_path\n"
        "record, _ = read_path(sys.argv[1])\n"
        "print(json.dumps([record.status.value, record.reason_code, record.reason]))\n"
    )
    done, peak = run_measured(
        [sys.executable, "-c", code, str(bomb)], cwd=Path(__file__).parent.parent
    )
    assert done.returncode == 0, done.stderr[-2000:]
    status, code_, reason = json.loads(done.stdout)
    assert (status, code_) == ("corrupt", "inflation_limit"), reason
    assert peak < 400 << 20, f"peak memory {peak / 2**20:.0f} MB"
    small = tmp_path / "small.dcm"  # a deflated file under the limit is read as before
    small.write_bytes(deflate_bomb(2 << 20))
    verdict = classify(small.read_bytes())
    assert verdict.status.value == "modern", verdict.reason


@pytest.mark.integration
def test_the_storage_scp_refuses_a_deflate_bomb_without_inflating_it(tmp_path: Path) -> None:
    """Once: ``listen`` accepted Deflated Explicit VR Little Endian from any caller and
    decoded it whole. The bomb is sent as encoded (pynetdicom reads the file, no re-encoding)."""
    from pynetdicom import AE

    from tests.ingest_helpers import deflate_bomb

    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflate_bomb())
    scp, port, spool = _storage_scp(tmp_path, None)
    try:
        ae = AE(ae_title="PUSHER")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.1.2.1.99")
        assoc = ae.associate("127.0.0.1", port, ae_title="COHORTFLOW")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(bomb)
        finally:
            assoc.release()
    finally:
        scp.stop()  # type: ignore[attr-defined]
    assert status.Status == 0xC000
    assert not any(p.is_file() for p in spool.parent.rglob("*"))


def test_a_run_stages_from_the_archive_through_links_and_only_those_are_followed(
    tmp_path: Path,
) -> None:
    """A protocol run stages a study as links into the archive (pipelines/run/steps.py): they
    are read (and the sealed blob opened), a link anywhere else is not (the first version
    refused every staged series)."""
    import hashlib

    from cohortflow.pipelines.archive.store import ArchiveStore

    store = ArchiveStore(tmp_path / "archive", f"file:{tmp_path / 'archive.key'}")
    content = _mr()
    name = hashlib.sha256(content).hexdigest()
    store.put(name, content)
    elsewhere = tmp_path / "elsewhere.dcm"
    elsewhere.write_bytes(_mr(SOPInstanceUID="1.2.3.4.5.6"))
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "a.dcm").symlink_to(store.path_for(name))
    (staged / "b.dcm").symlink_to(elsewhere)
    report = anonymize_folder(
        staged, tmp_path / "out", Deidentifier(load_profile(), KEY), archive=store
    )
    assert report.written == 1
    assert _outcomes(report) == {"b.dcm": ("skipped", "symlink")}


def test_relative_paths_and_a_relative_home_work_in_every_folder_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once: ``cohortflow deface work/anon work/defaced`` (and qc, convert, volumetry) stopped
    with "ValueError: ... is not in the subpath of ...", and a relative COHORTFLOW_HOME wrote
    nothing while reporting success."""
    import json

    from cohortflow.flows.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COHORTFLOW_HOME", "home")
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    monkeypatch.delenv("COHORTFLOW_CACHE_DIR", raising=False)
    (tmp_path / "in" / "series").mkdir(parents=True)
    first = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    row, column = (
        list(map(float, v))
        for v in (first.ImageOrientationPatient[:3], first.ImageOrientationPatient[3:])
    )
    normal = [
        row[1] * column[2] - row[2] * column[1],
        row[2] * column[0] - row[0] * column[2],
        row[0] * column[1] - row[1] * column[0],
    ]
    for number in range(3):  # three slices of one volume
        uid = f"1.2.826.0.1.3680043.8.498.{number + 1}"
        position = [
            float(p) + number * float(first.SliceThickness) * n
            for p, n in zip(first.ImagePositionPatient, normal, strict=True)
        ]
        data = _mr(
            SOPInstanceUID=uid,
            meta_MediaStorageSOPInstanceUID=uid,
            ImagePositionPatient=position,
            InstanceNumber=number + 1,
        )
        (tmp_path / "in" / "series" / f"{number}.dcm").write_bytes(data)
    commands = [
        ["anonymize", "in", "work/anon"],
        ["deface", "work/anon", "work/defaced"],
        ["qc", "work/anon"],
        ["convert", "work/anon", "work/nifti", "--all"],
        ["volumetry", "work/anon", "--out", "work/volumetry"],
    ]
    for command in commands:
        code = main([*command, "--json"])
        out = capsys.readouterr()
        assert code in (0, 1), (command, out.err[-2000:])
        json.loads(out.out)  # a report, not a traceback
        assert "Error" not in out.err, (command, out.err[-2000:])
    assert len(list((tmp_path / "work" / "anon").rglob("*.dcm"))) == 3
    assert len(list((tmp_path / "work" / "nifti").rglob("*.nii.gz"))) == 1
    assert (tmp_path / "home" / "index.sqlite").is_file()  # the home, where it was said to be


def test_ingest_move_never_changes_or_archives_what_a_link_leads_to(tmp_path: Path) -> None:
    """Once: a symlink to /etc/passwd was archived as a blob, and ``ingest --move`` on a symlink
    to a 0600 key file made the key 0444 and archived a symbolic link."""
    from tests.ingest_helpers import make_archive

    outside = tmp_path / "outside"
    outside.mkdir()
    key = outside / "project.key"
    key.write_bytes(b"secret key material\n")
    key.chmod(0o600)
    source = tmp_path / "in"
    source.mkdir()
    (source / "key.dcm").symlink_to(key)
    (source / "passwd.dcm").symlink_to("/etc/passwd")
    (source / "good.dcm").write_bytes(_mr())
    archive = make_archive(tmp_path / "home")
    try:
        _, report = archive.ingest(source, move=True)
    finally:
        archive.index.dispose()
    assert key.stat().st_mode & 0o777 == 0o600 and key.read_bytes() == b"secret key material\n"
    problems = {Path(p.path).name: p.reason_code for p in report.problems}
    assert problems == {"key.dcm": "symlink", "passwd.dcm": "symlink"}
    assert (source / "key.dcm").is_symlink()  # not ours: left where it was
    assert not (source / "good.dcm").exists()  # moved into the archive
    blobs = [p for p in (tmp_path / "home" / "archive").rglob("*") if p.is_file()]
    assert len(blobs) == 1 and not any(p.is_symlink() for p in blobs)
    assert b"secret key material" not in blobs[0].read_bytes()
