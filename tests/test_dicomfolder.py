"""Indexing a folder by study and series (shared by deface and QC)."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from cohortflow.pipelines.dicomfolder import SkippedFile, first_header, index_folder


def _write(path: Path, study: str, series: str, sop: str) -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "MR"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 4, 4, 16, 1
    ds.PixelData = bytes(32)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_a_series_uid_copied_into_another_study_keeps_a_header_in_each(tmp_path: Path) -> None:
    """Regression: headers were kept per series UID, so the copy's series had none."""
    _write(tmp_path / "a" / "1.dcm", "1.1", "1.1.1", "1.1.1.1")
    _write(tmp_path / "a" / "2.dcm", "1.1", "1.1.1", "1.1.1.2")
    _write(tmp_path / "b" / "1.dcm", "1.2", "1.1.1", "1.1.1.3")
    studies = index_folder(tmp_path, [])
    assert set(studies) == {"1.1", "1.2"}
    for series in studies.values():
        entries = series["1.1.1"]
        assert first_header(entries).SeriesInstanceUID == "1.1.1"
        assert all(e.header is None for e in entries[1:])


def test_damaged_files_stay_in_their_series_only_when_asked(tmp_path: Path) -> None:
    _write(tmp_path / "s" / "1.dcm", "1.1", "1.1.1", "1.1.1.1")
    _write(tmp_path / "s" / "2.dcm", "1.1", "1.1.1", "1.1.1.2")
    cut = tmp_path / "s" / "0.dcm"
    _write(cut, "1.1", "1.1.1", "1.1.1.0")
    data = cut.read_bytes()
    cut.write_bytes(data[:-6])  # the pixel data runs past the end of the file
    skipped: list[SkippedFile] = []
    plain = index_folder(tmp_path, skipped)
    assert len(plain["1.1"]["1.1.1"]) == 2 and [s.reason_code for s in skipped] == ["corrupt"]
    kept = index_folder(tmp_path, [], keep_damaged=True)["1.1"]["1.1.1"]
    assert len(kept) == 3 and kept[0].header is not None and kept[0].damage is None
    (damaged,) = [e for e in kept if e.damage is not None]
    assert damaged.relative == Path("s/0.dcm") and "cut short" in damaged.damage
