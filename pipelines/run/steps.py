"""The steps of a protocol run for one study, each resumable.

Order: anonymize -> deface -> qc (header and image) -> convert -> volumetry -> release (the
release check of everything the study's steps delivered). Each step:

- derives its ``input_key`` from the previous step's key, its own method version and the
  settings it depends on (the first key hashes the study's archived content and the project
  key's fingerprint), so equal keys mean equal outputs;
- returns the stored outcome when the index holds a ``done`` row with that key whose outputs
  still exist, and otherwise runs, records its series' stage results and then its own row;
- never raises for the study: an exception becomes an ``error`` row (redone by the next run)
  and the later steps of that study are not started.

What a step returns (:class:`StepResult`) travels through Prefect: the study's index row number
and its work order (:class:`~pipelines.run.workorder.WorkOrder`: pseudonymized UIDs, roles,
scanners, paths and the head fit only). The link from the identified series to the
pseudonymized ones stays in the index (``study_steps.outputs``, identified side).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select

from cohortflow.models.database import IndexDB
from cohortflow.models.errors import CohortflowError
from cohortflow.models.outcomes import SERIES_STAGES, latest_selection
from cohortflow.models.runs import DONE, ERROR, StepRecord, record_step, step_record, step_records
from cohortflow.models.schema import SelectedSeries
from cohortflow.models.series import SeriesDescriptor
from cohortflow.models.settings import Settings
from cohortflow.models.stages import StageRecord, record_stages, stage_records
from cohortflow.pipelines.archive.store import ArchiveStore
from cohortflow.pipelines.run.plan import StudyPlan, plan_studies, plan_study
from cohortflow.pipelines.run.workorder import WorkOrder

log = logging.getLogger(__name__)

ANONYMIZE, DEFACE, QC, CONVERT, VOLUMETRY = "anonymize", "deface", "qc", "convert", "volumetry"
RELEASE = "release"
STEPS = (ANONYMIZE, DEFACE, QC, CONVERT, VOLUMETRY, RELEASE)
#: a study whose earlier step did not finish: this step was not started
BLOCKED = "blocked"


@dataclass(frozen=True)
class StepResult:
    """A step's outcome for one study: no identifier, only the pseudonymized work order."""

    study_pk: int
    step: str
    status: str  # done, error, blocked
    input_key: str = ""
    order: WorkOrder = field(default_factory=WorkOrder)
    reused: bool = False  # done by an earlier run with the same input: skipped
    seconds: float = 0.0
    reason_code: str | None = None
    message: str | None = None

    @property
    def done(self) -> bool:
        return self.status == DONE


@dataclass(frozen=True)
class RunContext:
    """What every step of one run needs: settings, protocol, the selection, the run's row."""

    settings: Settings
    protocol: str
    selection_id: int
    run_id: int | None = None
    #: the de-identification profile file (None: the shipped one)
    profile: Path | None = None

    def study_folder(self, plan: StudyPlan) -> Path:
        """The restricted working folder of one study (named by a hash, not its UID)."""
        name = hashlib.sha256(plan.study_uid.encode()).hexdigest()[:20]
        return self.settings.home / "restricted" / "runs" / self.protocol / name

    @property
    def dicom_out(self) -> Path:
        return self.settings.outputs / self.protocol / "dicom"

    @property
    def nifti_out(self) -> Path:
        return self.settings.outputs / self.protocol / "nifti"

    @property
    def volumetry_out(self) -> Path:
        return self.settings.outputs / self.protocol / "volumetry"

    @property
    def qc_images_out(self) -> Path:
        """Pictures for the QC dashboard (pseudonymized: defaced images only)."""
        return qc_images(self.settings, self.protocol)


def qc_images(settings: Settings, protocol: str) -> Path:
    return settings.outputs / protocol / "qc-images"


