"""Does a NIfTI image hold the DICOM series it was made from? Pure: planes, affines and arrays
in, findings out (reading happens in ``series`` and ``converters``, writing in ``folder``).

The DICOM side is a :class:`SliceGrid`: the series' planes ordered along their normal, on one
regular grid of slice positions (gaps allowed), possibly sheared (gantry tilt). Voxel
``(c, r, k)`` (column, row, slice slot; NIfTI's i, j, k before any reorientation) lies at
``origin + c * dc * row_dir + r * dr * col_dir + k * step`` in LPS millimetres.

The NIfTI side may be stored in any axis order and direction (dcm2niix turns a sagittal 3D
volume to the nearest canonical order): :func:`check_image` first matches its axes with the
grid's, then asks that every corner voxel lies within :data:`POSITION_TOLERANCE_MM` of where the
DICOM puts it (this covers orientation, first-slice position, in-plane and slice spacing at once),
that the slice count matches, and that the voxels hold the DICOM pixels found at the same world
position (a flip that leaves the affine alone is caught here). A tilted series may instead be
resampled onto an orthogonal grid (dcm2niix's ``_Tilt_1``): then the grid must be the DICOM one
along the slice normal and the voxels must agree after interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
import numpy.typing as npt

from cohortflow.models.geometry import LPS_FROM_RAS, Plane
from cohortflow.pipelines.convert.errors import ConvertError
from cohortflow.qc.findings import Finding, Severity, finding

Array = npt.NDArray[np.float64]

#: Every voxel centre must lie this close to where the DICOM headers put it.
POSITION_TOLERANCE_MM = 0.1
#: Largest difference between matched direction cosines of the NIfTI and the DICOM axes.
DIRECTION_TOLERANCE = 1e-3
#: A resampled (tilt-corrected) image agrees with the DICOM when the root mean square residual of
#: the voxel values, interpolated at the DICOM pixel centres, is below this fraction of the
#: pixels' standard deviation (dcm2niix's tilt correction measured 0.04-0.07; an uncorrected or
#: flipped image 0.5-0.7).
RESAMPLED_MAX_NRMSE = 0.25

# The convert step's checks (``convert.*``) are registered with every other check in
# ``qc.findings.CHECKS``: one registry the protocols and the dashboard read.


@dataclass(frozen=True)
class SliceGrid:
    """The DICOM series as a regular stack of slices (see the module docstring)."""

    row_dir: Array
    col_dir: Array
    normal: Array
    origin: Array  # ImagePositionPatient of slot 0
    step: Array  # from one slot to the next (LPS mm); along the normal unless sheared
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns
    rows: int
    columns: int
    count: int  # slice slots, missing ones included
    planes: tuple[Plane, ...]  # one per slot present, ascending along the normal
    slots: tuple[int, ...]  # the slot of each of ``planes``
    duplicates: tuple[Plane, ...]  # images at a position already taken (left out)

    @property
    def slice_spacing(self) -> float:
        """Distance between neighbouring slice planes, along the normal."""
        return float(np.dot(self.step, self.normal))

    @property
    def missing(self) -> tuple[int, ...]:
        present = set(self.slots)
        return tuple(k for k in range(self.count) if k not in present)

    @property
    def shear(self) -> Array:
        """In-plane shift of each slot against the previous one (zero without tilt)."""
        return np.asarray(self.step - self.slice_spacing * self.normal, dtype=np.float64)

    @property
    def tilt_degrees(self) -> float:
        """Angle between the slice step and the slice normal (gantry tilt)."""
        return math.degrees(math.atan2(float(np.linalg.norm(self.shear)), self.slice_spacing))

    @property
    def sheared(self) -> bool:
        """Do the slices drift in-plane by more than the position tolerance over the stack?"""
        drift = float(np.linalg.norm(self.shear)) * max(self.count - 1, 1)
        return drift > POSITION_TOLERANCE_MM

    @property
    def shape(self) -> tuple[int, int, int]:
        """(columns, rows, slots): the voxel counts along (c, r, k)."""
        return (self.columns, self.rows, self.count)

    def index_to_lps(self) -> Array:
        """4x4 matrix taking (c, r, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, 0] = self.row_dir * self.spacing[1]
        m[:3, 1] = self.col_dir * self.spacing[0]
        m[:3, 2] = self.step
        m[:3, 3] = self.origin
        return m

    def plane_of(self, slot: int) -> Plane | None:
        for plane, k in zip(self.planes, self.slots, strict=True):
            if k == slot:
                return plane
        return None


