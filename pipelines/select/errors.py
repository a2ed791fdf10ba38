"""Errors of study and series selection."""

from __future__ import annotations

from cohortflow.pipelines.dicom.errors import ProtocolError, did_you_mean

__all__ = ["ProtocolError", "did_you_mean"]
