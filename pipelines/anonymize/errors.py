"""Errors of de-identification."""

from __future__ import annotations

from models.errors import CohortflowError, ConfigurationError


class ProfileError(ConfigurationError):
    """The de-identification profile is invalid; the message says where."""


class ProjectKeyError(ConfigurationError):
    """The project key cannot be read or is unsafe."""


class AnonymizeError(CohortflowError):
    """A file could not be de-identified (the message names it and why)."""
