"""Records of the ingest step: what one file turned out to be, and what a batch holds.

A ``FileRecord`` is produced in a worker process for every path handed to ingest (it crosses the
process boundary, so it is a plain frozen dataclass); ``BatchReport`` is what ``cohortflow report
batch`` and ``cohortflow ingest --json`` print.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class FileStatus(StrEnum):
    """What a received file is. Every file ends with exactly one of these and a reason."""

    MODERN = "modern"  # DICOM Part 10: 128-byte preamble, "DICM", file meta information
    LEGACY = "legacy"  # DICOM data set without the preamble and "DICM" (ACR-NEMA style, old PACS)
    CORRUPT = "corrupt"  # looks like DICOM but cannot be read whole: truncated, damaged, empty
    NOT_DICOM = "not_dicom"  # some other kind of file (text, archive, image, ...)
    UNREADABLE = "unreadable"  # could not be read at all: permissions, a directory, a FIFO, gone

    @property
    def is_dicom(self) -> bool:
        return self in {FileStatus.MODERN, FileStatus.LEGACY}

    @property
    def is_failure(self) -> bool:
        """Statuses that mean data was lost or damaged on the way (exit status 1)."""
        return self in {FileStatus.CORRUPT, FileStatus.UNREADABLE}


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The header fields the index keeps, read without pixel data. ``None``: absent or invalid."""

    sop_instance_uid: str | None
    sop_class_uid: str | None
    transfer_syntax_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    # patient (identified side)
    patient_id: str | None
    issuer_of_patient_id: str | None
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    # study
    accession_number: str | None
    study_date: str | None  # DA, YYYYMMDD as written
    study_time: str | None
    study_description: str | None
    study_id: str | None
    institution_name: str | None
    institution_address: str | None
    referring_physician_name: str | None
    # series
    modality: str | None
    series_number: int | None
    series_description: str | None
    protocol_name: str | None
    body_part_examined: str | None
    manufacturer: str | None
    manufacturer_model_name: str | None
    software_versions: str | None
    station_name: str | None
    performing_physician_name: str | None
    operators_name: str | None
    device_serial_number: str | None
    magnetic_field_strength: float | None
    repetition_time: float | None
    echo_time: float | None
    inversion_time: float | None
    flip_angle: float | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    pixel_spacing_row: float | None
    pixel_spacing_column: float | None
    rows: int | None
    columns: int | None
    image_orientation: str | None  # ImageOrientationPatient, backslash-separated as in DICOM
    orientation: str | None  # axial, sagittal, coronal, oblique (from ImageOrientationPatient)
    mr_acquisition_type: str | None  # 2D / 3D
    image_type: str | None
    scanning_sequence: str | None
    sequence_variant: str | None
    # instance
    instance_number: int | None
    image_position: str | None  # ImagePositionPatient (first frame for multi-frame objects)
    slice_location: float | None
    acquisition_number: int | None
    number_of_frames: int | None
    burned_in_annotation: str | None


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One received path: where it was, what it held, what it is."""

    path: str  # absolute path as received, made printable (odd bytes escaped)
    size: int | None
    mtime_ns: int | None
    sha256: str | None  # None when the file could not be read
    status: FileStatus
    reason_code: (
        str  # machine-readable: ok, no_preamble, truncated_pixel_data, permission_denied, ...
    )
    reason: str  # one line a person understands; empty for a clean modern file
    header: InstanceHeader | None = None
    stored: bool = False  # this file brought content that was new to the archive
    notes: tuple[str, ...] = ()  # non-fatal oddities (invalid values, guessed encodings)

    @classmethod
    def unreadable(
        cls, path: str, code: str, reason: str, size: int | None = None, mtime_ns: int | None = None
    ) -> FileRecord:
        """A path whose content could not be read (so: no hash, no header)."""
        return cls(path, size, mtime_ns, None, FileStatus.UNREADABLE, code, reason)


class StatusCount(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: FileStatus
    files: int


class ProblemFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    status: FileStatus
    reason_code: str
    reason: str


class ManifestLine(BaseModel):
    """One study the manifest promised, and what arrived for it."""

    model_config = ConfigDict(frozen=True)

    accession_number: str
    expected_files: int | None
    received_files: int
    received_instances: int
    studies: int  # distinct StudyInstanceUIDs that arrived under this accession number
    status: str  # complete, missing, incomplete, excess, duplicated
    detail: str


class StudyArrival(BaseModel):
    """A study that arrived in the batch."""

    model_config = ConfigDict(frozen=True)

    study_instance_uid: str
    accession_number: str | None
    files: int
    instances: int
    duplicate_files: int


class ScannerAlert(BaseModel):
    model_config = ConfigDict(frozen=True)

    manufacturer: str
    model: str
    software_versions: str
    reason: str
    files: int


class AccessionConflict(BaseModel):
    model_config = ConfigDict(frozen=True)

    accession_number: str
    study_instance_uids: list[str]


class SopConflict(BaseModel):
    model_config = ConfigDict(frozen=True)

    sop_instance_uid: str
    versions: int  # distinct contents seen under this SOPInstanceUID


class BatchReport(BaseModel):
    """The accounting of one batch: what arrived, what it is, what is missing or doubled."""

    model_config = ConfigDict(frozen=True)

    batch: str
    source: str
    state: str  # complete, interrupted (an ingest did not finish: rerun it)
    files: int
    by_status: list[StatusCount]
    new_content: int  # files whose content the archive did not hold before
    identical_copies: int  # files whose content was already in the archive or earlier in the batch
    patients: int
    studies: int
    series: int
    instances: int
    sop_conflicts: list[SopConflict]
    accession_conflicts: list[AccessionConflict]
    delivered_before: list[str]  # earlier batches that delivered every DICOM file of this one
    manifest: str  # "no manifest", "complete", "incomplete"
    manifest_lines: list[ManifestLine]
    unexpected_studies: list[StudyArrival]  # arrived but not in the manifest
    scanner_alerts: list[ScannerAlert]
    problems: list[ProblemFile]  # every file that is not clean DICOM, with its reason

    @property
    def failed(self) -> bool:
        bad = any(c.status.is_failure and c.files for c in self.by_status)
        return bad or self.manifest == "incomplete" or self.state != "complete"


class IngestOutcome(BaseModel):
    """What one ``ingest`` run did (the work), beside the batch accounting (the result)."""

    model_config = ConfigDict(frozen=True)

    batch: str
    seen: int  # paths considered
    processed: int  # paths read and hashed in this run
    unchanged: int  # paths skipped: already indexed with the same size and mtime
    reused: int  # indexed from an earlier batch's record without reading the file again
    seconds: float
    files_per_second: float


class VerifyProblem(BaseModel):
    model_config = ConfigDict(frozen=True)

    sha256: str
    path: str
    problem: str  # changed, missing, unreadable, untracked


class VerifyReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    checked: int
    ok: int
    changed: int
    missing: int
    unreadable: int
    untracked: int  # files in the archive folder the index does not know
    seconds: float
    problems: list[VerifyProblem]

    @property
    def failed(self) -> bool:
        return bool(self.changed or self.missing or self.unreadable)


def patient_key(
    patient_id: str | None, issuer: str | None, name: str | None, birth_date: str | None
) -> str:
    """The identity of a patient as the index and the pseudonyms key it: ``id^issuer``.

    Without a PatientID (legacy and hand-made files): name and birth date, rather than merging
    every such patient into one.
    """
    if patient_id:
        return f"{patient_id}^{issuer or ''}"
    return f"^^{name or ''}^{birth_date or ''}"
