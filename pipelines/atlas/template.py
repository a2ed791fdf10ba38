"""The defacing template: pydeface's whole-head mean T1, its face mask, and a brain mask.

- ``mean_reg2mean.nii.gz`` and ``facemask.nii.gz`` are package data of ``pydeface`` (MIT); its
  command needs FSL, which cohortflow does not use: the template is registered with antspyx.
- The intracranial mask on the same grid is the whole-head atlas built once from nilearn's MNI152
  brain mask registered to that head (``pipelines.atlas.headmodel``, cached in the data folder,
  about a minute on first use). It is what defacing must never touch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cohortflow.models.fits import FitStore
from cohortflow.models.geometry import LPS_FROM_RAS
from cohortflow.pipelines.atlas.building import building
from cohortflow.pipelines.atlas.errors import TemplateError

#: Bits of ``Template.labels``: pydeface's face region, the intracranial mask, the
#: intracranial mask grown by the safety margin (never altered), and the brow extension above
#: the face region (removed only near the subject's own skin: ``masks.brow_near_skin``).
FACE, BRAIN, PROTECT, BROW = 1, 2, 4, 8
#: the labels' layout: part of the cached labels' name (BROW became a bit of its own)
LABELS_VERSION = 2
#: the centre of the left eye on pydeface's mean head (template LPS millimetres, read off its
#: image; the right eye lies at x = -32): the deface review sheet's planes pass through it
LEFT_EYE_LPS = (32.0, -68.0, -36.0)


@dataclass(frozen=True)
class Template:
    """The template head's path and its label bits on the head's grid (voxel order i, j, k)."""

    head_path: Path
    head: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8]
    index_to_lps: npt.NDArray[np.float64]
    digest: str
    #: where fits to this template are kept by content (``fit_affine``); None: always fitted
    fits: FitStore | None = None

    def keeping_fits(self, folder: Path) -> Template:
        """This template with its fits kept in ``folder`` (``Settings.fits``)."""
        return replace(self, fits=FitStore(folder))

    @property
    def lps_to_index(self) -> npt.NDArray[np.float64]:
        return np.asarray(np.linalg.inv(self.index_to_lps), dtype=np.float64)


#: The brow extension reaches up in front of the forehead only: no further back than this behind
#: the intracranial space's most anterior point (the temples and the scalp above stay) ...
BROW_DEPTH_MM = 30.0
#: ... and no nearer to the intracranial space than this: the eyebrows lie in front of the
#: frontal bone and sinus. With the 4 mm margin alone, one voxel of a post-contrast T1 of the
#: test cohort (its planes sampled apart from the fitted T1's) changed inside the skull. A
#: template margin alone does not hold where the fit is off: on a real Siemens Trio head (fit
#: r 0.66) the brow took 7 voxels at the edge of ROBEX's brain mask at the frontal pole; the
#: subject's own skin now bounds it too (``masks.brow_near_skin``).
BROW_BRAIN_MARGIN_MM = 10.0


@lru_cache(maxsize=2)
def load_template(
    cache_dir: Path, margin_mm: float, face_margin_mm: float, brow_mm: float = 0.0
) -> Template:
    """Load pydeface's template and the cached brain mask (building it on first use); grow the
    face region by ``face_margin_mm``, and ``brow_mm`` upwards in front of the forehead, and
    the protected intracranial mask by ``margin_mm``. Kept per process (a flow worker defaces
    many studies); its arrays are read-only."""
    head_img, brain, digest = _parts(cache_dir)
    face_img: Any = nib.load(_data("facemask.nii.gz"))
    keep = np.asarray(face_img.dataobj, dtype=np.float32)
    if brain.shape != keep.shape:
        raise TemplateError(
            f"the head model in {cache_dir} has shape {brain.shape}, pydeface's face "
            f"mask {keep.shape}: delete the cached head model to rebuild it"
        )
    # the dilations take about 10 s: kept beside the head model, per model and margins
    margins = f"{margin_mm:g}-{face_margin_mm:g}-{brow_mm:g}-{BROW_BRAIN_MARGIN_MM:g}"
    stored = cache_dir / f"deface-labels-v{LABELS_VERSION}-{digest[:16]}-{margins}.npy"
    labels = _stored_labels(stored, brain.shape)
    if labels is None:
        with building(stored):
            labels = _stored_labels(stored, brain.shape)
            if labels is None:
                affine = np.asarray(head_img.affine, dtype=np.float64)
                labels = compose_labels(
                    keep < 0.5, brain, affine, margin_mm, face_margin_mm, brow_mm
                )
                temporary = stored.with_name(f".{stored.name}.{os.getpid()}.tmp.npy")
                np.save(temporary, labels)
                os.replace(temporary, stored)  # whole or absent
    return _template(head_img, labels, digest)


def _stored_labels(stored: Path, shape: tuple[int, ...]) -> npt.NDArray[np.uint8] | None:
    """The labels kept in ``stored``; None when absent or not of the head model's grid."""
    try:
        labels = np.load(stored)
    except (OSError, ValueError):
        return None
    if labels.shape != shape or labels.dtype != np.uint8:
        return None
    return np.asarray(labels)


@lru_cache(maxsize=2)
def load_brain_template(cache_dir: Path) -> Template:
    """The template with its intracranial mask only (BRAIN): what QC and volumetry place on a
    head. Skips the face and margin dilations, which take most of :func:`load_template`'s time."""
    head_img, brain, digest = _parts(cache_dir)
    return _template(head_img, np.where(brain, BRAIN, 0).astype(np.uint8), digest)