def chain(*parts: object) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _run_step(
    ctx: RunContext,
    index: IndexDB,
    plan: StudyPlan,
    step: str,
    input_key: str,
    method_version: str,
    work: Callable[[], tuple[WorkOrder, dict[str, Any]]],
    still_valid: Callable[[WorkOrder], bool] = lambda _: True,
) -> StepResult:
    """Skip, or run ``work`` (returning the study's work order and the identified-side extras)
    and record the step's row."""
    with index.session() as session:
        known = step_record(session, ctx.protocol, plan.study_uid, step)
    if (
        known is not None
        and known.status == DONE
        and known.input_key == input_key
        and known.method_version == method_version
        and still_valid(stored := WorkOrder.from_json(known.outputs))
    ):
        return StepResult(plan.pk, step, DONE, input_key, stored, reused=True)
    start, cpu = time.perf_counter(), time.process_time()
    status, code, message = DONE, None, None
    order = WorkOrder()
    extra: dict[str, Any] = {}
    try:
        order, extra = work()
    except CohortflowError as exc:
        status, code, message = ERROR, f"{step}.error", str(exc)
    except Exception as exc:  # one study must never stop the others
        log.exception("%s of study %d failed", step, plan.pk)
        status, code, message = ERROR, f"{step}.internal_error", f"{type(exc).__name__}: {exc}"
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    with index.session() as session:
        record_step(
            session,
            StepRecord(
                ctx.protocol,
                plan.study_uid,
                step,
                input_key,
                method_version,
                status,
                code,
                message,
                {**order.to_json(), **{f"_{k}": v for k, v in extra.items()}},
                round(seconds, 3),
                ctx.run_id,
                round(cpu, 3),
            ),
        )
    return StepResult(plan.pk, step, status, input_key, order, False, seconds, code, message)


def _blocked(previous: StepResult, step: str) -> StepResult:
    return StepResult(
        previous.study_pk,
        step,
        BLOCKED,
        reason_code=previous.reason_code,
        message=f"not started: {previous.step} did not finish",
    )


def _plan(ctx: RunContext, index: IndexDB, study_pk: int) -> StudyPlan | None:
    return plan_study(
        index, ArchiveStore.of(ctx.settings), ctx.protocol, ctx.selection_id, study_pk
    )


def _not_archived(study_pk: int, step: str) -> StepResult:
    return StepResult(
        study_pk,
        step,
        ERROR,
        reason_code="run.not_archived",
        message="the study has no archived series of this selection (any more)",
    )


def study_keys(ctx: RunContext, index: IndexDB, max_studies: int | None = None) -> list[int]:
    """The index row numbers of the selection's archived studies (the first ``max_studies``
    in StudyInstanceUID order): what the flow's tasks are given instead of UIDs."""
    plans = plan_studies(index, ArchiveStore.of(ctx.settings), ctx.protocol, ctx.selection_id)
    return [p.pk for p in (plans if max_studies is None else plans[:max_studies])]


def require_selection(settings: Settings, protocol: str) -> int:
    """The latest selection of ``protocol``; CohortflowError if it has none."""
    from cohortflow.models.database import open_index

    index = open_index(settings.index)
    try:
        with index.session() as session:
            found = latest_selection(session, protocol)
    finally:
        index.dispose()
    if found is None:
        raise CohortflowError(
            f"protocol {protocol} has no selection in the index {settings.index}: run "
            f"`cohortflow select {protocol}` (or the flow with retrieval) first"
        )
    return found


def pseudonymized_series(ctx: RunContext, index: IndexDB) -> list[str]:
    """The pseudonymized UIDs of the selection's series that the run anonymized."""
    with index.session() as session:
        chosen = {
            uid
            for (uid,) in session.execute(
                select(SelectedSeries.series_instance_uid).where(
                    SelectedSeries.selection_id == ctx.selection_id
                )
            )
        }
        studies = {
            uid
            for (uid,) in session.execute(
                select(SelectedSeries.study_instance_uid).where(
                    SelectedSeries.selection_id == ctx.selection_id
                )
            )
        }
        rows = step_records(session, ctx.protocol, studies)
    linked: set[str] = set()
    for row in rows:
        if row.step == ANONYMIZE:
            mapping = dict(row.outputs.get("_linked_series", {}))
            linked.update(p for s, p in mapping.items() if s in chosen)
    return sorted(linked)


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _series_row(ctx: RunContext, describe: SeriesDescriptor, **fields: Any) -> StageRecord:
    """A stage row of the run's protocol, with the series' role and scanner (a descriptor
    stored by an earlier version carries no protocol)."""
    return StageRecord.of(replace(describe, protocol=ctx.protocol), **fields)


# --- anonymize -------------------------------------------------------------------------------


