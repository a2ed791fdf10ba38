"""Batch manifests: the studies a delivery promised (CSV of accession numbers, optional counts).

Accepted columns (case and spacing ignored): ``AccessionNumber`` (or ``accession``,
``accession_number``) and, optionally, ``ExpectedFiles`` (or ``files``, ``expected_files``,
``NumberOfStudyRelatedInstances``). Comma, semicolon or tab separated; UTF-8 with or without BOM.
A repeated accession number with the same count is merged; with another count it is an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from cohortflow.models.errors import ManifestError

_ACCESSION = {"accessionnumber", "accession", "accession_number", "accessionno", "acc"}
_COUNT = {
    "expectedfiles",
    "expected_files",
    "files",
    "filecount",
    "file_count",
    "numberofstudyrelatedinstances",
    "instances",
}


@dataclass(frozen=True)
class ManifestRow:
    accession_number: str
    expected_files: int | None
    line: int


@dataclass(frozen=True)
class Manifest:
    path: Path
    sha256: str
    rows: tuple[ManifestRow, ...]


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "").replace("-", "_")


def read_manifest(path: Path) -> Manifest:
    """Parse a manifest; ManifestError names the file, the line and the problem."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {path} is not UTF-8 text: {exc}") from exc
    if not text.strip():
        raise ManifestError(f"manifest {path} is empty: give a CSV with an AccessionNumber column")
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(
            text.splitlines()[0], delimiters=",;\t"
        )
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    header = [_norm(h) for h in next(reader)]
    acc_col = next(
        (i for i, h in enumerate(header) if h.replace("_", "") in _ACCESSION or h in _ACCESSION),
        None,
    )
    if acc_col is None:
        raise ManifestError(
            f"manifest {path} has no AccessionNumber column (columns: {', '.join(header)})"
        )
    count_col = next((i for i, h in enumerate(header) if h in _COUNT), None)
    merged: dict[str, ManifestRow] = {}
    for number, row in enumerate(reader, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        accession = row[acc_col].strip() if acc_col < len(row) else ""
        if not accession:
            raise ManifestError(f"manifest {path}, line {number}: empty accession number")
        expected: int | None = None
        if count_col is not None and count_col < len(row) and row[count_col].strip():
            try:
                expected = int(row[count_col].strip())
            except ValueError:
                raise ManifestError(
                    f"manifest {path}, line {number}: expected file count "
                    f"{row[count_col].strip()!r} is not a whole number"
                ) from None
            if expected < 0:
                raise ManifestError(
                    f"manifest {path}, line {number}: expected file count must not be negative"
                )
        previous = merged.get(accession)
        if previous is not None and previous.expected_files != expected:
            raise ManifestError(
                f"manifest {path}, line {number}: accession {accession} is listed again with "
                f"{expected} files (line {previous.line} says {previous.expected_files})"
            )
        merged.setdefault(accession, ManifestRow(accession, expected, number))
    return Manifest(path, hashlib.sha256(raw).hexdigest(), tuple(merged.values()))
