"""Header and image QC of every series in a folder: the QC stages as plain Python.

Per study, the protocol (given, or the one whose study-description patterns match) decides which
series are checked and in which role (its include rules, as at selection). Each checked series
gets a header QC outcome; series of a role with image QC (the 3D T1) also get an image QC
outcome. Then each image metric is compared with the series of the same protocol and scanner
seen so far (robust z-score). A failure in one series never stops the others.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cohortflow.models.database import IndexDB
from cohortflow.models.errors import GeometryError
from cohortflow.models.geometry import planes_of, reference_volume, stack_pixels
from cohortflow.models.scanners import KnownScanners
from cohortflow.models.series import NotTaken, SeriesDescriptor
from cohortflow.models.settings import Settings
from cohortflow.models.stages import StageRecord, cohort_metrics, record_stages
from cohortflow.pipelines.atlas.template import Template
from cohortflow.pipelines.dicom.cleaner import Cleaner, dataset_cleaner
from cohortflow.pipelines.dicom.header import attributes
from cohortflow.pipelines.dicom.identified import for_deidentified_side, is_deidentified
from cohortflow.pipelines.dicom.keys import ProjectKey
from cohortflow.pipelines.dicom.protocols import Protocol, ProtocolSet
from cohortflow.pipelines.dicomfolder import (
    FolderFile,
    SkippedFile,
    first_header,
    has_header,
    index_folder,
    series_number,
    with_transfer_syntax,
)
from cohortflow.pipelines.imaging.register import HeadFit
from cohortflow.pipelines.quality.brain import place_brain
from cohortflow.pipelines.safeio import RefusedError, read_regular
from cohortflow.qc.findings import Finding, Verdict, reason, stage_row, verdict
from cohortflow.qc.header import SeriesFile, check_series, check_study, header_text
from cohortflow.qc.image import check_image
from cohortflow.qc.outliers import outlier_findings

log = logging.getLogger(__name__)

HEADER, IMAGE = "header_qc", "image_qc"
#: Changes when a check or metric changes meaning: results of another version are redone.
#: 2: in a protocol run the brain mask is placed with defacing's head fit (3 mm, polished);
#: elsewhere the affine's starts are compared at its coarse level
METHOD_VERSION = "qc-2"

#: Image metrics stored so far for a protocol and scanner model: (protocol, manufacturer,
#: model) -> the metrics of each series, the series being checked left out.
History = Callable[[str, str, str, frozenset[str]], list[Mapping[str, object]]]


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    verdict: Verdict
    findings: tuple[Finding, ...]
    metrics: dict[str, float | str | None]
    seconds: float

    @property
    def reason(self) -> Finding | None:
        return reason(self.findings)


@dataclass(frozen=True)
class SeriesQc:
    """The QC outcomes of one series; scanner and protocol say which cohort it is compared with."""

    study: str  # StudyInstanceUID
    series: str  # SeriesInstanceUID
    folder: str  # folder of its files, relative to the folder checked
    description: str
    protocol: str
    role: str
    manufacturer: str
    model: str
    software_versions: str
    #: SHA-256 over the SHA-256 of each file, sorted: the same files, the same key
    input_sha256: str
    stages: tuple[StageOutcome, ...]
    #: why the protocol took the series in its role (the role's evidence from the header)
    evidence: str = ""
    #: the input files of the series (damaged ones included): every file is accounted for
    files: int = 0
    #: for a series that was not de-identified, the cleaner of its identifiers: its results
    #: are recorded under the pseudonymized UIDs, cleaned (pipelines/dicom/identified.py)
    identified: Cleaner | None = field(default=None, compare=False, repr=False)

    @property
    def verdict(self) -> Verdict:
        return verdict(f for s in self.stages for f in s.findings)

    @property
    def reason(self) -> Finding | None:
        return reason([f for s in self.stages for f in s.findings])

    def stage(self, name: str) -> StageOutcome | None:
        return next((s for s in self.stages if s.stage == name), None)


@dataclass
class QcReport:
    series: list[SeriesQc] = field(default_factory=list)
    not_checked: list[NotTaken] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def with_verdict(self, wanted: Verdict) -> list[SeriesQc]:
        return [s for s in self.series if s.verdict is wanted]


def qc_folder(
    source: Path,
    protocols: ProtocolSet,
    scanners: KnownScanners | None,
    template: Callable[[], Template],
    protocol: str | None = None,
    history: History | None = None,
    progress: Callable[[SeriesQc | NotTaken], None] | None = None,
    fits: Mapping[str, HeadFit] | None = None,
    expect: Callable[[int], None] | None = None,
) -> QcReport:
    """Check every series of every study under ``source``. ``template`` loads the brain
    template on first need (folders without a T1 never pay for it); ``progress`` hears of each
    series as it is done (before the outlier comparison, which needs them all); ``fits``: the
    heads defacing fitted, by frame of reference (image QC places its brain mask with them);
    ``expect`` hears how many series there are once the folder is read."""
    report = QcReport()
    studies = index_folder(source, report.skipped, keep_damaged=True)
    if expect is not None:
        expect(sum(len(series) for series in studies.values()))
    # a folder holding one series' files is that series, not its study: the study-level check
    # (are the required series there?) cannot be made
    single_series = len(studies) == 1 and all(
        len(series) == 1 and all(e.relative.parent == Path() for s in series.values() for e in s)
        for series in studies.values()
    )
    for study_uid, series in studies.items():
        items = qc_study(
            study_uid, series, protocols, scanners, template, protocol, not single_series, fits
        )
        for item in items:
            if isinstance(item, SeriesQc):
                report.series.append(item)
            else:
                report.not_checked.append(item)
            if progress is not None:
                progress(item)
    report.series = add_outliers(report.series, protocols, history)
    return report


def qc_study(
    study_uid: str,
    series: Mapping[str, list[FolderFile]],
    protocols: ProtocolSet,
    scanners: KnownScanners | None,
    template: Callable[[], Template],
    protocol_name: str | None = None,
    whole_study: bool = True,
    fits: Mapping[str, HeadFit] | None = None,
) -> list[SeriesQc | NotTaken]:
    """QC of one study's series (never raises for a series). ``whole_study``: the series given
    are all the study has, so a missing required series is a finding."""
    ordered = sorted(series.items(), key=lambda item: (series_number(item[1]), item[0]))
    readable = [(uid, e) for uid, e in ordered if has_header(e)]
    out: list[SeriesQc | NotTaken] = []
    for uid, entries in ordered:
        if not has_header(entries):
            out.append(
                NotTaken(
                    study_uid,
                    uid,
                    str(entries[0].relative.parent),
                    "",
                    "unreadable",
                    f"none of its {len(entries)} file(s) can be read: {entries[0].damage}",
                    len(entries),
                )
            )
    if not readable:
        return out
    description = header_text(first_header(readable[0][1]), "StudyDescription")
    protocol = protocols.choose(protocol_name, description)
    checked: list[tuple[str, list[FolderFile], str, str]] = []
    for uid, entries in readable:
        header = first_header(entries)
        decision = protocol.classify_series(attributes(header, sorted(protocol.series_fields())))
        if decision.selected:
            checked.append((uid, entries, decision.rule, decision.why))
            continue
        code = "not_selected"
        why = f"not selected by protocol {protocol.name} ({decision.rule}: {decision.why})"
        what = header_text(header, "SeriesDescription")
        folder = str(entries[0].relative.parent)
        out.append(NotTaken(study_uid, uid, folder, what, code, why, len(entries)))
    if not checked:
        return out
    study_findings = (
        check_study((role for _, _, role, _ in checked), protocol.require, protocol.qc)
        if whole_study
        else []
    )
    for uid, entries, role, evidence in checked:
        try:
            result = qc_series(
                study_uid, uid, entries, protocol, role, scanners, template, study_findings, fits
            )
        except Exception as exc:  # one series must never stop the others
            log.exception("qc: series %s failed", uid)
            result = _internal_error(study_uid, uid, entries, protocol, role, exc)
        out.append(replace(result, evidence=evidence))
    return out


def qc_series(
    study_uid: str,
    uid: str,
    entries: list[FolderFile],
    protocol: Protocol,
    role: str,
    scanners: KnownScanners | None,
    template: Callable[[], Template],
    study_findings: Sequence[Finding] = (),
    fits: Mapping[str, HeadFit] | None = None,
) -> SeriesQc:
    """Header QC of one series and, for a role with image QC, image QC."""
    from cohortflow.pipelines.dicom.reader import classify

    policy = protocol.qc
    wants_image = policy.role(role).image
    start = time.perf_counter()
    files: list[SeriesFile] = []
    digests = []
    for entry in entries:
        shown = str(entry.relative)
        if entry.damage is not None:
            files.append(SeriesFile(shown, None, entry.damage))
            continue
        try:
            data, _ = read_regular(entry.path)
        except RefusedError as refused:
            files.append(SeriesFile(shown, None, refused.reason))
            continue
        digests.append(hashlib.sha256(data).hexdigest())
        verdict_ = classify(data)
        if not verdict_.readable:
            files.append(SeriesFile(shown, None, verdict_.reason or verdict_.status.value))
        elif wants_image:
            files.append(SeriesFile(shown, with_transfer_syntax(verdict_.full_dataset(data))))
        else:
            files.append(SeriesFile(shown, verdict_.dataset))
    header_result = check_series(files, policy, role, scanners)
    header_findings = (*header_result.findings, *study_findings)
    stages = [
        StageOutcome(
            HEADER,
            verdict(header_findings),
            header_findings,
            header_result.metrics,
            round(time.perf_counter() - start, 3),
        )
    ]
    if wants_image:
        stages.append(image_stage(files, protocol, template, fits))
    first = first_header(entries)
    return SeriesQc(
        study=study_uid,
        series=uid,
        folder=str(entries[0].relative.parent),
        description=header_text(first, "SeriesDescription"),
        protocol=protocol.name,
        role=role,
        manufacturer=header_text(first, "Manufacturer"),
        model=header_text(first, "ManufacturerModelName"),
        software_versions=header_text(first, "SoftwareVersions"),
        input_sha256=hashlib.sha256("".join(sorted(digests)).encode()).hexdigest(),
        stages=tuple(stages),
        files=len(entries),
        identified=None if is_deidentified(first) else dataset_cleaner(first),
    )


def image_stage(
    files: Sequence[SeriesFile],
    protocol: Protocol,
    template: Callable[[], Template],
    fits: Mapping[str, HeadFit] | None = None,
) -> StageOutcome:
    """Build the volume, place the brain template (with the head fit of its frame of reference
    when one was handed over), measure and judge the image."""
    policy = protocol.qc
    start = time.perf_counter()

    def unreadable(message: str) -> StageOutcome:
        check = "image.unreadable"
        finding = Finding(check, policy.severity_of(check), message)
        return StageOutcome(
            IMAGE, verdict([finding]), (finding,), {}, round(time.perf_counter() - start, 3)
        )

    datasets = []
    seen: set[str] = set()
    for f in files:
        if f.dataset is None:
            continue
        sop = str(f.dataset.get("SOPInstanceUID") or f.name)
        if sop not in seen:  # a file delivered twice is one image
            seen.add(sop)
            datasets.append((f.name, f.dataset))
    try:
        planes = [p for i, (_, ds) in enumerate(datasets) for p in planes_of(ds, i)]
        volume = reference_volume(planes)
    except GeometryError as exc:
        return unreadable(f"the images do not form one volume: {exc.message}")
    arrays = []
    for name, ds in datasets:
        try:
            arrays.append(np.asarray(ds.pixel_array))
        except Exception as exc:
            return unreadable(f"{name}: pixel data cannot be decoded: {type(exc).__name__}: {exc}")
    stack = stack_pixels(volume, arrays)
    frame = str(datasets[0][1].get("FrameOfReferenceUID") or "")
    handed = (fits or {}).get(frame) if frame else None
    brain = place_brain(stack, volume, template(), handed)
    spacing = (volume.slice_spacing, volume.first.spacing[0], volume.first.spacing[1])
    result = check_image(stack, spacing, brain, policy)
    metrics: dict[str, float | str | None] = dict(result.metrics)
    return StageOutcome(
        IMAGE,
        verdict(result.findings),
        result.findings,
        metrics,
        round(time.perf_counter() - start, 3),
    )


def _internal_error(
    study_uid: str,
    uid: str,
    entries: list[FolderFile],
    protocol: Protocol,
    role: str,
    exc: Exception,
) -> SeriesQc:
    finding = Finding(
        "qc.internal_error",
        protocol.qc.severity_of("qc.internal_error"),
        f"QC could not run: {type(exc).__name__}: {exc}",
    )
    first = first_header(entries)
    return SeriesQc(
        study_uid,
        uid,
        str(entries[0].relative.parent),
        header_text(first, "SeriesDescription"),
        protocol.name,
        role,
        header_text(first, "Manufacturer"),
        header_text(first, "ManufacturerModelName"),
        header_text(first, "SoftwareVersions"),
        "",
        (StageOutcome(HEADER, Verdict.FAIL, (finding,), {}, 0.0),),
        files=len(entries),
    )


def add_outliers(
    results: list[SeriesQc], protocols: ProtocolSet, history: History | None
) -> list[SeriesQc]:
    """Compare each series' image metrics with its protocol and scanner model: the series seen
    before (``history``) and those of this run."""
    groups: dict[tuple[str, str, str], list[SeriesQc]] = defaultdict(list)
    for r in results:
        if r.stage(IMAGE) is not None:
            groups[(r.protocol, r.manufacturer, r.model)].append(r)
    replaced: dict[str, SeriesQc] = {}
    for (protocol_name, manufacturer, model), members in groups.items():
        policy = protocols.get(protocol_name).qc
        here = frozenset(r.series for r in members)
        earlier = history(protocol_name, manufacturer, model, here) if history else []
        everything = [*earlier, *(r.stage(IMAGE).metrics for r in members)]  # type: ignore[union-attr]
        pools = {
            name: [float(v) for m in everything if isinstance(v := m.get(name), (int, float))]
            for name in policy.outliers.metrics
        }
        group = f"{protocol_name} on {manufacturer} {model}".strip()
        for r in members:
            image = r.stage(IMAGE)
            assert image is not None
            extra = outlier_findings(image.metrics, pools, policy, group)
            if not extra:
                continue
            findings = (*image.findings, *extra)
            updated = replace(image, findings=findings, verdict=verdict(findings))
            stages = tuple(updated if s.stage == IMAGE else s for s in r.stages)
            replaced[r.series] = replace(r, stages=stages)
    return [replaced.get(r.series, r) for r in results]


def stage_records(result: SeriesQc) -> list[StageRecord]:
    """The index rows of one series' QC outcomes."""
    return [
        stage_row(
            stage,
            stage=stage.stage,
            method_version=METHOD_VERSION,
            series=result.series,
            study=result.study,
            describe=SeriesDescriptor.of_record(result),
            metrics=stage.metrics,
            input_sha256=result.input_sha256,
            seconds=stage.seconds,
        )
        for stage in result.stages
    ]


