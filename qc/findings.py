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
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cohortflow.models.series import SeriesDescriptor
    from cohortflow.models.stages import StageRecord


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
    """One check: its stable id (the reason code), default severity, what it looks at (what a
    pass means: ``title``) and what a series that trips it has (``failed``: the reason's label
    wherever a reason code is shown)."""

    id: str
    default: Severity
    title: str
    failed: str


def _checks(*items: tuple[str, Severity, str, str]) -> Mapping[str, Check]:
    return MappingProxyType({item[0]: Check(*item) for item in items})


_F, _W, _I = Severity.FAIL, Severity.WARN, Severity.IGNORE

#: Every check of every stage (header and image QC, conversion, volumetry) with its default
#: severity, what a pass means and what a failure says: the one registry protocols.yaml
#: overrides (``qc.severity``) and the dashboard labels reasons from (the failure text: a reason
#: labelled with the pass text read as if the series had passed). Ids ending in a family name
#: (``header.conformance``, ``image.outlier``) are completed by a DICOM keyword or a metric name.
# A table, one check a row (its failure text on the next line): not reformatted.
# fmt: off
CHECKS: Mapping[str, Check] = _checks(
    # files and identity
    ("header.unreadable_file", _F, "a file of the series cannot be read (cut short, damaged)",
        "a file of the series cannot be read"),
    ("header.modality", _F, "Modality is one the protocol expects (MR)",
        "not a modality the protocol expects"),
    ("header.sop_class", _F, "an MR image storage class (MR, Enhanced MR, Legacy Converted)",
        "not an MR image storage class"),
    ("header.required_tags", _F, "the attributes the protocol needs are present",
        "attributes the protocol needs are missing"),
    # geometry
    ("header.no_geometry", _F, "every image says where it lies (position, orientation, spacing)",
        "images without position, orientation or spacing"),
    ("header.mixed_orientation", _F, "one orientation across the series",
        "more than one orientation in the series"),
    ("header.matrix", _F, "one image matrix (Rows x Columns) across the series",
        "more than one image matrix in the series"),
    ("header.pixel_spacing", _F, "one in-plane pixel spacing across the series",
        "more than one pixel spacing in the series"),
    ("header.missing_slices", _F, "no gap in the slice positions",
        "slices missing: a gap in the slice positions"),
    ("header.duplicate_slices", _F, "no two images at one slice position",
        "two images at one slice position"),
    ("header.irregular_spacing", _F, "slice positions on one regular grid",
        "slice positions off a regular grid"),
    ("header.slice_gap", _W, "the gap between slices is small against their thickness",
        "a large gap between slices against their thickness"),
    ("header.spacing_mismatch", _W, "SpacingBetweenSlices agrees with the slice positions",
        "SpacingBetweenSlices disagrees with the slice positions"),
    ("header.gantry_tilt", _W, "slices stacked along their normal (no tilt or shear)",
        "slices tilted or sheared (not stacked along their normal)"),
    # protocol
    ("header.conformance", _F, "acquisition parameters within the protocol's ranges",
        "acquisition parameter outside the protocol's range"),
    ("header.unknown_scanner", _W, "manufacturer, model and software version are validated",
        "scanner (manufacturer, model, software) not validated"),
    ("header.missing_required_series", _F, "the study holds the series the protocol requires",
        "a series the protocol requires is missing"),
    # image
    ("image.unreadable", _F, "the pixels decode into one regular volume",
        "the pixels do not decode into one regular volume"),
    ("image.empty", _F, "the image holds a head (signal above the noise)",
        "no head in the image (no signal above the noise)"),
    ("image.clipped", _F, "intensities not saturated at the top of the stored range",
        "intensities saturated at the top of the stored range"),
    ("image.brain_mask", _F, "the brain template can be placed on the head",
        "the brain template cannot be placed on the head"),
    ("image.no_noise_estimate", _W, "the air carries signal to measure the noise in",
        "no signal in the air to measure the noise in"),
    ("image.coverage", _F, "the whole brain lies inside the field of view",
        "part of the brain outside the field of view"),
    ("image.motion", _F, "no motion or ghosting artefacts in the background (QI1)",
        "motion or ghosting artefacts in the background (QI1)"),
    ("image.snr", _F, "signal-to-noise ratio (Dietrich) in the protocol's range",
        "signal-to-noise ratio (Dietrich) outside the protocol's range"),
    ("image.cnr", _W, "grey / white matter contrast-to-noise ratio in range",
        "grey / white matter contrast-to-noise ratio out of range"),
    ("image.cjv", _W, "coefficient of joint variation of GM and WM in range",
        "coefficient of joint variation of GM and WM out of range"),
    ("image.efc", _W, "entropy focus criterion (ghosting and blurring) in range",
        "entropy focus criterion (ghosting, blurring) out of range"),
    ("image.fber", _W, "foreground to background energy ratio in range",
        "foreground to background energy ratio out of range"),
    ("image.wm2max", _W, "white matter to maximum intensity ratio in range",
        "white matter to maximum intensity ratio out of range"),
    ("image.inu", _W, "intensity non-uniformity (N4 bias field range) in range",
        "intensity non-uniformity (bias field range) out of range"),
    ("image.outlier", _W, "metric typical of the protocol and scanner (robust z-score)",
        "metric atypical of the protocol and scanner (robust z-score)"),
    # the checks themselves
    ("qc.internal_error", _F, "QC itself failed on the series (a bug: the message says where)",
        "QC itself failed on the series (a bug)"),
    # conversion (pipelines/convert): the DICOM series
    ("convert.no_geometry", _F, "every image says where it lies",
        "images without position or orientation"),
    ("convert.not_a_volume", _F, "the images form one stack (one orientation, one matrix)",
        "the images do not form one stack"),
    ("convert.irregular_spacing", _F, "slice positions lie on one regular grid",
        "slice positions off a regular grid"),
    ("convert.no_subject", _F, "the series has a PatientID to name the subject by",
        "no PatientID to name the subject by"),
    ("convert.unreadable_pixels", _F, "the pixel data of the series decodes",
        "the pixel data does not decode"),
    ("convert.missing_slices", _W, "no gap in the slice positions (gaps are interpolated)",
        "slices missing (the gaps were interpolated)"),
    ("convert.duplicate_slices", _W, "one image per slice position (the first one is kept)",
        "two images at one slice position (the first was kept)"),
    ("convert.duplicate_files", _I, "one file per SOP instance (copies are left out)",
        "copies of one SOP instance (left out)"),
    ("convert.damaged_files", _W, "every file of the series can be read",
        "a file of the series cannot be read"),
    ("convert.gantry_tilt", _W, "slices stacked along their normal (else resampled)",
        "slices tilted (resampled)"),
    ("convert.multiframe", _I, "the series is one Enhanced / multi-frame object",
        "an Enhanced / multi-frame series"),
    # conversion: the converters (a failure of one converter's output makes the next try)
    ("convert.dcm2niix_unavailable", _F, "dcm2niix can be found and run",
        "dcm2niix cannot be found or run"),
    ("convert.dcm2niix_failed", _F, "dcm2niix exits with status 0",
        "dcm2niix exited with an error"),
    ("convert.dcm2niix_timeout", _F, "dcm2niix finishes within its timeout",
        "dcm2niix did not finish within its timeout"),
    ("convert.no_output", _F, "the converter writes an image",
        "the converter wrote no image"),
    ("convert.sitk_failed", _F, "SimpleITK reads the series",
        "SimpleITK cannot read the series"),
    ("convert.fallback", _W, "dcm2niix converted the series (else SimpleITK did)",
        "converted by SimpleITK (dcm2niix's result was not used)"),
    ("convert.extra_outputs", _I, "dcm2niix wrote one image (the others are listed)",
        "dcm2niix wrote more than one image (the others not kept)"),
    ("convert.sidecar_identifier", _W, "no sidecar text held an identifier (cleaned or left out)",
        "an identifier in the sidecar text (cleaned or left out)"),
    # conversion: the result against the DICOM
    ("convert.not_3d", _F, "the image is one 3D volume",
        "the image is not one 3D volume"),
    ("convert.orientation", _F, "the image axes are the DICOM row, column and slice axes",
        "image axes differ from the DICOM row, column and slice axes"),
    ("convert.matrix", _F, "the image has the DICOM rows and columns",
        "image matrix differs from the DICOM rows and columns"),
    ("convert.slice_count", _F, "the image has one slice per DICOM slice position",
        "slice count differs from the DICOM slice positions"),
    ("convert.geometry", _F, "every voxel lies where the DICOM puts it (0.1 mm)",
        "voxels misplaced against the DICOM positions (over 0.1 mm)"),
    ("convert.data_mismatch", _F, "the voxels hold the DICOM pixels at the same position",
        "voxels differ from the DICOM pixels at the same position"),
    ("convert.internal_error", _F, "conversion itself failed (a bug: the message says where)",
        "conversion itself failed (a bug)"),
    # volumetry (pipelines/volumetry/verdict.py)
    ("volumetry.registration", _F, "the atlas fits the head (correlation after registration)",
        "the atlas does not fit the head (low correlation)"),
    ("volumetry.icv_range", _F, "intracranial volume in a plausible adult range",
        "intracranial volume outside a plausible adult range"),
    ("volumetry.bpf_range", _F, "brain parenchymal fraction in a plausible range",
        "brain parenchymal fraction outside a plausible range"),
    ("volumetry.tissue_contrast", _F, "CSF darker than grey matter darker than white matter",
        "tissue contrast wrong (CSF < GM < WM not seen)"),
    ("volumetry.tissue_ratio", _F, "grey to white matter volume in a plausible adult range",
        "grey to white matter ratio outside a plausible adult range"),
    ("volumetry.mask_edge", _W, "the image moved the registered intracranial edge little",
        "the image moved the registered intracranial edge a lot"),
    ("volumetry.edge_not_refined", _W,
        "the image showed the skull / CSF border (else the registered edge is kept)",
        "skull / CSF border not seen (the registered edge was kept)"),
    ("volumetry.coverage", _W, "the intracranial space lies inside the image",
        "part of the intracranial space outside the image"),
    ("volumetry.thick_slices", _W, "3D resolution (thick 2D slices: lower confidence)",
        "thick 2D slices (lower confidence)"),
    ("volumetry.not_converged", _W, "the tissue classification converged",
        "the tissue classification did not converge"),
    ("volumetry.unreadable", _F, "the image can be read as a 3D volume",
        "the image cannot be read as a 3D volume"),
    ("volumetry.internal_error", _F, "volumetry ran to the end",
        "volumetry failed before its end (a bug)"),
)
# fmt: on

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


