"""Errors of the PACS clients and the project's own Orthanc."""

from __future__ import annotations

from cohortflow.models.errors import CohortflowError


class PacsError(CohortflowError):
    """A PACS request failed (refused, timed out, unexpected answer)."""


class PacsUnavailableError(PacsError):
    """The PACS cannot be reached or started."""
