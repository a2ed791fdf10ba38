"""The identified archive: received content stored once, named by its SHA-256.

Layout: ``<archive>/blobs/ab/abcd...``: one level of 256 folders, as git does. A second level
(65,536 folders) made ingest 10 times slower here: nearly every new file created a folder, and
ext4 folders hold millions of entries well (hashed directory index).
A blob is written to a temporary name and renamed into place, so a crash never leaves a partial
file under a final name; blobs are read-only, and an existing blob is never rewritten.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_CHUNK = 1 << 20


@dataclass
class ArchiveStore:
    """Content-addressed storage under ``root``."""

    root: Path
    _made: set[str] = field(default_factory=set, repr=False)

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    def path_for(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def _make_folder(self, target: Path) -> None:
        folder = str(target.parent)
        if folder not in self._made:  # one mkdir per folder and process, not per file
            target.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)

    def has(self, sha256: str, size: int) -> bool:
        try:
            return self.path_for(sha256).stat().st_size == size
        except OSError:
            return False

    def put(self, sha256: str, data: bytes) -> bool:
        """Store ``data`` under its hash; True if it was new, False if already there."""
        target = self.path_for(sha256)
        if self.has(sha256, len(data)):
            return False
        self._make_folder(target)
        temporary = target.with_name(f".{sha256}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            os.close(fd)
        os.replace(temporary, target)
        return True

    def adopt(self, sha256: str, source: str, size: int, mtime_ns: int | None, data: bytes) -> bool:
        """Store a file that is handed over (``ingest --move``) by hard-linking it: no copy.

        The link is kept only if the linked file is still the one that was read (same size and
        mtime); otherwise, or when linking is impossible (another file system, no permission),
        ``data`` is written as by ``put``. True if the content was new.
        """
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


def hash_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (hashlib releases the GIL on large updates)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
