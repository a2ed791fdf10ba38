"""Read one received file: hash it, classify it, read its header without pixel data.

``classify(data)`` is pure (bytes in, verdict out); ``read_path`` adds the file system: stat,
permissions, directories and FIFOs, files that vanish. Nothing here raises for bad input: every
outcome is a status and a reason (``models.ingest.FileStatus``).

Classification:
- modern: 128-byte preamble + ``DICM``, the data set parses, every element lies inside the file;
- legacy: no preamble, but the file starts with a DICOM data element (group 0002 or 0008, either
  byte order) and parses when read by content (pydicom ``force=True``);
- corrupt: DICOM by its start, but empty, truncated, unparseable, or with DICOM elements found at
  an offset where no reader will look;
- not_dicom: anything else (the reason names the format when it is a common one);
- unreadable: the path could not be read at all.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from cohortflow.models.ingest import FileRecord, FileStatus, InstanceHeader
from cohortflow.pipelines.safeio import RefusedError, printable_path, read_regular

PREAMBLE = 128
_LONG_VRS = {
    b"OB",
    b"OW",
    b"OF",
    b"OD",
    b"OL",
    b"OV",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_PIXEL_GROUP = 0x7FE0
_SEQ_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_SEQ_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"
_UNDEFINED = 0xFFFFFFFF
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "a gzip archive"),
    (b"PK\x03\x04", "a zip archive"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x7fELF", "an executable"),
    (b"SQLite format 3", "a SQLite database"),
)


@dataclass(frozen=True)
class Reading:
    """What some bytes are; ``header`` is set for DICOM that can be indexed."""

    status: FileStatus
    reason_code: str
    reason: str
    header: InstanceHeader | None = None
    notes: tuple[str, ...] = field(default=())
    #: the header as pydicom read it (no pixel data), and the offset where that reading stopped;
    #: a corrupt file keeps what could be read of its header (which series it belongs to), but
    #: no offset: it has no whole data set
    dataset: Dataset | None = field(default=None, repr=False, compare=False)
    stopped_at: int | None = field(default=None, repr=False, compare=False)

    @property
    def readable(self) -> bool:
        """DICOM whose data set was read (modern or legacy): not corrupt, not foreign."""
        return self.status.is_dicom and self.status is not FileStatus.CORRUPT

    def full_dataset(self, data: bytes) -> Dataset:
        """The whole data set of ``data`` (the bytes this verdict was made from): the header
        already read, completed in place by reading only what follows it (pixel data, trailing
        elements). Raw elements keep their offsets in ``data``."""
        if self.dataset is None or self.stopped_at is None:
            raise ValueError(f"no data set: the content is {self.status.value}")
        ds = self.dataset
        if _text(ds.file_meta, "TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            # offsets in a deflated file are offsets in the inflated stream: read it all again
            return pydicom.dcmread(io.BytesIO(data), force=True)
        if self.stopped_at < len(data):
            implicit, little = ds.original_encoding
            stream = io.BytesIO(data)
            stream.seek(self.stopped_at)
            rest = read_dataset(stream, bool(implicit), bool(little))
            for tag in rest.keys():  # noqa: SIM118 - raw elements, unconverted
                ds[tag] = rest.get_item(tag)
        return ds


def read_path(path: str | bytes) -> tuple[FileRecord, bytes | None]:
    """Read and classify one path. Returns the record and, when readable, the file's bytes."""
    shown = printable_path(path)

    def unreadable(code: str, reason: str, st: os.stat_result | None = None) -> FileRecord:
        if st is None:
            return FileRecord.unreadable(shown, code, reason)
        return FileRecord.unreadable(shown, code, reason, st.st_size, st.st_mtime_ns)

    try:
        data, st = read_regular(os.fsdecode(path))
    except RefusedError as refused:
        try:
            st = os.lstat(path)
        except OSError:
            return unreadable(refused.code, refused.reason), None
        return unreadable(refused.code, refused.reason, st), None
    verdict = classify(data)
    record = FileRecord(
        path=shown,
        size=len(data),
        mtime_ns=st.st_mtime_ns,
        sha256=hashlib.sha256(data).hexdigest(),
        status=verdict.status,
        reason_code=verdict.reason_code,
        reason=verdict.reason,
        header=verdict.header,
        notes=verdict.notes,
    )
    return record, data


