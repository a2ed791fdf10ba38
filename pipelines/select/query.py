"""Select studies for a protocol from a PACS: C-FIND at study level, then series level.

What the PACS can match is asked of it (date range, modality, study description patterns); the
rest is applied here to what it returns, and the study patterns are checked again here because
PACS differ in case sensitivity and in which keys they filter on at all. ProtocolName is a
series attribute: as a study key it matches nothing (FIELD-NOTES.md), so the series rules read
it from the series C-FIND.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from cohortflow.models.database import IndexDB
from cohortflow.models.retrieval import ChosenSeries, save_selection
from cohortflow.pipelines.dicom.header import Attributes
from cohortflow.pipelines.dicom.protocols import Protocol, SeriesDecision
from cohortflow.pipelines.pacs.dimse import PacsNode, Session, query_contexts

log = logging.getLogger(__name__)

STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyDescription",
    "AccessionNumber",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
#: Days per study C-FIND: PACS cap the matches of one query, so long ranges go in slices.
FIND_WINDOW_DAYS = 366
NOTES = (
    "The PACS filters studies on StudyDate, ModalitiesInStudy and StudyDescription; cohortflow "
    "checks them again on the answers (PACS differ in case sensitivity and in the keys they "
    "honour).",
    "ProtocolName and the other series rules (regular expressions, numeric ranges, AND / OR, "
    "exclusions) cannot be expressed as C-FIND matching: they are applied by cohortflow to the "
    "series C-FIND answers.",
)


@dataclass(frozen=True)
class SeriesCandidate:
    series_instance_uid: str
    attributes: Attributes
    decision: SeriesDecision

    @property
    def expected_instances(self) -> int | None:
        value = self.attributes.get("NumberOfSeriesRelatedInstances")
        return int(value) if isinstance(value, (int, float)) else None


@dataclass(frozen=True)
class StudyCandidate:
    study_instance_uid: str
    accession_number: str | None
    study_date: dt.date | None
    study_description: str | None
    selected: bool
    why: str
    series: tuple[SeriesCandidate, ...] = ()

    @property
    def chosen(self) -> tuple[SeriesCandidate, ...]:
        return tuple(s for s in self.series if s.decision.selected) if self.selected else ()


@dataclass(frozen=True)
class SelectionResult:
    protocol: str
    date_from: dt.date
    date_to: dt.date
    pacs: str
    studies: tuple[StudyCandidate, ...]
    notes: tuple[str, ...] = NOTES
    #: Rule fields the PACS returned for no series at all (it may not support them).
    unanswered: tuple[str, ...] = field(default=())
    #: a listed selection's source (``cohort NAME``, ``manifest FILE``; see select/listed.py)
    listed_from: str | None = None

    @property
    def selected(self) -> tuple[StudyCandidate, ...]:
        return tuple(s for s in self.studies if s.selected)


def _date(value: object) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value), "%Y%m%d").date() if value else None
    except ValueError:
        return None


def date_slices(first: dt.date, last: dt.date, days: int) -> Iterator[tuple[dt.date, dt.date]]:
    start = first
    while start <= last:
        end = min(last, start + dt.timedelta(days=days - 1))
        yield start, end
        start = end + dt.timedelta(days=1)


def _modalities(value: object) -> set[str]:
    if isinstance(value, list):
        return {str(v) for v in value}
    return set(str(value).split("\\")) if value else set()


def select_studies(
    node: PacsNode,
    local_aet: str,
    protocol: Protocol,
    date_from: dt.date,
    date_to: dt.date,
    *,
    association: Callable[[], AbstractContextManager[None]] | None = None,
    window_days: int = FIND_WINDOW_DAYS,
) -> SelectionResult:
    """Query the PACS for ``protocol`` between the two dates (inclusive) and decide per series.

    ``association`` (a throttle's) is held while the queries run.
    """
    from contextlib import nullcontext

    study = protocol.study
    patterns = study.description or ("",)  # "": no description key (any)
    found: dict[str, Attributes] = {}
    asked = protocol.series_fields()  # SeriesInstanceUID and the rules' keywords
    series_keys = sorted(asked)
    studies: list[StudyCandidate] = []
    with (association or nullcontext)(), Session(node, local_aet, query_contexts("find")) as pacs:
        for first, last in date_slices(date_from, date_to, window_days):
            for pattern in patterns:
                keys: dict[str, object] = {"StudyDate": f"{first:%Y%m%d}-{last:%Y%m%d}"}
                if study.modality:
                    keys["ModalitiesInStudy"] = study.modality
                if pattern:
                    keys["StudyDescription"] = pattern
                for answer in pacs.find("STUDY", keys, STUDY_KEYS):
                    uid = answer.get("StudyInstanceUID")
                    if isinstance(uid, str) and uid:
                        found.setdefault(uid, answer)
        for uid, answer in sorted(found.items(), key=lambda kv: (str(kv[1]["StudyDate"]), kv[0])):
            reason = _study_mismatch(protocol, answer, date_from, date_to)
            if reason:
                studies.append(_candidate(uid, answer, False, reason))
                continue
            rows = pacs.find("SERIES", {"StudyInstanceUID": uid}, series_keys)
            pairs = [(str(r["SeriesInstanceUID"]), r) for r in rows if r.get("SeriesInstanceUID")]
            studies.append(decide_candidate(protocol, uid, answer, pairs))
    answered = {k for s in studies for se in s.series for k, v in se.attributes.items() if v}
    unanswered = tuple(sorted(asked - answered)) if any(s.series for s in studies) else ()
    for keyword in unanswered:
        log.info("the PACS %s returned no %s for any series", node, keyword)
    return SelectionResult(
        protocol.name, date_from, date_to, str(node), tuple(studies), unanswered=unanswered
    )


def decide_candidate(
    protocol: Protocol, uid: str, answer: Attributes, pairs: list[tuple[str, Attributes]]
) -> StudyCandidate:
    """The study ``uid`` (its study-level ``answer``) with its series (``pairs`` of
    SeriesInstanceUID and attributes) decided by ``protocol``'s series rules."""
    decision = protocol.decide_study(pairs)
    series = tuple(
        SeriesCandidate(s_uid, attrs, d)
        for (s_uid, attrs), (_, d) in zip(pairs, decision.series, strict=True)
    )
    return _candidate(uid, answer, decision.selected, decision.why, series)


def _candidate(
    uid: str,
    answer: Attributes,
    selected: bool,
    why: str,
    series: tuple[SeriesCandidate, ...] = (),
) -> StudyCandidate:
    description = answer.get("StudyDescription")
    accession = answer.get("AccessionNumber")
    return StudyCandidate(
        uid,
        str(accession) if accession else None,
        _date(answer.get("StudyDate")),
        description if isinstance(description, str) else None,
        selected,
        why,
        series,
    )


def _study_mismatch(
    protocol: Protocol, answer: Attributes, date_from: dt.date, date_to: dt.date
) -> str | None:
    """Why a study the PACS returned does not fit the query after all (None: it fits)."""
    when = _date(answer.get("StudyDate"))
    if when is None or not date_from <= when <= date_to:
        return f"StudyDate {answer.get('StudyDate')!r} outside {date_from} .. {date_to}"
    description = answer.get("StudyDescription")
    if not protocol.study.matches_description(
        description if isinstance(description, str) else None
    ):
        return (
            f"StudyDescription {description!r} matches none of {list(protocol.study.description)}"
        )
    modalities = _modalities(answer.get("ModalitiesInStudy"))
    if protocol.study.modality and modalities and protocol.study.modality not in modalities:
        return f"ModalitiesInStudy {sorted(modalities)} lacks {protocol.study.modality}"
    return None


def record_selection(index: IndexDB, result: SelectionResult, protocols_file: Path) -> int:
    """Store a selection (the chosen series and their instance counts); returns its id."""
    chosen = [
        ChosenSeries(
            study.study_instance_uid,
            se.series_instance_uid,
            study.accession_number,
            study.study_date,
            se.decision.rule,
            se.expected_instances,
        )
        for study in result.selected
        for se in study.chosen
    ]
    digest = hashlib.sha256(protocols_file.read_bytes()).hexdigest()
    with index.session() as session:
        return save_selection(
            session,
            protocol=result.protocol,
            date_from=result.date_from,
            date_to=result.date_to,
            pacs=result.pacs,
            protocols_file=str(protocols_file),
            protocols_sha256=digest,
            studies=len(result.selected),
            series=chosen,
            listed_from=result.listed_from,
        )
