"""Protocol flow runs and the steps each selected study went through (the archive index).

Writes are keyed (a run by its id, a step by protocol, study and step), so a rerun after a crash
replaces rows instead of adding them. The same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cohortflow.models.repository import dialect_insert, now
from cohortflow.models.schema import Run, StudyStep

#: a step that ran to its end (its series' own verdicts are stage results)
DONE = "done"
#: a step that could not run (an exception, a missing input): a rerun redoes it
ERROR = "error"


@dataclass(frozen=True)
class StepRecord:
    """One study's outcome of one flow step (``StudyStep`` as a plain record)."""

    protocol: str
    study_uid: str
    step: str
    input_key: str
    method_version: str
    status: str
    reason_code: str | None = None
    message: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    run_id: int | None = None
    cpu_seconds: float | None = None
    recorded_at: dt.datetime | None = None


_STEP_COLUMNS = [
    f.name for f in fields(StepRecord) if f.name not in ("protocol", "study_uid", "step")
]


def record_step(session: Session, record: StepRecord) -> None:
    """Insert or replace the row of ``record`` (keyed by protocol, study and step)."""
    row = {f.name: getattr(record, f.name) for f in fields(StepRecord)}
    row["recorded_at"] = record.recorded_at or now()
    statement = dialect_insert(session, StudyStep).values(**row)
    statement = statement.on_conflict_do_update(
        index_elements=["protocol", "study_uid", "step"],
        set_={c: getattr(statement.excluded, c) for c in _STEP_COLUMNS},
    )
    session.execute(statement)


def _step(row: StudyStep) -> StepRecord:
    values = {f.name: getattr(row, f.name) for f in fields(StepRecord)}
    values["outputs"] = dict(row.outputs or {})
    return StepRecord(**values)


def step_record(session: Session, protocol: str, study_uid: str, step: str) -> StepRecord | None:
    row = session.scalars(
        select(StudyStep).where(
            StudyStep.protocol == protocol,
            StudyStep.study_uid == study_uid,
            StudyStep.step == step,
        )
    ).one_or_none()
    return None if row is None else _step(row)


def step_records(
    session: Session, protocol: str | None = None, study_uids: Iterable[str] | None = None
) -> list[StepRecord]:
    """Stored steps (of one protocol, of some studies), ordered by study and step."""
    query = select(StudyStep).order_by(StudyStep.study_uid, StudyStep.step)
    if protocol is not None:
        query = query.where(StudyStep.protocol == protocol)
    if study_uids is not None:
        wanted = list(study_uids)
        if not wanted:
            return []
        query = query.where(StudyStep.study_uid.in_(wanted))
    return [_step(row) for row in session.scalars(query)]


@dataclass(frozen=True)
class RunRecord:
    id: int
    flow_run_id: str | None
    protocol: str
    parameters: dict[str, Any]
    versions: dict[str, Any]
    state: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    summary: dict[str, Any]


def start_run(
    session: Session,
    protocol: str,
    parameters: Mapping[str, Any],
    versions: Mapping[str, Any],
    flow_run_id: str | None = None,
) -> int:
    """A new run row in state ``running``; its id. Earlier runs of the protocol still marked
    ``running`` ended without saying so (killed, crashed): they become ``interrupted``."""
    for stale in session.scalars(
        select(Run).where(Run.protocol == protocol, Run.state == "running")
    ):
        stale.state = "interrupted"
    run = Run(
        flow_run_id=flow_run_id,
        protocol=protocol,
        parameters=dict(parameters),
        versions=dict(versions),
        state="running",
        started_at=now(),
        finished_at=None,
        summary={},
    )
    session.add(run)
    session.flush()
    return int(run.id)


def finish_run(session: Session, run_id: int, state: str, summary: Mapping[str, Any]) -> None:
    run = session.get(Run, run_id)
    if run is None:
        raise KeyError(f"no run {run_id} in the index")
    run.state = state
    run.finished_at = now()
    run.summary = dict(summary)


def run_records(session: Session, protocol: str | None = None) -> list[RunRecord]:
    """Runs, newest first."""
    query = select(Run).order_by(Run.id.desc())
    if protocol is not None:
        query = query.where(Run.protocol == protocol)
    return [
        RunRecord(**{f.name: getattr(row, f.name) for f in fields(RunRecord)})
        for row in session.scalars(query)
    ]
