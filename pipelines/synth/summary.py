"""What a synthetic cohort contains, counted from its ground truth (no identifiers)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from models.synth import CohortTruth


@dataclass(frozen=True)
class CohortSummary:
    patients: int
    studies: int
    series: int
    files: int
    groups: dict[str, int]  # patients per group (dementia, control, other)
    studies_by_protocol: dict[str, int]
    series_by_protocol: dict[str, int]
    series_by_kind: dict[str, int]
    faults: dict[str, int]  # planted count per fault class
    identifiers: int  # planted identifier locations
    head_model: str


def summarize(truth: CohortTruth) -> CohortSummary:
    studies = [s for p in truth.patients for s in p.studies]
    series = [(s.protocol, se) for s in studies for se in s.series]
    return CohortSummary(
        patients=len(truth.patients),
        studies=len(studies),
        series=len(series),
        files=sum(se.files for _, se in series) + sum(len(s.non_dicom_files) for s in studies),
        groups=dict(sorted(Counter(p.group for p in truth.patients).items())),
        studies_by_protocol=dict(sorted(Counter(s.protocol for s in studies).items())),
        series_by_protocol=dict(sorted(Counter(proto for proto, _ in series).items())),
        series_by_kind=dict(sorted(Counter(se.kind for _, se in series).items())),
        faults={f.value: c.planted for f, c in truth.fault_counts.items()},
        identifiers=len(truth.identifiers),
        head_model=truth.head_model,
    )
