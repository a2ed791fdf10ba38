"""Per-subject anatomy: size, shape, atrophy, and rendering onto a scanner's sampling grid.

Pure compute on arrays: the head model comes in, sampled images and label maps go out.
A subject is the head model scaled (head size), warped by a smooth random displacement field
(shape) and, for the dementia group, with a known fraction of brain tissue turned into CSF at the
tissue boundaries (sulcal widening, ventricular enlargement). A study places that head in the
scanner (rotation, translation). Every image is sampled by mapping each output voxel back into the
model, so the ground-truth label map of a study is sampled through exactly the same mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cohortflow.models.geometry import LPS_FROM_RAS
from cohortflow.models.volumes import Volumes
from cohortflow.pipelines.atlas.headmodel import (
    CSF,
    GM,
    WM,
    HeadModel,
    tissue_image,
    tissue_volumes_ml,
)

FloatArray = npt.NDArray[np.float32]

__all__ = ["tissue_image"]  # rendering labels as an image lives with the atlas

_WARP_NODES = 6  # control points per axis of the smooth warp
_WARP_EXTENT_MM = 130.0  # the warp grid spans +-130 mm around the head centre


@dataclass(frozen=True)
class Grid:
    """A DICOM-style sampling grid.

    Voxel (k, r, c) sits at origin + k*dz*normal + r*dr*col + c*dc*row.

    ``row_dir`` and ``col_dir`` are the two ImageOrientationPatient vectors (LPS), ``origin`` the
    ImagePositionPatient of the first slice, ``spacing`` (dz, dr, dc) in mm.
    """

    shape: tuple[int, int, int]  # slices, rows, columns
    origin: npt.NDArray[np.float64]
    row_dir: npt.NDArray[np.float64]
    col_dir: npt.NDArray[np.float64]
    spacing: tuple[float, float, float]

    @property
    def normal(self) -> npt.NDArray[np.float64]:
        n = np.cross(self.row_dir, self.col_dir)
        return np.asarray(n / np.linalg.norm(n), dtype=np.float64)

    def index_to_lps(self) -> npt.NDArray[np.float64]:
        """4x4 matrix taking (k, r, c, 1) to LPS millimetres."""
        dz, dr, dc = self.spacing
        m = np.eye(4)
        m[:3, 0] = self.normal * dz
        m[:3, 1] = self.col_dir * dr
        m[:3, 2] = self.row_dir * dc
        m[:3, 3] = self.origin
        return m

    def slice_position(self, k: float) -> npt.NDArray[np.float64]:
        return np.asarray(self.origin + k * self.spacing[0] * self.normal, dtype=np.float64)


def centred_grid(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    row_dir: tuple[float, float, float],
    col_dir: tuple[float, float, float],
    centre: npt.NDArray[np.float64] | None = None,
) -> Grid:
    """A grid whose centre lies at ``centre`` (LPS, default the isocentre)."""
    r = np.asarray(row_dir, float)
    c = np.asarray(col_dir, float)
    n = np.cross(r, c)
    ns, nr, nc = shape
    dz, dr, dc = spacing
    mid = np.zeros(3) if centre is None else centre
    origin = mid - n * dz * (ns - 1) / 2 - c * dr * (nr - 1) / 2 - r * dc * (nc - 1) / 2
    return Grid(shape=shape, origin=origin, row_dir=r, col_dir=c, spacing=spacing)


@dataclass(frozen=True)
class SubjectShape:
    """Head size and shape of one subject (constant across the subject's studies)."""

    scale: tuple[float, float, float]  # per LPS axis, relative to the model
    warp: npt.NDArray[np.float32]  # (3, n, n, n) displacement control points, model mm
    atrophy_order: npt.NDArray[
        np.int64
    ]  # flat model indices of brain voxels, most vulnerable first
    centre: npt.NDArray[np.float64]  # LPS mm of the model's intracranial centroid
    half_extent: npt.NDArray[np.float64]  # LPS half-size (mm) of the model's intracranial box


@dataclass(frozen=True)
class Placement:
    """Where a study puts the head in the scanner."""

    rotation: npt.NDArray[np.float64]  # 3x3, LPS
    translation: npt.NDArray[np.float64]  # mm, LPS


def sample_shape(
    model: HeadModel,
    rng: np.random.Generator,
    target_icv_ml: float,
    warp_sd_mm: float = 2.0,
    warp_nodes: int = _WARP_NODES,
) -> SubjectShape:
    """Draw a subject: isotropic size for ``target_icv_ml``, a little anisotropy, a smooth warp
    (``warp_nodes`` control points per axis, displacements of ``warp_sd_mm``)."""
    model_icv = len(model.icv_voxels) * model.voxel_ml
    iso = (target_icv_ml / model_icv) ** (1.0 / 3.0)
    aniso = rng.normal(0.0, 0.025, size=3)
    aniso -= aniso.mean()  # anisotropy changes shape, not size
    sx, sy, sz = (float(iso * np.exp(a)) for a in aniso)
    scale = (sx, sy, sz)
    warp = rng.normal(0.0, warp_sd_mm, size=(3, warp_nodes, warp_nodes, warp_nodes))
    warp[:, [0, -1], :, :] = 0  # no displacement at the border of the warp grid
    warp[:, :, [0, -1], :] = 0
    warp[:, :, :, [0, -1]] = 0
    # Vulnerability to atrophy: partial-volume tissue at CSF borders first, with a smooth
    # random modulation so that every subject loses tissue in its own places.
    brain = model.brain_flat
    noise = ndimage.zoom(
        rng.normal(size=(12, 16, 16)).astype(np.float32),
        np.array(model.labels.shape) / np.array((12, 16, 16)),
        order=1,
    )[: model.labels.shape[0], : model.labels.shape[1], : model.labels.shape[2]]
    score = model.tissue.ravel()[brain] + 0.08 * noise.ravel()[brain]
    order = brain[np.argsort(score, kind="stable")]
    centre, half = _icv_frame(model)
    return SubjectShape(
        scale=scale,
        warp=warp.astype(np.float32),
        atrophy_order=order,
        centre=centre,
        half_extent=half,
    )


def _icv_frame(model: HeadModel) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    idx = model.icv_voxels
    to_lps = LPS_FROM_RAS @ model.affine
    centre = (to_lps @ np.append(idx.mean(axis=0), 1.0))[:3]
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    corners = np.array(
        [[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
    )
    half = np.abs((to_lps @ corners.T)[:3].T - centre).max(axis=0)
    return np.asarray(centre, np.float64), np.asarray(half, np.float64)


def sample_placement(
    rng: np.random.Generator, max_deg: float = 6.0, max_mm: float = 8.0
) -> Placement:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Placement(rotation=rz @ ry @ rx, translation=rng.uniform(-max_mm, max_mm, size=3))


IDENTITY_PLACEMENT = Placement(rotation=np.eye(3), translation=np.zeros(3))


def atrophied_labels(
    model: HeadModel, shape: SubjectShape, fraction: float
) -> npt.NDArray[np.uint8]:
    """The model's labels with ``fraction`` of the brain (GM + WM) turned into CSF."""
    labels = model.labels.copy()
    n = round(fraction * shape.atrophy_order.size)
    labels.ravel()[shape.atrophy_order[:n]] = CSF
    return labels


def warp_coordinates(model: HeadModel, shape: SubjectShape, coarse: int = 4) -> FloatArray:
    """Where each model voxel samples the model under the subject's smooth warp: x + w(x).

    Computed once per subject; the warp varies over centimetres, so it is evaluated every
    ``coarse`` voxels and interpolated linearly in between.
    """
    dims = model.labels.shape
    to_lps = LPS_FROM_RAS @ model.affine
    to_vox = np.linalg.inv(to_lps)
    axes = [np.linspace(0, n - 1, max(2, -(-n // coarse) + 1)) for n in dims]
    ii, jj, kk = np.meshgrid(*axes, indexing="ij")
    pts = np.stack([ii, jj, kk, np.ones_like(ii)]).reshape(4, -1)
    rel = (to_lps @ pts)[:3] - shape.centre[:, None]
    node = (rel + _WARP_EXTENT_MM) / (2 * _WARP_EXTENT_MM) * (shape.warp.shape[1] - 1)
    disp_lps = np.stack(
        [ndimage.map_coordinates(shape.warp[i], node, order=3, mode="nearest") for i in range(3)]
    )
    disp_vox = (to_vox[:3, :3] @ disp_lps).reshape(3, *ii.shape)
    coords = np.empty((3, *dims), np.float32)
    for a in range(3):
        up = ndimage.zoom(
            disp_vox[a].astype(np.float32),
            [d / c for d, c in zip(dims, ii.shape, strict=True)],
            order=1,
        )
        base = np.arange(dims[a], dtype=np.float32).reshape([-1 if b == a else 1 for b in range(3)])
        coords[a] = up[: dims[0], : dims[1], : dims[2]] + base
    return coords


def warp_volume(
    volume: npt.NDArray[np.generic], coords: FloatArray, order: int
) -> npt.NDArray[np.generic]:
    """The model-grid ``volume`` under the subject's warp (order 0 for labels)."""
    return np.asarray(ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=0))


def grid_to_model_affine(
    model: HeadModel, shape: SubjectShape, placement: Placement, grid: Grid
) -> npt.NDArray[np.float64]:
    """4x4 matrix from grid indices (k, r, c) to (warped) model voxel indices.

    p (scanner LPS) -> u = R^T (p - t) (head frame) -> v = u / s -> model LPS v + centre.
    """
    to_model_vox = np.linalg.inv(LPS_FROM_RAS @ model.affine)
    inv_scale = np.diag([1.0 / x for x in shape.scale] + [1.0])
    unplace = np.eye(4)
    unplace[:3, :3] = placement.rotation.T
    unplace[:3, 3] = -placement.rotation.T @ placement.translation
    shift = np.eye(4)
    shift[:3, 3] = shape.centre
    return np.asarray(to_model_vox @ shift @ inv_scale @ unplace @ grid.index_to_lps())


def sample_grid(
    warped: npt.NDArray[np.generic],
    model: HeadModel,
    shape: SubjectShape,
    placement: Placement,
    grid: Grid,
    order: int,
) -> npt.NDArray[np.generic]:
    """Sample a warped model-grid volume onto a scanner grid (an affine resampling)."""
    m = grid_to_model_affine(model, shape, placement, grid)
    return np.asarray(
        ndimage.affine_transform(
            warped,
            m[:3, :3],
            offset=m[:3, 3],
            output_shape=grid.shape,
            order=order,
            mode="constant",
            cval=0,
        )
    )


def within_model(
    grid: Grid, model: HeadModel, shape: SubjectShape, placement: Placement, keep: float = 0.5
) -> Grid:
    """``grid`` cut to where it sees the model: its first and last slices, rows and columns
    are those at least ``keep`` of whose voxels (relative to the fullest such plane) fall inside
    the model's box.

    A model whose image ends at the skull base (Colin27: its box stops below the nose) would
    otherwise be scanned with air where a real head has its jaw and neck; a real scan ends at
    the edge of its field of view instead.
    """
    inside = sample_grid(np.ones(model.labels.shape, np.uint8), model, shape, placement, grid, 0)
    start, stop = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        fraction = np.asarray(inside, dtype=np.float32).mean(axis=others)
        planes = np.flatnonzero(fraction >= keep * float(fraction.max()))
        start.append(int(planes[0]))
        stop.append(int(planes[-1]) + 1)
    dz, dr, dc = grid.spacing
    origin = (
        grid.origin
        + start[0] * dz * grid.normal
        + start[1] * dr * grid.col_dir
        + start[2] * dc * grid.row_dir
    )
    return replace(
        grid, shape=(stop[0] - start[0], stop[1] - start[1], stop[2] - start[2]), origin=origin
    )


def bias_field(
    shape: tuple[int, int, int], rng: np.random.Generator, amplitude: float
) -> FloatArray:
    """Smooth multiplicative intensity non-uniformity: exp of a low-order cosine field."""
    axes = [np.linspace(0.0, np.pi, n, dtype=np.float32) for n in shape]
    log_field = np.zeros(shape, np.float32)
    for i in range(3):
        for j in range(3):
            for k in range(3):
                if 0 < i + j + k <= 2:
                    coef = np.float32(rng.normal(0.0, amplitude))
                    log_field += (
                        coef
                        * np.cos(i * axes[0])[:, None, None]
                        * np.cos(j * axes[1])[None, :, None]
                        * np.cos(k * axes[2])[None, None, :]
                    )
    return np.exp(log_field)


#: Correlation length (Gaussian sigma) of the tissue texture.
TEXTURE_SIGMA_MM = 2.0


def model_spacing(model: HeadModel) -> tuple[float, float, float]:
    """Voxel size (mm) of the model grid along its three axes."""
    sx, sy, sz = (float(v) for v in np.sqrt((model.affine[:3, :3] ** 2).sum(axis=0)))
    return sx, sy, sz


def texture_gain(
    shape: tuple[int, ...],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    sd: float,
    sigma_mm: float = TEXTURE_SIGMA_MM,
) -> FloatArray:
    """Tissue texture as a multiplicative gain, ``1 + sd * n``: ``n`` is white noise smoothed by a
    Gaussian of ``sigma_mm`` and scaled to unit variance, so classes are not flat (real tissue
    varies within a class: myelination, iron, vessels, partial volume below the voxel size)."""
    noise = rng.standard_normal(size=shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(noise, [sigma_mm / s for s in spacing])
    smooth /= np.float32(smooth.std())
    return np.asarray(1.0 + np.float32(sd) * smooth, dtype=np.float32)


def textured(image: FloatArray, labels: npt.NDArray[np.uint8], gain: FloatArray) -> FloatArray:
    """``image`` with its intracranial voxels (CSF, GM, WM of ``labels``) multiplied by ``gain``
    (``texture_gain``); the head outside keeps the template's own intensities."""
    out = image.copy()
    inside = np.isin(labels, (CSF, GM, WM))
    out[inside] *= gain[inside]
    return out


def rician(image: FloatArray, sigma: float, rng: np.random.Generator) -> FloatArray:
    """Magnitude of the image plus complex Gaussian noise (Rician noise)."""
    re = image + np.float32(sigma) * rng.standard_normal(size=image.shape, dtype=np.float32)
    im = np.float32(sigma) * rng.standard_normal(size=image.shape, dtype=np.float32)
    return np.asarray(np.sqrt(re * re + im * im), dtype=np.float32)


def motion_ghosts(
    image: FloatArray,
    rng: np.random.Generator,
    corrupted_fraction: float = 0.3,
    max_shift: float = 4.0,
) -> FloatArray:
    """Rigid in-plane motion during acquisition: a fraction of the phase-encoding lines of every
    slice is acquired with the head shifted, which ghosts the image along the phase direction."""
    spectrum = np.fft.fft(image.astype(np.complex64), axis=1)
    n = int(image.shape[1])
    lines = rng.random(n) < corrupted_fraction
    shifts = rng.uniform(-max_shift, max_shift, size=n) * lines
    freqs = np.fft.fftfreq(image.shape[2])
    # each corrupted ky line sees the object translated along the readout axis
    phase = np.exp(-2j * np.pi * shifts[:, None] * freqs[None, :] * 1.0).astype(np.complex64)
    spectrum_2d = np.fft.fft(spectrum, axis=2) * phase[None, :, :]
    out = np.abs(np.fft.ifft(np.fft.ifft(spectrum_2d, axis=2), axis=1))
    return out.astype(np.float32)


def truth_volumes(labels: npt.NDArray[np.uint8], voxel_ml: float) -> Volumes:
    tissue = tissue_volumes_ml(labels, voxel_ml)
    csf, gm, wm = tissue["csf"], tissue["gm"], tissue["wm"]
    icv = csf + gm + wm
    return Volumes(
        icv_ml=round(icv, 3),
        gm_ml=round(gm, 3),
        wm_ml=round(wm, 3),
        csf_ml=round(csf, 3),
        brain_ml=round(gm + wm, 3),
        bpf=round((gm + wm) / icv, 5),
    )


def truth_grid(shape: SubjectShape) -> Grid:
    """A 1 mm isotropic axial grid in the head frame that holds the subject's intracranial space
    (the model's intracranial box scaled to the subject, plus a margin wider than the warp)."""
    half = shape.half_extent * np.array(shape.scale) + 12.0
    dims = tuple(int(np.ceil(2 * h)) for h in half)
    return centred_grid((dims[2], dims[1], dims[0]), (1.0, 1.0, 1.0), (1, 0, 0), (0, 1, 0))
