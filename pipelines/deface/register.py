"""antspyx: an affine of the defacing template to a subject's T1 (FIELD-NOTES.md recipe).

Both images are resampled to 3 mm first: the face and the skull are centimetre-scale
structures, and at 3 mm the affine takes about 3 s instead of 20. The transform is returned as a
plain 4x4 matrix (subject LPS -> template LPS), so that masks can be sampled on any plane with
numpy instead of going through ANTs per series.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

REGISTRATION_MM = 3.0
#: ANTs samples the metric at random points: a fixed seed gives the same transform every run.
SEED = 20251


@dataclass(frozen=True)
class Fit:
    subject_to_template: npt.NDArray[np.float64]  # 4x4, LPS mm -> LPS mm
    seconds: float


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
def _template(path: str, resolution_mm: float) -> Any:
    """The template read and resampled once per process (ANTs images are not changed by a
    registration)."""
    import ants

    return ants.resample_image(
        ants.image_read(path, pixeltype="float"), (resolution_mm,) * 3, False, 1
    )


def fit_affine(
    pixels: npt.NDArray[np.generic],
    origin: npt.NDArray[np.float64],
    spacing: tuple[float, float, float],
    direction: npt.NDArray[np.float64],
    template_path: str,
    resolution_mm: float = REGISTRATION_MM,
) -> Fit:
    """Register the template head (moving) to the subject volume (fixed, ``pixels`` in
    (column, row, slice) order with ITK's origin / spacing / direction), both resampled to
    ``resolution_mm``."""
    import ants

    start = time.perf_counter()
    subject = ants.from_numpy(
        np.asarray(pixels, dtype=np.float32),
        origin=tuple(float(v) for v in origin),
        spacing=tuple(float(v) for v in spacing),
        direction=np.asarray(direction, dtype=np.float64),
    )
    fixed = ants.resample_image(subject, (resolution_mm,) * 3, False, 1)
    moving = _template(template_path, resolution_mm)
    with tempfile.TemporaryDirectory(prefix="cohortflow-deface-") as tmp, seeded(SEED):
        reg = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform="Affine",
            aff_shrink_factors=(2, 1),
            aff_smoothing_sigmas=(1, 0),
            aff_iterations=(500, 200),
            outprefix=os.path.join(tmp, "t_"),
        )
        tx = ants.read_transform(reg["fwdtransforms"][0])
        params = np.asarray(tx.parameters, dtype=np.float64)
        centre = np.asarray(tx.fixed_parameters, dtype=np.float64)
    # ITK's affine: y = M (x - c) + c + t maps fixed (subject) points into the moving image.
    m = params[:9].reshape(3, 3)
    t = params[9:12]
    matrix = np.eye(4)
    matrix[:3, :3] = m
    matrix[:3, 3] = centre + t - m @ centre
    return Fit(matrix, time.perf_counter() - start)
