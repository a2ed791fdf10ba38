"""Opening the archive index: engine, connection settings per backend, migrations.

``open_index(url)`` returns an ``IndexDB`` whose schema is at the newest migration. SQLite gets
write-ahead logging and a busy timeout so the CLI, flow tasks and the dashboard can share one
file; PostgreSQL is used as given (``postgresql+psycopg://user:pass@host/db``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError, ProgrammingError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cohortflow.models.errors import ConfigurationError, IndexDatabaseError

log = logging.getLogger(__name__)

MIGRATIONS = "cohortflow.models:migrations"
#: The newest migration (a test checks it against Alembic's head). Opening an index that is
#: already there costs one query; Alembic is imported only when the schema must change.
SCHEMA_REVISION = "0011"


@dataclass(frozen=True)
class IndexDB:
    """The archive index: an engine and a session factory."""

    url: str
    engine: Engine
    sessions: sessionmaker[Session]

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error."""
        with self.sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer; NORMAL is durable across process crashes in WAL mode.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


def create_index_engine(url: str) -> Engine:
    """An engine for ``url``; creates the folder of a SQLite file. ConfigurationError if bad."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigurationError(f"index_url {url!r} is not a database URL: {exc}") from exc
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 60}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise ConfigurationError(
            f"cannot use index_url {parsed.render_as_string(hide_password=True)}: {exc} "
            "(PostgreSQL needs the 'postgres' extra: pip install 'cohortflow[postgres]')"
        ) from exc
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration shipped with this version of cohortflow."""
    from alembic.script import ScriptDirectory

    config = _alembic_config(None)
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


#: Key of the PostgreSQL advisory lock held while migrating ("cohortflow" in ASCII, truncated).
_PG_MIGRATION_LOCK = 0x636F686F7274


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """One migration at a time per index, across processes: a run, its workers and the
    dashboard may open a new index at the same moment. Alembic reads the current revision
    inside the lock, so whoever comes second finds the schema done and changes nothing.
    SQLite takes a lock file beside the database; PostgreSQL an advisory lock (see migrate)."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        with FileLock(f"{database}.migrate.lock"):
            yield
    else:
        yield


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (default: the newest); safe to call from several
    processes at once."""
    from alembic import command

    with _migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # released at the end of the transaction, also when the process dies
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
            )
        command.upgrade(_alembic_config(connection), revision)


def open_index(url: str, *, upgrade: bool = True) -> IndexDB:
    """Open the index at ``url``, migrating it to the newest schema unless ``upgrade`` is False.

    Raises ConfigurationError for a bad URL and IndexDatabaseError when the database cannot be
    reached or is newer than this version of cohortflow.
    """
    engine = create_index_engine(url)
    shown = make_url(url).render_as_string(hide_password=True)
    sessions = sessionmaker(engine, expire_on_commit=False)
    try:
        with engine.connect() as connection:
            stamped = connection.execute(text("SELECT version_num FROM alembic_version")).all()
        if [row[0] for row in stamped] == [SCHEMA_REVISION]:
            return IndexDB(url=url, engine=engine, sessions=sessions)
    except (OperationalError, ProgrammingError):
        pass  # no version table yet (or no database): the full check below explains
    try:
        current = current_revision(engine)
        head = head_revision()
        if current != head:
            if not upgrade:
                raise IndexDatabaseError(
                    f"the index {shown} is at schema {current or 'empty'}, not {head}; "
                    "run any cohortflow command that writes to upgrade it"
                )
            from alembic.script import ScriptDirectory

            known = {
                s.revision
                for s in ScriptDirectory.from_config(_alembic_config(None)).walk_revisions()
            }
            if current is not None and current not in known:
                raise IndexDatabaseError(
                    f"the index {shown} has schema {current}, made by a newer cohortflow; "
                    "upgrade cohortflow"
                )
            log.info("migrating the index %s from %s to %s", shown, current or "empty", head)
            migrate(engine)
    except OperationalError as exc:
        engine.dispose()
        raise IndexDatabaseError(f"cannot open the index {shown}: {exc.orig}") from exc
    except SQLAlchemyError as exc:
        engine.dispose()
        raise IndexDatabaseError(f"cannot open the index {shown}: {exc}") from exc
    return IndexDB(url=url, engine=engine, sessions=sessions)
