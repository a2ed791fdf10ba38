"""Errors of the anatomical atlas (the whole-head model composed from installed templates)."""

from cohortflow.models.errors import CohortflowError


class HeadModelError(CohortflowError):
    """The head model could not be built or loaded; the message says why and what to do."""


class TemplateError(Exception):
    """The defacing template (pydeface's package data) cannot be loaded."""
