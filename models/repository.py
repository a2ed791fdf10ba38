"""Reads and writes of the archive index, in bulk, the same on SQLite and PostgreSQL.

Writes are idempotent: every insert is keyed (batch + path, content hash, UIDs) and ignores or
updates an existing row, so replaying a chunk after a crash leaves exactly one row per key.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Table, and_, case, delete, func, insert, select, update
from sqlalchemy.orm import Session, aliased

from cohortflow.models.ingest import FileRecord, FileStatus, InstanceHeader, patient_key
from cohortflow.models.scanners import KnownScanners
from cohortflow.models.schema import (
    Batch,
    Blob,
    File,
    Instance,
    ManifestEntry,
    Patient,
    Scanner,
    Series,
    Study,
)

_IN_CHUNK = 500  # values per IN (...) list: far below SQLite's and PostgreSQL's limits


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def dialect_insert(session: Session, table: Table | Any) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(table)
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    raise NotImplementedError(f"index backend {dialect} is not supported (SQLite, PostgreSQL)")


def chunks(values: Sequence[Any], size: int = _IN_CHUNK) -> Iterable[Sequence[Any]]:
    """``values`` in slices of ``size``: one IN (...) list each."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def insert_ignore(
    session: Session, table: Any, rows: list[dict[str, Any]], keys: list[str]
) -> None:
    """Insert rows, skipping those whose ``keys`` already exist.

    Executemany with one cached statement: a multi-VALUES statement is compiled anew for every
    chunk and cost more than all of ingest's file reading.
    """
    if rows:
        statement = dialect_insert(session, table).on_conflict_do_nothing(index_elements=keys)
        session.execute(statement, rows)


# --- batches and manifests -------------------------------------------------------------------


def begin_batch(session: Session, name: str, source: str) -> int:
    """Create the batch or reopen it for another ingest run; returns its id."""
    batch = session.scalar(select(Batch).where(Batch.name == name))
    stamp = now()
    if batch is None:
        batch = Batch(name=name, source=source, created_at=stamp, started_at=stamp, state="running")
        session.add(batch)
        session.flush()
    else:
        batch.started_at = stamp
        batch.finished_at = None
        batch.state = "running"
    return batch.id


def batch_by_name(session: Session, name: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.name == name))


def batch_names(session: Session) -> list[str]:
    return list(session.scalars(select(Batch.name).order_by(Batch.id)))


def finish_batch(session: Session, batch_id: int) -> None:
    session.execute(
        update(Batch).where(Batch.id == batch_id).values(state="complete", finished_at=now())
    )


def replace_manifest(
    session: Session,
    batch_id: int,
    manifest_file: str,
    manifest_sha256: str,
    rows: Sequence[tuple[str, int | None, int]],
) -> None:
    """Store the batch's manifest: (accession, expected files or None, line) per study."""
    session.execute(delete(ManifestEntry).where(ManifestEntry.batch_id == batch_id))
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(manifest_file=manifest_file, manifest_sha256=manifest_sha256)
    )
    if rows:
        session.execute(
            insert(ManifestEntry),
            [
                {"batch_id": batch_id, "accession_number": a, "expected_files": n, "line": line}
                for a, n, line in rows
            ],
        )


# --- incremental lookups ---------------------------------------------------------------------


@dataclass(frozen=True)
class KnownFile:
    """What the index already says about a path (in some batch)."""

    batch_id: int
    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    status: str
    reason_code: str
    reason: str
    notes: str
    instance_pk: int | None
    new_content: bool


def known_files(session: Session, paths: Sequence[str]) -> dict[str, list[KnownFile]]:
    found: dict[str, list[KnownFile]] = {}
    columns = (
        File.batch_id,
        File.path,
        File.size,
        File.mtime_ns,
        File.sha256,
        File.status,
        File.reason_code,
        File.reason,
        File.notes,
        File.instance_pk,
        File.new_content,
    )
    for part in chunks(list(paths)):
        for row in session.execute(select(*columns).where(File.path.in_(part))):
            found.setdefault(row.path, []).append(KnownFile(**row._asdict()))
    return found


def copy_files(session: Session, batch_id: int, rows: Sequence[KnownFile]) -> None:
    """Index files already known from another batch in this batch, without reading them."""
    stamp = now()
    values = [
        {**asdict(k), "batch_id": batch_id, "new_content": False, "ingested_at": stamp}
        for k in rows
    ]
    insert_ignore(session, File.__table__, values, ["batch_id", "path"])


