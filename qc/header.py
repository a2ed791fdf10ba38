"""Header QC: checks on the DICOM headers of one series (and of a study), data in, findings out.

The headers come in as pydicom data sets without pixel data, one per file, with the files that
could not be read; nothing is read from disk here. Enhanced MR objects keep most attributes in
their functional groups; :func:`header_value` finds them there, so every check applies to both.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from cohortflow.models.errors import GeometryError
from cohortflow.models.geometry import Plane, planes_of
from cohortflow.models.scanners import KnownScanners
from cohortflow.qc.findings import Finding
from cohortflow.qc.policy import QcPolicy, RolePolicy

#: SOP classes whose pixels are MR images cohortflow can measure.
MR_IMAGE_CLASSES = frozenset(
    {
        UID("1.2.840.10008.5.1.4.1.1.4"),  # MR Image Storage
        UID("1.2.840.10008.5.1.4.1.1.4.1"),  # Enhanced MR Image Storage
        UID("1.2.840.10008.5.1.4.1.1.4.4"),  # Legacy Converted Enhanced MR Image Storage
    }
)

#: Where Enhanced MR objects keep what single-frame MR images carry at the top level:
#: keyword -> (functional group macro, keyword inside it).
FUNCTIONAL_GROUPS: dict[str, tuple[str, str]] = {
    "PixelSpacing": ("PixelMeasuresSequence", "PixelSpacing"),
    "SliceThickness": ("PixelMeasuresSequence", "SliceThickness"),
    "SpacingBetweenSlices": ("PixelMeasuresSequence", "SpacingBetweenSlices"),
    "ImageOrientationPatient": ("PlaneOrientationSequence", "ImageOrientationPatient"),
    "ImagePositionPatient": ("PlanePositionSequence", "ImagePositionPatient"),
    "RepetitionTime": ("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
    "FlipAngle": ("MRTimingAndRelatedParametersSequence", "FlipAngle"),
    "EchoTrainLength": ("MRTimingAndRelatedParametersSequence", "EchoTrainLength"),
    "EchoTime": ("MREchoSequence", "EffectiveEchoTime"),
    "InversionTime": ("MRModifierSequence", "InversionTimes"),
    "ImageType": ("MRImageFrameTypeSequence", "FrameType"),
}


def _empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    try:
        return len(value) == 0  # type: ignore[arg-type]
    except TypeError:
        return False


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None or keyword not in ds:
        return None
    seq = ds[keyword].value
    return seq[0] if seq else None


def header_value(ds: Dataset, keyword: str) -> object | None:
    """The value of ``keyword``: at the top level, else in the shared functional groups, else in
    the first frame's (Enhanced MR). None when absent or empty."""
    try:
        value = ds.get(keyword)
    except Exception:  # a value too damaged to convert counts as absent
        value = None
    if not _empty(value):
        return cast(object, getattr(value, "value", value))
    if keyword not in FUNCTIONAL_GROUPS:
        return None
    macro, inner = FUNCTIONAL_GROUPS[keyword]
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        item = _first_item(_first_item(ds, groups), macro)
        if item is not None and inner in item:
            value = item.get(inner)
            if not _empty(value):
                return cast(object, value)
    return None


