"""A folder of DICOM files as studies and series: what every step that works on folders shares.

Files are found with ingest's walk and classified by ingest's reader (header only), then grouped
by StudyInstanceUID and SeriesInstanceUID. Only the first file of a series keeps its header in
memory: a large folder's headers would not fit.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cohortflow.pipelines.safeio import RefusedError, printable_path, read_regular
from cohortflow.pipelines.walk import walk


@dataclass(frozen=True)
class FolderFile:
    path: Path
    relative: Path
    #: the header of the series' first file (no pixel data); later files keep none
    header: Dataset | None
    #: why the file is damaged (its header still named the series), None for a readable file
    damage: str | None = None


@dataclass(frozen=True)
class SkippedFile:
    source: str
    reason_code: str
    reason: str


#: StudyInstanceUID -> SeriesInstanceUID -> files
Studies = dict[str, dict[str, list[FolderFile]]]


def index_folder(source: Path, skipped: list[SkippedFile], keep_damaged: bool = False) -> Studies:
    """Group the DICOM files under ``source`` by study and series; list the others in
    ``skipped``. With ``keep_damaged``, a damaged file whose header still names its series is
    kept in that series (marked with its damage), so that the series is known to miss it."""
    from cohortflow.pipelines.dicom.reader import classify

    source = Path(os.path.abspath(source))  # the walk gives absolute paths
    studies: Studies = defaultdict(lambda: defaultdict(list))
    with_header: set[tuple[str, str]] = set()
    for candidate in walk([source], stat=False):
        path = Path(candidate.path)
        shown = printable_path(candidate.path)
        try:
            data, _ = read_regular(path, source)
        except RefusedError as refused:
            skipped.append(SkippedFile(shown, refused.code, refused.reason))
            continue
        try:
            verdict = classify(data)
        except Exception as exc:  # a reader bug must not stop the folder: the file is named
            skipped.append(SkippedFile(shown, "internal_error", f"{type(exc).__name__}: {exc}"))
            continue
        header = verdict.dataset  # the header as classify read it (no pixel data)
        damage = None
        if not verdict.readable:
            damage = verdict.reason or verdict.status.value
            if not keep_damaged or header is None:
                skipped.append(SkippedFile(shown, verdict.status.value, damage))
                continue
        assert header is not None
        study, series = header.get("StudyInstanceUID"), header.get("SeriesInstanceUID")
        if not study or not series:
            skipped.append(SkippedFile(shown, "no_uids", "no StudyInstanceUID / SeriesInstanceUID"))
            continue
        entries = studies[str(study)][str(series)]
        key = (str(study), str(series))  # one series UID may recur in another study (a copy)
        keep = damage is None and key not in with_header
        if keep:
            with_header.add(key)
            entries.insert(0, FolderFile(path, path.relative_to(source), header))
        else:
            entries.append(FolderFile(path, path.relative_to(source), None, damage))
    return studies


def first_header(entries: list[FolderFile]) -> Dataset:
    header = entries[0].header
    assert header is not None, "the first entry of a series keeps its header"
    return header


def has_header(entries: list[FolderFile]) -> bool:
    """Is one of the series' files readable (a series of damaged files only has no header)?"""
    return bool(entries) and entries[0].header is not None


def series_number(entries: list[FolderFile]) -> float:
    if not has_header(entries):
        return 0.0
    try:
        return float(first_header(entries).get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        return 0.0


def with_transfer_syntax(ds: Dataset) -> Dataset:
    """A data set read without file meta (no DICM preamble) gets the transfer syntax it was read
    in, so that its pixels decode."""
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        if not little:
            raise ValueError("big endian data set without file meta information")
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        )
    return ds


def read_instance(path: Path) -> Dataset:
    """Read a whole instance, pixels decodable."""
    return with_transfer_syntax(pydicom.dcmread(path, force=True))
