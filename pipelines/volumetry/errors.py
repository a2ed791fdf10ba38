"""Errors of the volumetry step."""

from cohortflow.models.errors import CohortflowError


class VolumetryError(CohortflowError):
    """An image cannot be measured (unreadable, not 3D, no such file); the message names it."""