def classify(data: bytes) -> Reading:
    """Classify a file's content and read its header (pydicom, no pixel data)."""
    if not data:
        return Reading(
            FileStatus.CORRUPT, "empty", "empty file (0 bytes): an interrupted transfer?"
        )
    modern = len(data) >= PREAMBLE + 4 and data[PREAMBLE : PREAMBLE + 4] == b"DICM"
    if not modern and not _starts_with_element(data, 0):
        offset = _find_misaligned_start(data)
        if offset is not None:
            return Reading(
                FileStatus.CORRUPT,
                "misaligned",
                f"DICOM data elements start at byte {offset}, not at 0 or after a preamble: "
                "stray bytes before the data set",
            )
        return Reading(FileStatus.NOT_DICOM, "not_dicom", _describe_other(data))
    return _parse(data, modern)


def _starts_with_element(data: bytes, offset: int) -> bool:
    """Does a plausible first data element (group 0002 or 0008, either byte order) start here?"""
    if len(data) < offset + 8:
        return False
    le_group, le_elem = struct.unpack_from("<HH", data, offset)
    be_group, _ = struct.unpack_from(">HH", data, offset)
    if le_group in (0x0002, 0x0008):
        candidate = le_group
        vr = data[offset + 4 : offset + 6]
    elif be_group in (0x0002, 0x0008):
        candidate = be_group
        vr = data[offset + 4 : offset + 6]
    else:
        return False
    if vr.isalpha() and vr.isupper():
        return True  # explicit VR
    # implicit VR little endian: a 4-byte length that fits in the file
    (length,) = struct.unpack_from("<I", data, offset + 4)
    fits = length == _UNDEFINED or length <= len(data)
    return bool(candidate == le_group and fits and le_elem < 0x2000)


def _find_misaligned_start(data: bytes) -> int | None:
    for offset in range(1, min(len(data) - 8, 2 * PREAMBLE + 16)):
        if offset != PREAMBLE and _starts_with_element(data, offset) and data[offset] == 0x08:
            explicit_vr = data[offset + 4 : offset + 6]
            if explicit_vr.isalpha() and explicit_vr.isupper():
                return offset
    return None


def _describe_other(data: bytes) -> str:
    for magic, what in _MAGIC:
        if data.startswith(magic):
            return f"not DICOM: {what}"
    if len(data) >= 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "not DICOM: a NIfTI image"
    head = data[:512]
    try:
        head.decode("utf-8")
        if all(c >= 0x20 or c in b"\t\r\n" for c in head):
            return "not DICOM: a text file"
    except UnicodeDecodeError:
        pass
    return (
        "not DICOM: no 'DICM' at byte 128 and no DICOM data element at byte 0 "
        f"(starts with {data[:4].hex(' ')})"
    )


#: A deflated data set may inflate to at most this many times its file's size, or
#: ``MIN_INFLATE_LIMIT`` bytes, whichever is more. DICOM text and images deflate 2 to 20 times;
#: a 613 KB file holding one 600 MB element (ratio 1,000) once took 7.1 GB in ingest.
MAX_INFLATE_RATIO = 100
MIN_INFLATE_LIMIT = 64 << 20


