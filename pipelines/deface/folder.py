"""Deface every series of a folder of DICOM studies into another folder.

Per study: pydeface's template is registered (affine, antspyx) to the study's 3D T1, chosen by
the protocols' ``t1_3d`` rule. Every series sharing the T1's frame of reference is then masked
plane by plane in its own geometry: face pixels are set to the series' background value, except
inside the intracranial mask grown by a safety margin. Each series is checked on the pixels
written (no intracranial pixel changed, the face region removed) before its files are written;
a series that fails a check, or cannot be placed, is not written and is reported with a reason.

Output files keep their path relative to the input folder, their UIDs, and gain
RecognizableVisualFeatures NO plus the CID 7050 code of the Clean Recognizable Visual Features
Option. Writing is atomic per file and deterministic, so a rerun overwrites rather than
duplicates.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from cohortflow.models.errors import GeometryError, ReasonError
from cohortflow.models.geometry import (
    Plane,
    plane_pixels,
    planes_of,
    reference_volume,
    stack_pixels,
)
from cohortflow.models.settings import DefaceSettings, Settings
from cohortflow.pipelines.atlas import masks
from cohortflow.pipelines.atlas.template import BRAIN, BROW, Template
from cohortflow.pipelines.deface import surface
from cohortflow.pipelines.deface.errors import DefaceError
from cohortflow.pipelines.deface.previews import (
    Previews,
    sheet_names,
    study_folder,
    write_previews,
)
from cohortflow.pipelines.dicom.header import attributes
from cohortflow.pipelines.dicom.protocols import ProtocolSet
from cohortflow.pipelines.dicomfolder import (
    FolderFile,
    SkippedFile,
    first_header,
    index_folder,
    read_instance,
    series_number,
)
from cohortflow.pipelines.imaging.register import Fit, HeadFit, fit_affine
from cohortflow.pipelines.safeio import printable_path

log = logging.getLogger(__name__)

METHOD_TEXT = "cohortflow deface: pydeface face mask, antspyx affine"
CLEAN_VISUAL_FEATURES = ("113102", "DCM", "Clean Recognizable Visual Features Option")

#: Is this header the study's reference T1?
ReferenceRule = Callable[[Dataset], bool]


def reference_rule(protocols: ProtocolSet, role: str) -> ReferenceRule:
    """The protocols' rule for ``role`` (exclusions first), applied to a series' header."""
    protocol = protocols.with_role(role)
    keywords = sorted(protocol.series_fields())

    def is_reference(header: Dataset) -> bool:
        decision = protocol.classify_series(attributes(header, keywords))
        return decision.selected and decision.rule == role

    return is_reference


@dataclass(frozen=True)
class SeriesOutcome:
    study: str  # StudyInstanceUID
    series: str  # SeriesInstanceUID
    folder: str  # folder of its first file, relative to the input
    status: str  # defaced, excluded (cannot be defaced safely), failed (a check failed)
    reason_code: str | None = None
    reason: str | None = None
    reference: str | None = None  # SeriesInstanceUID of the T1 the template was fitted to
    instances: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    #: its review sheets (``deface.previews``), where previews were asked for and drawn
    previews: Previews | None = None


@dataclass
class DefaceReport:
    series: list[SeriesOutcome] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    #: each study's head as fitted, for the stages after defacing (image QC)
    fits: list[HeadFit] = field(default_factory=list)

    def with_status(self, status: str) -> list[SeriesOutcome]:
        return [s for s in self.series if s.status == status]


@dataclass(frozen=True)
class _Reference:
    series: str
    frame_of_reference: str | None
    fit: Fit
    metrics: dict[str, float]
    datasets: list[Dataset]
    #: the front of the reference T1's head: how deep the brow is removed, on every series of
    #: the frame (the same head in the same place)
    skin: surface.FrontSkin
    head: npt.NDArray[np.bool_]  # the reference T1's head on the LPS grid, for its renders


#: the template, or what loads it when a study first needs it (a folder with no 3D T1 then
#: never loads it: building the model the first time takes minutes and 1.5 GB)
TemplateSource = Template | Callable[[], Template]


def deface_folder(
    source: Path,
    out_root: Path,
    template: TemplateSource,
    settings: DefaceSettings,
    is_reference: ReferenceRule,
    previews: Path | None = None,
    progress: Callable[[SeriesOutcome], None] | None = None,
    expect: Callable[[int], None] | None = None,
) -> DefaceReport:
    """Deface the series of every study under ``source`` into ``out_root``; with
    ``previews``, each defaced series' review sheets go there (``deface.previews``: the face
    shows on them, so a restricted folder). ``progress`` hears of each series as it is done,
    ``expect`` of how many there are once the folder is read."""
    report = DefaceReport()
    studies = index_folder(source, report.skipped)
    if expect is not None:
        expect(sum(len(series) for series in studies.values()))
    for study_uid, series in studies.items():
        outcomes, fit = deface_study(
            study_uid, series, out_root, template, settings, is_reference, previews
        )
        if fit is not None:
            report.fits.append(fit)
        for outcome in outcomes:
            report.series.append(outcome)
            if progress is not None:
                progress(outcome)
    return report


def deface_configured(
    settings: Settings,
    source: Path,
    out_root: Path,
    previews: Path | None = None,
    progress: Callable[[SeriesOutcome], None] | None = None,
    expect: Callable[[int], None] | None = None,
) -> DefaceReport:
    """Deface with the project's settings: its protocols' reference rule, the cached template."""
    from cohortflow.pipelines.atlas.template import load_template
    from cohortflow.pipelines.dicom.protocols import load_protocols

    policy = settings.deface
    is_reference = reference_rule(load_protocols(settings.protocols_file), policy.reference_rule)
    template = functools.cache(
        lambda: load_template(
            settings.cache, policy.brain_margin_mm, policy.face_margin_mm, policy.brow_mm
        ).keeping_fits(settings.fits)
    )
    return deface_folder(
        source, out_root, template, policy, is_reference, previews, progress, expect
    )


def deface_study(
    study_uid: str,
    series: dict[str, list[FolderFile]],
    out_root: Path,
    source: TemplateSource,
    settings: DefaceSettings,
    is_reference: ReferenceRule,
    previews: Path | None,
) -> tuple[list[SeriesOutcome], HeadFit | None]:
    """Fit the template to the study's T1, then deface each series (never raises per series).
    Returns the series' outcomes and the fit (None where none was made, or the T1 has no frame of
    reference to share it by)."""
    ordered = sorted(series.items(), key=lambda item: (series_number(item[1]), item[0]))
    folder = {uid: str(entries[0].relative.parent) for uid, entries in ordered}

    def every(status: str, code: str, reason: str) -> list[SeriesOutcome]:
        return [
            SeriesOutcome(study_uid, uid, folder[uid], status, code, reason, instances=len(e))
            for uid, e in ordered
        ]

    candidates = [uid for uid, entries in ordered if is_reference(first_header(entries))]
    if not candidates:
        reason = (
            f"no 3D T1 (rule {settings.reference_rule}) in the study to fit the face template to"
        )
        return every("excluded", "no_reference_t1", reason), None
    template = source if isinstance(source, Template) else source()
    reference: _Reference | None = None
    problems: list[tuple[str, str]] = []
    for uid in candidates:
        try:
            reference = _fit_reference(uid, series[uid], template, settings)
            break
        except ReasonError as exc:
            log.warning("deface: study %s, T1 %s: %s", study_uid, uid, exc.message)
            problems.append((exc.code, f"T1 {uid}: {exc.message}"))
        except Exception as exc:  # a bad reference must not stop the other studies
            log.exception("deface: fitting T1 %s failed", uid)
            problems.append(("internal_error", f"T1 {uid}: {type(exc).__name__}: {exc}"))
    if reference is None:
        return every("failed", problems[-1][0], "; ".join(text for _, text in problems)), None

    # the sheets' names: from the headers as written (defacing changes none of the attributes
    # they are made of), unique within the study
    names = sheet_names({uid: first_header(entries) for uid, entries in ordered})
    shown = previews / study_folder(study_uid) if previews is not None else None
    outcomes = []
    for uid, entries in ordered:
        start = time.perf_counter()
        try:
            outcome = _deface_series(
                study_uid,
                uid,
                entries,
                reference,
                out_root,
                template,
                settings,
                (shown, names[uid]) if shown is not None else None,
            )
        except ReasonError as exc:
            outcome = SeriesOutcome(
                study_uid,
                uid,
                folder[uid],
                "excluded",
                exc.code,
                exc.message,
                reference.series,
                len(entries),
            )
        except Exception as exc:  # one series must never stop the others
            log.exception("deface: series %s failed", uid)
            outcome = SeriesOutcome(
                study_uid,
                uid,
                folder[uid],
                "failed",
                "internal_error",
                f"{type(exc).__name__}: {exc}",
                reference.series,
                len(entries),
            )
        seconds = time.perf_counter() - start
        if uid == reference.series:
            seconds += reference.fit.seconds
        metrics = {**outcome.metrics, **reference.metrics, "seconds": round(seconds, 3)}
        outcomes.append(replace(outcome, metrics=metrics))
    fit = None
    if reference.frame_of_reference:
        fit = HeadFit.of(
            reference.frame_of_reference, reference.series, reference.fit, template.digest
        )
    return outcomes, fit


def _load(entries: list[FolderFile]) -> list[Dataset]:
    datasets = []
    for entry in entries:
        try:
            datasets.append(read_instance(entry.path))
        except Exception as exc:
            raise DefaceError(
                "unreadable", f"{printable_path(str(entry.path))}: {type(exc).__name__}: {exc}"
            ) from exc
    return datasets


def _pixels(ds: Dataset, where: str) -> npt.NDArray[np.generic]:
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise DefaceError("unreadable_pixels", f"{where}: pixel data: {exc}") from exc
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise DefaceError("not_grayscale", f"{where}: colour images are not defaced")
    return np.asarray(arr)


def _all_planes(datasets: list[Dataset]) -> list[Plane]:
    return [p for i, ds in enumerate(datasets) for p in planes_of(ds, i)]


def _fit_reference(
    uid: str, entries: list[FolderFile], template: Template, settings: DefaceSettings
) -> _Reference:
    datasets = _load(entries)
    volume = reference_volume(_all_planes(datasets))
    arrays = [
        _pixels(ds, printable_path(str(e.path))) for ds, e in zip(datasets, entries, strict=True)
    ]
    stack = stack_pixels(volume, arrays)
    fit = fit_affine(
        np.transpose(stack, (2, 1, 0)),  # ITK index order: column, row, slice
        volume.first.origin,
        volume.spacing,
        volume.direction,
        str(template.head_path),
        store=template.fits,
    )
    to_lps = volume.index_to_lps()
    polished, moves = masks.polish(stack, to_lps, fit.subject_to_template, template)
    fit = replace(fit, subject_to_template=polished)
    placement = replace(
        masks.check_placement(stack, to_lps, fit.subject_to_template, template), polished=moves
    )
    if placement.correlation < settings.min_correlation:
        raise DefaceError(
            "registration_failed",
            f"the template matches the image poorly after registration (r = "
            f"{placement.correlation:.2f}, minimum {settings.min_correlation})",
        )
    if placement.neighbour_gain > settings.max_neighbour_gain:
        raise DefaceError(
            "registration_failed",
            f"the registration stopped short: the template moved ({placement.neighbour}) "
            f"matches better (r {placement.correlation:.3f} -> "
            f"{placement.correlation + placement.neighbour_gain:.3f})",
        )
    brain = np.stack(
        [
            masks.plane_labels(template, fit.subject_to_template, p) & BRAIN > 0
            if p is not None
            else np.zeros((volume.first.rows, volume.first.columns), bool)
            for p in volume.planes
        ]
    )
    on_tissue = masks.brain_on_tissue(stack, brain)
    if on_tissue < settings.min_brain_on_tissue:
        raise DefaceError(
            "registration_failed",
            f"only {on_tissue:.0%} of the warped intracranial mask lies on the head (minimum "
            f"{settings.min_brain_on_tissue:.0%}): the template landed off the brain",
        )
    grid, low = surface.to_lps_grid(stack, to_lps)
    head = surface.head_mask(grid)
    header = first_header(entries)
    return _Reference(
        series=uid,
        frame_of_reference=str(header.get("FrameOfReferenceUID") or "") or None,
        fit=fit,
        metrics={
            "correlation": round(placement.correlation, 4),
            "polish_moves": len(placement.polished),
            "neighbour_gain": round(placement.neighbour_gain, 4),
            "brain_on_tissue": round(on_tissue, 4),
            "registration_seconds": round(fit.seconds, 2),
            "registration_stored": float(fit.cached),  # 1: read from the fit store
        },
        datasets=datasets,
        skin=surface.front_skin(head, low),
        head=head,
    )


def _deface_series(
    study_uid: str,
    uid: str,
    entries: list[FolderFile],
    reference: _Reference,
    out_root: Path,
    template: Template,
    settings: DefaceSettings,
    previews: tuple[Path, str] | None,
) -> SeriesOutcome:
    """Deface one series; with ``previews`` (a folder and a name), draw its review sheets."""
    folder = str(entries[0].relative.parent)
    if uid != reference.series:
        own = str(first_header(entries).get("FrameOfReferenceUID") or "") or None
        if own is None or own != reference.frame_of_reference:
            why = (
                "has no FrameOfReferenceUID"
                if own is None
                else "lies in another frame of reference than the T1 the template was fitted to"
            )
            raise DefaceError(
                "other_frame_of_reference", f"{why}: the face mask cannot be placed on it"
            )
    datasets = reference.datasets if uid == reference.series else _load(entries)
    planes = _all_planes(datasets)
    where = [printable_path(str(e.path)) for e in entries]
    before = [_pixels(ds, w) for ds, w in zip(datasets, where, strict=True)]
    fill = min(0, *(int(a.min()) for a in before))
    after = [a.copy() for a in before]
    removed = [np.zeros(a.shape, dtype=bool) for a in before]  # what was emptied, for the sheet
    tally = masks.Tally()
    matrix = reference.fit.subject_to_template
    for plane in planes:
        labels = masks.plane_labels(template, matrix, plane)
        if (labels & BROW).any():  # most planes hold none
            depth = reference.skin.depth(masks.plane_points(plane))
            with np.errstate(invalid="ignore"):  # NaN: outside the reference's field, kept
                labels = masks.brow_near_skin(labels, depth <= settings.brow_depth_mm)
        src = plane_pixels(before[plane.instance], plane)
        out = masks.deface_plane(src, labels, fill)
        tally.add(src, out, labels, fill)
        if plane.frame is None:
            after[plane.instance] = out
            removed[plane.instance] = masks.removal_mask(labels)
        else:
            after[plane.instance][plane.frame] = out
            removed[plane.instance][plane.frame] = masks.removal_mask(labels)
    metrics = {
        "face_voxels": float(tally.face_voxels),
        "face_removed_fraction": round(tally.face_removed_fraction, 5),
        "brain_voxels": float(tally.brain_voxels),
        "brain_changed": float(tally.brain_changed),
        "changed_voxels": float(tally.changed),
    }

    def failed(code: str, reason: str) -> SeriesOutcome:
        return SeriesOutcome(
            study_uid, uid, folder, "failed", code, reason, reference.series, len(entries), metrics
        )

    if tally.brain_changed:
        return failed(
            "brain_altered", f"{tally.brain_changed} intracranial voxels would change: not written"
        )
    if tally.face_removed_fraction < settings.min_face_removed:
        return failed(
            "face_not_removed",
            f"only {tally.face_removed_fraction:.1%} of the face region removed (minimum "
            f"{settings.min_face_removed:.0%}): the intracranial margin overlaps the face",
        )
    skin = _skin_surfaces(planes, reference.head, after) if uid == reference.series else None
    if skin is not None:
        for name, value in (
            ("nose_before_mm", skin.nose_before),
            ("nose_after_mm", skin.nose_after),
        ):
            if value is not None:
                metrics[name] = value
        if skin.nose_after is not None and skin.nose_after > settings.max_nose_mm:
            return failed(
                "face_features_left",
                f"the defaced skin surface still shows a nose: it stands out "
                f"{skin.nose_after:.0f} mm from the face profile and the cheeks (maximum "
                f"{settings.max_nose_mm:g} mm; measured on the surface, not with the template)",
            )
    for ds, arr, entry in zip(datasets, after, entries, strict=True):
        _write(ds, arr, out_root / entry.relative)
    shown = None
    if previews is not None:
        heads = (reference.head, skin.head_after) if skin is not None else None
        shown = write_previews(
            *previews, planes, before, after, removed, matrix, template, heads=heads
        )
    return SeriesOutcome(
        study_uid,
        uid,
        folder,
        "defaced",
        None,
        None,
        reference.series,
        len(entries),
        metrics,
        shown,
    )


@dataclass(frozen=True)
class _Skin:
    """The reference T1's head after defacing (on the LPS grid of its head before) and how far
    its nose stood out before and after."""

    head_after: npt.NDArray[np.bool_]
    nose_before: float | None
    nose_after: float | None


def _skin_surfaces(
    planes: list[Plane], head_before: npt.NDArray[np.bool_], after: list[npt.NDArray[np.generic]]
) -> _Skin | None:
    """Find the head after defacing and measure the nose before (``head_before``: the
    reference's head on the LPS grid) and after (None for an irregular stack)."""
    try:
        volume = reference_volume(planes)
    except GeometryError:
        return None
    grid, _ = surface.to_lps_grid(stack_pixels(volume, after), volume.index_to_lps())
    head_after = surface.head_mask(grid)
    return _Skin(
        head_after, surface.nose_protrusion(head_before), surface.nose_protrusion(head_after)
    )


def mark_defaced(ds: Dataset) -> None:
    """Record in the header that recognizable visual features were removed (PS3.15 E.3.2)."""
    ds.RecognizableVisualFeatures = "NO"
    method = ds.get("DeidentificationMethod")
    if method is None:
        values = []
    elif isinstance(method, MultiValue):
        values = [str(v) for v in method]
    else:
        values = [str(method)]
    if METHOD_TEXT not in values:
        ds.DeidentificationMethod = [*values, METHOD_TEXT] if values else METHOD_TEXT
    codes = ds.get("DeidentificationMethodCodeSequence")
    if codes is None:
        codes = DicomSequence()
        ds.DeidentificationMethodCodeSequence = codes
    if not any(str(item.get("CodeValue")) == CLEAN_VISUAL_FEATURES[0] for item in codes):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = CLEAN_VISUAL_FEATURES
        codes.append(item)


def _write(ds: Dataset, pixels: npt.NDArray[np.generic], out: Path) -> None:
    bits = int(ds.get("BitsStored") or pixels.dtype.itemsize * 8)
    ds.set_pixel_data(
        pixels,
        str(ds.get("PhotometricInterpretation") or "MONOCHROME2"),
        bits,
        generate_instance_uid=False,
    )
    mark_defaced(ds)
    meta = ds.file_meta if getattr(ds, "file_meta", None) else FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(out.name + ".part")
    ds.save_as(temp, enforce_file_format=True)
    temp.replace(out)
