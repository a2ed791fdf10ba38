"""The archive index: SQLAlchemy tables (SQLite by default, PostgreSQL by URL).

The identified side: patients and studies carry the identifiers as received. Only the
anonymization step (issue 5) reads from here and writes pseudonymized copies elsewhere.
The schema is created and changed by the migrations in ``models/migrations`` only; a test checks
that these classes and the migrated database agree.

Hierarchy: patients 1-n studies 1-n series 1-n instances. An instance is one version of a DICOM
object: (SOPInstanceUID, content hash); two different contents under one SOPInstanceUID are both
kept and flagged. A file is one received path in one batch, pointing at its stored content (blob)
and, when it is DICOM, at its instance.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Header values are stored unbounded: real files carry over-long UIDs and descriptions, and
#: PostgreSQL would reject a value longer than a VARCHAR(n) and with it the whole chunk.
UID = Text
SHA256 = String(64)

# Stable constraint names, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Batch(Base):
    """One delivery: a folder handed to ingest (a drop from outside, or a retrieval run)."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    #: running while an ingest works on it; complete when the last one finished.
    state: Mapped[str] = mapped_column(String(20))
    manifest_file: Mapped[str | None] = mapped_column(Text)
    manifest_sha256: Mapped[str | None] = mapped_column(SHA256)


