"""Errors of the group statistics."""

from __future__ import annotations

from cohortflow.models.errors import CohortflowError


class StatsError(CohortflowError):
    """A comparison that cannot be made (no such column, fewer than two groups of two)."""
