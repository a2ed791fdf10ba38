"""Ingest: walk a delivery, read and archive every file, index it, in chunks.

The work per chunk is three steps, usable one by one (the Prefect flow runs one task per chunk)
or pipelined (``ingest``: reading in worker processes while the main process writes the index):

1. ``plan_chunk``: decide per path from the index alone (no file read): skip it (this batch has it
   with the same size and mtime), reuse an earlier batch's record (same path, size, mtime), or read
   it (new, or changed: the hash then decides);
2. ``read_files``: read, hash, classify, store in the archive (runs in a worker process);
3. ``record_chunk``: one transaction that writes the files and their headers to the index.

A crash anywhere loses at most the chunk in flight; the rerun re-reads it and the keyed writes
leave one row per file.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from cohortflow.models import repository
from cohortflow.models.database import IndexDB
from cohortflow.models.ingest import FileRecord, FileStatus, IngestOutcome
from cohortflow.models.scanners import KnownScanners
from cohortflow.pipelines.archive.store import ArchiveStore
from cohortflow.pipelines.ingest.manifest import Manifest
from cohortflow.pipelines.safeio import current_umask, printable_path, take_umask
from cohortflow.pipelines.walk import Candidate, walk
from cohortflow.pipelines.walk import candidate as found_at

log = logging.getLogger(__name__)

CHUNK_SIZE = 512
Progress = Callable[[int], None]


@dataclass(frozen=True)
class ChunkPlan:
    to_read: list[Candidate]
    to_copy: list[tuple[Candidate, repository.KnownFile]]
    unchanged: list[tuple[Candidate, repository.KnownFile]]
    #: this batch's rows of paths to read again (changed size or mtime): the hash decides
    earlier: dict[str, repository.KnownFile]


def chunked(items: Iterable[Candidate], size: int) -> Iterator[list[Candidate]]:
    chunk: list[Candidate] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def plan_chunk(index: IndexDB, batch_id: int, chunk: Sequence[Candidate]) -> ChunkPlan:
    """Decide per path, from the index only, whether it must be read."""
    with index.session() as session:
        known = repository.known_files(session, [c.shown for c in chunk])
    to_read: list[Candidate] = []
    to_copy: list[tuple[Candidate, repository.KnownFile]] = []
    unchanged: list[tuple[Candidate, repository.KnownFile]] = []
    earlier: dict[str, repository.KnownFile] = {}
    for candidate in chunk:
        rows = known.get(candidate.shown, [])
        usable = [
            r
            for r in rows
            if candidate.size is not None
            and r.status != FileStatus.UNREADABLE.value
            and r.size == candidate.size
            and r.mtime_ns == candidate.mtime_ns
        ]
        mine = [r for r in usable if r.batch_id == batch_id]
        if mine:
            unchanged.append((candidate, mine[0]))
        elif usable and not any(r.batch_id == batch_id for r in rows):
            to_copy.append((candidate, usable[0]))
        else:
            to_read.append(candidate)  # new, changed (the hash decides), or unreadable before
            here = [r for r in rows if r.batch_id == batch_id]
            if here:
                earlier[candidate.shown] = here[0]
    return ChunkPlan(to_read, to_copy, unchanged, earlier)


_STORES: dict[tuple[str, str | None], ArchiveStore] = {}


def read_files(
    paths: Sequence[str], archive_root: str, move: bool = False, key_source: str | None = None
) -> list[FileRecord]:
    """Read, classify and archive files (a worker process's job). Never raises for a file.

    With ``move`` the files are hard-linked into the archive instead of copied; the caller
    removes the originals once the index holds them (``release_sources``).
    """
    from cohortflow.pipelines.dicom.reader import read_path  # pydicom: loaded in the readers only

    # the store is made here, not sent: the key ring is read by each worker, never pickled
    store = _STORES.get((archive_root, key_source))
    if store is None:
        store = _STORES[(archive_root, key_source)] = ArchiveStore(Path(archive_root), key_source)
    records = []
    for path in paths:
        try:
            record, data = read_path(path)
            if data is not None and record.sha256 is not None:
                if move:
                    store.adopt(record.sha256, path, len(data), record.mtime_ns, data)
                else:
                    store.put(record.sha256, data)
        except Exception as exc:  # a bug or a full disk must not lose the rest of the chunk
            log.exception("ingest failed on %s", printable_path(path))
            record = FileRecord.unreadable(
                printable_path(path),
                "internal_error",
                f"could not be archived: {type(exc).__name__}: {exc}",
            )
        records.append(record)
    return records


def release_sources(store: ArchiveStore, held: Iterable[tuple[str, str | None, int | None]]) -> int:
    """Remove handed-over originals whose content the archive holds: (path, sha256, size).

    Called after the index transaction committed, so a crash in between leaves the original
    in place and the rerun finds it indexed and removes it then. Returns how many were removed.
    """
    removed = 0
    for path, sha256, size in held:
        if sha256 is None or size is None or not store.has(sha256, size):
            continue
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not remove %s after archiving it: %s", printable_path(path), exc)
    return removed


def record_chunk(
    index: IndexDB,
    batch_id: int,
    plan: ChunkPlan,
    records: Sequence[FileRecord],
    scanners: KnownScanners,
) -> None:
    """Write one planned and read chunk to the index, in one transaction."""
    with index.session() as session:
        if plan.to_copy:
            repository.copy_files(session, batch_id, [known for _, known in plan.to_copy])
        if records:
            repository.record_files(session, batch_id, records, scanners, plan.earlier)


def begin(index: IndexDB, name: str, source: str, manifest: Manifest | None = None) -> int:
    """Open the batch (new, or again for a rerun) and store its manifest; returns its id."""
    with index.session() as session:
        batch_id = repository.begin_batch(session, name, source)
        if manifest is not None:
            repository.replace_manifest(
                session,
                batch_id,
                str(manifest.path),
                manifest.sha256,
                [(r.accession_number, r.expected_files, r.line) for r in manifest.rows],
            )
    return batch_id


def finish(index: IndexDB, batch_id: int) -> None:
    with index.session() as session:
        repository.finish_batch(session, batch_id)


def ingest_chunk(
    index: IndexDB,
    store: ArchiveStore,
    batch_id: int,
    paths: Sequence[str],
    scanners: KnownScanners,
) -> tuple[int, int, int]:
    """Plan, read and record one chunk in this process: (read, reused, unchanged)."""
    plan = plan_chunk(index, batch_id, [found_at(p) for p in paths])
    records = read_files([c.path for c in plan.to_read], str(store.root), False, store.key_source)
    record_chunk(index, batch_id, plan, records, scanners)
    return len(records), len(plan.to_copy), len(plan.unchanged)


def _reader_pool(workers: int) -> ProcessPoolExecutor:
    # forkserver, not fork: this process holds database connections and threads. The server
    # imports the reader once, so every worker starts with pydicom already loaded.
    context = get_context("forkserver")
    context.set_forkserver_preload(
        ["cohortflow.pipelines.ingest.engine", "cohortflow.pipelines.dicom.reader"]
    )
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_quiet_worker, initargs=(current_umask(),)
    )


def _quiet_worker(umask: int) -> None:
    take_umask(umask)
    # pydicom reports invalid values through logging as well as warnings; the warnings become
    # per-file notes, so the log records have nowhere to go in a worker (no lastResort output).
    logging.getLogger().addHandler(logging.NullHandler())


def describe_sources(sources: Sequence[Path]) -> str:
    return ", ".join(printable_path(os.path.abspath(s)) for s in sources)


def default_batch_name(source: Path) -> str:
    return Path(os.path.abspath(source)).name or "batch"


def ingest(
    sources: Sequence[Path],
    index: IndexDB,
    store: ArchiveStore,
    scanners: KnownScanners,
    *,
    batch: str,
    manifest: Manifest | None = None,
    workers: int = 2,
    chunk_size: int = CHUNK_SIZE,
    progress: Progress | None = None,
    move: bool = False,
) -> IngestOutcome:
    """Ingest every file under ``sources`` into batch ``batch``.

    Reading runs in ``workers`` processes (1: in this process) while this process plans and
    writes the index; at most ``2 * workers`` chunks are in flight, so memory does not grow
    with the size of the delivery.

    ``move`` is for folders handed over to cohortflow (its own retrieval spool): files are
    hard-linked into the archive (no copy) and removed from the folder once indexed. Without it
    the originals are copied and never touched.
    """
    started = time.perf_counter()
    # the archive key ring read (made on first use) before any file: one that cannot be used
    # stops the batch with its reason, not every file in the readers
    store.ring()
    batch_id = begin(index, batch, describe_sources(sources), manifest)
    seen = processed = reused = unchanged = 0
    pool = _reader_pool(workers) if workers > 1 else None
    pending: deque[tuple[Future[list[FileRecord]] | list[FileRecord], ChunkPlan, int]] = deque()

    def drain_one() -> None:
        nonlocal processed
        job, plan, size = pending.popleft()
        records = job.result() if isinstance(job, Future) else job
        record_chunk(index, batch_id, plan, records, scanners)
        processed += len(records)
        if move:
            held = [(c.path, r.sha256, r.size) for c, r in zip(plan.to_read, records, strict=True)]
            held += [(c.path, k.sha256, k.size) for c, k in (*plan.to_copy, *plan.unchanged)]
            release_sources(store, held)
        if progress is not None:
            progress(size)

    try:
        for chunk in chunked(walk(sources, skip=store.root), chunk_size):
            seen += len(chunk)
            plan = plan_chunk(index, batch_id, chunk)
            reused += len(plan.to_copy)
            unchanged += len(plan.unchanged)
            paths = [c.path for c in plan.to_read]
            job: Future[list[FileRecord]] | list[FileRecord]
            if pool is not None and paths:
                job = pool.submit(read_files, paths, str(store.root), move, store.key_source)
            else:
                job = read_files(paths, str(store.root), move, store.key_source)
            pending.append((job, plan, len(chunk)))
            while len(pending) > 2 * max(workers, 1):
                drain_one()
        while pending:
            drain_one()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    finish(index, batch_id)
    seconds = time.perf_counter() - started
    return IngestOutcome(
        batch=batch,
        seen=seen,
        processed=processed,
        unchanged=unchanged,
        reused=reused,
        seconds=round(seconds, 3),
        files_per_second=round(seen / seconds, 1) if seconds > 0 else 0.0,
    )


def choose_batch_name(index: IndexDB, sources: Sequence[Path]) -> str:
    """The folder's name, unless another source already uses it (then name + a short hash)."""
    import hashlib

    name = default_batch_name(sources[0])
    source_text = describe_sources(sources)
    with index.session() as session:
        existing = repository.batch_by_name(session, name)
        if existing is None or existing.source == source_text:
            return name
    return f"{name}-{hashlib.sha256(source_text.encode()).hexdigest()[:8]}"