class ManifestEntry(Base):
    """A study the batch's manifest promised: accession number, optionally its file count."""

    __tablename__ = "manifest_entries"
    __table_args__ = (UniqueConstraint("batch_id", "accession_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    accession_number: Mapped[str] = mapped_column(Text)
    expected_files: Mapped[int | None] = mapped_column(Integer)
    line: Mapped[int] = mapped_column(Integer)


class Blob(Base):
    """Content in the archive, stored once under its SHA-256 (``blobs/ab/<sha256>``)."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(SHA256, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    first_batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"))
    archived_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    verified_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    #: ok, changed, missing, unreadable: the last ``cohortflow verify`` verdict.
    verify_state: Mapped[str | None] = mapped_column(String(20))


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: PatientID and IssuerOfPatientID as one key (``id^issuer``); identifies the row.
    patient_key: Mapped[str] = mapped_column(Text, unique=True)
    patient_id: Mapped[str | None] = mapped_column(Text)
    issuer_of_patient_id: Mapped[str | None] = mapped_column(Text)
    patient_name: Mapped[str | None] = mapped_column(Text)
    patient_birth_date: Mapped[str | None] = mapped_column(Text)
    patient_sex: Mapped[str | None] = mapped_column(Text)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), index=True)
    accession_number: Mapped[str | None] = mapped_column(Text, index=True)
    study_date: Mapped[dt.date | None] = mapped_column(Date, index=True)
    study_time: Mapped[str | None] = mapped_column(Text)
    study_description: Mapped[str | None] = mapped_column(Text)
    study_id: Mapped[str | None] = mapped_column(Text)
    institution_name: Mapped[str | None] = mapped_column(Text)
    institution_address: Mapped[str | None] = mapped_column(Text)
    referring_physician_name: Mapped[str | None] = mapped_column(Text)


class Scanner(Base):
    """Every (Manufacturer, ManufacturerModelName, SoftwareVersions) ever seen."""

    __tablename__ = "scanners"
    __table_args__ = (UniqueConstraint("manufacturer", "model", "software_versions"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    manufacturer: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    software_versions: Mapped[str] = mapped_column(Text)
    known: Mapped[bool] = mapped_column(Boolean)
    #: Why it is not known (unknown model, unknown software version); empty when known.
    reason: Mapped[str] = mapped_column(Text)
    first_batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"))
    first_seen_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (Index("ix_series_protocol_study", "protocol_name", "study_pk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    scanner_pk: Mapped[int | None] = mapped_column(ForeignKey("scanners.id"), index=True)
    modality: Mapped[str | None] = mapped_column(Text, index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(Text)
    protocol_name: Mapped[str | None] = mapped_column(Text)
    body_part_examined: Mapped[str | None] = mapped_column(Text)
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    manufacturer: Mapped[str | None] = mapped_column(Text)
    manufacturer_model_name: Mapped[str | None] = mapped_column(Text)
    software_versions: Mapped[str | None] = mapped_column(Text)
    station_name: Mapped[str | None] = mapped_column(Text)
    #: the people and the device a description may name (cleaned out of the de-identified side)
    performing_physician_name: Mapped[str | None] = mapped_column(Text)
    operators_name: Mapped[str | None] = mapped_column(Text)
    device_serial_number: Mapped[str | None] = mapped_column(Text)
    magnetic_field_strength: Mapped[float | None] = mapped_column(Float)
    repetition_time: Mapped[float | None] = mapped_column(Float)
    echo_time: Mapped[float | None] = mapped_column(Float)
    inversion_time: Mapped[float | None] = mapped_column(Float)
    flip_angle: Mapped[float | None] = mapped_column(Float)
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    spacing_between_slices: Mapped[float | None] = mapped_column(Float)
    pixel_spacing_row: Mapped[float | None] = mapped_column(Float)
    pixel_spacing_column: Mapped[float | None] = mapped_column(Float)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    image_orientation: Mapped[str | None] = mapped_column(Text)
    orientation: Mapped[str | None] = mapped_column(Text)
    mr_acquisition_type: Mapped[str | None] = mapped_column(Text)
    image_type: Mapped[str | None] = mapped_column(Text)
    scanning_sequence: Mapped[str | None] = mapped_column(Text)
    sequence_variant: Mapped[str | None] = mapped_column(Text)


class Instance(Base):
    """One version of one DICOM object: SOPInstanceUID and content."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    series_pk: Mapped[int | None] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str | None] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    image_position: Mapped[str | None] = mapped_column(Text)
    image_orientation: Mapped[str | None] = mapped_column(Text)
    slice_location: Mapped[float | None] = mapped_column(Float)
    acquisition_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    burned_in_annotation: Mapped[str | None] = mapped_column(Text)
    #: Another content exists under the same SOPInstanceUID (both versions are kept).
    sop_conflict: Mapped[bool] = mapped_column(Boolean, default=False)


class File(Base):
    """One received path in one batch, with its status and the reason for it."""

    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("batch_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text, index=True)
    size: Mapped[int | None] = mapped_column(BigInteger)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason_code: Mapped[str] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(Text)
    notes: Mapped[str] = mapped_column(Text, default="")
    instance_pk: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), index=True)
    #: This file's content was new to the archive when it was ingested.
    new_content: Mapped[bool] = mapped_column(Boolean)
    ingested_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Selection(Base):
    """One ``cohortflow select`` run: a protocol's query of the PACS over a date range."""

    __tablename__ = "selections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    protocol: Mapped[str] = mapped_column(Text, index=True)
    date_from: Mapped[dt.date] = mapped_column(Date)
    date_to: Mapped[dt.date] = mapped_column(Date)
    #: The PACS queried (AE title, host, port).
    pacs: Mapped[str] = mapped_column(Text)
    #: Which protocol file decided, and its content hash (the rules are versioned data).
    protocols_file: Mapped[str] = mapped_column(Text)
    protocols_sha256: Mapped[str] = mapped_column(SHA256)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    studies: Mapped[int] = mapped_column(Integer)
    series: Mapped[int] = mapped_column(Integer)
    #: where a listed selection's studies came from (``cohort NAME``, ``manifest FILE``); None
    #: for a query of the PACS over the date range
    listed_from: Mapped[str | None] = mapped_column(Text)


class SelectedSeries(Base):
    """A series a selection chose, with the rule that chose it and the PACS's instance count."""

    __tablename__ = "selected_series"
    __table_args__ = (UniqueConstraint("selection_id", "series_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    selection_id: Mapped[int] = mapped_column(ForeignKey("selections.id", ondelete="CASCADE"))
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    accession_number: Mapped[str | None] = mapped_column(Text)
    study_date: Mapped[dt.date | None] = mapped_column(Date)
    rule: Mapped[str] = mapped_column(Text)
    #: NumberOfSeriesRelatedInstances from the series C-FIND (None: the PACS did not say).
    expected_instances: Mapped[int | None] = mapped_column(Integer)


class Retrieval(Base):
    """Where the retrieval of one series from the PACS stands (shared by every selection)."""

    __tablename__ = "retrievals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    #: pending, complete, incomplete, failed, gone (no longer in the PACS).
    status: Mapped[str] = mapped_column(String(20), index=True)
    expected: Mapped[int | None] = mapped_column(Integer)
    #: distinct instances of the series in the archive index after the last attempt
    archived: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer)
    method: Mapped[str | None] = mapped_column(String(20))
    reason_code: Mapped[str | None] = mapped_column(String(40))
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Linkage(Base):
    """Identified side only, never exported: which pseudonym and date offset a patient got."""

    __tablename__ = "linkage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_key: Mapped[str] = mapped_column(Text, unique=True)
    pseudonym: Mapped[str] = mapped_column(String(32), unique=True)
    date_offset_days: Mapped[int] = mapped_column(Integer)
    #: the project key's source (file or variable name, never the key) and the profile used
    key_source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    """Who did what, when: linkage written or read, exports, reviews. Chained (models/audit.py):
    the sequence number, the previous entry's MAC and this entry's MAC over its content."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(String(40), index=True)
    detail: Mapped[str] = mapped_column(Text)
    #: None on entries written before the chain (an index migrated from revision 0008)
    seq: Mapped[int | None] = mapped_column(Integer, unique=True)
    prev_mac: Mapped[str | None] = mapped_column(String(64))
    mac: Mapped[str | None] = mapped_column(String(64))
    #: which secret chained it (a hash of it; "none" when the writer had no project key)
    key_id: Mapped[str | None] = mapped_column(String(16))


class AuditHead(Base):
    """The newest entry of the audit chain (one row): updated first by every writer, which
    serialises them, and compared by ``audit verify`` with the last entry (a deletion at the end
    shows)."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    mac: Mapped[str] = mapped_column(String(64))


class StageResult(Base):
    """The latest outcome of one processing stage for one series (header QC, image QC, ...).

    Keyed by the SeriesInstanceUID the stage saw: after de-identification, the pseudonymized
    one. Protocol and scanner say which cohort the series is compared with (robust z-scores,
    success rates); ``input_sha256`` and ``method_version`` say whether a rerun can skip it.
    """

    __tablename__ = "stage_results"
    __table_args__ = (
        UniqueConstraint("series_uid", "stage"),
        Index("ix_stage_results_cohort", "stage", "protocol", "manufacturer", "model"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    stage: Mapped[str] = mapped_column(String(40))
    protocol: Mapped[str | None] = mapped_column(Text)
    #: the protocol's include rule that selected the series (t1_3d, flair...)
    role: Mapped[str | None] = mapped_column(Text)
    manufacturer: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(Text)
    software_versions: Mapped[str | None] = mapped_column(Text)
    #: pass, warn or fail
    status: Mapped[str] = mapped_column(String(10), index=True)
    #: the deciding finding's check id (the first failure, else the first warning)
    reason_code: Mapped[str | None] = mapped_column(String(80), index=True)
    message: Mapped[str | None] = mapped_column(Text)
    #: every finding: check, severity, value, threshold, message
    findings: Mapped[list[dict[str, object]]] = mapped_column(JSON)
    metrics: Mapped[dict[str, object]] = mapped_column(JSON)
    input_sha256: Mapped[str | None] = mapped_column(SHA256)
    method_version: Mapped[str] = mapped_column(String(40))
    seconds: Mapped[float | None] = mapped_column(Float)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Biomarker(Base):
    """The brain volumes of one T1 series (the latest measurement; a rerun replaces it).

    Keyed by the pseudonymized SeriesInstanceUID, like ``stage_results``; the method, its
    version and the parameters say how the numbers were made, the QC verdict whether to trust
    them, ``confidence`` is "low" for thick-slice 2D T1s.
    """

    __tablename__ = "biomarkers"
    __table_args__ = (UniqueConstraint("series_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    protocol: Mapped[str | None] = mapped_column(Text, index=True)
    icv_ml: Mapped[float] = mapped_column(Float)
    gm_ml: Mapped[float] = mapped_column(Float)
    wm_ml: Mapped[float] = mapped_column(Float)
    csf_ml: Mapped[float] = mapped_column(Float)
    brain_ml: Mapped[float] = mapped_column(Float)
    bpf: Mapped[float] = mapped_column(Float)
    method: Mapped[str] = mapped_column(String(60))
    method_version: Mapped[str] = mapped_column(String(40))
    parameters: Mapped[dict[str, object]] = mapped_column(JSON)
    #: pass, warn or fail: volumetry's own QC verdict, and its deciding check
    qc_status: Mapped[str] = mapped_column(String(10), index=True)
    qc_reason: Mapped[str | None] = mapped_column(String(80))
    confidence: Mapped[str] = mapped_column(String(10))
    converter: Mapped[str | None] = mapped_column(Text)
    input_sha256: Mapped[str | None] = mapped_column(SHA256)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Run(Base):
    """One run of a protocol flow: who launched what, with which code and tools, and how it
    ended (the success rates at its end, as counts)."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Prefect's flow run id (None when run without Prefect)
    flow_run_id: Mapped[str | None] = mapped_column(String(40), index=True)
    protocol: Mapped[str] = mapped_column(Text, index=True)
    parameters: Mapped[dict[str, object]] = mapped_column(JSON)
    #: cohortflow and tool versions (dcm2niix, antspyx, pydicom ...)
    versions: Mapped[dict[str, object]] = mapped_column(JSON)
    #: running, completed, failed
    state: Mapped[str] = mapped_column(String(20))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    #: the protocol's outcome counts when the run ended
    summary: Mapped[dict[str, object]] = mapped_column(JSON)


class StudyStep(Base):
    """Where one selected study stands in its protocol's flow, step by step (identified side:
    keyed by the StudyInstanceUID as received).

    ``input_key`` hashes the study's archived content and every setting and method version the
    step depends on; a rerun skips a step whose row has the same key and status ``done`` and
    whose outputs still exist, and redoes it otherwise.
    """

    __tablename__ = "study_steps"
    __table_args__ = (UniqueConstraint("protocol", "study_uid", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    protocol: Mapped[str] = mapped_column(Text)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    step: Mapped[str] = mapped_column(String(40))
    input_key: Mapped[str] = mapped_column(SHA256)
    method_version: Mapped[str] = mapped_column(String(80))
    #: done (it ran; its series' own outcomes are in stage_results), error (it could not run)
    status: Mapped[str] = mapped_column(String(10), index=True)
    reason_code: Mapped[str | None] = mapped_column(String(80))
    message: Mapped[str | None] = mapped_column(Text)
    #: what later steps need: folders, the pseudonymized UIDs, converted images
    outputs: Mapped[dict[str, object]] = mapped_column(JSON)
    seconds: Mapped[float | None] = mapped_column(Float)
    #: processor seconds of the step's process (its threads included; a flow worker runs one
    #: step at a time): what the step costs, where ``seconds`` also counts waiting
    cpu_seconds: Mapped[float | None] = mapped_column(Float)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class StageHistory(Base):
    """Every stage result as it was recorded (``stage_results`` keeps only the latest): the
    history a reviewer reads on the series page. Appended, never changed."""

    __tablename__ = "stage_history"
    __table_args__ = (Index("ix_stage_history_series", "series_uid", "stage"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID)
    stage: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(10))
    reason_code: Mapped[str | None] = mapped_column(String(80))
    message: Mapped[str | None] = mapped_column(Text)
    method_version: Mapped[str] = mapped_column(String(40))
    seconds: Mapped[float | None] = mapped_column(Float)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)


class Review(Base):
    """A reviewer's decision on the automatic QC verdict of one (pseudonymized) series. Kept
    in full; the newest decision per series is the one that counts."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, index=True)
    #: accept (the verdict stands), reject (unusable whatever QC said), override (usable
    #: although QC failed it)
    decision: Mapped[str] = mapped_column(String(10))
    #: the automatic verdict the reviewer saw (pass, warn, fail) and its reason
    verdict: Mapped[str] = mapped_column(String(10))
    reason_code: Mapped[str | None] = mapped_column(String(80))
    comment: Mapped[str] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(Text)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)


class User(Base):
    """A dashboard account. Passwords are stored as argon2id hashes only (``models.users``)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(80), unique=True)
    #: the name case-folded: names are unique without regard to case
    name_key: Mapped[str] = mapped_column(String(80), unique=True)
    #: reviewer, researcher, steward or admin
    role: Mapped[str] = mapped_column(String(20))
    password_hash: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    #: failed logins since the last success; the next attempt waits until ``blocked_until``;
    #: ``locked`` after too many, until an admin unlocks the account
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    blocked_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    locked: Mapped[bool] = mapped_column(Boolean, default=False)
    #: raised to end every session of the account (logout, password or role change, disable)
    session_epoch: Mapped[int] = mapped_column(Integer, default=0)


class CohortSeries(Base):
    """Cohort discovery's row for one archived series: the header fields researchers filter and
    group on, in one table so that a grouped count over millions of instances reads no join.

    Both layers live here, apart by column: the de-identified layer reads ``pseudonym``, the
    pseudonymized UIDs (what the anonymizer writes: the stages' keys), ``shifted_date`` and
    ``age``; the identified layer adds ``study_date`` and, through ``series_pk`` / ``study_pk``
    / ``patient_pk``, the identifiers. Kept up to date by ``pipelines.cohort.refresh``.
    """

    __tablename__ = "cohort_series"
    __table_args__ = (
        Index("ix_cohort_series_scan", "modality", "field_strength", "sex", "age"),
        Index("ix_cohort_series_scanner", "scanner", "shifted_year"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), unique=True)
    study_pk: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    patient_pk: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), index=True)
    pseudonym: Mapped[str | None] = mapped_column(String(32), index=True)
    pseudo_study_uid: Mapped[str] = mapped_column(UID)
    pseudo_series_uid: Mapped[str] = mapped_column(UID, unique=True)
    #: record keys of the patient, study and series (models/disclosure.py): keyed hashes whose
    #: sums key the noise of de-identified counts; never shown
    patient_rkey: Mapped[int | None] = mapped_column(Integer)
    study_rkey: Mapped[int | None] = mapped_column(Integer)
    series_rkey: Mapped[int | None] = mapped_column(Integer)
    #: the real study date and its year (identified layer only)
    study_date: Mapped[dt.date | None] = mapped_column(Date, index=True)
    study_year: Mapped[int | None] = mapped_column(Integer)
    #: the date the pseudonymized data carries (the patient's offset applied), and its year
    shifted_date: Mapped[dt.date | None] = mapped_column(Date, index=True)
    shifted_year: Mapped[int | None] = mapped_column(Integer)
    #: whole years at the scan; 90 and over stored as 90 (HIPAA Safe Harbor)
    age: Mapped[int | None] = mapped_column(Integer, index=True)
    sex: Mapped[str | None] = mapped_column(String(1))
    modality: Mapped[str | None] = mapped_column(Text)
    body_part: Mapped[str | None] = mapped_column(Text, index=True)
    manufacturer: Mapped[str | None] = mapped_column(Text, index=True)
    model: Mapped[str | None] = mapped_column(Text, index=True)
    #: manufacturer and model, the "scanner" researchers group by
    scanner: Mapped[str | None] = mapped_column(Text)
    #: the nominal field strength: the reported one to the nearest 0.5 T (2.89 -> 3.0)
    field_strength: Mapped[float | None] = mapped_column(Float)
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    #: 3D or 2D (MRAcquisitionType)
    acquisition: Mapped[str | None] = mapped_column(String(2))
    protocol_name: Mapped[str | None] = mapped_column(Text, index=True)
    series_description: Mapped[str | None] = mapped_column(Text, index=True)
    study_description: Mapped[str | None] = mapped_column(Text, index=True)
    #: distinct SOP instances archived
    instances: Mapped[int] = mapped_column(Integer)
    #: pass, warn, fail after the newest review; None: no stage has judged it yet
    qc_verdict: Mapped[str | None] = mapped_column(String(10), index=True)
    #: measured by volumetry and usable (what the biomarker export marks usable)
    biomarkers: Mapped[bool] = mapped_column(Boolean)


class CohortProtocol(Base):
    """Which protocols of ``protocols.yaml`` would select a series, and by which include rule
    (its role): the study matches the protocol's study query and the series its rules."""

    __tablename__ = "cohort_protocols"
    __table_args__ = (Index("ix_cohort_protocols_protocol", "protocol", "role", "series_pk"),)

    series_pk: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), primary_key=True
    )
    protocol: Mapped[str] = mapped_column(String(80), primary_key=True)
    role: Mapped[str] = mapped_column(String(80))


class CohortState(Base):
    """How far ``cohort_series`` has followed the index (one row): the last ids seen and the
    protocol rules and key it was built with (a change rebuilds it)."""

    __tablename__ = "cohort_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_mark: Mapped[int] = mapped_column(Integer)
    instance_mark: Mapped[int] = mapped_column(Integer)
    history_mark: Mapped[int] = mapped_column(Integer)
    review_mark: Mapped[int] = mapped_column(Integer)
    protocols_sha256: Mapped[str] = mapped_column(SHA256)
    #: an HMAC of a constant under the project key (never the key): pseudonyms changed with it
    key_fingerprint: Mapped[str] = mapped_column(SHA256)
    #: the description cleaner the rows were cleaned with (pipelines/dicom/cleaner.py)
    cleaner_version: Mapped[str] = mapped_column(Text)
    refreshed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class SavedCohort(Base):
    """A cohort list saved by name: the filters that made it and its series as they were then.
    The input of ``cohortflow run PROTOCOL --cohort NAME``."""

    __tablename__ = "cohorts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    description: Mapped[str] = mapped_column(Text)
    #: the filters as given (field -> text), re-parsed by ``models.cohort.CohortFilter``
    filters: Mapped[dict[str, object]] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    patients: Mapped[int] = mapped_column(Integer)
    studies: Mapped[int] = mapped_column(Integer)
    series: Mapped[int] = mapped_column(Integer)


class CohortMember(Base):
    __tablename__ = "cohort_members"

    cohort_id: Mapped[int] = mapped_column(
        ForeignKey("cohorts.id", ondelete="CASCADE"), primary_key=True
    )
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
