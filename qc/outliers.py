"""Outliers within a protocol and scanner: robust z-scores of image metrics over the cohort.

One global threshold misfires across sites (a 1.5 T scanner's SNR is another 3 T scanner's
failure), so besides the protocol's fixed ranges each metric is compared with the series of the
same protocol and scanner model seen so far.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cohortflow.qc.findings import Finding
from cohortflow.qc.metrics import METRICS
from cohortflow.qc.policy import QcPolicy


def robust_z(value: float, pool: Sequence[float]) -> float | None:
    """Modified z-score ``0.6745 (x - median) / MAD`` (Iglewicz B., Hoaglin D.C. (1993) How to
    detect and handle outliers. ASQC Quality Press); None when the pool has no spread."""
    values = np.asarray(pool, dtype=np.float64)
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    if mad <= 0:
        return None
    return 0.6745 * (value - median) / mad


def outlier_findings(
    metrics: Mapping[str, float | str | None],
    pools: Mapping[str, Sequence[float]],
    policy: QcPolicy,
    group: str,
) -> list[Finding]:
    """Findings for the metrics of one series that lie beyond ``policy.outliers.z`` in their
    pool (the values of its protocol and scanner, itself included). ``group`` names the pool
    for the message (e.g. "dementia on SIEMENS Skyra")."""
    rules = policy.outliers
    out = []
    for name in rules.metrics:
        value = metrics.get(name)
        pool = pools.get(name, ())
        if not isinstance(value, (int, float)) or len(pool) < rules.min_series:
            continue
        z = robust_z(float(value), pool)
        if z is None or abs(z) <= rules.z:
            continue
        check = f"image.outlier.{name}"
        direction = "high" if z > 0 else "low"
        out.append(
            Finding(
                check,
                policy.severity_of(check),
                f"{name} {value:.3g} is unusually {direction} for {group} (robust z {z:+.1f} over "
                f"{len(pool)} series; {METRICS[name][1]} is better)",
                round(z, 2),
                f"|z| <= {rules.z:g}",
            )
        )
    return out
