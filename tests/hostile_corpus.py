"""A corpus of hostile and broken input entries (issue 21), made on the fly from pydicom's test
files: byte flips, truncations, huge declared lengths, deep nesting, undefined lengths without
delimiters, pixel data declaring terabytes, bad character sets and VRs, invalid transfer
syntaxes, deflate bombs, symbolic links in and out of the tree, a FIFO, a socket, an empty file,
a directory named like a file, names holding newlines and escape sequences, and pydicom's own
test files. ``build(folder)`` writes it and returns what it wrote, by kind.
"""

from __future__ import annotations

import io
import os
import random
import socket
import struct
from collections import Counter
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tests.ingest_helpers import PYDICOM_FILES, deflate_bomb, pydicom_file


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _base() -> Dataset:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))  # explicit VR little endian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SeriesDescription = "T1 MPRAGE"
    return ds


def _element_offset(data: bytes, tag: tuple[int, int]) -> int:
    """Byte offset of an explicit VR little endian element's tag in ``data``."""
    return data.index(struct.pack("<HH", *tag))


def _nested(depth: int, defined: bool = True) -> bytes:
    """A data set whose sequence items nest ``depth`` deep (each item holds the next)."""
    ds = _base()
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = inner.ContentSequence
    try:
        return _encoded(ds)
    except RecursionError:  # pydicom's writer recurses too: write the nesting by hand
        return _nested_by_hand(depth)


def _nested_by_hand(depth: int) -> bytes:
    """Undefined-length sequences and items nested ``depth`` deep, closed properly."""
    head = _encoded(_base())
    pixel = _element_offset(head, (0x7FE0, 0x0010))
    seq_open = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
    item_open = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_close = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    body = (seq_open + item_open) * depth + (item_close + seq_close) * depth
    return head[:pixel] + body + head[pixel:]


