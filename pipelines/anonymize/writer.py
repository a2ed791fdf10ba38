"""Write a de-identified data set by copying the bytes of every element it left untouched.

De-identification changes a few dozen elements of a file that holds a hundred or more, and
pixel data that is most of its bytes. pydicom's writer encodes every element again, which is
most of the time spent anonymizing. Here an element is copied from the source bytes when it is
still the very raw element read from them (not converted, not replaced), has a defined length,
and its tag is found where its header must start; everything else (new, changed, converted,
undefined-length elements) is encoded by pydicom's own ``write_data_element``. Runs of
consecutive untouched elements are copied as one slice. The output is byte-identical to what
pydicom would write for the same data set (tests compare both), except the 128-byte preamble,
which is always zeroed here: a source's preamble may carry application data (a TIFF header).

Only for data sets decoded from ``source`` in little endian, written in that same encoding and
character set; otherwise the caller uses pydicom's writer.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

#: Explicit VR elements whose header is 12 bytes (2 reserved bytes and a 4-byte length).
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_UNDEFINED = 0xFFFFFFFF
#: Text VRs whose values pydicom writes as they are (numbers as strings, DS and IS, are not
#: here: pydicom may reformat them).
_TEXT_VRS = {
    "AE",
    "AS",
    "CS",
    "DA",
    "DT",
    "LO",
    "LT",
    "PN",
    "SH",
    "ST",
    "TM",
    "UC",
    "UI",
    "UR",
    "UT",
}

Originals = Mapping[BaseTag, DataElement | RawDataElement]


def snapshot(ds: Dataset) -> dict[BaseTag, DataElement | RawDataElement]:
    """The top-level elements of ``ds`` as read, before anything changes them."""
    return {tag: ds.get_item(tag) for tag in ds.keys()}  # noqa: SIM118 - raw, unconverted


def can_splice(ds: Dataset, meta: FileMetaDataset) -> bool:
    """Little endian, the transfer syntax the data set was read in, its character set kept."""
    implicit, little = ds.original_encoding
    syntax = meta.get("TransferSyntaxUID")
    return (
        implicit is not None
        and bool(little)
        and syntax is not None
        and not syntax.is_deflated
        and syntax.is_implicit_VR == implicit
        and syntax.is_little_endian
        and ds.original_character_set == ds._character_set
    )


def encode_file(ds: Dataset, meta: FileMetaDataset, source: bytes, originals: Originals) -> bytes:
    """Preamble, file meta information and the data set in its original encoding."""
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    fp.write(_encode_meta(meta))
    implicit, little = ds.original_encoding
    fp.is_implicit_VR, fp.is_little_endian = bool(implicit), bool(little)
    charset = ds.get("SpecificCharacterSet", "iso8859")
    run: list[int] = []  # [start, end) of the pending run of copied bytes

    def flush() -> None:
        if run:
            fp.write(source[run[0] : run[1]])
            run.clear()

    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # retired group lengths are not written (as pydicom does)
        element = ds.get_item(tag)
        span = _span(element, originals.get(tag), source, bool(implicit))
        if span is None:
            flush()
            encoded = _encode_text(element, bool(implicit))
            if encoded is None:
                write_data_element(fp, element, charset)
            else:
                fp.write(encoded)
        elif run and run[1] == span[0]:
            run[1] = span[1]
        else:
            flush()
            run.extend(span)
    flush()
    return bytes(fp.getvalue())


def _encode_meta(meta: FileMetaDataset) -> bytes:
    """File meta information as ``write_file_meta_info(enforce_standard=True)`` writes it."""
    validate_file_meta(meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    for tag in sorted(meta.keys()):
        if tag == 0x00020000:
            continue  # the group length, computed below
        element = meta[tag]
        encoded = _encode_text(element, implicit=False)
        if encoded is None:
            write_data_element(body, element)
        else:
            body.write(encoded)
    data = bytes(body.getvalue())
    meta.FileMetaInformationGroupLength = len(data)
    return b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<L", len(data)) + data


def _encode_text(element: DataElement | RawDataElement, implicit: bool) -> bytes | None:
    """A changed element of a plain-text VR with an ASCII value, encoded as pydicom would
    (values joined by backslashes, padded to even length); None for anything else."""
    if not isinstance(element, DataElement) or element.VR not in _TEXT_VRS:
        return None
    value = element.value
    if value is None or value == "":
        text = ""
    elif isinstance(value, str | PersonName):
        text = str(value)
    elif isinstance(value, MultiValue | list) and all(isinstance(v, str) for v in value):
        text = "\\".join(value)
    else:
        return None
    if not text.isascii():
        return None  # character sets are pydicom's business
    body = text.encode("ascii")
    if len(body) % 2:
        body += b"\0" if element.VR == "UI" else b" "
    tag = int(element.tag)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<L", len(body)) + body
    if element.VR in _LONG_VRS:
        return head + element.VR.encode() + b"\0\0" + struct.pack("<L", len(body)) + body
    if len(body) > 0xFFFF:
        return None
    return head + element.VR.encode() + struct.pack("<H", len(body)) + body


def _span(
    element: DataElement | RawDataElement,
    original: DataElement | RawDataElement | None,
    source: bytes,
    implicit: bool,
) -> tuple[int, int] | None:
    """Where the untouched raw ``element`` lies in ``source``; None when it must be encoded."""
    if (
        element is not original
        or not isinstance(element, RawDataElement)
        or element.value_tell is None
        or element.length == _UNDEFINED
    ):
        return None
    header = 8 if implicit or element.VR not in _LONG_VRS else 12
    start = element.value_tell - header
    tag = int(element.tag)
    if start < 0 or source[start : start + 4] != struct.pack("<HH", tag >> 16, tag & 0xFFFF):
        return None
    return start, element.value_tell + element.length
