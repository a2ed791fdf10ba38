"""Image QC outliers over a whole run, after its studies were checked one by one.

A flow checks studies concurrently and in no fixed order; comparing each series with whatever
was recorded before it would make the outlier findings depend on that order. The flow checks
each study without the comparison, then calls :func:`recheck_outliers` once over every series of
the run: the same pools, whatever the order or the number of workers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from cohortflow.models.stages import StageRecord
from cohortflow.pipelines.dicom.protocols import ProtocolSet
from cohortflow.qc.findings import Finding, Severity, reason, verdict
from cohortflow.qc.outliers import outlier_findings

OUTLIER_PREFIX = "image.outlier."

#: the metrics stored for earlier series of (protocol, manufacturer, model), these series left out
History = Callable[[str, str, str, frozenset[str]], list[Mapping[str, object]]]


def _finding(stored: Mapping[str, Any]) -> Finding:
    value = stored.get("value")
    return Finding(
        str(stored["check"]),
        Severity(stored["severity"]),
        str(stored.get("message") or ""),
        value if isinstance(value, (int, float, str)) or value is None else str(value),
        None if stored.get("threshold") is None else str(stored["threshold"]),
    )


def recheck_outliers(
    records: Sequence[StageRecord], protocols: ProtocolSet, history: History | None
) -> list[StageRecord]:
    """The image QC rows of ``records`` with their outlier findings made again over the whole
    group (earlier series from ``history`` plus all of ``records``); the rows that changed."""
    groups: dict[tuple[str, str, str], list[StageRecord]] = defaultdict(list)
    for r in records:
        if r.protocol:
            groups[(r.protocol, r.manufacturer or "", r.model or "")].append(r)
    changed = []
    for (protocol_name, manufacturer, model), members in sorted(groups.items()):
        policy = protocols.get(protocol_name).qc
        here = frozenset(r.series_uid for r in members)
        earlier = history(protocol_name, manufacturer, model, here) if history else []
        everything = [*earlier, *(r.metrics for r in members)]
        pools = {
            name: [float(v) for m in everything if isinstance(v := m.get(name), (int, float))]
            for name in policy.outliers.metrics
        }
        group = f"{protocol_name} on {manufacturer} {model}".strip()
        for r in members:
            base = [
                _finding(f) for f in r.findings if not str(f["check"]).startswith(OUTLIER_PREFIX)
            ]
            findings = [*base, *outlier_findings(r.metrics, pools, policy, group)]
            stored = [f.as_dict() for f in findings]
            if stored == list(r.findings):
                continue
            deciding = reason(findings)
            changed.append(
                replace(
                    r,
                    status=verdict(findings).value,
                    reason_code=deciding.check if deciding else None,
                    message=deciding.message if deciding else None,
                    findings=stored,
                )
            )
    return changed
