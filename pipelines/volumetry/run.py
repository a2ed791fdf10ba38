"""Volumetry of the T1s in a source: a NIfTI file, a BIDS-style folder, or a folder of DICOM.

DICOM is converted first (``pipelines.convert``, into ``OUT/nifti``) and the series the protocol
takes as its volumetry input (role ``t1_3d``; a thick-slice 2D T1 when asked) are measured; a
NIfTI file or a BIDS folder's ``*_T1w.nii.gz`` files are measured as they are. Per image: read,
measure (``method``), judge (``verdict``), draw the overlay (``overlay``). One image's failure
never stops the others. Results are recorded in the index (a ``volumetry`` stage result and a
``biomarkers`` row) for images whose series is known, that is, those converted here.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from cohortflow.models.database import IndexDB
from cohortflow.models.series import SeriesDescriptor
from cohortflow.models.settings import Settings
from cohortflow.models.stages import BiomarkerRecord, StageRecord, record_biomarkers, record_stages
from cohortflow.models.volumes import Volumes
from cohortflow.pipelines.dicom.identified import for_deidentified_side
from cohortflow.pipelines.dicom.keys import ProjectKey
from cohortflow.pipelines.dicomfolder import SkippedFile
from cohortflow.pipelines.imaging.register import HeadFit
from cohortflow.pipelines.safeio import RefusedError, check_entry, hash_file, printable
from cohortflow.pipelines.volumetry.atlas import Atlas, load_atlas
from cohortflow.pipelines.volumetry.errors import VolumetryError
from cohortflow.pipelines.volumetry.method import METHOD, METHOD_VERSION, Parameters, measure
from cohortflow.pipelines.volumetry.overlay import write_labels, write_overlay
from cohortflow.pipelines.volumetry.source import Source
from cohortflow.pipelines.volumetry.verdict import judge
from cohortflow.qc.findings import Finding, Verdict, finding, reason, stage_row, verdict

if TYPE_CHECKING:
    from cohortflow.pipelines.convert.results import ConvertedSeries
    from cohortflow.qc.policy import QcPolicy

log = logging.getLogger(__name__)

STAGE = "volumetry"
#: Roles of the protocol rules whose series are measured: the 3D T1, and a 2D T1 where a
#: protocol (or a folder without one) takes it, measured with lower confidence (thick slices)
ROLES = ("t1_3d", "t1_2d")


@dataclass(frozen=True)
class VolumetryResult:
    source: Source
    findings: tuple[Finding, ...]
    volumes: Volumes | None = None
    registered_icv_ml: float | None = None
    correlation: float | None = None
    slice_mm: float | None = None
    overlay: Path | None = None
    #: the tissue classes on the image's grid (RAS+ voxel order), for the dashboard's viewer
    labels: Path | None = None
    input_sha256: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    #: the head fit the atlas was placed with: "handed" (an earlier stage's) or "fitted" (here)
    affine_from: str | None = None
    #: the deformable stage: "registered" or "stored" (the fit store's, made before from the
    #: same subject, head fit and settings); None without one
    deformable_from: str | None = None

    @property
    def verdict(self) -> Verdict:
        return verdict(self.findings)

    @property
    def reason(self) -> Finding | None:
        return reason(self.findings)

    @property
    def confidence(self) -> str:
        return (
            "low" if any(f.check == "volumetry.thick_slices" for f in self.findings) else "normal"
        )


@dataclass(frozen=True)
class VolumetryReport:
    results: tuple[VolumetryResult, ...]
    parameters: Parameters
    #: sources that could not be measured before volumetry started (conversion failures...)
    not_measured: tuple[tuple[str, str, str], ...] = ()  # (name, reason code, message)
    #: the series of a DICOM folder that are no volumetry input, and why (their role and its
    #: evidence): (folder, description, why, files)
    not_inputs: tuple[tuple[str, str, str, int], ...] = ()
    #: a DICOM folder's accounting: the files in its series (measured or not) and the files
    #: that are in no series (not DICOM, damaged, refused), each with its reason
    files: int = 0
    skipped: tuple[SkippedFile, ...] = ()

    def with_verdict(self, wanted: Verdict) -> list[VolumetryResult]:
        return [r for r in self.results if r.verdict is wanted]


#: The largest image read, as its header declares it (voxels x bytes per voxel): a 1 mm head is
#: about 0.03 GB; a gzipped NIfTI of a few kilobytes can declare terabytes.
MAX_IMAGE_BYTES = 2 << 30


def read_t1(path: Path, root: Path | None = None) -> Any:
    """The image as an ANTs image in RAS+ voxel order (so that overlays come out upright).

    Only a regular file is opened (a FIFO would block for ever); a symbolic link found in the
    folder ``root`` is followed only to a file inside it. The image's declared size is checked
    before any voxel is read."""
    import ants

    try:
        check_entry(path, root, follow=True)
    except RefusedError as refused:
        raise VolumetryError(f"{printable(path)}: {refused.reason}") from None
    try:
        img: Any = nib.load(path)
    except Exception as exc:  # nibabel raises several types for damaged files
        raise VolumetryError(f"{path}: not a readable NIfTI image ({exc})") from exc
    declared = int(np.prod(img.shape, dtype=np.float64)) * img.get_data_dtype().itemsize
    if declared > MAX_IMAGE_BYTES:
        raise VolumetryError(
            f"{printable(path)}: the header declares {img.shape} voxels ({declared} bytes), over "
            f"the limit of {MAX_IMAGE_BYTES}; not read"
        )
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise VolumetryError(f"{path}: a 3D image is needed, this one has shape {img.shape}")
    canonical = nib.as_closest_canonical(img)
    if canonical.header.get_xyzt_units()[0] == "unknown":
        canonical.header.set_xyzt_units("mm", "sec")  # NIfTI's default; ITK warns otherwise
    try:
        return ants.from_nibabel_nifti(canonical, pixeltype="float")
    except ValueError as exc:  # a sheared grid ANTs cannot represent
        raise VolumetryError(f"{path}: the voxel grid cannot be used ({exc})") from exc


def measure_source(
    source: Source,
    atlas: Callable[[], Atlas],
    params: Parameters,
    overlay_dir: Path | None,
    fit: HeadFit | None = None,
) -> VolumetryResult:
    """Measure one image (raises VolumetryError when it cannot be read); ``atlas`` loads the
    atlas when the image is readable. ``fit``: the study's head as an earlier stage fitted it
    (used when fitted to this atlas's head model: the head is not fitted again)."""
    t0 = time.perf_counter()
    image = read_t1(source.image, source.root)
    read_s = time.perf_counter() - t0
    loaded = atlas()
    handed = fit.matrix if fit is not None and fit.template_digest == loaded.digest else None
    m = measure(image, loaded, params, handed)
    spacing = tuple(float(s) for s in image.spacing)
    slice_mm = max(spacing)
    mask = m.mask
    border = _border_fraction(mask, m.crop, tuple(int(n) for n in image.shape))
    edge = m.refinement.added_fraction + m.refinement.removed_fraction if m.refinement else 0.0
    findings = judge(
        icv_ml=m.volumes.icv_ml,
        bpf=m.volumes.bpf,
        correlation=m.correlation,
        neighbour_gain=m.neighbour_gain,
        gm_ml=m.volumes.gm_ml,
        wm_ml=m.volumes.wm_ml,
        means=m.mixture.means,
        converged=m.mixture.converged,
        edge_change=edge,
        on_border=border,
        skull_to_csf=(
            m.refinement.skull_level / m.refinement.csf_level
            if m.refinement and m.refinement.csf_level > 0
            else None
        ),
        slice_mm=slice_mm,
    )
    overlay = labels = None
    if overlay_dir is not None:
        t1 = time.perf_counter()
        # source.name: the converted series' BIDS name (pseudonymous) or the file's own name
        overlay = write_overlay(
            overlay_dir / f"{source.name}_volumetry.png",
            m.image,
            m.labels,
            mask,
            m.spacing,
            m.volumes,
            source.name,
        )
        labels = write_labels(
            overlay_dir / f"{source.name}_labels.nii.gz",
            _uncropped(m.labels, m.crop, tuple(int(n) for n in image.shape)),
            canonical_affine(source.image),
        )
        m.seconds["overlay"] = time.perf_counter() - t1
    return VolumetryResult(
        source=source,
        findings=tuple(findings),
        volumes=m.volumes,
        registered_icv_ml=m.registered_icv_ml,
        correlation=m.correlation,
        slice_mm=slice_mm,
        overlay=overlay,
        labels=labels,
        input_sha256=hash_file(source.image),
        seconds={"read": read_s, **m.seconds},
        affine_from="fitted" if handed is None else "handed",
        deformable_from=m.deformable_from,
    )


def canonical_affine(path: Path) -> npt.NDArray[np.float64]:
    """The voxel to millimetre map of the image at ``path`` in RAS+ voxel order (the grid
    ``read_t1`` measures on), from its header alone."""
    header: Any = nib.load(path)
    shape = tuple(int(n) for n in header.shape[:3])
    orientation = nib.orientations.io_orientation(header.affine)
    to_canonical = nib.orientations.inv_ornt_aff(orientation, shape)
    return np.asarray(header.affine @ to_canonical, dtype=np.float64)


def _uncropped(
    labels: npt.NDArray[np.uint8], crop: tuple[tuple[int, int], ...], shape: tuple[int, ...]
) -> npt.NDArray[np.uint8]:
    """``labels`` of the cropped grid placed on the whole image's grid (0 elsewhere)."""
    full = np.zeros(shape, np.uint8)
    full[tuple(slice(start, stop) for start, stop in crop)] = labels
    return full


def _border_fraction(
    mask: np.ndarray[Any, Any], crop: tuple[tuple[int, int], ...], shape: tuple[int, ...]
) -> float:
    """Fraction of the mask's voxels on a face of the whole image (the crop's faces that are
    the image's own)."""
    total = int(mask.sum())
    if total == 0:
        return 0.0
    on = np.zeros(mask.shape, dtype=bool)
    for axis, ((start, stop), n) in enumerate(zip(crop, shape, strict=True)):
        index = [slice(None)] * 3
        if start == 0:
            index[axis] = slice(0, 1)
            on[tuple(index)] = True
        if stop == n:
            index[axis] = slice(mask.shape[axis] - 1, mask.shape[axis])
            on[tuple(index)] = True
    return float((mask & on).sum()) / total


def measure_all(
    sources: Sequence[Source],
    atlas: Callable[[], Atlas],
    params: Parameters,
    overlay_dir: Path | None,
    progress: Callable[[VolumetryResult], None] | None = None,
    fits: Mapping[str, HeadFit] | None = None,
    policy_of: Callable[[str | None], QcPolicy] | None = None,
) -> list[VolumetryResult]:
    """Measure each source; ``fits``: head fits by the series they were fitted on;
    ``policy_of``: the QC policy of a protocol, whose check severities judge the findings."""
    results = []
    for source in sources:
        fit = (fits or {}).get(source.series or "")
        try:
            result = measure_source(source, atlas, params, overlay_dir, fit)
        except VolumetryError as exc:
            result = VolumetryResult(source, (finding("volumetry.unreadable", str(exc)),))
        except Exception as exc:  # one image must never stop the others
            log.exception("volumetry: %s failed", source.image)
            result = VolumetryResult(
                source,
                (finding("volumetry.internal_error", f"{type(exc).__name__}: {exc}"),),
            )
        if policy_of is not None:
            judged = policy_of(source.protocol).judged(result.findings)
            result = replace(result, findings=judged)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def nifti_sources(source: Path) -> list[Source]:
    """The images of a NIfTI file or of a folder's ``*_T1w.nii[.gz]`` files."""
    if source.is_file():
        return [Source(source, _stem(source))]
    found = sorted(
        p
        for p in source.rglob("*_T1w.nii*")
        # post-contrast and guessed T1s are not volumetry inputs (the protocol's rules say so)
        if p.name.endswith((".nii", ".nii.gz"))
        and "_ce-" not in p.name
        and "_acq-guessed" not in p.name
    )
    return [Source(p, _stem(p), root=source) for p in found]


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def volumetry_configured(
    settings: Settings,
    source: Path,
    out: Path,
    index: IndexDB | None,
    protocol: str | None = None,
    protocols_file: Path | None = None,
    *,
    record: bool = True,
    params: Parameters | None = None,
    progress: Callable[[VolumetryResult], None] | None = None,
    expect: Callable[[int], None] | None = None,
) -> VolumetryReport:
    """Measure every T1 of ``source`` (converting DICOM first) and record the results;
    ``progress`` hears of each T1 measured, ``expect`` of how many there are."""
    p = params or Parameters()
    sources = nifti_sources(source)
    not_measured: list[tuple[str, str, str]] = []
    not_inputs: list[tuple[str, str, str, int]] = []
    conversion = None
    if not sources and source.is_dir():
        from cohortflow.pipelines.convert.folder import convert_configured

        conversion = convert_configured(
            settings, source, out / "nifti", index, protocol, protocols_file, record=record
        )
        sources, not_measured = sources_from_conversion(conversion.series)
        not_inputs = [
            (s.folder, s.description, s.reason, s.files) for s in conversion.not_converted
        ] + [
            (s.folder, s.description, f"converted as {s.role}, which is not measured", s.files)
            for s in conversion.series
            if s.role not in ROLES
        ]
    elif not sources:
        raise VolumetryError(f"{source}: no such file or folder")
    from cohortflow.pipelines.dicom.protocols import load_protocols

    protocols = load_protocols(protocols_file or settings.protocols_file)
    if expect is not None:
        expect(len(sources))
    results = measure_all(
        sources,
        lambda: load_atlas(settings.cache, settings.fits),
        p,
        out / "overlays",
        progress,
        policy_of=protocols.qc_of,
    )
    report = VolumetryReport(
        tuple(results),
        p,
        tuple(not_measured),
        tuple(not_inputs),
        files=0 if conversion is None else conversion.files,
        skipped=() if conversion is None else conversion.skipped,
    )
    if index is not None and record:
        known = [r for r in results if r.source.series and r.source.study]
        # series that were not de-identified: kept under the anonymizer's UIDs, cleaned
        cleaners = {
            s.series: s.identified
            for s in (conversion.series if conversion is not None else ())
            if s.identified is not None
        }
        uid = functools.cache(lambda: ProjectKey.load(str(settings.pseudonym_key_source)).uid)
        rows = for_deidentified_side([stage_record(r) for r in known], cleaners, uid)
        measured = for_deidentified_side(
            [biomarker_record(r, p) for r in known if r.volumes is not None], cleaners, uid
        )
        with index.session() as session:
            record_stages(session, rows)
            record_biomarkers(session, measured)
    return report


def sources_from_conversion(
    converted: Sequence[ConvertedSeries],
) -> tuple[list[Source], list[tuple[str, str, str]]]:
    """The T1s a conversion made, as volumetry sources, and the T1s it failed on (name, reason
    code, message)."""
    sources: list[Source] = []
    failed: list[tuple[str, str, str]] = []
    for series in converted:
        if series.role not in ROLES:
            continue
        if series.nifti is None:
            deciding = series.reason
            failed.append(
                (
                    series.name or series.folder,
                    deciding.check if deciding else "convert.failed",
                    deciding.message if deciding else "not converted",
                )
            )
            continue
        sources.append(
            Source(
                image=series.nifti,
                name=series.name,
                series=series.series,
                study=series.study,
                protocol=series.protocol or None,
                role=series.role,
                manufacturer=series.manufacturer or None,
                model=series.model or None,
                software_versions=series.software_versions or None,
                converter=f"{series.converter} {series.converter_version}",
            )
        )
    return sources, failed


def metrics(result: VolumetryResult) -> dict[str, Any]:
    v = result.volumes
    out: dict[str, Any] = asdict(v) if v is not None else {}
    out.update(
        registered_icv_ml=result.registered_icv_ml,
        correlation=result.correlation,
        slice_mm=result.slice_mm,
        confidence=result.confidence,
        affine_from=result.affine_from,
        deformable_from=result.deformable_from,
        seconds={k: round(s, 2) for k, s in result.seconds.items()},
    )
    if result.overlay is not None:
        out["picture"] = str(result.overlay)  # the tissue overlay the dashboard shows
    if result.labels is not None:
        # the image measured and its tissue classes: the dashboard's slice viewer shows them
        out["image"] = str(result.source.image.absolute())
        out["labels"] = str(result.labels.absolute())
    return out


def stage_record(result: VolumetryResult) -> StageRecord:
    s = result.source
    assert s.series is not None and s.study is not None
    return stage_row(
        result,
        stage=STAGE,
        method_version=f"{METHOD}-{METHOD_VERSION}",
        series=s.series,
        study=s.study,
        describe=SeriesDescriptor.of_record(s),
        metrics=metrics(result),
        input_sha256=result.input_sha256,
        seconds=round(sum(result.seconds.values()), 3),
    )


def biomarker_record(result: VolumetryResult, params: Parameters) -> BiomarkerRecord:
    s, v = result.source, result.volumes
    assert s.series is not None and s.study is not None and v is not None
    deciding = result.reason
    return BiomarkerRecord(
        series_uid=s.series,
        study_uid=s.study,
        protocol=s.protocol,
        volumes=v.rounded(),
        method=METHOD,
        method_version=METHOD_VERSION,
        parameters=params.as_dict(),
        qc_status=result.verdict.value,
        qc_reason=deciding.check if deciding else None,
        confidence=result.confidence,
        converter=s.converter,
        input_sha256=result.input_sha256 or None,
    )


def report_json(report: VolumetryReport) -> dict[str, Any]:
    """The volumetry of a source as one JSON document (``cohortflow volumetry --json``)."""
    return {
        "method": METHOD,
        "method_version": METHOD_VERSION,
        "parameters": report.parameters.as_dict(),
        "counts": {v.value: len(report.with_verdict(v)) for v in Verdict},
        "results": [
            {
                "image": str(r.source.image),
                "name": r.source.name,
                "series": r.source.series,
                "study": r.source.study,
                "protocol": r.source.protocol,
                "converter": r.source.converter,
                "volumes": asdict(r.volumes) if r.volumes is not None else None,
                "verdict": r.verdict.value,
                "reason": r.reason.check if r.reason else None,
                "confidence": r.confidence,
                "findings": [f.as_dict() for f in r.findings],
                "overlay": str(r.overlay) if r.overlay else None,
                "labels": str(r.labels) if r.labels else None,
                "metrics": metrics(r),
            }
            for r in report.results
        ],
        "not_measured": [
            {"name": n, "reason": code, "message": msg} for n, code, msg in report.not_measured
        ],
        "not_inputs": [
            {"folder": f, "description": d, "why": why, "files": n}
            for f, d, why, n in report.not_inputs
        ],
        "files": report.files,
        "skipped": [asdict(k) for k in report.skipped],
    }