def slice_grid(planes: Sequence[Plane]) -> SliceGrid:
    """Order ``planes`` into a :class:`SliceGrid`; of several planes at one position the first
    is kept. Raises ConvertError ``convert.not_a_volume`` (mixed orientation or matrix, a single
    image, slices shifted in-plane irregularly) or ``convert.irregular_spacing``."""
    if len(planes) < 2:
        raise ConvertError(
            "convert.not_a_volume", f"{len(planes)} image(s): a single slice is not a volume"
        )
    first = planes[0]
    for p in planes[1:]:
        if (p.rows, p.columns) != (first.rows, first.columns):
            raise ConvertError(
                "convert.not_a_volume",
                f"the images have different matrices ({first.rows}x{first.columns} and "
                f"{p.rows}x{p.columns}): several stacks, not one volume",
            )
        if not (
            np.allclose(p.row_dir, first.row_dir, atol=DIRECTION_TOLERANCE)
            and np.allclose(p.col_dir, first.col_dir, atol=DIRECTION_TOLERANCE)
        ):
            raise ConvertError(
                "convert.not_a_volume",
                "the images have different orientations (a localizer or several stacks)",
            )
        if not np.allclose(p.spacing, first.spacing, rtol=1e-3):
            raise ConvertError(
                "convert.not_a_volume",
                f"the images have different pixel spacings ({list(first.spacing)} and "
                f"{list(p.spacing)})",
            )
    normal = first.normal
    kept: dict[float, Plane] = {}
    duplicates: list[Plane] = []
    for p in planes:
        key = round(float(np.dot(p.origin, normal)), 2)
        if key in kept:
            duplicates.append(p)
        else:
            kept[key] = p
    if len(kept) < 2:
        raise ConvertError(
            "convert.not_a_volume", f"all {len(planes)} images lie at one slice position"
        )
    positions = np.array(sorted(kept))
    ordered = [kept[float(k)] for k in positions]
    base = float(np.min(np.diff(positions)))
    slots = np.round((positions - positions[0]) / base).astype(int)
    spacing = float(positions[-1] - positions[0]) / int(slots[-1])
    residual = np.abs(positions - positions[0] - slots * spacing)
    tolerance = min(POSITION_TOLERANCE_MM, 0.25 * spacing)
    steps = np.diff(positions)
    if float(residual.max()) > tolerance:
        raise ConvertError(
            "convert.irregular_spacing",
            f"slice positions do not lie on one regular grid (steps {steps.min():.3f} to "
            f"{steps.max():.3f} mm along the normal)",
        )
    count = int(slots[-1]) + 1
    if count > 2 * len(ordered):
        raise ConvertError(
            "convert.irregular_spacing",
            f"{count - len(ordered)} of {count} slice positions are missing: not one volume",
        )
    origin = ordered[0].origin
    offsets = np.array([p.origin - origin for p in ordered])
    in_plane = offsets - np.outer(offsets @ normal, normal)
    shear = in_plane[-1] / int(slots[-1])
    drift = np.linalg.norm(in_plane - np.outer(slots, shear), axis=1)
    if float(drift.max()) > POSITION_TOLERANCE_MM:
        raise ConvertError(
            "convert.not_a_volume",
            f"the slices are shifted in-plane irregularly (up to {drift.max():.2f} mm off a "
            "straight stack)",
        )
    return SliceGrid(
        row_dir=first.row_dir,
        col_dir=first.col_dir,
        normal=normal,
        origin=np.asarray(origin, dtype=np.float64),
        step=np.asarray(spacing * normal + shear, dtype=np.float64),
        spacing=first.spacing,
        rows=first.rows,
        columns=first.columns,
        count=count,
        planes=tuple(ordered),
        slots=tuple(int(s) for s in slots),
        duplicates=tuple(duplicates),
    )


