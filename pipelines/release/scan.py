"""The release check: every file of a folder searched for the identifiers the index holds for the
patients it is about, before the folder is called de-identified.

Which patients: the pseudonyms found in the folder (file names and contents, ``CF`` and 14
base32 characters), looked up in the linkage (identified side). What is looked for, per patient
(``targets``): the patient ID and the other IDs of the key, every part of the name and the name
in its usual orders, the birth date in every common written form
(``pipelines.dicom.cleaner.written_forms``), the studies' accession numbers, study IDs,
institution addresses and referring physicians, the series' performing physicians and
operators. All of them are searched in one pass per text (Aho-Corasick, ``pyahocorasick``), any
case; a name counts where no letter adjoins it, a number where no digit does.

Where (``scan_folder``): the file's name; DICOM data sets element by element, sequences and
private tags included (values as text, binary values as bytes), never the pixel data; NIfTI
header text fields and extensions; PNG text chunks (tEXt, zTXt, iTXt); Parquet columns; any
other file as bytes (JSON, CSV, TSV, HTML, logs ...), gzip'd ones decompressed, read in bounded
blocks. A hit says the file, the place (tag, chunk, column, byte offset) and what kind of
identifier for which pseudonym, never the identifier itself. Entries are read as
``pipelines.safeio`` reads input: links not followed out of the folder, no FIFO opened.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import os
import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cohortflow.models.schema import Linkage, Patient, Series, Study
from cohortflow.pipelines.dicom.cleaner import written_forms
from cohortflow.pipelines.safeio import MAX_FILE_BYTES, RefusedError, check_entry, printable

PSEUDONYM = re.compile(rb"CF[A-Z2-7]{14}")
#: text is read in blocks of this many bytes, overlapping by the longest identifier
BLOCK = 1 << 20
#: gzip'd files: at most this much decompressed is searched (a bomb stops here)
MAX_INFLATED = 1 << 30
#: identifiers shorter than this are not looked for (too many chance hits)
MIN_LENGTH = 4


@dataclass(frozen=True)
class Target:
    kind: str  # patient_id, name, birth_date, accession_number, physician, address ...
    pseudonym: str


@dataclass(frozen=True)
class Hit:
    path: str  # relative to the folder scanned
    place: str
    kind: str
    pseudonym: str


@dataclass
class ScanReport:
    files: int = 0
    patients: int = 0
    hits: list[Hit] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def pseudonyms_in(root: Path) -> set[str]:
    """The pseudonyms a folder (or a file) names, in file names or contents (bounded reads)."""
    found: set[str] = set()
    for path, relative in _entries(root):
        found.update(m.decode() for m in PSEUDONYM.findall(relative.encode()))
        try:
            with open(path, "rb") as handle:
                tail = b""
                while block := handle.read(BLOCK):
                    found.update(m.decode() for m in PSEUDONYM.findall(tail + block))
                    tail = block[-16:]
        except OSError:
            continue
    return found


def targets(session: Session, pseudonyms: Iterable[str]) -> dict[str, list[Target]]:
    """Lower-cased identifier -> who it identifies and how, for the patients behind
    ``pseudonyms`` (identified side: the linkage and the index)."""
    out: dict[str, list[Target]] = {}

    def add(text: str | None, kind: str, pseudonym: str) -> None:
        if not text:
            return
        for raw in str(text).split("\\"):
            value = raw.strip().strip("^").strip()
            if len(value) >= MIN_LENGTH:
                out.setdefault(value.lower(), []).append(Target(kind, pseudonym))

    def add_name(name: str | None, kind: str, pseudonym: str) -> None:
        for one in str(name or "").split("\\"):
            parts = [p.strip() for p in re.split(r"[\^=]", one) if p.strip()]
            for part in parts:
                for word in part.split():
                    if len(word) >= 3:
                        out.setdefault(word.lower(), []).append(Target(kind, pseudonym))
            if len(parts) >= 2:
                family, given = parts[0], parts[1]
                for form in (f"{given} {family}", f"{family} {given}", f"{family}, {given}"):
                    add(form, kind, pseudonym)

    for chunk in _chunks(sorted(set(pseudonyms)), 500):
        links = session.scalars(select(Linkage).where(Linkage.pseudonym.in_(chunk))).all()
        for link in links:
            p = link.pseudonym
            add(link.patient_key.partition("^")[0], "patient_id", p)
            patient = session.scalar(select(Patient).where(Patient.patient_key == link.patient_key))
            if patient is None:
                continue
            add(patient.patient_id, "patient_id", p)
            add_name(patient.patient_name, "patient_name", p)
            born = _date(patient.patient_birth_date)
            if born is not None:
                for form in written_forms(born):
                    add(form, "birth_date", p)
            for study in session.scalars(select(Study).where(Study.patient_pk == patient.id)):
                add(study.accession_number, "accession_number", p)
                add(study.study_id if study.study_id and len(study.study_id) >= 6 else None,
                    "study_id", p)  # fmt: skip
                add(study.institution_address, "address", p)
                add_name(study.referring_physician_name, "physician", p)
                for se in session.scalars(select(Series).where(Series.study_pk == study.id)):
                    add_name(se.performing_physician_name, "physician", p)
                    add_name(se.operators_name, "operator", p)
    return out


def _date(text: str | None) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(text or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Matcher:
    """All identifiers of a scan in one automaton; ``find`` gives (offset, identifier) of each
    hit whose boundaries hold (a name: no letter adjoins it; a number: no digit)."""

    def __init__(self, found: dict[str, list[Target]]) -> None:
        import ahocorasick

        self.targets = found
        self.longest = max((len(t) for t in found), default=0)
        self.automaton = ahocorasick.Automaton()
        for text in found:
            self.automaton.add_word(text, text)
        if found:
            self.automaton.make_automaton()

    def find(self, text: str) -> Iterator[tuple[int, str]]:
        if not self.targets:
            return
        folded = text.lower()
        for end, word in self.automaton.iter(folded):
            start = end - len(word) + 1
            before = folded[start - 1] if start > 0 else " "
            after = folded[end + 1] if end + 1 < len(folded) else " "
            if (word[0].isdigit() and before.isdigit()) or (word[-1].isdigit() and after.isdigit()):
                continue
            if (word[0].isalpha() and before.isalpha()) or (word[-1].isalpha() and after.isalpha()):
                continue
            yield start, word


def scan_folder(root: Path, matcher: Matcher) -> ScanReport:
    """Every file under ``root`` (or the file ``root``) searched by ``matcher``."""
    report = ScanReport()
    for path, relative in _entries(root, report.skipped):
        report.files += 1
        hits: set[tuple[str, str]] = set()  # (place, identifier): one report per place
        for _, word in matcher.find(relative):
            hits.add(("file name", word))
        try:
            for place, text in _texts(path):
                for _, word in matcher.find(text):
                    hits.add((place, word))
        except (OSError, ValueError, EOFError, zlib.error, struct.error) as exc:
            report.skipped.append((relative, f"{type(exc).__name__}: {exc}"))
        for place, word in sorted(hits):
            for target in matcher.targets[word]:
                report.hits.append(Hit(relative, place, target.kind, target.pseudonym))
    report.hits = sorted(set(report.hits), key=lambda h: (h.path, h.place, h.kind))
    return report


def _entries(
    root: Path, skipped: list[tuple[str, str]] | None = None
) -> Iterator[tuple[Path, str]]:
    """Regular files under ``root`` (links followed only inside it), with their relative names;
    ``root`` itself when it is a file."""
    if not root.is_dir():
        try:
            name, _ = check_entry(root, None, follow=True)
        except RefusedError as refused:
            if skipped is not None:
                skipped.append((printable(root.name), refused.reason))
            return
        yield Path(name), printable(root.name)
        return
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for entry in sorted(files):
            path = Path(folder) / entry
            relative = printable(str(path.relative_to(root)))
            try:
                name, _ = check_entry(path, root, follow=True)
            except RefusedError as refused:
                if skipped is not None:
                    skipped.append((relative, refused.reason))
                continue
            yield Path(name), relative


def _texts(path: Path) -> Iterator[tuple[str, str]]:
    """(place, text) of everything in a file that can hold an identifier."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    name = path.name.lower()
    if head[128:132] == b"DICM" or name.endswith(".dcm"):
        parsed = list(_dicom(path))
        if parsed:
            yield from parsed
            return
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        yield from _png(path)
        return
    if head.startswith(b"PAR1"):
        yield from _parquet(path)
        return
    if head.startswith(b"\x1f\x8b"):
        with gzip.open(path, "rb") as inflated:
            start = inflated.read(352)
            if name.endswith((".nii.gz", ".nii")) and len(start) >= 348:
                yield from _nifti(start, inflated)
                return
            yield from _blocks(_Prefixed(start, inflated), "inflated bytes {offset}", MAX_INFLATED)
        return
    if name.endswith(".nii") and len(head) >= 348:
        with open(path, "rb") as handle:
            start = handle.read(352)
            yield from _nifti(start, handle)
        return
    with open(path, "rb") as handle:
        yield from _blocks(handle, "byte {offset}", MAX_FILE_BYTES)


