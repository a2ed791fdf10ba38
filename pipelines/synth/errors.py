"""Errors of the synthetic cohort generator."""

from cohortflow.models.errors import CohortflowError


class SynthError(CohortflowError):
    """The synthetic cohort could not be generated; the message says why and what to do."""
