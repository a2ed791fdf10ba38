"""Walking a delivered folder: every file under it, hostile names and all, without following a
symlinked folder; the one walk every stage and the ingest use."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cohortflow.pipelines.safeio import printable_path


@dataclass(frozen=True)
class Candidate:
    """A path found in a delivery, with what the directory listing told about it."""

    path: str  # as the OS gives it (may hold escaped undecodable bytes)
    shown: str  # printable, as stored in the index
    size: int | None
    mtime_ns: int | None


def candidate(path: str, entry: os.DirEntry[str] | None = None) -> Candidate:
    try:
        st = entry.stat() if entry is not None else os.stat(path)
    except OSError:
        return Candidate(path, printable_path(path), None, None)
    return Candidate(path, printable_path(path), st.st_size, st.st_mtime_ns)


def walk(
    sources: Iterable[Path], skip: Path | None = None, *, stat: bool = True
) -> Iterator[Candidate]:
    """Every file under the sources, depth first, in name order; symlinked folders not followed.

    A source that is a file is yielded as is; a folder that cannot be listed is yielded as a
    candidate too, so it ends in the index as unreadable instead of vanishing from the account.
    Without ``stat`` the candidates carry no size and mtime (names only: counting).
    """

    def found(path: str, entry: os.DirEntry[str] | None = None) -> Candidate:
        return candidate(path, entry) if stat else Candidate(path, path, None, None)

    skip_real = os.path.realpath(skip) if skip is not None else None
    for source in sources:
        root = os.path.abspath(source)
        if not os.path.isdir(root) or os.path.islink(root):
            yield found(root)
            continue
        stack = [root]
        while stack:
            folder = stack.pop()
            if skip_real is not None and os.path.realpath(folder) == skip_real:
                continue
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
            except OSError:
                yield Candidate(folder, printable_path(folder), None, None)
                continue
            subfolders = []
            for entry in entries:
                try:
                    is_folder = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_folder = False
                if is_folder:
                    subfolders.append(entry.path)
                else:
                    yield found(entry.path, entry)
            stack.extend(reversed(subfolders))


def count_files(sources: Iterable[Path], skip: Path | None = None) -> int:
    """How many candidates ``walk`` will yield (names only; for progress bars)."""
    return sum(1 for _ in walk(sources, skip, stat=False))