def header_number(ds: Dataset, keyword: str) -> float | None:
    """A numeric attribute as a float (the first of several values); None if absent or not a
    number."""
    value = header_value(ds, keyword)
    if value is None:
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = next(iter(value), None)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def header_text(ds: Dataset, keyword: str) -> str:
    value = header_value(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


@dataclass(frozen=True)
class SeriesFile:
    """One file of a series as header QC sees it: its header, or why it could not be read."""

    name: str  # shown in messages (a path relative to the folder checked)
    dataset: Dataset | None
    problem: str = ""


@dataclass(frozen=True)
class HeaderResult:
    findings: tuple[Finding, ...]
    metrics: dict[str, float | str | None] = field(default_factory=dict)


class _Collector:
    def __init__(self, policy: QcPolicy) -> None:
        self.policy = policy
        self.findings: list[Finding] = []

    def add(
        self,
        check: str,
        message: str,
        value: float | str | None = None,
        threshold: str | None = None,
    ) -> None:
        severity = self.policy.severity_of(check)
        self.findings.append(Finding(check, severity, message, value, threshold))


def _names(items: Iterable[str], limit: int = 3) -> str:
    listed = list(items)
    shown = ", ".join(listed[:limit])
    return shown + (f" and {len(listed) - limit} more" if len(listed) > limit else "")


def check_series(
    files: Sequence[SeriesFile],
    policy: QcPolicy,
    role: str | None = None,
    scanners: KnownScanners | None = None,
) -> HeaderResult:
    """Check the headers of one series against the protocol's QC policy.

    ``role`` is the include rule that selected the series (``t1_3d``...): it decides the
    required attributes and expected parameters on top of the protocol-wide ones.
    """
    out = _Collector(policy)
    unreadable = [f for f in files if f.dataset is None]
    if unreadable:
        out.add(
            "header.unreadable_file",
            f"{len(unreadable)} file(s) cannot be read: {unreadable[0].name}: "
            f"{unreadable[0].problem or 'unreadable'}",
            len(unreadable),
        )
    readable = _distinct(f for f in files if f.dataset is not None)
    metrics: dict[str, float | str | None] = {
        "files": len(files),
        "instances": len(readable),
        "unreadable_files": len(unreadable),
    }
    if not readable:
        return HeaderResult(tuple(out.findings), metrics)
    first = readable[0].dataset
    assert first is not None
    role_policy = policy.role(role)
    _identity(first, policy, out)
    _required(first, (*policy.required_tags, *role_policy.required_tags), out)
    derived = _geometry(readable, policy, out, metrics)
    _conformance(first, role_policy, derived, out, metrics)
    if scanners is not None:
        verdict = scanners.check(
            header_text(first, "Manufacturer"),
            header_text(first, "ManufacturerModelName"),
            header_text(first, "SoftwareVersions"),
        )
        if not verdict.known:
            out.add(
                "header.unknown_scanner",
                f"{verdict.reason}: not validated for this protocol",
                " / ".join(
                    header_text(first, k)
                    for k in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions")
                ),
                f"known scanners ({scanners.version})",
            )
    return HeaderResult(tuple(out.findings), metrics)


def check_study(
    roles: Iterable[str | None], required: Sequence[str], policy: QcPolicy
) -> list[Finding]:
    """Study-level: does the study hold a series of each required role (e.g. a 3D T1)?"""
    present = set(roles)
    missing = [r for r in required if r not in present]
    if not missing:
        return []
    return [
        Finding(
            "header.missing_required_series",
            policy.severity_of("header.missing_required_series"),
            f"the study has no series of required role {', '.join(missing)}: no biomarker can "
            "be measured from it",
            ", ".join(missing),
            ", ".join(required),
        )
    ]


def _distinct(files: Iterable[SeriesFile]) -> list[SeriesFile]:
    """One file per SOPInstanceUID: a file delivered twice is one image, not a duplicate slice."""
    seen: set[str] = set()
    out = []
    for f in files:
        assert f.dataset is not None
        uid = str(f.dataset.get("SOPInstanceUID") or "") or f.name
        if uid not in seen:
            seen.add(uid)
            out.append(f)
    return out


def _identity(ds: Dataset, policy: QcPolicy, out: _Collector) -> None:
    modality = header_text(ds, "Modality")
    if modality not in policy.modalities:
        out.add(
            "header.modality",
            f"Modality {modality or '(none)'} is not one this protocol measures",
            modality or None,
            ", ".join(policy.modalities),
        )
    sop_class = str(ds.get("SOPClassUID") or "")
    if UID(sop_class) not in MR_IMAGE_CLASSES:
        name = UID(sop_class).name if sop_class else "(none)"
        out.add(
            "header.sop_class",
            f"SOP class {name} is not an MR image cohortflow can measure",
            sop_class or None,
            "MR, Enhanced MR or Legacy Converted Enhanced MR Image Storage",
        )


def _required(ds: Dataset, keywords: Sequence[str], out: _Collector) -> None:
    missing = [k for k in dict.fromkeys(keywords) if header_value(ds, k) is None]
    if missing:
        out.add(
            "header.required_tags",
            f"required attribute(s) missing or empty: {', '.join(missing)}",
            ", ".join(missing),
        )


@dataclass(frozen=True)
class _Derived:
    slices: int | None = None
    slice_spacing: float | None = None
    voxel_size: float | None = None


def _geometry(
    files: list[SeriesFile],
    policy: QcPolicy,
    out: _Collector,
    metrics: dict[str, float | str | None],
) -> _Derived:
    planes: list[Plane] = []
    placeless: list[str] = []
    for index, f in enumerate(files):
        assert f.dataset is not None
        try:
            planes.extend(planes_of(f.dataset, index))
        except GeometryError as exc:
            placeless.append(f"{f.name} ({exc.message})")
    if placeless:
        out.add(
            "header.no_geometry",
            f"{len(placeless)} image(s) do not say where they lie: {_names(placeless, 2)}",
            len(placeless),
        )
    if not planes:
        return _Derived()
    matrices = _one_of(
        out, "header.matrix", "matrix", [(p.rows, p.columns) for p in planes], "{}x{}"
    )
    spacings = _one_of(
        out,
        "header.pixel_spacing",
        "pixel spacing",
        [(round(p.spacing[0], 4), round(p.spacing[1], 4)) for p in planes],
        "{:g}x{:g} mm",
    )
    normals: list[np.ndarray] = []
    groups: dict[int, list[Plane]] = {}
    for p in planes:
        for i, n in enumerate(normals):
            if abs(float(np.dot(n, p.normal))) > math.cos(math.radians(1.0)):
                groups[i].append(p)
                break
        else:
            normals.append(p.normal)
            groups[len(normals) - 1] = [p]
    (pr, pc), _ = spacings.most_common(1)[0]
    (rows, columns), _ = matrices.most_common(1)[0]
    metrics.update(
        {"rows": rows, "columns": columns, "pixel_spacing_row": pr, "pixel_spacing_column": pc}
    )
    if len(groups) > 1:
        sizes = sorted((len(g) for g in groups.values()), reverse=True)
        out.add(
            "header.mixed_orientation",
            f"{len(groups)} slice orientations in one series ({', '.join(map(str, sizes))} "
            "images): a localizer or several stacks, not one volume",
            len(groups),
            "one orientation",
        )
        return _Derived()
    return _stack(planes, files, policy, out, metrics, max(pr, pc))


def _one_of(
    out: _Collector, check: str, what: str, values: list[tuple[Any, Any]], shown: str
) -> Counter[tuple[Any, Any]]:
    """Count ``values`` (one per plane); more than one distinct value is a finding."""
    counts = Counter(values)
    if len(counts) > 1:
        out.add(
            check,
            f"images differ in {what}: "
            + ", ".join(f"{shown.format(*v)} ({n})" for v, n in counts.most_common()),
            len(counts),
            f"one {what}",
        )
    return counts


def _stack(
    planes: list[Plane],
    files: list[SeriesFile],
    policy: QcPolicy,
    out: _Collector,
    metrics: dict[str, float | str | None],
    pixel: float,
) -> _Derived:
    rules = policy.geometry
    normal = planes[0].normal
    echo = {
        i: header_text(f.dataset, "EchoNumbers") or "1"
        for i, f in enumerate(files)
        if f.dataset is not None
    }
    located = sorted(
        ((float(np.dot(p.origin, normal)), p) for p in planes), key=lambda item: item[0]
    )
    # positions within the tolerance are one position; several echoes may share it legitimately
    positions: list[tuple[float, list[Plane]]] = []
    for d, p in located:
        if positions and d - positions[-1][0] <= rules.position_tolerance_mm:
            positions[-1][1].append(p)
        else:
            positions.append((d, [p]))
    duplicates = []
    for d, shared in positions:
        per_echo = Counter(echo.get(p.instance, "1") for p in shared)
        extra = sum(n - 1 for n in per_echo.values())
        if extra:
            names = [files[p.instance].name for p in shared]
            duplicates.append((d, extra, names))
    n_dup = sum(extra for _, extra, _ in duplicates)
    metrics["duplicate_slices"] = n_dup
    if duplicates:
        d, _, names = duplicates[0]
        out.add(
            "header.duplicate_slices",
            f"{n_dup} extra image(s) at an occupied slice position, e.g. {d:.2f} mm: "
            f"{_names(names, 2)}",
            n_dup,
            "0",
        )
    metrics["slices"] = len(positions)
    thickness = header_number(files[0].dataset, "SliceThickness") if files[0].dataset else None
    metrics["slice_thickness"] = thickness
    if len(positions) < 2:
        return _Derived(len(positions), None, pixel)
    centres = np.array([d for d, _ in positions])
    steps = np.diff(centres)
    nominal = float(np.median(steps))
    metrics["slice_spacing"] = round(nominal, 4)
    ratios = steps / nominal
    whole = np.rint(ratios)
    off_grid = np.abs(ratios - whole) > rules.spacing_tolerance
    missing = int((whole[~off_grid] - 1).clip(min=0).sum())
    metrics["missing_slices"] = missing
    if off_grid.any():
        worst = int(np.argmax(np.abs(ratios - whole)))
        out.add(
            "header.irregular_spacing",
            f"{int(off_grid.sum())} step(s) between slices are not a multiple of the "
            f"{nominal:.3g} mm spacing (e.g. {steps[worst]:.3g} mm after {centres[worst]:.2f} mm)",
            round(float(steps[worst]), 4),
            f"multiples of {nominal:.3g} mm",
        )
    if missing:
        gap = int(np.argmax(np.where(off_grid, 0, whole)))
        out.add(
            "header.missing_slices",
            f"{missing} slice position(s) missing from a {nominal:.3g} mm grid, e.g. "
            f"{int(whole[gap]) - 1} between {centres[gap]:.2f} and {centres[gap + 1]:.2f} mm",
            missing,
            "0",
        )
    declared = header_number(files[0].dataset, "SpacingBetweenSlices") if files[0].dataset else None
    if declared is not None and declared > 0 and abs(declared - nominal) > 0.1 * nominal:
        out.add(
            "header.spacing_mismatch",
            f"SpacingBetweenSlices says {declared:g} mm, the slice positions {nominal:.3g} mm",
            declared,
            f"{nominal:.3g} mm",
        )
    if thickness is not None and thickness > 0:
        gap_mm = nominal - thickness
        if gap_mm > rules.max_gap_fraction * thickness:
            out.add(
                "header.slice_gap",
                f"{gap_mm:.3g} mm gap between {thickness:g} mm slices: tissue between them is "
                "not imaged",
                round(gap_mm / thickness, 4),
                f"<= {rules.max_gap_fraction:g} of the thickness",
            )
    origin = positions[0][1][0].origin
    shifts = [
        float(np.linalg.norm(off - np.dot(off, normal) * normal))
        for off in (shared[0].origin - origin for _, shared in positions)
    ]
    worst_shift = max(shifts)
    if worst_shift > rules.max_shift_pixels * pixel:
        k = int(np.argmax(shifts))
        along = float(centres[k] - centres[0])
        angle = math.degrees(math.atan2(worst_shift, abs(along))) if along else 90.0
        metrics["tilt_degrees"] = round(angle, 3)
        out.add(
            "header.gantry_tilt",
            f"slices are shifted in-plane by up to {worst_shift:.2f} mm ({angle:.1f} degrees): "
            "a tilted or sheared stack, resample before measuring",
            round(angle, 3),
            f"<= {rules.max_shift_pixels:g} pixel",
        )
    return _Derived(len(positions), nominal, max(pixel, nominal))


def _conformance(
    ds: Dataset,
    role: RolePolicy,
    derived: _Derived,
    out: _Collector,
    metrics: dict[str, float | str | None],
) -> None:
    for keyword in ("RepetitionTime", "EchoTime", "InversionTime", "FlipAngle"):
        metrics[keyword] = header_number(ds, keyword)
    metrics["MagneticFieldStrength"] = header_number(ds, "MagneticFieldStrength")
    values = {
        "Slices": derived.slices,
        "SliceSpacing": derived.slice_spacing,
        "VoxelSize": derived.voxel_size,
    }
    metrics["voxel_size"] = derived.voxel_size
    for keyword, expected in role.expect.items():
        value = values[keyword] if keyword in values else header_number(ds, keyword)
        check = f"header.conformance.{keyword}"
        if value is None:
            if expected.required:
                out.add(check, f"{keyword} is missing; the protocol expects {expected.text()}")
            continue
        if not expected.contains(value):
            out.add(
                check,
                f"{keyword} {value:g} is outside the protocol's {expected.text()}",
                value,
                expected.text(),
            )
