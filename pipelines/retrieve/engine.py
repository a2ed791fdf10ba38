"""Retrieve a selection from the PACS into the archive: C-MOVE, C-GET or DICOMweb (WADO-RS,
with QIDO-RS for what the PACS holds of a series).

Per study: skip it when the archive index already holds every instance the PACS announced;
otherwise wait for the throttle, fetch the missing series (only the missing instances of a
series that arrived in part), ingest the spool (``--move``: hard links, no copy), and count
again *in the index*: a series is complete when the index holds as many distinct instances as the
series C-FIND announced. A failure is retried with backoff within the policy's limits and then
recorded per series with a reason; a PACS that stays unreachable stops the run (the rest stays
pending) instead of being hammered. The state lives in the index, so a rerun after a crash or a
stop picks up where the last run ended: files still in the spool are ingested first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from cohortflow.models import retrieval as repo
from cohortflow.models.database import IndexDB
from cohortflow.models.retrieval import ChosenSeries, RetrievalStatus
from cohortflow.models.scanners import KnownScanners
from cohortflow.pipelines.archive.store import ArchiveStore
from cohortflow.pipelines.ingest import engine as ingest_engine
from cohortflow.pipelines.pacs import dicomweb
from cohortflow.pipelines.pacs.dimse import PacsNode, RetrieveStatus, Session, query_contexts
from cohortflow.pipelines.pacs.errors import PacsError, PacsUnavailableError
from cohortflow.pipelines.pacs.scp import Received, ScpTls, Spool, StorageSCP
from cohortflow.pipelines.retrieve.errors import OutsideWindowError, RetrieveConfigError
from cohortflow.pipelines.retrieve.throttle import Throttle

log = logging.getLogger(__name__)

METHODS = ("move", "get", "dicomweb")


@dataclass(frozen=True)
class RetrieveTarget:
    """How to fetch from the PACS."""

    node: PacsNode
    local_aet: str
    method: str = "move"
    #: C-MOVE: where our storage SCP listens (the PACS must know this AE title, host and port).
    scp_host: str = "127.0.0.1"
    scp_port: int = 11112
    #: calling AE titles our storage SCP accepts (None: any)
    calling_aets: tuple[str, ...] | None = None
    #: DICOM TLS on our storage SCP (None: plain DICOM)
    scp_tls: ScpTls | None = None
    dicomweb: dicomweb.DicomWebNode | None = None
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RetrieveConfigError(
                f"retrieval method {self.method!r} is not one of {', '.join(METHODS)}"
            )
        if self.method == "dicomweb" and self.dicomweb is None:
            raise RetrieveConfigError("retrieval method dicomweb needs the PACS's DICOMweb URL")


@dataclass(frozen=True)
class SeriesOutcome:
    series_instance_uid: str
    rule: str
    status: str
    expected: int | None
    archived: int
    reason_code: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class StudyOutcome:
    study_instance_uid: str
    accession_number: str | None
    #: complete, already (complete before this run), incomplete, failed, gone, pending
    status: str
    series: tuple[SeriesOutcome, ...]
    attempts: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class RetrieveOutcome:
    selection_id: int
    method: str
    #: complete, failures (done, some studies not complete), paused (outside the windows),
    #: stopped (the PACS stayed unavailable)
    state: str
    studies: tuple[StudyOutcome, ...]
    seconds: float
    associations_peak: int
    associations_opened: int
    waited_seconds: float
    message: str = ""

    def count(self, status: str) -> int:
        return sum(1 for s in self.studies if s.status == status)


def ingest_spool(
    spool: Spool, index: IndexDB, store: ArchiveStore, scanners: KnownScanners, batch: str
) -> int:
    """Archive and index whatever the spool holds, removing it from the spool (``--move``);
    returns how many files were handed over."""
    if not any(spool.root.iterdir()):
        return 0
    outcome = ingest_engine.ingest(
        [spool.root], index, store, scanners, batch=batch, workers=1, move=True
    )
    spool.prune()
    return outcome.seen


def _series_keys(se: ChosenSeries) -> dict[str, object]:
    return {"StudyInstanceUID": se.study_instance_uid, "SeriesInstanceUID": se.series_instance_uid}


@dataclass
class _Run:
    index: IndexDB
    store: ArchiveStore
    scanners: KnownScanners
    target: RetrieveTarget
    throttle: Throttle
    spool: Spool
    batch: str
    stop_reason: str | None = None
    paused: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    ingest_lock: threading.Lock = field(default_factory=threading.Lock)

    # --- the index side ------------------------------------------------------------------

    def ingest_spool(self) -> None:
        with self.ingest_lock:
            ingest_spool(self.spool, self.index, self.store, self.scanners, self.batch)

    def archived(self, series: Sequence[ChosenSeries]) -> dict[str, int]:
        with self.index.session() as session:
            return repo.archived_counts(session, [s.series_instance_uid for s in series])

    def missing_sops(self, pacs: Session, se: ChosenSeries) -> list[str]:
        """The instances of a partly archived series that the PACS has and the archive lacks."""
        keys = _series_keys(se)
        on_pacs = [str(a["SOPInstanceUID"]) for a in pacs.find("IMAGE", keys, ["SOPInstanceUID"])]
        return self.not_archived(se, on_pacs)

    def not_archived(self, se: ChosenSeries, on_pacs: Sequence[str]) -> list[str]:
        with self.index.session() as session:
            have = repo.archived_sops(session, se.series_instance_uid)
        return [sop for sop in on_pacs if sop not in have]

    # --- the PACS side -------------------------------------------------------------------

    def fetch(self, todo: Sequence[ChosenSeries], archived: dict[str, int]) -> dict[str, str]:
        """Fetch what is missing of ``todo`` (the caller holds one association slot; the
        associations opened here follow one another). Returns per series a problem, if any."""
        t = self.target
        partial = [se for se in todo if archived.get(se.series_instance_uid)]
        if t.method == "dicomweb":
            return self._web_fetch(todo, partial)
        problems: dict[str, str] = {}
        storage = self.spool.handle_store if t.method == "get" else None
        contexts = query_contexts(t.method)
        with Session(t.node, t.local_aet, contexts, storage=storage, timeout=t.timeout) as pacs:
            for se in todo:
                # of a series that arrived in part, ask only for the rest
                sops = self.missing_sops(pacs, se) if se in partial else None
                problem = self._dimse_fetch(pacs, se, sops)
                if problem:
                    problems[se.series_instance_uid] = problem
        return problems

    def _web_fetch(
        self, todo: Sequence[ChosenSeries], partial: Sequence[ChosenSeries]
    ) -> dict[str, str]:
        """WADO-RS, each instance into the spool as it arrives; of a series that arrived in
        part, QIDO-RS lists the PACS's instances and only the missing ones are fetched (HTTP
        only: no DIMSE association)."""
        web = self.target.dicomweb
        assert web is not None
        problems: dict[str, str] = {}
        for se in todo:
            study, series = se.study_instance_uid, se.series_instance_uid
            sops: list[str] = []
            if se in partial:
                sops = self.not_archived(se, dicomweb.list_instances(web, study, series))
                if not sops:
                    continue  # the PACS has nothing the archive lacks
            if dicomweb.retrieve_series(web, study, series, self.spool, sops) == 0:
                problems[series] = "gone?"
        return problems

    def _dimse_fetch(self, pacs: Session, se: ChosenSeries, sops: list[str] | None) -> str | None:
        keys = _series_keys(se)
        if sops is not None:
            if not sops:
                return None  # the PACS has nothing the archive lacks
            keys["SOPInstanceUID"] = sops
        t = self.target
        status: RetrieveStatus = (
            pacs.move(keys, t.local_aet) if t.method == "move" else pacs.get(keys)
        )
        if status.completed == 0 and status.failed == 0:
            return "gone?"
        return None if status.ok else status.message

    def still_on_pacs(self, se: ChosenSeries) -> bool:
        keys = _series_keys(se)
        t = self.target
        if t.dicomweb is not None and t.method == "dicomweb":
            with self.throttle.association():
                return dicomweb.series_exists(
                    t.dicomweb, se.study_instance_uid, se.series_instance_uid
                )
        with self.throttle.association(), Session(t.node, t.local_aet, query_contexts("find")) as p:
            return bool(p.find("SERIES", keys, ["SeriesInstanceUID"]))

    # --- one study -----------------------------------------------------------------------

    def study(self, series: list[ChosenSeries]) -> StudyOutcome:
        first = series[0]
        started = time.perf_counter()

        def needs(se: ChosenSeries, counts: dict[str, int]) -> bool:
            have = counts.get(se.series_instance_uid, 0)
            return have == 0 if se.expected_instances is None else have < se.expected_instances

        counts = self.archived(series)
        todo = [se for se in series if needs(se, counts)]
        if not todo:
            self._record(series, counts, {}, attempts=0)
            return self._outcome(series, counts, {}, "already", 0, started)
        if self.stop.is_set():
            return self._outcome(series, counts, {}, RetrievalStatus.PENDING, 0, started)
        try:
            self.throttle.before_study()
        except OutsideWindowError as exc:
            self.paused = str(exc)
            self.stop.set()
            return self._outcome(series, counts, {}, RetrievalStatus.PENDING, 0, started)
        problems: dict[str, tuple[str, str]] = {}
        attempts = 0
        policy = self.throttle.policy
        while True:
            attempts += 1
            problems = {}
            try:
                with self.throttle.association():
                    found = self.fetch(todo, counts)
                problems = {uid: ("transfer_failed", text) for uid, text in found.items()}
            except PacsUnavailableError as exc:
                problems = {se.series_instance_uid: ("pacs_unavailable", str(exc)) for se in todo}
            except PacsError as exc:
                problems = {se.series_instance_uid: ("pacs_error", str(exc)) for se in todo}
            self.ingest_spool()  # keep whatever arrived, even after a failure
            counts = self.archived(series)
            todo = [se for se in todo if needs(se, counts)]
            for se in todo:
                if problems.get(se.series_instance_uid, ("", ""))[1] == "gone?":
                    gone = not self._safe_still_on_pacs(se)
                    problems[se.series_instance_uid] = (
                        ("gone", "the series is no longer in the PACS (deleted after selection)")
                        if gone
                        else ("transfer_failed", "the PACS sent nothing for the series")
                    )
            retryable = [
                se for se in todo if problems.get(se.series_instance_uid, ("",))[0] != "gone"
            ]
            if not retryable or attempts > policy.retries:
                break
            log.info(
                "study %s: %d series not complete after attempt %d; retrying",
                first.study_instance_uid,
                len(retryable),
                attempts,
            )
            self.throttle.pause(policy.backoff(attempts))
            todo = retryable
        self._record(series, counts, problems, attempts)
        outcome = self._outcome(series, counts, problems, None, attempts, started)
        if any(code == "pacs_unavailable" for code, _ in problems.values()):
            self.stop_reason = next(
                text for code, text in problems.values() if code == "pacs_unavailable"
            )
            self.stop.set()
        return outcome

    def _safe_still_on_pacs(self, se: ChosenSeries) -> bool:
        try:
            return self.still_on_pacs(se)
        except PacsError:
            return True  # cannot tell: do not call it gone

    def _status(
        self, se: ChosenSeries, counts: dict[str, int], problems: dict[str, tuple[str, str]]
    ) -> tuple[str, str | None, str | None]:
        have = counts.get(se.series_instance_uid, 0)
        expected = se.expected_instances
        if (expected is None and have > 0) or (expected is not None and have >= expected):
            return RetrievalStatus.COMPLETE, None, None
        code, text = problems.get(se.series_instance_uid, ("incomplete", ""))
        if code == "gone":
            return RetrievalStatus.GONE, code, text
        counted = f"{have} of {expected if expected is not None else '?'} instances in the archive"
        if code in ("pacs_unavailable", "pacs_error", "transfer_failed"):
            return RetrievalStatus.FAILED, code, f"{text}; {counted}"
        return RetrievalStatus.INCOMPLETE, "incomplete", counted

    def _record(
        self,
        series: Sequence[ChosenSeries],
        counts: dict[str, int],
        problems: dict[str, tuple[str, str]],
        attempts: int,
    ) -> None:
        with self.index.session() as session:
            for se in series:
                status, code, text = self._status(se, counts, problems)
                repo.update_retrieval(
                    session,
                    se.series_instance_uid,
                    status=status,
                    archived=counts.get(se.series_instance_uid, 0),
                    method=self.target.method if attempts else None,
                    attempts=attempts,
                    reason_code=code,
                    reason=text,
                )

    def _outcome(
        self,
        series: Sequence[ChosenSeries],
        counts: dict[str, int],
        problems: dict[str, tuple[str, str]],
        status: str | None,
        attempts: int,
        started: float,
    ) -> StudyOutcome:
        rows = []
        for se in series:
            if status == RetrievalStatus.PENDING:
                state, code, text = status, None, None
            else:
                state, code, text = self._status(se, counts, problems)
            rows.append(
                SeriesOutcome(
                    se.series_instance_uid,
                    se.rule,
                    state,
                    se.expected_instances,
                    counts.get(se.series_instance_uid, 0),
                    code,
                    text,
                )
            )
        if status is None:
            order = (
                RetrievalStatus.FAILED,
                RetrievalStatus.GONE,
                RetrievalStatus.INCOMPLETE,
                RetrievalStatus.COMPLETE,
            )
            status = next(s for s in order if any(r.status == s for r in rows))
        return StudyOutcome(
            series[0].study_instance_uid,
            series[0].accession_number,
            status,
            tuple(rows),
            attempts,
            round(time.perf_counter() - started, 3),
        )


def retrieve(
    index: IndexDB,
    store: ArchiveStore,
    scanners: KnownScanners,
    selection_id: int,
    target: RetrieveTarget,
    throttle: Throttle,
    spool_root: Path,
    *,
    progress: Callable[[StudyOutcome], None] | None = None,
    on_instance: Callable[[Received], None] | None = None,
) -> RetrieveOutcome:
    """Retrieve every study of a selection that the archive does not hold completely yet.

    ``progress`` hears of every study done; ``on_instance`` of every instance received.
    """
    started = time.perf_counter()
    with index.session() as session:
        chosen = repo.chosen_series(session, selection_id)
    studies = [list(g) for _, g in groupby(chosen, key=lambda s: s.study_instance_uid)]
    run = _Run(
        index,
        store,
        scanners,
        target,
        throttle,
        Spool(spool_root, on_instance),
        batch=f"retrieve-selection-{selection_id}",
    )
    run.ingest_spool()  # what a crashed run received but did not index
    outcomes: list[StudyOutcome] = []
    scp = (
        StorageSCP(
            run.spool,
            target.local_aet,
            target.scp_port,
            target.scp_host,
            target.calling_aets,
            target.scp_tls,
        )
        if target.method == "move"
        else None
    )
    if scp is not None:
        scp.start()
    try:
        with ThreadPoolExecutor(throttle.policy.max_associations) as pool:
            for outcome in pool.map(run.study, studies):
                outcomes.append(outcome)
                if progress is not None:
                    progress(outcome)
    finally:
        if scp is not None:
            scp.stop()
    if run.stop_reason:
        state, message = "stopped", f"the PACS stayed unavailable: {run.stop_reason}"
    elif run.paused:
        state, message = "paused", run.paused
    elif all(o.status in ("complete", "already") for o in outcomes):
        state, message = "complete", ""
    else:
        state, message = "failures", ""
    return RetrieveOutcome(
        selection_id,
        target.method,
        state,
        tuple(outcomes),
        round(time.perf_counter() - started, 3),
        throttle.peak,
        throttle.opened,
        round(throttle.waited_seconds, 1),
        message,
    )


@dataclass(frozen=True)
class RetrieveSummary:
    """Counts only (no identifier): what flows return and publish."""

    selection_id: int
    method: str
    state: str
    studies: int
    by_status: dict[str, int]
    seconds: float
    associations_peak: int
    message: str

    @classmethod
    def of(cls, outcome: RetrieveOutcome) -> RetrieveSummary:
        statuses = sorted({s.status for s in outcome.studies})
        return cls(
            outcome.selection_id,
            outcome.method,
            outcome.state,
            len(outcome.studies),
            {s: outcome.count(s) for s in statuses},
            outcome.seconds,
            outcome.associations_peak,
            outcome.message,
        )
