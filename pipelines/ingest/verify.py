"""Integrity check of the archive: re-hash every stored blob against the index.

Hashing runs in threads (hashlib and file reads release the GIL). Blobs are visited in hash order
a page at a time, so memory stays flat however large the archive is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cohortflow.models import repository
from cohortflow.models.database import IndexDB
from cohortflow.models.ingest import VerifyProblem, VerifyReport
from cohortflow.pipelines.archive.sealed import SealError
from cohortflow.pipelines.archive.store import ArchiveStore

PAGE = 1000
MAX_LISTED = 10_000  # problems listed in the report; the counts are always complete


def _check(store: ArchiveStore, sha256: str, size: int) -> str:
    """A blob's verdict: its content (decrypted, for a sealed blob, which also authenticates
    every segment) hashed against its name."""
    try:
        if not store.has(sha256, size):
            return "missing" if not store.path_for(sha256).exists() else "changed"
        return "ok" if store.digest(sha256) == sha256 else "changed"
    except SealError as error:
        return error.code  # changed (fails authentication) or unreadable (a key not held)
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unreadable"


def verify(
    index: IndexDB,
    store: ArchiveStore,
    *,
    threads: int = 4,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Re-hash the archive; record each blob's verdict in the index."""
    started = time.perf_counter()
    counts = {"ok": 0, "changed": 0, "missing": 0, "unreadable": 0}
    problems: list[VerifyProblem] = []
    after = ""
    with ThreadPoolExecutor(threads) as pool:
        while True:
            with index.session() as session:
                page = repository.blob_page(session, after, PAGE)
            if not page:
                break
            verdicts = list(pool.map(lambda item: _check(store, *item), page))
            states = {sha: verdict for (sha, _), verdict in zip(page, verdicts, strict=True)}
            with index.session() as session:
                repository.mark_verified(session, states)
            for sha, verdict in states.items():
                counts[verdict] += 1
                if verdict != "ok" and len(problems) < MAX_LISTED:
                    problems.append(
                        VerifyProblem(sha256=sha, path=str(store.path_for(sha)), problem=verdict)
                    )
            after = page[-1][0]
            if progress is not None:
                progress(len(page))
    untracked = 0
    batch: list[Path] = []

    def flush() -> None:
        nonlocal untracked
        with index.session() as session:
            known = repository.blob_known(session, [p.name for p in batch])
        for path in batch:
            if path.name not in known:
                untracked += 1
                if len(problems) < MAX_LISTED:
                    problems.append(
                        VerifyProblem(sha256=path.name, path=str(path), problem="untracked")
                    )
        batch.clear()

    for path in store.iter_blob_files():
        batch.append(path)
        if len(batch) >= PAGE:
            flush()
    if batch:
        flush()
    return VerifyReport(
        checked=sum(counts.values()),
        ok=counts["ok"],
        changed=counts["changed"],
        missing=counts["missing"],
        unreadable=counts["unreadable"],
        untracked=untracked,
        seconds=round(time.perf_counter() - started, 3),
        problems=problems,
    )
