"""A whole-head anatomical model with known tissue labels, composed from installed templates.

The synthetic cohort needs heads whose true intracranial, grey matter, white matter and CSF
volumes are known. No such atlas ships with a package, so it is composed once from two that do:

- pydeface's package data: ``mean_reg2mean.nii.gz``, a whole-head mean T1 (face, skull, neck) and
  ``facemask.nii.gz`` on the same grid (1 = keep, 0 = face); MIT licence.
- nilearn's MNI152 2009a symmetric T1 (brain only), its brain mask and the grey / white matter
  probability maps (ICBM 2009a; copyright notice required when redistributed).

The MNI brain is registered to the pydeface head with antspyx by an affine from the identity with
the metric masked by the eroded MNI brain mask (FIELD-NOTES.md). A SyN stage after it was tried
and rejected: between a brain-only and a whole-head image it pulled the mask edge inwards
(intracranial volume 1,123 ml after the affine, 771 ml after SyN, visibly inside the brain).
Inside the intracranial space the synthetic intensities come from the labels, not from the
template, so the affine only has to fit the skull, which it does. The result lives on the pydeface
grid and is cached in the data folder: it takes about a minute once, never per subject.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from cohortflow.pipelines.atlas.building import building
from cohortflow.pipelines.atlas.errors import HeadModelError

log = logging.getLogger(__name__)

#: Bumped whenever the recipe changes, so that cached models are rebuilt.
HEAD_MODEL_VERSION = "4"  # 4: built with one ITK thread (the same model on every machine)
#: How far beyond the MNI brain mask the intracranial space may reach (``to_inner_table``).
INNER_TABLE_REACH_MM = 6.0

# Tissue labels of the model and of every synthetic subject's ground-truth label map.
BACKGROUND, CSF, GM, WM, OTHER_HEAD = 0, 1, 2, 3, 4
LABEL_NAMES = {BACKGROUND: "background", CSF: "csf", GM: "gm", WM: "wm", OTHER_HEAD: "other_head"}

_FILES = ("head", "labels", "tissue", "face")


@dataclass(frozen=True)
class HeadModel:
    """Whole-head model on one grid (pydeface's, about 1 mm).

    ``head`` is the template T1 intensity (0..1), used outside the intracranial space;
    ``labels`` holds BACKGROUND / CSF / GM / WM / OTHER_HEAD; ``tissue`` is the smooth tissue
    probability (GM + WM, 0..1) that orders voxels for simulated atrophy; ``face`` is 1 on the
    face (what defacing removes); ``affine`` maps voxel indices to world millimetres (RAS).
    """

    head: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8]
    tissue: npt.NDArray[np.float32]
    face: npt.NDArray[np.uint8]
    affine: npt.NDArray[np.float64]
    digest: str

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @cached_property
    def icv_voxels(self) -> npt.NDArray[np.intp]:
        """Indices (n, 3) of the intracranial voxels (CSF, GM, WM); computed once per model."""
        return np.argwhere(np.isin(self.labels, (CSF, GM, WM)))

    @cached_property
    def brain_flat(self) -> npt.NDArray[np.intp]:
        """Flat indices of the brain voxels (GM, WM); computed once per model."""
        return np.flatnonzero(np.isin(self.labels, (GM, WM)).ravel())

    def volumes_ml(self) -> dict[str, float]:
        return tissue_volumes_ml(self.labels, self.voxel_ml)


def tissue_volumes_ml(labels: npt.NDArray[np.uint8], voxel_ml: float) -> dict[str, float]:
    """CSF, GM and WM volumes (ml) of a label map: {"csf": .., "gm": .., "wm": ..}."""
    counts = np.bincount(labels.ravel(), minlength=5)
    return {LABEL_NAMES[k]: float(counts[k]) * voxel_ml for k in (CSF, GM, WM)}


def template_paths() -> dict[str, Path]:
    """Paths of the package-shipped templates the model is built from."""
    pyd = resources.files("pydeface") / "data"
    nil = resources.files("nilearn") / "datasets" / "data"
    paths = {
        "head": Path(str(pyd / "mean_reg2mean.nii.gz")),
        "facemask": Path(str(pyd / "facemask.nii.gz")),
        "mni_t1": Path(str(nil / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")),
        "mni_gm": Path(str(nil / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")),
        "mni_wm": Path(str(nil / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")),
    }
    for name, path in paths.items():
        if not path.is_file():
            raise HeadModelError(
                f"template '{name}' not found at {path}: install the packages pydeface and nilearn"
            )
    return paths


def _source_digest(paths: dict[str, Path]) -> str:
    h = hashlib.sha256(HEAD_MODEL_VERSION.encode())
    for name in sorted(paths):
        h.update(name.encode())
        h.update(hashlib.sha256(paths[name].read_bytes()).digest())
    return h.hexdigest()[:16]


def load_or_build(cache_dir: Path) -> HeadModel:
    """Load the cached head model from ``cache_dir``, building it first if needed."""
    return cached_model(cache_dir, "headmodel", _source_digest(template_paths()), _build_alone)


def _build_alone(folder: Path) -> None:
    """``build`` in a child process with one ITK thread.

    ITK reads its thread count once per process, and a registration on several threads gives
    another model on every build: three builds of one digest (a probe's, the benchmark's, the
    tests') differed in 31,000 to 58,000 voxels of their labels, and the Philips head's brain
    volume by 2.5 % between them. The child process fixes the count whatever the caller ran
    before (a child process, not multiprocessing: Dask's worker processes may not fork any).
    """
    code = (
        "import sys; from pathlib import Path; "
        "from cohortflow.pipelines.atlas.headmodel import build, template_paths; "
        "build(template_paths(), Path(sys.argv[1]))"
    )
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise HeadModelError(
            f"building the head model into {folder} failed (exit {done.returncode}): "
            f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'}"
        )


def cached_model(
    cache_dir: Path, name: str, digest: str, build_into: Callable[[Path], None]
) -> HeadModel:
    """The model cached in ``cache_dir/NAME-DIGEST``, built there by ``build_into`` first if
    needed. Several processes may ask at once (test workers, flow workers): one builds, the
    others wait for it and load what it wrote (model.json is written last)."""
    folder = cache_dir / f"{name}-{digest}"
    if not (folder / "model.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with building(folder):
            if not (folder / "model.json").is_file():
                log.info("building the %s once into %s (about a minute)", name, folder)
                build_into(folder)
    return load_model(folder, digest)


def load_model(folder: Path, digest: str) -> HeadModel:
    imgs = {name: nib.load(folder / f"{name}.nii") for name in _FILES}
    affine = np.asarray(imgs["head"].affine, dtype=np.float64)  # type: ignore[attr-defined]
    return HeadModel(
        head=np.asarray(imgs["head"].dataobj, dtype=np.float32) / 1000.0,  # type: ignore[attr-defined]
        labels=np.asarray(imgs["labels"].dataobj, dtype=np.uint8),  # type: ignore[attr-defined]
        tissue=np.asarray(imgs["tissue"].dataobj, dtype=np.float32) / 1000.0,  # type: ignore[attr-defined]
        face=np.asarray(imgs["face"].dataobj, dtype=np.uint8),  # type: ignore[attr-defined]
        affine=affine,
        digest=digest,
    )


def build(paths: dict[str, Path], folder: Path) -> None:
    """Register the MNI brain to the pydeface head and write the model files into ``folder``."""
    import ants  # heavy import, only needed once

    head_img = nib.load(paths["head"])
    head_np = np.asarray(head_img.dataobj, dtype=np.float32)  # type: ignore[attr-defined]
    face_keep = np.asarray(nib.load(paths["facemask"]).dataobj) > 0.5  # type: ignore[attr-defined]

    fixed = ants.image_read(str(paths["head"]), pixeltype="float")
    mni = ants.image_read(str(paths["mni_t1"]), pixeltype="float")
    mni_mask = ants.threshold_image(mni, 0.2 * float(mni.max()), 1e9)
    gm = ants.image_read(str(paths["mni_gm"]), pixeltype="float")
    wm = ants.image_read(str(paths["mni_wm"]), pixeltype="float")

    saved_seed = ants.config._random_seed
    ants.config._random_seed = 20091  # a fixed sampling seed: the same model on every build
    try:
        with tempfile.TemporaryDirectory(prefix="cohortflow-headmodel-") as tmp:
            # The centres of mass of a brain-only and a whole-head image are centimetres apart:
            # start from the identity and look only at the brain (FIELD-NOTES.md).
            aff = ants.registration(
                fixed=fixed,
                moving=mni,
                type_of_transform="Affine",
                initial_transform="Identity",
                moving_mask=ants.morphology(mni_mask, "erode", 2),
                mask_all_stages=True,
                aff_shrink_factors=(4, 2, 1),
                aff_smoothing_sigmas=(2, 1, 0),
                aff_iterations=(1000, 500, 100),
                outprefix=os.path.join(tmp, "aff_"),
            )
            tx = aff["fwdtransforms"]
            icv = ants.apply_transforms(fixed, mni_mask, tx, interpolator="linear").numpy()
            gm_w = ants.apply_transforms(fixed, gm, tx, interpolator="linear").numpy() / 255.0
            wm_w = ants.apply_transforms(fixed, wm, tx, interpolator="linear").numpy() / 255.0
    finally:
        ants.config._random_seed = saved_seed

    spacing = tuple(float(v) for v in head_img.header.get_zooms()[:3])  # type: ignore[attr-defined]
    labels, tissue = compose_labels(
        head_np=head_np,
        icv_prob=icv,
        gm_prob=gm_w,
        wm_prob=wm_w,
        face_keep=face_keep,
        spacing=spacing,  # type: ignore[arg-type]
    )
    folder.mkdir(parents=True, exist_ok=True)
    affine = head_img.affine  # type: ignore[attr-defined]
    head_scaled = np.clip(head_np / np.percentile(head_np[labels > 0], 99.5), 0, 1.2)
    save_volume(folder / "head.nii", np.round(head_scaled * 1000).astype(np.int16), affine)
    save_volume(folder / "labels.nii", labels, affine)
    save_volume(folder / "tissue.nii", np.round(tissue * 1000).astype(np.int16), affine)
    save_volume(folder / "face.nii", (~face_keep & (labels > 0)).astype(np.uint8), affine)
    model = load_model(folder, "")
    meta: dict[str, Any] = {
        "version": HEAD_MODEL_VERSION,
        "sources": {k: str(v) for k, v in paths.items()},
        "volumes_ml": model.volumes_ml(),
        "face_brain_overlap_ml": float(
            ((model.face > 0) & np.isin(model.labels, (CSF, GM, WM))).sum() * model.voxel_ml
        ),
        "notice": "Contains data derived from the ICBM 2009a template, Copyright (C) 1993-2009 "
        "Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
        "McGill University; and from pydeface's mean head (MIT).",
    }
    (folder / "model.json").write_text(json.dumps(meta, indent=2))


def compose_labels(
    *,
    head_np: npt.NDArray[np.float32],
    icv_prob: npt.NDArray[np.float32],
    gm_prob: npt.NDArray[np.float32],
    wm_prob: npt.NDArray[np.float32],
    face_keep: npt.NDArray[np.bool_],
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Hard labels from the registered probability maps (pure; arrays in, arrays out).

    Intracranial = warped brain mask >= 0.5, grown through the head's CSF to its inner table
    (``to_inner_table``; the MNI brain mask alone left 10 % of the intracranial space out and
    measured real heads 10 % low against SAMSEG), never on the face; inside it a voxel is WM or GM
    where the larger of the two probabilities wins and GM + WM >= 0.5, CSF elsewhere. The head
    is the template above a background threshold, holes filled.
    """
    from scipy import ndimage

    icv = (icv_prob >= 0.5) & face_keep
    icv = ndimage.binary_fill_holes(icv)
    icv = to_inner_table(icv, head_np, spacing) & face_keep
    tissue = np.clip(gm_prob + wm_prob, 0, 1).astype(np.float32)
    labels = np.zeros(head_np.shape, np.uint8)
    thr = 0.1 * float(np.percentile(head_np, 99))
    head = ndimage.binary_opening(head_np > thr, iterations=2)
    head = ndimage.binary_fill_holes(ndimage.binary_closing(head, iterations=3))
    labels[head | icv] = OTHER_HEAD
    labels[icv] = CSF
    is_tissue = icv & (tissue >= 0.5)
    labels[is_tissue & (wm_prob > gm_prob)] = WM
    labels[is_tissue & (wm_prob <= gm_prob)] = GM
    tissue[~icv] = 0
    return labels, tissue


def to_inner_table(
    brain: npt.NDArray[np.bool_],
    head_np: npt.NDArray[np.float32],
    spacing: tuple[float, float, float],
    reach_mm: float = INNER_TABLE_REACH_MM,
) -> npt.NDArray[np.bool_]:
    """The intracranial space of the head: ``brain`` (the MNI brain mask, which stops at the
    brain's surface and leaves out most CSF over it) grown through the head's CSF to the inner
    table of its skull.

    Outward from the brain the head's intensity falls through the CSF to the bone and rises
    again in the scalp. The bone's level is the median of the shell ``reach_mm`` / 2 to
    ``reach_mm`` outside the brain (the skull's middle in pydeface's mean head); the mask grows,
    one voxel at a time and at most ``reach_mm``, into voxels brighter than halfway between the
    brain's outermost millimetre and that level: the CSF, not the bone.
    """
    from scipy import ndimage

    outside = ndimage.distance_transform_edt(~brain, sampling=spacing)
    inside = ndimage.distance_transform_edt(brain, sampling=spacing)
    edge_level = float(np.median(head_np[(inside > 0) & (inside <= 1.0)]))
    bone_level = float(np.median(head_np[(outside > reach_mm / 2) & (outside <= reach_mm)]))
    csf = (head_np > 0.5 * (edge_level + bone_level)) & (outside <= reach_mm)
    steps = max(1, int(np.ceil(reach_mm / min(spacing))))
    grown = ndimage.binary_dilation(brain, iterations=steps, mask=brain | csf)
    return np.asarray(ndimage.binary_fill_holes(grown), dtype=bool)


def tissue_image(
    head: npt.NDArray[np.float32], labels: npt.NDArray[np.uint8], contrast: dict[str, float]
) -> npt.NDArray[np.float32]:
    """Model-space intensity image of one contrast from the (atrophied) labels: the synthetic
    subjects' images and the volumetry atlas' registration template.

    ``contrast`` gives the mean intensity of csf, gm, wm (0..1) and ``head`` (a factor applied to
    the template's own intensities outside the skull) and ``skull`` (the inner table).
    """
    lut = np.zeros(5, np.float32)
    lut[CSF], lut[GM], lut[WM] = contrast["csf"], contrast["gm"], contrast["wm"]
    img = lut[labels]
    outside = labels == OTHER_HEAD
    img[outside] = head[outside] * contrast["head"]
    from scipy import ndimage

    # The template's own brain can peek out between our intracranial mask and its skull: the
    # inner table of the skull is dark in every sequence, so draw it so.
    intracranial = np.isin(labels, (CSF, GM, WM))
    ring = ndimage.binary_dilation(intracranial, iterations=3) & ~intracranial
    img[ring] = contrast["skull"]
    img[labels == BACKGROUND] = 0
    return img


def save_volume(path: Path, data: npt.NDArray[Any], affine: npt.NDArray[np.float64]) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
