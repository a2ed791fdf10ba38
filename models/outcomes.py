"""Success rates of a protocol: what became of every series its latest selection chose.

Read from the index only (selections, retrievals, study steps, stage results, biomarkers), so
``cohortflow status``, the flows' artifacts and the dashboard tell the same story. The result
holds counts and reason codes, never an identifier.

A selected series travels: retrieve -> anonymize -> deface -> header_qc -> image_qc -> convert
-> volumetry (T1s only). It stops at the first stage that failed it (its reason code), at a
study step that could not run, or where the flow has not (yet) taken it ("not_processed").
A T1 succeeds when it has biomarkers whose volumetry verdict is not a failure; a study
succeeds when one of its T1s does.

A reviewer's newest decision counts: ``reject`` stops the series (``review.rejected``),
``override`` sets aside the QC failures (deface, header and image QC, volumetry's verdict), so
the T1 counts once it is measured (the next run measures it).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cohortflow.models.retrieval import archived_counts
from cohortflow.models.reviews import OVERRIDE, REJECT, latest_reviews, set_aside
from cohortflow.models.schema import (
    Biomarker,
    Retrieval,
    SelectedSeries,
    Selection,
    Series,
    StageResult,
    StudyStep,
)

#: the series stages in flow order (image QC and volumetry: T1s only; release: the release
#: check of the files delivered)
SERIES_STAGES = (
    "anonymize", "deface", "header_qc", "image_qc", "convert", "volumetry", "release"
)  # fmt: skip
#: the role whose series yield biomarkers
BIOMARKER_ROLES = ("t1_3d",)


@dataclass
class StageCount:
    stage: str
    reached: int = 0
    passed: int = 0
    warned: int = 0
    failed: int = 0

    @property
    def rate(self) -> float | None:
        return (self.passed + self.warned) / self.reached if self.reached else None


@dataclass
class GroupRate:
    """Of a group of T1 series (all, or one scanner): how many yielded biomarkers."""

    group: str
    t1_series: int = 0
    with_biomarkers: int = 0

    @property
    def rate(self) -> float | None:
        return self.with_biomarkers / self.t1_series if self.t1_series else None


@dataclass
class ProtocolOutcome:
    protocol: str
    selection_id: int | None
    studies_selected: int = 0
    studies_with_biomarkers: int = 0
    series_selected: int = 0
    series_retrieved: int = 0
    t1_series: int = 0
    t1_with_biomarkers: int = 0
    stages: list[StageCount] = field(default_factory=list)
    scanners: list[GroupRate] = field(default_factory=list)
    #: why selected series yielded nothing: reason code -> series (T1s only / every series)
    t1_reasons: dict[str, int] = field(default_factory=dict)
    series_reasons: dict[str, int] = field(default_factory=dict)
    #: the stage each reason stopped the series at
    reason_stage: dict[str, str] = field(default_factory=dict)

    @property
    def study_rate(self) -> float | None:
        return (
            self.studies_with_biomarkers / self.studies_selected if self.studies_selected else None
        )

    @property
    def t1_rate(self) -> float | None:
        return self.t1_with_biomarkers / self.t1_series if self.t1_series else None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["study_rate"] = self.study_rate
        out["t1_rate"] = self.t1_rate
        for stage, data in zip(self.stages, out["stages"], strict=True):
            data["rate"] = stage.rate
        for scanner, data in zip(self.scanners, out["scanners"], strict=True):
            data["rate"] = scanner.rate
        return out


_RANK = {"pass": 0, "warn": 1, "fail": 2}


def worst_verdict(
    results: Iterable[tuple[str, str, str | None]],
) -> tuple[str, str | None, str | None]:
    """Of (stage, status, reason) results of one series: the worst status, and the stage and
    reason that decide it (the first in flow order; none when everything passed)."""
    order = {stage: i for i, stage in enumerate(SERIES_STAGES)}
    ranked = sorted(
        ((-_RANK.get(status, 0), order.get(stage, len(order)), stage, status, reason)
         for stage, status, reason in results),
    )  # fmt: skip
    if not ranked or ranked[0][3] == "pass":
        return "pass", None, None
    _, _, stage, status, reason = ranked[0]
    return status, stage, reason


def latest_selection(session: Session, protocol: str) -> int | None:
    """The id of the protocol's newest selection (None: never selected)."""
    return session.scalars(
        select(Selection.id)
        .where(Selection.protocol == protocol)
        .order_by(Selection.id.desc())
        .limit(1)
    ).first()


