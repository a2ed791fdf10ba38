"""The process environment of Prefect and ITK, set at the launching edge before either is used."""

from __future__ import annotations

import os
from pathlib import Path


def configure_prefect(home: Path) -> None:
    """Keep Prefect's files under cohortflow's data folder and its telemetry off.

    Values the user already set win: a user with a Prefect server keeps PREFECT_API_URL.
    Prefect creates its home folder but not the parents, and its ephemeral server then fails
    with "unable to open database file": create the whole path here.
    """
    os.environ.setdefault("PREFECT_HOME", str((home / "prefect").resolve()))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def configure_itk(threads: int) -> None:
    """Fix ITK's thread count (ANTs, through antspyx). ITK reads it once, when it first runs a
    filter in the process, so this must come before any registration; later calls change nothing.
    """
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
