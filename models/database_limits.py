"""A time limit on the statements of one session (the dashboard's per-request limit).

SQLite: a progress handler that interrupts the running statement once the deadline passes (it
is called every few thousand virtual-machine steps). PostgreSQL: ``SET LOCAL
statement_timeout`` for the transaction. Either way the statement fails with an
``OperationalError`` that ``is_time_limit`` recognises.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

#: SQLite virtual-machine steps between two looks at the clock
_STEPS = 20_000


@contextmanager
def time_limit(session: Session, seconds: float) -> Iterator[None]:
    """Let no statement of ``session`` run past ``seconds`` from now, inside the block (the
    connection goes back to the pool without the limit)."""
    connection = session.connection()
    dialect = connection.dialect.name
    if dialect == "sqlite":
        deadline = time.monotonic() + seconds
        raw: Any = connection.connection.driver_connection
        raw.set_progress_handler(lambda: int(time.monotonic() > deadline), _STEPS)
        try:
            yield
        finally:
            raw.set_progress_handler(None, 0)
        return
    if dialect == "postgresql":  # for this transaction only
        connection.execute(text(f"SET LOCAL statement_timeout = {max(1, int(seconds * 1000))}"))
    yield


def is_time_limit(exc: OperationalError) -> bool:
    """Whether ``exc`` is a statement stopped by ``time_limit``."""
    message = str(exc.orig).lower()
    return "interrupted" in message or "statement timeout" in message
