"""The skin surface of a head, rendered as defacing reviewers look at it, and a face detector
that does not use the defacing template.

``depths`` casts level rays through the head from the front, the front left (three-quarter) or
the left and keeps the first skin voxel each ray meets; ``shade`` lights that depth map from the
viewer: the 3D surface render defacing reviewers look at, since a face is recognised from the
surface (Schwarz et al., NEJM 2019, recognised faces from
such renders). ``nose_protrusion`` measures the face profile on the same surface: a check of
residual facial features that owes nothing to the template the face was removed with. (A Haar
face detector was tried on the renders: it found a "face" on the defaced head too, with a higher
score than on the intact one, so it decides nothing.) Arrays in, arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

#: render grid (mm): fine enough for eyes and lips, a 256 mm head in 256 pixels
RENDER_MM = 1.0
#: the views: the viewer's azimuth around the head (degrees), from the front towards the
#: patient's left; the rays run level (perpendicular to LPS z)
VIEWS = {
    "front": 0.0,  # the face; the patient's right on the viewer's left
    "front_left": 45.0,  # three-quarter: the face and the left ear
    "left": 90.0,  # the profile from the patient's left: the face to the viewer's left
}


def head_mask(values: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.bool_]:
    """The head (skin and everything inside) of a resampled volume: above half of Otsu's
    threshold (scalp fat and skin are bright in a T1, dim in other weightings), holes filled,
    specks of noise removed."""
    from skimage.filters import threshold_otsu

    smooth = ndimage.gaussian_filter(values, 1.0)
    level = float(threshold_otsu(smooth[::2, ::2, ::2]))
    mask = smooth > 0.5 * level
    mask = ndimage.binary_opening(mask, iterations=1)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]  # ndimage.sum: 10x slower
        mask = labels == (1 + int(np.argmax(sizes)))
    return np.asarray(mask, dtype=bool)


def to_lps_grid(
    volume: npt.NDArray[np.generic], index_to_lps: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """``volume`` resampled onto a RENDER_MM grid whose axes are LPS (x: to the left, y: to the
    back, z: up): the same picture whatever the acquisition plane. Returns the grid and the LPS
    point of its voxel (0, 0, 0)."""
    shape = np.asarray(volume.shape, dtype=np.float64)
    corners = np.array(
        [
            [a, b, c, 1.0]
            for a in (0, shape[0] - 1)
            for b in (0, shape[1] - 1)
            for c in (0, shape[2] - 1)
        ]
    )
    lps = (index_to_lps @ corners.T)[:3]
    low, high = lps.min(axis=1), lps.max(axis=1)
    size = np.ceil((high - low) / RENDER_MM).astype(int) + 1
    size = np.minimum(size, 400)  # a whole-body field of view is still bounded
    # ITK's linear resampling: 5 times scipy's affine_transform on a 1 mm head (0.4 s against
    # 2.1 s), the same values inside the volume (to 1e-4); outside its edge both give 0
    import SimpleITK as sitk

    linear = index_to_lps[:3, :3]
    spacing = np.sqrt((linear**2).sum(axis=0))
    # ITK's image index (i, j, k) is the array's reversed axes
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume, np.float32).T))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (linear / spacing).ravel()])
    image.SetOrigin([float(v) for v in index_to_lps[:3, 3]])
    grid = sitk.Resample(
        image,
        [int(s) for s in size],
        sitk.Transform(),
        sitk.sitkLinear,
        [float(v) for v in low],
        [RENDER_MM] * 3,
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        0.0,
        sitk.sitkFloat32,
    )
    sampled = np.ascontiguousarray(sitk.GetArrayFromImage(grid).T)
    return sampled, low


@dataclass(frozen=True)
class FrontSkin:
    """The skin of the head's front on an LPS grid: per column (x) and level (z), where (LPS y,
    mm) a ray from in front of the face first meets the head."""

    first_y: npt.NDArray[np.float64]  # (x, z); +inf where the ray meets no head
    low: npt.NDArray[np.float64]  # the LPS point of grid voxel (0, 0, 0)

    def depth(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """How far behind the skin of the front each LPS point (an array (3, ...)) lies, along
        the front-back axis (mm; negative in front of the skin, -inf where no head is in front
        of it, NaN outside the grid: unknown)."""
        x = np.rint((points[0] - self.low[0]) / RENDER_MM)
        z = np.rint((points[2] - self.low[2]) / RENDER_MM)
        inside = (x >= 0) & (x < self.first_y.shape[0]) & (z >= 0) & (z < self.first_y.shape[1])
        first = np.full(points.shape[1:], np.nan)
        first[inside] = self.first_y[x[inside].astype(np.int64), z[inside].astype(np.int64)]
        return np.asarray(points[1] - first, dtype=np.float64)


def front_skin(head: npt.NDArray[np.bool_], low: npt.NDArray[np.float64]) -> FrontSkin:
    """The front skin of ``head`` (a mask on the LPS grid of ``to_lps_grid``, whose voxel
    (0, 0, 0) lies at ``low``): LPS y grows backwards, so a ray from the front runs along +y."""
    hit = head.any(axis=1)  # (x, z)
    first = np.where(hit, head.argmax(axis=1) * RENDER_MM + float(low[1]), np.inf)
    return FrontSkin(np.asarray(first, dtype=np.float64), np.asarray(low, dtype=np.float64))


@dataclass(frozen=True)
class Depth:
    """What a viewer sees of a head: per pixel (rows superior first, columns to the viewer's
    right), how far the first head voxel on its ray lies (mm from the nearest corner of the
    grid's box, so that two heads on one grid are comparable), and whether the ray met one."""

    depth: npt.NDArray[np.float64]
    hit: npt.NDArray[np.bool_]


def depths(head: npt.NDArray[np.bool_], views: tuple[str, ...] = tuple(VIEWS)) -> dict[str, Depth]:
    """The skin of ``head`` (a mask on an LPS grid) seen from each of ``views``: its shell (two
    voxels deep, so that an oblique view has no gaps) projected onto the view's plane, the
    nearest voxel kept per pixel. The picture's frame is the grid's box: the same for every
    head on that grid."""
    shell = head & ~ndimage.binary_erosion(head, iterations=2)
    points = np.argwhere(shell).astype(np.float64) * RENDER_MM
    nx, ny, nz = head.shape
    corners = np.array([[a, b] for a in (0, nx - 1) for b in (0, ny - 1)], dtype=np.float64)
    corners *= RENDER_MM
    rows = (nz - 1) - np.rint(points[:, 2] / RENDER_MM).astype(np.intp)  # superior first
    seen = {}
    for view in views:
        azimuth = np.radians(VIEWS[view])
        toward = np.array([-np.sin(azimuth), np.cos(azimuth)])  # the rays (LPS x, y)
        right = np.array([np.cos(azimuth), np.sin(azimuth)])  # the viewer's right
        near, far = (corners @ toward).min(), (corners @ toward).max()
        start = (corners @ right).min()
        width = int(np.ceil(((corners @ right).max() - start) / RENDER_MM)) + 1
        cols = np.rint((points[:, :2] @ right - start) / RENDER_MM).astype(np.intp)
        depth = np.full((nz, width), np.inf)
        np.minimum.at(depth, (rows, cols), points[:, :2] @ toward)
        hit = np.isfinite(depth)
        seen[view] = Depth(np.where(hit, depth, far) - near, hit)
    return seen


def shade(seen: Depth) -> npt.NDArray[np.uint8]:
    """The surface lit from the viewer (Lambert), nearer brighter: a grey picture."""
    depth = ndimage.gaussian_filter(seen.depth / RENDER_MM, 0.7)
    dy, dx = np.gradient(depth)
    lit = 1.0 / np.sqrt(1.0 + dx**2 + dy**2)
    hit = seen.hit
    # nearer is brighter too, so that the profile reads at a glance
    near = 1.0 - 0.5 * (depth - depth[hit].min()) / max(np.ptp(depth[hit]), 1.0) if hit.any() else 0
    picture = np.where(hit, 255.0 * lit * near, 0.0)
    return np.asarray(np.clip(picture, 0, 255), dtype=np.uint8)


def _forward(head: npt.NDArray[np.bool_], x0: int, x1: int) -> npt.NDArray[np.float64]:
    """Per level (z), the most anterior point of the head between columns x0 and x1 (mm,
    larger is further forward; -inf where the rays meet nothing)."""
    band = head[max(0, x0) : max(0, x1)]
    if band.size == 0:
        return np.full(head.shape[2], -np.inf)
    hit = band.any(axis=1)  # (x, z)
    first = np.where(hit, band.argmax(axis=1), np.inf).min(axis=0)
    return np.asarray(-first * RENDER_MM, dtype=np.float64)


def nose_protrusion(head: npt.NDArray[np.bool_], reach_mm: float = 25.0) -> float | None:
    """How far a nose stands out of the face profile (mm), 0 or less where none does.

    A nose is forward of the face above and below it (the nasion, the upper lip, ``reach_mm``
    away) and of the cheeks beside it (30 mm to either side): the measure is the smaller of the
    two, at its largest over the levels 95 to 180 mm below the top of the head where an adult's
    nose lies. A brow ridge or the edge of a defacing cut stands out of the profile but not of
    the cheeks; a chin, further down, stands out of the neck on any head. Measured on real heads
    (tests/test_realdata_heads.py): 14 to 20 mm with the face, none after defacing. None when no
    head is found."""
    if not head.any():
        return None
    top = int(np.nonzero(head.any(axis=(0, 1)))[0].max())
    upper = np.argwhere(head[:, :, max(0, top - round(60 / RENDER_MM)) : top + 1])
    centre = round(float(upper[:, 0].mean()))

    def mm(value: float) -> int:
        return round(value / RENDER_MM)

    middle = _forward(head, centre - mm(8), centre + mm(8) + 1)
    sides = np.maximum(
        _forward(head, centre + mm(22), centre + mm(38) + 1),
        _forward(head, centre - mm(38), centre - mm(22) + 1),
    )
    reach = max(1, mm(reach_mm))
    low = max(reach, top - mm(180.0))
    high = min(len(middle) - reach, top - mm(95.0))
    best: float | None = None
    for z in range(low, high):
        if not np.isfinite(middle[z]):
            continue
        vertical = middle[z] - max(middle[z - reach], middle[z + reach])
        lateral = middle[z] - sides[z]
        value = float(min(vertical, lateral))
        best = value if best is None else max(best, value)
    return best
