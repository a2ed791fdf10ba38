"""What the dashboard shows, read from the index's pseudonymized side only: stage results,
their history, biomarkers, reviews, runs. Nothing here touches patients, studies, series or
linkage (the identified tables), so no page can show an identifier."""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.orm import Session

from cohortflow.models.outcomes import (
    SERIES_STAGES,
    ProtocolOutcome,
    protocol_outcome,
    worst_verdict,
)
from cohortflow.models.reviews import ReviewRecord, latest_reviews, reviews_of
from cohortflow.models.schema import AuditEntry, Biomarker, Review, Run, Selection, StageResult
from cohortflow.models.stages import HistoryRecord, StageRecord, stage_history, stage_records
from cohortflow.models.volumes import VOLUME_NAMES
from cohortflow.qc.findings import CHECKS
from cohortflow.qc.metrics import METRIC_CHECKS, METRICS
from cohortflow.qc.policy import QcPolicy

#: the failure list's sortable columns
SORTS = ("recorded_at", "protocol", "stage", "reason_code", "scanner", "series_uid")
STATUSES = ("fail", "warn")


def reason_title(code: str | None) -> str:
    """What failed, for a reason code: its check's failure text (families: the longest known
    prefix); empty for a code of no registered check."""
    if not code:
        return ""
    parts = code.split(".")
    for n in range(len(parts), 0, -1):
        check = CHECKS.get(".".join(parts[:n]))
        if check is not None:
            return check.failed
    return ""


@dataclass(frozen=True)
class RunPoint:
    """One finished run of a protocol: when, and its rates at the end."""

    run_id: int
    protocol: str
    finished_at: dt.datetime
    state: str
    t1_rate: float | None
    stage_rates: dict[str, float | None]


@dataclass(frozen=True)
class Overview:
    outcomes: list[ProtocolOutcome]
    runs: list[RunPoint]
    #: reason code -> failing series (every protocol, the latest results)
    reasons: list[tuple[str, str, int]]
    reviewed: int
    to_review: int


def protocols(session: Session) -> list[str]:
    found = set(session.scalars(select(Selection.protocol)))
    found |= {p for p in session.scalars(select(StageResult.protocol).distinct()) if p}
    return sorted(found)


def run_points(session: Session) -> list[RunPoint]:
    """Every finished run with its rates at the end, oldest first."""
    runs = []
    for run in session.scalars(
        select(Run).where(Run.finished_at.is_not(None)).order_by(Run.finished_at)
    ):
        summary: dict[str, Any] = dict(dict(run.summary or {}).get("outcome") or {})  # type: ignore[call-overload]
        assert run.finished_at is not None
        runs.append(
            RunPoint(
                run.id,
                run.protocol,
                run.finished_at,
                run.state,
                summary.get("t1_rate"),
                {s["stage"]: s.get("rate") for s in summary.get("stages", [])},
            )
        )
    return runs


def overview(session: Session) -> Overview:
    names = sorted(set(session.scalars(select(Selection.protocol))))
    outcomes = [protocol_outcome(session, name) for name in names]
    runs = run_points(session)
    failing = session.execute(
        select(StageResult.stage, StageResult.reason_code, func.count())
        .where(StageResult.status == "fail")
        .group_by(StageResult.stage, StageResult.reason_code)
    ).all()
    reasons = sorted(
        ((stage, code or f"{stage}.failed", int(n)) for stage, code, n in failing),
        key=lambda r: (-r[2], r[1]),
    )
    failed_uids = set(
        session.scalars(select(StageResult.series_uid).where(StageResult.status == "fail"))
    )
    reviewed = set(session.scalars(select(Review.series_uid).distinct()))
    return Overview(outcomes, runs, reasons, len(reviewed), len(failed_uids - reviewed))


@dataclass(frozen=True)
class FailureFilter:
    protocol: str | None = None
    stage: str | None = None
    reason: str | None = None
    scanner: str | None = None
    status: str = "fail"
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    sort: str = "recorded_at"
    descending: bool = True
    page: int = 1


@dataclass(frozen=True)
class FailureRow:
    series_uid: str
    study_uid: str
    protocol: str | None
    role: str | None
    stage: str
    status: str
    reason_code: str | None
    reason_title: str
    message: str | None
    scanner: str
    recorded_at: dt.datetime
    review: str | None


@dataclass(frozen=True)
class FailurePage:
    rows: list[FailureRow]
    total: int
    page: int
    pages: int
    #: what the filters can be set to
    choices: dict[str, list[str]] = field(default_factory=dict)


