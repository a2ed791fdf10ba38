"""The dashboard's plots, drawn on the server as PNG (matplotlib, Agg): nothing is fetched
from elsewhere by the browser.

One plot is drawn at a time (:func:`_one_at_a_time`): the routes run in a pool of threads, and
matplotlib is not thread-safe. Two strip plots drawn at once with log-scale ticks broke its
shared mathtext parser ("ParseException" on ``$\\mathdefault{10^{-4}}$``), and the browser got
a broken picture (seen in the dashboard's browser test, two pages' plots requested together).
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import math
import threading
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

from cohortflow.qc.dashboard.queries import MetricView, RunPoint

_P = ParamSpec("_P")
_R = TypeVar("_R")
_DRAWING = threading.Lock()


def _one_at_a_time(draw: Callable[_P, _R]) -> Callable[_P, _R]:
    """``draw`` under the process's one plotting lock (see the module's note)."""

    @functools.wraps(draw)
    def locked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _DRAWING:
            return draw(*args, **kwargs)

    return locked


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


@_one_at_a_time
def rates_over_time(runs: Sequence[RunPoint]) -> bytes:
    """The share of T1s with biomarkers at the end of each run, one line per protocol; the time
    axis spans the runs' own dates (one run: the day around it)."""
    import matplotlib.dates as mdates

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
    when = [p.finished_at for points in by_protocol.values() for p in points]
    if when:
        first, last = min(when), max(when)
        # matplotlib spans a single date over years; a margin of a twentieth of the runs'
        # span, and at least half a day, keeps the axis on the runs
        margin = max((last - first) / 20, dt.timedelta(hours=12))
        ax.set_xlim(first - margin, last + margin)
        locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        ax.legend(fontsize=8)
    else:
        ax.set_xticks([])
        ax.text(0.5, 0.5, "no finished run yet", ha="center", va="center", transform=ax.transAxes)
    return _png(plt, fig)


#: colours of the metric strips: the other series, this series, the acceptance range
OTHERS = "#7f8c99"
THIS = "#d55e00"
PASS_REGION = "#2e7d32"
FAIL_REGION = "#b3261e"


@_one_at_a_time
def metric_strips(metrics: Sequence[MetricView]) -> bytes:
    """Each metric that can fail a series as a strip: one dot per series of the same protocol
    and role (jittered up and down so that equal values stay visible), this series a large
    diamond, the acceptance range shaded and its thresholds drawn as lines. Drawn from the
    first series on: a strip needs no distribution, only the series and the range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = max(1, len(metrics))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 1.25 * rows + 0.4), squeeze=False)
    jitter = np.random.default_rng(0)  # the same picture for the same values
    for ax, metric in zip(axes.flat, metrics, strict=False):
        _strip(ax, metric, jitter)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    if not metrics:
        axes.flat[0].text(0.5, 0.5, "no metric measured", ha="center", va="center")
    handles = [
        Line2D([], [], ls="", marker="o", color=OTHERS, label="other series (protocol, role)"),
        Line2D([], [], ls="", marker="D", color=THIS, markeredgecolor="k", label="this series"),
        Patch(color=PASS_REGION, alpha=0.18, label="acceptance range"),
        Line2D([], [], color="k", ls="--", lw=1, label="threshold"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.3 / (1.25 * rows + 0.4), 1, 1), h_pad=0.8)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def _strip(ax, metric: MetricView, jitter) -> None:  # type: ignore[no-untyped-def]
    """One metric's strip (see ``metric_strips``)."""
    values = list(metric.cohort) + ([metric.value] if metric.value is not None else [])
    limits = [v for v in (metric.low, metric.high) if v is not None]
    seen = values + limits
    log = bool(seen) and min(seen) > 0 and max(seen) / min(seen) > 100
    if seen:
        low, high = min(seen), max(seen)
        # room beyond the outermost value or threshold: the failing side stays in sight
        if log:
            ax.set_xscale("log")
            left, right = low / 2.5, high * 2.5
        else:
            pad = (high - low) * 0.15 or abs(high) * 0.2 or 1.0
            left, right = low - pad, high + pad
        ax.set_xlim(left, right)
        if metric.has_range:
            start = metric.low if metric.low is not None else left
            stop = metric.high if metric.high is not None else right
            ax.axvspan(start, stop, color=PASS_REGION, alpha=0.18, lw=0)
            for side in ((left, start), (stop, right)):
                if side[1] > side[0]:
                    ax.axvspan(*side, color=FAIL_REGION, alpha=0.08, lw=0)
        for limit in limits:
            ax.axvline(limit, color="k", ls="--", lw=1)
    if metric.cohort:
        ax.scatter(
            metric.cohort,
            jitter.uniform(-0.28, 0.28, len(metric.cohort)),
            s=12,
            color=OTHERS,
            alpha=0.7,
            lw=0,
            zorder=2,
        )
    if metric.value is not None:
        ax.scatter([metric.value], [0], s=70, marker="D", color=THIS, edgecolor="k", zorder=3)
    ax.set_ylim(-0.5, 0.5)
    ax.set_yticks([])
    ax.tick_params(labelsize=7)
    shown = "not measured" if metric.value is None else f"{metric.value:.3g}"
    out = metric.passes is False
    if metric.has_range:
        consequence = {"fail": "fails the series", "warn": "warns", "ignore": "ignored"}
        what = f"pass {metric.range_text}"
        if metric.severity:
            what += f", else {consequence[metric.severity]}"
    else:
        what = "no acceptance range in the protocol"
    others = f"{len(metric.cohort)} other series" if metric.cohort else "the first series"
    ax.set_title(
        f"{metric.name} = {shown}{'  OUT OF RANGE' if out else ''}\n{what}; {others}",
        fontsize=7.5,
        loc="left",
        color="#b3261e" if out else "k",
    )


@_one_at_a_time
def cohort_bars(labels: Sequence[str], patients: Sequence[int | None], min_cell: int) -> bytes:
    """Patients per group of a cohort count; a suppressed cell is a hatched stub marked <k."""
    from matplotlib.ticker import MaxNLocator

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
    # counts of patients: whole numbers (a suppressed or small count once drew 0.0 to 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="x", alpha=0.3)
    if not labels:
        ax.text(0.5, 0.5, "no group", ha="center", va="center", transform=ax.transAxes)
    return _png(plt, fig)
