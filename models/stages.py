"""Stage results in the archive index: one row per series and stage, replaced on rerun.

The same on SQLite and PostgreSQL; writes are keyed by (series, stage), so recording a run again
after a crash leaves one row per key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from sqlalchemy import ColumnElement, func, insert, or_, select
from sqlalchemy.orm import Session

from cohortflow.models.repository import dialect_insert, now
from cohortflow.models.schema import Biomarker, StageHistory, StageResult
from cohortflow.models.series import SeriesDescriptor
from cohortflow.models.volumes import VOLUME_NAMES, Volumes


@dataclass(frozen=True)
class StageRecord:
    """What a stage concluded about one series (``StageResult`` as a plain record)."""

    series_uid: str
    study_uid: str
    stage: str
    status: str  # pass, warn, fail
    method_version: str
    protocol: str | None = None
    role: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    software_versions: str | None = None
    reason_code: str | None = None
    message: str | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    input_sha256: str | None = None
    seconds: float | None = None
    recorded_at: dt.datetime | None = None

    @classmethod
    def of(cls, describe: SeriesDescriptor, **fields: Any) -> StageRecord:
        """A row of a series with its protocol, role and scanner from ``describe``."""
        return cls(
            protocol=describe.protocol,
            role=describe.role,
            manufacturer=describe.manufacturer,
            model=describe.model,
            software_versions=describe.software_versions,
            **fields,
        )


_COLUMNS = (
    "study_uid",
    "protocol",
    "role",
    "manufacturer",
    "model",
    "software_versions",
    "status",
    "reason_code",
    "message",
    "findings",
    "metrics",
    "input_sha256",
    "method_version",
    "seconds",
    "recorded_at",
)


def record_stages(session: Session, records: Sequence[StageRecord]) -> None:
    """Insert or replace the rows of ``records`` (keyed by series and stage), and append them
    to the stage history."""
    if not records:
        return
    stamp = now()
    rows = [
        {
            "series_uid": r.series_uid,
            "stage": r.stage,
            **{c: getattr(r, c) for c in _COLUMNS if c != "recorded_at"},
            "recorded_at": r.recorded_at or stamp,
        }
        for r in records
    ]
    statement = dialect_insert(session, StageResult)
    statement = statement.on_conflict_do_update(
        index_elements=["series_uid", "stage"],
        set_={c: getattr(statement.excluded, c) for c in _COLUMNS},
    )
    session.execute(statement, rows)
    kept = ("series_uid", "stage", "status", "reason_code", "message", "method_version")
    session.execute(
        insert(StageHistory),
        [
            {
                **{c: row[c] for c in kept},
                "seconds": row["seconds"],
                "recorded_at": row["recorded_at"],
            }
            for row in rows
        ],
    )


def _record(row: StageResult) -> StageRecord:
    values = {f.name: getattr(row, f.name) for f in fields(StageRecord)}
    values["findings"] = list(row.findings or [])
    values["metrics"] = dict(row.metrics or {})
    return StageRecord(**values)


def stage_records(
    session: Session, stage: str | None = None, series_uids: Iterable[str] | None = None
) -> list[StageRecord]:
    """Stored results, of one stage and / or some series, ordered by series and stage."""
    query = select(StageResult).order_by(StageResult.series_uid, StageResult.stage)
    if stage is not None:
        query = query.where(StageResult.stage == stage)
    if series_uids is not None:
        wanted = list(series_uids)
        if not wanted:
            return []
        query = query.where(StageResult.series_uid.in_(wanted))
    return [_record(row) for row in session.scalars(query)]


def cohort_metrics(
    session: Session,
    stage: str,
    protocol: str,
    manufacturer: str,
    model: str,
    exclude: Iterable[str] = (),
) -> list[Mapping[str, Any]]:
    """The metrics stored for a stage, protocol and scanner model (the cohort a series is
    compared with), leaving out the series in ``exclude``. A scanner that does not say its
    manufacturer or model is stored without it (None; rows of earlier versions hold "")."""
    skip = set(exclude)

    def same(column: Any, value: str) -> ColumnElement[bool]:
        return column == value if value else or_(column.is_(None), column == "")

    query = select(StageResult.series_uid, StageResult.metrics).where(
        StageResult.stage == stage,
        StageResult.protocol == protocol,
        same(StageResult.manufacturer, manufacturer),
        same(StageResult.model, model),
    )
    return [dict(metrics or {}) for uid, metrics in session.execute(query) if uid not in skip]


def status_counts(session: Session, stage: str, protocol: str | None = None) -> dict[str, int]:
    """How many series of a stage (and protocol) passed, warned, failed."""
    query = select(StageResult.status, func.count()).where(StageResult.stage == stage)
    if protocol is not None:
        query = query.where(StageResult.protocol == protocol)
    return {status: int(n) for status, n in session.execute(query.group_by(StageResult.status))}


@dataclass(frozen=True)
class BiomarkerRecord:
    """The volumes of one T1 series (``Biomarker`` as a plain record)."""

    series_uid: str
    study_uid: str
    volumes: Volumes
    method: str
    method_version: str
    qc_status: str
    confidence: str
    protocol: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    qc_reason: str | None = None
    converter: str | None = None
    input_sha256: str | None = None
    recorded_at: dt.datetime | None = None


#: the record's fields that are columns of ``Biomarker`` as they are (the volumes are spread)
_PLAIN = tuple(f.name for f in fields(BiomarkerRecord) if f.name != "volumes")


def record_biomarkers(session: Session, records: Sequence[BiomarkerRecord]) -> None:
    """Insert or replace the biomarkers of ``records`` (one row per series)."""
    if not records:
        return
    stamp = now()
    columns = [c for c in (*VOLUME_NAMES, *_PLAIN) if c != "series_uid"]  # replaced on conflict
    rows = [{**r.volumes.as_dict(), **{c: getattr(r, c) for c in _PLAIN}} for r in records]
    for row in rows:
        row["recorded_at"] = row["recorded_at"] or stamp
    statement = dialect_insert(session, Biomarker)
    statement = statement.on_conflict_do_update(
        index_elements=["series_uid"],
        set_={c: getattr(statement.excluded, c) for c in columns},
    )
    session.execute(statement, rows)


def biomarker_records(session: Session, protocol: str | None = None) -> list[BiomarkerRecord]:
    """Stored biomarkers (of one protocol), ordered by study and series."""
    query = select(Biomarker).order_by(Biomarker.study_uid, Biomarker.series_uid)
    if protocol is not None:
        query = query.where(Biomarker.protocol == protocol)
    return [
        BiomarkerRecord(
            volumes=Volumes.of(row),
            **{name: getattr(row, name) for name in _PLAIN},
        )
        for row in session.scalars(query)
    ]


@dataclass(frozen=True)
class HistoryRecord:
    """One stage result as it was recorded at the time (``StageHistory``)."""

    stage: str
    status: str
    reason_code: str | None
    message: str | None
    method_version: str
    seconds: float | None
    recorded_at: dt.datetime


def stage_history(session: Session, series_uid: str) -> list[HistoryRecord]:
    """Every result recorded for a series, oldest first."""
    query = (
        select(StageHistory)
        .where(StageHistory.series_uid == series_uid)
        .order_by(StageHistory.recorded_at, StageHistory.id)
    )
    return [
        HistoryRecord(
            r.stage, r.status, r.reason_code, r.message, r.method_version, r.seconds, r.recorded_at
        )
        for r in session.scalars(query)
    ]
