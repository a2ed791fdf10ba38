"""Image QC of a structural volume: quality metrics, coverage, artefacts, held to the protocol.

Pure compute: a volume in (slice, row, column) order with its voxel spacing and, when the caller
could place one, an intracranial mask on the same grid (a template registered to the image; see
``pipelines.quality``). Out come the metrics (:data:`qc.metrics.METRICS`) and the findings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cohortflow.qc import metrics as m
from cohortflow.qc.findings import Finding
from cohortflow.qc.masks import (
    FloatArray,
    Tissues,
    air_mask,
    block_mean,
    factors_for,
    head_mask,
    tissue_classes,
)
from cohortflow.qc.metrics import METRIC_CHECKS
from cohortflow.qc.policy import QcPolicy, finite

BoolArray = npt.NDArray[np.bool_]

_WHAT = {
    "icv_ml": "intracranial volume of the placed template {v:.0f} ml",
    "coverage_outside": "{p:.1%} of the brain lies outside the field of view",
    "clipped_fraction": "{p:.2%} of the head sits at the maximum value (saturated)",
    "qi1": "artefacts (motion, ghosting) in {p:.2%} of the air",
    "snrd_wm": "white-matter SNR {v:.3g}",
    "snr_wm": "white-matter SNR from its own spread {v:.3g}",
    "cnr": "grey/white contrast-to-noise ratio {v:.3g}",
    "cjv": "coefficient of joint variation {v:.3g}",
    "efc": "entropy focus criterion {v:.3g}",
    "fber": "foreground/background energy ratio {v:.3g}",
    "wm2max": "white matter / maximum intensity {v:.3g}",
    "inu_range": "intensity non-uniformity range {v:.3g}",
}

#: Below this head volume the image holds no head (ml).
MIN_HEAD_ML = 200.0


@dataclass(frozen=True)
class Brain:
    """The intracranial mask the caller placed on the volume, or why it could not."""

    mask: BoolArray | None
    #: fraction of the template's intracranial space that falls outside the field of view
    outside: float | None = None
    problem: str | None = None


@dataclass(frozen=True)
class ImageResult:
    findings: tuple[Finding, ...]
    metrics: dict[str, float | None] = field(default_factory=dict)


def check_image(
    volume: FloatArray,
    spacing: tuple[float, float, float],
    brain: Brain,
    policy: QcPolicy,
) -> ImageResult:
    """Measure the image and hold each metric to the protocol's range (``policy.image``)."""
    findings: list[Finding] = []

    def add(check: str, message: str, value: float | None, threshold: str | None) -> None:
        findings.append(Finding(check, policy.severity_of(check), message, value, threshold))

    volume = np.asarray(volume, dtype=np.float32)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    values: dict[str, float | None] = {}
    head = None
    if float(volume.max(initial=0.0)) > float(volume.min(initial=0.0)):
        head, _ = head_mask(volume, spacing)
    head_ml = float(head.sum()) * voxel_ml if head is not None else 0.0
    values["head_ml"] = round(head_ml, 1)
    if head is None or head_ml < MIN_HEAD_ML:
        add(
            "image.empty",
            f"no head found: {head_ml:.0f} ml above the noise (at least {MIN_HEAD_ML:g} ml)",
            round(head_ml, 1),
            f">= {MIN_HEAD_ML:g} ml",
        )
        return ImageResult(tuple(findings), values)

    air = air_mask(head, spacing)
    air_values = volume[air]
    sigma = m.noise_sigma(air_values)
    lit = air_values[air_values > 0]
    sd_air = float(lit.std()) if lit.size > 1 else 0.0
    local = ndimage.uniform_filter(volume, 3)[air]
    values["qi1"] = m.qi1(local, air_values)
    head_values = volume[head]
    values["clipped_fraction"] = m.clipped_fraction(head_values)
    values["efc"] = m.efc(volume)
    values["fber"] = m.fber(head_values, air_values)
    values["noise_sigma"] = sigma
    values["coverage_outside"] = brain.outside
    if sigma is None:
        # never a silent pass: without noise in the air, SNR, QI1 and FBER say nothing
        add(
            "image.no_noise_estimate",
            f"only {lit.size} voxels of the air carry signal (zero-filled or cropped "
            "background): the noise, and with it SNR, motion artefacts (QI1) and FBER, cannot be "
            "measured",
            float(lit.size),
            ">= 1000 voxels",
        )

    if brain.mask is None:
        add(
            "image.brain_mask",
            f"the brain template cannot be placed: {brain.problem or 'no mask'}",
            None,
            None,
        )
    else:
        values["icv_ml"] = round(float(brain.mask.sum()) * voxel_ml, 1)
        # tissue work on the brain's bounding box only (a third of a head-sized volume)
        box = _bounding_box(brain.mask, margin=2)
        sub, sub_head = volume[box], head[box]
        intracranial = brain.mask[box] & sub_head
        if not intracranial.any():
            intracranial = brain.mask[box]
        tissues, inu = _tissues(sub, intracranial, spacing)
        wm, gm = sub[tissues.wm].astype(np.float64), sub[tissues.gm].astype(np.float64)
        if wm.size >= 100 and gm.size >= 100:
            (mu_wm, sd_wm), (mu_gm, sd_gm) = m.location_spread(wm), m.location_spread(gm)
            values["snrd_wm"] = m.snr_dietrich(mu_wm, sigma)
            values["snr_wm"] = m.snr(mu_wm, sd_wm)
            values["cnr"] = m.cnr(mu_wm, mu_gm, sd_air, sd_wm, sd_gm)
            values["cjv"] = m.cjv(mu_wm, mu_gm, sd_wm, sd_gm)
            values["wm2max"] = m.wm2max(wm, head_values)
            values["wm_median"] = float(np.median(wm))
            values["gm_median"] = float(np.median(gm))
            values["inu_range"] = inu

    values = {k: _round(finite(v)) for k, v in values.items()}
    for name, check in METRIC_CHECKS.items():
        allowed = policy.image.get(name)
        value = values.get(name)
        if allowed is None or value is None or allowed.contains(value):
            continue
        what = _WHAT[name].format(v=value, p=value)
        add(check, f"{what}, outside the protocol's {allowed.text()}", value, allowed.text())
    return ImageResult(tuple(findings), values)


