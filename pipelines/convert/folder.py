"""Convert the series of every study in a folder to NIfTI with a sidecar, BIDS-style.

Per study, the protocol (given, or the one whose study-description patterns match) decides
which series are converted and under which name (its include rules give the role; ``bids``
maps roles to suffixes); asked for, every other MR image series is converted too. Per series:
the files are read (header only) and placed on a slice grid (``check.slice_grid``); the files
that make the grid (one per slice position) are linked into a temporary folder of their own and
converted by dcm2niix; each image dcm2niix wrote is checked against the DICOM (``check``), the
right one kept and the others reported. When dcm2niix fails (it cannot run, exits non-zero,
writes nothing, times out or no image passes the check) SimpleITK's series reader converts, and
its image is checked the same way; when it fails too, the series fails with both reasons. A
failure in one series never stops the others.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from filelock import FileLock
from pydicom.dataset import Dataset

from models.database import IndexDB
from models.errors import GeometryError
from models.geometry import Plane, planes_of
from models.series import SeriesDescriptor
from models.settings import Settings
from models.stages import StageRecord, record_stages
from pipelines.convert import bids, sidecar
from pipelines.convert.check import (
    ImageCheck,
    SliceGrid,
    check_image,
    grid_findings,
    sample_slots,
    slice_grid,
)
from pipelines.convert.dcm2niix import (
    DEFAULT_TIMEOUT,
    Dcm2niix,
    Output,
    find_dcm2niix,
    run_dcm2niix,
)
from pipelines.convert.errors import ConvertError
from pipelines.convert.sitk import NAME as SITK
from pipelines.convert.sitk import convert_with_sitk, sitk_version
from pipelines.dicom.cleaner import Cleaner, dataset_cleaner
from pipelines.dicom.header import attributes
from pipelines.dicom.identified import for_deidentified_side, is_deidentified
from pipelines.dicom.keys import ProjectKey
from pipelines.dicom.protocols import ProtocolSet
from pipelines.dicomfolder import (
    FolderFile,
    SkippedFile,
    first_header,
    has_header,
    index_folder,
    read_instance,
    series_number,
)
from pipelines.safeio import RefusedError, read_regular
from qc.findings import Finding, Severity, Verdict, finding, reason, stage_row, verdict
from qc.header import header_text

log = logging.getLogger(__name__)

STAGE = "convert"
#: Changes when the conversion or its checks change meaning (with the dcm2niix version it makes
#: the stage's method version).
METHOD_VERSION = "convert-1"
DCM2NIIX = "dcm2niix"
#: Images of one series dcm2niix wrote that are checked at most (the preferred ones first).
MAX_CANDIDATES = 4
#: Why a series converted only because every series was asked for is not an image volume.
_NOT_IMAGES = frozenset({"convert.not_a_volume", "convert.no_geometry"})


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

    @property
    def describe(self) -> SeriesDescriptor:
        return SeriesDescriptor(
            self.protocol, self.role, self.manufacturer, self.model, self.software_versions
        )


@dataclass(frozen=True)
class NotConverted:
    """A series not converted, and why (not selected, no protocol, not an MR image...)."""

    study: str
    series: str
    folder: str
    description: str
    reason_code: str
    reason: str
    #: the input files of the series: every file is accounted for
    files: int = 0


@dataclass(frozen=True)
class ConvertReport:
    out: Path
    dcm2niix: str | None  # the dcm2niix version used; None when it is unavailable
    dcm2niix_problem: str | None  # why dcm2niix is unavailable
    series: tuple[ConvertedSeries, ...]
    not_converted: tuple[NotConverted, ...]
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


@dataclass(frozen=True)
class _Plan:
    study: str
    series: str
    entries: list[FolderFile]
    protocol: str
    role: str
    name: bids.BidsName
    subject: str  # "" when the series has no usable PatientID
    study_date: str


def convert_folder(
    source: Path,
    out: Path,
    protocols: ProtocolSet,
    protocol: str | None = None,
    *,
    every_series: bool = False,
    dcm2niix: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[ConvertedSeries | NotConverted], None] | None = None,
) -> ConvertReport:
    """Convert the series the protocol selects (``every_series``: every MR image series) of
    every study under ``source`` into ``out``. ``dcm2niix`` names the executable (default:
    beside the interpreter, else on PATH); ``timeout`` bounds one dcm2niix run."""
    try:
        tool: Dcm2niix | None = find_dcm2niix(dcm2niix)
        problem = None
    except ConvertError as exc:
        tool, problem = None, exc.message
        log.warning("convert: %s; SimpleITK converts every series", exc.message)
    skipped: list[SkippedFile] = []
    studies = index_folder(source, skipped, keep_damaged=True)
    plans: list[_Plan] = []
    not_converted: list[NotConverted] = []
    for study_uid, series in studies.items():
        chosen, left = _plan_study(study_uid, series, protocols, protocol, every_series)
        plans.extend(chosen)
        not_converted.extend(left)
        if progress is not None:
            for not_planned in left:
                progress(not_planned)
    out.mkdir(parents=True, exist_ok=True)
    bids.write_dataset_description(out, _cohortflow_version())
    names = _name_plans(plans, out)
    results = []
    for plan in plans:
        subject, session, name = names[plan.series, plan.study]
        try:
            result = _convert_series(plan, subject, session, name, out, tool, problem, timeout)
        except Exception as exc:  # one series must never stop the others
            log.exception("convert: series %s failed", plan.series)
            result = _failed(
                plan,
                subject,
                session,
                name,
                [finding("convert.internal_error", f"{type(exc).__name__}: {exc}")],
                "",
                0.0,
            )
        # judged at the severities the series' protocol sets (protocols.yaml qc.severity)
        result = replace(result, findings=protocols.qc_of(plan.protocol).judged(result.findings))
        item: ConvertedSeries | NotConverted = result
        deciding = result.reason
        if not plan.role and deciding is not None and deciding.check in _NOT_IMAGES:
            # asked for every series, this one is no image volume (a localizer, one slice):
            # nothing a protocol wanted failed
            item = NotConverted(
                plan.study,
                plan.series,
                result.folder,
                result.description,
                "not_a_volume",
                deciding.message,
                len(plan.entries),
            )
            not_converted.append(item)
        else:
            results.append(result)
        if progress is not None:
            progress(item)
    return ConvertReport(
        out=out,
        dcm2niix=tool.version if tool else None,
        dcm2niix_problem=problem,
        series=tuple(results),
        not_converted=tuple(not_converted),
        skipped=tuple(skipped),
    )


def _cohortflow_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cohortflow")
    except PackageNotFoundError:
        return "unknown"


def _plan_study(
    study_uid: str,
    series: Mapping[str, list[FolderFile]],
    protocols: ProtocolSet,
    protocol_name: str | None,
    every_series: bool,
) -> tuple[list[_Plan], list[NotConverted]]:
    """Which series of a study are converted, in which role and under which name."""
    ordered = sorted(series.items(), key=lambda item: (series_number(item[1]), item[0]))
    plans: list[_Plan] = []
    left: list[NotConverted] = []
    readable = [(uid, e) for uid, e in ordered if has_header(e)]
    for uid, entries in ordered:
        if not has_header(entries):
            left.append(
                NotConverted(
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
            left.append(NotConverted(study_uid, uid, folder, what, code, why))
            continue
        if str(header.get("BurnedInAnnotation") or "").upper() == "YES":
            left.append(
                NotConverted(
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
                NotConverted(
                    study_uid, uid, folder, what, "localizer", "ImageType LOCALIZER: not a volume"
                )
            )
            continue
        if role is None and str(header.get("Modality") or "") != "MR":
            left.append(
                NotConverted(
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
            _Plan(
                study=study_uid,
                series=uid,
                entries=entries,
                protocol=protocol.name if protocol else "",
                role=role or "",
                name=name,
                subject=bids.bids_label(str(header.get("PatientID") or "")),
                study_date=str(header.get("StudyDate") or ""),
            )
        )
    return plans, [replace(n, files=len(series[n.series])) for n in left]


def _name_plans(plans: Sequence[_Plan], out: Path) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(series, study) -> (subject, session, file name): sessions from each subject's sessions
    file (new studies numbered and saved now), run numbers per session."""
    by_subject: dict[str, dict[str, str]] = defaultdict(dict)
    for plan in plans:
        if plan.subject:
            by_subject[plan.subject][plan.study] = plan.study_date
    sessions: dict[str, bids.Sessions] = {}
    for subject, studies in by_subject.items():
        # two studies of one subject converted at once (flow workers) must not both number
        # themselves from the same file
        locks = out / ".locks"  # hidden: BIDS tools skip dot files
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(locks / f"sub-{subject}.lock"):
            known = bids.Sessions.load(out, subject)
            known.assign(studies.items())
            known.save()
        sessions[subject] = known
    groups: dict[tuple[str, str], list[_Plan]] = defaultdict(list)
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


