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


@dataclass(frozen=True)
class SchemaState:
    """Where an index's schema stands against this version of cohortflow."""

    #: the database, its password hidden
    shown: str
    dialect: str
    #: the revision stamped in the index; None for an empty database
    current: str | None
    #: the newest revision this version of cohortflow ships
    head: str
    #: False when ``current`` is no revision this version knows (a newer cohortflow made it)
    known: bool

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    @property
    def behind(self) -> bool:
        """An index holding data at an older schema: migrating it changes its tables."""
        return self.current is not None and self.known and not self.at_head

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.shown,
            "dialect": self.dialect,
            "current": self.current,
            "head": self.head,
            "at_head": self.at_head,
            "newer": not self.known,
        }


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def known_revisions() -> set[str]:
    """Every schema revision this version of cohortflow ships."""
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(_alembic_config(None)).walk_revisions()}


def schema_state(engine: Engine) -> SchemaState:
    """The index's revision and this version's head (IndexDatabaseError if unreachable)."""
    shown = engine.url.render_as_string(hide_password=True)
    database = engine.url.database
    sqlite_file = engine.dialect.name == "sqlite" and database and database != ":memory:"
    if sqlite_file and not Path(str(database)).is_file():  # connecting would make it
        return SchemaState(shown, "sqlite", None, head_revision(), known=True)
    try:
        current = current_revision(engine)
    except OperationalError as exc:
        raise IndexDatabaseError(f"cannot open the index {shown}: {exc.orig}") from exc
    except SQLAlchemyError as exc:
        raise IndexDatabaseError(f"cannot open the index {shown}: {exc}") from exc
    return SchemaState(
        shown=shown,
        dialect=engine.dialect.name,
        current=current,
        head=head_revision(),
        known=current is None or current in known_revisions(),
    )


def needs_explicit_upgrade(state: SchemaState) -> bool:
    """Whether opening the index must not migrate it on its own: a PostgreSQL index holding a
    schema behind this version's. Such a server is shared (a run's Dask workers, the dashboard,
    several users): its upgrade is a step of its own, backed up first (``cohortflow db
    upgrade``). A SQLite index (one user's folder) and an empty database migrate as they
    open."""
    return state.behind and state.dialect != "sqlite"


def open_index(url: str, *, upgrade: bool | None = None) -> IndexDB:
    """Open the index at ``url``, its schema at the newest migration.

    ``upgrade``: None (the default) migrates an empty database and a SQLite index, and refuses
    a PostgreSQL index behind the newest schema (:func:`needs_explicit_upgrade`); True migrates
    any (``cohortflow db upgrade``, after its backup); False migrates none.

    Raises ConfigurationError for a bad URL and IndexDatabaseError when the database cannot be
    reached, is newer than this version of cohortflow, or must be upgraded first.
    """
    engine = create_index_engine(url)
    shown = _shown(url)
    sessions = sessionmaker(engine, expire_on_commit=False)
    try:
        with engine.connect() as connection:
            stamped = connection.execute(text("SELECT version_num FROM alembic_version")).all()
        if [row[0] for row in stamped] == [SCHEMA_REVISION]:
            return IndexDB(url=url, engine=engine, sessions=sessions)
    except (OperationalError, ProgrammingError):
        pass  # no version table yet (or no database): the full check below explains
    try:
        state = schema_state(engine)
        if not state.at_head:
            if not state.known:
                raise IndexDatabaseError(
                    f"the index {shown} has schema {state.current}, made by a newer cohortflow; "
                    "upgrade cohortflow"
                )
            if upgrade is False or (upgrade is None and needs_explicit_upgrade(state)):
                raise IndexDatabaseError(
                    f"the index {shown} is at schema {state.current or 'empty'}, not "
                    f"{state.head}: run `cohortflow db upgrade` (it backs the index up first, "
                    "then migrates it; stop the dashboard, workers and runs using it meanwhile)"
                )
            current = state.current or "empty"
            log.info("migrating the index %s from %s to %s", shown, current, state.head)
            migrate(engine)
    except IndexDatabaseError:
        engine.dispose()
        raise
    except OperationalError as exc:
        engine.dispose()
        raise IndexDatabaseError(f"cannot open the index {shown}: {exc.orig}") from exc
    except SQLAlchemyError as exc:
        engine.dispose()
        raise IndexDatabaseError(f"cannot open the index {shown}: {exc}") from exc
    return IndexDB(url=url, engine=engine, sessions=sessions)
