"""One image to measure and what is known of its series (light: the run's work order carries
it without loading the method)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """One image to measure and what is known of its series."""

    image: Path
    name: str
    #: the folder it was found in (links are followed only inside it); None: named by the user
    root: Path | None = None
    series: str | None = None
    study: str | None = None
    protocol: str | None = None
    role: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    software_versions: str | None = None
    converter: str | None = None