class _Prefixed(io.RawIOBase):
    def __init__(self, first: bytes, rest: Any) -> None:
        self.first, self.rest = first, rest

    def read(self, size: int = -1) -> bytes:
        if self.first:
            out, self.first = self.first[:size], self.first[size:]
            return out
        return bytes(self.rest.read(size))


def _blocks(handle: Any, place: str, limit: int) -> Iterator[tuple[str, str]]:
    """A stream's text in overlapping blocks (latin-1: every byte a character, so UTF-8 and
    Latin-1 text both match their ASCII identifiers)."""
    tail, offset, read = "", 0, 0
    while read < limit and (block := handle.read(BLOCK)):
        read += len(block)
        text = tail + block.decode("latin-1")
        yield place.replace("{offset}", str(offset - len(tail))), text
        tail = text[-64:]
        offset += len(block)


def _dicom(path: Path) -> Iterator[tuple[str, str]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, struct.error, KeyError):
        return
    for dataset in (ds, getattr(ds, "file_meta", None)):
        if dataset is not None:
            yield from _elements(dataset)


def _elements(ds: Any) -> Iterator[tuple[str, str]]:
    """Every element's value as text, nested sequences' items included (``iterall``), the
    pixel data excepted."""
    for element in ds.iterall():
        if element.tag == 0x7FE00010 or element.VR == "SQ":
            continue
        place = f"{element.tag} {element.keyword or 'private'}"
        try:
            value = element.value
        except Exception:  # a value pydicom cannot convert: not text to search
            continue
        if isinstance(value, bytes | bytearray):
            text = bytes(value[:BLOCK]).decode("latin-1")
        elif isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
        if text:
            yield place, text


