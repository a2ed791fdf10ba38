"""Errors of the NIfTI conversion step."""

from __future__ import annotations

from cohortflow.models.errors import ReasonError


class ConvertError(ReasonError):
    """One series cannot be converted (or one converter failed on it); ``code`` is the
    machine-readable reason (``convert.not_a_volume``, ``convert.dcm2niix_timeout`` ...) recorded
    in reports and the index, ``message`` names the series or file and what went wrong."""