# --- recording a chunk of read files ---------------------------------------------------------


def _patient_key(h: InstanceHeader) -> str:
    return patient_key(h.patient_id, h.issuer_of_patient_id, h.patient_name, h.patient_birth_date)


def _date(text: str | None) -> dt.date | None:
    if not text or len(text) < 8:
        return None
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _scanner_key(h: InstanceHeader) -> tuple[str, str, str] | None:
    if not (h.manufacturer or h.manufacturer_model_name or h.modality == "MR"):
        return None
    return (h.manufacturer or "", h.manufacturer_model_name or "", h.software_versions or "")


def _ids(session: Session, column: Any, key_column: Any, keys: Sequence[Any]) -> dict[Any, int]:
    result: dict[Any, int] = {}
    for part in chunks(list(keys)):
        for key, pk in session.execute(select(key_column, column).where(key_column.in_(part))):
            result[key] = pk
    return result


def record_files(
    session: Session,
    batch_id: int,
    records: Sequence[FileRecord],
    scanners: KnownScanners,
    earlier: Mapping[str, KnownFile],
) -> None:
    """Write read files and everything their headers say, in the caller's transaction.

    ``earlier``: this batch's existing rows for paths read again (from ``known_files``).
    """
    stamp = now()
    with_content = [r for r in records if r.sha256 is not None]
    hashes = list(dict.fromkeys(r.sha256 for r in with_content if r.sha256))
    existing: set[str] = set()
    for part in chunks(hashes):
        existing.update(session.scalars(select(Blob.sha256).where(Blob.sha256.in_(part))))
    sizes = {r.sha256: r.size for r in with_content}
    insert_ignore(
        session,
        Blob.__table__,
        [
            {"sha256": h, "size": sizes[h] or 0, "first_batch_id": batch_id, "archived_at": stamp}
            for h in hashes
            if h not in existing
        ],
        ["sha256"],
    )

    headed = [r for r in with_content if r.header is not None and r.header.sop_instance_uid]
    headers = [r.header for r in headed if r.header is not None]

    patients: dict[str, InstanceHeader] = {}
    studies: dict[str, InstanceHeader] = {}
    series: dict[str, InstanceHeader] = {}
    scanner_keys: dict[tuple[str, str, str], None] = {}
    for h in headers:
        if h.study_instance_uid and h.series_instance_uid:
            patients.setdefault(_patient_key(h), h)
            studies.setdefault(h.study_instance_uid, h)
            series.setdefault(h.series_instance_uid, h)
            key = _scanner_key(h)
            if key is not None:
                scanner_keys.setdefault(key)

    insert_ignore(
        session,
        Patient.__table__,
        [
            {
                "patient_key": key,
                "patient_id": h.patient_id,
                "issuer_of_patient_id": h.issuer_of_patient_id,
                "patient_name": h.patient_name,
                "patient_birth_date": h.patient_birth_date,
                "patient_sex": h.patient_sex,
            }
            for key, h in patients.items()
        ],
        ["patient_key"],
    )
    patient_ids = _ids(session, Patient.id, Patient.patient_key, list(patients))
    insert_ignore(
        session,
        Study.__table__,
        [
            {
                "study_instance_uid": uid,
                "patient_pk": patient_ids.get(_patient_key(h)),
                "accession_number": h.accession_number,
                "study_date": _date(h.study_date),
                "study_time": h.study_time,
                "study_description": h.study_description,
                "study_id": h.study_id,
                "institution_name": h.institution_name,
                "institution_address": h.institution_address,
                "referring_physician_name": h.referring_physician_name,
            }
            for uid, h in studies.items()
        ],
        ["study_instance_uid"],
    )
    study_ids = _ids(session, Study.id, Study.study_instance_uid, list(studies))

    if scanner_keys:
        rows = []
        for manufacturer, model, software in scanner_keys:
            verdict = scanners.check(manufacturer, model, software)
            rows.append(
                {
                    "manufacturer": manufacturer,
                    "model": model,
                    "software_versions": software,
                    "known": verdict.known,
                    "reason": verdict.reason,
                    "first_batch_id": batch_id,
                    "first_seen_at": stamp,
                }
            )
        insert_ignore(
            session, Scanner.__table__, rows, ["manufacturer", "model", "software_versions"]
        )
    scanner_ids: dict[tuple[str, str, str], int] = {}
    for manufacturer in {k[0] for k in scanner_keys}:
        for pk, model, software in session.execute(
            select(Scanner.id, Scanner.model, Scanner.software_versions).where(
                Scanner.manufacturer == manufacturer
            )
        ):
            scanner_ids[(manufacturer, model, software)] = pk

    series_rows = []
    for uid, h in series.items():
        key = _scanner_key(h)
        series_rows.append(
            {
                "series_instance_uid": uid,
                "study_pk": study_ids.get(h.study_instance_uid or ""),
                "scanner_pk": scanner_ids.get(key) if key else None,
                "modality": h.modality,
                "series_number": h.series_number,
                "series_description": h.series_description,
                "protocol_name": h.protocol_name,
                "body_part_examined": h.body_part_examined,
                "sop_class_uid": h.sop_class_uid,
                "manufacturer": h.manufacturer,
                "manufacturer_model_name": h.manufacturer_model_name,
                "software_versions": h.software_versions,
                "station_name": h.station_name,
                "performing_physician_name": h.performing_physician_name,
                "operators_name": h.operators_name,
                "device_serial_number": h.device_serial_number,
                "magnetic_field_strength": h.magnetic_field_strength,
                "repetition_time": h.repetition_time,
                "echo_time": h.echo_time,
                "inversion_time": h.inversion_time,
                "flip_angle": h.flip_angle,
                "slice_thickness": h.slice_thickness,
                "spacing_between_slices": h.spacing_between_slices,
                "pixel_spacing_row": h.pixel_spacing_row,
                "pixel_spacing_column": h.pixel_spacing_column,
                "rows": h.rows,
                "columns": h.columns,
                "image_orientation": h.image_orientation,
                "orientation": h.orientation,
                "mr_acquisition_type": h.mr_acquisition_type,
                "image_type": h.image_type,
                "scanning_sequence": h.scanning_sequence,
                "sequence_variant": h.sequence_variant,
            }
        )
    insert_ignore(session, Series.__table__, series_rows, ["series_instance_uid"])
    series_ids = _ids(session, Series.id, Series.series_instance_uid, list(series))

    instance_rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in headed:
        hdr = r.header
        sop = hdr.sop_instance_uid if hdr is not None else None
        if hdr is None or sop is None or r.sha256 is None:
            continue
        placed = hdr.study_instance_uid and hdr.series_instance_uid
        instance_rows.setdefault(
            (sop, r.sha256),
            {
                "sop_instance_uid": sop,
                "sha256": r.sha256,
                "series_pk": series_ids.get(hdr.series_instance_uid or "") if placed else None,
                "sop_class_uid": hdr.sop_class_uid,
                "transfer_syntax_uid": hdr.transfer_syntax_uid,
                "instance_number": hdr.instance_number,
                "image_position": hdr.image_position,
                "image_orientation": hdr.image_orientation,
                "slice_location": hdr.slice_location,
                "acquisition_number": hdr.acquisition_number,
                "number_of_frames": hdr.number_of_frames,
                "burned_in_annotation": hdr.burned_in_annotation,
                "sop_conflict": False,
            },
        )
    insert_ignore(
        session, Instance.__table__, list(instance_rows.values()), ["sop_instance_uid", "sha256"]
    )
    sop_uids = list(dict.fromkeys(uid for uid, _ in instance_rows))
    instance_ids: dict[tuple[str, str], int] = {}
    conflicted: list[str] = []
    for part in chunks(sop_uids):
        seen: dict[str, int] = {}
        for pk, uid, sha in session.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.sha256).where(
                Instance.sop_instance_uid.in_(part)
            )
        ):
            instance_ids[(uid, sha)] = pk
            seen[uid] = seen.get(uid, 0) + 1
        conflicted.extend(uid for uid, n in seen.items() if n > 1)
    for part in chunks(conflicted):
        session.execute(
            update(Instance).where(Instance.sop_instance_uid.in_(part)).values(sop_conflict=True)
        )

    first_in_chunk: set[str] = set()
    file_rows = []
    for r in records:
        header = r.header
        new = r.sha256 is not None and r.sha256 not in existing and r.sha256 not in first_in_chunk
        before = earlier.get(r.path)
        if before is not None and before.sha256 == r.sha256:
            new = before.new_content  # read again (new mtime), same content: same verdict
        if r.sha256 is not None:
            first_in_chunk.add(r.sha256)
        instance_pk = None
        if header is not None and header.sop_instance_uid and r.sha256:
            instance_pk = instance_ids.get((header.sop_instance_uid, r.sha256))
        notes = list(r.notes)
        if (
            header is not None
            and r.status.is_dicom
            and not (header.study_instance_uid and header.series_instance_uid)
        ):
            notes.append("no StudyInstanceUID or SeriesInstanceUID: not placed in a series")
        file_rows.append(
            {
                "batch_id": batch_id,
                "path": r.path,
                "size": r.size,
                "mtime_ns": r.mtime_ns,
                "sha256": r.sha256,
                "status": r.status.value,
                "reason_code": r.reason_code,
                "reason": r.reason,
                "notes": json.dumps(notes) if notes else "",
                "instance_pk": instance_pk,
                "new_content": new,
                "ingested_at": stamp,
            }
        )
    if file_rows:
        statement = dialect_insert(session, File.__table__)
        excluded = statement.excluded
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["batch_id", "path"],
                set_={
                    name: getattr(excluded, name)
                    for name in file_rows[0]
                    if name not in ("batch_id", "path")
                },
            ),
            file_rows,
        )