def grid_findings(
    grid: SliceGrid, gantry_tilt: float | None = None, frames: int | None = None
) -> list[Finding]:
    """What the conversion of this grid must handle and report: tilt (from the header's
    GantryDetectorTilt or sheared slice positions), missing and duplicated slices, multi-frame."""
    out = []
    header_tilt = gantry_tilt if gantry_tilt is not None and abs(gantry_tilt) > 0.01 else None
    if grid.sheared or header_tilt is not None:
        angle = grid.tilt_degrees if grid.sheared else float(header_tilt or 0.0)
        said = f" (GantryDetectorTilt {header_tilt:g})" if header_tilt is not None else ""
        how = (
            "the slice positions are sheared: the image is resampled onto an orthogonal grid"
            if grid.sheared
            else "the slice positions are not sheared: no resampling needed"
        )
        out.append(
            finding(
                "convert.gantry_tilt",
                f"gantry tilt of {angle:.2f} degrees{said}; {how}",
                round(angle, 3),
            )
        )
    missing = grid.missing
    if missing:
        shown = ", ".join(str(k) for k in missing[:10]) + (" ..." if len(missing) > 10 else "")
        out.append(
            finding(
                "convert.missing_slices",
                f"{len(missing)} of {grid.count} slice positions have no image (slots {shown}): "
                "filled by linear interpolation between their neighbours",
                len(missing),
            )
        )
    if grid.duplicates:
        out.append(
            finding(
                "convert.duplicate_slices",
                f"{len(grid.duplicates)} image(s) lie at a slice position already taken: the "
                "first image at each position is converted",
                len(grid.duplicates),
            )
        )
    if frames is not None:
        out.append(
            finding(
                "convert.multiframe",
                f"one multi-frame (Enhanced MR) object of {frames} frames, placed frame by frame",
                frames,
            )
        )
    return out


@dataclass(frozen=True)
class ImageCheck:
    """The verdict on one converted image."""

    findings: tuple[Finding, ...]
    resampled: bool  # compared as a resampled (tilt-corrected) image
    position_error_mm: float | None  # largest corner error (exact mode)
    residual: float | None  # largest voxel residual (exact) or relative RMS residual (resampled)

    @property
    def passed(self) -> bool:
        return not any(f.severity is Severity.FAIL for f in self.findings)


