"""The de-identification profile: the PS3.15 Annex E table plus the project's options (YAML).

The table is not typed here: it is read from ``dicom-anonymizer``'s packaged copy of the
standard's Table E.1-1 (``dicomfields_<edition>``, generated from the standard's published
tables), and the edition is recorded in every output (DeidentificationMethod).
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydicom.datadict import tag_for_keyword

from cohortflow.pipelines.anonymize.errors import ProfileError

#: The table's action groups (PS3.15 E.1-1 codes).
_GROUPS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


class SafePrivate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    creator: str = Field(min_length=1)
    group: int = Field(ge=0x0009, le=0xFFFF)
    element: int = Field(ge=0x00, le=0xFF)

    @field_validator("group")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"group 0x{value:04X} is not a private (odd) group")
        return value


class Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    retain_longitudinal_modified_dates: bool = True
    retain_patient_characteristics: bool = True
    clean_descriptors: bool = True
    retain_safe_private: bool = True
    retain_device_identity: bool = False
    keep_burned_in: bool = False


class ProfileFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int
    name: str = Field(min_length=1, max_length=64)
    standard_table: str = Field(pattern=r"^dicomfields_\w+$")
    options: Options = Options()
    patient_characteristics: tuple[str, ...] = ()
    descriptors: tuple[str, ...] = ()
    device_identity: tuple[str, ...] = ()
    safe_private: tuple[SafePrivate, ...] = ()

    @field_validator("patient_characteristics", "descriptors", "device_identity")
    @classmethod
    def _keywords(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in values if tag_for_keyword(v) is None]
        if unknown:
            raise ValueError(f"not DICOM keywords: {', '.join(unknown)}")
        return values


@dataclass(frozen=True)
class StandardTable:
    """PS3.15 Table E.1-1: tag -> action code; repeating groups as (group, element, masks)."""

    edition: str
    actions: dict[int, str]
    masked: tuple[tuple[int, int, int, int, str], ...]

    def action(self, tag: int) -> str | None:
        found = self.actions.get(tag)
        if found is not None:
            return found
        group, element = tag >> 16, tag & 0xFFFF
        for g, e, gmask, emask, code in self.masked:
            if group & gmask == g and element & emask == e:
                return code
        return None


def load_standard_table(module: str) -> StandardTable:
    try:
        table = importlib.import_module(f"dicomanonymizer.dicom_anonymization_databases.{module}")
    except ModuleNotFoundError as exc:
        raise ProfileError(
            f"standard_table {module!r}: dicom-anonymizer has no such table ({exc})"
        ) from None
    actions: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for name, code in _GROUPS.items():
        for entry in getattr(table, name):
            if len(entry) == 2:
                actions[(entry[0] << 16) | entry[1]] = code
            else:
                masked.append((entry[0], entry[1], entry[2], entry[3], code))
    return StandardTable(module.removeprefix("dicomfields_"), actions, tuple(masked))


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    sha256: str
    options: Options
    table: StandardTable
    patient_characteristics: frozenset[int]
    descriptors: frozenset[int]
    device_identity: frozenset[int]
    safe_private: frozenset[tuple[str, int, int]]


def load_profile(path: Path | None = None) -> Profile:
    """Load and validate a profile (default: the one shipped in pipelines/anonymize/data)."""
    if path is None:
        resource = resources.files("cohortflow.pipelines.anonymize").joinpath("data/profile.yaml")
        source, data = str(resource), resource.read_bytes()
    else:
        source = str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ProfileError(
                f"{source}: cannot read the profile ({exc.strerror or exc})"
            ) from None
    try:
        raw: Any = yaml.safe_load(data)
        parsed = ProfileFile.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{source}: invalid YAML ({exc})") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ProfileError(f"{source}: {problems}") from None
    if parsed.version != 1:
        raise ProfileError(f"{source}: version {parsed.version} is not supported (1)")

    def tags(keywords: tuple[str, ...]) -> frozenset[int]:
        return frozenset(int(tag_for_keyword(k) or 0) for k in keywords)

    return Profile(
        parsed.name,
        source,
        hashlib.sha256(data).hexdigest(),
        parsed.options,
        load_standard_table(parsed.standard_table),
        tags(parsed.patient_characteristics),
        tags(parsed.descriptors),
        tags(parsed.device_identity),
        frozenset((p.creator, p.group, p.element) for p in parsed.safe_private),
    )