# --- accounting queries ----------------------------------------------------------------------


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    accession_number: str | None
    files: int
    instances: int
    distinct_contents: int


def status_counts(session: Session, batch_id: int) -> dict[str, int]:
    rows = session.execute(
        select(File.status, func.count()).where(File.batch_id == batch_id).group_by(File.status)
    )
    return {status: count for status, count in rows}


def content_counts(session: Session, batch_id: int) -> tuple[int, int]:
    """(files with new content, files whose content was already archived or seen earlier)."""
    row = session.execute(
        select(
            func.count(case((File.new_content.is_(True), 1))),
            func.count(case((and_(File.sha256.is_not(None), File.new_content.is_(False)), 1))),
        ).where(File.batch_id == batch_id)
    ).one()
    return int(row[0]), int(row[1])


def hierarchy_counts(session: Session, batch_id: int) -> tuple[int, int, int, int]:
    """(patients, studies, series, instances) that files of the batch belong to."""
    row = session.execute(
        select(
            func.count(func.distinct(Study.patient_pk)),
            func.count(func.distinct(Series.study_pk)),
            func.count(func.distinct(Instance.series_pk)),
            func.count(func.distinct(Instance.sop_instance_uid)),
        )
        .select_from(File)
        .join(Instance, Instance.id == File.instance_pk)
        .outerjoin(Series, Series.id == Instance.series_pk)
        .outerjoin(Study, Study.id == Series.study_pk)
        .where(File.batch_id == batch_id)
    ).one()
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def study_rows(session: Session, batch_id: int) -> list[StudyRow]:
    rows = session.execute(
        select(
            Study.study_instance_uid,
            Study.accession_number,
            func.count(File.id),
            func.count(func.distinct(Instance.sop_instance_uid)),
            func.count(func.distinct(File.sha256)),
        )
        .select_from(File)
        .join(Instance, Instance.id == File.instance_pk)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .where(File.batch_id == batch_id)
        .group_by(Study.study_instance_uid, Study.accession_number)
    )
    # Sorted here, not by the database: NULL placement and text collation differ between
    # SQLite and PostgreSQL, and reports must not depend on the backend.
    return sorted(
        (StudyRow(*r) for r in rows), key=lambda r: (r.accession_number or "", r.study_instance_uid)
    )


