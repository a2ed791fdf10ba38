"""Reviewers' decisions on automatic QC verdicts (pseudonymized side: keyed by the series UID
the stages saw). Every decision is kept and audited; the newest per series counts in the
success rates, the biomarker export and the next run's volumetry."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from cohortflow.models.errors import ReviewError
from cohortflow.models.linkage import audit
from cohortflow.models.repository import now
from cohortflow.models.schema import Review

ACCEPT, REJECT, OVERRIDE = "accept", "reject", "override"
DECISIONS = (ACCEPT, REJECT, OVERRIDE)
#: the stages whose failures a reviewer can override: the QC verdicts. A defacing failure is
#: a privacy stop, not a quality judgement, and cannot be overridden.
QC_STAGES = ("header_qc", "image_qc", "volumetry")


def set_aside(stage: str, decision: str | None) -> bool:
    """Whether a reviewer's ``decision`` sets aside a failure of ``stage`` (an override does,
    for the QC stages)."""
    return decision == OVERRIDE and stage in QC_STAGES


def still_failing(failed_stages: Iterable[str], decision: str | None) -> set[str]:
    """The stages that still stop a series after its newest review (``review`` for a
    rejection): the series is usable when none is left."""
    left = {stage for stage in failed_stages if not set_aside(stage, decision)}
    return left | {"review"} if decision == REJECT else left


@dataclass(frozen=True)
class ReviewRecord:
    series_uid: str
    decision: str
    verdict: str
    reason_code: str | None
    comment: str
    reviewer: str
    at: dt.datetime


def _record(row: Review) -> ReviewRecord:
    return ReviewRecord(
        row.series_uid,
        row.decision,
        row.verdict,
        row.reason_code,
        row.comment,
        row.reviewer,
        row.at,
    )


def record_review(
    session: Session,
    series_uid: str,
    decision: str,
    comment: str,
    reviewer: str,
    verdict: str,
    reason_code: str | None,
) -> ReviewRecord:
    """Store a decision on ``series_uid``'s verdict (``verdict`` / ``reason_code``: what the
    reviewer saw) and write it to the audit log."""
    if decision not in DECISIONS:
        raise ReviewError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    comment = comment.strip()
    if not comment:
        raise ReviewError("a review needs a comment saying why")
    if decision == OVERRIDE and verdict != "fail":
        raise ReviewError(f"only a failed verdict can be overridden; this one is {verdict!r}")
    row = Review(
        series_uid=series_uid,
        decision=decision,
        verdict=verdict,
        reason_code=reason_code,
        comment=comment,
        reviewer=reviewer,
        at=now(),
    )
    session.add(row)
    detail = {"series": series_uid, "decision": decision, "verdict": verdict}
    audit(session, "review", json.dumps(detail | {"reason": reason_code}), actor=reviewer)
    session.flush()
    return _record(row)


def reviews_of(session: Session, series_uid: str) -> list[ReviewRecord]:
    """Every decision on a series, newest first."""
    query = (
        select(Review)
        .where(Review.series_uid == series_uid)
        .order_by(Review.at.desc(), Review.id.desc())
    )
    return [_record(r) for r in session.scalars(query)]


def latest_reviews(session: Session, series_uids: Iterable[str] | None = None) -> dict[str, str]:
    """Series UID -> its newest decision (of the given series, or of all reviewed ones)."""
    query = select(Review.series_uid, Review.decision).order_by(Review.at, Review.id)
    if series_uids is not None:
        wanted = list(series_uids)
        if not wanted:
            return {}
        query = query.where(Review.series_uid.in_(wanted))
    return {uid: decision for uid, decision in session.execute(query)}


def reviewed_verdict(statuses: Iterable[tuple[str, str]], decision: str | None) -> str | None:
    """The verdict on a series after its newest review, from its (stage, status) results:
    ``fail`` while a failure still stops it (or it was rejected), ``warn`` when it warned or a
    failure was overridden, else ``pass``; None when no stage has judged it."""
    results = list(statuses)
    if not results and decision != REJECT:
        return None
    failed = {stage for stage, status in results if status == "fail"}
    if still_failing(failed, decision):
        return "fail"
    return "warn" if failed or any(status == "warn" for _, status in results) else "pass"
