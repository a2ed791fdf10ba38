"""What a QC check reports: findings with a check id, a severity, the value and the threshold.

Every check cohortflow runs is listed in :data:`CHECKS` with its default severity; the protocol
file may raise or lower it per protocol (``qc.severity``), for one check or a family of checks
(``header.conformance`` covers ``header.conformance.EchoTime``). A series fails a stage when one
of its findings has severity FAIL; the first such finding is the stage's reason code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType


class Severity(StrEnum):
    """How much a triggered check matters: ignored (listed, never counted), warning, failure."""

    IGNORE = "ignore"
    WARN = "warn"
    FAIL = "fail"


class Verdict(StrEnum):
    """The outcome of a QC stage for one series."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """One check: its stable id (the reason code), default severity and what it looks at."""

    id: str
    default: Severity
    title: str


def _checks(*items: tuple[str, Severity, str]) -> Mapping[str, Check]:
    return MappingProxyType({cid: Check(cid, sev, title) for cid, sev, title in items})


_F, _W, _I = Severity.FAIL, Severity.WARN, Severity.IGNORE

#: Every check id with its default severity. Ids ending in a family name (``header.conformance``,
#: ``image.outlier``) are completed by a DICOM keyword or a metric name.
CHECKS: Mapping[str, Check] = _checks(
    # files and identity
    ("header.unreadable_file", _F, "a file of the series cannot be read (cut short, damaged)"),
    ("header.modality", _F, "Modality is one the protocol expects (MR)"),
    ("header.sop_class", _F, "an MR image storage class (MR, Enhanced MR, Legacy Converted)"),
    ("header.required_tags", _F, "the attributes the protocol needs are present"),
    # geometry
    ("header.no_geometry", _F, "every image says where it lies (position, orientation, spacing)"),
    ("header.mixed_orientation", _F, "one orientation across the series"),
    ("header.matrix", _F, "one image matrix (Rows x Columns) across the series"),
    ("header.pixel_spacing", _F, "one in-plane pixel spacing across the series"),
    ("header.missing_slices", _F, "no gap in the slice positions"),
    ("header.duplicate_slices", _F, "no two images at one slice position"),
    ("header.irregular_spacing", _F, "slice positions on one regular grid"),
    ("header.slice_gap", _W, "the gap between slices is small against their thickness"),
    ("header.spacing_mismatch", _W, "SpacingBetweenSlices agrees with the slice positions"),
    ("header.gantry_tilt", _W, "slices stacked along their normal (no tilt or shear)"),
    # protocol
    ("header.conformance", _F, "acquisition parameters within the protocol's ranges"),
    ("header.unknown_scanner", _W, "manufacturer, model and software version are validated"),
    ("header.missing_required_series", _F, "the study holds the series the protocol requires"),
    # image
    ("image.unreadable", _F, "the pixels decode into one regular volume"),
    ("image.empty", _F, "the image holds a head (signal above the noise)"),
    ("image.clipped", _F, "intensities not saturated at the top of the stored range"),
    ("image.brain_mask", _F, "the brain template can be placed on the head"),
    ("image.no_noise_estimate", _W, "the air carries signal to measure the noise in"),
    ("image.coverage", _F, "the whole brain lies inside the field of view"),
    ("image.motion", _F, "no motion or ghosting artefacts in the background (QI1)"),
    ("image.snr", _F, "signal-to-noise ratio (Dietrich) in the protocol's range"),
    ("image.cnr", _W, "grey / white matter contrast-to-noise ratio in range"),
    ("image.cjv", _W, "coefficient of joint variation of GM and WM in range"),
    ("image.efc", _W, "entropy focus criterion (ghosting and blurring) in range"),
    ("image.fber", _W, "foreground to background energy ratio in range"),
    ("image.wm2max", _W, "white matter to maximum intensity ratio in range"),
    ("image.inu", _W, "intensity non-uniformity (N4 bias field range) in range"),
    ("image.outlier", _W, "metric typical of the protocol and scanner (robust z-score)"),
    # the checks themselves
    ("qc.internal_error", _F, "QC itself failed on the series (a bug: the message says where)"),
)

#: Families whose members are named ``<family>.<name>``.
FAMILIES = frozenset({"header.conformance", "image.outlier"})


def known_check(check_id: str) -> bool:
    """Is ``check_id`` a check, or a member of a family (``header.conformance.EchoTime``)?"""
    if check_id in CHECKS:
        return True
    family, _, member = check_id.rpartition(".")
    return family in FAMILIES and bool(member)


def default_severity(check_id: str) -> Severity:
    if check_id in CHECKS:
        return CHECKS[check_id].default
    family = check_id.rpartition(".")[0]
    return CHECKS[family].default


@dataclass(frozen=True)
class Finding:
    """One triggered check, in words a reviewer understands and in values a program can use."""

    check: str
    severity: Severity
    message: str
    #: what was measured (a number, or text such as the missing attributes); None: not present
    value: float | str | None = None
    #: the limit it was held against, as text (">= 8", "5-15 or 1500-3000")
    threshold: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "check": self.check,
            "severity": self.severity.value,
            "value": self.value,
            "threshold": self.threshold,
            "message": self.message,
        }


def verdict(findings: Iterable[Finding]) -> Verdict:
    severities = {f.severity for f in findings}
    if Severity.FAIL in severities:
        return Verdict.FAIL
    return Verdict.WARN if Severity.WARN in severities else Verdict.PASS


def reason(findings: Sequence[Finding]) -> Finding | None:
    """The finding that decides the verdict: the first failure, else the first warning."""
    for wanted in (Severity.FAIL, Severity.WARN):
        for finding in findings:
            if finding.severity is wanted:
                return finding
    return None
