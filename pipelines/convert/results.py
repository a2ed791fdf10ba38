"""What converting a folder gives: each series converted (or failed), each series not converted
and why, the folder's report; a series' row in the archive index (``stage_record``) and the report
as one JSON document (``report_json``, ``cohortflow convert --json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cohortflow.models.series import NotTaken, SeriesDescriptor
from cohortflow.models.stages import StageRecord
from cohortflow.pipelines.dicom.cleaner import Cleaner
from cohortflow.pipelines.dicomfolder import SkippedFile
from cohortflow.qc.findings import Finding, Verdict, reason, stage_row, verdict

STAGE = "convert"
#: Changes when the conversion or its checks change meaning (with the dcm2niix version it makes
#: the stage's method version).
METHOD_VERSION = "convert-2"


@dataclass(frozen=True)
class ConvertedSeries:
    """The conversion of one series: where its image and sidecar went, which converter made
    them and why the fallback was used, what was found."""

    study: str  # StudyInstanceUID
    series: str  # SeriesInstanceUID
    folder: str  # folder of its files, relative to the folder converted
    description: str
    protocol: str  # "" when no protocol matched (every series asked for)
    role: str  # the protocol's include rule, "" for a series converted only on request
    subject: str
    session: str
    name: str  # the BIDS file name without extension
    findings: tuple[Finding, ...]
    converter: str | None = None  # dcm2niix or SimpleITK; None when nothing was written
    converter_version: str | None = None
    fallback_reason: str | None = None  # why dcm2niix's result was not used (a check id)
    fallback_message: str | None = None
    nifti: Path | None = None
    sidecar: Path | None = None
    extra_outputs: tuple[str, ...] = ()  # other images dcm2niix wrote (not kept)
    slices: int | None = None  # slice positions of the series (missing ones included)
    images: int | None = None  # images converted (one per position present)
    shape: tuple[int, ...] | None = None  # of the NIfTI image
    voxel_mm: tuple[float, ...] | None = None  # of the NIfTI image
    manufacturer: str = ""
    model: str = ""
    software_versions: str = ""
    input_sha256: str = ""  # SHA-256 over the sorted SHA-256 of its files
    seconds: float = 0.0
    metrics: Mapping[str, Any] = field(default_factory=dict)
    #: for a series that was not de-identified, the cleaner of its identifiers: its result is
    #: recorded under the pseudonymized UIDs, cleaned (pipelines/dicom/identified.py)
    identified: Cleaner | None = field(default=None, compare=False, repr=False)
    files: int = 0  # the input files of the series: every file is accounted for

    @property
    def verdict(self) -> Verdict:
        return verdict(self.findings)

    @property
    def reason(self) -> Finding | None:
        return reason(self.findings)

    @property
    def converted(self) -> bool:
        return self.nifti is not None


@dataclass(frozen=True)
class ConvertReport:
    out: Path
    dcm2niix: str | None  # the dcm2niix version used; None when it is unavailable
    dcm2niix_problem: str | None  # why dcm2niix is unavailable
    series: tuple[ConvertedSeries, ...]
    not_converted: tuple[NotTaken, ...]
    skipped: tuple[SkippedFile, ...]

    @property
    def method_version(self) -> str:
        return method_version(self.dcm2niix)

    @property
    def files(self) -> int:
        """The input files in its series, converted or not (the rest are ``skipped``)."""
        return sum(s.files for s in self.series) + sum(n.files for n in self.not_converted)

    def with_verdict(self, wanted: Verdict) -> list[ConvertedSeries]:
        return [s for s in self.series if s.verdict is wanted]

    @property
    def failed(self) -> list[ConvertedSeries]:
        return self.with_verdict(Verdict.FAIL)


def method_version(dcm2niix: str | None) -> str:
    return f"{METHOD_VERSION} dcm2niix {dcm2niix or 'unavailable'}"


def stage_record(result: ConvertedSeries, method: str) -> StageRecord:
    """The index row of one series' conversion."""
    return stage_row(
        result,
        stage=STAGE,
        method_version=method,
        series=result.series,
        study=result.study,
        describe=SeriesDescriptor.of_record(result),
        metrics=result.metrics,
        input_sha256=result.input_sha256,
        seconds=result.seconds,
    )


def report_json(report: ConvertReport) -> dict[str, Any]:
    """The conversion of a folder as one JSON document (``cohortflow convert --json``)."""
    counts = {v: len(report.with_verdict(v)) for v in Verdict}
    return {
        "out": str(report.out),
        "dcm2niix": report.dcm2niix,
        "dcm2niix_problem": report.dcm2niix_problem,
        "method_version": report.method_version,
        "converted": sum(1 for s in report.series if s.converted),
        "passed": counts[Verdict.PASS],
        "warned": counts[Verdict.WARN],
        "failed": counts[Verdict.FAIL],
        "series": [
            {
                "study": s.study,
                "series": s.series,
                "folder": s.folder,
                "description": s.description,
                "protocol": s.protocol,
                "role": s.role,
                "subject": s.subject,
                "session": s.session,
                "name": s.name,
                "verdict": s.verdict.value,
                "reason_code": s.reason.check if s.reason else None,
                "reason": s.reason.message if s.reason else None,
                "converter": s.converter,
                "converter_version": s.converter_version,
                "fallback_reason": s.fallback_reason,
                "fallback_message": s.fallback_message,
                "nifti": str(s.nifti) if s.nifti else None,
                "sidecar": str(s.sidecar) if s.sidecar else None,
                "extra_outputs": list(s.extra_outputs),
                "slices": s.slices,
                "images": s.images,
                "shape": list(s.shape) if s.shape else None,
                "voxel_mm": list(s.voxel_mm) if s.voxel_mm else None,
                "input_sha256": s.input_sha256,
                "files": s.files,
                "seconds": s.seconds,
                "findings": [f.as_dict() for f in s.findings],
            }
            for s in report.series
        ],
        "not_converted": [asdict(n) for n in report.not_converted],
        "skipped": [asdict(k) for k in report.skipped],
    }
