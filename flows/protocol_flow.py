"""The protocol flow: from a PACS query to the biomarker table, resumable, on Dask.

``protocol_flow`` selects a protocol's studies in the PACS, retrieves them into the archive,
then hands the studies to ``process_studies``, a subflow whose tasks run on a Dask cluster (a
local one by default, an existing scheduler by ``dask_address``). Each study goes through six
tasks, one pipeline call each: anonymize -> deface -> qc -> convert -> volumetry -> release (the
release check of what the study delivered: a file with an identifier is quarantined); studies run
concurrently, as many at once as the cluster has worker slots. Then image QC outliers are judged
over the whole run, and the success rates are stored with the run and published as artifacts.

Thin: every task calls one function of ``pipelines``. PACS tasks carry the tag ``pacs`` and the
CPU-heavy ones ``cohortflow-cpu``: ``prefect concurrency-limit create pacs 1`` caps them across
runs on a server; within a run the retrieval throttle and the cluster's size do. Tasks pass the
study's row number in the index and pseudonymized outputs, never an identifier. A rerun skips
every step the index holds for the same input (``pipelines.run.steps``), so tasks need no
Prefect cache.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast
from uuid import UUID

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from pydantic import Field

from cohortflow.flows.prefect_env import configure_itk, protect_identified
from cohortflow.models.database import IndexDB, open_index
from cohortflow.models.settings import Settings, load_settings
from cohortflow.pipelines.pacs import orthanc
from cohortflow.pipelines.pacs.dimse import store_files
from cohortflow.pipelines.retrieve.config import (
    own_orthanc,
    pacs_node,
    retrieve_configured,
    select_configured,
)
from cohortflow.pipelines.retrieve.engine import RetrieveSummary
from cohortflow.pipelines.run import steps
from cohortflow.pipelines.run.outcome import RunSummary, finish, start
from cohortflow.pipelines.run.progress import RunProgress
from cohortflow.pipelines.select.query import SelectionResult, record_selection


@dataclass(frozen=True)
class SelectionSummary:
    selection_id: int
    protocol: str
    studies_found: int
    studies_selected: int
    series_selected: int


@task(name="start-own-pacs")
def start_own_pacs(config: Path | None) -> bool:
    """Start the project's Orthanc unless it runs; True if this call started it."""
    orthanc_config = own_orthanc(load_settings(config))
    if orthanc.running_pid(orthanc_config.folder) is not None:
        return False
    orthanc.OrthancServer(orthanc_config).start().detach()
    return True


@task(name="stop-own-pacs")
def stop_own_pacs(config: Path | None) -> None:
    orthanc.stop_running(own_orthanc(load_settings(config)).folder)


@task(name="load-into-pacs", tags=["pacs"])
def load_into_pacs(folder: Path, config: Path | None) -> int:
    settings = load_settings(config)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return store_files(pacs_node(settings), files, settings.local_aet).sent


@contextmanager
def _opened(settings: Settings) -> Iterator[IndexDB]:
    """The index for one task (a worker process may serve many runs: closed after each)."""
    index = open_index(settings.index)
    try:
        yield index
    finally:
        index.dispose()


@task(name="select-studies", tags=["pacs"], retries=2, retry_delay_seconds=30)
def select_task(
    protocol: str, date_from: dt.date, date_to: dt.date, config: Path | None
) -> SelectionSummary:
    settings = load_settings(config)
    result, protocols_file = select_configured(settings, protocol, date_from, date_to)
    with _opened(settings) as index:
        return _recorded(index, result, protocols_file)


def _recorded(index: IndexDB, result: SelectionResult, protocols_file: Path) -> SelectionSummary:
    """Store the selection; what it holds, by count."""
    return SelectionSummary(
        record_selection(index, result, protocols_file),
        result.protocol,
        len(result.studies),
        len(result.selected),
        sum(len(s.chosen) for s in result.selected),
    )


@task(name="select-cohort", tags=["pacs"], retries=2, retry_delay_seconds=30)
def select_cohort_task(
    protocol: str, cohort: str, use_pacs: bool, config: Path | None
) -> SelectionSummary:
    from cohortflow.pipelines.cohort.configured import select_cohort

    settings = load_settings(config)
    with _opened(settings) as index:
        result, protocols_file = select_cohort(settings, index, protocol, cohort, use_pacs=use_pacs)
        return _recorded(index, result, protocols_file)


