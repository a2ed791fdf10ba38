"""The accounting of a batch: what arrived against what the manifest promised, and duplicates.

Per manifest line (accession number), the first that applies:
- missing: nothing arrived under it;
- incomplete: fewer distinct readable instances than the expected file count;
- excess: more distinct instances than expected;
- duplicated: everything arrived, but some files twice, or the accession on several studies;
- complete.
Studies that arrived but are not in the manifest are "unexpected". A batch without a manifest is
"no manifest", never incomplete.
"""

from __future__ import annotations

from cohortflow.models import repository
from cohortflow.models.database import IndexDB
from cohortflow.models.errors import CohortflowError
from cohortflow.models.ingest import (
    AccessionConflict,
    BatchReport,
    FileStatus,
    ManifestLine,
    ProblemFile,
    ScannerAlert,
    SopConflict,
    StatusCount,
    StudyArrival,
)


class UnknownBatchError(CohortflowError):
    pass


def _line(
    accession: str, expected: int | None, arrivals: list[repository.StudyRow]
) -> ManifestLine:
    files = sum(a.files for a in arrivals)
    instances = sum(a.instances for a in arrivals)
    doubled = sum(a.files - a.distinct_contents for a in arrivals)
    if not arrivals:
        status, detail = "missing", "no file of this study arrived"
    elif expected is not None and instances < expected:
        status = "incomplete"
        detail = f"{instances} of {expected} expected instances arrived readable"
    elif expected is not None and instances > expected:
        status, detail = "excess", f"{instances} instances arrived, {expected} expected"
    elif len(arrivals) > 1:
        status = "duplicated"
        detail = f"{len(arrivals)} different studies carry this accession number"
    elif doubled:
        status = "duplicated"
        detail = f"{doubled} file{'s' if doubled > 1 else ''} arrived more than once"
    else:
        status, detail = "complete", ""
    return ManifestLine(
        accession_number=accession,
        expected_files=expected,
        received_files=files,
        received_instances=instances,
        studies=len(arrivals),
        status=status,
        detail=detail,
    )


def batch_report(index: IndexDB, name: str) -> BatchReport:
    """The accounting of batch ``name``; UnknownBatchError lists the batches there are."""
    with index.session() as session:
        batch = repository.batch_by_name(session, name)
        if batch is None:
            names = repository.batch_names(session)
            known = ", ".join(names[-20:]) if names else "none yet"
            raise UnknownBatchError(f"no batch named {name!r} in the index (batches: {known})")
        counts = repository.status_counts(session, batch.id)
        new_content, copies = repository.content_counts(session, batch.id)
        patients, studies, series, instances = repository.hierarchy_counts(session, batch.id)
        arrivals = repository.study_rows(session, batch.id)
        entries = repository.manifest_entries(session, batch.id)
        sop = repository.sop_conflicts(session, batch.id)
        accessions = repository.accession_conflicts(session, batch.id)
        before = repository.delivered_before(session, batch.id)
        alerts = repository.scanner_alerts(session, batch.id)
        problems = repository.problem_files(session, batch.id)
        has_manifest = batch.manifest_file is not None
        state, source = batch.state, batch.source

    by_accession: dict[str, list[repository.StudyRow]] = {}
    for arrival in arrivals:
        by_accession.setdefault(arrival.accession_number or "", []).append(arrival)
    lines = [
        _line(e.accession_number, e.expected_files, by_accession.get(e.accession_number, []))
        for e in entries
    ]
    promised = {e.accession_number for e in entries}
    unexpected = (
        [
            StudyArrival(
                study_instance_uid=a.study_instance_uid,
                accession_number=a.accession_number,
                files=a.files,
                instances=a.instances,
                duplicate_files=a.files - a.distinct_contents,
            )
            for a in arrivals
            if (a.accession_number or "") not in promised
        ]
        if has_manifest
        else []
    )
    if not has_manifest:
        verdict = "no manifest"
    elif any(line.status in {"missing", "incomplete"} for line in lines):
        verdict = "incomplete"
    else:
        verdict = "complete"
    return BatchReport(
        batch=name,
        source=source,
        state="complete" if state == "complete" else "interrupted",
        files=sum(counts.values()),
        by_status=[StatusCount(status=s, files=counts.get(s.value, 0)) for s in FileStatus],
        new_content=new_content,
        identical_copies=copies,
        patients=patients,
        studies=studies,
        series=series,
        instances=instances,
        sop_conflicts=[SopConflict(sop_instance_uid=u, versions=n) for u, n in sop],
        accession_conflicts=[
            AccessionConflict(accession_number=a, study_instance_uids=uids)
            for a, uids in accessions
        ],
        delivered_before=before,
        manifest=verdict,
        manifest_lines=lines,
        unexpected_studies=unexpected,
        scanner_alerts=[
            ScannerAlert(manufacturer=m, model=o, software_versions=s, reason=r, files=n)
            for m, o, s, r, n in alerts
        ],
        problems=[
            ProblemFile(path=p, status=FileStatus(s), reason_code=c, reason=r)
            for p, s, c, r in problems
        ],
    )
