"""Errors of the defacing step."""

from __future__ import annotations

from cohortflow.models.errors import ReasonError


class DefaceError(ReasonError):
    """A series (or the study's reference T1) cannot be defaced; ``code`` is machine-readable."""
