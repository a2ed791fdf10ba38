"""What a synthetic cohort contains, counted from its ground truth (no identifiers)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cohortflow.models.synth import CohortTruth


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


#: An accession number the demo manifest promises but the synthetic delivery lacks, so the
#: accounting has a missing study to show.
UNDELIVERED_ACCESSION = "A00000000"


def write_manifest(truth: CohortTruth, path: Path, *, undelivered: bool = False) -> Path:
    """A delivery manifest for the cohort: accession number and expected instances per study.

    Studies that share an accession number (the duplicate-accession fault) are one line with the
    sum of their instances, as a PACS export listing accession numbers would have it.
    """
    expected: dict[str, int] = {}
    for patient in truth.patients:
        for study in patient.studies:
            count = sum(series.instances for series in study.series)
            expected[study.accession_number] = expected.get(study.accession_number, 0) + count
    lines = ["AccessionNumber,ExpectedFiles"]
    lines += [f"{accession},{count}" for accession, count in sorted(expected.items())]
    if undelivered:
        lines.append(f"{UNDELIVERED_ACCESSION},100")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
