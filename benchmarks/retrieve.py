"""Retrieval throughput from a real Orthanc: C-MOVE, C-GET and DICOMweb WADO-RS on the same studies.

    python benchmarks/retrieve.py [--quick] [--studies N] [--rounds N] [--work DIR] [--cache DIR]

1. Generates a synthetic cohort of N brain studies (default 20; protocols dementia, ms and open,
   so every study is selected) and loads it into the project's own Orthanc over C-STORE.
2. For each method, in a fixed order (move, get, dicomweb), into a fresh index, archive and spool:
   selects the three protocols (C-FIND, not timed) and retrieves the three selections with the
   default retrieval policy (one association). The time is that of the three retrieve calls:
   fetching, ingesting the spool and counting in the index.
3. Repeats the whole three-method round ``--rounds`` times (default 2) and reports the median per
   method, so that neither the order nor a cold cache makes the figures.

Every retrieval must end "complete" (else the problems are printed and the exit status is 1).
Without ``--work`` everything is written to a temporary folder, removed at the end unless the
benchmark failed (then its path is printed: the Orthanc log is in it).
Prints its figures last, one ``name: value`` a line.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from cohortflow.models.database import open_index
from cohortflow.models.scanners import KnownScanners, load_known_scanners
from cohortflow.models.synth import SynthConfig
from cohortflow.pipelines.archive.store import ArchiveStore
from cohortflow.pipelines.dicom.protocols import load_protocols
from cohortflow.pipelines.pacs import orthanc
from cohortflow.pipelines.pacs.dicomweb import DicomWebNode
from cohortflow.pipelines.pacs.dimse import PacsNode, store_files
from cohortflow.pipelines.retrieve.engine import RetrieveOutcome, RetrieveTarget, retrieve
from cohortflow.pipelines.retrieve.throttle import RetrievePolicy, Throttle
from cohortflow.pipelines.select.query import record_selection, select_studies
from cohortflow.pipelines.synth.cohort import generate

AET = "COHORTFLOW"
METHODS = ("move", "get", "dicomweb")
PROTOCOLS = ("dementia", "ms", "open")
EVER = (date(1990, 1, 1), date(2030, 12, 31))
SEED = 2026


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the servers the benchmark starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Pacs:
    server: orthanc.OrthancServer
    node: PacsNode
    scp_port: int

    def target(self, method: str) -> RetrieveTarget:
        config = self.server.config
        web = DicomWebNode(self.server.url + "/dicom-web", config.username, config.password)
        return RetrieveTarget(self.node, AET, method, scp_port=self.scp_port, dicomweb=web)


@dataclass(frozen=True)
class Run:
    """One method's retrieval of every selection into a fresh index and archive."""

    method: str
    select_seconds: float
    retrieve_seconds: float
    studies: int
    instances: int
    archive_bytes: int
    problems: tuple[str, ...]


def _problems(outcome: RetrieveOutcome) -> list[str]:
    if outcome.state == "complete":
        return []
    lines = [
        f"{outcome.method} selection {outcome.selection_id}: {outcome.state} {outcome.message}"
    ]
    for study in outcome.studies:
        if study.status in ("complete", "already"):
            continue
        lines.append(f"  study {study.study_instance_uid}: {study.status}")
        lines.extend(
            f"    series {se.series_instance_uid}: {se.status} ({se.reason_code}: {se.reason})"
            for se in study.series
            if se.status != "complete"
        )
    return lines


