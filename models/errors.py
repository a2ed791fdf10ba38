"""Errors of the models package."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class CohortflowError(Exception):
    """Base of every error cohortflow raises on purpose; its message is meant for the user."""


class ConfigurationError(CohortflowError):
    """A setting, config file or option is invalid (exit status 2 at the command line)."""


class ProjectKeyError(ConfigurationError):
    """The project key cannot be read or is unsafe."""


class ArchiveKeyError(ConfigurationError):
    """The archive key ring cannot be read, is malformed or unsafe, or cannot be rotated."""


class IndexDatabaseError(CohortflowError):
    """The archive index cannot be opened, reached or used."""


class ManifestError(CohortflowError):
    """A batch manifest cannot be read or has invalid rows (exit status 2)."""


class ReasonError(CohortflowError):
    """Something about one item (a file, a series) stops a stage; ``code`` is the machine-readable
    reason recorded in reports and the index, ``message`` says what is wrong for the reader."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class GeometryError(ReasonError):
    """A series does not say where its pixels lie, or its planes do not form the volume asked for
    (codes ``no_geometry``, ``not_a_volume``)."""


class ReviewError(CohortflowError):
    """A review that cannot be recorded (unknown decision, no comment, nothing to override)."""


class AccountError(CohortflowError):
    """A dashboard account that cannot be made or used (bad name, role or password)."""


class ExportError(CohortflowError):
    """An export that cannot be made (bad labels file, unknown format, unreadable table)."""


class CohortQueryError(CohortflowError):
    """A cohort filter, grouping or name that cannot be used; the message names the filter."""
