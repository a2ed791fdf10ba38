"""Where each image plane of a DICOM series lies in the patient's space (LPS millimetres).

Shared by every stage that places pixels: defacing masks every plane by its own geometry (a
series needs no regular slice grid: gaps, duplicated positions, several stacks or Enhanced MR
frames are all masked correctly), header QC checks the slice positions, image QC and volumetry
need a regular volume (:func:`reference_volume`). DICOM patient coordinates are LPS; NIfTI and the
templates are RAS (:data:`LPS_FROM_RAS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from cohortflow.models.errors import GeometryError

Array = npt.NDArray[np.float64]
#: RAS <-> LPS (its own inverse): NIfTI / template space to DICOM patient space and back.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Plane:
    """One image plane: pixel (r, c) lies at ``origin + r * spacing[0] * col_dir +
    c * spacing[1] * row_dir`` (DICOM's ImagePositionPatient, ImageOrientationPatient and
    PixelSpacing)."""

    instance: int  # index of the instance in the series
    frame: int | None  # frame of a multi-frame instance, None for a single-frame one
    origin: Array
    row_dir: Array
    col_dir: Array
    spacing: tuple[float, float]  # between rows, between columns (mm)
    rows: int
    columns: int

    @property
    def normal(self) -> Array:
        n = np.cross(self.row_dir, self.col_dir)
        return np.asarray(n / np.linalg.norm(n), dtype=np.float64)

    def pixel_to_lps(self) -> Array:
        """3x3 matrix taking (r, c, 1) to LPS millimetres."""
        m = np.empty((3, 3))
        m[:, 0] = self.col_dir * self.spacing[0]
        m[:, 1] = self.row_dir * self.spacing[1]
        m[:, 2] = self.origin
        return m


def _floats(item: Dataset | None, keyword: str, n: int) -> Array | None:
    if item is None or keyword not in item:
        return None
    try:
        values = np.asarray([float(v) for v in item[keyword].value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return values if values.size == n and np.all(np.isfinite(values)) else None


def _item(ds: Dataset | None, *path: str) -> Dataset | None:
    current = ds
    for keyword in path:
        if current is None or keyword not in current:
            return None
        seq = current[keyword].value
        current = seq[0] if seq else None
    return current


def planes_of(ds: Dataset, instance: int) -> list[Plane]:
    """The planes of one instance (one, or one per frame of an Enhanced / multi-frame object).

    Raises GeometryError ``no_geometry`` when the instance does not say where its pixels lie.
    """
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or columns <= 0:
        raise GeometryError("no_geometry", "no Rows / Columns: not an image")
    frames = int(ds.get("NumberOfFrames") or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = _item(ds, "SharedFunctionalGroupsSequence")
        per_frame = ds.PerFrameFunctionalGroupsSequence
        out = []
        for f in range(frames):
            item = per_frame[f] if f < len(per_frame) else None

            def pick(seq: str, keyword: str, n: int, item: Dataset | None = item) -> Array | None:
                own = _floats(_item(item, seq), keyword, n)
                return own if own is not None else _floats(_item(shared, seq), keyword, n)

            out.append(
                _plane(
                    instance,
                    f,
                    pick("PlanePositionSequence", "ImagePositionPatient", 3),
                    pick("PlaneOrientationSequence", "ImageOrientationPatient", 6),
                    pick("PixelMeasuresSequence", "PixelSpacing", 2),
                    rows,
                    columns,
                )
            )
        return out
    if frames > 1:
        raise GeometryError(
            "no_geometry", f"{frames} frames without per-frame positions: cannot place them"
        )
    return [
        _plane(
            instance,
            None,
            _floats(ds, "ImagePositionPatient", 3),
            _floats(ds, "ImageOrientationPatient", 6),
            _floats(ds, "PixelSpacing", 2),
            rows,
            columns,
        )
    ]


def _plane(
    instance: int,
    frame: int | None,
    position: Array | None,
    orientation: Array | None,
    spacing: Array | None,
    rows: int,
    columns: int,
) -> Plane:
    missing = [
        name
        for name, value in (
            ("ImagePositionPatient", position),
            ("ImageOrientationPatient", orientation),
            ("PixelSpacing", spacing),
        )
        if value is None
    ]
    if missing:
        raise GeometryError("no_geometry", f"missing or unreadable {', '.join(missing)}")
    assert position is not None and orientation is not None and spacing is not None
    row_dir, col_dir = orientation[:3], orientation[3:]
    norms = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    if min(norms) < 1e-3 or abs(float(np.dot(row_dir, col_dir))) > 1e-3 * norms[0] * norms[1]:
        raise GeometryError("no_geometry", "ImageOrientationPatient is not two orthogonal vectors")
    if min(spacing) <= 0:
        raise GeometryError("no_geometry", f"PixelSpacing {list(spacing)} is not positive")
    return Plane(
        instance=instance,
        frame=frame,
        origin=position,
        row_dir=row_dir / norms[0],
        col_dir=col_dir / norms[1],
        spacing=(float(spacing[0]), float(spacing[1])),
        rows=rows,
        columns=columns,
    )


@dataclass(frozen=True)
class Volume:
    """A regular stack of planes: ``planes[k]`` is slice k (ascending along the normal), None
    where a slice is missing from the series."""

    planes: tuple[Plane | None, ...]
    slice_spacing: float

    @property
    def first(self) -> Plane:
        first = self.planes[0]
        assert first is not None
        return first

    @property
    def present(self) -> list[Plane]:
        return [p for p in self.planes if p is not None]

    @property
    def direction(self) -> Array:
        """ITK direction: columns are the (column, row, slice) index axes in LPS."""
        p = self.first
        return np.stack([p.row_dir, p.col_dir, p.normal], axis=1)

    @property
    def spacing(self) -> tuple[float, float, float]:
        p = self.first
        return (p.spacing[1], p.spacing[0], self.slice_spacing)

    def index_to_lps(self) -> Array:
        """4x4 matrix taking (k, r, c, 1) to LPS millimetres."""
        p = self.first
        m = np.eye(4)
        m[:3, 0] = p.normal * self.slice_spacing
        m[:3, 1] = p.col_dir * p.spacing[0]
        m[:3, 2] = p.row_dir * p.spacing[1]
        m[:3, 3] = p.origin
        return m


#: A reference volume may miss at most this fraction of its slices (filled in for registration).
MAX_MISSING = 0.1


def reference_volume(planes: Sequence[Plane]) -> Volume:
    """Order the planes of a series into a regular volume, or raise GeometryError saying why not.

    Duplicated positions keep the first instance. Slices must lie on one regular grid; a few
    missing ones (at most 10 %) are allowed and left as gaps. Mixed orientations, differing
    matrices or in-plane shifts make the series unusable as the registration reference (it can
    still be masked plane by plane).
    """
    if len(planes) < 16:
        raise GeometryError("not_a_volume", f"{len(planes)} planes: too few for a 3D reference")
    first = planes[0]
    for p in planes[1:]:
        if (
            p.rows != first.rows
            or p.columns != first.columns
            or not np.allclose(p.row_dir, first.row_dir, atol=1e-3)
            or not np.allclose(p.col_dir, first.col_dir, atol=1e-3)
            or not np.allclose(p.spacing, first.spacing, rtol=1e-3)
        ):
            raise GeometryError(
                "not_a_volume", "planes differ in orientation, matrix or pixel spacing"
            )
    normal = first.normal
    keyed: dict[float, Plane] = {}
    for p in planes:
        keyed.setdefault(round(float(np.dot(p.origin, normal)), 2), p)
    positions = np.array(sorted(keyed))
    steps = np.diff(positions)
    spacing = float(np.min(steps)) if steps.size else 0.0
    slots = np.round((positions - positions[0]) / spacing) if spacing > 0 else positions
    if spacing <= 0 or np.any(np.abs(positions - positions[0] - slots * spacing) > 0.05 * spacing):
        raise GeometryError(
            "not_a_volume",
            f"slice positions do not lie on a regular grid (steps {steps.min():.2f} to "
            f"{steps.max():.2f} mm)",
        )
    count = int(slots[-1]) + 1
    if count - len(positions) > MAX_MISSING * count:
        raise GeometryError(
            "not_a_volume",
            f"{count - len(positions)} of {count} slice positions are missing: too many gaps",
        )
    ordered: list[Plane | None] = [None] * count
    for slot, key in zip(slots.astype(int).tolist(), positions.tolist(), strict=True):
        ordered[slot] = keyed[key]
    origin = ordered[0]
    assert origin is not None
    for plane in ordered:
        if plane is None:
            continue
        offset = plane.origin - origin.origin
        if np.linalg.norm(offset - np.dot(offset, normal) * normal) > 0.05 * max(first.spacing):
            raise GeometryError("not_a_volume", "slices are shifted in-plane (gantry tilt?)")
    return Volume(tuple(ordered), spacing)


def plane_pixels(arr: npt.NDArray[np.generic], plane: Plane) -> npt.NDArray[np.generic]:
    """The pixels of ``plane`` in its instance's pixel array (one frame of a multi-frame one)."""
    return arr if plane.frame is None else arr[plane.frame]


def stack_pixels(volume: Volume, arrays: list[npt.NDArray[np.generic]]) -> npt.NDArray[np.float32]:
    """The volume's pixels in (k, r, c) order; a missing slice is interpolated from its
    neighbours (for registration, measurement and pictures; never written back)."""
    present = [(k, p) for k, p in enumerate(volume.planes) if p is not None]
    first = plane_pixels(arrays[present[0][1].instance], present[0][1])
    out = np.zeros((len(volume.planes), *first.shape), np.float32)
    for k, p in present:
        out[k] = plane_pixels(arrays[p.instance], p)
    for (a, _), (b, _) in pairwise(present):
        for k in range(a + 1, b):
            w = (k - a) / (b - a)
            out[k] = (1 - w) * out[a] + w * out[b]
    return out