@task(name="retrieve-selection", tags=["pacs"])  # retries: the throttle's, per study
def retrieve_task(selection_id: int, method: str | None, config: Path | None) -> RetrieveSummary:
    settings = load_settings(config)
    with _opened(settings) as index:
        outcome = retrieve_configured(settings, index, selection_id, method=method)
    return RetrieveSummary.of(outcome)


@task(name="publish-retrieval")
def publish_retrieval(selection: SelectionSummary, summary: RetrieveSummary) -> None:
    lines = [
        f"# protocol {selection.protocol}: selection {selection.selection_id}",
        "| what | count |",
        "|---|---:|",
        f"| studies found | {selection.studies_found} |",
        f"| studies selected | {selection.studies_selected} |",
        f"| series selected | {selection.series_selected} |",
        *(f"| studies {k} | {v} |" for k, v in summary.by_status.items()),
        f"| retrieval state | {summary.state} |",
    ]
    create_markdown_artifact(
        "\n".join(lines),
        key=f"retrieval-{selection.protocol}".lower().replace("_", "-")[:100],
        description=f"Selection and retrieval of protocol {selection.protocol}",
    )


# --- the studies, on Dask --------------------------------------------------------------------


#: CPU-heavy study steps (registrations): ``prefect concurrency-limit create cohortflow-cpu N``
#: caps them across runs; within a run the cluster's worker slots do. No Prefect cache: the index
#: decides what is done (input content and method version).
CPU = ["cohortflow-cpu"]


@task(name="plan-run", cache_policy=NO_CACHE)
def plan_task(ctx: steps.RunContext, max_studies: int | None) -> list[int]:
    with _opened(ctx.settings) as index:
        return steps.study_keys(ctx, index, max_studies)


@task(name="anonymize-study", cache_policy=NO_CACHE)
def anonymize_task(ctx: steps.RunContext, study_pk: int) -> steps.StepResult:
    with _opened(ctx.settings) as index:
        return steps.anonymize_step(ctx, index, study_pk)


@task(name="deface-study", tags=CPU, cache_policy=NO_CACHE)
def deface_task(ctx: steps.RunContext, previous: steps.StepResult) -> steps.StepResult:
    configure_itk(ctx.settings.itk_threads)  # before the first registration in this worker
    protect_identified(ctx.settings)
    with _opened(ctx.settings) as index:
        return steps.deface_step(ctx, index, previous)


@task(name="qc-study", tags=CPU, cache_policy=NO_CACHE)
def qc_task(ctx: steps.RunContext, previous: steps.StepResult) -> steps.StepResult:
    configure_itk(ctx.settings.itk_threads)
    protect_identified(ctx.settings)
    with _opened(ctx.settings) as index:
        return steps.qc_step(ctx, index, previous)


@task(name="convert-study", cache_policy=NO_CACHE)
def convert_task(ctx: steps.RunContext, previous: steps.StepResult) -> steps.StepResult:
    with _opened(ctx.settings) as index:
        return steps.convert_step(ctx, index, previous)


@task(name="volumetry-study", tags=CPU, cache_policy=NO_CACHE)
def volumetry_task(ctx: steps.RunContext, previous: steps.StepResult) -> steps.StepResult:
    configure_itk(ctx.settings.itk_threads)
    protect_identified(ctx.settings)
    with _opened(ctx.settings) as index:
        return steps.volumetry_step(ctx, index, previous)


@task(name="release-study", cache_policy=NO_CACHE)
def release_task(ctx: steps.RunContext, previous: steps.StepResult) -> steps.StepResult:
    protect_identified(ctx.settings)
    with _opened(ctx.settings) as index:
        return steps.release_step(ctx, index, previous)


@task(name="cohort-qc", cache_policy=NO_CACHE)
def cohort_qc_task(ctx: steps.RunContext) -> int:
    with _opened(ctx.settings) as index:
        return steps.cohort_qc(ctx, index)