def _scanner_expr() -> Any:
    return (
        func.coalesce(StageResult.manufacturer, "?") + " " + func.coalesce(StageResult.model, "?")
    )


def _failure_query(f: FailureFilter) -> Select[Any]:
    """The deciding row of each series: its first stage (in flow order) with the status."""
    order = {stage: i for i, stage in enumerate(SERIES_STAGES)}
    query = select(StageResult).where(StageResult.status == f.status)
    if f.protocol:
        query = query.where(StageResult.protocol == f.protocol)
    if f.stage:
        query = query.where(StageResult.stage == f.stage)
    if f.reason:
        query = query.where(
            or_(StageResult.reason_code == f.reason, StageResult.reason_code.like(f"{f.reason}.%"))
        )
    if f.scanner:
        query = query.where(_scanner_expr() == f.scanner)
    if f.date_from:
        start = dt.datetime.combine(f.date_from, dt.time(), tzinfo=dt.UTC)
        query = query.where(StageResult.recorded_at >= start)
    if f.date_to:
        end = dt.datetime.combine(f.date_to + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
        query = query.where(StageResult.recorded_at < end)
    if not f.stage:
        # one row per series: no row of an earlier stage with the same status
        earlier = StageResult.__table__.alias("earlier")
        rank = {s: i for s, i in order.items()}
        conditions = [
            and_(StageResult.stage == later, earlier.c.stage.in_(list(SERIES_STAGES[:i])))
            for later, i in rank.items()
            if i > 0
        ]
        query = query.where(
            ~select(earlier.c.id)
            .where(
                earlier.c.series_uid == StageResult.series_uid,
                earlier.c.status == f.status,
                or_(*conditions),
            )
            .exists()
        )
    return query


def failures(session: Session, f: FailureFilter, page_size: int) -> FailurePage:
    """One page of failing (or warned) series, filtered and sorted."""
    query = _failure_query(f)
    total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    column = {
        "recorded_at": StageResult.recorded_at,
        "protocol": StageResult.protocol,
        "stage": StageResult.stage,
        "reason_code": StageResult.reason_code,
        "scanner": _scanner_expr(),
        "series_uid": StageResult.series_uid,
    }[f.sort if f.sort in SORTS else "recorded_at"]
    ordered = query.order_by(
        column.desc() if f.descending else column.asc(), StageResult.series_uid
    )
    pages = max(1, -(-total // page_size))
    page = min(max(1, f.page), pages)
    rows = list(session.scalars(ordered.offset((page - 1) * page_size).limit(page_size)))
    decisions = latest_reviews(session, [r.series_uid for r in rows])
    out = [
        FailureRow(
            r.series_uid,
            r.study_uid,
            r.protocol,
            r.role,
            r.stage,
            r.status,
            r.reason_code,
            reason_title(r.reason_code),
            r.message,
            f"{r.manufacturer or '?'} {r.model or '?'}",
            r.recorded_at,
            decisions.get(r.series_uid),
        )
        for r in rows
    ]
    return FailurePage(out, total, page, pages, _choices(session))


def _choices(session: Session) -> dict[str, list[str]]:
    failing = select(StageResult).where(StageResult.status.in_(STATUSES)).subquery()
    reasons = {c for c in session.scalars(select(failing.c.reason_code).distinct()) if c}
    families = {".".join(c.split(".")[:2]) for c in reasons}
    scanners = {
        f"{m or '?'} {n or '?'}"
        for m, n in session.execute(select(failing.c.manufacturer, failing.c.model).distinct())
    }
    return {
        "protocol": sorted(
            {p for p in session.scalars(select(failing.c.protocol).distinct()) if p}
        ),
        "stage": [s for s in SERIES_STAGES],
        "reason": sorted(reasons | families),
        "scanner": sorted(scanners),
        "status": list(STATUSES),
    }


@dataclass(frozen=True)
class MetricView:
    """One image quality metric that can fail a series: this series' value (None: not
    measured on it), the values of the other series of its protocol and role, and the
    protocol's acceptance range (``low`` and ``high``, either open; both None: the protocol sets
    none) with the check that holds it and that check's severity under the protocol."""

    name: str
    value: float | None
    cohort: list[float]
    low: float | None = None
    high: float | None = None
    check: str = ""
    severity: str = ""
    #: what the metric is and which direction is better (qc.metrics.METRICS)
    what: str = ""
    better: str = ""

    @property
    def has_range(self) -> bool:
        return self.low is not None or self.high is not None

    @property
    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.low:g} to {self.high:g}"
        if self.low is not None:
            return f">= {self.low:g}"
        return f"<= {self.high:g}" if self.high is not None else "–"

    @property
    def passes(self) -> bool | None:
        """Whether the value lies in the acceptance range (None: no value or no range)."""
        if self.value is None or not self.has_range:
            return None
        return (self.low is None or self.value >= self.low) and (
            self.high is None or self.value <= self.high
        )


@dataclass(frozen=True)
class SeriesImage:
    """The series' image for the slice viewer as its stages recorded it: the NIfTI file
    (``relative``: relative to the outputs folder) and the tissue labels on its grid."""

    image: str
    labels: str | None = None
    relative: bool = False


@dataclass(frozen=True)
class SeriesView:
    series_uid: str
    study_uid: str
    protocol: str | None
    role: str | None
    scanner: str
    stages: list[StageRecord]
    history: list[HistoryRecord]
    biomarkers: dict[str, Any] | None
    reviews: list[ReviewRecord]
    metrics: list[MetricView]
    #: the automatic verdict over every stage, and its deciding stage and reason
    verdict: str
    verdict_stage: str | None
    verdict_reason: str | None
    pictures: dict[str, str]
    #: what names the series to a reviewer: its description and the subject's pseudonym
    description: str | None = None
    pseudonym: str | None = None
    image: SeriesImage | None = None

    @property
    def findings(self) -> list[tuple[str, dict[str, Any]]]:
        return [(s.stage, f) for s in self.stages for f in s.findings]

    @property
    def title(self) -> str:
        """The page's title: description, role, pseudonym (never a UID)."""
        parts = [self.description, ROLE_NAMES.get(self.role or "", self.role), self.pseudonym]
        shown = [p for p in parts if p]
        return " · ".join(shown) if shown else f"a series of {self.protocol or 'no protocol'}"


#: how a role (a protocol's include rule, or a role of the classifier) reads in a title; any
#: other is shown as it is named
ROLE_NAMES = {
    "t1_3d": "3D T1",
    "t1_2d": "2D T1",
    "t1_post": "T1 post-contrast",
    "t2": "T2",
    "hippocampus_t2": "hippocampal T2",
    "flair": "FLAIR",
    "dwi": "DWI",
}


def series_view(
    session: Session, series_uid: str, policy_of: Callable[[str | None], QcPolicy] | None = None
) -> SeriesView | None:
    """Everything the series page shows of one series; ``policy_of`` gives the acceptance
    ranges of its protocol's metrics (None: not drawn)."""
    stages = stage_records(session, series_uids=[series_uid])
    if not stages:
        return None
    order = {s: i for i, s in enumerate(SERIES_STAGES)}
    stages.sort(key=lambda s: order.get(s.stage, len(order)))
    first = stages[0]
    marker = session.scalars(select(Biomarker).where(Biomarker.series_uid == series_uid)).first()
    biomarkers = None
    if marker is not None:
        biomarkers = {
            k: getattr(marker, k)
            for k in (
                *VOLUME_NAMES, "method", "method_version", "qc_status", "qc_reason", "confidence",
                "recorded_at",
            )
        }  # fmt: skip
    verdict, verdict_stage, verdict_reason = worst_verdict(
        (s.stage, s.status, s.reason_code) for s in stages
    )
    metrics: list[MetricView] = []
    image_qc = next((s for s in stages if s.stage == "image_qc"), None)
    if image_qc is not None:
        policy = policy_of(image_qc.protocol) if policy_of is not None else None
        metrics = metric_views(session, image_qc, policy)
    pictures = {
        s.stage: str(s.metrics["picture"])
        for s in stages
        if isinstance(s.metrics.get("picture"), str)
    }
    return SeriesView(
        series_uid=series_uid,
        study_uid=first.study_uid,
        protocol=first.protocol,
        role=first.role,
        scanner=f"{first.manufacturer or '?'} {first.model or '?'}",
        stages=stages,
        history=stage_history(session, series_uid),
        biomarkers=biomarkers,
        reviews=reviews_of(session, series_uid),
        metrics=metrics,
        verdict=verdict,
        verdict_stage=verdict_stage,
        verdict_reason=verdict_reason,
        pictures=pictures,
        description=_text_of(stages, "description"),
        pseudonym=_text_of(stages, "pseudonym"),
        image=_image_of(stages),
    )


def metric_views(
    session: Session, image_qc: StageRecord, policy: QcPolicy | None
) -> list[MetricView]:
    """Every metric that can fail a series (``qc.metrics.METRIC_CHECKS``) the series has or
    its protocol holds to a range, beside the values of the other series of its protocol and
    role (every one of them: a plot from the first series on)."""
    pool = [
        m
        for (m,) in session.execute(
            select(StageResult.metrics).where(
                StageResult.stage == "image_qc",
                StageResult.protocol == image_qc.protocol,
                StageResult.role == image_qc.role,
                StageResult.series_uid != image_qc.series_uid,
            )
        )
        if isinstance(m, dict)
    ]
    views = []
    for name, check in METRIC_CHECKS.items():
        value = _number(image_qc.metrics.get(name))
        allowed = policy.image.get(name) if policy is not None else None
        if value is None and allowed is None:
            continue
        cohort = [v for v in (_number(m.get(name)) for m in pool) if v is not None]
        what, better = METRICS.get(name, ("", ""))
        views.append(
            MetricView(
                name,
                value,
                cohort,
                low=allowed.min if allowed is not None else None,
                high=allowed.max if allowed is not None else None,
                check=check,
                severity=policy.severity_of(check).value if policy is not None else "",
                what=what,
                better=better,
            )
        )
    return views


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _text_of(stages: Sequence[StageRecord], key: str) -> str | None:
    """The first non-empty text ``key`` of the stages' metrics (conversion records them)."""
    for stage in sorted(stages, key=lambda s: s.stage != "convert"):
        found = stage.metrics.get(key)
        if isinstance(found, str) and found.strip():
            return found.strip()
    return None


def series_image(session: Session, series_uid: str) -> SeriesImage | None:
    """The series' image for the slice viewer (its stage rows only: asked at every slice)."""
    return _image_of(stage_records(session, series_uids=[series_uid]))


def _image_of(stages: Sequence[StageRecord]) -> SeriesImage | None:
    """The NIfTI image of the series: the one volumetry measured, with its labels; else the
    one conversion wrote (``image``; a row recorded before it was: ``nifti``, relative to the
    protocol's ``nifti`` folder under the outputs, where a run converts)."""
    rows = {s.stage: s.metrics for s in stages}
    measured = rows.get("volumetry", {})
    if isinstance(measured.get("image"), str):
        labels = measured.get("labels")
        return SeriesImage(str(measured["image"]), labels if isinstance(labels, str) else None)
    converted = rows.get("convert", {})
    if isinstance(converted.get("image"), str):
        return SeriesImage(str(converted["image"]))
    nifti = converted.get("nifti")
    protocol = next((s.protocol for s in stages if s.stage == "convert"), None)
    if isinstance(nifti, str) and protocol:
        return SeriesImage(str(PurePosixPath(protocol, "nifti", nifti)), relative=True)
    return None


@dataclass(frozen=True)
class AuditRow:
    at: dt.datetime
    actor: str
    action: str
    detail: str


def audit_log(
    session: Session,
    limit: int = 500,
    actions: Sequence[str] = (),
    *,
    offset: int = 0,
    actor: str | None = None,
    action: str | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
) -> tuple[list[AuditRow], int]:
    """A page of the audit log, newest first, and how many entries match: ``actions`` exact
    names, ``action`` a prefix (``cohort.`` for every cohort use), ``actor`` exact, ``since`` and
    ``until`` days (UTC, inclusive)."""
    conditions: list[ColumnElement[bool]] = []
    if actions:
        conditions.append(AuditEntry.action.in_(list(actions)))
    if action:
        conditions.append(AuditEntry.action.startswith(action, autoescape=True))
    if actor:
        conditions.append(AuditEntry.actor == actor)
    if since:
        conditions.append(AuditEntry.at >= dt.datetime.combine(since, dt.time(), dt.UTC))
    if until:
        end = dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), dt.UTC)
        conditions.append(AuditEntry.at < end)
    total = int(session.scalar(select(func.count(AuditEntry.id)).where(*conditions)) or 0)
    query = (
        select(AuditEntry)
        .where(*conditions)
        .order_by(AuditEntry.at.desc(), AuditEntry.id.desc())
        .offset(offset)
        .limit(limit)
    )
    return [AuditRow(a.at, a.actor, a.action, a.detail) for a in session.scalars(query)], total


def reason_counts(outcome: ProtocolOutcome) -> list[tuple[str, str, int]]:
    """(stage, reason, series) of a protocol's selected series that yielded nothing."""
    counts = Counter(outcome.series_reasons)
    return [(outcome.reason_stage.get(r, "?"), r, n) for r, n in counts.most_common()]
