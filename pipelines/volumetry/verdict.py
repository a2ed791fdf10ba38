"""Volumetry's own QC verdict: is the registration good, is the mask plausible, can the numbers
be trusted? Pure: a measurement's figures in, findings out (``qc.findings``)."""

from __future__ import annotations

from dataclasses import dataclass

from cohortflow.pipelines.volumetry.refine import MAX_SKULL_TO_CSF
from cohortflow.qc.findings import Finding, finding, reason, verdict

# Volumetry's checks (``volumetry.*``) are registered with every other check in
# ``qc.findings.CHECKS``: one registry the protocols and the dashboard read.


@dataclass(frozen=True)
class Limits:
    """Thresholds of the verdict (adult heads; the ICV range covers heads in MNI space too)."""

    # real heads' good fits: 0.52 (defaced 3 mm spin echo, open_ms_longitudinal) to 0.89;
    # whether a fit is good is asked of its neighbours (register.NEIGHBOUR_MM); this floor
    # catches what is not a T1 head at all (synthetic failures: 0.3)
    min_correlation: float = 0.45
    icv_ml: tuple[float, float] = (950.0, 2200.0)
    bpf: tuple[float, float] = (0.55, 0.97)
    # GM / WM volume: SAMSEG on the real heads of benchmarks/real.py 1.34 to 1.46, cohortflow
    # 1.44 to 1.84, the synthetic models 1.15 (Colin27) and 1.74 (atlas); a Siemens XA30
    # reconstruction without intensity normalisation was classified 0.42 with its classes in
    # T1 order (ROBEX failed on it too)
    gm_wm_ratio: tuple[float, float] = (0.8, 2.6)
    # of the registered volume, added plus removed; clean real heads (benchmarks/real.py):
    # 0.09 to 0.16, the atlas edge lying inside the subject's CSF over the brain
    max_edge_change: float = 0.20
    # the limit refine.py keeps the registered edge at (calibration there)
    max_skull_to_csf: float = MAX_SKULL_TO_CSF
    max_slice_mm: float = 2.0
    max_outside: float = 0.01  # of the intracranial mask on the image border


def judge(
    *,
    icv_ml: float,
    bpf: float,
    correlation: float,
    means: tuple[float, float, float],
    neighbour_gain: float = -1.0,
    gm_ml: float | None = None,
    wm_ml: float | None = None,
    converged: bool,
    edge_change: float,
    on_border: float,
    skull_to_csf: float | None = None,
    slice_mm: float,
    limits: Limits | None = None,
) -> list[Finding]:
    """Findings on one measurement (empty: nothing to say)."""
    lim = limits or Limits()
    out: list[Finding] = []
    if correlation < lim.min_correlation:
        out.append(
            finding(
                "volumetry.registration",
                f"the atlas head correlates {correlation:.2f} with the image after registration "
                f"(minimum {lim.min_correlation}): the registration failed or this is not a "
                "T1 head",
                round(correlation, 3),
                f">= {lim.min_correlation}",
            )
        )
    elif neighbour_gain > 0:
        out.append(
            finding(
                "volumetry.registration",
                f"the atlas head correlates {neighbour_gain:.3f} better with the image moved "
                f"a few millimetres: the registration stopped short of the fit",
                round(neighbour_gain, 4),
                "<= 0",
            )
        )
    lo, hi = lim.icv_ml
    if not lo <= icv_ml <= hi:
        out.append(
            finding(
                "volumetry.icv_range",
                f"intracranial volume {icv_ml:.0f} ml is outside the adult range "
                f"{lo:.0f}-{hi:.0f} ml",
                round(icv_ml, 1),
                f"{lo:.0f}-{hi:.0f}",
            )
        )
    lo, hi = lim.bpf
    if not lo <= bpf <= hi:
        out.append(
            finding(
                "volumetry.bpf_range",
                f"brain parenchymal fraction {bpf:.3f} is outside {lo}-{hi}",
                round(bpf, 4),
                f"{lo}-{hi}",
            )
        )
    csf, gm, wm = means
    if not csf < gm < wm:
        out.append(
            finding(
                "volumetry.tissue_contrast",
                f"class means CSF {csf:.0f}, GM {gm:.0f}, WM {wm:.0f} are not in T1 order: not a "
                "T1-weighted image, or the classification failed",
                f"{csf:.0f} / {gm:.0f} / {wm:.0f}",
                "CSF < GM < WM",
            )
        )
    if gm_ml is not None and wm_ml:
        ratio, (low, high) = gm_ml / wm_ml, lim.gm_wm_ratio
        if not low <= ratio <= high:
            out.append(
                finding(
                    "volumetry.tissue_ratio",
                    f"grey / white matter volume {ratio:.2f} is outside {low}-{high}: the "
                    "classification failed (a strong intensity non-uniformity, or not a T1)",
                    round(ratio, 3),
                    f"{low}-{high}",
                )
            )
    if edge_change > lim.max_edge_change:
        out.append(
            finding(
                "volumetry.mask_edge",
                f"refining the intracranial edge changed {edge_change:.1%} of the registered mask "
                f"(limit {lim.max_edge_change:.0%}): registration and image disagree",
                round(edge_change, 4),
                f"<= {lim.max_edge_change}",
            )
        )
    if skull_to_csf is not None and not skull_to_csf < lim.max_skull_to_csf:
        out.append(
            finding(
                "volumetry.edge_not_refined",
                f"the bone outside the intracranial mask is {skull_to_csf:.0%} as bright as CSF "
                "(intensity non-uniformity near the coil?): the edge is the registration's, "
                "not refined on the image (ICV less precise)",
                round(skull_to_csf, 3),
                f"< {lim.max_skull_to_csf}",
            )
        )
    if on_border > lim.max_outside:
        out.append(
            finding(
                "volumetry.coverage",
                f"{on_border:.1%} of the intracranial mask lies on the image border: the field of "
                "view cuts the head, the volumes are too small",
                round(on_border, 4),
                f"<= {lim.max_outside}",
            )
        )
    if slice_mm > lim.max_slice_mm:
        out.append(
            finding(
                "volumetry.thick_slices",
                f"slices {slice_mm:.1f} mm apart: partial volume across thick slices makes these "
                "volumes less precise (lower confidence)",
                round(slice_mm, 2),
                f"<= {lim.max_slice_mm}",
            )
        )
    if not converged:
        out.append(finding("volumetry.not_converged", "the tissue classification did not converge"))
    return out


__all__ = ["Limits", "judge", "reason", "verdict"]