def _file_meta_end(data: bytes) -> tuple[int, str | None] | None:
    """Where the data set starts after a Part 10 file meta group (explicit VR little endian,
    group 0002), and its TransferSyntaxUID; None when the group cannot be walked."""
    offset = PREAMBLE + 4
    syntax = None
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        if group != 0x0002:
            return offset, syntax
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            if offset + 12 > len(data):
                return None
            (length,) = struct.unpack_from("<I", data, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            start = offset + 8
        if length == _UNDEFINED or start + length > len(data):
            return None
        if element == 0x0010:
            syntax = data[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        offset = start + length
    return None


def inflation_limit(deflated: bytes | memoryview) -> int | None:
    """The limit a raw-deflated data set inflates past (see ``MAX_INFLATE_RATIO``), or None
    when it stays under it. Inflates in bounded chunks and keeps nothing: memory stays at a few
    megabytes. Used on files (``classify``) and on what the storage SCP receives."""
    import zlib

    limit = max(MIN_INFLATE_LIMIT, MAX_INFLATE_RATIO * len(deflated))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    pending = memoryview(deflated)
    try:
        while pending and size <= limit:
            out = inflater.decompress(pending, 1 << 20)
            size += len(out)
            pending = memoryview(inflater.unconsumed_tail)
            if not out:
                break
    except zlib.error:
        return None  # damaged: reading it names the damage
    return limit if size > limit else None


def _inflation_bomb(data: bytes) -> str | None:
    """Why a deflated Part 10 file must not be inflated, or None."""
    found = _file_meta_end(data)
    if found is None or found[1] != DeflatedExplicitVRLittleEndian:
        return None
    limit = inflation_limit(memoryview(data)[found[0] :])
    if limit is None:
        return None
    return (
        f"the deflated data set inflates past {limit} bytes, {limit // len(data)} times "
        f"the file's {len(data)} bytes (a decompression bomb?); not inflated"
    )


def _parse(data: bytes, modern: bool) -> Reading:
    status = FileStatus.MODERN if modern else FileStatus.LEGACY
    if modern:
        bomb = _inflation_bomb(data)
        if bomb is not None:
            return Reading(FileStatus.CORRUPT, "inflation_limit", bomb)
    stream = io.BytesIO(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(stream, stop_before_pixels=True, force=not modern)
        except Exception as exc:  # pydicom raises many types on damaged input
            return Reading(FileStatus.CORRUPT, "parse_error", f"header cannot be read: {exc}")
        position = stream.tell()
        transfer_syntax = _text(ds.file_meta, "TransferSyntaxUID") if ds.file_meta else None
        if transfer_syntax is not None and not UID(transfer_syntax).is_transfer_syntax:
            # pydicom's encoders and decoders raise on it (a run once stopped on one file):
            # every step refuses the file here, with this reason
            return Reading(
                FileStatus.CORRUPT,
                "unknown_transfer_syntax",
                f"TransferSyntaxUID {transfer_syntax!r} is not a transfer syntax this reader "
                "knows (invalid, or a vendor's private one): the data set cannot be decoded",
                dataset=ds,
            )
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            problem = _check_deflated(data, modern)
        else:
            problem = _check_extents(ds, data, position, transfer_syntax)
        header = None
        extra_notes: list[str] = []
        if problem is None:
            try:
                header = extract_header(ds, extra_notes)
            except Exception as exc:  # a value so damaged that even reading it fails
                problem = ("bad_value", f"header value cannot be read: {exc}")
        notes = list(dict.fromkeys([*(_warning_text(w.message) for w in caught), *extra_notes]))
        notes = notes[:10]
    if problem is not None or header is None:
        code, reason = problem or ("bad_value", "header cannot be read")
        # the header as far as it was read: says which series lost this file (QC reports it)
        return Reading(FileStatus.CORRUPT, code, reason, notes=tuple(notes), dataset=ds)
    if header.sop_instance_uid is None and header.sop_class_uid is None and not modern:
        return Reading(
            FileStatus.CORRUPT,
            "no_identity",
            "read without a preamble, but holds no SOPClassUID or SOPInstanceUID",
            notes=tuple(notes),
        )
    if modern:
        if transfer_syntax is None:
            notes.append("file meta information lacks TransferSyntaxUID; encoding inferred")
        if header.sop_instance_uid is None:
            return Reading(
                status,
                "no_identity",
                "DICOM file without SOPInstanceUID: archived, but not indexed as an instance",
                header,
                tuple(notes),
                dataset=ds,
                stopped_at=position,
            )
        return Reading(status, "ok", "", header, tuple(notes), dataset=ds, stopped_at=position)
    implicit, little = ds.original_encoding
    encoding = (
        "implicit VR little endian"
        if implicit
        else f"explicit VR {'little' if little else 'big'} endian"
    )
    if header.transfer_syntax_uid is None:  # no file meta: record the encoding found by reading
        inferred = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
        header = replace(header, transfer_syntax_uid=str(inferred))
    return Reading(
        status,
        "no_preamble",
        f"no 128-byte preamble and 'DICM' prefix; read by content as {encoding}",
        header,
        tuple(notes),
        dataset=ds,
        stopped_at=position,
    )


def _warning_text(message: Warning | str) -> str:
    text = str(message).splitlines()[0] if str(message) else type(message).__name__
    return text.split(" Please see ")[0][:200]


def _check_deflated(data: bytes, modern: bool) -> tuple[str, str] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pydicom.dcmread(io.BytesIO(data), force=not modern)
        except Exception as exc:
            return "parse_error", f"deflated data set cannot be inflated and read: {exc}"
    return None


def _check_extents(
    ds: Dataset, data: bytes, position: int, transfer_syntax: str | None
) -> tuple[str, str] | None:
    """Find elements whose declared length runs past the end of the file (truncation)."""
    size = len(data)
    meta = ds.file_meta if isinstance(ds, FileDataset) else None
    group_length = meta.get("FileMetaInformationGroupLength") if meta else None
    if isinstance(group_length, int) and data[PREAMBLE : PREAMBLE + 4] == b"DICM":
        meta_end = PREAMBLE + 4 + 12 + group_length  # the group length element is 12 bytes
        if meta_end > size:
            return (
                "truncated",
                f"file meta information declares {group_length} bytes but the file ends at "
                f"{size} bytes (file cut short)",
            )
    if len(ds) == 0 and position >= size:
        return "no_data_set", "file meta information only: the data set is missing"
    for raw in ds._dict.values():  # raw elements keep value_tell and length before conversion
        length = getattr(raw, "length", None)
        tell = getattr(raw, "value_tell", None)
        if length is None or tell is None or length == _UNDEFINED:
            continue
        if tell + length > size:
            return (
                "truncated",
                f"element {raw.tag} declares {length} bytes but the file ends "
                f"{tell + length - size} bytes early (file cut short at {size} bytes)",
            )
    if position >= size:
        if "Rows" in ds and "Columns" in ds and "PixelData" not in ds:
            return "no_pixel_data", "image attributes (Rows, Columns) present but no pixel data"
        return None
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return None
    endian = "<" if little else ">"
    if size - position < 8:
        return "truncated", f"file ends inside the pixel data element header at byte {size}"
    group, _element = struct.unpack_from(endian + "HH", data, position)
    if group != _PIXEL_GROUP:
        return None
    if implicit:
        (length,) = struct.unpack_from(endian + "I", data, position + 4)
        start = position + 8
    elif data[position + 4 : position + 6] in _LONG_VRS:
        if size - position < 12:
            return "truncated", f"file ends inside the pixel data element header at byte {size}"
        (length,) = struct.unpack_from(endian + "I", data, position + 8)
        start = position + 12
    else:
        (length,) = struct.unpack_from(endian + "H", data, position + 6)
        start = position + 8
    if length == _UNDEFINED:
        delimiter = _SEQ_DELIMITER_LE if little else _SEQ_DELIMITER_BE
        if data.rfind(delimiter, start) < 0:
            return (
                "truncated_pixel_data",
                "encapsulated pixel data has no sequence delimiter: the file is cut short",
            )
        return None
    if start + length > size:
        return (
            "truncated_pixel_data",
            f"pixel data declares {length} bytes but only {max(size - start, 0)} are present "
            "(file cut short)",
        )
    expected = _expected_native_length(ds)
    compressed = transfer_syntax is not None and UID(transfer_syntax).is_compressed
    if expected is not None and not compressed and length < expected:
        return (
            "short_pixel_data",
            f"pixel data holds {length} bytes; Rows x Columns x frames x samples x bits need "
            f"{expected}",
        )
    return None


def _expected_native_length(ds: Dataset) -> int | None:
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits = _int(ds, "BitsAllocated")
    if rows is None or cols is None or bits is None:
        return None
    samples = _int(ds, "SamplesPerPixel") or 1
    frames = _int(ds, "NumberOfFrames") or 1
    if _text(ds, "PhotometricInterpretation") in {"YBR_FULL_422", "YBR_PARTIAL_422"}:
        samples = 2  # chroma subsampled 4:2:2: two samples per pixel on average (PS3.5 8.2.1)
    return (rows * cols * frames * samples * bits + 7) // 8


# --- header fields ---------------------------------------------------------------------------


_TAGS: dict[str, int] = {}
_BINARY = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}


def _tag(keyword: str) -> int:
    tag = _TAGS.get(keyword)
    if tag is None:
        found = tag_for_keyword(keyword)
        assert found is not None, keyword
        tag = _TAGS[keyword] = found
    return tag


def _values(ds: Dataset | None, keyword: str, notes: list[str] | None = None) -> list[Any]:
    """The values of one element, read straight from the raw bytes where that is safe.

    Converting every element through pydicom costs more than the rest of ingest together; the
    raw path decodes ASCII text and binary numbers itself and leaves anything else (non-ASCII
    text, which needs the character set; sequences) to pydicom.
    """
    if ds is None:
        return []
    tag = _tag(keyword)
    elem = ds._dict.get(tag)  # type: ignore[call-overload]
    if elem is None:
        return []
    if isinstance(elem, DataElement) and elem.VR != "SQ":
        value = elem.value
        if value is None or value == "":
            return []
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            return [v for v in value if v is not None and v != ""]
        return [value]
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        raw = elem.value
        vr = elem.VR or dictionary_VR(tag)
        code = _BINARY.get(vr)
        if code is not None:
            size = struct.calcsize(code)
            endian = "<" if elem.is_little_endian else ">"
            count = len(raw) // size
            return list(struct.unpack(f"{endian}{count}{code}", raw[: count * size]))
        if raw.isascii() and vr not in {"SQ", "OB", "OW", "UN"}:
            parts = [p.strip(" \x00") for p in raw.decode("ascii").split("\\")]
            return [p for p in parts if p]
    try:
        value = ds[tag].value
    except Exception as exc:
        if notes is not None:
            notes.append(f"{keyword} cannot be read: {_warning_text(str(exc))}")
        return []
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [v for v in value if v is not None and v != ""]
    return [value]


def _text(ds: Dataset | None, keyword: str) -> str | None:
    values = _values(ds, keyword)
    text = "\\".join(str(v).strip().replace("\x00", "") for v in values)
    return text or None


def _float(ds: Dataset | None, keyword: str, notes: list[str] | None = None) -> float | None:
    values = _values(ds, keyword, notes)
    if not values:
        return None
    try:
        result = float(values[0])
    except (TypeError, ValueError):
        if notes is not None:
            notes.append(f"invalid {keyword} value {str(values[0])[:40]!r}")
        return None
    return None if math.isnan(result) else result


def _int(ds: Dataset | None, keyword: str, notes: list[str] | None = None) -> int | None:
    number = _float(ds, keyword, notes)
    return int(number) if number is not None else None


def _floats(ds: Dataset | None, keyword: str) -> list[float] | None:
    try:
        return [float(v) for v in _values(ds, keyword)] or None
    except (TypeError, ValueError):
        return None


def _first_item(ds: Dataset, *path: str) -> Dataset | None:
    current: Dataset | None = ds
    for keyword in path:
        if current is None:
            return None
        try:
            seq = current.get(keyword)
        except Exception:
            return None
        current = seq[0] if seq else None
    return current


def _orientation_label(iop: list[float] | None) -> str | None:
    if iop is None or len(iop) != 6:
        return None
    rx, ry, rz, cx, cy, cz = iop
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _iop(ds: Dataset | None) -> list[float] | None:
    values = _floats(ds, "ImageOrientationPatient")
    return values if values is not None and len(values) == 6 else None


def extract_header(ds: Dataset, notes: list[str] | None = None) -> InstanceHeader:
    """The indexed header fields of one data set; Enhanced MR functional groups are looked into.

    Values that cannot be read are left out (None) and explained in ``notes``.
    """
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    frame = _first_item(ds, "PerFrameFunctionalGroupsSequence")

    def fallback(keyword: str, *path: str) -> Dataset | None:
        if _tag(keyword) in ds._dict:
            return ds
        for root in (shared, frame):
            if root is not None:
                item = _first_item(root, *path)
                if item is not None and _tag(keyword) in item._dict:
                    return item
        return None

    measures = ("PixelMeasuresSequence",)
    spacing_src = fallback("PixelSpacing", *measures)
    spacing = _floats(spacing_src, "PixelSpacing")
    thickness_src = fallback("SliceThickness", *measures)
    between_src = fallback("SpacingBetweenSlices", *measures)
    orient_src = fallback("ImageOrientationPatient", "PlaneOrientationSequence")
    iop = _iop(orient_src) if orient_src is not None else None
    position_src = fallback("ImagePositionPatient", "PlanePositionSequence")
    timing = fallback("RepetitionTime", "MRTimingAndRelatedParametersSequence")
    flip = fallback("FlipAngle", "MRTimingAndRelatedParametersSequence")
    echo_time = _float(ds, "EchoTime", notes)
    if echo_time is None:
        echo = _first_item(shared, "MREchoSequence") if shared is not None else None
        echo_time = _float(echo, "EffectiveEchoTime", notes) if echo is not None else None
    inversion = _float(ds, "InversionTime", notes)
    if inversion is None and shared is not None:
        modifier = _first_item(shared, "MRModifierSequence")
        inversion = _float(modifier, "InversionTimes", notes) if modifier is not None else None
    meta = ds.file_meta if isinstance(ds, FileDataset) and ds.file_meta else Dataset()
    return InstanceHeader(
        sop_instance_uid=_text(ds, "SOPInstanceUID") or _text(meta, "MediaStorageSOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID"),
        transfer_syntax_uid=_text(meta, "TransferSyntaxUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        study_description=_text(ds, "StudyDescription"),
        study_id=_text(ds, "StudyID"),
        institution_name=_text(ds, "InstitutionName"),
        institution_address=_text(ds, "InstitutionAddress"),
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        modality=_text(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber", notes),
        series_description=_text(ds, "SeriesDescription"),
        protocol_name=_text(ds, "ProtocolName"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        manufacturer=_text(ds, "Manufacturer"),
        manufacturer_model_name=_text(ds, "ManufacturerModelName"),
        software_versions=_text(ds, "SoftwareVersions"),
        station_name=_text(ds, "StationName"),
        performing_physician_name=_text(ds, "PerformingPhysicianName"),
        operators_name=_text(ds, "OperatorsName"),
        device_serial_number=_text(ds, "DeviceSerialNumber"),
        magnetic_field_strength=_float(ds, "MagneticFieldStrength", notes),
        repetition_time=_float(timing, "RepetitionTime", notes) if timing is not None else None,
        echo_time=echo_time,
        inversion_time=inversion,
        flip_angle=_float(flip, "FlipAngle", notes) if flip is not None else None,
        slice_thickness=_float(thickness_src, "SliceThickness", notes) if thickness_src else None,
        spacing_between_slices=(
            _float(between_src, "SpacingBetweenSlices", notes) if between_src else None
        ),
        pixel_spacing_row=spacing[0] if spacing and len(spacing) == 2 else None,
        pixel_spacing_column=spacing[1] if spacing and len(spacing) == 2 else None,
        rows=_int(ds, "Rows", notes),
        columns=_int(ds, "Columns", notes),
        image_orientation="\\".join(f"{v:g}" for v in iop) if iop else None,
        orientation=_orientation_label(iop),
        mr_acquisition_type=_text(ds, "MRAcquisitionType"),
        image_type=_text(ds, "ImageType"),
        scanning_sequence=_text(ds, "ScanningSequence"),
        sequence_variant=_text(ds, "SequenceVariant"),
        instance_number=_int(ds, "InstanceNumber", notes),
        image_position=(
            _text(position_src, "ImagePositionPatient") if position_src is not None else None
        ),
        slice_location=_float(ds, "SliceLocation", notes),
        acquisition_number=_int(ds, "AcquisitionNumber", notes),
        number_of_frames=_int(ds, "NumberOfFrames", notes),
        burned_in_annotation=_text(ds, "BurnedInAnnotation"),
    )
