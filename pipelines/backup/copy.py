"""``cohortflow backup`` and ``restore``: the index and the keys into a folder of their own,
and back.

A backup folder holds ``MANIFEST.json`` (what is there, its SHA-256, the index's schema
revision, the key sources it came from: never a secret), the index (``index.sqlite``, an
online copy; or ``index.pgdump``, ``pg_dump``'s custom format) and, unless left out,
``keys/`` (the project key and the archive key ring as their files held them). The folder and
every file in it are the owner's only: with the keys it is the re-identification key of the
project and must be stored as such, apart from the de-identified data.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from cohortflow import installed_version
from cohortflow.models.database import (
    create_index_engine,
    head_revision,
    known_revisions,
    schema_state,
)
from cohortflow.models.errors import CohortflowError
from cohortflow.models.settings import Settings
from cohortflow.pipelines.backup import pgdump, sqlite
from cohortflow.pipelines.safeio import create_owner_only, hash_file

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
FORMAT = 1
#: the keys a backup carries: role -> (the setting naming its source, its file in the backup)
KEYS = {
    "pseudonym": ("pseudonym_key_source", "keys/project.key"),
    "archive": ("archive_key_source", "keys/archive.key"),
}


class BackupError(CohortflowError):
    """A backup or restore that cannot be made; the message says why and what to do."""


@dataclass(frozen=True)
class KeyCopy:
    """One key and what became of it."""

    role: str
    #: where the settings take it from (``file:PATH``, ``env:VARIABLE`` or ``none``)
    source: str
    #: copied / left_out / not_a_file / missing (backup); restored / present / not_a_file /
    #: left_out / not_in_backup (restore)
    outcome: str
    #: its file in the backup folder, when copied
    file: str | None = None


@dataclass(frozen=True)
class BackupReport:
    folder: Path
    dialect: str
    #: the index's schema revision when it was copied
    revision: str | None
    index_file: str
    index_bytes: int
    keys: tuple[KeyCopy, ...] = field(default_factory=tuple)

    @property
    def holds_keys(self) -> bool:
        return any(k.outcome == "copied" for k in self.keys)

    def as_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "dialect": self.dialect,
            "revision": self.revision,
            "index_file": self.index_file,
            "index_bytes": self.index_bytes,
            "keys": [k.__dict__ for k in self.keys],
            "holds_keys": self.holds_keys,
        }


@dataclass(frozen=True)
class RestoreReport:
    folder: Path
    index: str
    dialect: str
    revision: str | None
    head: str
    keys: tuple[KeyCopy, ...] = field(default_factory=tuple)

    def as_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "index": self.index,
            "dialect": self.dialect,
            "revision": self.revision,
            "head": self.head,
            "keys": [k.__dict__ for k in self.keys],
        }


def _owner_only_folder(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)  # mkdir's mode passes through the umask, and exist_ok keeps an old one


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise BackupError(f"the index {url} is not a SQLite file")
    return Path(database)


def back_up(settings: Settings, folder: Path, *, keys: bool = True) -> BackupReport:
    """Copy the index (online) and, with ``keys``, the key files into the new or empty
    ``folder``, owner-only. Raises BackupError (folder not empty, nothing to back up) and
    IndexDatabaseError (the index cannot be read or dumped)."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise BackupError(f"{folder} is not an empty folder: give a new one for the backup")
    url = settings.index
    if make_url(url).get_backend_name() == "sqlite" and not _sqlite_path(url).is_file():
        raise BackupError(f"there is no index to back up at {_sqlite_path(url)}")
    engine = create_index_engine(url)
    try:
        state = schema_state(engine)
    finally:
        engine.dispose()
    _owner_only_folder(folder)
    if state.dialect == "sqlite":
        index_file = "index.sqlite"
        sqlite.copy_online(_sqlite_path(url), folder / index_file)
    elif state.dialect == "postgresql":
        index_file = "index.pgdump"
        pgdump.dump(url, folder / index_file)
    else:
        raise BackupError(f"cannot back up a {state.dialect} index: SQLite or PostgreSQL only")
    copies = []
    for role, (setting, name) in KEYS.items():
        source = str(getattr(settings, setting))
        kind, _, where = source.partition(":")
        if not keys:
            copies.append(KeyCopy(role, source, "left_out"))
        elif kind != "file":  # env:VARIABLE, or none: the key is not kept in a file here
            copies.append(KeyCopy(role, source, "not_a_file"))
        elif not Path(where).is_file():
            copies.append(KeyCopy(role, source, "missing"))
        else:
            _owner_only_folder(folder / "keys")
            create_owner_only(folder / name, Path(where).read_bytes())
            copies.append(KeyCopy(role, source, "copied", name))
    manifest = {
        "format": FORMAT,
        "made_by": f"cohortflow {installed_version() or 'unknown'}",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "index": {
            "dialect": state.dialect,
            "from": state.shown,
            "revision": state.current,
            "file": index_file,
            "sha256": hash_file(folder / index_file),
        },
        "keys": [
            {
                "role": k.role,
                "source": k.source,
                "outcome": k.outcome,
                "file": k.file,
                "sha256": hash_file(folder / k.file) if k.file else None,
            }
            for k in copies
        ],
    }
    create_owner_only(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    return BackupReport(
        folder=folder,
        dialect=state.dialect,
        revision=state.current,
        index_file=index_file,
        index_bytes=(folder / index_file).stat().st_size,
        keys=tuple(copies),
    )


def read_manifest(folder: Path) -> dict[str, Any]:
    """The backup's manifest, its files checked against their SHA-256."""
    try:
        manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackupError(f"{folder} is not a cohortflow backup ({MANIFEST}: {exc})") from exc
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{folder}: backup format {manifest.get('format')!r} is not {FORMAT}")
    entries = [manifest["index"], *(k for k in manifest["keys"] if k.get("file"))]
    for entry in entries:
        path = folder / entry["file"]
        if not path.is_file() or hash_file(path) != entry["sha256"]:
            raise BackupError(f"{path} is missing or changed since the backup was made")
    return manifest


def _key_plan(
    settings: Settings, folder: Path, manifest: dict[str, Any], keys: bool
) -> list[tuple[KeyCopy, Path | None, bytes | None]]:
    """What restoring each key would do, decided before anything is written: a key file
    already there that differs from the backup's is refused (the index restored belongs to the
    backup's key: under another, pseudonyms change and the archive cannot be opened)."""
    saved = {k["role"]: k for k in manifest["keys"]}
    plan: list[tuple[KeyCopy, Path | None, bytes | None]] = []
    for role, (setting, _name) in KEYS.items():
        source = str(getattr(settings, setting))
        kind, _, where = source.partition(":")
        entry = saved.get(role)
        if not keys:
            plan.append((KeyCopy(role, source, "left_out"), None, None))
        elif entry is None or not entry.get("file"):
            plan.append((KeyCopy(role, source, "not_in_backup"), None, None))
        elif kind != "file":
            plan.append((KeyCopy(role, source, "not_a_file"), None, None))
        else:
            data = (folder / entry["file"]).read_bytes()
            target = Path(where)
            if target.is_file():
                if target.read_bytes() != data:
                    raise BackupError(
                        f"the {role} key at {target} differs from the backup's: the index "
                        "restored belongs to the backup's key. Move that file aside first "
                        "(keep it: whatever it keyed needs it) and restore again"
                    )
                plan.append((KeyCopy(role, source, "present", entry["file"]), None, None))
            else:
                plan.append((KeyCopy(role, source, "restored", entry["file"]), target, data))
    return plan


def restore(
    settings: Settings, folder: Path, *, overwrite: bool = False, keys: bool = True
) -> RestoreReport:
    """Put the backup in ``folder`` back: the index where the settings say (an existing one
    only with ``overwrite``), and the keys that are missing (owner-only). Everything is
    checked before anything is written. Nothing may use the index meanwhile."""
    manifest = read_manifest(folder)
    saved = manifest["index"]
    url = settings.index
    engine = create_index_engine(url)
    try:
        target = schema_state(engine)
    finally:
        engine.dispose()
    if target.dialect != saved["dialect"]:
        raise BackupError(
            f"the backup holds a {saved['dialect']} index and index_url is {target.dialect}: "
            "restore into the same kind of database"
        )
    revision = saved.get("revision")
    if revision is not None and revision not in known_revisions():
        raise BackupError(
            f"the backup's index is at schema {revision}, made by a newer cohortflow "
            f"({manifest.get('made_by')}): restore it with that version"
        )
    if target.current is not None and not overwrite:
        raise BackupError(
            f"the index {target.shown} exists (schema {target.current}): --overwrite replaces "
            "it, and what it holds since the backup is lost"
        )
    plan = _key_plan(settings, folder, manifest, keys)
    if target.dialect == "sqlite":
        sqlite.put_in_place(folder / saved["file"], _sqlite_path(url))
    else:
        pgdump.restore(url, folder / saved["file"], clean=target.current is not None)
    for _copy, path, data in plan:
        if path is not None and data is not None:
            if not path.parent.exists():  # an existing folder keeps its mode: it is not ours
                path.parent.mkdir(parents=True, mode=0o700)
            create_owner_only(path, data)
    return RestoreReport(
        folder=folder,
        index=target.shown,
        dialect=target.dialect,
        revision=revision,
        head=head_revision(),
        keys=tuple(copy for copy, _path, _data in plan),
    )