def anonymize_step(ctx: RunContext, index: IndexDB, study_pk: int) -> StepResult:
    """De-identify the study's archived files (PS3.15 profile, project key) into its restricted
    working folder; record the linkage and one ``anonymize`` stage row per series."""
    from cohortflow.pipelines.anonymize.deidentify import Deidentifier
    from cohortflow.pipelines.anonymize.files import anonymize_folder
    from cohortflow.pipelines.anonymize.profile import load_profile
    from cohortflow.pipelines.dicom.keys import ProjectKey

    plan = _plan(ctx, index, study_pk)
    if plan is None:
        return _not_archived(study_pk, ANONYMIZE)
    assert ctx.settings.pseudonym_key_source is not None
    key = ProjectKey.load(ctx.settings.pseudonym_key_source)
    profile = load_profile(ctx.profile)
    deidentifier = Deidentifier(profile, key)
    version = f"anonymize-1 {profile.sha256[:16]}"  # stage_results.method_version: 40 chars
    # the key's fingerprint: another key gives other pseudonyms (and reveals nothing of it)
    input_key = chain(plan.content_key, version, key.uid("2.25.0"))
    folder = ctx.study_folder(plan)
    out = folder / "anonymized"

    def work() -> tuple[WorkOrder, dict[str, Any]]:
        from cohortflow.models.linkage import LinkageRecord, record_linkage

        source = _fresh(folder / "archive")
        by_source: dict[str, int] = {}
        for number, series in enumerate(plan.series):
            target = source / str(number)
            target.mkdir()
            for path in series.files:
                link = target / Path(path).name
                os.symlink(path, link)
                by_source[str(link)] = number
        _fresh(out)

        def commit(records: list[LinkageRecord]) -> None:
            with index.session() as session:
                record_linkage(session, records, key.source)

        # the links lead into the archive: followed there, and nowhere else; no file is
        # published before its patient's linkage is committed
        report = anonymize_folder(
            source,
            out,
            deidentifier,
            workers=1,
            archive=ArchiveStore.of(ctx.settings),
            commit=commit,
        )
        outcomes: dict[int, Counter[str]] = {n: Counter() for n in range(len(plan.series))}
        first_problem: dict[int, tuple[str, str]] = {}
        for outcome in (*report.published, *report.excluded, *report.skipped, *report.failed):
            found = by_source.get(outcome.source)
            if found is None:
                continue
            outcomes[found][outcome.status] += 1
            if outcome.status != "written":
                first_problem.setdefault(
                    found, (f"anonymize.{outcome.reason_code}", outcome.reason or outcome.status)
                )
        series_info = {}
        rows = []
        for number, series in enumerate(plan.series):
            pseudo = deidentifier.uid(series.series_uid)
            info = SeriesDescriptor(
                ctx.protocol,
                series.role,
                series.manufacturer,
                series.model,
                series.software_versions,
            )
            series_info[pseudo] = info
            # counted, not computed: a file no outcome names was not written either
            written = outcomes[number]["written"]
            missing = len(series.files) - sum(outcomes[number].values())
            if missing:
                first_problem.setdefault(
                    number,
                    ("anonymize.not_reached", f"{missing} files of the series were not reached"),
                )
            status = "pass" if written == len(series.files) else ("warn" if written > 0 else "fail")
            code, message = first_problem.get(number, (None, None))
            rows.append(
                _series_row(
                    ctx,
                    info,
                    series_uid=pseudo,
                    study_uid=deidentifier.uid(plan.study_uid),
                    stage=ANONYMIZE,
                    status=status,
                    method_version=version,
                    reason_code=code,
                    message=message,
                    metrics={
                        "files": len(series.files),
                        **dict(outcomes[number]),
                        "written": written,
                    },
                )
            )
        with index.session() as session:
            record_stages(session, rows)
        order = WorkOrder(
            study=deidentifier.uid(plan.study_uid),
            staging=str(out),
            series=series_info,
            written=report.written,
        )
        linked = {s.series_uid: deidentifier.uid(s.series_uid) for s in plan.series}
        return order, {"linked_series": linked}

    return _run_step(
        ctx,
        index,
        plan,
        ANONYMIZE,
        input_key,
        version,
        work,
        lambda order: bool(order.staging) and Path(order.staging).is_dir(),
    )