def check_image(
    grid: SliceGrid,
    affine: Array,
    data: npt.NDArray[np.generic],
    samples: Mapping[int, npt.NDArray[np.generic]],
) -> ImageCheck:
    """Compare a NIfTI image (``affine``: voxel to RAS, as NIfTI stores it; ``data`` its voxel
    values, scaled) with the DICOM ``grid``; ``samples`` maps slice slots to the DICOM pixels of
    that slice (rows x columns, rescaled) to compare the voxels with."""
    shape = tuple(int(n) for n in data.shape)
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        return _fail("convert.not_3d", f"the image has shape {shape}, not one 3D volume", None)
    volume = data.reshape(shape[:3])
    to_lps = LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    axes = to_lps[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    if np.any(norms <= 0):
        return _fail("convert.geometry", "the image affine has a zero-length axis", None)
    directions = axes / norms
    exact = _match_axes(directions, (grid.row_dir, grid.col_dir, _unit(grid.step)))
    if exact is not None:
        return _check_exact(grid, to_lps, volume, samples, exact)
    if grid.sheared:
        resampled = _match_axes(directions, (grid.row_dir, grid.col_dir, grid.normal))
        if resampled is not None:
            return _check_resampled(grid, to_lps, volume, samples, resampled)
    shown = "; ".join(
        f"{n}: [{', '.join(f'{x:.4f}' for x in d)}]"
        for n, d in zip("ijk", directions.T, strict=True)
    )
    expected = ", ".join(
        f"[{', '.join(f'{x:.4f}' for x in v)}]"
        for v in (grid.row_dir, grid.col_dir, _unit(grid.step))
    )
    return _fail(
        "convert.orientation",
        f"the image axes (LPS {shown}) are not the DICOM row, column and slice directions "
        f"({expected}) within {DIRECTION_TOLERANCE:g}",
        None,
    )


def _unit(v: Array) -> Array:
    return np.asarray(v / np.linalg.norm(v), dtype=np.float64)


#: For each DICOM axis (c, r, k): the NIfTI axis along it and the sign (+1 same direction).
AxisMatch = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _match_axes(directions: Array, wanted: Sequence[Array]) -> AxisMatch | None:
    """Which image axis runs along each wanted direction (either sign), or None."""
    out: list[tuple[int, int]] = []
    for w in wanted:
        found = None
        for i in range(3):
            d = directions[:, i]
            for sign in (1, -1):
                if np.max(np.abs(sign * d - w)) <= DIRECTION_TOLERANCE:
                    found = (i, sign)
        if found is None or any(found[0] == i for i, _ in out):
            return None
        out.append(found)
    return (out[0], out[1], out[2])


def _fail(code: str, message: str, value: float | str | None) -> ImageCheck:
    return ImageCheck((finding(code, message, value),), False, None, None)


def _check_exact(
    grid: SliceGrid,
    to_lps: Array,
    volume: npt.NDArray[np.generic],
    samples: Mapping[int, npt.NDArray[np.generic]],
    match: AxisMatch,
) -> ImageCheck:
    shape = volume.shape
    dims = grid.shape
    names = ("columns", "rows", "slices")
    for j, (i, _) in enumerate(match):
        if shape[i] != dims[j]:
            code = "convert.slice_count" if j == 2 else "convert.matrix"
            return _fail(
                code,
                f"the image has {shape[i]} {names[j]} along axis {'ijk'[i]}, the DICOM "
                f"{dims[j]}" + (f" ({len(grid.planes)} images)" if j == 2 else ""),
                shape[i],
            )
    # DICOM index (c, r, k) -> image index: each axis kept or reversed
    to_image = np.zeros((4, 4))
    to_image[3, 3] = 1.0
    for j, (i, sign) in enumerate(match):
        to_image[i, j] = sign
        to_image[i, 3] = 0 if sign > 0 else dims[j] - 1
    from_dicom = grid.index_to_lps()
    errors = []
    for corner in product(*((0, n - 1) for n in dims)):
        v = np.array([*corner, 1.0])
        errors.append(float(np.linalg.norm(from_dicom @ v - to_lps @ (to_image @ v))))
    worst = max(errors)
    if worst > POSITION_TOLERANCE_MM:
        zero = np.array([0.0, 0.0, 0.0, 1.0])
        origin_error = float(np.linalg.norm(from_dicom @ zero - to_lps @ (to_image @ zero)))
        spacing_image = [float(np.linalg.norm(to_lps[:3, i])) for i, _ in match]
        spacing_dicom = [grid.spacing[1], grid.spacing[0], float(np.linalg.norm(grid.step))]
        return ImageCheck(
            (
                finding(
                    "convert.geometry",
                    f"voxels lie up to {worst:.2f} mm from where the DICOM puts them: first "
                    f"slice position off by {origin_error:.2f} mm, spacing (column, row, slice) "
                    f"{_mm(spacing_image)} against the DICOM {_mm(spacing_dicom)}",
                    round(worst, 3),
                    f"<= {POSITION_TOLERANCE_MM} mm",
                ),
            ),
            False,
            worst,
            None,
        )
    dicom_values, image_values = [], []
    for slot, pixels in sorted(samples.items()):
        r, c = np.mgrid[0 : grid.rows, 0 : grid.columns]
        v = np.stack([c.ravel(), r.ravel(), np.full(c.size, slot), np.ones(c.size)])
        idx = np.rint(to_image @ v).astype(int)[:3]
        image_values.append(np.asarray(volume[idx[0], idx[1], idx[2]], dtype=np.float64))
        dicom_values.append(np.asarray(pixels, dtype=np.float64).ravel())
    residual = _exact_residual(dicom_values, image_values)
    if residual is not None and residual[0] > residual[1]:
        return ImageCheck(
            (
                finding(
                    "convert.data_mismatch",
                    f"the voxels of slice(s) {sorted(samples)} differ from the DICOM pixels at "
                    f"the same position by up to {residual[0]:.3g} (after rescale): the image is "
                    "flipped, shifted or holds other pixels",
                    round(residual[0], 3),
                    f"<= {residual[1]:.3g}",
                ),
            ),
            False,
            worst,
            residual[0],
        )
    return ImageCheck((), False, worst, residual[0] if residual else None)


def _mm(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def _fit(d: Array, n: Array) -> tuple[float, float]:
    """Least-squares ``n ~ a * d + b``; (1, 0) when ``d`` is constant."""
    spread = float(np.var(d))
    if spread <= 0:
        return 1.0, 0.0
    a = float(np.mean((d - d.mean()) * (n - n.mean())) / spread)
    return a, float(n.mean() - a * d.mean())


def _exact_residual(dicom: Sequence[Array], image: Sequence[Array]) -> tuple[float, float] | None:
    """(largest residual of the image values against a linear rescale of the DICOM values,
    allowed residual), or None without samples. A negative scale counts as a mismatch."""
    if not dicom:
        return None
    d, n = np.concatenate(dicom), np.concatenate(image)
    a, b = _fit(d, n)
    allowed = 0.51 * abs(a) + 1e-3 * float(np.ptp(n))  # a converter may round to integers
    if a <= 0:
        return float(np.max(np.abs(n - d))), allowed
    return float(np.max(np.abs(n - (a * d + b)))), allowed


def _check_resampled(
    grid: SliceGrid,
    to_lps: Array,
    volume: npt.NDArray[np.generic],
    samples: Mapping[int, npt.NDArray[np.generic]],
    match: AxisMatch,
) -> ImageCheck:
    """A tilted series resampled onto an orthogonal grid: DICOM spacing, slice planes and slice
    count; voxel values compared after interpolation."""
    from scipy.ndimage import map_coordinates

    shape = volume.shape
    (ic, _), (ir, _), (ik, _) = match
    if shape[ik] != grid.count:
        return _fail(
            "convert.slice_count",
            f"the image has {shape[ik]} slices, the DICOM {grid.count}",
            shape[ik],
        )
    spacing = [float(np.linalg.norm(to_lps[:3, i])) for i in (ic, ir, ik)]
    wanted = [grid.spacing[1], grid.spacing[0], grid.slice_spacing]
    extent = [shape[ic] - 1, shape[ir] - 1, shape[ik] - 1]
    spread = max(abs(s - w) * n for s, w, n in zip(spacing, wanted, extent, strict=True))
    from_lps = np.linalg.inv(to_lps)
    from_dicom = grid.index_to_lps()
    # each DICOM slice plane must be an image slice plane
    ends = [from_lps @ from_dicom @ np.array([0.0, 0.0, k, 1.0]) for k in (0, grid.count - 1)]
    off_plane = max(abs(e[ik] - round(e[ik])) * spacing[2] for e in ends)
    if spread > POSITION_TOLERANCE_MM or off_plane > POSITION_TOLERANCE_MM:
        return ImageCheck(
            (
                finding(
                    "convert.geometry",
                    f"resampled image: spacing (column, row, slice) {_mm(spacing)} against the "
                    f"DICOM {_mm(wanted)}, DICOM slice planes {off_plane:.2f} mm off the image "
                    "slices",
                    round(max(spread, off_plane), 3),
                    f"<= {POSITION_TOLERANCE_MM} mm",
                ),
            ),
            True,
            max(spread, off_plane),
            None,
        )
    dicom_values, image_values = [], []
    inside_total = outside = 0
    for slot, pixels in sorted(samples.items()):
        r, c = np.mgrid[0 : grid.rows, 0 : grid.columns]
        v = np.stack([c.ravel(), r.ravel(), np.full(c.size, slot), np.ones(c.size)])
        idx = (from_lps @ from_dicom @ v)[:3]
        inside = np.all((idx > -0.5) & (idx < np.array(shape)[:, None] - 0.5), axis=0)
        outside += int(np.count_nonzero(~inside))
        inside_total += int(np.count_nonzero(inside))
        values = map_coordinates(
            np.asarray(volume, dtype=np.float64), idx[:, inside], order=1, mode="nearest"
        )
        image_values.append(values)
        dicom_values.append(np.asarray(pixels, dtype=np.float64).ravel()[inside])
    if outside > 0.05 * max(inside_total + outside, 1):
        return ImageCheck(
            (
                finding(
                    "convert.geometry",
                    f"resampled image: {outside} of {inside_total + outside} DICOM pixel centres "
                    "lie outside the image",
                    outside,
                ),
            ),
            True,
            None,
            None,
        )
    if not dicom_values:
        return ImageCheck((), True, None, None)
    d, n = np.concatenate(dicom_values), np.concatenate(image_values)
    a, b = _fit(d, n)
    scale = float(np.std(n)) or 1.0
    nrmse = float(np.sqrt(np.mean((n - (a * d + b)) ** 2))) / scale
    if a <= 0 or nrmse > RESAMPLED_MAX_NRMSE:
        return ImageCheck(
            (
                finding(
                    "convert.data_mismatch",
                    f"the resampled voxels of slice(s) {sorted(samples)} do not follow the DICOM "
                    f"pixels at the same position (relative RMS residual {nrmse:.2f}): the "
                    "image is flipped, shifted or not corrected for the tilt",
                    round(nrmse, 3),
                    f"<= {RESAMPLED_MAX_NRMSE}",
                ),
            ),
            True,
            None,
            nrmse,
        )
    return ImageCheck((), True, None, nrmse)


def sample_slots(grid: SliceGrid, count: int = 3) -> list[int]:
    """Slots of present slices to compare voxels on: spread through the stack (quarter, middle,
    three quarters for three), never the ends (often empty) unless the stack is short."""
    present = list(grid.slots)
    if len(present) <= count:
        return present
    picks = {present[round((i + 1) * (len(present) - 1) / (count + 1))] for i in range(count)}
    return sorted(picks)
