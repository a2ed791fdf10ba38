"""Phantoms with known noise, contrast and intensity non-uniformity, for validating image QC.

The head model's tissue labels are rendered with chosen intensities (CSF, GM, WM, the scalp from
the template), on a 1 mm sagittal grid, without a bias field unless asked, then given Rician noise
of a known sigma. The true value of each metric follows from those numbers and the definitions in
``qc.metrics``: ``SNRd = nu_WM / sigma``, and MRIQC's CNR
``|mu_WM - mu_GM| / sqrt(sd_air^2 + sd_WM^2 + sd_GM^2)`` with the Rician moments of each tissue and
the Rayleigh spread of the air.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import special

from cohortflow.models.geometry import Plane, Volume
from cohortflow.pipelines.atlas.headmodel import HeadModel
from cohortflow.pipelines.synth import anatomy
from cohortflow.pipelines.synth.scanners import CONTRASTS

#: Intensity scale of the stored image (the generator writes 12-bit values the same way).
SCALE = 3000.0


@dataclass(frozen=True)
class PhantomTruth:
    sigma: float  # Gaussian noise level per channel, image units
    wm: float  # noise-free white matter intensity
    gm: float
    snrd_wm: float  # nu_WM / sigma
    cnr: float  # MRIQC's definition with the Rician / Rayleigh moments
    inu_range: float  # P95 - P5 of the applied bias field in the brain (0 without one)


@dataclass(frozen=True)
class Phantom:
    stack: npt.NDArray[np.float32]  # (slice, row, column)
    volume: Volume
    truth: PhantomTruth


def rician_moments(nu: float, sigma: float) -> tuple[float, float]:
    """Mean and standard deviation of the magnitude of ``nu`` plus complex Gaussian noise of
    ``sigma`` per channel (Rice distribution), stable at any SNR (scaled Bessel functions):
    mean = sigma sqrt(pi/2) L_1/2(-nu^2 / 2 sigma^2)."""
    y = nu * nu / (4 * sigma * sigma)
    laguerre = (1 + 2 * y) * special.i0e(y) + 2 * y * special.i1e(y)
    mean = sigma * math.sqrt(math.pi / 2) * float(laguerre)
    variance = 2 * sigma * sigma + nu * nu - mean * mean
    return mean, math.sqrt(max(variance, 0.0))


def qc_phantom(
    model: HeadModel,
    rng: np.random.Generator,
    snr: float,
    gm: float | None = None,
    bias: float = 0.0,
) -> Phantom:
    """A head phantom whose white matter has signal-to-noise ratio ``snr``; grey matter at
    ``gm`` (a fraction of full scale, default the T1 contrast's); ``bias`` the amplitude of a
    smooth multiplicative field (as the cohort generator's)."""
    contrast = dict(CONTRASTS["t1"])
    if gm is not None:
        contrast["gm"] = gm
    sigma_rel = contrast["wm"] / snr
    shape = anatomy.SubjectShape(
        scale=(1.0, 1.0, 1.0),
        warp=np.zeros((3, 6, 6, 6), np.float32),
        atrophy_order=np.zeros(0, np.int64),
        centre=anatomy._icv_frame(model)[0],
        half_extent=anatomy._icv_frame(model)[1],
    )
    grid = anatomy.centred_grid((176, 256, 256), (1.0, 1.0, 1.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
    image = anatomy.tissue_image(model.head, model.labels, contrast)
    clean = np.asarray(
        anatomy.sample_grid(image, model, shape, anatomy.IDENTITY_PLACEMENT, grid, order=0),
        dtype=np.float32,
    )
    labels = np.asarray(
        anatomy.sample_grid(model.labels, model, shape, anatomy.IDENTITY_PLACEMENT, grid, order=0)
    )
    inu = 0.0
    if bias > 0:
        field = anatomy.bias_field(clean.shape, rng, bias)
        clean = clean * field
        inside = np.isin(labels, (1, 2, 3))
        f = field[inside] / np.median(field[inside])
        p5, p95 = np.percentile(f, [5, 95])
        inu = float(p95 - p5)
    noisy = anatomy.rician(clean, sigma_rel, rng) * SCALE
    sigma = sigma_rel * SCALE
    wm, gmv = contrast["wm"] * SCALE, contrast["gm"] * SCALE
    mu_wm, sd_wm = rician_moments(wm, sigma)
    mu_gm, sd_gm = rician_moments(gmv, sigma)
    sd_air = sigma * math.sqrt((4 - math.pi) / 2)
    cnr = abs(mu_wm - mu_gm) / math.sqrt(sd_air**2 + sd_wm**2 + sd_gm**2)
    planes = tuple(
        Plane(
            instance=k,
            frame=None,
            origin=grid.slice_position(k),
            row_dir=grid.row_dir,
            col_dir=grid.col_dir,
            spacing=(1.0, 1.0),
            rows=grid.shape[1],
            columns=grid.shape[2],
        )
        for k in range(grid.shape[0])
    )
    return Phantom(
        stack=np.asarray(noisy, dtype=np.float32),
        volume=Volume(planes, 1.0),
        truth=PhantomTruth(sigma, wm, gmv, wm / sigma, cnr, inu),
    )