# --- deface ----------------------------------------------------------------------------------


def _copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(target.name + ".part")
    shutil.copyfile(source, temp)
    temp.replace(target)


def deface_step(ctx: RunContext, index: IndexDB, previous: StepResult) -> StepResult:
    """Deface the anonymized study into the protocol's deliverable DICOM folder; one ``deface``
    stage row per series."""
    if not previous.done:
        return _blocked(previous, DEFACE)
    from cohortflow.pipelines.atlas.template import load_template
    from cohortflow.pipelines.deface.folder import deface_folder, reference_rule
    from cohortflow.pipelines.dicom.protocols import load_protocols

    plan = _plan(ctx, index, previous.study_pk)
    if plan is None:
        return _not_archived(previous.study_pk, DEFACE)
    policy = ctx.settings.deface
    # 2: a three-plane picture of the defaced series for the dashboard; 3: the head fits, for
    # QC, and the affine's starts compared at its coarse level; 4: the review sheet (planes
    # through the eyes, the skin surface from three sides), its after panels the dashboard's
    version = "deface-4"
    input_key = chain(previous.input_key, version, policy.model_dump(mode="json"))
    order = previous.order
    staging = Path(order.staging)

    def work() -> tuple[WorkOrder, dict[str, Any]]:
        is_reference = reference_rule(
            load_protocols(ctx.settings.protocols_file), policy.reference_rule
        )
        template = load_template(
            ctx.settings.cache, policy.brain_margin_mm, policy.face_margin_mm, policy.brow_mm
        ).keeping_fits(ctx.settings.fits)
        studies = sorted({p.relative_to(staging).parts[:2] for p in staging.glob("*/*")})
        for parts in studies:  # a rerun starts from an empty study folder
            target = ctx.dicom_out.joinpath(*parts)
            if target.exists():
                shutil.rmtree(target)
        previews = ctx.study_folder(plan) / "deface-previews"
        report = deface_folder(staging, ctx.dicom_out, template, policy, is_reference, previews)
        rows = []
        for outcome in report.series:
            info = order.describe(outcome.series)
            status = "pass" if outcome.status == "defaced" else "fail"
            extra = {}
            if outcome.previews is not None:
                # the dashboard's picture: the sheet's after panels (never the before ones: they
                # show the face), named by the series' pseudonymized UID like every picture there
                shown = ctx.qc_images_out / outcome.study / f"{outcome.series}_deface.png"
                _copy_atomically(Path(outcome.previews.after), shown)
                extra["picture"] = str(shown)
            rows.append(
                _series_row(
                    ctx,
                    info,
                    series_uid=outcome.series,
                    study_uid=outcome.study,
                    stage=DEFACE,
                    status=status,
                    method_version=version,
                    reason_code=None if status == "pass" else f"deface.{outcome.reason_code}",
                    message=outcome.reason,
                    metrics={**outcome.metrics, **extra},
                    seconds=outcome.metrics.get("seconds"),
                )
            )
        with index.session() as session:
            record_stages(session, rows)
        folders = tuple(str(ctx.dicom_out.joinpath(*parts)) for parts in studies)
        return replace(order, folders=folders, head_fits=tuple(report.fits)), {}

    return _run_step(
        ctx,
        index,
        plan,
        DEFACE,
        input_key,
        version,
        work,
        lambda order: all(Path(f).is_dir() for f in order.folders),
    )


# --- header and image QC ---------------------------------------------------------------------


def _protocols_digest(settings: Settings) -> str:
    from importlib import resources

    path = settings.protocols_file
    data = (
        path.read_bytes()
        if path is not None
        else resources.files("cohortflow.pipelines.dicom")
        .joinpath("data/protocols.yaml")
        .read_bytes()
    )
    return hashlib.sha256(data).hexdigest()


