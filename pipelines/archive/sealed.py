"""Encryption at rest of the identified archive's blobs (AES-256-GCM, ``cryptography``).

Each blob gets a data key of its own, wrapped (AES-GCM) by the archive key; the content is
sealed in 1 MiB segments by the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár
(CRYPTO 2015), as Google Tink's streaming AEAD does: segment ``i`` is sealed with the nonce
``prefix(7) | i(4, big-endian) | last(1)``, so a segment cannot be dropped, repeated, moved or
cut off without the read failing, and a blob is read a segment at a time in bounded memory.

Both the wrapped key and every segment are bound to the blob's name (the SHA-256 of its
plaintext), so one blob's file put in another's place does not read as it. Rotating the archive
key (``cohortflow archive rekey``) unwraps and re-wraps the 48 bytes of each header only; the
sealed segments are copied as they are.

File layout (80-byte header, then the segments, each its ciphertext and a 16-byte tag)::

    0  "CFA" 0x01       magic and format version
    4  key id (8)       which archive key wrapped the data key
    12 wrap nonce (12)
    24 wrapped data key (32 + 16)
    72 segment nonce prefix (7), 1 reserved byte (0)

The archive key ring is a text file, one ``<key id hex> <key hex>`` per line, the last line the
key new blobs are sealed with; older lines are kept until no blob uses them. It is kept as the
project key is (``file:PATH``, owner-only, made on first use, or ``env:VARIABLE``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cohortflow.models.errors import ArchiveKeyError

MAGIC = b"CFA\x01"
HEADER = 80
SEGMENT = 1 << 20
TAG = 16
_KEY_ID = slice(4, 12)
_WRAP_NONCE = slice(12, 24)
_WRAPPED = slice(24, 72)
_PREFIX = slice(72, 79)


class SealError(Exception):
    """A sealed blob that cannot be opened: ``code`` is ``changed`` (it fails authentication:
    altered, cut off or another blob's) or ``unreadable`` (sealed by a key the ring lacks)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def sealed_size(size: int) -> int:
    """The size on disk of a sealed blob of ``size`` plaintext bytes."""
    segments = max(1, -(-size // SEGMENT))
    return HEADER + size + TAG * segments


def is_sealed(head: bytes) -> bool:
    return head[:4] == MAGIC


@dataclass(frozen=True)
class KeyRing:
    """The archive keys: ``keys`` in order, the last one sealing new blobs."""

    keys: tuple[tuple[bytes, bytes], ...]  # (key id, 32-byte key)

    @property
    def primary(self) -> tuple[bytes, bytes]:
        return self.keys[-1]

    def key(self, key_id: bytes) -> bytes | None:
        for known, key in self.keys:
            if known == key_id:
                return key
        return None

    def text(self) -> str:
        lines = ["# cohortflow archive keys: the last one seals new blobs; keep this file secret"]
        lines += [f"{key_id.hex()} {key.hex()}" for key_id, key in self.keys]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str, where: str) -> KeyRing:
        keys = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            try:
                if len(parts) == 1:  # a bare key (env:VARIABLE): its id follows from it
                    key = bytes.fromhex(parts[0])
                    key_id = hashlib.sha256(b"cohortflow archive key id\0" + key).digest()[:8]
                else:
                    key_id, key = bytes.fromhex(parts[0]), bytes.fromhex(parts[1])
            except ValueError:
                raise ArchiveKeyError(f"{where} line {number}: not hexadecimal") from None
            if len(key) != 32 or len(key_id) != 8 or len(parts) > 2:
                raise ArchiveKeyError(
                    f"{where} line {number}: expected '<16 hex digits> <64 hex digits>'"
                )
            keys.append((key_id, key))
        if not keys:
            raise ArchiveKeyError(f"{where} holds no archive key")
        return cls(tuple(keys))

    @staticmethod
    def new_key() -> tuple[bytes, bytes]:
        return secrets.token_bytes(8), AESGCM.generate_key(bit_length=256)


def ring_path(source: str) -> Path | None:
    """The key ring's file for a ``file:PATH`` source, None for ``env:``."""
    kind, _, where = source.partition(":")
    return Path(where) if kind == "file" else None


def _written_beside(path: Path, ring: KeyRing) -> Path:
    """``ring`` written whole (owner-only, synced) to a new file beside ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(ring.text())
        handle.flush()
        os.fsync(handle.fileno())
    return temporary


def write_ring(path: Path, ring: KeyRing) -> None:
    """Replace the key ring file atomically (owner-only; a reader sees the old or the new)."""
    os.replace(_written_beside(path, ring), path)


def load_ring(source: str, create: bool = True) -> KeyRing:
    """The key ring from ``file:PATH`` (made with one new key on first use when ``create``) or
    ``env:VARIABLE`` (one bare key or ring lines)."""
    kind, _, where = source.partition(":")
    if kind == "env":
        value = os.environ.get(where, "")
        if not value.strip():
            raise ArchiveKeyError(f"the archive key variable {where} is unset")
        return KeyRing.parse(value, f"${where}")
    if kind != "file":
        raise ArchiveKeyError(f"archive_key_source {source!r}: use file:PATH, env:VARIABLE or none")
    path = Path(where)
    if not path.exists():
        if not create:
            raise ArchiveKeyError(f"no archive key ring at {path}")
        # written whole under another name, then linked into place: of processes starting at
        # once (ingest's readers) one ring wins, and none reads a half-written file
        temporary = _written_beside(path, KeyRing((KeyRing.new_key(),)))
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            temporary.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        raise ArchiveKeyError(f"the archive key ring {path} is readable by others: chmod 600 it")
    return KeyRing.parse(path.read_text(encoding="ascii"), str(path))


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def seal(data: bytes, sha256: str, ring: KeyRing) -> Iterator[bytes]:
    """The sealed blob of ``data`` (named ``sha256``), header first, a segment at a time."""
    key_id, key = ring.primary
    name = bytes.fromhex(sha256)
    data_key = AESGCM.generate_key(bit_length=256)
    wrap_nonce = secrets.token_bytes(12)
    prefix = secrets.token_bytes(7)
    wrapped = AESGCM(key).encrypt(wrap_nonce, data_key, MAGIC + key_id + name)
    yield MAGIC + key_id + wrap_nonce + wrapped + prefix + b"\x00"
    aead = AESGCM(data_key)
    view = memoryview(data)
    count = max(1, -(-len(data) // SEGMENT))
    for index in range(count):
        part = view[index * SEGMENT : (index + 1) * SEGMENT]
        yield aead.encrypt(_nonce(prefix, index, index == count - 1), part, MAGIC + name)


def _header_key(header: bytes, sha256: str, ring: KeyRing) -> bytes:
    """The blob's data key, unwrapped."""
    if len(header) < HEADER or not is_sealed(header):
        raise SealError("changed", "not a sealed blob (header damaged or cut off)")
    key = ring.key(header[_KEY_ID])
    if key is None:
        raise SealError(
            "unreadable", f"sealed with archive key {header[_KEY_ID].hex()}, which the ring lacks"
        )
    try:
        return AESGCM(key).decrypt(
            header[_WRAP_NONCE], header[_WRAPPED], MAGIC + header[_KEY_ID] + bytes.fromhex(sha256)
        )
    except InvalidTag:
        raise SealError("changed", "its data key fails authentication") from None


def open_segments(segments: Iterable[bytes], sha256: str, ring: KeyRing) -> Iterator[bytes]:
    """The plaintext of a sealed blob read as ``HEADER`` bytes then ``SEGMENT + TAG``-byte
    pieces (the last shorter), a segment at a time; raises :class:`SealError` on any change."""
    pieces = iter(segments)
    header = next(pieces, b"")
    aead = AESGCM(_header_key(header, sha256, ring))
    prefix, name = header[_PREFIX], bytes.fromhex(sha256)
    index = 0
    current = next(pieces, None)
    if current is None:
        raise SealError("changed", "cut off after its header")
    while current is not None:
        following = next(pieces, None)
        last = following is None
        try:
            yield aead.decrypt(_nonce(prefix, index, last), current, MAGIC + name)
        except InvalidTag:
            where = "the end is missing or altered" if last else f"segment {index} is altered"
            raise SealError("changed", f"fails authentication: {where}") from None
        index, current = index + 1, following


def read_pieces(handle: BinaryIO, header: bytes) -> Iterator[bytes]:
    """A sealed blob's file cut as :func:`open_segments` reads it: its ``header`` (read
    already), then each sealed segment."""
    yield header
    while piece := handle.read(SEGMENT + TAG):
        yield piece


def unseal(data: bytes, sha256: str, ring: KeyRing) -> bytes:
    """The plaintext of a sealed blob held in memory."""
    view = memoryview(data)
    pieces = [bytes(view[:HEADER])] + [
        bytes(view[start : start + SEGMENT + TAG])
        for start in range(HEADER, len(data), SEGMENT + TAG)
    ]
    return b"".join(open_segments(pieces, sha256, ring))


def rewrap(header: bytes, sha256: str, old: KeyRing, new: KeyRing) -> bytes:
    """The header re-wrapped under ``new``'s primary key (the segments stay as they are)."""
    data_key = _header_key(header, sha256, old)
    key_id, key = new.primary
    wrap_nonce = secrets.token_bytes(12)
    wrapped = AESGCM(key).encrypt(wrap_nonce, data_key, MAGIC + key_id + bytes.fromhex(sha256))
    return MAGIC + key_id + wrap_nonce + wrapped + header[_PREFIX] + b"\x00"