def manifest_entries(session: Session, batch_id: int) -> list[ManifestEntry]:
    return list(
        session.scalars(
            select(ManifestEntry)
            .where(ManifestEntry.batch_id == batch_id)
            .order_by(ManifestEntry.line)
        )
    )


def sop_conflicts(session: Session, batch_id: int) -> list[tuple[str, int]]:
    in_batch = (
        select(Instance.sop_instance_uid)
        .join(File, File.instance_pk == Instance.id)
        .where(File.batch_id == batch_id, Instance.sop_conflict.is_(True))
        .distinct()
        .subquery()
    )
    rows = session.execute(
        select(Instance.sop_instance_uid, func.count())
        .where(Instance.sop_instance_uid.in_(select(in_batch.c.sop_instance_uid)))
        .group_by(Instance.sop_instance_uid)
    )
    return sorted((uid, int(n)) for uid, n in rows)


def accession_conflicts(session: Session, batch_id: int) -> list[tuple[str, list[str]]]:
    """Accession numbers of this batch's studies that the archive holds on other studies too."""
    accessions = (
        select(Study.accession_number)
        .join(Series, Series.study_pk == Study.id)
        .join(Instance, Instance.series_pk == Series.id)
        .join(File, File.instance_pk == Instance.id)
        .where(File.batch_id == batch_id, Study.accession_number.is_not(None))
        .distinct()
    )
    shared = (
        select(Study.accession_number)
        .where(Study.accession_number.in_(accessions))
        .group_by(Study.accession_number)
        .having(func.count() > 1)
    )
    result: dict[str, list[str]] = {}
    for accession, uid in session.execute(
        select(Study.accession_number, Study.study_instance_uid)
        .where(Study.accession_number.in_(shared))
        .order_by(Study.accession_number, Study.study_instance_uid)
    ):
        if accession is not None:
            result.setdefault(accession, []).append(uid)
    return sorted((accession, sorted(uids)) for accession, uids in result.items())