def qc_step(ctx: RunContext, index: IndexDB, previous: StepResult) -> StepResult:
    """Header and image QC of the defaced study, recorded per series. Outliers against the
    protocol's other series are judged once for the whole run (:func:`cohort_qc`)."""
    if not previous.done:
        return _blocked(previous, QC)
    from functools import cache

    from cohortflow.models.scanners import load_known_scanners
    from cohortflow.pipelines.atlas.template import load_brain_template
    from cohortflow.pipelines.dicom.protocols import load_protocols
    from cohortflow.pipelines.imaging.register import fits_by_frame
    from cohortflow.pipelines.quality.folder import METHOD_VERSION, qc_folder
    from cohortflow.pipelines.quality.folder import stage_records as qc_rows

    plan = _plan(ctx, index, previous.study_pk)
    if plan is None:
        return _not_archived(previous.study_pk, QC)
    input_key = chain(previous.input_key, METHOD_VERSION, _protocols_digest(ctx.settings))

    def work() -> tuple[WorkOrder, dict[str, Any]]:
        protocols = load_protocols(ctx.settings.protocols_file)
        scanners = load_known_scanners(ctx.settings.known_scanners_file)
        template = cache(
            lambda: load_brain_template(ctx.settings.cache).keeping_fits(ctx.settings.fits)
        )
        # the head as defacing fitted it: image QC does not register it again
        fits = fits_by_frame(previous.order.head_fits)
        rows: list[StageRecord] = []
        for folder in previous.order.folders:
            report = qc_folder(
                Path(folder), protocols, scanners, template, ctx.protocol, None, None, fits
            )
            rows.extend(row for r in report.series for row in qc_rows(r))
        with index.session() as session:
            record_stages(session, rows)
        return previous.order, {}

    return _run_step(ctx, index, plan, QC, input_key, METHOD_VERSION, work)


def cohort_qc(ctx: RunContext, index: IndexDB) -> int:
    """Judge image QC outliers over every series of the run's selection at once (the same
    answer in any order and on any number of workers); returns how many verdicts changed."""
    from cohortflow.models.stages import cohort_metrics
    from cohortflow.pipelines.dicom.protocols import load_protocols
    from cohortflow.pipelines.quality.cohort import recheck_outliers
    from cohortflow.pipelines.quality.folder import IMAGE

    protocols = load_protocols(ctx.settings.protocols_file)
    series_uids = pseudonymized_series(ctx, index)
    with index.session() as session:
        records = stage_records(session, IMAGE, series_uids)

    def history(
        name: str, manufacturer: str, model: str, here: frozenset[str]
    ) -> list[Mapping[str, object]]:
        with index.session() as session:
            return cohort_metrics(session, IMAGE, name, manufacturer, model, here)

    changed = recheck_outliers(records, protocols, history)
    with index.session() as session:
        record_stages(session, changed)
    return len(changed)


# --- convert ---------------------------------------------------------------------------------


def convert_step(ctx: RunContext, index: IndexDB, previous: StepResult) -> StepResult:
    """Convert the defaced study's selected series to NIfTI (BIDS layout under the protocol's
    outputs); one ``convert`` stage row per series; the T1s for volumetry as outputs."""
    if not previous.done:
        return _blocked(previous, CONVERT)
    from cohortflow.pipelines.convert.dcm2niix import find_dcm2niix
    from cohortflow.pipelines.convert.folder import convert_folder
    from cohortflow.pipelines.convert.results import method_version
    from cohortflow.pipelines.convert.results import stage_record as convert_row
    from cohortflow.pipelines.dicom.protocols import load_protocols
    from cohortflow.pipelines.volumetry.run import sources_from_conversion
    from cohortflow.pipelines.volumetry.source import Source

    plan = _plan(ctx, index, previous.study_pk)
    if plan is None:
        return _not_archived(previous.study_pk, CONVERT)
    try:
        tool_version: str | None = find_dcm2niix(None).version
    except CohortflowError:
        tool_version = None
    version = method_version(tool_version)
    input_key = chain(previous.input_key, version, _protocols_digest(ctx.settings))

    def work() -> tuple[WorkOrder, dict[str, Any]]:
        protocols = load_protocols(ctx.settings.protocols_file)
        rows: list[StageRecord] = []
        images: list[Source] = []
        delivered: dict[str, str] = {}  # NIfTI and sidecar -> series
        for folder in previous.order.folders:
            report = convert_folder(
                Path(folder), ctx.nifti_out, protocols, ctx.protocol, about=ctx.settings.bids
            )
            rows.extend(convert_row(r, report.method_version) for r in report.series)
            delivered.update(
                {
                    str(path): c.series
                    for c in report.series
                    for path in (c.nifti, c.sidecar)
                    if path
                }
            )
            sources, _ = sources_from_conversion(report.series)
            images.extend(sources)
        with index.session() as session:
            record_stages(session, rows)
        return replace(previous.order, images=tuple(images), converted=delivered), {}

    return _run_step(
        ctx,
        index,
        plan,
        CONVERT,
        input_key,
        version,
        work,
        lambda order: all(source.image.is_file() for source in order.images),
    )


