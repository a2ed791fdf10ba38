"""cohortflow: clinical MR brain imaging to research-grade biomarkers.

The code lives in four layers, each a top-level folder of the repository (``flows``,
``pipelines``, ``qc``, ``models``; ARCHITECTURE.md), and is imported as this package's
subpackages (``cohortflow.pipelines`` ...): the links in this folder point at those folders, and
the installed distribution holds them here, so it claims no generic top-level name.
"""


def installed_version() -> str | None:
    """The installed distribution's version; None when run from a checkout never installed."""
    from importlib import metadata

    try:
        return metadata.version("cohortflow")
    except metadata.PackageNotFoundError:
        return None
