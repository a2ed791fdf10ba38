"""Errors of the biomarker export and the group statistics."""

from __future__ import annotations

from models.errors import CohortflowError


class ExportError(CohortflowError):
    """An export that cannot be made (bad labels file, unknown format, unreadable table)."""


class StatsError(CohortflowError):
    """A comparison that cannot be made (no such column, fewer than two groups of two)."""