def dask_runner(settings: Settings, dask_address: str | None, workers: int | None) -> Any:
    """The Dask task runner: the scheduler at ``dask_address`` (else the settings'), else a
    local cluster of ``workers`` single-threaded processes (else the settings', else one per
    core)."""
    from prefect_dask.task_runners import DaskTaskRunner

    address = dask_address or settings.flow.dask_address
    if address:
        return DaskTaskRunner(address=address)
    count = workers or settings.flow.workers or settings.worker_count
    shown = settings.flow.dask_dashboard
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": count,
            "threads_per_worker": 1,
            "processes": True,
            # the scheduler on loopback, and its web dashboard (no login) only where the
            # settings put it: ":0" listened on every interface. Without one, the scheduler's
            # small HTTP service (health) stays on loopback, on any free port.
            "host": "127.0.0.1",
            "dashboard_address": shown or "127.0.0.1:0",
            "scheduler_kwargs": {"dashboard": bool(shown)},
        }
    )


@flow(name="cohortflow-process-studies")
def process_studies(
    protocol: str,
    selection_id: int,
    run_id: int,
    max_studies: int | None = None,
    profile: Path | None = None,
    config: Path | None = None,
) -> list[steps.StepResult]:
    """Anonymize, deface, check, convert and measure each study of a selection (concurrently on
    the flow's task runner), then judge QC outliers over the run. Progress (studies done per
    stage, the rate, the time left) goes to stderr and to a Prefect progress artifact as each
    study finishes a stage."""
    ctx = steps.RunContext(load_settings(config), protocol, selection_id, run_id, profile)
    keys = plan_task(ctx, max_studies)
    last: list[PrefectFuture[steps.StepResult]] = []
    every: list[PrefectFuture[Any]] = []
    stage_of: dict[int, str] = {}  # by id(): a future need not be hashable
    for key in keys:
        # a future as an argument: Prefect waits for it and passes its result (untyped there)
        anonymized = anonymize_task.submit(ctx, key)
        defaced = deface_task.submit(ctx, anonymized)  # type: ignore[call-overload]
        checked = qc_task.submit(ctx, defaced)
        converted = convert_task.submit(ctx, checked)  # type: ignore[call-overload]
        measured = volumetry_task.submit(ctx, converted)
        released = release_task.submit(ctx, measured)  # type: ignore[call-overload]
        last.append(released)
        chain = (anonymized, defaced, checked, converted, measured, released)
        every.extend(chain)
        stage_of.update({id(f): stage for stage, f in zip(RUN_STAGES, chain, strict=True)})
    _follow(protocol, every, stage_of, RunProgress(len(keys), RUN_STAGES))
    results = [future.result() for future in last]
    cohort_qc_task(ctx)
    return results


#: the stages each study of a run goes through, in order (``process_studies``)
RUN_STAGES = ("anonymize", "deface", "qc", "convert", "volumetry", "release")


def _follow(
    protocol: str,
    futures: list[PrefectFuture[Any]],
    stage_of: dict[int, str],
    progress: RunProgress,
) -> None:
    """Report ``progress`` as the futures finish: a line on stderr per change and the run's
    progress artifact (counts only: nothing that names a study)."""
    artifact = cast(
        "UUID",
        create_progress_artifact(
            0.0,
            key=f"progress-{protocol}".lower().replace("_", "-")[:100],
            description=f"Protocol {protocol}: {progress.line()}",
        ),
    )
    _say(f"run {protocol}: {progress.total} studies")
    for future in as_completed(futures):
        progress.finished(stage_of[id(future)])
        line = progress.line()
        _say(f"run {protocol}: {line}")
        update_progress_artifact(
            artifact, 100.0 * progress.fraction, f"Protocol {protocol}: {line}"
        )