def run_method(pacs: Pacs, scanners: KnownScanners, method: str, folder: Path) -> Run:
    """Select the three protocols into a fresh index, then time retrieving them by ``method``."""
    folder.mkdir(parents=True)
    index = open_index(f"sqlite:///{folder / 'index.sqlite'}")
    try:
        protocols = load_protocols()
        started = time.perf_counter()
        ids = [
            record_selection(
                index,
                select_studies(pacs.node, AET, protocols.get(name), *EVER),
                Path(protocols.source),
            )
            for name in PROTOCOLS
        ]
        select_seconds = time.perf_counter() - started
        store = ArchiveStore(folder / "archive")
        target = pacs.target(method)
        outcomes = []
        seconds = 0.0
        for selection_id in ids:
            throttle = Throttle(RetrievePolicy())
            started = time.perf_counter()
            outcome = retrieve(
                index, store, scanners, selection_id, target, throttle, folder / "spool"
            )
            seconds += time.perf_counter() - started
            outcomes.append(outcome)
    finally:
        index.dispose()
    studies = {s.study_instance_uid for o in outcomes for s in o.studies}
    instances = sum(se.archived for o in outcomes for s in o.studies for se in s.series)
    size = sum(p.stat().st_size for p in (folder / "archive").rglob("*") if p.is_file())
    problems = tuple(line for o in outcomes for line in _problems(o))
    return Run(method, select_seconds, seconds, len(studies), instances, size, problems)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5 studies and 1 round")
    parser.add_argument("--studies", type=int, default=None, help="studies (default 20)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of all three (default 2)")
    parser.add_argument("--work", type=Path, default=None, help="keep everything in this folder")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="head model cache (default $COHORTFLOW_TEST_CACHE, else <work>/cache)",
    )
    args = parser.parse_args()
    n = args.studies or (5 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 2)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if not orthanc.available():
        print(
            "error: Orthanc is not installed; run `make setup` as root "
            "(Debian packages orthanc and orthanc-dicomweb)",
            file=sys.stderr,
        )
        sys.exit(2)

    temporary = args.work is None
    if args.work is None:
        work = Path(tempfile.mkdtemp(prefix="cohortflow-retrieve-"))
    else:
        work = args.work.resolve()
        for stale in ("cohort", "orthanc", "runs"):  # this benchmark's own folders only
            shutil.rmtree(work / stale, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
    cache = args.cache or Path(os.environ.get("COHORTFLOW_TEST_CACHE") or work / "cache")
    code = 1
    try:
        code, figures = _benchmark(work, cache, n, rounds)
    finally:
        if temporary and code == 0:
            shutil.rmtree(work, ignore_errors=True)
        elif temporary:
            # a failure keeps the Orthanc log and the runs' indexes for a person to look at
            print(f"work folder kept: {work} (orthanc/orthanc.log)", file=sys.stderr)
    if code:
        sys.exit(code)
    for name, value in figures.items():
        print(f"{name}: {value}")


def _benchmark(work: Path, cache: Path, n: int, rounds: int) -> tuple[int, dict[str, str]]:
    """Returns (exit status, figures)."""
    figures: dict[str, str] = {}
    started = time.perf_counter()
    weights = {"dementia": 0.4, "ms": 0.3, "open": 0.3}
    cohort = generate(
        SynthConfig(studies=n, seed=SEED, protocol_weights=weights),
        work / "cohort",
        cache,
        workers=2,
    )
    figures["generate_seconds"] = f"{time.perf_counter() - started:.1f}"
    files = sorted(p for p in (cohort.out_dir / "dicom").rglob("*") if p.is_file())
    scanners = load_known_scanners(None)

    scp_port = free_port()
    config = orthanc.OrthancConfig(
        folder=work / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        modalities=(orthanc.Modality("cohortflow", AET, "127.0.0.1", scp_port),),
    )
    with orthanc.OrthancServer(config) as server:
        node = PacsNode(config.aet, "127.0.0.1", config.dicom_port)
        started = time.perf_counter()
        loaded = store_files(node, files, AET)
        figures["load_seconds"] = f"{time.perf_counter() - started:.1f}"
        if loaded.failed:
            print(f"error: Orthanc refused {len(loaded.failed)} files:", file=sys.stderr)
            for path, reason in loaded.failed[:20]:
                print(f"  {path}: {reason}", file=sys.stderr)
            return 1, figures
        figures["loaded_instances"] = str(loaded.sent)
        pacs = Pacs(server, node, scp_port)
        runs: dict[str, list[Run]] = {method: [] for method in METHODS}
        for number in range(1, rounds + 1):
            for method in METHODS:
                run = run_method(pacs, scanners, method, work / "runs" / f"{number}-{method}")
                if run.problems:
                    print(f"error: round {number}, {method} is not complete:", file=sys.stderr)
                    print("\n".join(run.problems), file=sys.stderr)
                    return 1, figures
                runs[method].append(run)

    every = [run for method_runs in runs.values() for run in method_runs]
    counts = {(run.studies, run.instances) for run in every}
    if len(counts) != 1:
        print("error: the methods retrieved different amounts:", file=sys.stderr)
        for run in every:
            print(
                f"  {run.method}: {run.studies} studies, {run.instances} instances", file=sys.stderr
            )
        return 1, figures
    studies, instances = counts.pop()
    first = runs[METHODS[0]][0]
    figures["rounds"] = str(rounds)
    figures["select_seconds"] = f"{first.select_seconds:.2f}"
    figures["studies"] = str(studies)
    figures["instances"] = str(instances)
    figures["archive_megabytes"] = f"{first.archive_bytes / 1e6:.0f}"
    for method in METHODS:
        seconds = statistics.median(run.retrieve_seconds for run in runs[method])
        figures[f"{method}_seconds"] = f"{seconds:.2f}"
        figures[f"{method}_studies_per_minute"] = f"{studies / seconds * 60:.1f}"
        figures[f"{method}_instances_per_second"] = f"{instances / seconds:.0f}"
        size = runs[method][0].archive_bytes
        figures[f"{method}_megabytes_per_second"] = f"{size / seconds / 1e6:.1f}"
    return 0, figures


if __name__ == "__main__":
    main()
