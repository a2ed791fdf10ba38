"""A second whole-head model with known tissue labels, from one person's head instead of the atlas.

The head model of ``headmodel.py`` is composed from the very templates our methods register
(pydeface's mean head for defacing, the MNI152 maps for volumetry), so synthetic heads drawn from
it flatter those methods. This one is made from Colin27 (Debian's ``mricron-data``): one man's
T1 whole head, the average of 27 scans at 1 mm in MNI space, and its brain extracted by FSL BET
(``ch2bet``). Everything that defines its labels is made by others or by generic methods, not by
what we validate:

- intracranial space: BET's brain mask, its largest connected part (BET leaves about a hundred
  specks of a few voxels outside the head), holes filled;
- CSF, GM and WM: Otsu's method with three classes (``skimage.filters.threshold_multiotsu``) on
  ch2's intensities inside that mask, without smoothing first. ch2 is an average of 27 scans, so
  its noise is already low, and a 3-voxel median filter tried first erased thin sulcal CSF
  (13 ml less CSF) instead of noise;
- the rest of the head: ch2 above a background threshold, opened, closed and filled, as
  ``headmodel.compose_labels`` does for pydeface's head;
- the face: drawn geometrically from the intracranial mask (``face_mask``), not from pydeface's
  face mask, which our defacing fits.

ch2's field of view ends 71 mm below the AC (the MNI box): there is no mouth, chin or lower neck,
and the tip of the nose is cut. Its lowest plane is repeated 30 mm down (``with_neck``): a crude
neck, so that scans reach below the brain as real ones do. Cached once per cache folder like the
atlas model; a few seconds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from cohortflow.pipelines.atlas.errors import HeadModelError

# The model's file format is the atlas model's: written and read by the same helpers.
from cohortflow.pipelines.atlas.headmodel import (
    BACKGROUND,
    CSF,
    GM,
    OTHER_HEAD,
    WM,
    HeadModel,
    cached_model,
    load_model,
    save_volume,
)

#: Bumped whenever the recipe changes, so that cached models are rebuilt.
#: 2: a neck below ch2's field of view (``NECK_MM``).
COLIN_MODEL_VERSION = "2"
COLIN_DIR = Path("/usr/share/mricron/templates")
#: Face voxels keep at least this distance from the intracranial space.
FACE_BRAIN_MARGIN_MM = 10.0
#: The top of the face plane: this far above the lowest frontal point (the orbital roof), at the
#: frontal pole: above the eyebrows.
FACE_TOP_ABOVE_ORBIT_MM = 15.0
#: The bottom of the face plane: this far below the lowest frontal point, as far forward as it:
#: the chin's height, behind its front.
FACE_BOTTOM_BELOW_ORBIT_MM = 75.0
#: The lowest frontal point is the lowest intracranial voxel this close behind the frontal pole.
FRONTAL_DEPTH_MM = 25.0
#: ch2's lowest plane repeated this far downwards: a neck. ch2 ends 71 mm below the AC, 4 mm
#: below its brain mask, through the medulla; scans of a model ending there ended there too, and
#: image QC, whose template brain goes on down the medulla, rejected 3 of 104 clean series of
#: the 50-study benchmark cohort as cut off (``image.coverage``): a real 3D T1 reaches the neck.
#: Outside the intracranial space, so no truth volume changes. Crude: the plane repeated cuts
#: the medulla and the cerebellar tonsils, so the neck looks like the posterior fossa going on
#: down; on 2 of the 40 volumetry benchmark heads the intracranial mask followed it (ICV +6 and
#: +8 %). A real neck begins under the occipital bone, dark in a T1.
NECK_MM = 30.0
#: Smoothing of GM + WM into the tissue map that orders voxels for simulated atrophy.
TISSUE_SIGMA_MM = 1.0

NOTICE = (
    "Contains data derived from Colin27 (ch2.nii.gz, ch2bet.nii.gz; Holmes et al. 1998, J Comput "
    "Assist Tomogr 22:324-333, Montreal Neurological Institute) as distributed with MRIcron in "
    "Debian's mricron-data (Chris Rorden, BSD-3-clause per the package's copyright file)."
)


@dataclass(frozen=True)
class FacePlane:
    """The plane, containing the left-right axis, in front of and below which lies the face.

    ``top`` and ``bottom`` are (anterior, superior) RAS millimetres of two of its points;
    ``frontal_pole`` and ``lowest_frontal`` the intracranial landmarks they come from.
    """

    frontal_pole: tuple[float, float]
    lowest_frontal: tuple[float, float]
    top: tuple[float, float]
    bottom: tuple[float, float]

    def in_front(self, y: npt.NDArray[np.float64], z: npt.NDArray[np.float64]) -> Any:
        """True where RAS (y, z) lies anterior-inferior of the plane and no higher than its top:
        the plane leans forward as it rises, so above the eyebrows it would take the forehead."""
        (y0, z0), (y1, z1) = self.top, self.bottom
        # the sign of the 2-D cross product says on which side of the line top -> bottom
        return ((y1 - y0) * (z - z0) - (z1 - z0) * (y - y0) > 0) & (z <= z0)


def source_paths(folder: Path = COLIN_DIR) -> dict[str, Path]:
    """Paths of Colin27's whole head (``ch2``) and BET brain (``ch2bet``)."""
    paths = {"head": folder / "ch2.nii.gz", "bet": folder / "ch2bet.nii.gz"}
    for name, path in paths.items():
        if not path.is_file():
            raise HeadModelError(
                f"Colin27 '{name}' not found at {path}: install the Debian package mricron-data "
                "(apt-get install mricron-data, listed in scripts/debian-packages.txt)"
            )
    return paths


