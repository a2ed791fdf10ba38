"""The ingest flow: one task per chunk of files, each a call of ``pipelines.ingest.engine``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from cohortflow.models.database import IndexDB, open_index
from cohortflow.models.ingest import BatchReport
from cohortflow.models.scanners import KnownScanners, load_known_scanners
from cohortflow.models.settings import load_settings
from cohortflow.pipelines.archive.store import ArchiveStore
from cohortflow.pipelines.ingest import engine
from cohortflow.pipelines.ingest.accounting import batch_report
from cohortflow.pipelines.ingest.manifest import read_manifest
from cohortflow.pipelines.walk import walk

CHUNK = 500


@lru_cache(maxsize=4)
def _index(url: str) -> IndexDB:
    return open_index(url)


@task(name="open-batch", retries=2, retry_delay_seconds=2)
def open_batch(index_url: str, batch: str, sources: list[Path], manifest: Path | None) -> int:
    loaded = read_manifest(manifest) if manifest is not None else None
    return engine.begin(_index(index_url), batch, engine.describe_sources(sources), loaded)


@lru_cache(maxsize=4)
def _scanners(path: Path | None) -> KnownScanners:
    return load_known_scanners(path)  # read once per process, not once per chunk


@task(name="list-files")
def list_files(sources: list[Path], archive: Path) -> list[list[str]]:
    chunks = engine.chunked(walk(sources, skip=archive, stat=False), CHUNK)
    return [[c.path for c in chunk] for chunk in chunks]


@task(name="ingest-chunk", retries=2, retry_delay_seconds=2)
def ingest_chunk(
    index_url: str,
    archive: Path,
    batch_id: int,
    paths: list[str],
    scanners_file: Path | None,
    key_source: str | None = None,
) -> tuple[int, int, int]:
    # the archive key ring's source (file:PATH or env:VARIABLE), never the key itself
    return engine.ingest_chunk(
        _index(index_url),
        ArchiveStore(archive, key_source),
        batch_id,
        paths,
        _scanners(scanners_file),
    )


@task(name="close-batch", retries=2, retry_delay_seconds=2)
def close_batch(index_url: str, batch_id: int, batch: str) -> BatchReport:
    engine.finish(_index(index_url), batch_id)
    return batch_report(_index(index_url), batch)


@task(name="publish-batch-report")
def publish_batch_report(report: BatchReport) -> None:
    from cohortflow.flows.report import batch_report_markdown

    create_markdown_artifact(
        batch_report_markdown(report),
        key=f"batch-{report.batch}".lower().replace("_", "-")[:100],
        description=f"Accounting of batch {report.batch}",
    )


@flow(name="cohortflow-ingest")
def ingest_flow(
    sources: list[Path], batch: str, manifest: Path | None = None, config: Path | None = None
) -> BatchReport:
    """Archive and index a delivered folder, then publish its accounting."""
    settings = load_settings(config)
    url = settings.index
    batch_id = open_batch(url, batch, sources, manifest)
    chunks = list_files(sources, settings.archive)
    ingest_chunk.map(
        url,
        settings.archive,
        batch_id,
        chunks,
        settings.known_scanners_file,
        settings.archive_key,
    ).result()
    report = close_batch(url, batch_id, batch)
    publish_batch_report(report)
    return report
