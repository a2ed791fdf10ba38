"""Group comparison of brain volumes, as Leung et al. (2014) report dementia against controls.

Per group: n, mean and SD of each biomarker. Each other group against the reference group:
the difference of means, Welch's t-test (unequal variances; ``scipy.stats.ttest_ind``), its
two-sided p value, and Cohen's d (difference over the pooled SD).

ICV adjustment (``adjust="icv"``): head size explains much of the spread of absolute volumes
(an ICV SD of about 130 ml hides a 3 % atrophy in 40 subjects). Each volume except ICV is
corrected by the covariance method: v_adj = v - b (ICV - mean ICV), b the within-group slope
of v on ICV pooled over the groups (an ANCOVA with a common slope; Jack et al., Radiology 1989;
O'Brien et al., NeuroImage 2011). BPF, a ratio, needs none.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cohortflow.models.volumes import VOLUME_NAMES
from cohortflow.pipelines.export.errors import StatsError

BIOMARKERS = VOLUME_NAMES
ADJUSTABLE = ("gm_ml", "wm_ml", "csf_ml", "brain_ml")
ADJUSTMENTS = ("icv",)


@dataclass(frozen=True)
class GroupStats:
    group: str
    n: int
    mean: float
    sd: float


@dataclass(frozen=True)
class Contrast:
    """``group`` against the reference group on one biomarker."""

    group: str
    reference: str
    difference: float
    percent: float
    t: float
    df: float
    p: float
    cohens_d: float


@dataclass(frozen=True)
class BiomarkerComparison:
    biomarker: str
    adjusted: bool
    groups: list[GroupStats]
    contrasts: list[Contrast]


@dataclass(frozen=True)
class Comparison:
    by: str
    reference: str
    adjust: str | None
    #: the slope b of each adjusted volume on ICV (ml per ml)
    slopes: dict[str, float]
    biomarkers: list[BiomarkerComparison]
    #: rows left out: not usable (QC, review), or without a value of ``by``
    excluded: int
    #: the (adjusted) values per biomarker and group, for the plot
    values: dict[str, dict[str, list[float]]]

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = asdict(self)
        out.pop("values")
        return out


def _pooled_slope(groups: Mapping[str, Sequence[Mapping[str, Any]]], name: str) -> float:
    num = den = 0.0
    for rows in groups.values():
        icv = [float(r["icv_ml"]) for r in rows]
        vol = [float(r[name]) for r in rows]
        mi, mv = statistics.fmean(icv), statistics.fmean(vol)
        num += sum((a - mi) * (b - mv) for a, b in zip(icv, vol, strict=True))
        den += sum((a - mi) ** 2 for a in icv)
    if den == 0:
        raise StatsError("ICV does not vary within the groups: cannot adjust for it")
    return num / den


def compare(
    rows: Sequence[Mapping[str, Any]],
    by: str,
    adjust: str | None = None,
    reference: str | None = None,
    biomarkers: Sequence[str] = BIOMARKERS,
) -> Comparison:
    """Compare the usable rows of a biomarker table grouped by column ``by``."""
    from scipy import stats

    if adjust is not None and adjust not in ADJUSTMENTS:
        raise StatsError(f"--adjust must be one of {', '.join(ADJUSTMENTS)}, not {adjust!r}")
    if rows and by not in rows[0]:
        known = ", ".join(k for k in rows[0] if k not in BIOMARKERS)
        raise StatsError(f"no column {by!r} to group by; the table has {known}")
    kept = [r for r in rows if r.get("usable", True) and str(r.get(by) or "").strip()]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in kept:
        groups.setdefault(str(r[by]).strip(), []).append(r)
    sized = {g: members for g, members in sorted(groups.items()) if len(members) >= 2}
    if len(sized) < 2:
        counts = ", ".join(f"{g}: {len(m)}" for g, m in sorted(groups.items())) or "none"
        raise StatsError(
            f"grouping by {by!r} needs at least two groups of two usable rows; found {counts}"
        )
    if reference is None:
        reference = next(iter(sized))
    elif reference not in sized:
        raise StatsError(f"reference group {reference!r} is not among {', '.join(sized)}")
    slopes = (
        {name: _pooled_slope(sized, name) for name in ADJUSTABLE if name in biomarkers}
        if adjust == "icv"
        else {}
    )
    grand_icv = statistics.fmean(float(r["icv_ml"]) for m in sized.values() for r in m)

    def value(r: Mapping[str, Any], name: str) -> float:
        v = float(r[name])
        if name in slopes:
            v -= slopes[name] * (float(r["icv_ml"]) - grand_icv)
        return v

    results = []
    values: dict[str, dict[str, list[float]]] = {}
    for name in biomarkers:
        per_group = {g: [value(r, name) for r in m] for g, m in sized.items()}
        values[name] = per_group
        summary = [
            GroupStats(g, len(v), statistics.fmean(v), statistics.stdev(v))
            for g, v in per_group.items()
        ]
        ref = per_group[reference]
        contrasts = []
        for g, v in per_group.items():
            if g == reference:
                continue
            test = stats.ttest_ind(v, ref, equal_var=False)
            n1, n2 = len(v), len(ref)
            s1, s2 = statistics.variance(v), statistics.variance(ref)
            pooled = math.sqrt(((n1 - 1) * s1 + (n2 - 1) * s2) / (n1 + n2 - 2))
            diff = statistics.fmean(v) - statistics.fmean(ref)
            contrasts.append(
                Contrast(
                    group=g,
                    reference=reference,
                    difference=diff,
                    percent=100 * diff / statistics.fmean(ref),
                    t=float(test.statistic),
                    df=float(test.df),
                    p=float(test.pvalue),
                    cohens_d=diff / pooled if pooled > 0 else math.nan,
                )
            )
        results.append(BiomarkerComparison(name, name in slopes, summary, contrasts))
    return Comparison(
        by=by,
        reference=reference,
        adjust=adjust,
        slopes=slopes,
        biomarkers=results,
        excluded=len(rows) - sum(len(m) for m in sized.values()),
        values=values,
    )


LABELS = {
    "icv_ml": "ICV (ml)",
    "gm_ml": "GM (ml)",
    "wm_ml": "WM (ml)",
    "csf_ml": "CSF (ml)",
    "brain_ml": "brain (ml)",
    "bpf": "BPF",
}


def box_plot(comparison: Comparison, path: Path) -> None:
    """One box plot per biomarker (groups side by side, points over the boxes, the p value of
    each contrast in the title), written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [b.biomarker for b in comparison.biomarkers]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, result in zip(axes.flat, comparison.biomarkers, strict=False):
        groups = list(comparison.values[result.biomarker])
        data = [comparison.values[result.biomarker][g] for g in groups]
        ax.boxplot(data, tick_labels=groups, showfliers=False)
        for i, points in enumerate(data, start=1):
            jitter = [i + 0.08 * ((k * 7919) % 11 - 5) / 5 for k in range(len(points))]
            ax.scatter(jitter, points, s=9, alpha=0.6, color="#444")
        ps = ", ".join(f"p={_p(c.p)}" for c in result.contrasts)
        adjusted = " (ICV-adjusted)" if result.adjusted else ""
        ax.set_title(
            f"{LABELS.get(result.biomarker, result.biomarker)}{adjusted}\n{ps}", fontsize=9
        )
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"by {comparison.by} (reference: {comparison.reference})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"
