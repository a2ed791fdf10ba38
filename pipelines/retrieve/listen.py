"""Receive a pushed stream (the ImageVU way): a storage SCP whose spool is ingested when quiet.

Instances land in the spool as they arrive; once none arrived for ``idle_seconds`` (a study is
usually pushed in one burst), the spool is ingested with ``--move`` into one batch. Stopping
(SIGINT / SIGTERM, or ``seconds``) ingests what is left first, and anything a crash left in the
spool is ingested at the next start.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cohortflow.models.database import IndexDB
from cohortflow.models.scanners import KnownScanners
from cohortflow.pipelines.archive.store import ArchiveStore
from cohortflow.pipelines.pacs.scp import ScpTls, Spool, StorageSCP
from cohortflow.pipelines.retrieve.engine import ingest_spool


@dataclass(frozen=True)
class ListenOutcome:
    batch: str
    received: int  # instances stored (C-STORE successes)
    files: int  # distinct files they made (the same instance sent again is one file)
    ingested: int
    ingest_runs: int
    seconds: float


def listen(
    index: IndexDB,
    store: ArchiveStore,
    scanners: KnownScanners,
    spool_root: Path,
    *,
    aet: str,
    host: str,
    port: int,
    batch: str,
    calling_aets: tuple[str, ...] | None = None,
    tls: ScpTls | None = None,
    idle_seconds: float = 5.0,
    seconds: float | None = None,
    stop: threading.Event | None = None,
    on_ingest: Callable[[int], None] | None = None,
) -> ListenOutcome:
    """Run the storage SCP until ``stop`` is set, a signal arrives, or ``seconds`` pass;
    associations are accepted from ``calling_aets`` only (None: from any caller), over DICOM
    TLS when ``tls`` is given."""
    started = time.monotonic()
    stop = stop or threading.Event()
    spool = Spool(spool_root)
    ingested = runs = 0

    def flush() -> None:
        nonlocal ingested, runs
        handed = ingest_spool(spool, index, store, scanners, batch)
        if handed:
            ingested += handed
            runs += 1
            if on_ingest is not None:
                on_ingest(handed)

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        flush()  # what the last run left behind
        with StorageSCP(spool, aet, port, host, calling_aets, tls):
            while not stop.wait(0.2):
                if seconds is not None and time.monotonic() - started >= seconds:
                    break
                quiet = time.monotonic() - spool.last_received
                if spool.last_received and quiet >= idle_seconds:
                    mark = spool.last_received
                    flush()
                    if spool.last_received == mark:  # nothing arrived meanwhile
                        spool.last_received = 0.0
        flush()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return ListenOutcome(
        batch,
        sum(spool.received.values()),
        spool.files,
        ingested,
        runs,
        round(time.monotonic() - started, 1),
    )