def finding(
    check: str, message: str, value: float | str | None = None, threshold: str | None = None
) -> Finding:
    """A finding of ``check`` at its default severity (a protocol may change it later:
    ``qc.policy.QcPolicy.judged``)."""
    return Finding(check, default_severity(check), message, value, threshold)


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


class Judged(Protocol):
    """What a stage concluded about one series: its findings, their verdict and the finding
    that decided it (every stage's result is one)."""

    @property
    def findings(self) -> tuple[Finding, ...]: ...

    @property
    def verdict(self) -> Verdict: ...

    @property
    def reason(self) -> Finding | None: ...


def stage_row(
    outcome: Judged,
    *,
    stage: str,
    method_version: str,
    series: str,
    study: str,
    describe: SeriesDescriptor,
    metrics: Mapping[str, Any],
    input_sha256: str | None = None,
    seconds: float | None = None,
) -> StageRecord:
    """The index row of one stage's outcome for one series: every stage writes its rows here."""
    from cohortflow.models.stages import StageRecord

    deciding = outcome.reason
    return StageRecord.of(
        describe,
        series_uid=series,
        study_uid=study,
        stage=stage,
        status=outcome.verdict.value,
        method_version=method_version,
        reason_code=deciding.check if deciding else None,
        message=deciding.message if deciding else None,
        findings=[f.as_dict() for f in outcome.findings],
        metrics=dict(metrics),
        input_sha256=input_sha256 or None,
        seconds=seconds,
    )
