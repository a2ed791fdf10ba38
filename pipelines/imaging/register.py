"""antspyx registration shared by defacing, image QC and volumetry.

``fit_affine``: an affine of a whole-head template to a subject's T1 (FIELD-NOTES.md recipe).
Both images are resampled to 3 mm first: the face and the skull are centimetre-scale
structures, and at 3 mm the affine takes about 3 s instead of 20. The transform is returned as a
plain 4x4 matrix (subject LPS -> template LPS), so that masks can be sampled on any plane with
numpy instead of going through ANTs per series.

``head_start``: where the affine starts. ANTs' default start puts the centres of mass on each
other; a real scan's field of view decides its centre of mass (neck and shoulders in a
sagittal MPRAGE, a cut-off vertex in an axial 2D series), and an affine started 4 cm off lands in
the wrong minimum (seen on a real Siemens MPRAGE with its neck: r = 0.50). The head's top is
what every brain scan shows, so the start puts the top of the subject's head on the template's
and their upper-head centres on each other.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cohortflow.models.fits import FitStore
from cohortflow.pipelines.safeio import hash_file

REGISTRATION_MM = 3.0
#: ANTs samples the metric at random points: a fixed seed gives the same transform every run.
SEED = 20251


@dataclass(frozen=True)
class Fit:
    subject_to_template: npt.NDArray[np.float64]  # 4x4, LPS mm -> LPS mm
    seconds: float
    cached: bool = False  # read from a FitStore: made before from the same content


#: what a stored fit depends on beside its inputs: raise it whenever ``fit_affine`` would
#: give another transform for the same image (its settings, starts or levels)
FIT_VERSION = 1


@dataclass(frozen=True)
class HeadFit:
    """A study's head fitted to the template once, handed to the stages after the one that fitted
    it (defacing fits it; image QC places its brain mask with it instead of registering again).

    It holds for every series of the frame of reference (the same patient position in the same
    scanner coordinates): defacing changes pixels, never geometry. Only pseudonymized UIDs: it
    travels with the de-identified study."""

    frame_of_reference: str
    reference_series: str
    subject_to_template: tuple[tuple[float, ...], ...]  # 4x4, LPS mm -> LPS mm
    template_digest: str  # the head model it was fitted to

    @classmethod
    def of(cls, frame_of_reference: str, series: str, fit: Fit, template_digest: str) -> HeadFit:
        matrix = tuple(tuple(float(v) for v in row) for row in fit.subject_to_template)
        return cls(frame_of_reference, series, matrix, template_digest)

    @property
    def matrix(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.subject_to_template, dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return {
            "frame_of_reference": self.frame_of_reference,
            "reference_series": self.reference_series,
            "subject_to_template": [list(row) for row in self.subject_to_template],
            "template_digest": self.template_digest,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HeadFit:
        matrix = tuple(tuple(float(v) for v in row) for row in data["subject_to_template"])
        if len(matrix) != 4 or any(len(row) != 4 for row in matrix):
            raise ValueError("a head fit's matrix is 4 x 4")
        return cls(
            str(data["frame_of_reference"]),
            str(data["reference_series"]),
            matrix,
            str(data["template_digest"]),
        )


def fits_by_frame(fits: Iterable[HeadFit]) -> dict[str, HeadFit]:
    """The fits keyed by frame of reference (the first of a frame wins)."""
    found: dict[str, HeadFit] = {}
    for fit in fits:
        found.setdefault(fit.frame_of_reference, fit)
    return found


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """ANTs' metric sampling seeded with ``seed`` inside the block."""
    import ants

    saved = ants.config._random_seed
    ants.config._random_seed = seed
    try:
        yield
    finally:
        ants.config._random_seed = saved


@lru_cache(maxsize=4)
def _template_digest(path: str) -> str:
    """The template file's SHA-256, once per process (part of a stored fit's key)."""
    return hash_file(Path(path))


@lru_cache(maxsize=4)
def _template(path: str, resolution_mm: float) -> Any:
    """The template read and resampled once per process (ANTs images are not changed by a
    registration)."""
    import ants

    return ants.resample_image(
        ants.image_read(path, pixeltype="float"), (resolution_mm,) * 3, False, 1
    )


