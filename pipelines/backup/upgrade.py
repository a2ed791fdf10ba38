"""``cohortflow db upgrade``: the index migrated to this version's schema, backed up first.

A PostgreSQL index behind the newest schema is migrated only here (other commands refuse it:
``models.database.needs_explicit_upgrade``); a SQLite index is migrated by any command as it
opens, and this gives it the same backup first."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cohortflow.models.database import (
    SchemaState,
    create_index_engine,
    migrate,
    schema_state,
)
from cohortflow.models.errors import IndexDatabaseError
from cohortflow.models.settings import Settings
from cohortflow.pipelines.backup.copy import BackupReport, back_up


@dataclass(frozen=True)
class UpgradeReport:
    before: SchemaState
    after: SchemaState
    #: the copy made before migrating (None: nothing to migrate, or backup declined)
    backup: BackupReport | None

    @property
    def migrated(self) -> bool:
        return self.before.current != self.after.current

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.before.shown,
            "dialect": self.before.dialect,
            "from": self.before.current,
            "to": self.after.current,
            "migrated": self.migrated,
            "backup": self.backup.as_json() if self.backup else None,
        }


def default_backup_folder(settings: Settings, state: SchemaState) -> Path:
    """``$COHORTFLOW_HOME/backups/index-<revision>-<UTC time>``."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return settings.home / "backups" / f"index-{state.current}-{stamp}"


def upgrade(
    settings: Settings, *, backup_folder: Path | None = None, backup: bool = True
) -> UpgradeReport:
    """Back the index up (into ``backup_folder``, default :func:`default_backup_folder`;
    the keys left out: an upgrade does not touch them), then migrate it to the newest
    schema. An index at the newest schema, or an empty one, is neither copied nor changed
    but for an empty one's tables."""
    engine = create_index_engine(settings.index)
    try:
        before = schema_state(engine)
        if not before.known:
            raise IndexDatabaseError(
                f"the index {before.shown} has schema {before.current}, made by a newer "
                "cohortflow; upgrade cohortflow"
            )
        copied = None
        if before.behind and backup:
            folder = backup_folder or default_backup_folder(settings, before)
            copied = back_up(settings, folder, keys=False)
        if not before.at_head:
            migrate(engine)
        after = schema_state(engine)
    finally:
        engine.dispose()
    return UpgradeReport(before=before, after=after, backup=copied)
