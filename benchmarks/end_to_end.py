"""End-to-end throughput of a protocol run: PACS query to biomarkers, with 1 and 2 Dask workers.

    python benchmarks/end_to_end.py [--quick] [--studies N] [--work DIR] [--cache DIR]

1. Generates N dementia-protocol studies (default 10; --quick 4) and loads them into a
   throwaway Orthanc over C-STORE (not timed).
2. Runs ``cohortflow run dementia`` as users do (a child process: a private Prefect server, a
   local Dask cluster) into a fresh home, once with ``--workers 1`` and once with
   ``--workers 2``, in that order. Each run's wall time covers everything: Prefect and Dask
   start-up, C-FIND, C-MOVE, ingest, anonymize, deface, QC, convert, volumetry, the outcome.
3. Reports studies per hour for each, the speed-up of 2 workers over 1, and the share of the
   work per step (summed step seconds of the 1-worker run, from the index) beside the part of
   the wall time spent before the first study step (start-up, selection and retrieval).

Prints its figures last, one ``name: value`` a line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from sqlalchemy import select

from models.database import open_index
from models.schema import Run, StudyStep
from models.synth import SynthConfig
from pipelines.pacs import orthanc
from pipelines.pacs.dimse import PacsNode, store_files
from pipelines.synth.cohort import generate

AET = "COHORTFLOW"
STEPS = ("anonymize", "deface", "qc", "convert", "volumetry")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_once(
    home: Path, server: orthanc.OrthancServer, scp_port: int, cache: Path, workers: int
) -> tuple[float, dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORTFLOW_", "PREFECT_"))}
    env.update(
        COHORTFLOW_HOME=str(home),
        COHORTFLOW_CACHE_DIR=str(cache),
        COHORTFLOW_ORTHANC__DICOM_PORT=str(server.config.dicom_port),
        COHORTFLOW_ORTHANC__HTTP_PORT=str(server.config.http_port),
        COHORTFLOW_ORTHANC__PASSWORD=server.config.password,
        COHORTFLOW_RETRIEVE__SCP_PORT=str(scp_port),
    )
    command = [
        str(Path(sys.executable).with_name("cohortflow")),
        "run",
        "dementia",
        "--from",
        "1990-01-01",
        "--to",
        "2030-12-31",
        "--workers",
        str(workers),
        "--json",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"cohortflow run failed ({done.returncode}); see above")
    return seconds, dict(json.loads(done.stdout))


def step_seconds(home: Path) -> tuple[dict[str, float], float]:
    """Summed seconds per step, and the seconds from the run's start to its first step."""
    index = open_index(f"sqlite:///{home / 'index.sqlite'}")
    try:
        with index.session() as session:
            rows = list(session.scalars(select(StudyStep)))
            run = session.scalars(select(Run).order_by(Run.id)).first()
    finally:
        index.dispose()
    totals: dict[str, float] = defaultdict(float)
    for row in rows:
        totals[row.step] += row.seconds or 0.0
    assert run is not None
    first = min(r.recorded_at - dt.timedelta(seconds=r.seconds or 0.0) for r in rows)
    started = run.started_at
    if first.tzinfo is None:
        started = started.replace(tzinfo=None)
    return dict(totals), (first - started).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 studies")
    parser.add_argument("--studies", type=int)
    parser.add_argument("--work", type=Path, help="keep everything here (default: temporary)")
    parser.add_argument("--cache", type=Path, help="head model cache (default: under --work)")
    args = parser.parse_args()
    studies = args.studies or (4 if args.quick else 10)
    work = args.work or Path(tempfile.mkdtemp(prefix="cohortflow-e2e-"))
    cache = args.cache or Path(os.environ.get("COHORTFLOW_TEST_CACHE", work / "cache"))
    config = SynthConfig(studies=studies, seed=11, protocol_weights={"dementia": 1.0})
    cohort = generate(config, work / "cohort", cache, workers=2, overwrite=True)
    scp_port = free_port()
    pacs_config = orthanc.OrthancConfig(
        folder=work / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        modalities=(orthanc.Modality("cohortflow", AET, "127.0.0.1", scp_port),),
    )
    figures: dict[str, str] = {"studies": str(studies), "cpus": str(os.cpu_count())}
    with orthanc.OrthancServer(pacs_config) as server:
        files = sorted(p for p in (cohort.out_dir / "dicom").rglob("*") if p.is_file())
        node = PacsNode(pacs_config.aet, "127.0.0.1", pacs_config.dicom_port)
        store_files(node, files, AET)
        results = {}
        for workers in (1, 2):
            home = work / f"home-{workers}"
            shutil.rmtree(home, ignore_errors=True)
            seconds, outcome = run_once(home, server, scp_port, cache, workers)
            results[workers] = (seconds, outcome, home)
            figures[f"workers_{workers}_seconds"] = f"{seconds:.0f}"
            figures[f"workers_{workers}_studies_per_hour"] = f"{studies / seconds * 3600:.1f}"
            figures[f"workers_{workers}_t1_with_biomarkers"] = (
                f"{outcome['t1_with_biomarkers']}/{outcome['t1_series']}"
            )
    figures["speedup_2_over_1"] = f"{results[1][0] / results[2][0]:.2f}"
    totals, before = step_seconds(results[1][2])
    work_seconds = sum(totals.values())
    figures["workers_1_before_first_step_seconds"] = f"{before:.0f}"
    for step in STEPS:
        share = totals.get(step, 0.0) / work_seconds if work_seconds else 0.0
        figures[f"share_{step}"] = f"{100 * share:.1f} %"
        figures[f"per_study_{step}_seconds"] = f"{totals.get(step, 0.0) / studies:.1f}"
    for name, value in figures.items():
        print(f"{name}: {value}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