# Emptied before the interpreter's teardown: an ANTs image still held then made antspyx's
# bindings print "nanobind: leaked 1 instances!" as every run's worker processes ended.
atexit.register(_template.cache_clear)


#: the upper head, below the vertex, whose centre lines the two heads up (mm): the cranium
#: without neck and shoulders, and within any brain scan's field of view
UPPER_HEAD_MM = 90.0


def _head_anchor(image: Any) -> npt.NDArray[np.float64] | None:
    """A point of the head in physical (LPS) mm: its upper head's centre left-right and
    front-back, UPPER_HEAD_MM / 2 below the top of the head. None when no head is found."""
    data = np.asarray(image.numpy(), dtype=np.float64)
    inside = data > 0
    if inside.sum() < 100:
        return None
    level = float(np.percentile(data[inside], 99))
    values = data[inside] / level if level > 0 else data[inside]
    values = np.clip(values, 0.0, 1.0)
    # Otsu's threshold on the normalised intensities: head against background noise
    histogram, edges = np.histogram(values, bins=64, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weights = histogram.astype(np.float64)
    best, threshold = -1.0, 0.1
    for k in range(1, 63):
        w0, w1 = weights[:k].sum(), weights[k:].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0 = (weights[:k] * centres[:k]).sum() / w0
        m1 = (weights[k:] * centres[k:]).sum() / w1
        between = w0 * w1 * (m0 - m1) ** 2
        if between > best:
            best, threshold = between, float(edges[k])
    head = data >= threshold * level
    if head.sum() < 100:
        return None
    index = np.argwhere(head).astype(np.float64)
    to_lps = np.asarray(image.direction, dtype=np.float64) @ np.diag(image.spacing)
    points = index @ to_lps.T + np.asarray(image.origin, dtype=np.float64)
    top = float(np.percentile(points[:, 2], 99.5))  # LPS: +z is superior
    upper = points[points[:, 2] >= top - UPPER_HEAD_MM]
    centre = upper.mean(axis=0)
    return np.array([centre[0], centre[1], top - UPPER_HEAD_MM / 2])


def head_start(fixed: Any, moving: Any, folder: str) -> str | None:
    """An ANTs initial transform (a translation, written into ``folder``) that puts the moving
    head's top and upper-head centre on the fixed head's; None when either head is not found
    (then ANTs' centres of mass are the start)."""
    import ants

    a, b = _head_anchor(fixed), _head_anchor(moving)
    if a is None or b is None:
        return None
    # ANTs transforms map fixed points to moving points
    tx = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, translation=tuple(float(v) for v in b - a)
    )
    path = os.path.join(folder, "start.mat")
    ants.write_transform(tx, path)
    return path


def at_resolution(image: Any, resolution_mm: float) -> Any:
    """``image`` resampled to ``resolution_mm`` (linear). A bias correction here (N4 at that
    resolution) was tried for a real reconstruction without intensity normalisation: it did not
    rescue it and took 1 to 70 s depending on its settings, so the registration runs on the
    image as it is and the EM after N4 decides (pipelines/volumetry/method.py)."""
    import ants

    return ants.resample_image(image, (resolution_mm,) * 3, False, 1)