def protocol_outcome(
    session: Session, protocol: str, selection_id: int | None = None
) -> ProtocolOutcome:
    """The outcome of ``protocol``'s selection (default: its latest)."""
    if selection_id is None:
        selection_id = latest_selection(session, protocol)
    outcome = ProtocolOutcome(protocol, selection_id)
    if selection_id is None:
        return outcome
    chosen = session.execute(
        select(
            SelectedSeries.study_instance_uid,
            SelectedSeries.series_instance_uid,
            SelectedSeries.rule,
        ).where(SelectedSeries.selection_id == selection_id)
    ).all()
    uids = [series for _, series, _ in chosen]
    retrieval = dict(
        session.execute(
            select(Retrieval.series_instance_uid, Retrieval.status).where(
                Retrieval.series_instance_uid.in_(uids)
            )
        ).all()
    )
    never = [u for u in uids if retrieval.get(u, "pending") == "pending"]
    retrieval.update(_delivered(session, selection_id, never))
    scanners = {
        uid: f"{manufacturer or '?'} {model or '?'}"
        for uid, manufacturer, model in session.execute(
            select(
                Series.series_instance_uid, Series.manufacturer, Series.manufacturer_model_name
            ).where(Series.series_instance_uid.in_(uids))
        )
    }
    studies = sorted({study for study, _, _ in chosen})
    steps: dict[str, dict[str, StudyStep]] = defaultdict(dict)
    for row in session.scalars(
        select(StudyStep).where(StudyStep.protocol == protocol, StudyStep.study_uid.in_(studies))
    ):
        steps[row.study_uid][row.step] = row
    pseudo: dict[str, str] = {}
    for by_step in steps.values():
        anonymized = by_step.get("anonymize")
        linked = (anonymized.outputs or {}).get("_linked_series") if anonymized else None
        if isinstance(linked, dict):
            pseudo.update({str(k): str(v) for k, v in linked.items()})
    stage_rows: dict[str, dict[str, StageResult]] = defaultdict(dict)
    for stage_row in session.scalars(
        select(StageResult).where(StageResult.series_uid.in_(list(pseudo.values())))
    ):
        stage_rows[stage_row.series_uid][stage_row.stage] = stage_row
    measured = {
        uid: status
        for uid, status in session.execute(
            select(Biomarker.series_uid, Biomarker.qc_status).where(
                Biomarker.series_uid.in_(list(pseudo.values()))
            )
        )
    }

    decisions = latest_reviews(session, pseudo.values())

    counts = {stage: StageCount(stage) for stage in ("retrieve", *SERIES_STAGES)}
    by_scanner: dict[str, GroupRate] = {}
    t1_reasons: Counter[str] = Counter()
    series_reasons: Counter[str] = Counter()
    good_studies: set[str] = set()
    outcome.studies_selected = len(studies)
    outcome.series_selected = len(chosen)
    for study, series, rule in chosen:
        is_t1 = rule in BIOMARKER_ROLES
        status = retrieval.get(series, "pending")
        counts["retrieve"].reached += 1
        if status == "complete":
            counts["retrieve"].passed += 1
            outcome.series_retrieved += 1
        elif status == "incomplete":
            counts["retrieve"].warned += 1
            outcome.series_retrieved += 1
        else:
            counts["retrieve"].failed += 1
        decision = decisions.get(pseudo.get(series, ""))
        reason, stage = _stopped(
            status,
            steps.get(study, {}),
            stage_rows.get(pseudo.get(series, ""), {}),
            is_t1,
            decision,
        )
        for name, result in stage_rows.get(pseudo.get(series, ""), {}).items():
            if name in counts:
                count = counts[name]
                count.reached += 1
                if result.status == "pass":
                    count.passed += 1
                elif result.status == "warn":
                    count.warned += 1
                else:
                    count.failed += 1
        # measured, and no stage failed it (image QC outliers are judged after volumetry),
        # or a reviewer overrode the failure
        verdict = measured.get(pseudo.get(series, ""))
        produced = (
            is_t1
            and reason is None
            and (verdict in ("pass", "warn") or (decision == OVERRIDE and verdict is not None))
        )
        if not is_t1:
            if reason:
                series_reasons[reason] += 1
                outcome.reason_stage.setdefault(reason, stage or "?")
            continue
        outcome.t1_series += 1
        group = by_scanner.setdefault(
            scanners.get(series, "unknown scanner"),
            GroupRate(scanners.get(series, "unknown scanner")),
        )
        group.t1_series += 1
        if produced:
            outcome.t1_with_biomarkers += 1
            group.with_biomarkers += 1
            good_studies.add(study)
            continue
        reason = reason or "volumetry.not_measured"
        stage = stage or "volumetry"
        t1_reasons[reason] += 1
        series_reasons[reason] += 1
        outcome.reason_stage.setdefault(reason, stage)
    outcome.studies_with_biomarkers = len(good_studies)
    outcome.stages = list(counts.values())
    outcome.scanners = sorted(by_scanner.values(), key=lambda g: g.group)
    outcome.t1_reasons = dict(t1_reasons.most_common())
    outcome.series_reasons = dict(series_reasons.most_common())
    return outcome


