"""Errors of selection and retrieval."""

from __future__ import annotations

import datetime as dt

from cohortflow.models.errors import CohortflowError, ConfigurationError


class RetrieveConfigError(ConfigurationError):
    """The retrieval settings are invalid (a window, a limit)."""


class OutsideWindowError(CohortflowError):
    """Retrieval may not run now and the policy says stop (or no window ever opens)."""

    def __init__(self, opens: dt.datetime | None) -> None:
        self.opens = opens
        when = f"the next window opens {opens:%a %Y-%m-%d %H:%M}" if opens else "no window opens"
        super().__init__(f"outside the allowed retrieval windows: {when}")