def correlation(a: npt.NDArray[np.generic], b: npt.NDArray[np.generic]) -> float:
    """Pearson r of two images on the voxels where either holds signal."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    keep = (x > 0) | (y > 0)
    if keep.sum() < 10:
        return 0.0
    return float(np.corrcoef(x[keep], y[keep])[0, 1])


#: ANTs affine settings at a few millimetres, two levels of a few hundred iterations, run apart:
#: every start through the coarse one, the best of them on through the fine one
COARSE = {"aff_shrink_factors": (2,), "aff_smoothing_sigmas": (1,), "aff_iterations": (500,)}
FINE = {"aff_shrink_factors": (1,), "aff_smoothing_sigmas": (0,), "aff_iterations": (200,)}


def best_affine(fixed: Any, moving: Any, folder: str) -> tuple[list[str], float]:
    """ANTs' affine of ``moving`` onto ``fixed`` from two starts, the heads' tops
    (``head_start``) and ANTs' centres of mass, keeping the one that correlates better with
    ``fixed``: each start fails on some real heads (measured: the centres of mass on a Siemens
    MPRAGE with its neck, the tops on a 2 mm XA30 reconstruction whose intensities differ from
    its twin's). Returns the forward transforms and the correlation.

    Each start runs the coarse level (half the resolution) only; the fine level continues from
    the better of them. Running both starts through both levels cost 35 to 50 % more on 12 real
    heads for the same result (the same correlation to 0.002; the brain's corners within
    0.2-2.5 mm): where the starts differ, the coarse level already shows which basin is right.
    """
    import ants

    coarse: list[tuple[float, int, str]] = []
    starts = [head_start(fixed, moving, folder), None]
    for n, start in enumerate(dict.fromkeys(starts)):
        reg = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform="Affine",
            initial_transform=start,
            outprefix=os.path.join(folder, f"coarse{n}_"),
            **COARSE,
        )
        warped = ants.apply_transforms(fixed, moving, reg["fwdtransforms"], interpolator="linear")
        coarse.append((correlation(fixed.numpy(), warped.numpy()), -n, reg["fwdtransforms"][0]))
    _, _, best = max(coarse)  # the better correlation; the tops' start on a tie
    reg = ants.registration(
        fixed=fixed,
        moving=moving,
        type_of_transform="Affine",
        initial_transform=best,
        outprefix=os.path.join(folder, "fine_"),
        **FINE,
    )
    warped = ants.apply_transforms(fixed, moving, reg["fwdtransforms"], interpolator="linear")
    return list(reg["fwdtransforms"]), correlation(fixed.numpy(), warped.numpy())


def fit_affine(
    pixels: npt.NDArray[np.generic],
    origin: npt.NDArray[np.float64],
    spacing: tuple[float, float, float],
    direction: npt.NDArray[np.float64],
    template_path: str,
    resolution_mm: float = REGISTRATION_MM,
    store: FitStore | None = None,
) -> Fit:
    """Register the template head (moving) to the subject volume (fixed, ``pixels`` in
    (column, row, slice) order with ITK's origin / spacing / direction), both resampled to
    ``resolution_mm``; from ``store`` when it holds the fit of the same content."""
    import ants

    start = time.perf_counter()
    key = None
    if store is not None:
        key = store.key(
            pixels,
            (origin, spacing, direction),
            {
                "template": _template_digest(template_path),
                "version": FIT_VERSION,
                "resolution_mm": float(resolution_mm),
                "levels": [COARSE, FINE],
                "seed": SEED,
            },
        )
        stored = store.get(key)
        if stored is not None:
            return Fit(stored, time.perf_counter() - start, cached=True)
    subject = ants.from_numpy(
        np.asarray(pixels, dtype=np.float32),
        origin=tuple(float(v) for v in origin),
        spacing=tuple(float(v) for v in spacing),
        direction=np.asarray(direction, dtype=np.float64),
    )
    fixed = at_resolution(subject, resolution_mm)
    moving = _template(template_path, resolution_mm)
    with tempfile.TemporaryDirectory(prefix="cohortflow-deface-") as tmp, seeded(SEED):
        transforms, _ = best_affine(fixed, moving, tmp)
        tx = ants.read_transform(transforms[0])
        params = np.asarray(tx.parameters, dtype=np.float64)
        centre = np.asarray(tx.fixed_parameters, dtype=np.float64)
    # ITK's affine: y = M (x - c) + c + t maps fixed (subject) points into the moving image.
    m = params[:9].reshape(3, 3)
    t = params[9:12]
    matrix = np.eye(4)
    matrix[:3, :3] = m
    matrix[:3, 3] = centre + t - m @ centre
    if store is not None and key is not None:
        store.put(key, matrix)
    return Fit(matrix, time.perf_counter() - start)