def _digest(paths: dict[str, Path]) -> str:
    h = hashlib.sha256(f"colin-{COLIN_MODEL_VERSION}".encode())
    for name in sorted(paths):
        h.update(name.encode())
        h.update(hashlib.sha256(paths[name].read_bytes()).digest())
    return h.hexdigest()[:16]


def load_or_build_colin(cache_dir: Path, source_dir: Path = COLIN_DIR) -> HeadModel:
    """Load the Colin27 head model cached in ``cache_dir``, building it first if needed."""
    paths = source_paths(source_dir)
    return cached_model(cache_dir, "colinmodel", _digest(paths), lambda f: build_colin(paths, f))


def build_colin(paths: dict[str, Path], folder: Path) -> None:
    """Compose the model from ch2 and ch2bet and write its files into ``folder``."""
    head_img: Any = nib.as_closest_canonical(nib.load(paths["head"]))
    bet_img: Any = nib.as_closest_canonical(nib.load(paths["bet"]))
    if head_img.shape != bet_img.shape or not np.allclose(head_img.affine, bet_img.affine):
        raise HeadModelError(
            f"{paths['bet']} is not on the grid of {paths['head']}: reinstall mricron-data"
        )
    sx, sy, sz = (float(v) for v in head_img.header.get_zooms()[:3])
    head_np, bet, affine = with_neck(
        np.asarray(head_img.dataobj, dtype=np.float32),
        np.asarray(bet_img.dataobj) > 0,
        np.asarray(head_img.affine, dtype=np.float64),
        round(NECK_MM / sz),
    )
    labels, tissue = compose_colin_labels(head_np, bet, (sx, sy, sz))
    face = face_mask(labels, affine)
    folder.mkdir(parents=True, exist_ok=True)
    head_scaled = np.clip(head_np / np.percentile(head_np[labels > 0], 99.5), 0, 1.2)
    save_volume(folder / "head.nii", np.round(head_scaled * 1000).astype(np.int16), affine)
    save_volume(folder / "labels.nii", labels, affine)
    save_volume(folder / "tissue.nii", np.round(tissue * 1000).astype(np.int16), affine)
    save_volume(folder / "face.nii", face.astype(np.uint8), affine)
    model = load_model(folder, "")
    plane = face_plane(labels, affine)
    meta: dict[str, Any] = {
        "version": COLIN_MODEL_VERSION,
        "sources": {k: str(v) for k, v in paths.items()},
        "volumes_ml": model.volumes_ml(),
        "icv_ml": float(len(model.icv_voxels)) * model.voxel_ml,
        "face_ml": float(face.sum()) * model.voxel_ml,
        "face_plane_ras_yz": {"top": plane.top, "bottom": plane.bottom},
        "notice": NOTICE,
    }
    (folder / "model.json").write_text(json.dumps(meta, indent=2))


def with_neck(
    head: npt.NDArray[np.float32],
    bet: npt.NDArray[np.bool_],
    affine: npt.NDArray[np.float64],
    planes: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.float64]]:
    """The head with its lowest axial plane (RAS voxel order: the third axis points up)
    repeated ``planes`` times below it, the brain mask with empty planes there, and the affine
    of the taller grid."""
    below = np.repeat(head[:, :, :1], planes, axis=2)
    shift = np.eye(4)
    shift[2, 3] = -planes
    return (
        np.concatenate([below, head], axis=2),
        np.concatenate([np.zeros(below.shape, dtype=bool), bet], axis=2),
        np.asarray(affine @ shift, dtype=np.float64),
    )


