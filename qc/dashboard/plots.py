"""The dashboard's plots, drawn on the server as PNG (matplotlib, Agg): nothing is fetched
from elsewhere by the browser."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from cohortflow.qc.dashboard.queries import MetricView, RunPoint


def _figure(width: float, height: float):  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


def _png(plt, fig) -> bytes:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def rates_over_time(runs: Sequence[RunPoint]) -> bytes:
    """The share of T1s with biomarkers at the end of each run, one line per protocol."""
    plt, fig, ax = _figure(7.5, 2.8)
    by_protocol: dict[str, list[RunPoint]] = {}
    for run in runs:
        if run.t1_rate is not None:
            by_protocol.setdefault(run.protocol, []).append(run)
    for protocol, points in sorted(by_protocol.items()):
        ax.plot(
            [p.finished_at for p in points],
            [100 * (p.t1_rate or 0) for p in points],
            marker="o",
            label=protocol,
        )
    ax.set_ylim(0, 100)
    ax.set_ylabel("T1s with biomarkers (%)")
    ax.grid(alpha=0.3)
    if by_protocol:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished run yet", ha="center", va="center", transform=ax.transAxes)
    fig.autofmt_xdate()
    return _png(plt, fig)


def metric_distributions(metrics: Sequence[MetricView]) -> bytes:
    """Each image quality metric of the series (red) over its protocol's distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(metrics))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.0 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        if metric.cohort:
            ax.hist(metric.cohort, bins=min(20, max(5, len(metric.cohort) // 2)), color="#9ab")
        ax.axvline(metric.value, color="#c00", linewidth=2)
        ax.set_title(f"{metric.name} = {metric.value:.3g}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    return _png(plt, fig)


def cohort_bars(labels: Sequence[str], patients: Sequence[int | None], min_cell: int) -> bytes:
    """Patients per group of a cohort count; a suppressed cell is a hatched stub marked <k."""
    plt, fig, ax = _figure(7.5, max(1.6, 0.28 * len(labels) + 0.8))
    shown = [p or 0 for p in patients]
    top = max(shown, default=0) or 1
    ys = list(range(len(labels)))[::-1]
    for y, value, count in zip(ys, shown, patients, strict=True):
        if count is None:
            ax.barh(y, top * 0.02, color="white", edgecolor="#888", hatch="///")
            ax.text(top * 0.03, y, f"<{min_cell}", va="center", fontsize=8, color="#555")
        else:
            ax.barh(y, value, color="#3b6ea5")
            ax.text(value + top * 0.01, y, f"{value:,}", va="center", fontsize=8)
    ax.set_yticks(ys, [label[:48] for label in labels], fontsize=8)
    ax.set_xlabel("patients")
    ax.set_xlim(0, top * 1.12)
    ax.grid(axis="x", alpha=0.3)
    if not labels:
        ax.text(0.5, 0.5, "no group", ha="center", va="center", transform=ax.transAxes)
    return _png(plt, fig)