@dataclass(frozen=True)
class _Series:
    """The readable files of a series, in the order their images are preferred."""

    files: list[Path]
    headers: list[Dataset]
    digests: list[str]
    findings: list[Finding]


def _read_series(entries: Sequence[FolderFile]) -> _Series:
    from pipelines.dicom.reader import classify

    readable: list[tuple[tuple[float, float, str], Path, Dataset]] = []
    digests: list[str] = []
    damaged: list[str] = []
    seen: set[str] = set()
    copies = 0
    for entry in entries:
        shown = str(entry.relative)
        if entry.damage is not None:
            damaged.append(f"{shown}: {entry.damage}")
            continue
        try:
            data, _ = read_regular(entry.path)
        except RefusedError as refused:
            damaged.append(f"{shown}: {refused.reason}")
            continue
        digests.append(hashlib.sha256(data).hexdigest())
        result = classify(data)
        if not result.readable or result.dataset is None:
            damaged.append(f"{shown}: {result.reason or result.status.value}")
            continue
        ds = result.dataset
        sop = str(ds.get("SOPInstanceUID") or shown)
        if sop in seen:  # the same instance delivered twice is one image
            copies += 1
            continue
        seen.add(sop)
        order = (_float(ds.get("EchoNumbers"), 1.0), _float(ds.get("InstanceNumber"), 0.0), shown)
        readable.append((order, entry.path, ds))
    readable.sort(key=lambda item: item[0])
    findings = []
    if damaged:
        findings.append(
            finding(
                "convert.damaged_files",
                f"{len(damaged)} file(s) of the series cannot be read and are left out: "
                + "; ".join(damaged[:3])
                + (" ..." if len(damaged) > 3 else ""),
                len(damaged),
            )
        )
    if copies:
        findings.append(
            finding(
                "convert.duplicate_files",
                f"{copies} file(s) repeat an instance already read (same SOPInstanceUID): left out",
                copies,
            )
        )
    return _Series([p for _, p, _ in readable], [ds for _, _, ds in readable], digests, findings)


