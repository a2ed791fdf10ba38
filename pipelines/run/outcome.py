"""A run's row in the index: started with the code and tool versions, finished with the
protocol's success rates and a biomarker summary (counts and means only, no identifier)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cohortflow.models.database import IndexDB
from cohortflow.models.outcomes import ProtocolOutcome, protocol_outcome
from cohortflow.models.runs import finish_run, start_run
from cohortflow.models.schema import StageResult
from cohortflow.models.stages import BiomarkerRecord, biomarker_records
from cohortflow.models.volumes import VOLUME_NAMES

#: the distributions whose versions a run records
TOOLS = (
    "cohortflow",
    "prefect",
    "pydicom",
    "pynetdicom",
    "SimpleITK",
    "antspyx",
    "dcm2niix",
    "nibabel",
    "dask",
    "distributed",
)


def versions() -> dict[str, str]:
    found = {}
    for name in TOOLS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class BiomarkerSummary:
    """Mean and SD of the volumes of a protocol's measured T1s that no stage failed."""

    n: int
    means: dict[str, float] = field(default_factory=dict)
    sds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSummary:
    run_id: int
    protocol: str
    state: str
    outcome: dict[str, Any]
    biomarkers: BiomarkerSummary

    @property
    def rates(self) -> ProtocolOutcome:
        return outcome_from_dict(self.outcome)


def outcome_from_dict(data: Mapping[str, Any]) -> ProtocolOutcome:
    from cohortflow.models.outcomes import GroupRate, StageCount

    def strip(d: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k != "rate"}

    values = {k: v for k, v in data.items() if k not in ("study_rate", "t1_rate")}
    values["stages"] = [StageCount(**strip(s)) for s in data.get("stages", [])]
    values["scanners"] = [GroupRate(**strip(s)) for s in data.get("scanners", [])]
    return ProtocolOutcome(**values)


def summarize(rows: Sequence[BiomarkerRecord]) -> BiomarkerSummary:
    """Mean and SD of each volume over ``rows``."""
    if not rows:
        return BiomarkerSummary(0)
    means = {v: statistics.fmean(getattr(r.volumes, v) for r in rows) for v in VOLUME_NAMES}
    sds = {
        v: statistics.stdev(getattr(r.volumes, v) for r in rows) if len(rows) > 1 else 0.0
        for v in VOLUME_NAMES
    }
    return BiomarkerSummary(len(rows), means, sds)


def usable_biomarkers(session: Session, protocol: str) -> list[BiomarkerRecord]:
    """The protocol's biomarkers that no stage failed: volumetry's own verdict, and every other
    stage of the series (image QC outliers are judged after volumetry). A reviewer's newest
    decision counts: rejected series are left out, overridden ones kept."""
    from cohortflow.models.reviews import latest_reviews, still_failing

    every = biomarker_records(session, protocol)
    decisions = latest_reviews(session, [r.series_uid for r in every])
    failed: dict[str, set[str]] = {}
    for uid, stage in session.execute(
        select(StageResult.series_uid, StageResult.stage).where(
            StageResult.status == "fail",
            StageResult.series_uid.in_([r.series_uid for r in every]),
        )
    ):
        failed.setdefault(uid, set()).add(stage)
    for r in every:
        if r.qc_status == "fail":
            failed.setdefault(r.series_uid, set()).add("volumetry")
    return [
        r
        for r in every
        if not still_failing(failed.get(r.series_uid, set()), decisions.get(r.series_uid))
    ]


def biomarker_summary(index: IndexDB, protocol: str) -> BiomarkerSummary:
    with index.session() as session:
        rows = usable_biomarkers(session, protocol)
    return summarize(rows)


def start(
    index: IndexDB, protocol: str, parameters: Mapping[str, Any], flow_run_id: str | None
) -> int:
    with index.session() as session:
        return start_run(session, protocol, parameters, versions(), flow_run_id)


def finish(index: IndexDB, run_id: int, protocol: str, failed: bool) -> RunSummary:
    """Compute the protocol's outcome now, store it with the run, return it."""
    from dataclasses import asdict

    with index.session() as session:
        outcome = protocol_outcome(session, protocol).as_dict()
    summary = biomarker_summary(index, protocol)
    state = "failed" if failed else "completed"
    with index.session() as session:
        finish_run(session, run_id, state, {"outcome": outcome, "biomarkers": asdict(summary)})
    return RunSummary(run_id, protocol, state, outcome, summary)
