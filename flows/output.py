"""Where the command line's documents go.

With ``--json`` a command's stdout carries its JSON document and nothing else. Libraries print:
antspyx ``print``s "Warning: NIftI time units are 'unknown'" when it reads such a NIfTI, and
C++ code writes on the process's standard output. While a ``--json`` command runs, both go to
stderr (``sys.stdout`` and file descriptor 1 point there); the document is written with
``write_json`` (or to ``document()``) on the real stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cohortflow.pipelines.safeio import printable

#: The command line's exit codes: success; the command ran and found failures (or a refusal);
#: a usage or configuration error; the command stopped on an unexpected error (a fault of
#: cohortflow or of the machine: the work done is kept and the same command resumes); and
#: interrupted (Ctrl-C: 128 + SIGINT, as shells report it).
EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_document: TextIO | None = None


def add_json(parser: argparse.ArgumentParser, what: str = "the outcome") -> None:
    """The ``--json`` flag every reporting command takes."""
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def document() -> TextIO:
    """The stream of the command's document: the real stdout."""
    return _document if _document is not None else sys.stdout


def write_json(payload: Any) -> None:
    """Write one JSON document on the real stdout."""
    stream = document()
    stream.write(json.dumps(payload, indent=1, default=str) + "\n")
    stream.flush()


@contextmanager
def json_only_on_stdout(enabled: bool) -> Iterator[None]:
    """Send everything but the document to stderr while the block runs (see the module).

    In a process of its own, file descriptor 1 stays on stderr until the process ends: the C++
    runtime that the ANTs wheel bundles may write its buffered ``std::cout`` out at exit."""
    global _document  # noqa: PLW0603 - one document per command
    if not enabled:
        yield
        return
    python_stdout = sys.stdout
    try:
        python_stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        saved = -1
    try:
        own_fd = python_stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        own_fd = False  # already redirected in Python (a test's capture): write there
    if saved >= 0:
        os.dup2(2, 1)
    _document = (
        open(saved, "w", encoding=python_stdout.encoding, closefd=False)  # noqa: SIM115
        if own_fd and saved >= 0
        else python_stdout
    )
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        try:
            import ctypes

            ctypes.CDLL(None).fflush(None)  # C stdio's buffer still holds library output
        except (OSError, AttributeError):
            pass
        _document.flush()
        sys.stdout = python_stdout
        if own_fd and saved >= 0:
            _document.close()
            # the document is out; fd 1 stays on stderr until this process ends
        elif saved >= 0:
            os.dup2(saved, 1)
            os.close(saved)
        _document = None


#: the width of a report written off a terminal (a file, a pipe, a CI log): rich's default
#: of 80 columns cut table cells ("pseudo...", a problem file's path lost); no report line is
#: this long, so tables keep every character
DOCUMENT_WIDTH = 1000


def stdout_console() -> Console:
    """The console a command's report is printed on: the terminal's width on a terminal (or
    $COLUMNS where set), else :data:`DOCUMENT_WIDTH`, so that tables are never cut."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=DOCUMENT_WIDTH)


def cell(value: object, style: str = "") -> Text:
    """A table cell from data (file names, DICOM values): control characters escaped and
    square brackets shown, not read as rich markup. A file name holding a newline and escape
    sequences once forged a report row; ``[red]`` in a SeriesDescription would restyle it."""
    return Text(printable(str(value)), style=style)


class SafeTable(Table):
    """A rich table whose string cells are data, always: each goes through :func:`cell`.
    Styled cells are passed as ``Text`` (``cell(value, style)``)."""

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        super().add_row(*(cell(r) if isinstance(r, str) else r for r in renderables), **kwargs)


def progress_bar(err: Console, what: str) -> Progress:
    """The progress bar of a long command, on stderr (gone when it ends): done / total, time
    spent and, once a total is known, time left."""
    return Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


class Counter:
    """One task of a progress bar, as the folder steps report to it: ``expect(total)`` once
    they know how many items there are (after walking the folder), ``advance(n)`` per item
    done. A folder command shows "12/40", not "12/?"."""

    def __init__(self, bar: Progress, name: str) -> None:
        self._bar = bar
        self._task: TaskID = bar.add_task(name, total=None)

    def expect(self, total: int) -> None:
        self._bar.update(self._task, total=total)

    def advance(self, n: int = 1) -> None:
        self._bar.advance(self._task, n)

    def tick(self, _item: object) -> None:
        """``advance`` by one, for callbacks handed each finished item."""
        self.advance(1)


@contextmanager
def counting(err: Console, what: str) -> Iterator[Counter]:
    """A progress bar with one :class:`Counter` (``with counting(err, "checking X") as n``)."""
    with progress_bar(err, what) as bar:
        yield Counter(bar, what)