# --- volumetry -------------------------------------------------------------------------------


def failed_earlier(index: IndexDB, series_uid: str) -> StageRecord | None:
    """The first stage (in flow order, volumetry excluded) that failed the series, if any: a
    reviewer's override sets aside the QC stages' failures."""
    from cohortflow.models.reviews import latest_reviews, set_aside

    with index.session() as session:
        rows = {r.stage: r for r in stage_records(session, series_uids=[series_uid])}
        decision = latest_reviews(session, [series_uid]).get(series_uid)
    for stage in SERIES_STAGES[: SERIES_STAGES.index(VOLUMETRY)]:
        row = rows.get(stage)
        if set_aside(stage, decision):
            continue
        if row is not None and row.status == "fail":
            return row
    return None


def _decisions(index: IndexDB, order: WorkOrder) -> dict[str, str]:
    """The newest review decision on each converted series of a study (they decide what
    volumetry measures, so they are part of its input)."""
    from cohortflow.models.reviews import latest_reviews

    uids = [s.series for s in order.images if s.series]
    with index.session() as session:
        return dict(sorted(latest_reviews(session, uids).items()))


def volumetry_step(ctx: RunContext, index: IndexDB, previous: StepResult) -> StepResult:
    """Measure the study's converted T1s that no earlier stage failed; record the volumes and
    a ``volumetry`` stage row per T1."""
    if not previous.done:
        return _blocked(previous, VOLUMETRY)
    from cohortflow.models.stages import record_biomarkers
    from cohortflow.pipelines.dicom.protocols import load_protocols
    from cohortflow.pipelines.volumetry.atlas import load_atlas
    from cohortflow.pipelines.volumetry.method import METHOD_VERSION, Parameters
    from cohortflow.pipelines.volumetry.run import biomarker_record, measure_all
    from cohortflow.pipelines.volumetry.run import stage_record as volumetry_row

    plan = _plan(ctx, index, previous.study_pk)
    if plan is None:
        return _not_archived(previous.study_pk, VOLUMETRY)
    params = Parameters()
    version = f"volumetry-{METHOD_VERSION}"
    decisions = _decisions(index, previous.order)  # none: the key it had before reviews
    input_key = chain(
        previous.input_key, version, asdict(params), *([decisions] if decisions else [])
    )

    def work() -> tuple[WorkOrder, dict[str, Any]]:
        sources = previous.order.images
        wanted = [s for s in sources if s.series and failed_earlier(index, s.series) is None]
        # defacing fitted the study's head to the same head model: its affine is not redone
        fits = {fit.reference_series: fit for fit in previous.order.head_fits}
        results = measure_all(
            wanted,
            lambda: load_atlas(ctx.settings.cache, ctx.settings.fits),
            params,
            ctx.volumetry_out / "overlays",
            fits=fits,
            policy_of=load_protocols(ctx.settings.protocols_file).qc_of,
        )
        with index.session() as session:
            known = [r for r in results if r.source.series and r.source.study]
            record_stages(session, [volumetry_row(r) for r in known])
            record_biomarkers(
                session, [biomarker_record(r, params) for r in known if r.volumes is not None]
            )
        measured = {r.source.series: r.verdict.value for r in results if r.source.series}
        # the overlays and the label maps beside them: delivered, so release-checked
        overlays = {
            str(path): r.source.series
            for r in results
            for path in (r.overlay, r.labels)
            if path is not None and r.source.series
        }
        return replace(
            previous.order,
            measured=measured,
            not_measured=len(sources) - len(wanted),
            overlays=overlays,
        ), {}

    return _run_step(ctx, index, plan, VOLUMETRY, input_key, version, work)


# --- release ---------------------------------------------------------------------------------

#: 1: every file the study's steps delivered searched for its patient's identifiers
RELEASE_VERSION = "release-1"


