"""Prefect's environment, set before prefect is imported (the launching edge only)."""

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
