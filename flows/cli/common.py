"""What the command groups share: the command parser, argument types, the index, the steward's
login and the JSON document."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from cohortflow.flows.output import write_json
from cohortflow.models.settings import Settings
from cohortflow.models.synth import Fault

if TYPE_CHECKING:
    from cohortflow.models.database import IndexDB

#: What a leaf command sets as its ``handler`` default: run it, return its exit code.
Handler = Callable[[argparse.Namespace, Settings, Console], int]


class CommandParser(argparse.ArgumentParser):
    """A command's parser: ``-v`` is accepted after the command too (``cohortflow qc DIR -v``),
    as before it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,  # absent here: the top-level value stands
            help="log details to stderr",
        )


def add_protocol_options(parser: argparse.ArgumentParser, rules: str) -> None:
    """``--protocol`` (the protocol whose ``rules`` apply) and ``--protocols`` (its file): the
    options of every command that takes a folder's series by protocol."""
    parser.add_argument(
        "--protocol",
        help=f"protocol whose {rules} (default: the one whose study description patterns "
        "match each study)",
    )
    add_protocols_file(parser)


def add_protocols_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocols", type=Path, help="protocol file (default: settings)")


def add_no_record(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--no-record``: the command's results are not written to the index."""
    parser.add_argument(
        "--no-record",
        action="store_true",
        help=f"do not record results in the index{f' ({note})' if note else ''}",
    )


def version() -> str:
    """The installed distribution's version, as ``--version`` prints it."""
    from cohortflow import installed_version

    return installed_version() or "unknown (not installed)"


def fault_rate(text: str) -> tuple[Fault, float]:
    """``NAME=RATE``: a synthetic fault and its rate in [0, 1]."""
    name, sep, value = text.partition("=")
    try:
        fault = Fault(name.strip())
    except ValueError:
        known = ", ".join(f.value for f in Fault)
        raise argparse.ArgumentTypeError(f"unknown fault '{name}'; known: {known}") from None
    try:
        rate = float(value) if sep else float("nan")
    except ValueError:
        rate = float("nan")
    if not 0.0 <= rate <= 1.0:
        raise argparse.ArgumentTypeError(f"'{text}': give NAME=RATE with a rate in [0, 1]")
    return fault, rate


def date(text: str) -> dt.date:
    """A date as YYYY-MM-DD or YYYYMMDD."""
    for pattern in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, pattern).date()
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"'{text}' is not a date (YYYY-MM-DD)")


@contextmanager
def open_index(settings: Settings) -> Iterator[IndexDB]:
    """The archive index, disposed of when the block ends."""
    from cohortflow.models.database import open_index as open_database

    index = open_database(settings.index)
    try:
        yield index
    finally:
        index.dispose()


def emit(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    """Write ``payload`` as the command's JSON document when ``--json`` was given."""
    if args.json:
        write_json(payload)


def audit_read(index: IndexDB, action: str, detail: dict[str, Any]) -> None:
    """A command's read of identified data, audited (the user running it is the actor)."""
    from cohortflow.models.linkage import audit

    with index.session() as session:
        audit(session, action, json.dumps(detail, default=str))


def password_of(args: argparse.Namespace) -> str | None:
    """The password of ``--user``: from standard input, the terminal, or None."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if sys.stdin.isatty():
        return getpass.getpass(f"password for {args.user}: ")
    return None


def steward_login(
    args: argparse.Namespace, index: IndexDB, err: Console, what: str = "the identified layer"
) -> str | None:
    """The steward's name when ``--user`` and the password are right; None (said, and a refusal
    audited) otherwise. ``what`` names what needs the steward."""
    from cohortflow.models.linkage import audit
    from cohortflow.models.users import STEWARD, authenticate

    if not args.user:
        err.print(f"[red]usage error:[/red] {what} needs --user (a steward account)")
        return None
    password = password_of(args)
    if password is None:
        err.print("[red]usage error:[/red] no terminal to ask for a password: --password-stdin")
        return None
    with index.session() as session:
        login = authenticate(session, args.user, password)
        found = login.account
        if found is not None and found.role != STEWARD:  # a failed login is audited already
            detail = json.dumps({"user": args.user, "for": what, "why": f"a {found.role}"})
            audit(session, "refused.steward", detail, actor=args.user)
    if found is None:
        err.print(f"[red]error:[/red] {args.user}: {login.reason}")
        return None
    if found.role != STEWARD:
        err.print(
            f"[red]error:[/red] {args.user} is a {found.role}: {what} is for steward accounts only"
        )
        return None
    return found.username