def build(root: Path, seed: int = 21) -> Counter[str]:
    """Write the corpus under ``root``; returns the count of entries by kind."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    kinds: Counter[str] = Counter()

    def put(kind: str, name: str | bytes, data: bytes) -> None:
        path = os.path.join(os.fsencode(root), os.fsencode(name))
        with open(path, "wb") as handle:
            handle.write(data)
        kinds[kind] += 1

    good = _encoded(_base())
    put("clean", "clean.dcm", good)
    for i in range(50):
        flipped = bytearray(good)
        for _ in range(rng.randint(1, 20)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        put("byte_flip", f"flip_{i:02d}.dcm", bytes(flipped))
    for i in range(25):
        put("truncated", f"cut_{i:02d}.dcm", good[: rng.randrange(1, len(good))])
    # huge declared lengths on elements of the header and on the pixel data
    for i, tag in enumerate([(0x0010, 0x0010), (0x0008, 0x103E), (0x7FE0, 0x0010)]):
        for j, length in enumerate([0xFFFFFFF0, 0x7FFFFFFF, 0x10000000]):
            data = bytearray(good)
            at = _element_offset(good, tag)
            vr = bytes(data[at + 4 : at + 6])
            if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
                data[at + 8 : at + 12] = struct.pack("<I", length)
            else:
                data[at + 6 : at + 8] = struct.pack("<H", length & 0xFFFF)
            put("huge_length", f"huge_{i}_{j}.dcm", bytes(data))
    put("deep_nesting", "nest_1000.dcm", _nested_by_hand(1000))
    put("deep_nesting", "nest_5000.dcm", _nested_by_hand(5000))
    # undefined lengths without their delimiters: the file ends inside an open sequence
    head = good[: _element_offset(good, (0x7FE0, 0x0010))]
    seq_open = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
    item_open = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    for i, depth in enumerate((1, 10, 200)):
        put("no_delimiter", f"open_{i}.dcm", head + (seq_open + item_open) * depth)
    # pixel data declaring terabytes: rows x columns x frames from the header, few bytes given
    for i, frames in enumerate((1, 10000, 2_000_000)):
        ds = _base()
        ds.Rows = ds.Columns = 65535
        ds.NumberOfFrames = frames
        put("huge_pixels", f"pixels_{i}.dcm", _encoded(ds))
    for i, charset in enumerate(["ISO_IR 999", "\\\\\\", "ISO 2022 IR 87\\ISO_IR 13x", ""]):
        ds = _base()
        ds.SpecificCharacterSet = charset
        ds.PatientName = "Y\u00e9\u00e9^\u65e5\u672c"
        try:
            put("bad_charset", f"charset_{i}.dcm", _encoded(ds))
        except Exception:  # pydicom refuses to encode: plant raw bytes instead
            data = bytearray(good)
            at = _element_offset(good, (0x0008, 0x0005))
            data[at + 8 : at + 10] = b"\xff\xfe"
            put("bad_charset", f"charset_{i}.dcm", bytes(data))
    for i, vr in enumerate([b"ZZ", b"\x00\x00", b"S ", b"ob"]):
        data = bytearray(good)
        at = _element_offset(good, (0x0010, 0x0010))
        data[at + 4 : at + 6] = vr
        put("bad_vr", f"vr_{i}.dcm", bytes(data))
    for i, uid in enumerate(["1.2.3.4", "..", "not a uid", "1.2.840.10008.1.2.4.999"]):
        ds = _base()
        ds.file_meta.TransferSyntaxUID = uid
        try:
            put("bad_transfer_syntax", f"ts_{i}.dcm", _encoded(ds))
        except Exception:
            data = bytearray(good)
            at = _element_offset(good, (0x0002, 0x0010))
            (length,) = struct.unpack_from("<H", data, at + 6)
            value = uid.encode()[:length].ljust(length, b"\0")
            data[at + 8 : at + 8 + length] = value
            put("bad_transfer_syntax", f"ts_{i}.dcm", bytes(data))
    put("deflate_bomb", "bomb_600mb.dcm", deflate_bomb(600 << 20))
    put("deflate_bomb", "bomb_100mb.dcm", deflate_bomb(100 << 20))
    put("empty", "empty.dcm", b"")
    put("not_dicom", "notes.txt", b"a text file\n")
    put("not_dicom", "random.dcm", rng.randbytes(4096))
    # odd names: newline, escape sequences, undecodable bytes, rich markup
    put("odd_name", b"new\nline.dcm", good)
    put("odd_name", b"esc\x1b[2J\x1b[31mred.dcm", good)
    put("odd_name", b"latin1_\xe9\xff.dcm", good)
    put("odd_name", "[red]markup[bold].dcm", good)
    # entries that are not regular files
    (root / "folder.dcm").mkdir()
    kinds["directory_named_dcm"] += 1
    os.mkfifo(root / "fifo.dcm")
    kinds["fifo"] += 1
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "socket.dcm"))
    sock.close()  # the socket file stays
    kinds["socket"] += 1
    (root / "link_inside.dcm").symlink_to(root / "clean.dcm")
    kinds["symlink_inside"] += 1
    (root / "link_passwd.dcm").symlink_to("/etc/passwd")
    kinds["symlink_outside"] += 1
    (root / "link_dangling.dcm").symlink_to(root / "nowhere.dcm")
    kinds["symlink_dangling"] += 1
    (root / "link_dir").symlink_to("/etc", target_is_directory=True)
    kinds["symlink_dir_outside"] += 1
    locked = root / "locked.dcm"
    locked.write_bytes(good)
    locked.chmod(0)
    kinds["unreadable"] += 1
    # pydicom's bundled test files, as they are
    bundled = root / "pydicom"
    bundled.mkdir()
    for path in sorted(PYDICOM_FILES.glob("*.dcm")):
        (bundled / path.name).write_bytes(path.read_bytes())
        kinds["pydicom_test_file"] += 1
    return kinds
