"""Keep cohort discovery's table (``cohort_series``, ``cohort_protocols``) following the index.

Incremental: a refresh rewrites the rows of the studies that received series or instances since
the last one, and the QC verdicts of the series that stages or reviewers judged since; it
rebuilds everything when the protocol rules, the project key or the cleaner changed. Doing
nothing costs four indexed ``max(id)`` queries, so callers refresh before every query.

The de-identified columns are made here with the project key, as the anonymizer makes them:
the pseudonym and date offset of the patient, the pseudonymized UIDs (the stages' keys, so the
QC verdicts join). Descriptions are cleaned by the anonymizer's cleaner
(pipelines/dicom/cleaner.py) of what the index holds for the patient, the study and the series
(names of the patient, physicians and operators, IDs, accession number, institution, station,
device serial), of long digit runs and of written dates; a new cleaner version rebuilds the
table.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, delete, func, insert, select, text, update
from sqlalchemy.orm import Session

from cohortflow.models.database import IndexDB
from cohortflow.models.disclosure import DISCLOSURE, record_key
from cohortflow.models.export import age_at
from cohortflow.models.repository import chunks, insert_ignore, now
from cohortflow.models.reviews import latest_reviews, reviewed_verdict
from cohortflow.models.schema import (
    Biomarker,
    CohortProtocol,
    CohortSeries,
    CohortState,
    Instance,
    Patient,
    Review,
    Series,
    StageHistory,
    StageResult,
    Study,
)
from cohortflow.pipelines.dicom.cleaner import CLEANER_VERSION, cleaner_for
from cohortflow.pipelines.dicom.keys import ProjectKey
from cohortflow.pipelines.dicom.protocols import Protocol, ProtocolSet
from cohortflow.pipelines.dicom.rules import Attributes
from cohortflow.pipelines.select.listed import index_attributes

log = logging.getLogger(__name__)

CHUNK = 2000
#: rows written by one refresh after which SQLite's table statistics are renewed
ANALYZE_AFTER = 5000


@dataclass(frozen=True)
class RefreshSummary:
    rebuilt: bool  # every row made anew (first refresh, new protocol rules or key)
    studies: int  # studies whose rows were (re)written
    series: int
    verdicts: int  # series whose QC verdict was recomputed
    seconds: float


def _marks(session: Session) -> tuple[int, int, int, int]:
    return (
        session.scalar(select(func.max(Series.id))) or 0,
        session.scalar(select(func.max(Instance.id))) or 0,
        session.scalar(select(func.max(StageHistory.id))) or 0,
        session.scalar(select(func.max(Review.id))) or 0,
    )


def refresh(index: IndexDB, key: ProjectKey, protocols: ProtocolSet) -> RefreshSummary:
    """Bring the cohort table up to date with the index (safe from several processes)."""
    started = time.perf_counter()
    digest, fingerprint = protocols.sha256, key.fingerprint()
    with index.session() as session:
        state = session.get(CohortState, 1)
        if (
            state is not None
            and (state.series_mark, state.instance_mark, state.history_mark, state.review_mark)
            == _marks(session)
            and (state.protocols_sha256, state.key_fingerprint, state.cleaner_version)
            == (digest, fingerprint, CLEANER_VERSION)
        ):
            return RefreshSummary(False, 0, 0, 0, time.perf_counter() - started)
    with index.session() as session:
        insert_ignore(
            session,
            CohortState.__table__,
            [
                {
                    "id": 1,
                    "series_mark": 0,
                    "instance_mark": 0,
                    "history_mark": 0,
                    "review_mark": 0,
                    "protocols_sha256": "",
                    "key_fingerprint": "",
                    "cleaner_version": "",
                    "refreshed_at": now(),
                }
            ],
            ["id"],
        )
    with index.session() as session:
        # the first statement writes: one refresher at a time (SQLite's write lock, a row lock
        # on PostgreSQL), and whoever waited reads the marks the other one left
        session.execute(update(CohortState).where(CohortState.id == 1).values(refreshed_at=now()))
        state = session.get(CohortState, 1)
        assert state is not None
        marks = _marks(session)
        rebuilt = (state.protocols_sha256, state.key_fingerprint, state.cleaner_version) != (
            digest,
            fingerprint,
            CLEANER_VERSION,
        )
        if rebuilt:
            session.execute(delete(CohortProtocol))
            session.execute(delete(CohortSeries))
            studies = list(session.scalars(select(Study.id).order_by(Study.id)))
            series_pks = set(session.scalars(select(Series.id).where(Series.study_pk.is_(None))))
        else:
            series_pks = set(
                session.scalars(
                    select(Series.id).where(Series.id > state.series_mark, Series.id <= marks[0])
                )
            )
            series_pks.update(
                session.scalars(
                    select(Instance.series_pk)
                    .where(Instance.id > state.instance_mark, Instance.id <= marks[1])
                    .where(Instance.series_pk.is_not(None))
                    .distinct()
                )
            )
            studies = sorted(
                {
                    pk
                    for chunk in chunks(sorted(series_pks), CHUNK)
                    for pk in session.scalars(
                        select(Series.study_pk).where(Series.id.in_(chunk)).distinct()
                    )
                    if pk is not None
                }
            )
        builder = _Builder(key, protocols)
        written = 0
        for chunk in chunks(studies, CHUNK):
            written += builder.write(session, chunk)
        orphans = sorted(pk for pk in series_pks if pk not in builder.done)
        for chunk in chunks(orphans, CHUNK):  # series without a study: rows of their own
            written += builder.write_series(session, chunk)
        judged: set[str] = set()
        if not rebuilt:
            judged.update(
                session.scalars(
                    select(StageHistory.series_uid)
                    .where(StageHistory.id > state.history_mark, StageHistory.id <= marks[2])
                    .distinct()
                )
            )
            judged.update(
                session.scalars(
                    select(Review.series_uid)
                    .where(Review.id > state.review_mark, Review.id <= marks[3])
                    .distinct()
                )
            )
            judged -= builder.judged
            for chunk in chunks(sorted(judged), CHUNK):
                for uid, (verdict, measured) in _verdicts(session, chunk).items():
                    session.execute(
                        update(CohortSeries)
                        .where(CohortSeries.pseudo_series_uid == uid)
                        .values(qc_verdict=verdict, biomarkers=measured)
                    )
        if written > ANALYZE_AFTER and session.get_bind().dialect.name == "sqlite":
            # fresh statistics let SQLite's planner pick the index of the most selective filter
            # (PostgreSQL's autovacuum keeps its own)
            session.execute(text("ANALYZE cohort_series"))
            session.execute(text("ANALYZE cohort_protocols"))
        state.series_mark, state.instance_mark, state.history_mark, state.review_mark = marks
        state.protocols_sha256, state.key_fingerprint = digest, fingerprint
        state.cleaner_version = CLEANER_VERSION
        summary = RefreshSummary(
            rebuilt, len(studies), written, len(judged) + len(builder.judged),
            time.perf_counter() - started,
        )  # fmt: skip
    log.info("cohort index refreshed: %s", summary)
    return summary


def _verdicts(session: Session, uids: Sequence[object]) -> dict[str, tuple[str | None, bool]]:
    """QC verdict after reviews, and whether usable biomarkers exist, per pseudonymized UID."""
    results: dict[str, list[tuple[str, str]]] = {str(u): [] for u in uids}
    for uid, stage, status in session.execute(
        select(StageResult.series_uid, StageResult.stage, StageResult.status).where(
            StageResult.series_uid.in_(uids)
        )
    ):
        results[uid].append((stage, status))
    decisions = latest_reviews(session, list(results))
    measured = set(
        session.scalars(select(Biomarker.series_uid).where(Biomarker.series_uid.in_(uids)))
    )
    out = {}
    for uid, found in results.items():
        verdict = reviewed_verdict(found, decisions.get(uid))
        out[uid] = (verdict, uid in measured and verdict != "fail")
    return out


def _table(mapped: type[Any]) -> Table:
    return cast(Table, mapped.__table__)


def _hashable(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def nominal_field_strength(value: float | None) -> float | None:
    """The reported field strength to the nearest 0.5 T (Siemens writes 2.89 for 3 T; old
    files give gauss: 15000 is 1.5 T)."""
    if value is None or value <= 0:
        return None
    tesla = value / 10000 if value > 100 else value
    return round(tesla * 2) / 2


@functools.lru_cache(maxsize=4096)
def _scrubber(values: tuple[str | None, ...]) -> Callable[[str | None], str | None]:
    """The cleaner of descriptions naming ``values``: made once for the series of a study that
    share them (the same people, station and device), not once per series."""
    return cleaner_for(values).optional()


class _Builder:
    """Writes the rows of whole studies (a protocol decides on all the series of a study)."""

    def __init__(self, key: ProjectKey, protocols: ProtocolSet) -> None:
        self.key = key
        self.secret = key.derived(DISCLOSURE)
        self.protocols = protocols
        self.done: set[int] = set()
        self.judged: set[str] = set()
        self._decisions: dict[tuple[object, ...], list[tuple[str, str] | None]] = {}
        self._read: dict[str, tuple[str, ...]] = {}

    def write(self, session: Session, study_pks: Sequence[object]) -> int:
        rows = session.execute(
            select(Series, Study, Patient)
            .join(Study, Study.id == Series.study_pk)
            .outerjoin(Patient, Patient.id == Study.patient_pk)
            .where(Series.study_pk.in_(study_pks))
            .order_by(Series.study_pk, Series.id)
        ).all()
        return self._write(session, [(se, st, pa) for se, st, pa in rows])

    def write_series(self, session: Session, series_pks: Sequence[object]) -> int:
        rows = session.scalars(select(Series).where(Series.id.in_(series_pks))).all()
        return self._write(session, [(se, None, None) for se in rows])

    def _write(
        self, session: Session, rows: list[tuple[Series, Study | None, Patient | None]]
    ) -> int:
        if not rows:
            return 0
        pks = [se.id for se, _, _ in rows]
        counts: dict[int, int] = {
            pk: n
            for pk, n in session.execute(
                select(Instance.series_pk, func.count(func.distinct(Instance.sop_instance_uid)))
                .where(Instance.series_pk.in_(pks))
                .group_by(Instance.series_pk)
            )
            if pk is not None
        }
        session.execute(delete(CohortProtocol).where(CohortProtocol.series_pk.in_(pks)))
        session.execute(delete(CohortSeries).where(CohortSeries.series_pk.in_(pks)))
        by_study: dict[int | None, list[tuple[Series, Study | None, Patient | None]]] = {}
        for row in rows:
            by_study.setdefault(row[1].id if row[1] is not None else None, []).append(row)
        series_rows: list[dict[str, Any]] = []
        protocol_rows: list[dict[str, Any]] = []
        for members in by_study.values():
            study, patient = members[0][1], members[0][2]
            attrs = [
                (se.series_instance_uid, index_attributes(se, counts.get(se.id)))
                for se, _, _ in members
            ]
            for (se, _, _), chosen in zip(members, self._classify(study, attrs), strict=True):
                protocol_rows += [
                    {"series_pk": se.id, "protocol": name, "role": role} for name, role in chosen
                ]
            series_rows += self._rows(members, study, patient, counts)
        uids = [str(r["pseudo_series_uid"]) for r in series_rows]
        verdicts = _verdicts(session, uids)
        for values in series_rows:
            verdict, measured = verdicts[str(values["pseudo_series_uid"])]
            values["qc_verdict"], values["biomarkers"] = verdict, measured
        if series_rows:
            # Core inserts: the ORM's bulk path costs more than the rest of the refresh
            session.execute(insert(_table(CohortSeries)), series_rows)
        if protocol_rows:
            session.execute(insert(_table(CohortProtocol)), protocol_rows)
        self.done.update(pks)
        self.judged.update(uids)
        return len(series_rows)

    def _classify(
        self, study: Study | None, attrs: Sequence[tuple[str, Attributes]]
    ) -> list[list[tuple[str, str]]]:
        """Per series, the (protocol, role) pairs of the protocols that select it."""
        chosen: list[list[tuple[str, str]]] = [[] for _ in attrs]
        modalities = {str(a.get("Modality")) for _, a in attrs if a.get("Modality")}
        for protocol in self.protocols.protocols.values():
            query = protocol.study
            if query.modality and query.modality not in modalities:
                continue
            if study is None or not query.matches_description(study.study_description):
                continue
            read = self._fields(protocol)
            signature = (
                protocol.name,
                *(tuple(_hashable(a.get(f)) for f in read) for _, a in attrs),
            )
            decided = self._decisions.get(signature)
            if decided is None:
                decision = protocol.decide_study(attrs)
                decided = [
                    (protocol.name, d.rule) if decision.selected and d.selected else None
                    for _, d in decision.series
                ]
                if len(self._decisions) > 20000:
                    self._decisions.clear()
                self._decisions[signature] = decided
            for i, pair in enumerate(decided):
                if pair is not None:
                    chosen[i].append(pair)
        return chosen

    def _fields(self, protocol: Protocol) -> tuple[str, ...]:
        """The keywords the protocol's rules read: equal values, equal decisions."""
        found = self._read.get(protocol.name)
        if found is None:
            rules = [rule for _, rule in (*protocol.include, *protocol.exclude)]
            found = self._read[protocol.name] = tuple(
                sorted(frozenset().union(*(r.fields() for r in rules)))
            )
        return found

    def _rows(
        self,
        members: list[tuple[Series, Study | None, Patient | None]],
        study: Study | None,
        patient: Patient | None,
        counts: dict[int, int],
    ) -> list[dict[str, Any]]:
        key = self.key
        pseudonym = offset = None
        patient_rkey = study_rkey = None
        if patient is not None:
            patient_rkey = record_key(self.secret, "patient", patient.patient_key)
        if study is not None:
            study_rkey = record_key(self.secret, "study", study.study_instance_uid)
        if patient is not None:
            pseudonym = key.pseudonym(patient.patient_key)
            offset = key.date_offset_days(patient.patient_key)
        day = study.study_date if study is not None else None
        shifted = (
            day + dt.timedelta(days=offset) if day is not None and offset is not None else None
        )
        known = [
            patient.patient_id if patient else None,
            patient.patient_name if patient else None,
            patient.patient_birth_date if patient else None,
            *(
                (
                    study.accession_number,
                    study.study_id,
                    study.institution_name,
                    study.institution_address,
                    study.referring_physician_name,
                )
                if study
                else ()
            ),
        ]
        sex = (patient.patient_sex or "").strip().upper()[:1] if patient else ""
        out = []
        for se, _, _ in members:
            acquisition = (se.mr_acquisition_type or "").strip().upper()
            scrub = _scrubber(
                (
                    *known,
                    se.performing_physician_name,
                    se.operators_name,
                    se.station_name,
                    se.device_serial_number,
                )
            )
            out.append(
                {
                    "series_pk": se.id,
                    "study_pk": study.id if study is not None else None,
                    "patient_pk": patient.id if patient is not None else None,
                    "pseudonym": pseudonym,
                    "pseudo_study_uid": key.uid(study.study_instance_uid) if study else "",
                    "pseudo_series_uid": key.uid(se.series_instance_uid),
                    "patient_rkey": patient_rkey,
                    "study_rkey": study_rkey,
                    "series_rkey": record_key(self.secret, "series", se.series_instance_uid),
                    "study_date": day,
                    "study_year": day.year if day else None,
                    "shifted_date": shifted,
                    "shifted_year": shifted.year if shifted else None,
                    "age": age_at(patient.patient_birth_date if patient else None, day),
                    "sex": sex if sex in ("F", "M", "O") else None,
                    "modality": (se.modality or "").strip().upper() or None,
                    "body_part": (se.body_part_examined or "").strip().upper() or None,
                    "manufacturer": se.manufacturer,
                    "model": se.manufacturer_model_name,
                    "scanner": " ".join(
                        p for p in (se.manufacturer, se.manufacturer_model_name) if p
                    )
                    or None,
                    "field_strength": nominal_field_strength(se.magnetic_field_strength),
                    "slice_thickness": se.slice_thickness,
                    "acquisition": acquisition if acquisition in ("2D", "3D") else None,
                    "protocol_name": scrub(se.protocol_name),
                    "series_description": scrub(se.series_description),
                    "study_description": scrub(study.study_description) if study else None,
                    "instances": counts.get(se.id, 0),
                }
            )
        return out