def compose_colin_labels(
    head_np: npt.NDArray[np.float32],
    bet: npt.NDArray[np.bool_],
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Hard labels and the smooth tissue map (pure; arrays in, arrays out).

    Intracranial = BET's mask (largest part, holes filled); CSF / GM / WM by three-class Otsu
    thresholds of the intensities inside it, darkest first; the head is the image above a tenth
    of its 99th percentile, opened, closed and filled. ``tissue`` is GM + WM smoothed by
    ``TISSUE_SIGMA_MM``, zero outside the intracranial space.
    """
    from scipy import ndimage
    from skimage.filters import threshold_multiotsu

    parts, n = ndimage.label(bet)
    if n == 0:
        raise HeadModelError("Colin27's BET mask (ch2bet) is empty: reinstall mricron-data")
    largest = 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
    icv = np.asarray(ndimage.binary_fill_holes(parts == largest), dtype=bool)
    low, high = threshold_multiotsu(head_np[icv], classes=3)
    thr = 0.1 * float(np.percentile(head_np, 99))
    head = ndimage.binary_opening(head_np > thr, iterations=2)
    head = ndimage.binary_fill_holes(ndimage.binary_closing(head, iterations=3))
    labels = np.full(head_np.shape, BACKGROUND, np.uint8)
    labels[head | icv] = OTHER_HEAD
    labels[icv] = CSF
    labels[icv & (head_np > low)] = GM
    labels[icv & (head_np > high)] = WM
    brain = np.isin(labels, (GM, WM)).astype(np.float32)
    sigma = [TISSUE_SIGMA_MM / s for s in spacing]
    tissue = np.clip(ndimage.gaussian_filter(brain, sigma), 0, 1).astype(np.float32)
    tissue[~icv] = 0
    return labels, tissue


def face_plane(labels: npt.NDArray[np.uint8], affine: npt.NDArray[np.float64]) -> FacePlane:
    """The face plane from two intracranial landmarks, in RAS millimetres.

    The frontal pole is the intracranial space's most anterior point, the lowest frontal point
    its lowest point within ``FRONTAL_DEPTH_MM`` behind the pole (the orbital surface of the
    frontal lobe, just above the orbits). The plane runs from above the eyebrows (at the pole's
    depth, ``FACE_TOP_ABOVE_ORBIT_MM`` above the orbits) down to the chin's height (as far
    forward as the lowest frontal point, ``FACE_BOTTOM_BELOW_ORBIT_MM`` below it): in front of
    it and below its top lie the eyes' front halves, the nose, the cheeks, the mouth and the
    chin (in ch2 only down to the nose, the lower face is outside its field of view).
    """
    idx = np.argwhere(np.isin(labels, (CSF, GM, WM)))
    ras = (affine[:3, :3] @ idx.T).T + affine[:3, 3]
    y, z = ras[:, 1], ras[:, 2]
    pole_y = float(y.max())
    pole_z = float(np.median(z[y >= pole_y - 1.0]))
    frontal = y >= pole_y - FRONTAL_DEPTH_MM
    k = int(np.argmin(np.where(frontal, z, np.inf)))
    low_y, low_z = float(y[k]), float(z[k])
    return FacePlane(
        frontal_pole=(pole_y, pole_z),
        lowest_frontal=(low_y, low_z),
        top=(pole_y, low_z + FACE_TOP_ABOVE_ORBIT_MM),
        bottom=(low_y, low_z - FACE_BOTTOM_BELOW_ORBIT_MM),
    )


def face_mask(
    labels: npt.NDArray[np.uint8], affine: npt.NDArray[np.float64]
) -> npt.NDArray[np.bool_]:
    """What defacing must remove: head voxels anterior-inferior of ``face_plane`` (and below its
    top) more than ``FACE_BRAIN_MARGIN_MM`` from the intracranial space, never intracranial."""
    from scipy import ndimage

    icv = np.isin(labels, (CSF, GM, WM))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    far = ndimage.distance_transform_edt(~icv, sampling=spacing) > FACE_BRAIN_MARGIN_MM
    plane = face_plane(labels, affine)
    ii, jj, kk = np.indices(labels.shape, dtype=np.float64)
    y = affine[1, 0] * ii + affine[1, 1] * jj + affine[1, 2] * kk + affine[1, 3]
    z = affine[2, 0] * ii + affine[2, 1] * jj + affine[2, 2] * kk + affine[2, 3]
    return np.asarray((labels == OTHER_HEAD) & far & plane.in_front(y, z), dtype=bool)