def delivered_files(ctx: RunContext, order: WorkOrder) -> dict[Path, str | None]:
    """What a study's steps wrote for release, each with its (pseudonymized) series: the
    defaced DICOM (``<patient>/<study>/<series>/``), the dashboard's pictures
    (``<study>/<series>_*.png``), the NIfTI images with their sidecars, the overlays."""
    files: dict[Path, str | None] = {}
    for folder in map(Path, order.folders):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            parts = path.relative_to(folder).parts
            files[path] = parts[0] if len(parts) > 1 else None
    pictures = ctx.qc_images_out / order.study if order.study else None
    if pictures is not None and pictures.is_dir():
        for path in sorted(p for p in pictures.iterdir() if p.is_file()):
            files[path] = path.name.split("_", 1)[0]
    for mapping in (order.converted, order.overlays):
        files.update({Path(p): series for p, series in mapping.items() if Path(p).is_file()})
    return files


def _delivered_digest(files: Mapping[Path, str | None]) -> str:
    """What was delivered, by name, size and modification time: a file changed, added or
    removed after the release check makes the next run check again."""
    listed = []
    for path in sorted(files):
        try:
            found = path.stat()
        except OSError:
            continue
        listed.append((str(path), found.st_size, found.st_mtime_ns))
    return chain(listed)


def release_step(ctx: RunContext, index: IndexDB, previous: StepResult) -> StepResult:
    """The release check of the study's deliverables (``pipelines.release.scan``): every file
    searched for the identifiers the index holds for the study's patient. A file holding one is
    moved to ``restricted/quarantine`` (audited) and its series fails the ``release`` stage with
    the kinds found; a file of no single series fails them all. One ``release`` stage row per
    series delivered. Done again when what was delivered changed since (``_delivered_digest``)."""
    if not previous.done:
        return _blocked(previous, RELEASE)
    from cohortflow.pipelines.release.scan import (
        PSEUDONYM,
        Matcher,
        quarantine_if_hit,
        scan_folder,
        targets,
    )

    plan = _plan(ctx, index, previous.study_pk)
    if plan is None:
        return _not_archived(previous.study_pk, RELEASE)
    input_key = chain(previous.input_key, RELEASE_VERSION)
    order = previous.order

    def work() -> tuple[WorkOrder, dict[str, Any]]:
        files = delivered_files(ctx, order)
        patients = {
            Path(f).parent.name
            for f in order.folders
            if PSEUDONYM.fullmatch(Path(f).parent.name.encode())
        }
        kinds: dict[str | None, set[str]] = {}
        moved: dict[Path, str] = {}  # delivered file -> where it went
        with index.session() as session:
            matcher = Matcher(targets(session, patients))
            for path, series in files.items():
                report = scan_folder(path, matcher)
                target = quarantine_if_hit(
                    session, path, report, ctx.settings.home / "restricted", None
                )
                if target is not None:
                    kinds.setdefault(series, set()).update(h.kind for h in report.hits)
                    moved[path] = str(target)
        everyone = kinds.get(None, set())
        study = order.study
        rows = []
        for series in sorted({s for s in files.values() if s}):
            found = kinds.get(series, set()) | everyone
            info = order.describe(series)
            rows.append(
                _series_row(
                    ctx,
                    info,
                    series_uid=series,
                    study_uid=study,
                    stage=RELEASE,
                    status="fail" if found else "pass",
                    method_version=RELEASE_VERSION,
                    reason_code="release.identifier_found" if found else None,
                    message=(
                        f"a delivered file holds the patient's {', '.join(sorted(found))}: "
                        "moved to restricted/quarantine, not released"
                        if found
                        else None
                    ),
                    metrics={"files": sum(1 for s in files.values() if s in (series, None))},
                )
            )
        with index.session() as session:
            record_stages(session, rows)
        left = _delivered_digest({p: s for p, s in files.items() if p not in moved})
        return (
            replace(
                order, released=len(files) - len(moved), quarantined=len(moved), delivered=left
            ),
            {"quarantined_files": list(moved.values())},
        )

    return _run_step(
        ctx,
        index,
        plan,
        RELEASE,
        input_key,
        RELEASE_VERSION,
        work,
        lambda stored: stored.delivered == _delivered_digest(delivered_files(ctx, order)),
    )
