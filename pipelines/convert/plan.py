"""Which series of a study are converted, in which role and under which name.

The protocol (given, or the one whose study-description patterns match) selects the series; its
include rules give the role (``bids`` maps roles to suffixes); asked for, every other MR image
series is converted too. Every series not taken is reported with why (unreadable, not selected,
burned-in annotation, localizer, not an MR image). Names: each subject's sessions are numbered in
its sessions file (new studies numbered and saved now, with the age at each), runs per session;
each subject whose series were de-identified goes into ``participants.tsv`` with its sex (a
subject of identified input is labelled by its real PatientID: that label names its folder but
is written into no file).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from filelock import FileLock

from cohortflow.models.series import NotTaken
from cohortflow.pipelines.convert import bids
from cohortflow.pipelines.dicom.header import attributes
from cohortflow.pipelines.dicom.identified import is_deidentified
from cohortflow.pipelines.dicom.protocols import ProtocolSet
from cohortflow.pipelines.dicomfolder import FolderFile, first_header, has_header, series_number
from cohortflow.qc.header import header_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedSeries:
    """A series to convert: its files, protocol and role, BIDS name, subject, study date, the
    subject's sex and age at the study (BIDS levels; None when the header has none), and whether
    the header says it was de-identified."""

    study: str
    series: str
    entries: list[FolderFile]
    protocol: str
    role: str
    name: bids.BidsName
    subject: str  # "" when the series has no usable PatientID
    study_date: str
    sex: str | None = None
    age: int | None = None
    deidentified: bool = False


def plan_study(
    study_uid: str,
    series: Mapping[str, list[FolderFile]],
    protocols: ProtocolSet,
    protocol_name: str | None,
    every_series: bool,
) -> tuple[list[PlannedSeries], list[NotTaken]]:
    """Which series of a study are converted, in which role and under which name."""
    ordered = sorted(series.items(), key=lambda item: (series_number(item[1]), item[0]))
    plans: list[PlannedSeries] = []
    left: list[NotTaken] = []
    readable = [(uid, e) for uid, e in ordered if has_header(e)]
    for uid, entries in ordered:
        if not has_header(entries):
            left.append(
                NotTaken(
                    study_uid,
                    uid,
                    str(entries[0].relative.parent),
                    "",
                    "unreadable",
                    f"none of its {len(entries)} file(s) can be read: {entries[0].damage}",
                )
            )
    if not readable:
        return plans, left
    study_description = header_text(first_header(readable[0][1]), "StudyDescription")
    protocol = protocols.choose(protocol_name, study_description)
    for uid, entries in readable:
        header = first_header(entries)
        folder = str(entries[0].relative.parent)
        what = header_text(header, "SeriesDescription")
        role: str | None = None
        decision = protocol.classify_series(attributes(header, sorted(protocol.series_fields())))
        code = "not_selected"
        if decision.selected:
            role = decision.rule
            why = (
                f"protocol {protocol.name} takes it as {role}, which is not converted by default "
                f"(--all converts every image series); {decision.why}"
            )
        else:
            why = f"not selected by protocol {protocol.name} ({decision.rule}: {decision.why})"
        name = bids.name_for(role, header, every_series)
        if name is None:
            left.append(NotTaken(study_uid, uid, folder, what, code, why))
            continue
        if str(header.get("BurnedInAnnotation") or "").upper() == "YES":
            left.append(
                NotTaken(
                    study_uid,
                    uid,
                    folder,
                    what,
                    "burned_in",
                    "BurnedInAnnotation YES: its pixels may show identifying text",
                )
            )
            continue
        if role is None and "LOCALIZER" in {str(v).upper() for v in header.get("ImageType") or []}:
            left.append(
                NotTaken(
                    study_uid, uid, folder, what, "localizer", "ImageType LOCALIZER: not a volume"
                )
            )
            continue
        if role is None and str(header.get("Modality") or "") != "MR":
            left.append(
                NotTaken(
                    study_uid,
                    uid,
                    folder,
                    what,
                    "not_mr_image",
                    f"Modality {header.get('Modality') or 'missing'}: not an MR image series",
                )
            )
            continue
        plans.append(
            PlannedSeries(
                study=study_uid,
                series=uid,
                entries=entries,
                protocol=protocol.name if protocol else "",
                role=role or "",
                name=name,
                subject=bids.bids_label(str(header.get("PatientID") or "")),
                study_date=str(header.get("StudyDate") or ""),
                sex=bids.bids_sex(header.get("PatientSex")),
                age=bids.age_years(header.get("PatientAge")),
                deidentified=is_deidentified(header),
            )
        )
    return plans, [replace(n, files=len(series[n.series])) for n in left]


def name_plans(
    plans: Sequence[PlannedSeries], out: Path
) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(series, study) -> (subject, session, file name): sessions from each subject's sessions
    file (new studies numbered and saved now, with their ages), run numbers per session; the
    subjects of de-identified series are added to ``participants.tsv``."""
    by_subject: dict[str, dict[str, str]] = defaultdict(dict)
    ages: dict[str, int | None] = {}
    sexes: dict[str, str | None] = {}
    for plan in plans:
        if plan.subject:
            by_subject[plan.subject][plan.study] = plan.study_date
            ages[plan.study] = ages.get(plan.study) or plan.age
            if plan.deidentified:
                sexes[plan.subject] = sexes.get(plan.subject) or plan.sex
    sessions: dict[str, bids.Sessions] = {}
    locks = out / ".locks"  # hidden: BIDS tools skip dot files
    for subject, studies in by_subject.items():
        # two studies of one subject converted at once (flow workers) must not both number
        # themselves from the same file
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(locks / f"sub-{subject}.lock"):
            known = bids.Sessions.load(out, subject)
            known.assign(studies.items())
            for study in studies:
                known.note_age(study, ages[study])
            known.save()
        sessions[subject] = known
    identified = set(by_subject) - set(sexes)
    if identified:
        log.warning(
            "convert: %d subject(s) of series that were not de-identified (no "
            "PatientIdentityRemoved YES) are labelled by their PatientID and left out of "
            "participants.tsv",
            len(identified),
        )
    if sexes:
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(locks / "participants.lock"):
            bids.update_participants(out, sexes)
    groups: dict[tuple[str, str], list[PlannedSeries]] = defaultdict(list)
    for plan in plans:
        groups[plan.subject, plan.study].append(plan)
    names: dict[tuple[str, str], tuple[str, str, str]] = {}
    for (subject, study), members in groups.items():
        session = sessions[subject].label(study) if subject else ""
        runs = bids.assign_runs(
            [(p.series, p.name, (series_number(p.entries), p.series)) for p in members]
        )
        for p in members:
            stem = bids.stem(subject, session, p.name, runs[p.series]) if subject else ""
            names[p.series, p.study] = (subject, session, stem)
    return names