def _round(value: float | None) -> float | None:
    if value is None:
        return None
    if value == 0:
        return 0.0
    return round(value, max(0, 5 - math.floor(math.log10(abs(value)))))


def _bounding_box(mask: BoolArray, margin: int) -> tuple[slice, slice, slice]:
    """The index box holding ``mask``, grown by ``margin`` voxels within the array."""
    found = np.argwhere(mask)
    lo = np.maximum(found.min(axis=0) - margin, 0)
    hi = np.minimum(found.max(axis=0) + margin + 1, mask.shape)
    return (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))


def _tissues(
    sub: FloatArray, intracranial: BoolArray, spacing: tuple[float, float, float], rounds: int = 3
) -> tuple[Tissues, float | None]:
    """Tissue classes found on the image corrected for its bias field, and the field's range.

    The field is fitted to white matter (:func:`qc.metrics.inu_field`), the image divided by it,
    white matter found again, ``rounds`` times, at about 2 mm (the field is smooth): a strong
    field otherwise keeps the dim side of the white matter out of its class and the fit
    flattens (range 0.15 found for 0.44 applied on a phantom). The classes are then found at
    full resolution on the corrected image; the metrics are measured on the image as acquired,
    non-uniformity included, as MRIQC does.
    """
    factors = factors_for(spacing)
    low = block_mean(sub, factors)
    low_inside = block_mean(intracranial.astype(np.float32), factors) > 0.5
    low_spacing = (spacing[0] * factors[0], spacing[1] * factors[1], spacing[2] * factors[2])
    # full-resolution index of each low-resolution voxel's centre
    to_full = np.array(factors, dtype=np.float64)[:, None]
    offset = (to_full - 1) / 2
    low_points = np.argwhere(low_inside).T
    corrected = low
    field: m.BiasField | None = None
    for _ in range(rounds):
        wm = tissue_classes(corrected, low_inside, low_spacing).wm
        wm_points = np.argwhere(wm).T
        if wm_points.shape[1] < 200:
            break
        field = m.inu_field(low[tuple(wm_points)], wm_points * to_full + offset)
        inside = field(low_points * to_full + offset)
        scale = np.ones(low.shape, np.float32)
        scale[tuple(low_points)] = (inside / np.median(inside)).astype(np.float32)
        corrected = low / scale
    if field is None:
        return tissue_classes(sub, intracranial, spacing), None
    full = field.on_grid((sub.shape[0], sub.shape[1], sub.shape[2]))
    in_brain = full[intracranial]
    inu = m.inu_summary(in_brain[:: max(1, len(in_brain) // 200_000)])[0]
    scale = np.where(intracranial, full / np.float32(np.median(in_brain)), np.float32(1.0))
    return tissue_classes(sub / scale, intracranial, spacing), inu


def outside_fraction(
    points_lps: npt.NDArray[np.float64],
    lps_to_index: npt.NDArray[np.float64],
    shape: tuple[int, ...],
) -> float:
    """Fraction of ``points_lps`` (3 x N, patient millimetres) that fall outside a volume of
    ``shape`` whose (k, r, c) indices ``lps_to_index`` gives (voxel centres at integers)."""
    if points_lps.shape[1] == 0:
        return 0.0
    index = lps_to_index[:3, :3] @ points_lps + lps_to_index[:3, 3:4]
    upper = np.asarray(shape, dtype=np.float64)[:, None] - 0.5
    inside = np.all((index >= -0.5) & (index <= upper), axis=0)
    return float(1.0 - inside.mean())
