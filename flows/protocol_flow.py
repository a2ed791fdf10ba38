"""The protocol flow: select a protocol's studies in the PACS, retrieve them into the archive.

Thin: each task calls one pipeline function. PACS tasks carry the ``pacs`` tag, so a Prefect
tag concurrency limit (``prefect concurrency-limit create pacs 1``) caps them across flow runs;
within a run the retrieval throttle (settings ``retrieve``) does. Tasks return counts, never
patient identifiers (Prefect stores parameters and results).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from models.database import open_index
from models.settings import load_settings
from pipelines.pacs import orthanc
from pipelines.pacs.dimse import store_files
from pipelines.retrieve.config import (
    own_orthanc,
    pacs_node,
    retrieve_configured,
    select_configured,
)
from pipelines.retrieve.engine import RetrieveSummary
from pipelines.select.query import record_selection


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


@task(name="select-studies", tags=["pacs"], retries=2, retry_delay_seconds=30)
def select_task(
    protocol: str, date_from: dt.date, date_to: dt.date, config: Path | None
) -> SelectionSummary:
    settings = load_settings(config)
    result, protocols_file = select_configured(settings, protocol, date_from, date_to)
    index = open_index(settings.index)
    try:
        selection_id = record_selection(index, result, protocols_file)
    finally:
        index.dispose()
    return SelectionSummary(
        selection_id,
        protocol,
        len(result.studies),
        len(result.selected),
        sum(len(s.chosen) for s in result.selected),
    )


@task(name="retrieve-selection", tags=["pacs"])  # retries: the throttle's, per study
def retrieve_task(selection_id: int, method: str | None, config: Path | None) -> RetrieveSummary:
    settings = load_settings(config)
    index = open_index(settings.index)
    try:
        outcome = retrieve_configured(settings, index, selection_id, method=method)
    finally:
        index.dispose()
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


@flow(name="cohortflow-protocol")
def protocol_flow(
    protocol: str,
    date_from: dt.date,
    date_to: dt.date,
    method: str | None = None,
    config: Path | None = None,
) -> tuple[SelectionSummary, RetrieveSummary]:
    """Select a protocol's studies in the PACS over a date range and retrieve them."""
    selection = select_task(protocol, date_from, date_to, config)
    summary = retrieve_task(selection.selection_id, method, config)
    publish_retrieval(selection, summary)
    return selection, summary
