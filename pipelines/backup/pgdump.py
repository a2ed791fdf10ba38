"""PostgreSQL's own tools for a backup of the index: ``pg_dump`` (a consistent snapshot of a
database in use) and ``pg_restore``, from the client package (Debian ``postgresql-client``).

The password never appears on a command line (``ps`` shows those): it travels in the
child's ``PGPASSWORD``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from sqlalchemy.engine import make_url

from cohortflow.models.errors import ConfigurationError, IndexDatabaseError

#: the longest a dump or a restore may take (seconds)
TIMEOUT_SECONDS = 6 * 3600.0


def available() -> bool:
    """Are ``pg_dump`` and ``pg_restore`` on the PATH?"""
    return shutil.which("pg_dump") is not None and shutil.which("pg_restore") is not None


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ConfigurationError(
            f"{name} is not on the PATH: install PostgreSQL's client tools (Debian package "
            "postgresql-client, of the server's major version or newer)"
        )
    return found


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """The libpq URI of a SQLAlchemy URL (no driver, no password) and the environment that
    carries the password."""
    parsed = make_url(url)
    env = {**os.environ}
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    plain = parsed.set(drivername="postgresql", password=None)
    return plain.render_as_string(hide_password=False), env


def _run(command: list[str], env: dict[str, str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise IndexDatabaseError(f"{what} took longer than {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise IndexDatabaseError(
            f"{what} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
        )


def dump(url: str, target: Path, timeout: float = TIMEOUT_SECONDS) -> None:
    """``pg_dump`` the database of ``url`` to the new file ``target`` (custom format,
    compressed, owner-only)."""
    uri, env = _libpq(url)
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        _run(
            [_tool("pg_dump"), "--format=custom", "--no-owner", f"--file={target}", uri],
            env,
            f"pg_dump of {make_url(url).render_as_string(hide_password=True)}",
            timeout,
        )
    except IndexDatabaseError:
        target.unlink(missing_ok=True)
        raise


def restore(url: str, source: Path, *, clean: bool, timeout: float = TIMEOUT_SECONDS) -> None:
    """``pg_restore`` the dump ``source`` into the database of ``url``, in one transaction
    (all or nothing); ``clean`` drops what the dump holds first."""
    uri, env = _libpq(url)
    command = [_tool("pg_restore"), "--no-owner", "--single-transaction", "--exit-on-error"]
    if clean:
        command += ["--clean", "--if-exists"]
    _run(
        [*command, f"--dbname={uri}", str(source)],
        env,
        f"pg_restore into {make_url(url).render_as_string(hide_password=True)}",
        timeout,
    )