def qc_configured(
    settings: Settings,
    source: Path,
    index: IndexDB | None,
    protocol: str | None = None,
    protocols_file: Path | None = None,
    record: bool = True,
    progress: Callable[[SeriesQc | NotTaken], None] | None = None,
    expect: Callable[[int], None] | None = None,
) -> QcReport:
    """QC with the project's settings: its protocols, known scanners and cached brain template;
    compared with the series in the archive index (when given) and recorded there (when
    ``record``)."""
    from functools import cache

    from cohortflow.models.scanners import load_known_scanners
    from cohortflow.pipelines.atlas.template import load_brain_template
    from cohortflow.pipelines.dicom.protocols import load_protocols

    protocols = load_protocols(protocols_file or settings.protocols_file)
    if protocol is not None:
        protocols.get(protocol)  # an unknown name is a usage error before any work
    scanners = load_known_scanners(settings.known_scanners_file)
    template = cache(lambda: load_brain_template(settings.cache).keeping_fits(settings.fits))
    history: History | None = None
    if index is not None:
        db = index

        def history(
            protocol: str, manufacturer: str, model: str, here: frozenset[str]
        ) -> list[Mapping[str, object]]:
            with db.session() as session:
                return cohort_metrics(session, IMAGE, protocol, manufacturer, model, here)

    report = qc_folder(
        source, protocols, scanners, template, protocol, history, progress, expect=expect
    )
    if index is not None and record:
        cleaners = {r.series: r.identified for r in report.series if r.identified is not None}
        rows = for_deidentified_side(
            [row for r in report.series for row in stage_records(r)],
            cleaners,
            lambda: ProjectKey.load(str(settings.pseudonym_key_source)).uid,
        )
        with index.session() as session:
            record_stages(session, rows)
    return report