def _float(value: Any, default: float) -> float:
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return default


@dataclass(frozen=True)
class _Result:
    """A converted image that passed the check, still in the temporary folder."""

    converter: str
    version: str
    path: Path
    sidecar: dict[str, Any]
    check: ImageCheck
    shape: tuple[int, ...]
    voxel_mm: tuple[float, ...]
    extra: tuple[str, ...] = ()


def _convert_series(
    plan: _Plan,
    subject: str,
    session: str,
    name: str,
    out: Path,
    tool: Dcm2niix | None,
    tool_problem: str | None,
    timeout: float,
) -> ConvertedSeries:
    start = time.perf_counter()
    series = _read_series(plan.entries)
    input_sha = hashlib.sha256("".join(sorted(series.digests)).encode()).hexdigest()

    def failed(findings: list[Finding]) -> ConvertedSeries:
        if subject and session:
            # what an earlier run wrote for the series is no longer vouched for
            anat = bids.anat_folder(out, subject, session)
            gone = bids.remove_stale(anat, bids.hashed_key("series", plan.series), keep="")
            if gone:
                log.info("convert: %s failed: removed %s", name, ", ".join(p.name for p in gone))
        return _failed(
            plan,
            subject,
            session,
            name,
            [*series.findings, *findings],
            input_sha,
            time.perf_counter() - start,
        )

    if not subject:
        return failed(
            [
                finding(
                    "convert.no_subject",
                    "the series has no PatientID with a letter or digit: no subject to file "
                    "it under",
                )
            ]
        )
    if not series.headers:
        return failed([finding("convert.no_geometry", "no file of the series can be read")])
    header = series.headers[0]
    try:
        planes = [p for i, ds in enumerate(series.headers) for p in planes_of(ds, i)]
        grid = slice_grid(planes)
        samples = _samples(grid, series.files)
    except (GeometryError, ConvertError) as exc:
        code = exc.code if isinstance(exc, ConvertError) else "convert.no_geometry"
        return failed([finding(code, f"{plan.entries[0].relative.parent}: {exc.message}")])
    frames = int(header.get("NumberOfFrames") or 1)
    findings = [
        *series.findings,
        *grid_findings(
            grid,
            _float(header.get("GantryDetectorTilt"), 0.0),
            frames if frames > 1 else None,
        ),
    ]
    instances = list(dict.fromkeys(p.instance for p in grid.planes))
    files = [series.files[i] for i in instances]
    with tempfile.TemporaryDirectory(prefix="cohortflow-convert-") as temp:
        work = Path(temp)
        dicom = work / "dicom"
        dicom.mkdir()
        linked = _link(files, dicom)
        failures: list[Finding] = []
        chosen: _Result | None = None
        if tool is None:
            failures.append(
                finding("convert.dcm2niix_unavailable", tool_problem or "dcm2niix not found")
            )
        else:
            attempt = _with_dcm2niix(tool, dicom, work / "dcm2niix", grid, samples, timeout)
            if isinstance(attempt, _Result):
                chosen = attempt
            else:
                failures.extend(attempt)
        if chosen is None:
            attempt = _with_sitk(linked, grid, samples, work / "sitk" / "image.nii", header)
            if isinstance(attempt, _Result):
                chosen = attempt
            else:
                return failed([*findings[len(series.findings) :], *failures, *attempt])
        fallback = failures[0] if failures else None
        why = "; ".join(f"{f.check}: {f.message}" for f in failures)
        if fallback is not None:
            findings.append(
                finding("convert.fallback", f"converted by SimpleITK: {why}", fallback.check)
            )
        if chosen.extra:
            findings.append(
                finding(
                    "convert.extra_outputs",
                    f"dcm2niix also wrote {', '.join(chosen.extra)}: not kept",
                    len(chosen.extra),
                )
            )
        content, cleaned, dropped = sidecar.clean_identifiers(
            chosen.sidecar, dataset_cleaner(header)
        )
        if cleaned or dropped:
            what = [f"{', '.join(cleaned)} cleaned"] if cleaned else []
            what += [f"{', '.join(dropped)} left out"] if dropped else []
            findings.append(
                finding(
                    "convert.sidecar_identifier",
                    f"sidecar text held an identifying value of the header: {'; '.join(what)}",
                    len(cleaned) + len(dropped),
                )
            )
        content = sidecar.with_provenance(
            content,
            chosen.converter,
            chosen.version,
            METHOD_VERSION,
            bids.hashed_key("series", plan.series),
            fallback.check if fallback else None,
        )
        anat = bids.anat_folder(out, subject, session)
        removed = bids.remove_stale(anat, content["CohortflowSeriesKey"], name)
        if removed:
            log.info("convert: %s replaces %s", name, ", ".join(p.name for p in removed))
        nifti, json_path = anat / f"{name}.nii.gz", anat / f"{name}.json"
        described = f"cohortflow {METHOD_VERSION} {chosen.converter} {chosen.version}"
        bids.write_nifti_gz(nifti, _scrub_header(chosen.path.read_bytes(), described))
        bids.write_sidecar(json_path, content)
    seconds = round(time.perf_counter() - start, 3)
    metrics: dict[str, Any] = {
        "converter": chosen.converter,
        "converter_version": chosen.version,
        "fallback_reason": fallback.check if fallback else None,
        "slices": grid.count,
        "images": len(grid.planes),
        "missing_slices": len(grid.missing),
        "tilt_deg": round(grid.tilt_degrees, 3),
        "resampled": chosen.check.resampled,
        "position_error_mm": _rounded(chosen.check.position_error_mm),
        "voxel_residual": _rounded(chosen.check.residual),
        "shape": list(chosen.shape),
        "voxel_mm": [round(v, 4) for v in chosen.voxel_mm],
        "nifti": str(nifti.relative_to(out)),
    }
    return ConvertedSeries(
        files=len(plan.entries),
        study=plan.study,
        series=plan.series,
        folder=str(plan.entries[0].relative.parent),
        description=header_text(header, "SeriesDescription"),
        protocol=plan.protocol,
        role=plan.role,
        subject=subject,
        session=session,
        name=name,
        findings=tuple(findings),
        converter=chosen.converter,
        converter_version=chosen.version,
        fallback_reason=fallback.check if fallback else None,
        fallback_message=why or None,
        nifti=nifti,
        sidecar=json_path,
        extra_outputs=chosen.extra,
        slices=grid.count,
        images=len(grid.planes),
        shape=chosen.shape,
        voxel_mm=tuple(round(v, 4) for v in chosen.voxel_mm),
        manufacturer=header_text(header, "Manufacturer"),
        model=header_text(header, "ManufacturerModelName"),
        software_versions=header_text(header, "SoftwareVersions"),
        input_sha256=input_sha,
        seconds=seconds,
        metrics=metrics,
        identified=None if is_deidentified(header) else dataset_cleaner(header),
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _link(files: Sequence[Path], folder: Path) -> list[Path]:
    """Put the series' files (only them) into ``folder``: symbolic links, else copies."""
    linked = []
    for n, path in enumerate(files):
        target = folder / f"{n:05d}.dcm"
        try:
            target.symlink_to(path.resolve())
        except OSError:
            shutil.copyfile(path, target)
        linked.append(target)
    return linked


def _samples(grid: SliceGrid, files: Sequence[Path]) -> dict[int, npt.NDArray[np.float64]]:
    """The DICOM pixels (rescaled) of a few slices, to compare the voxels with."""
    cache: dict[int, Dataset] = {}
    out = {}
    for slot in sample_slots(grid):
        plane = grid.plane_of(slot)
        assert plane is not None
        if plane.instance not in cache:
            cache[plane.instance] = read_instance(files[plane.instance])
        ds = cache[plane.instance]
        try:
            pixels = np.asarray(ds.pixel_array)
        except Exception as exc:
            raise ConvertError(
                "convert.unreadable_pixels",
                f"{files[plane.instance].name}: pixel data cannot be decoded: "
                f"{type(exc).__name__}: {exc}",
            ) from None
        if plane.frame is not None:
            pixels = pixels[plane.frame]
        slope, intercept = _rescale(ds, plane)
        out[slot] = pixels.astype(np.float64) * slope + intercept
    return out


def _rescale(ds: Dataset, plane: Plane) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of a plane (per frame in Enhanced objects)."""
    sources: list[Dataset] = [ds]
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", plane.frame or 0),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups) or []
        if len(items) > index:
            transform = items[index].get("PixelValueTransformationSequence") or []
            sources.extend(transform[:1])
    for item in sources:
        if "RescaleSlope" in item or "RescaleIntercept" in item:
            return (
                _float(item.get("RescaleSlope"), 1.0),
                _float(item.get("RescaleIntercept"), 0.0),
            )
    return 1.0, 0.0


def _load(
    path: Path, grid: SliceGrid, samples: Mapping[int, npt.NDArray[np.float64]]
) -> tuple[ImageCheck, tuple[int, ...], tuple[float, ...]]:
    """Check the NIfTI at ``path``; its shape and voxel size."""
    import nibabel as nib

    image: Any = nib.load(path)
    data = np.asanyarray(image.dataobj)
    result = check_image(grid, image.affine, data, samples)
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return result, tuple(int(n) for n in image.shape), zooms


def _candidates(outputs: Sequence[Output], grid: SliceGrid) -> list[Output]:
    """dcm2niix's images in the order they are tried: the tilt-corrected one for a sheared
    series, the equalized one for a series with gaps, else the plain image; the rest after."""
    if grid.sheared and grid.missing:
        prefer = ["tilt_corrected_equalized", "tilt_corrected", "equalized", "image"]
    elif grid.sheared:
        prefer = ["tilt_corrected", "image"]
    elif grid.missing:
        prefer = ["equalized", "image"]
    else:
        prefer = ["image"]
    rank = {kind: n for n, kind in enumerate(prefer)}
    return sorted(outputs, key=lambda o: (rank.get(o.kind, len(prefer)), o.postfix))


def _with_dcm2niix(
    tool: Dcm2niix,
    dicom: Path,
    work: Path,
    grid: SliceGrid,
    samples: Mapping[int, npt.NDArray[np.float64]],
    timeout: float,
) -> _Result | list[Finding]:
    """dcm2niix's image that passes the check, or why there is none."""
    try:
        run = run_dcm2niix(tool, dicom, work, timeout)
    except ConvertError as exc:
        return [finding(exc.code, exc.message)]
    if run.returncode != 0:
        return [
            finding(
                "convert.dcm2niix_failed",
                f"dcm2niix exited with status {run.returncode}: "
                f"{run.last_message() or 'no message'}",
                run.returncode,
            )
        ]
    if not run.outputs:
        return [
            finding(
                "convert.no_output",
                f"dcm2niix wrote no image: {run.last_message() or 'no message'}",
            )
        ]
    failures: list[Finding] = []
    for output in _candidates(run.outputs, grid)[:MAX_CANDIDATES]:
        result, shape, zooms = _load(output.path, grid, samples)
        if not result.passed:
            failures.extend(
                replace(f, message=f"dcm2niix image {output.label}: {f.message}")
                for f in result.findings
                if f.severity is Severity.FAIL
            )
            continue
        raw: dict[str, Any] = {}
        json_path = run.sidecar_for(output)
        if json_path is not None:
            try:
                loaded = json.loads(json_path.read_text(encoding="utf-8", errors="replace"))
                raw = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                raw = {}
        return _Result(
            converter=DCM2NIIX,
            version=tool.version,
            path=output.path,
            sidecar=sidecar.from_dcm2niix(raw),
            check=result,
            shape=shape,
            voxel_mm=zooms,
            extra=tuple(o.label for o in run.outputs if o is not output),
        )
    return failures


def _with_sitk(
    files: Sequence[Path],
    grid: SliceGrid,
    samples: Mapping[int, npt.NDArray[np.float64]],
    target: Path,
    header: Dataset,
) -> _Result | list[Finding]:
    try:
        convert_with_sitk(files, grid, target)
    except ConvertError as exc:
        return [finding(exc.code, exc.message)]
    result, shape, zooms = _load(target, grid, samples)
    if not result.passed:
        return [
            replace(f, message=f"SimpleITK image: {f.message}")
            for f in result.findings
            if f.severity is Severity.FAIL
        ]
    return _Result(
        converter=SITK,
        version=sitk_version(),
        path=target,
        sidecar=sidecar.from_headers(header),
        check=result,
        shape=shape,
        voxel_mm=zooms,
    )


def _scrub_header(nifti: bytes, description: str) -> bytes:
    """The NIfTI with its free-text header fields replaced: ``descrip`` (dcm2niix writes the
    acquisition time there), ``aux_file`` (ImageComments), ``db_name`` and ``intent_name``."""
    import nibabel as nib

    size = int.from_bytes(nifti[:4], "little")
    if size not in (348, 540):
        size = int.from_bytes(nifti[:4], "big")
    header_class = nib.Nifti2Header if size == 540 else nib.Nifti1Header
    header = header_class.from_fileobj(io.BytesIO(nifti[:size]))
    header["descrip"] = description.encode()[:79]
    header["aux_file"] = b""
    header["intent_name"] = b""
    if "db_name" in header:
        header["db_name"] = b""
    return bytes(header.binaryblock) + nifti[size:]


def _failed(
    plan: _Plan,
    subject: str,
    session: str,
    name: str,
    findings: Sequence[Finding],
    input_sha256: str,
    seconds: float,
) -> ConvertedSeries:
    header = first_header(plan.entries)
    return ConvertedSeries(
        files=len(plan.entries),
        study=plan.study,
        series=plan.series,
        folder=str(plan.entries[0].relative.parent),
        description=header_text(header, "SeriesDescription"),
        protocol=plan.protocol,
        role=plan.role,
        subject=subject,
        session=session,
        name=name,
        findings=tuple(findings),
        manufacturer=header_text(header, "Manufacturer"),
        model=header_text(header, "ManufacturerModelName"),
        software_versions=header_text(header, "SoftwareVersions"),
        input_sha256=input_sha256,
        seconds=round(seconds, 3),
        identified=None if is_deidentified(header) else dataset_cleaner(header),
    )


def stage_record(result: ConvertedSeries, method: str) -> StageRecord:
    """The index row of one series' conversion."""
    return stage_row(
        result,
        stage=STAGE,
        method_version=method,
        series=result.series,
        study=result.study,
        describe=result.describe,
        metrics=result.metrics,
        input_sha256=result.input_sha256,
        seconds=result.seconds,
    )


def convert_configured(
    settings: Settings,
    source: Path,
    out: Path,
    index: IndexDB | None,
    protocol: str | None = None,
    protocols_file: Path | None = None,
    *,
    every_series: bool = False,
    record: bool = True,
    dcm2niix: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[ConvertedSeries | NotConverted], None] | None = None,
) -> ConvertReport:
    """Convert with the project's protocols; record a ``convert`` stage result per series in
    the archive index (when given and ``record``)."""
    from pipelines.dicom.protocols import load_protocols

    protocols = load_protocols(protocols_file or settings.protocols_file)
    if protocol is not None:
        protocols.get(protocol)  # an unknown name is a usage error before any work
    report = convert_folder(
        source,
        out,
        protocols,
        protocol,
        every_series=every_series,
        dcm2niix=dcm2niix,
        timeout=timeout,
        progress=progress,
    )
    if index is not None and record:
        cleaners = {r.series: r.identified for r in report.series if r.identified is not None}
        rows = for_deidentified_side(
            [stage_record(r, report.method_version) for r in report.series],
            cleaners,
            lambda: ProjectKey.load(str(settings.pseudonym_key_source)).uid,
        )
        with index.session() as session:
            record_stages(session, rows)
    return report


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