def _data(name: str) -> Path:
    path = Path(str(resources.files("pydeface") / "data" / name))
    if not path.is_file():
        raise TemplateError(f"{path} not found: install the package pydeface")
    return path


def _parts(cache_dir: Path) -> tuple[Any, npt.NDArray[np.bool_], str]:
    """pydeface's head image, the cached intracranial mask on its grid, the model's digest."""
    from cohortflow.pipelines.atlas.headmodel import CSF, GM, WM, load_or_build

    head_img = nib.load(_data("mean_reg2mean.nii.gz"))
    model = load_or_build(cache_dir)
    return head_img, np.isin(model.labels, (CSF, GM, WM)), model.digest


def _template(head_img: Any, labels: npt.NDArray[np.uint8], digest: str) -> Template:
    affine = np.asarray(head_img.affine, dtype=np.float64)
    head = np.asarray(head_img.dataobj, dtype=np.float32)
    head.flags.writeable = False  # shared by every caller in the process (cached)
    labels.flags.writeable = False
    return Template(
        head_path=Path(head_img.get_filename()),
        head=head,
        labels=labels,
        index_to_lps=LPS_FROM_RAS @ affine,
        digest=digest,
    )


def compose_labels(
    face: npt.NDArray[np.bool_],
    brain: npt.NDArray[np.bool_],
    affine: npt.NDArray[np.float64],
    margin_mm: float,
    face_margin_mm: float,
    brow_mm: float,
) -> npt.NDArray[np.uint8]:
    """The label bits from pydeface's face region and the intracranial mask (pure): the face
    grown by ``face_margin_mm`` (FACE); above it, ``brow_mm`` higher in front of the forehead
    and no nearer to the intracranial space than ``BROW_BRAIN_MARGIN_MM``, the brow (BROW);
    the intracranial mask (BRAIN), and that mask grown by ``margin_mm`` (PROTECT, never
    altered)."""
    voxel = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    protect = _grow(brain, margin_mm, voxel)
    removed = _grow(face, face_margin_mm, voxel)
    far = ~_grow(brain, max(margin_mm, BROW_BRAIN_MARGIN_MM), voxel)
    brow = _brow(removed, brain, affine, brow_mm) & far & ~removed
    labels = np.where(removed, FACE, 0).astype(np.uint8)
    labels |= np.where(brow, BROW, 0).astype(np.uint8)
    labels |= np.where(brain, BRAIN, 0).astype(np.uint8)
    labels |= np.where(protect, PROTECT, 0).astype(np.uint8)
    return labels


def _brow(
    face: npt.NDArray[np.bool_],
    brain: npt.NDArray[np.bool_],
    affine: npt.NDArray[np.float64],
    mm: float,
) -> npt.NDArray[np.bool_]:
    """Voxels up to ``mm`` above the face region (along the voxel axis nearest to superior),
    no further back than ``BROW_DEPTH_MM`` behind the front of the intracranial space."""
    if mm <= 0:
        return np.zeros_like(face)
    up = int(np.argmax(np.abs(affine[2, :3])))
    step = float(np.sqrt((affine[:3, up] ** 2).sum()))
    reach = max(1, round(mm / step))
    sign = 1 if affine[2, up] > 0 else -1
    above = np.zeros_like(face)
    for shift in range(1, reach + 1):  # a voxel `shift` steps above a face voxel
        source = [slice(None)] * 3
        target = [slice(None)] * 3
        if sign > 0:
            source[up], target[up] = slice(0, -shift), slice(shift, None)
        else:
            source[up], target[up] = slice(shift, None), slice(0, -shift)
        above[tuple(target)] |= face[tuple(source)]
    i, j, k = (np.arange(n, dtype=np.float32) for n in face.shape)
    anterior = (
        affine[1, 0] * i[:, None, None]
        + affine[1, 1] * j[None, :, None]
        + affine[1, 2] * k[None, None, :]
        + affine[1, 3]
    )  # RAS y of every voxel
    front = float(anterior[brain].max())
    return np.asarray(above & (anterior >= front - BROW_DEPTH_MM), dtype=bool)


def _grow(
    mask: npt.NDArray[np.bool_], mm: float, voxel: npt.NDArray[np.float64]
) -> npt.NDArray[np.bool_]:
    """Dilate by a ball of ``mm`` millimetres (an ellipsoid in voxels of size ``voxel``).

    Only the mask's bounding box grown by the radius can change, and only it is dilated: the
    same voxels as over the whole volume, in a third of the time for the intracranial mask
    (the three dilations of ``compose_labels`` took 45 s over pydeface's whole grid)."""
    if mm <= 0:
        return mask
    radius = np.maximum(1, np.round(mm / voxel)).astype(int)
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    ball = sum((g / max(r, 1)) ** 2 for g, r in zip(grid, radius, strict=True)) <= 1.0
    grown = np.zeros(mask.shape, dtype=bool)
    where = np.argwhere(mask)
    if not len(where):
        return grown
    box = tuple(
        slice(max(0, int(lo) - int(r)), min(n, int(hi) + int(r) + 1))
        for lo, hi, r, n in zip(
            where.min(axis=0), where.max(axis=0), radius, mask.shape, strict=True
        )
    )
    grown[box] = ndimage.binary_dilation(mask[box], structure=ball)
    return grown
