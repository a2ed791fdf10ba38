"""Image quality metrics of a structural MR image, named and defined as in MRIQC.

Pure functions: arrays and masks in, one number out. Masks come from :mod:`qc.masks`; no file is
read here. Each docstring gives the formula, which direction is better, and the reference.
Esteban O. et al. (2017) MRIQC: Advancing the automatic prediction of image quality in MRI from
unseen sites. PLoS ONE 12(9):e0184661 collects them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.floating]
BoolArray = npt.NDArray[np.bool_]

#: sigma of Gaussian noise from the median of its Rayleigh-distributed magnitude in the air:
#: median = sigma * sqrt(2 ln 2)
RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))

#: Every metric image QC reports: name -> (what it is, which direction is better).
METRICS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "snrd_wm": ("white matter SNR, noise measured in the air (Dietrich)", "higher"),
        "snr_wm": ("white matter SNR, noise from its own spread", "higher"),
        "cnr": ("grey / white matter contrast-to-noise ratio (Magnotta)", "higher"),
        "cjv": ("coefficient of joint variation of GM and WM (Ganzetti)", "lower"),
        "efc": ("entropy focus criterion (Atkinson)", "lower"),
        "fber": ("foreground to background energy ratio (Shehzad)", "higher"),
        "wm2max": ("white matter median over the intensity maximum", "0.6 to 0.8"),
        "inu_range": ("bias field fitted to white matter, 95th minus 5th percentile", "lower"),
        "qi1": ("fraction of the air showing artefacts (Mortamet QI1)", "lower"),
        "coverage_outside": ("fraction of the brain outside the field of view", "lower"),
        "clipped_fraction": ("fraction of the head at the maximum stored value", "lower"),
        "icv_ml": ("intracranial volume of the placed template (ml)", "plausible"),
    }
)

#: Which check holds each metric to the protocol's range (``qc.policy.QcPolicy.image``), in the
#: order image QC reports them (the first failure is the series' reason code): every metric that
#: can fail a series, the ones the dashboard plots with their acceptance range.
METRIC_CHECKS: Mapping[str, str] = MappingProxyType(
    {
        "icv_ml": "image.brain_mask",
        "coverage_outside": "image.coverage",
        "qi1": "image.motion",
        "snrd_wm": "image.snr",
        "snr_wm": "image.snr",
        # heavy noise also drives some voxels to the top of the stored range: noise comes first
        "clipped_fraction": "image.clipped",
        "cnr": "image.cnr",
        "cjv": "image.cjv",
        "efc": "image.efc",
        "fber": "image.fber",
        "wm2max": "image.wm2max",
        "inu_range": "image.inu",
    }
)


def noise_sigma(air: Array) -> float | None:
    """Standard deviation of the complex Gaussian noise, from magnitude voxels in the air.

    In the air a magnitude image holds Rayleigh noise, whose median is sigma * sqrt(2 ln 2).
    The median keeps a few ghosted or defaced voxels from moving the estimate (exact zeros, from
    defacing or zero-filled backgrounds, are left out). None when fewer than 1000 air voxels
    carry signal: the noise cannot be estimated.
    """
    values = np.asarray(air, dtype=np.float64)
    values = values[values > 0]
    if values.size < 1000:
        return None
    return float(np.median(values) / RAYLEIGH_MEDIAN)


def snr_dietrich(mu_fg: float, sigma_noise: float | None) -> float | None:
    """SNR with the noise measured in the air: ``SNRd = mu_FG / sigma_noise``.

    ``sigma_noise`` is the Gaussian noise level recovered from the Rayleigh-distributed air
    (:func:`noise_sigma`), so a tissue's SNR is independent of intensity non-uniformity.
    Higher is better. Dietrich O. et al. (2007) Measurement of signal-to-noise ratios in MR
    images: influence of multichannel coils, parallel imaging, and reconstruction filters.
    JMRI 26(2):375-385.
    """
    if sigma_noise is None or sigma_noise <= 0:
        return None
    return float(mu_fg / sigma_noise)


def location_spread(values: Array) -> tuple[float, float]:
    """A tissue's intensity and spread, robustly: the median and 1.4826 times the median
    absolute deviation (the standard deviation for Gaussian values). Tissue masks from simple
    segmentation catch a few voxels of the neighbouring tissue, scalp or vessels; the mean and
    standard deviation would take them in (CNR 23 % low on a phantom at SNR 40), these do not."""
    v = np.asarray(values, dtype=np.float64)
    median = float(np.median(v))
    return median, 1.4826 * float(np.median(np.abs(v - median)))


def snr(mu: float, sigma: float) -> float | None:
    """SNR of one tissue from its own spread: ``SNR = mu_T / sigma_T`` (MRIQC ``snr_wm``), with
    the robust :func:`location_spread` of the tissue.

    Higher is better. Includes the intensity non-uniformity in sigma_T, so it reads lower than
    :func:`snr_dietrich` on images with a bias field. Dietrich et al. (2007), as above.
    """
    return float(mu / sigma) if sigma > 0 else None


def cnr(mu_wm: float, mu_gm: float, sigma_air: float, sigma_wm: float, sigma_gm: float) -> float:
    """Contrast-to-noise ratio: ``|mu_GM - mu_WM| / sqrt(sigma_air^2 + sigma_GM^2 +
    sigma_WM^2)``, with sigma_air the standard deviation of the air (as MRIQC).

    Higher is better. Magnotta V.A., Friedman L. (2006) Measurement of signal-to-noise and
    contrast-to-noise in the fBIRN multicenter imaging study. J Digit Imaging 19(2):140-147.
    """
    return float(abs(mu_gm - mu_wm) / math.sqrt(sigma_air**2 + sigma_gm**2 + sigma_wm**2))


def cjv(mu_wm: float, mu_gm: float, sigma_wm: float, sigma_gm: float) -> float:
    """Coefficient of joint variation: ``(sigma_WM + sigma_GM) / |mu_WM - mu_GM|``.

    Lower is better (less noise, less non-uniformity, sharper tissue separation). Ganzetti M.
    et al. (2016) Intensity inhomogeneity correction of structural MR images: a data-driven
    approach to define input algorithm parameters. Front Neuroinform 10:10.
    """
    return float((sigma_wm + sigma_gm) / abs(mu_wm - mu_gm))


def efc(image: Array) -> float:
    """Entropy focus criterion, the Shannon entropy of voxel intensities normalised by its
    maximum: ``EFC = (1 / EFC_max) * sum(x_i / x_max * ln(x_i / x_max))`` with
    ``x_max = sqrt(sum x_i^2)`` and ``EFC_max = N / sqrt(N) * ln(1 / sqrt(N))`` for N voxels.

    Lower is better: ghosting and blurring spread energy into the background and raise it.
    Atkinson D. et al. (1997) Automatic correction of motion artifacts in magnetic resonance
    images using an entropy focus criterion. IEEE TMI 16(6):903-910.
    """
    x = np.abs(np.asarray(image, dtype=np.float32)).ravel()
    n = x.size
    b_max = math.sqrt(float((x.astype(np.float64) ** 2).sum()))
    if n == 0 or b_max <= 0:
        return 0.0
    efc_max = n * (1.0 / math.sqrt(n)) * math.log(1.0 / math.sqrt(n))
    ratio = x / np.float32(b_max)
    return float((ratio * np.log(ratio + np.float32(1e-16))).sum(dtype=np.float64) / efc_max)


def fber(head: Array, air: Array) -> float | None:
    """Foreground to background energy ratio: ``FBER = median(|x_head|^2) / median(|x_air|^2)``.

    Higher is better. Exact zeros of the air (defaced or zero-filled) are left out; None when
    nothing of the air carries signal. Shehzad Z. et al. (2015) The Preprocessed Connectomes
    Project Quality Assessment Protocol. Front Neuroinform Conference Abstract.
    """
    a = np.asarray(air, dtype=np.float64)
    a = a[a > 0]
    if a.size == 0:
        return None
    # the median of squares of non-negative values is the square of their median
    background = float(np.median(a)) ** 2
    if background <= 0:
        return None
    return float(np.median(np.abs(np.asarray(head))) ** 2 / background)


def wm2max(wm: Array, head: Array) -> float:
    """White matter to maximum intensity ratio: ``median(x_WM) / P99.95(x_head)``.

    Around 0.6 to 0.8 is expected; lower values show long intensity tails (vessels, fat,
    artefacts), values near 1 a clipped or saturated image. MRIQC (Esteban et al. 2017).
    """
    top = float(np.percentile(np.asarray(head, dtype=np.float64), 99.95))
    return float(np.median(wm) / top) if top > 0 else 0.0


@dataclass(frozen=True)
class BiasField:
    """A smooth multiplicative field: exp of a polynomial in normalised voxel coordinates."""

    centre: npt.NDArray[np.float64]  # (3, 1)
    scale: npt.NDArray[np.float64]  # (3, 1)
    degree: int
    coef: npt.NDArray[np.float64]

    def design(self, coords: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        u = (np.asarray(coords, dtype=np.float64) - self.centre) / self.scale
        d = self.degree
        terms = [
            u[0] ** i * u[1] ** j * u[2] ** k
            for i in range(d + 1)
            for j in range(d + 1 - i)
            for k in range(d + 1 - i - j)
        ]
        return np.stack(terms, axis=1)

    def __call__(self, coords: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        return np.asarray(np.exp(self.design(coords) @ self.coef), dtype=np.float64)

    def on_grid(self, shape: tuple[int, int, int]) -> npt.NDArray[np.float32]:
        """The field at every voxel of an array of ``shape`` (separable: a fraction of the cost
        of evaluating it voxel by voxel)."""
        axes = [
            (np.arange(n, dtype=np.float64) - self.centre[a, 0]) / self.scale[a, 0]
            for a, n in enumerate(shape)
        ]
        d = self.degree
        powers = [[ax**e for e in range(d + 1)] for ax in axes]
        log_field = np.zeros(shape, np.float64)
        terms = (
            (i, j, k) for i in range(d + 1) for j in range(d + 1 - i) for k in range(d + 1 - i - j)
        )
        for c, (i, j, k) in zip(self.coef, terms, strict=True):
            log_field += c * (
                powers[0][i][:, None, None]
                * powers[1][j][None, :, None]
                * powers[2][k][None, None, :]
            )
        return np.exp(log_field).astype(np.float32)


def inu_field(values: Array, coords: npt.NDArray[np.floating], degree: int = 2) -> BiasField:
    """Fit a smooth multiplicative field to one tissue's intensities: a polynomial of ``degree``
    in the voxel coordinates (3 x N) fitted by least squares to the log intensities.

    White matter has one true intensity throughout the brain, so its smooth variation is the
    intensity non-uniformity (the idea behind white-matter based bias estimation; Vovk U. et al.
    (2007) A review of methods for correction of intensity inhomogeneity in MRI. IEEE TMI
    26(3):405-421).
    """
    c = np.asarray(coords, dtype=np.float64)
    centre = c.mean(axis=1, keepdims=True)
    scale = np.maximum(np.abs(c - centre).max(axis=1, keepdims=True), 1e-6)
    field = BiasField(centre, scale, degree, np.zeros(0))
    logs = np.log(np.maximum(np.asarray(values, dtype=np.float64), 1e-6))
    coef, *_ = np.linalg.lstsq(field.design(c), logs, rcond=None)
    return BiasField(centre, scale, degree, np.asarray(coef, dtype=np.float64))


def inu_summary(field: Array) -> tuple[float, float]:
    """Intensity non-uniformity from a multiplicative bias field sampled in the brain, normalised
    to its median: ``(P95 - P5, median before normalising)``.

    A range near 0 is better (a uniform receive field). MRIQC reports the same statistics of its
    N4 field (Tustison N.J. et al. (2010) N4ITK: improved N3 bias correction. IEEE TMI
    29(6):1310-1320); here the field is :func:`inu_field`'s, a fraction of N4's cost
    (N4 at 4 mm took 8 to 15 s here and varied with its fitting levels).
    """
    f = np.asarray(field, dtype=np.float64)
    f = f[np.isfinite(f) & (f > 0)]
    if f.size == 0:
        return 0.0, 1.0
    median = float(np.median(f))
    p5, p95 = np.percentile(f / median, [5, 95])
    return float(p95 - p5), median


def qi1(local_mean_air: Array, air: Array, z: float = 5.0) -> float:
    """Mortamet's quality index 1: the fraction of the air whose intensity is artefactual.

    Mortamet flags air voxels far above the noise distribution; faint but coherent motion
    ghosts hide under single-voxel noise, so here the test runs on the 3x3x3 local mean of the
    air (``local_mean_air``). A voxel is artefactual when its local mean exceeds the local
    means' median by more than ``z`` of their spread, measured as 1.4826 times the median
    distance below the median (the lower half, which ghosts, always brighter, do not reach).
    The spread is measured, not derived from the voxel spread over sqrt(27): a scanner's noise
    is correlated between neighbouring voxels (reconstruction filters, interpolation, parallel
    imaging), and the derived spread flagged 21 to 27 % of the air of clean real Siemens T1s
    (at most 5.2 % once measured; tests/test_realdata_heads.py). Lower is better. Mortamet B.
    et al. (2009) Automatic quality assessment in structural brain magnetic resonance imaging.
    MRM 62(2):365-372.
    """
    a = np.asarray(air, dtype=np.float64)
    keep = a > 0
    if keep.sum() < 1000:
        return 0.0
    local = np.asarray(local_mean_air, dtype=np.float64)[keep]
    centre = float(np.median(local))
    below = local[local < centre]
    spread = 1.4826 * float(np.median(centre - below)) if below.size else 0.0
    if spread <= 0:
        return 0.0
    return float(((local - centre) > z * spread).mean())


def clipped_fraction(head: Array) -> float:
    """Fraction of the head at the image's maximum value: saturation piles voxels up there.

    Lower is better; a healthy image has a handful of voxels at its maximum.
    """
    h = np.asarray(head)
    if h.size == 0:
        return 0.0
    return float((h >= h.max()).mean())
