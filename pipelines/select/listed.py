"""Select listed studies (a saved cohort, a manifest) for a protocol.

A listed study the archive already holds is classified from the index's header fields, without
asking the PACS anything (clinical systems are spared); a study the archive does not hold is
looked up in the PACS by StudyInstanceUID (or AccessionNumber) and its series classified from
the series C-FIND, as ``select_studies`` does. The protocol's series rules decide in both cases;
its study query (description, date range) does not: the list is the choice of studies.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from sqlalchemy import func, select

from cohortflow.models.database import IndexDB
from cohortflow.models.schema import Instance, Series, Study
from cohortflow.pipelines.dicom.header import Attributes
from cohortflow.pipelines.dicom.protocols import Protocol
from cohortflow.pipelines.pacs.dimse import PacsNode, Session, query_contexts
from cohortflow.pipelines.select.query import (
    STUDY_KEYS,
    SelectionResult,
    StudyCandidate,
    decide_candidate,
)


@dataclass(frozen=True)
class ListedStudy:
    """One study of the list: its UID, else its accession number."""

    study_instance_uid: str | None
    accession_number: str | None = None


def index_attributes(series: Series, instances: int | None = None) -> Attributes:
    """A series row of the index as the DICOM keywords a series C-FIND answers with (what the
    protocol rules read); values the index does not keep are absent."""
    values: Attributes = {
        "SeriesInstanceUID": series.series_instance_uid,
        "SeriesNumber": series.series_number,
        "SeriesDescription": series.series_description,
        "ProtocolName": series.protocol_name,
        "Modality": series.modality,
        "BodyPartExamined": series.body_part_examined,
        "SOPClassUID": series.sop_class_uid,
        "Manufacturer": series.manufacturer,
        "ManufacturerModelName": series.manufacturer_model_name,
        "SoftwareVersions": series.software_versions,
        "MagneticFieldStrength": series.magnetic_field_strength,
        "RepetitionTime": series.repetition_time,
        "EchoTime": series.echo_time,
        "InversionTime": series.inversion_time,
        "FlipAngle": series.flip_angle,
        "SliceThickness": series.slice_thickness,
        "SpacingBetweenSlices": series.spacing_between_slices,
        "Rows": series.rows,
        "Columns": series.columns,
        "MRAcquisitionType": series.mr_acquisition_type,
        "ImageType": series.image_type,
        "ScanningSequence": series.scanning_sequence,
        "SequenceVariant": series.sequence_variant,
        "NumberOfSeriesRelatedInstances": instances,
    }
    if series.pixel_spacing_row is not None and series.pixel_spacing_column is not None:
        values["PixelSpacing"] = [series.pixel_spacing_row, series.pixel_spacing_column]
    return {k: v for k, v in values.items() if v is not None}


_Archived = dict[int, tuple[Study, list[tuple[str, Attributes]]]]


def _archived(index: IndexDB, listed: Sequence[ListedStudy]) -> _Archived:
    """The listed studies the index holds, with their series as C-FIND-like attributes, by
    position in ``listed``."""
    uids = [s.study_instance_uid for s in listed if s.study_instance_uid]
    accessions = [s.accession_number for s in listed if not s.study_instance_uid]
    found: _Archived = {}
    with index.session() as session:
        studies: list[Study] = []
        for start in range(0, len(uids), 2000):
            studies += session.scalars(
                select(Study).where(Study.study_instance_uid.in_(uids[start : start + 2000]))
            ).all()
        for start in range(0, len(accessions), 2000):
            studies += session.scalars(
                select(Study).where(Study.accession_number.in_(accessions[start : start + 2000]))
            ).all()
        by_uid = {s.study_instance_uid: s for s in studies}
        by_accession: dict[str, list[Study]] = {}
        for s in studies:
            if s.accession_number:
                by_accession.setdefault(s.accession_number, []).append(s)
        for position, item in enumerate(listed):
            if item.study_instance_uid:
                study = by_uid.get(item.study_instance_uid)
            else:
                matches = by_accession.get(item.accession_number or "", [])
                study = matches[0] if len(matches) == 1 else None
            if study is None:
                continue
            series = session.scalars(
                select(Series).where(Series.study_pk == study.id).order_by(Series.id)
            ).all()
            counts = dict(
                session.execute(
                    select(Instance.series_pk, func.count(func.distinct(Instance.sop_instance_uid)))
                    .where(Instance.series_pk.in_([s.id for s in series]))
                    .group_by(Instance.series_pk)
                ).all()
            )
            pairs: list[tuple[str, Attributes]] = [
                (s.series_instance_uid, index_attributes(s, counts.get(s.id))) for s in series
            ]
            found[position] = (study, pairs)
    return found


def select_listed(
    protocol: Protocol,
    listed: Sequence[ListedStudy],
    index: IndexDB,
    *,
    source: str,
    node: PacsNode | None = None,
    local_aet: str = "COHORTFLOW",
    association: Callable[[], AbstractContextManager[None]] | None = None,
) -> SelectionResult:
    """Decide the series of each listed study for ``protocol``: archived studies from the
    index, the others from the PACS ``node`` (without one they are reported as not found).
    ``source`` says where the list came from (``cohort NAME``)."""
    archived = _archived(index, listed)
    studies: list[StudyCandidate] = []
    missing = [(i, s) for i, s in enumerate(listed) if i not in archived]
    asked: dict[int, StudyCandidate] = {}
    if missing and node is not None:
        keys = sorted(protocol.series_fields())
        with (
            (association or nullcontext)(),
            Session(node, local_aet, query_contexts("find")) as pacs,
        ):
            for position, item in missing:
                query: dict[str, object] = (
                    {"StudyInstanceUID": item.study_instance_uid}
                    if item.study_instance_uid
                    else {"AccessionNumber": item.accession_number}
                )
                answers = [
                    a for a in pacs.find("STUDY", query, STUDY_KEYS) if a.get("StudyInstanceUID")
                ]
                if len(answers) != 1:
                    continue
                answer = answers[0]
                uid = str(answer["StudyInstanceUID"])
                rows = pacs.find("SERIES", {"StudyInstanceUID": uid}, keys)
                pairs = [
                    (str(r["SeriesInstanceUID"]), r) for r in rows if r.get("SeriesInstanceUID")
                ]
                asked[position] = decide_candidate(protocol, uid, answer, pairs)
    for position, item in enumerate(listed):
        if position in archived:
            study, pairs = archived[position]
            header: Attributes = {
                "AccessionNumber": study.accession_number,
                "StudyDate": f"{study.study_date:%Y%m%d}" if study.study_date else None,
                "StudyDescription": study.study_description,
            }
            studies.append(decide_candidate(protocol, study.study_instance_uid, header, pairs))
        elif position in asked:
            studies.append(asked[position])
        else:
            where = "the archive" + (" or the PACS" if node is not None else "")
            what = item.study_instance_uid or f"accession {item.accession_number}"
            studies.append(
                StudyCandidate(
                    item.study_instance_uid or "",
                    item.accession_number,
                    None,
                    None,
                    False,
                    f"study {what} is not in {where}",
                )
            )
    dates = [s.study_date for s in studies if s.study_date is not None]
    today = dt.date.today()
    return SelectionResult(
        protocol.name,
        min(dates, default=today),
        max(dates, default=today),
        f"{source}; archive" + (f" + {node}" if node is not None else ""),
        tuple(studies),
        listed_from=source,
        notes=(
            f"Studies listed by {source}: archived ones classified from the index, the others "
            "looked up in the PACS; the protocol's series rules decide, its study query does "
            "not.",
        ),
    )