def delivered_before(session: Session, batch_id: int) -> list[str]:
    """Earlier batches that already delivered every DICOM content of this batch."""
    dicom = (FileStatus.MODERN.value, FileStatus.LEGACY.value)
    mine = session.scalar(
        select(func.count(func.distinct(File.sha256))).where(
            File.batch_id == batch_id, File.status.in_(dicom)
        )
    )
    if not mine:
        return []
    other = aliased(File)
    rows = session.execute(
        select(Batch.name, func.count(func.distinct(other.sha256)))
        .select_from(File)
        .join(other, and_(other.sha256 == File.sha256, other.batch_id != File.batch_id))
        .join(Batch, Batch.id == other.batch_id)
        .where(File.batch_id == batch_id, File.status.in_(dicom), other.batch_id < batch_id)
        .group_by(Batch.name)
    )
    return sorted(name for name, count in rows if count == mine)


def scanner_alerts(session: Session, batch_id: int) -> list[tuple[str, str, str, str, int]]:
    rows = session.execute(
        select(
            Scanner.manufacturer,
            Scanner.model,
            Scanner.software_versions,
            Scanner.reason,
            func.count(File.id),
        )
        .select_from(File)
        .join(Instance, Instance.id == File.instance_pk)
        .join(Series, Series.id == Instance.series_pk)
        .join(Scanner, Scanner.id == Series.scanner_pk)
        .where(File.batch_id == batch_id, Scanner.known.is_(False))
        .group_by(Scanner.manufacturer, Scanner.model, Scanner.software_versions, Scanner.reason)
    )
    return sorted((a, b, c, d, int(n)) for a, b, c, d, n in rows)


def problem_files(session: Session, batch_id: int) -> list[tuple[str, str, str, str]]:
    bad = (FileStatus.CORRUPT.value, FileStatus.NOT_DICOM.value, FileStatus.UNREADABLE.value)
    rows = session.execute(
        select(File.path, File.status, File.reason_code, File.reason).where(
            File.batch_id == batch_id, File.status.in_(bad)
        )
    )
    return sorted(((p, s, c, r) for p, s, c, r in rows), key=lambda row: (row[1], row[0]))


# --- verify ----------------------------------------------------------------------------------


def blob_page(session: Session, after: str, limit: int) -> list[tuple[str, int]]:
    """Blobs in hash order after ``after`` (keyset pagination: constant memory)."""
    rows = session.execute(
        select(Blob.sha256, Blob.size).where(Blob.sha256 > after).order_by(Blob.sha256).limit(limit)
    )
    return [(sha, int(size)) for sha, size in rows]


def blob_known(session: Session, hashes: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for part in chunks(list(hashes)):
        found.update(session.scalars(select(Blob.sha256).where(Blob.sha256.in_(part))))
    return found


def mark_verified(session: Session, states: dict[str, str]) -> None:
    stamp = now()
    by_state: dict[str, list[str]] = {}
    for sha, state in states.items():
        by_state.setdefault(state, []).append(sha)
    for state, hashes in by_state.items():
        for part in chunks(hashes):
            session.execute(
                update(Blob)
                .where(Blob.sha256.in_(part))
                .values(verified_at=stamp, verify_state=state)
            )
