"""The known-scanner knowledge base: which manufacturer / model / software versions are validated.

Policy is data: the list lives in ``models/data/known_scanners.yaml`` (or the file named by the
``known_scanners_file`` setting), reviewed like code. Ingest records every scanner it sees and
alerts on unknown ones; header QC turns them into a warning.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cohortflow.models.errors import ConfigurationError


class ManufacturerEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    manufacturer: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    #: model name -> shell-style patterns of accepted SoftwareVersions
    models: dict[str, list[str]]


class KnownScannerFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    manufacturers: list[ManufacturerEntry]


@dataclass(frozen=True)
class ScannerVerdict:
    known: bool
    reason: str  # empty when known


@dataclass(frozen=True)
class KnownScanners:
    """A loaded knowledge base; ``check`` says whether one scanner is in it and why not."""

    version: str
    source: str
    entries: tuple[ManufacturerEntry, ...]

    def check(self, manufacturer: str, model: str, software_versions: str) -> ScannerVerdict:
        if not manufacturer.strip():
            return ScannerVerdict(False, "no Manufacturer in the header")
        wanted = manufacturer.strip().casefold()
        entry = next(
            (
                e
                for e in self.entries
                if wanted in {n.casefold() for n in (e.manufacturer, *e.aliases)}
            ),
            None,
        )
        if entry is None:
            return ScannerVerdict(False, f"manufacturer '{manufacturer}' is not a known scanner")
        patterns = next(
            (p for name, p in entry.models.items() if name.casefold() == model.strip().casefold()),
            None,
        )
        if patterns is None:
            return ScannerVerdict(
                False, f"model '{model}' of {entry.manufacturer} is not a known scanner"
            )
        software = software_versions.strip().casefold()
        if any(fnmatch.fnmatchcase(software, p.casefold()) for p in patterns):
            return ScannerVerdict(True, "")
        return ScannerVerdict(
            False,
            f"software version '{software_versions}' of {entry.manufacturer} {model} is not "
            f"known (known: {', '.join(patterns)})",
        )


def load_known_scanners(path: Path | None = None) -> KnownScanners:
    """Load the knowledge base: ``path``, else the one shipped with cohortflow."""
    if path is None:
        text = (
            resources.files("cohortflow.models")
            .joinpath("data/known_scanners.yaml")
            .read_text("utf-8")
        )
        source = "models/data/known_scanners.yaml"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read the known-scanner file {path}: {exc}") from exc
        source = str(path)
    try:
        parsed = KnownScannerFile.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigurationError(f"known-scanner file {source} is invalid: {exc}") from exc
    return KnownScanners(parsed.version, source, tuple(parsed.manufacturers))
