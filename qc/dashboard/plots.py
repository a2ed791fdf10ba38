"""The dashboard's plots, drawn on the server as PNG (matplotlib, Agg): nothing is fetched
from elsewhere by the browser."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from qc.dashboard.queries import MetricView, RunPoint


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