def _say(line: str) -> None:
    """A progress line on stderr (the command line forces Prefect's own logging to warnings;
    a worker keeps its stderr in its log)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@task(name="start-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def start_task(protocol: str, parameters: dict[str, Any], config: Path | None) -> int:
    settings = load_settings(config)
    with _opened(settings) as index:
        return start(index, protocol, parameters, str(flow_run.get_id() or "") or None)


@task(name="store-outcome", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def finish_task(run_id: int, protocol: str, failed: bool, config: Path | None) -> RunSummary:
    settings = load_settings(config)
    with _opened(settings) as index:
        return finish(index, run_id, protocol, failed)


@task(name="publish-outcome")
def publish_outcome(summary: RunSummary) -> None:
    from cohortflow.flows.report import outcome_markdown, outcome_table

    key = f"outcome-{summary.protocol}".lower().replace("_", "-")[:100]
    create_table_artifact(
        outcome_table(summary),
        key=f"{key}-stages",
        description=f"Protocol {summary.protocol}: outcome per stage",
    )
    create_markdown_artifact(
        outcome_markdown(summary),
        key=key,
        description=f"Protocol {summary.protocol}: success rates, reasons, biomarkers",
    )


@flow(name="cohortflow-protocol")
def protocol_flow(
    protocol: str,
    date_from: dt.date | None = None,
    date_to: dt.date | None = None,
    lookback_days: Annotated[int, Field(ge=1, le=36500)] = 7,
    max_studies: Annotated[int | None, Field(ge=1)] = None,
    profile: Path | None = None,
    method: Literal["move", "get", "dicomweb"] | None = None,
    retrieve: bool = True,
    dask_address: str | None = None,
    workers: Annotated[int | None, Field(ge=1, le=256)] = None,
    config: Path | None = None,
    cohort: str | None = None,
) -> RunSummary:
    """Select ``protocol``'s studies in the PACS over a date range (default: the last
    ``lookback_days`` up to today, what a nightly schedule wants), retrieve them, and take each
    (at most ``max_studies``) to biomarkers with the de-identification ``profile`` (default:
    the shipped one); store and publish the success rates. ``retrieve=False`` processes what
    the archive already holds of the latest selection.

    With ``cohort`` (a saved cohort's name), the studies are exactly the cohort's: the
    protocol's series rules decide on the archived ones from the index, the PACS is asked for
    the others (not with ``retrieve=False``), and the date range is not used.

    Args:
        protocol: The protocol of protocols.yaml whose studies are selected (dementia, ms,
            open).
        date_from: First study date searched (default: date_to minus lookback_days).
        date_to: Last study date searched (default: today).
        lookback_days: Days searched back from date_to when date_from is not given.
        max_studies: Process at most this many studies (default: all selected).
        profile: De-identification profile file (default: the shipped PS3.15 profile).
        method: How studies are fetched: move (to cohortflow's storage SCP), get or dicomweb
            (default: settings retrieve.method).
        retrieve: Fetch from the PACS; false processes what the archive holds already.
        dask_address: An existing Dask scheduler, tcp://host:8786 (default: settings, else a
            local cluster).
        workers: Worker processes of the local Dask cluster (default: settings).
        config: A cohortflow settings file (default: $COHORTFLOW_CONFIG or the data folder's).
        cohort: A saved cohort's name: exactly its studies, no date range.
    """
    settings = load_settings(config)
    date_to = date_to or dt.date.today()
    date_from = date_from or date_to - dt.timedelta(days=lookback_days)
    parameters = {
        "date_from": None if cohort else date_from.isoformat(),
        "date_to": None if cohort else date_to.isoformat(),
        "max_studies": max_studies,
        "profile": str(profile) if profile else None,
        "method": method,
        "retrieve": retrieve,
        "dask_address": dask_address or settings.flow.dask_address,
        "cohort": cohort,
    }
    run_id = start_task(protocol, parameters, config)
    failed = True
    try:
        if cohort is not None:
            selection = select_cohort_task(protocol, cohort, retrieve, config)
            if retrieve:
                summary = retrieve_task(selection.selection_id, method, config)
                publish_retrieval(selection, summary)
            selection_id = selection.selection_id
        elif retrieve:
            selection = select_task(protocol, date_from, date_to, config)
            summary = retrieve_task(selection.selection_id, method, config)
            publish_retrieval(selection, summary)
            selection_id = selection.selection_id
        else:
            selection_id = steps.require_selection(settings, protocol)
        runner = dask_runner(settings, dask_address, workers)
        process_studies.with_options(task_runner=runner)(
            protocol, selection_id, run_id, max_studies, profile, config
        )
        failed = False
    finally:
        outcome = finish_task(run_id, protocol, failed, config)
    publish_outcome(outcome)
    return outcome
