"""SQLite's online backup: a consistent copy of an index in use.

The index runs in WAL mode, so recent transactions live in ``index.sqlite-wal`` until a
checkpoint: copying the file alone loses them, and copying it while a command writes can give
a torn database. SQLite's backup API reads the database as one transaction sees it (the WAL
included) while writers go on."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from cohortflow.models.errors import IndexDatabaseError
from cohortflow.pipelines.safeio import create_owner_only

#: how long to wait for a lock held by a writer (seconds)
BUSY_SECONDS = 60.0


def copy_online(source: Path, target: Path) -> None:
    """Copy the SQLite database ``source`` (in use or not) to the new file ``target``
    (owner-only, one self-contained file: rollback journal, no WAL); its integrity checked.

    Raises IndexDatabaseError when ``source`` is missing or not a sound database."""
    if not source.is_file():
        raise IndexDatabaseError(f"no SQLite index at {source}")
    create_owner_only(target)  # an empty SQLite database, owner-only from its first byte
    try:
        with (
            closing(sqlite3.connect(source, timeout=BUSY_SECONDS)) as reading,
            closing(sqlite3.connect(target, timeout=BUSY_SECONDS)) as writing,
        ):
            reading.backup(writing)  # in one step: one consistent snapshot
            writing.execute("PRAGMA journal_mode=DELETE")
            check = writing.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.Error as exc:
        target.unlink(missing_ok=True)
        raise IndexDatabaseError(f"cannot copy the SQLite index {source}: {exc}") from exc
    if check != [("ok",)]:
        target.unlink(missing_ok=True)
        problems = "; ".join(str(row[0]) for row in check[:5])
        raise IndexDatabaseError(f"the copy of the SQLite index {source} is not sound: {problems}")


def put_in_place(copy: Path, database: Path) -> None:
    """Make the SQLite file ``copy`` the index at ``database`` (replacing one there): copied
    beside it first, then renamed over it, with the old WAL and shared memory removed (they
    belong to the database replaced). Nothing may have the index open meanwhile."""
    database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    staged = database.with_name(f".{database.name}.restoring")
    staged.unlink(missing_ok=True)
    try:
        copy_online(copy, staged)
        for suffix in ("-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        staged.replace(database)
    finally:
        staged.unlink(missing_ok=True)
