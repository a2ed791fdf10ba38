"""Errors of de-identification."""

from __future__ import annotations

from cohortflow.models.errors import CohortflowError, ConfigurationError, ProjectKeyError

__all__ = ["AnonymizeError", "ProfileError", "ProjectKeyError"]


class ProfileError(ConfigurationError):
    """The de-identification profile is invalid; the message says where."""


class AnonymizeError(CohortflowError):
    """A file could not be de-identified (the message names it and why)."""
