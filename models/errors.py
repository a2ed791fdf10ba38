"""Errors of the models package."""


class CohortflowError(Exception):
    """Base of every error cohortflow raises on purpose; its message is meant for the user."""


class ConfigurationError(CohortflowError):
    """A setting, config file or option is invalid (exit status 2 at the command line)."""


class IndexDatabaseError(CohortflowError):
    """The archive index cannot be opened, reached or used."""


class ManifestError(CohortflowError):
    """A batch manifest cannot be read or has invalid rows (exit status 2)."""
