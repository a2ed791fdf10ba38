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

Which series and their names: ``plan``; reading a series: ``series``; the converters and the
choice among their images: ``converters``; what it gives: ``results``.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cohortflow import installed_version
from cohortflow.models.database import IndexDB
from cohortflow.models.errors import GeometryError
from cohortflow.models.geometry import planes_of
from cohortflow.models.series import NotTaken
from cohortflow.models.settings import BidsSettings, Settings
from cohortflow.models.stages import record_stages
from cohortflow.pipelines.convert import bids, sidecar
from cohortflow.pipelines.convert.check import grid_findings, slice_grid
from cohortflow.pipelines.convert.converters import (
    CheckedImage,
    scrub_header,
    try_dcm2niix,
    try_sitk,
)
from cohortflow.pipelines.convert.dcm2niix import DEFAULT_TIMEOUT, Dcm2niix, find_dcm2niix
from cohortflow.pipelines.convert.errors import ConvertError
from cohortflow.pipelines.convert.plan import PlannedSeries, name_plans, plan_study
from cohortflow.pipelines.convert.results import (
    METHOD_VERSION,
    ConvertedSeries,
    ConvertReport,
    stage_record,
)
from cohortflow.pipelines.convert.series import as_float, link_files, read_series, sample_pixels
from cohortflow.pipelines.dicom.cleaner import dataset_cleaner
from cohortflow.pipelines.dicom.identified import (
    for_deidentified_side,
    is_defaced,
    is_deidentified,
)
from cohortflow.pipelines.dicom.keys import ProjectKey
from cohortflow.pipelines.dicom.protocols import ProtocolSet
from cohortflow.pipelines.dicomfolder import SkippedFile, first_header, index_folder
from cohortflow.qc.findings import Finding, finding
from cohortflow.qc.header import header_text

log = logging.getLogger(__name__)

#: Why a series converted only because every series was asked for is not an image volume.
_NOT_IMAGES = frozenset({"convert.not_a_volume", "convert.no_geometry"})


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
    progress: Callable[[ConvertedSeries | NotTaken], None] | None = None,
    expect: Callable[[int], None] | None = None,
) -> ConvertReport:
    """Convert with the project's protocols; record a ``convert`` stage result per series in
    the archive index (when given and ``record``)."""
    from cohortflow.pipelines.dicom.protocols import load_protocols

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
        expect=expect,
        about=settings.bids,
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


def convert_folder(
    source: Path,
    out: Path,
    protocols: ProtocolSet,
    protocol: str | None = None,
    *,
    every_series: bool = False,
    dcm2niix: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[ConvertedSeries | NotTaken], None] | None = None,
    expect: Callable[[int], None] | None = None,
    about: BidsSettings | None = None,
) -> ConvertReport:
    """Convert the series the protocol selects (``every_series``: every MR image series) of
    every study under ``source`` into ``out``. ``dcm2niix`` names the executable (default:
    beside the interpreter, else on PATH); ``timeout`` bounds one dcm2niix run; ``progress``
    hears of each series as it is done, ``expect`` of how many there are once the folder is
    read; ``about`` is what the dataset's description and README say of it (settings
    ``bids``)."""
    try:
        tool: Dcm2niix | None = find_dcm2niix(dcm2niix)
        problem = None
    except ConvertError as exc:
        tool, problem = None, exc.message
        log.warning("convert: %s; SimpleITK converts every series", exc.message)
    skipped: list[SkippedFile] = []
    studies = index_folder(source, skipped, keep_damaged=True)
    if expect is not None:
        expect(sum(len(series) for series in studies.values()))
    plans: list[PlannedSeries] = []
    not_converted: list[NotTaken] = []
    for study_uid, series in studies.items():
        chosen, left = plan_study(study_uid, series, protocols, protocol, every_series)
        plans.extend(chosen)
        not_converted.extend(left)
        if progress is not None:
            for not_planned in left:
                progress(not_planned)
    out.mkdir(parents=True, exist_ok=True)
    bids.write_dataset_files(out, installed_version() or "unknown", about)
    names = name_plans(plans, out)
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
        item: ConvertedSeries | NotTaken = result
        deciding = result.reason
        if not plan.role and deciding is not None and deciding.check in _NOT_IMAGES:
            # asked for every series, this one is no image volume (a localizer, one slice):
            # nothing a protocol wanted failed
            item = NotTaken(
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


def _convert_series(
    plan: PlannedSeries,
    subject: str,
    session: str,
    name: str,
    out: Path,
    tool: Dcm2niix | None,
    tool_problem: str | None,
    timeout: float,
) -> ConvertedSeries:
    start = time.perf_counter()
    series = read_series(plan.entries)
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
        samples = sample_pixels(grid, series.files)
    except (GeometryError, ConvertError) as exc:
        code = exc.code if isinstance(exc, ConvertError) else "convert.no_geometry"
        return failed([finding(code, f"{plan.entries[0].relative.parent}: {exc.message}")])
    frames = int(header.get("NumberOfFrames") or 1)
    findings = [
        *series.findings,
        *grid_findings(
            grid,
            as_float(header.get("GantryDetectorTilt"), 0.0),
            frames if frames > 1 else None,
        ),
    ]
    instances = list(dict.fromkeys(p.instance for p in grid.planes))
    files = [series.files[i] for i in instances]
    with tempfile.TemporaryDirectory(prefix="cohortflow-convert-") as temp:
        work = Path(temp)
        dicom = work / "dicom"
        dicom.mkdir()
        linked = link_files(files, dicom)
        failures: list[Finding] = []
        chosen: CheckedImage | None = None
        if tool is None:
            failures.append(
                finding("convert.dcm2niix_unavailable", tool_problem or "dcm2niix not found")
            )
        else:
            attempt = try_dcm2niix(tool, dicom, work / "dcm2niix", grid, samples, timeout)
            if isinstance(attempt, CheckedImage):
                chosen = attempt
            else:
                failures.extend(attempt)
        if chosen is None:
            attempt = try_sitk(linked, grid, samples, work / "sitk" / "image.nii", header)
            if isinstance(attempt, CheckedImage):
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
            sidecar.completed(chosen.sidecar, header), dataset_cleaner(header)
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
            deidentified=is_deidentified(header),
            defaced=is_defaced(header),
        )
        anat = bids.anat_folder(out, subject, session)
        removed = bids.remove_stale(anat, content["CohortflowSeriesKey"], name)
        if removed:
            log.info("convert: %s replaces %s", name, ", ".join(p.name for p in removed))
        nifti, json_path = anat / f"{name}.nii.gz", anat / f"{name}.json"
        described = f"cohortflow {METHOD_VERSION} {chosen.converter} {chosen.version}"
        bids.write_nifti_gz(nifti, scrub_header(chosen.path.read_bytes(), described))
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
        # where the dashboard's slice viewer finds the image (it serves it from under the
        # outputs folder only)
        "image": str(nifti.absolute()),
        **_shown(header),
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


def _failed(
    plan: PlannedSeries,
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
        metrics=_shown(header),
        identified=None if is_deidentified(header) else dataset_cleaner(header),
    )


def _shown(header: Any) -> dict[str, str]:
    """What names the series to a reviewer on the de-identified side (the dashboard's series
    page): its description (cleaned of the header's identifiers when the input was not
    de-identified) and the subject's pseudonym (the de-identified PatientID; none for
    identified input, whose PatientID is the real one)."""
    description = header_text(header, "SeriesDescription")
    if not is_deidentified(header):
        return {"description": dataset_cleaner(header)(description)}
    return {"description": description, "pseudonym": header_text(header, "PatientID")}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