def _delivered(session: Session, selection_id: int, uids: list[str]) -> dict[str, str]:
    """Series of the selection that no retrieval fetched (still pending) but that the archive
    holds all the same (ingested from a delivery, then chosen by a cohort or run with
    ``--no-retrieve``): complete when the archive holds the instances the selection expects,
    else incomplete."""
    held = {uid: n for uid, n in archived_counts(session, uids).items() if n}
    if not held:
        return {}
    expected = dict(
        session.execute(
            select(SelectedSeries.series_instance_uid, SelectedSeries.expected_instances).where(
                SelectedSeries.selection_id == selection_id,
                SelectedSeries.series_instance_uid.in_(list(held)),
            )
        ).all()
    )
    out = {}
    for uid, n in held.items():
        wanted = expected.get(uid)
        out[uid] = "complete" if wanted is None or n >= wanted else "incomplete"
    return out


def _stopped(
    retrieval: str,
    steps: dict[str, StudyStep],
    stages: dict[str, StageResult],
    is_t1: bool,
    decision: str | None = None,
) -> tuple[str | None, str | None]:
    """Why and where a series stopped: (reason code, stage), or (None, None) if it did not.

    Image QC and volumetry concern T1s only; a stage without a row is one the series did not
    reach, unless a later stage has a row (a stage that does not apply to it). A reviewer's
    rejection stops it; an override sets aside the failures of the QC stages."""
    if decision == REJECT:
        return "review.rejected", "review"
    for stage in SERIES_STAGES:
        row = stages.get(stage)
        if set_aside(stage, decision):
            continue
        if row is not None and row.status == "fail":
            return row.reason_code or f"{stage}.failed", stage
    expected = (
        SERIES_STAGES if is_t1 else ("anonymize", "deface", "header_qc", "convert", "release")
    )
    if "release" in stages and (not is_t1 or "volumetry" in stages):
        return None, None
    if decision == OVERRIDE and is_t1 and "convert" in stages:
        return "review.override_not_yet_measured", "volumetry"  # the next run measures it
    if not stages and retrieval not in ("complete", "incomplete"):
        return f"retrieve.{retrieval}", "retrieve"
    for step in ("anonymize", "deface", "qc", "convert", "volumetry", "release"):
        found = steps.get(step)
        if found is not None and found.status == "error":
            return found.reason_code or f"{step}.error", step
    reached = [i for i, stage in enumerate(expected) if stage in stages]
    missing = expected[reached[-1] + 1] if reached else expected[0]
    return "not_processed", missing
