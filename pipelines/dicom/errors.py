"""Errors of the DICOM ground floor."""

from __future__ import annotations

from cohortflow.models.errors import ConfigurationError, did_you_mean

__all__ = ["ProtocolError", "did_you_mean"]


class ProtocolError(ConfigurationError):
    """The protocol file is invalid or names something unknown; the message says where."""
