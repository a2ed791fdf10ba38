"""Hostile and broken input: regression tests named after what broke (issue 21).

Each builds the entry that once stopped, hung or misled a command and checks that it now gets
a status and a reason while the other files go through.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from pipelines.anonymize.deidentify import Deidentifier
from pipelines.anonymize.files import FolderReport, anonymize_folder
from pipelines.anonymize.keys import ProjectKey
from pipelines.anonymize.profile import load_profile
from pipelines.ingest.reader import classify
from tests.ingest_helpers import PYDICOM_FILES, pydicom_file

KEY = ProjectKey(b"h" * 32, "hostile")


def _anonymize(source: Path, out: Path) -> FolderReport:
    return anonymize_folder(source, out, Deidentifier(load_profile(), KEY))


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


def test_the_same_sop_instance_uid_with_other_content_is_reported_not_overwritten(
    tmp_path: Path,
) -> None:
    """Once: the last file silently won (60 written, 25 on disk)."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.dcm").write_bytes(_mr(SeriesDescription="first"))
    (src / "b.dcm").write_bytes(_mr(SeriesDescription="second"))
    (src / "c.dcm").write_bytes(_mr(SeriesDescription="first"))  # a true copy of a.dcm
    out = tmp_path / "out"
    report = _anonymize(src, out)
    files = [p for p in out.rglob("*.dcm")]
    assert len(files) == 1
    assert report.written == 2  # a.dcm, and its copy c.dcm (the same output, unchanged)
    assert _outcomes(report) == {"b.dcm": ("failed", "conflicting_instance")}
    assert pydicom.dcmread(files[0]).SeriesDescription == "first"
    again = _anonymize(src, out)  # a rerun: the same outcome, nothing overwritten
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
    from pipelines.volumetry.errors import VolumetryError
    from pipelines.volumetry.run import nifti_sources, read_t1

    os.mkfifo(tmp_path / "sub-1_T1w.nii.gz")
    (source,) = nifti_sources(tmp_path)
    with pytest.raises(VolumetryError, match="FIFO"):
        read_t1(source.image, source.root)


def test_a_nifti_declaring_terabytes_is_refused_before_reading(tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    from pipelines.volumetry.errors import VolumetryError
    from pipelines.volumetry.run import read_t1

    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    img.header.set_data_shape((20000, 20000, 20000))  # 32 TB declared in a few hundred bytes
    path = tmp_path / "bomb_T1w.nii"
    path.write_bytes(img.header.binaryblock + b"\0" * 4 + b"\0" * 32)
    with pytest.raises(VolumetryError, match="declares"):
        read_t1(path)


def test_index_folder_names_what_it_cannot_read_and_keeps_the_rest(tmp_path: Path) -> None:
    """The folder walk under qc, convert, deface and volumetry: a FIFO, a link out of the
    tree, a directory named x.dcm and a bad transfer syntax each named, the good file kept."""
    from pipelines.dicomfolder import SkippedFile, index_folder

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
