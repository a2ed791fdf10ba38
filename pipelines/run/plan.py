"""Which archived files make up each selected study of a protocol (identified side)."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import select, true

from cohortflow.models.database import IndexDB
from cohortflow.models.schema import Instance, SelectedSeries, Series, Study
from cohortflow.pipelines.archive.store import ArchiveStore


@dataclass(frozen=True)
class SeriesPlan:
    series_uid: str  # as received (identified side)
    role: str  # the protocol rule that selected it
    files: tuple[str, ...]  # archive paths of its instances, sorted
    manufacturer: str | None
    model: str | None
    software_versions: str | None


@dataclass(frozen=True)
class StudyPlan:
    """One selected study as the archive holds it."""

    pk: int  # studies.id: what flow tasks pass around (no identifier)
    protocol: str
    study_uid: str
    study_date: str  # YYYY-MM-DD or ""
    #: SHA-256 over the series' UIDs, roles and instance hashes: the same content, the same key
    content_key: str
    series: tuple[SeriesPlan, ...]


def plan_studies(
    index: IndexDB,
    archive: ArchiveStore,
    protocol: str,
    selection_id: int,
    study_pk: int | None = None,
) -> list[StudyPlan]:
    """The studies of a selection with at least one selected series in the archive, in study
    UID order. A series not (yet) archived is left out; its retrieval status says why."""
    with index.session() as session:
        # one study: its selected series only (each step of each study plans its study: reading
        # the whole selection every time grew with the square of the selection)
        of_study = (
            []
            if study_pk is None
            else [
                SelectedSeries.study_instance_uid
                == select(Study.study_instance_uid).where(Study.id == study_pk).scalar_subquery()
            ]
        )
        chosen = session.execute(
            select(
                SelectedSeries.study_instance_uid,
                SelectedSeries.series_instance_uid,
                SelectedSeries.rule,
            ).where(SelectedSeries.selection_id == selection_id, *of_study)
        ).all()
        rules = {series: rule for _, series, rule in chosen}
        if not rules:
            return []
        rows = session.execute(
            select(
                Study.id,
                Study.study_instance_uid,
                Study.study_date,
                Series.series_instance_uid,
                Series.manufacturer,
                Series.manufacturer_model_name,
                Series.software_versions,
                Instance.sha256,
            )
            .join(Series, Series.study_pk == Study.id)
            .join(Instance, Instance.series_pk == Series.id)
            .join(
                SelectedSeries,
                (SelectedSeries.series_instance_uid == Series.series_instance_uid)
                & (SelectedSeries.selection_id == selection_id),
            )
            .where(true() if study_pk is None else Study.id == study_pk)
        ).all()
    studies: dict[int, dict[str, object]] = {}
    files: dict[tuple[int, str], set[str]] = defaultdict(set)
    scanner: dict[str, tuple[str | None, str | None, str | None]] = {}
    for pk, study_uid, date, series_uid, manufacturer, model, software, sha in rows:
        studies[pk] = {"uid": study_uid, "date": date.isoformat() if date else ""}
        files[(pk, series_uid)].add(sha)
        scanner[series_uid] = (manufacturer, model, software)
    plans = []
    for pk, study in studies.items():
        series = []
        digest = hashlib.sha256(f"{protocol}\n".encode())
        for (owner, series_uid), hashes in sorted(files.items()):
            if owner != pk:
                continue
            ordered = sorted(hashes)
            digest.update(f"{series_uid}|{rules[series_uid]}|{','.join(ordered)}\n".encode())
            series.append(
                SeriesPlan(
                    series_uid,
                    rules[series_uid],
                    tuple(str(archive.path_for(h)) for h in ordered),
                    *scanner[series_uid],
                )
            )
        plans.append(
            StudyPlan(
                pk,
                protocol,
                str(study["uid"]),
                str(study["date"]),
                digest.hexdigest(),
                tuple(series),
            )
        )
    return sorted(plans, key=lambda p: p.study_uid)


def plan_study(
    index: IndexDB, archive: ArchiveStore, protocol: str, selection_id: int, study_pk: int
) -> StudyPlan | None:
    found = plan_studies(index, archive, protocol, selection_id, study_pk)
    return found[0] if found else None
