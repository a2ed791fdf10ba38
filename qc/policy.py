"""The QC policy of a protocol: required attributes, expected parameters, thresholds, severities.

Policy is data: it lives in the protocol file (``qc:`` at the top for every protocol, and
``protocols.<name>.qc:`` for one protocol's changes, merged key by key over the shared one) and
is validated completely on load, so a typo is an error naming its place, never a check that
silently does nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import keyword_dict

from cohortflow.qc.findings import CHECKS, Finding, Severity, default_severity, known_check
from cohortflow.qc.metrics import METRICS

#: Quantities header QC derives from the whole series, usable in ``expect`` like DICOM keywords.
DERIVED: Mapping[str, str] = {
    "VoxelSize": "largest voxel edge: pixel spacing or slice spacing (mm)",
    "SliceSpacing": "distance between neighbouring slice positions (mm)",
    "Slices": "number of slice positions",
}


class PolicyError(ValueError):
    """The QC section of a protocol file is invalid; the message names the place."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Range(_Frozen):
    """An allowed interval; either end may be open."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def text(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min:g}-{self.max:g}"
        return f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}"


class Expectation(_Frozen):
    """What a header value must be: within one of ``any`` (e.g. MPRAGE's TR between inversions
    or the per-echo TR, depending on the vendor). ``required``: a missing value is a finding."""

    any: tuple[Range, ...] = Field(min_length=1)
    required: bool = False

    @model_validator(mode="before")
    @classmethod
    def _single(cls, data: Any) -> Any:
        # {min: 1, max: 6} is shorthand for {any: [{min: 1, max: 6}]}
        if isinstance(data, dict) and "any" not in data and ("min" in data or "max" in data):
            rest = {k: v for k, v in data.items() if k not in ("min", "max")}
            return {**rest, "any": [{k: data[k] for k in ("min", "max") if k in data}]}
        return data

    def contains(self, value: float) -> bool:
        return any(r.contains(value) for r in self.any)

    def text(self) -> str:
        return " or ".join(r.text() for r in self.any)


class RolePolicy(_Frozen):
    """Checks for the series of one role (an include rule of the protocol, e.g. ``t1_3d``)."""

    required_tags: tuple[str, ...] = ()
    expect: dict[str, Expectation] = Field(default_factory=dict)
    #: image QC (quality metrics, coverage, artefacts) runs on series of this role
    image: bool = False


class GeometryPolicy(_Frozen):
    """Tolerances of the slice-position checks."""

    #: two images closer than this along the slice normal share one position (mm)
    position_tolerance_mm: float = Field(0.05, gt=0, le=1)
    #: a step may differ from a whole number of slice spacings by this fraction
    spacing_tolerance: float = Field(0.1, gt=0, lt=0.5)
    #: header.slice_gap: the gap between slices is at most this fraction of their thickness
    max_gap_fraction: float = Field(0.5, ge=0)
    #: header.gantry_tilt: slices may be shifted in-plane by at most this fraction of a pixel
    max_shift_pixels: float = Field(0.5, gt=0)


class OutlierPolicy(_Frozen):
    """Robust z-scores of image metrics within a protocol and scanner model."""

    #: |z| above this is an outlier; z = 0.6745 (x - median) / MAD (Iglewicz and Hoaglin)
    z: float = Field(3.5, gt=0)
    #: fewer series of the protocol and scanner seen so far: no outlier check yet
    min_series: int = Field(10, ge=3)
    metrics: tuple[str, ...] = ("snrd_wm", "cnr", "cjv", "efc", "fber", "wm2max", "qi1")


class QcPolicy(_Frozen):
    """Everything header and image QC need to judge the series of one protocol."""

    modalities: tuple[str, ...] = ("MR",)
    #: attributes every series checked must carry (Enhanced MR: in its functional groups)
    required_tags: tuple[str, ...] = ()
    geometry: GeometryPolicy = GeometryPolicy()
    roles: dict[str, RolePolicy] = Field(default_factory=dict)
    #: allowed range of each image metric (``qc.metrics.METRICS``)
    image: dict[str, Range] = Field(default_factory=dict)
    outliers: OutlierPolicy = OutlierPolicy()
    #: check id or family -> ignore / warn / fail, over the defaults of ``qc.findings.CHECKS``
    severity: dict[str, Severity] = Field(default_factory=dict)

    @field_validator("required_tags")
    @classmethod
    def _tags(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _keywords(value)

    @field_validator("roles")
    @classmethod
    def _roles(cls, value: dict[str, RolePolicy]) -> dict[str, RolePolicy]:
        for role, policy in value.items():
            try:
                _keywords(policy.required_tags)
                _keywords(tuple(policy.expect))
            except ValueError as exc:
                raise ValueError(f"{role}: {exc}") from None
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: dict[str, Range]) -> dict[str, Range]:
        for name in value:
            if name not in METRICS:
                raise ValueError(f"unknown metric {name!r}{_close(name, METRICS)}")
        return value

    @field_validator("outliers")
    @classmethod
    def _outliers(cls, value: OutlierPolicy) -> OutlierPolicy:
        for name in value.metrics:
            if name not in METRICS:
                raise ValueError(f"metrics: unknown metric {name!r}{_close(name, METRICS)}")
        return value

    @field_validator("severity")
    @classmethod
    def _severity(cls, value: dict[str, Severity]) -> dict[str, Severity]:
        for check in value:
            if not known_check(check):
                raise ValueError(f"unknown check {check!r}{_close(check, CHECKS)}")
        return value

    def severity_of(self, check: str) -> Severity:
        """The configured severity of ``check``: its own, its family's, else the default."""
        name = check
        while name:
            if name in self.severity:
                return self.severity[name]
            name = name.rpartition(".")[0]
        return default_severity(check)

    def judged(self, findings: Iterable[Finding]) -> tuple[Finding, ...]:
        """``findings`` at the severities this policy sets (what a stage reports at the
        defaults, conversion and volumetry, judged by the protocol's ``qc.severity``)."""
        return tuple(replace(f, severity=self.severity_of(f.check)) for f in findings)

    def role(self, name: str | None) -> RolePolicy:
        return self.roles.get(name or "", RolePolicy())


def _close(name: str, known: Mapping[str, object]) -> str:
    import difflib

    match = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _keywords(names: tuple[str, ...]) -> tuple[str, ...]:
    for name in names:
        if name not in keyword_dict and name not in DERIVED:
            known = {**dict.fromkeys(keyword_dict), **DERIVED}
            raise ValueError(f"{name!r} is not a DICOM keyword{_close(name, known)}")
    return names


def merge(base: object, override: object) -> object:
    """``override`` over ``base``, mapping by mapping; anything else is replaced whole."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return override


def parse_policy(shared: object, own: object = None, where: str = "qc") -> QcPolicy:
    """Validate the shared QC section with one protocol's changes merged over it.

    Raises PolicyError naming the dotted place of the first problem, e.g.
    ``protocols.ms.qc.image.snrd_wm.min: Input should be a valid number``.
    """
    for label, section in (("qc", shared), (where, own)):
        if section is not None and not isinstance(section, dict):
            raise PolicyError(f"{label}: expected a mapping of QC settings")
    data = merge(shared or {}, own or {})
    try:
        return QcPolicy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        place = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
        message = str(first["msg"]).removeprefix("Value error, ")
        at = f"{where}.{place}" if place else where
        raise PolicyError(f"{at}: {message}") from None


def finite(value: float | None) -> float | None:
    """``value`` when it is a real number, else None (NaN and infinities are not measurements)."""
    return value if value is not None and math.isfinite(value) else None