def _nifti(header: bytes, rest: Any) -> Iterator[tuple[str, str]]:
    """A NIfTI-1 header's text fields and its extensions (the voxels are not text)."""
    fields = {"db_name": (4, 18), "descrip": (148, 80), "aux_file": (228, 24),
              "intent_name": (328, 16)}  # fmt: skip
    for name, (start, size) in fields.items():
        text = header[start : start + size].split(b"\0")[0].decode("latin-1")
        if text:
            yield f"NIfTI {name}", text
    vox_offset = struct.unpack("<f", header[108:112])[0] if len(header) >= 112 else 352
    if len(header) >= 352 and header[348] and vox_offset > 352:
        extensions = rest.read(min(int(vox_offset) - 352, BLOCK))
        yield "NIfTI extension", extensions.decode("latin-1")


def _png(path: Path) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as handle:
        handle.read(8)
        while chunk := handle.read(8):
            if len(chunk) < 8:
                return
            length, kind = struct.unpack(">I4s", chunk)
            data = handle.read(length)
            handle.read(4)  # CRC
            if kind == b"tEXt":
                yield "PNG tEXt", data.replace(b"\0", b": ", 1).decode("latin-1")
            elif kind == b"zTXt":
                keyword, _, rest = data.partition(b"\0")
                text = zlib.decompressobj().decompress(rest[1:], BLOCK)
                yield "PNG zTXt", (keyword + b": " + text).decode("latin-1")
            elif kind == b"iTXt":
                keyword, _, rest = data.partition(b"\0")
                compressed, rest = rest[0], rest[2:]
                _, _, rest = rest.partition(b"\0")  # language
                _, _, rest = rest.partition(b"\0")  # translated keyword
                text = zlib.decompressobj().decompress(rest, BLOCK) if compressed else rest
                yield "PNG iTXt", (keyword + b": " + text).decode("utf-8", "replace")
            elif kind == b"IEND":
                return


def _parquet(path: Path) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path)
    metadata = source.schema_arrow.metadata or {}
    for key, value in metadata.items():
        yield "Parquet metadata", (key + b": " + value).decode("latin-1")
    yield "Parquet column names", "\t".join(source.schema_arrow.names)
    for batch in source.iter_batches(batch_size=10_000):
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            values = column.to_pylist()
            yield f"Parquet column {name}", "\t".join("" if v is None else str(v) for v in values)


def release_check(
    session: Session, root: Path, pseudonyms: Iterable[str] | None = None
) -> ScanReport:
    """The release check of a folder or a file: the identifiers of its patients looked for.
    Its patients: ``pseudonyms`` (what the caller wrote it about), else the pseudonyms found
    in it."""
    found = set(pseudonyms) if pseudonyms is not None else pseudonyms_in(root)
    report = scan_folder(root, Matcher(targets(session, found)))
    report.patients = len(found)
    return report


def quarantine(path: Path, restricted: Path) -> Path:
    """Move a file the release check found an identifier in to ``restricted/quarantine``
    (identified side, owner-only), never overwriting; returns where it went."""
    folder = restricted / "quarantine"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = folder / path.name
    n = 1
    while target.exists():
        target = folder / f"{path.stem}.{n}{path.suffix}"
        n += 1
    os.replace(path, target)
    return target


def release_or_quarantine(
    session: Session, path: Path, pseudonyms: Iterable[str], restricted: Path, actor: str | None
) -> tuple[ScanReport, Path | None]:
    """The release check of a file written about ``pseudonyms``' patients (an export): on a hit
    the file goes to ``restricted``/quarantine (audited, with the hits); returns the report and
    where the file went (None: released)."""
    report = release_check(session, path, pseudonyms)
    return report, quarantine_if_hit(session, path, report, restricted, actor)


def quarantine_if_hit(
    session: Session, path: Path, report: ScanReport, restricted: Path, actor: str | None
) -> Path | None:
    """Move ``path`` to ``restricted``/quarantine when its scan ``report`` has hits, audited
    with them; returns where it went (None: no hit, left in place)."""
    import json

    from cohortflow.models.linkage import audit

    if not report.hits:
        return None
    moved = quarantine(path, restricted)
    detail = {"file": str(path), "quarantined": str(moved), "hits": [vars(h) for h in report.hits]}
    audit(session, "release.quarantined", json.dumps(detail), actor=actor)
    return moved
