"""The identified archive: received content stored once, named by its SHA-256.

Layout: ``<archive>/blobs/ab/abcd...``: one level of 256 folders, as git does. A second level
(65,536 folders) made ingest 10 times slower here: nearly every new file created a folder, and
ext4 folders hold millions of entries well (hashed directory index).
A blob is written to a temporary name and renamed into place, so a crash never leaves a partial
file under a final name; blobs are read-only, and an existing blob is never rewritten (but by
``rekey``, which replaces it by the same content under another key).

With an archive key (``archive_key_source``, on by default) every blob is sealed with
AES-256-GCM (:mod:`pipelines.archive.sealed`); its name stays the SHA-256 of the plaintext, so
deduplication and ``verify`` work as before. Blobs written before encryption was turned on are
read as they are, and sealed by the next ``cohortflow archive rekey``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

from cohortflow.models.errors import ArchiveKeyError
from cohortflow.pipelines.archive import sealed
from cohortflow.pipelines.archive.sealed import KeyRing, SealError

if TYPE_CHECKING:
    from cohortflow.models.settings import Settings

_CHUNK = 1 << 20


@dataclass
class RekeyReport:
    """What ``rekey`` did: blobs re-wrapped under the new key, plaintext blobs sealed, blobs
    left as they were (already the new key's), and the ones it could not open."""

    key_id: str
    rewrapped: int = 0
    sealed: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (blob, reason)
    retired: int = 0  # old keys removed from the ring

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class ArchiveStore:
    """Content-addressed storage under ``root``; blobs sealed when ``key_source`` is set."""

    root: Path
    #: ``file:PATH`` or ``env:VARIABLE`` of the archive key ring; None: stored as received
    key_source: str | None = None
    _made: set[str] = field(default_factory=set, repr=False)
    _ring: tuple[object, KeyRing] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, object]:
        # sent to a worker process: the key ring is read there, never pickled
        return {**self.__dict__, "_ring": None, "_made": set()}

    @classmethod
    def of(cls, settings: Settings) -> ArchiveStore:
        return cls(settings.archive, settings.archive_key)

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    def path_for(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    # --- keys ------------------------------------------------------------------------------

    def ring(self, fresh: bool = False) -> KeyRing | None:
        """The key ring, read again whenever its file changed (a rekey while this process
        runs: new blobs are sealed with the new key from the next one on)."""
        if self.key_source is None:
            return None
        path = sealed.ring_path(self.key_source)
        stamp = _stamp(path)
        if fresh or self._ring is None or self._ring[0] != stamp:
            if path is not None and stamp is None and self._holds_sealed_blobs():
                # a new ring would seal new blobs and leave every earlier one unreadable
                raise ArchiveKeyError(
                    f"no archive key ring at {path}, and the archive {self.root} holds sealed "
                    "blobs: restore the ring (they cannot be read without it), or point "
                    "archive_key_source at it"
                )
            ring = sealed.load_ring(self.key_source)
            self._ring = (_stamp(path), ring)  # made on first use: stamped as made
        return self._ring[1]

    def _holds_sealed_blobs(self) -> bool:
        """Whether the first blob found is sealed (one file is read, however large the
        archive)."""
        for blob in self.iter_blob_files():
            with open(blob, "rb") as handle:
                return sealed.is_sealed(handle.read(4))
        return False

    def _opening_ring(self, header: bytes) -> KeyRing:
        """A ring holding the key that sealed the blob of ``header``: the ring is read again
        when this process' copy lacks it (rekeyed since it was read)."""
        ring = self.ring()
        if ring is None:
            raise SealError("unreadable", "the blob is sealed, and no archive key is configured")
        if ring.key(header[4:12]) is None:
            ring = self.ring(fresh=True) or ring
        return ring

    # --- writing ---------------------------------------------------------------------------

    def _make_folder(self, target: Path) -> None:
        folder = str(target.parent)
        if folder not in self._made:  # one mkdir per folder and process, not per file
            target.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)

    def has(self, sha256: str, size: int) -> bool:
        try:
            stored = self.path_for(sha256).stat().st_size
        except OSError:
            return False
        return stored in (size, sealed.sealed_size(size))

    def put(self, sha256: str, data: bytes) -> bool:
        """Store ``data`` under its hash; True if it was new, False if already there."""
        target = self.path_for(sha256)
        if self.has(sha256, len(data)):
            return False
        self._make_folder(target)
        ring = self.ring()
        pieces = [data] if ring is None else sealed.seal(data, sha256, ring)
        self._write(target, pieces)
        return True

    def _write(self, target: Path, pieces: Iterable[bytes]) -> None:
        """``pieces`` written to a temporary name and renamed to ``target`` (read-only): whole
        or not at all, whatever happens on the way."""
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        try:
            try:
                for piece in pieces:
                    view = memoryview(piece)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
            finally:
                os.close(fd)
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def adopt(self, sha256: str, source: str, size: int, mtime_ns: int | None, data: bytes) -> bool:
        """Store a file that is handed over (``ingest --move``) by hard-linking it: no copy.

        The link is kept only if the linked file is still the one that was read (same size and
        mtime); otherwise, or when linking is impossible (another file system, no permission),
        ``data`` is written as by ``put``. A sealed archive always writes: what it stores is
        not the file handed over. True if the content was new.
        """
        if self.key_source is not None:
            return self.put(sha256, data)
        target = self.path_for(sha256)
        if self.has(sha256, size):
            return False
        self._make_folder(target)
        try:
            os.link(source, target)
        except FileExistsError:
            return self.put(sha256, data)  # a partial or foreign file: put checks and replaces
        except OSError:
            return self.put(sha256, data)
        linked = target.stat()
        if linked.st_size != size or (mtime_ns is not None and linked.st_mtime_ns != mtime_ns):
            target.unlink()
            return self.put(sha256, data)
        target.chmod(0o400)
        return True

    # --- reading ---------------------------------------------------------------------------

    def unseal(self, data: bytes, sha256: str) -> bytes:
        """A blob's content from the bytes of its file (as they are if it is not sealed).
        Raises :class:`SealError` if it is sealed and fails to open."""
        if not sealed.is_sealed(data):
            return data
        return sealed.unseal(data, sha256, self._opening_ring(data[: sealed.HEADER]))

    def read(self, sha256: str) -> bytes:
        """A blob's whole content (use :meth:`content` for large blobs)."""
        return b"".join(self.content(sha256))

    def content(self, sha256: str) -> Iterator[bytes]:
        """A blob's content, a segment at a time (bounded memory), authenticated as it is
        read: :class:`SealError` if it was altered."""
        with open(self.path_for(sha256), "rb") as handle:
            head = handle.read(sealed.HEADER)
            if not sealed.is_sealed(head):
                yield head
                while chunk := handle.read(_CHUNK):
                    yield chunk
                return
            ring = self._opening_ring(head)
            yield from sealed.open_segments(sealed.read_pieces(handle, head), sha256, ring)

    def digest(self, sha256: str) -> str:
        """SHA-256 of a blob's content (its plaintext, sealed or not)."""
        hashed = hashlib.sha256()
        for chunk in self.content(sha256):
            hashed.update(chunk)
        return hashed.hexdigest()

    def iter_blob_files(self) -> Iterator[Path]:
        """Every file under ``blobs/`` (temporary files of interrupted writes excluded)."""
        if not self.blobs.is_dir():
            return
        for folder in sorted(os.scandir(self.blobs), key=lambda e: e.name):
            if not folder.is_dir():
                continue
            for entry in sorted(os.scandir(folder.path), key=lambda e: e.name):
                if entry.is_file() and not entry.name.startswith("."):
                    yield Path(entry.path)

    # --- key rotation ----------------------------------------------------------------------

    def rekey(self, progress: Callable[[int], None] | None = None) -> RekeyReport:
        """Rotate the archive key with the archive in use: a new key is added to the ring (new
        blobs are sealed with it from then on, in every process), each blob's data key is
        re-wrapped under it (blobs stored as received are sealed), each blob replaced
        atomically, and the old keys are removed from the ring once a pass over the archive
        finds no blob that still needs them. A killed rekey leaves every blob readable; the
        rerun adds another key and goes on."""
        if self.key_source is None:
            raise ArchiveKeyError("the archive is not encrypted (archive_key_source: none)")
        path = sealed.ring_path(self.key_source)
        if path is None:
            raise ArchiveKeyError(
                f"the archive key comes from {self.key_source}: rekey writes the new key to a "
                "key ring file; set archive_key_source to file:PATH"
            )
        old = sealed.load_ring(self.key_source)
        new_id, new_key = KeyRing.new_key()
        ring = KeyRing((*old.keys, (new_id, new_key)))
        sealed.write_ring(path, ring)
        self._ring = None
        report = RekeyReport(key_id=new_id.hex())
        for attempt in range(3):  # a process sealed with the old key as the ring changed: again
            touched, unchanged = self._rekey_pass(ring, new_id, report, progress)
            if attempt == 0:
                report.unchanged = unchanged
            if not touched:
                break
        if not report.failed and not touched:
            sealed.write_ring(path, KeyRing(((new_id, new_key),)))
            report.retired = len(old.keys)
            self._ring = None
        return report

    def _rekey_pass(
        self,
        ring: KeyRing,
        new_id: bytes,
        report: RekeyReport,
        progress: Callable[[int], None] | None,
    ) -> tuple[int, int]:
        touched = unchanged = 0
        failed = {blob for blob, _ in report.failed}
        for blob in self.iter_blob_files():
            name = blob.name
            if name in failed:
                continue
            try:
                with open(blob, "rb") as handle:
                    head = handle.read(sealed.HEADER)
                    if sealed.is_sealed(head) and head[4:12] == new_id:
                        unchanged += 1
                        continue
                    if sealed.is_sealed(head):  # the new header, the sealed segments as they are
                        header = sealed.rewrap(head, name, ring, ring)
                        self._write(blob, chain([header], iter(lambda: handle.read(_CHUNK), b"")))
                        report.rewrapped += 1
                    else:
                        data = head + handle.read()
                        if hashlib.sha256(data).hexdigest() != name:
                            raise SealError("changed", "its content does not match its name")
                        self._write(blob, sealed.seal(data, name, ring))
                        report.sealed += 1
                touched += 1
            except (SealError, OSError) as error:
                reason = error.reason if isinstance(error, SealError) else str(error)
                report.failed.append((name, reason))
            if progress is not None:
                progress(1)
        return touched, unchanged


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What tells that the key ring file changed (None: no file, or ``env:``)."""
    if path is None:
        return None
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)
