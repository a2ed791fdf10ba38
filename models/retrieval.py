"""Selections and retrieval state in the archive index: records and repository functions."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from cohortflow.models.repository import insert_ignore, now
from cohortflow.models.schema import Instance, Retrieval, SelectedSeries, Selection, Series


class RetrievalStatus:
    PENDING = "pending"
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"  # fewer instances than the PACS announced, after every retry
    FAILED = "failed"  # the PACS refused or failed the transfer, after every retry
    GONE = "gone"  # the series is no longer in the PACS (deleted after selection)


@dataclass(frozen=True)
class ChosenSeries:
    """A series a selection chose (what retrieval works through)."""

    study_instance_uid: str
    series_instance_uid: str
    accession_number: str | None
    study_date: dt.date | None
    rule: str
    expected_instances: int | None


@dataclass(frozen=True)
class SelectionInfo:
    id: int
    protocol: str
    date_from: dt.date
    date_to: dt.date
    pacs: str
    studies: int
    series: int
    created_at: dt.datetime


@dataclass(frozen=True)
class RetrievalState:
    series_instance_uid: str
    study_instance_uid: str
    status: str
    expected: int | None
    archived: int
    attempts: int
    method: str | None
    reason_code: str | None
    reason: str | None


def save_selection(
    session: Session,
    *,
    protocol: str,
    date_from: dt.date,
    date_to: dt.date,
    pacs: str,
    protocols_file: str,
    protocols_sha256: str,
    studies: int,
    series: Sequence[ChosenSeries],
    listed_from: str | None = None,
) -> int:
    row = Selection(
        protocol=protocol,
        date_from=date_from,
        date_to=date_to,
        pacs=pacs,
        protocols_file=protocols_file,
        protocols_sha256=protocols_sha256,
        created_at=now(),
        studies=studies,
        series=len(series),
        listed_from=listed_from,
    )
    session.add(row)
    session.flush()
    if series:
        session.execute(
            insert(SelectedSeries),
            [
                {
                    "selection_id": row.id,
                    "study_instance_uid": s.study_instance_uid,
                    "series_instance_uid": s.series_instance_uid,
                    "accession_number": s.accession_number,
                    "study_date": s.study_date,
                    "rule": s.rule,
                    "expected_instances": s.expected_instances,
                }
                for s in series
            ],
        )
        stamp = now()
        insert_ignore(
            session,
            Retrieval.__table__,
            [
                {
                    "series_instance_uid": s.series_instance_uid,
                    "study_instance_uid": s.study_instance_uid,
                    "status": RetrievalStatus.PENDING,
                    "expected": s.expected_instances,
                    "archived": 0,
                    "attempts": 0,
                    "updated_at": stamp,
                }
                for s in series
            ],
            ["series_instance_uid"],
        )
    return row.id


def _info(row: Selection) -> SelectionInfo:
    return SelectionInfo(
        row.id,
        row.protocol,
        row.date_from,
        row.date_to,
        row.pacs,
        row.studies,
        row.series,
        row.created_at,
    )


def selection(session: Session, selection_id: int | None = None) -> SelectionInfo | None:
    """One selection by id, or the latest one."""
    query = select(Selection)
    query = (
        query.where(Selection.id == selection_id)
        if selection_id is not None
        else query.order_by(Selection.id.desc()).limit(1)
    )
    row = session.scalar(query)
    return _info(row) if row is not None else None


def chosen_series(session: Session, selection_id: int) -> list[ChosenSeries]:
    rows = session.scalars(
        select(SelectedSeries)
        .where(SelectedSeries.selection_id == selection_id)
        .order_by(SelectedSeries.study_date, SelectedSeries.study_instance_uid, SelectedSeries.id)
    )
    return [
        ChosenSeries(
            r.study_instance_uid,
            r.series_instance_uid,
            r.accession_number,
            r.study_date,
            r.rule,
            r.expected_instances,
        )
        for r in rows
    ]


def archived_counts(session: Session, series_uids: Sequence[str]) -> dict[str, int]:
    """Distinct SOP instances the archive index holds per series."""
    if not series_uids:
        return {}
    rows = session.execute(
        select(Series.series_instance_uid, func.count(func.distinct(Instance.sop_instance_uid)))
        .join(Instance, Instance.series_pk == Series.id)
        .where(Series.series_instance_uid.in_(list(series_uids)))
        .group_by(Series.series_instance_uid)
    )
    found = {uid: int(n) for uid, n in rows}
    return {uid: found.get(uid, 0) for uid in series_uids}


def archived_sops(session: Session, series_uid: str) -> set[str]:
    return set(
        session.scalars(
            select(Instance.sop_instance_uid)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.series_instance_uid == series_uid)
        )
    )


def retrieval_states(session: Session, series_uids: Sequence[str]) -> dict[str, RetrievalState]:
    if not series_uids:
        return {}
    rows = session.scalars(
        select(Retrieval).where(Retrieval.series_instance_uid.in_(list(series_uids)))
    )
    return {
        r.series_instance_uid: RetrievalState(
            r.series_instance_uid,
            r.study_instance_uid,
            r.status,
            r.expected,
            r.archived,
            r.attempts,
            r.method,
            r.reason_code,
            r.reason,
        )
        for r in rows
    }


def update_retrieval(
    session: Session,
    series_uid: str,
    *,
    status: str,
    archived: int,
    method: str | None,
    attempts: int = 0,
    reason_code: str | None = None,
    reason: str | None = None,
) -> None:
    row = session.scalar(select(Retrieval).where(Retrieval.series_instance_uid == series_uid))
    if row is None:
        raise LookupError(f"series {series_uid} was never selected")
    row.status = status
    row.archived = archived
    row.attempts += attempts
    row.method = method or row.method
    row.reason_code = reason_code
    row.reason = reason
    row.updated_at = now()
