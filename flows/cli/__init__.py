"""The ``cohortflow`` command: parse, call one pipeline or flow, report. No logic of its own.

Each command group is a module of this package with an ``add_commands(sub)`` that registers its
commands; every leaf command sets its handler (``parser.set_defaults(handler=...)``, a
:data:`flows.cli.common.Handler`), and :func:`main` calls it.

Exit status (``flows.output.EXIT_*``): 0 done, 1 done with failures (reported per item), 2
usage or configuration error, 3 stopped on an unexpected error, 130 interrupted. With ``--json``
a command prints exactly one JSON document on stdout (an ``error`` document when it did not
finish); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from cohortflow.flows.cli import audit, cohort, data, deploy, pacs, results, run, stages
from cohortflow.flows.cli.common import CommandParser, Handler, version
from cohortflow.flows.output import (
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_STOPPED,
    EXIT_USAGE,
    cell,
    json_only_on_stdout,
    write_json,
)
from cohortflow.flows.prefect_env import configure_itk, protect_identified
from cohortflow.models.errors import CohortflowError, ConfigurationError
from cohortflow.models.settings import load_settings
from cohortflow.pipelines.pacs.errors import PacsError
from cohortflow.pipelines.safeio import RefusedError

__all__ = ["build_parser", "main"]

#: The command groups, in the order ``cohortflow --help`` lists their commands.
GROUPS = (data, pacs, stages, run, results, cohort, audit, deploy)


def build_parser() -> argparse.ArgumentParser:
    """The ``cohortflow`` parser with every group's commands."""
    parser = argparse.ArgumentParser(
        prog="cohortflow",
        description="Clinical MR brain imaging to research-grade biomarkers. "
        "Data lives under $COHORTFLOW_HOME (default ./cohortflow-data).",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML settings file (default: $COHORTFLOW_CONFIG or $COHORTFLOW_HOME/cohortflow.yaml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    parser.add_argument("--version", action="version", version=f"cohortflow {version()}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=CommandParser
    )
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: the process's); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help exits 0, usage errors 2
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    err = Console(stderr=True)
    with json_only_on_stdout(bool(getattr(args, "json", False))):
        return _dispatch(args, err)


def _dispatch(args: argparse.Namespace, err: Console) -> int:
    # Paths as users type them: relative folders are made absolute once, here (os.path.abspath
    # keeps symbolic links as given, unlike Path.resolve)
    for name, value in vars(args).items():
        if isinstance(value, Path):
            setattr(args, name, Path(os.path.abspath(value)))
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            setattr(args, name, [Path(os.path.abspath(v)) for v in value])
    handler: Handler = args.handler  # every leaf command sets one (tests/test_cli.py)

    def failed(code: int, kind: str, label: str, message: str) -> int:
        """Say why the command did not finish: on stderr, and with ``--json`` as the document."""
        err.print(Text.assemble((f"{label}: ", "red"), cell(message)))
        if getattr(args, "json", False):
            write_json({"error": {"kind": kind, "message": message, "exit": code}})
        return code

    try:
        settings = load_settings(args.config)
        configure_itk(settings.itk_threads)
        for note in protect_identified(settings):
            err.print(Text.assemble(("repaired: ", "yellow"), cell(note)))
        return handler(args, settings, err)
    except ConfigurationError as exc:
        return failed(EXIT_USAGE, "configuration", "configuration error", str(exc))
    except RefusedError as exc:  # identified data others can read and this user cannot repair
        return failed(EXIT_USAGE, "refused", "refused", exc.reason)
    except PacsError as exc:  # the PACS failed us: not the user's mistake
        return failed(EXIT_FAILURES, "pacs", "PACS error", str(exc))
    except CohortflowError as exc:
        return failed(EXIT_USAGE, "usage", "error", str(exc))
    except KeyboardInterrupt:
        return failed(
            EXIT_INTERRUPTED,
            "interrupted",
            "interrupted",
            "rerun the same command to resume where it stopped",
        )
    except Exception as exc:  # nothing raises past the command line; -v shows the traceback
        if args.verbose:
            err.print_exception()
        return failed(
            EXIT_STOPPED,
            "internal",
            f"{args.command} stopped",
            f"{type(exc).__name__}: {exc}. Work already done is kept; rerun the same command "
            "to resume (add -v for details)",
        )
