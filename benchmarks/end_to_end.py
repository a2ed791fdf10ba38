"""End-to-end throughput of a protocol run: PACS query to biomarkers, with 1 and 2 Dask workers.

    python benchmarks/end_to_end.py [--quick] [--studies N] [--work DIR] [--cache DIR]
                                    [--baseline CHECKOUT]

1. Generates N dementia-protocol studies (default 10; --quick 4) and loads them into a
   throwaway Orthanc over C-STORE (not timed).
2. Runs ``cohortflow run dementia`` as users do (a child process: a private Prefect server, a
   local Dask cluster) into a fresh home, once with ``--workers 1`` and once with
   ``--workers 2``, in that order. Each run's wall time covers everything: Prefect and Dask
   start-up, C-FIND, C-MOVE, ingest, anonymize, deface, QC, convert, volumetry, the outcome.
3. Reports studies per hour for each, the speed-up of 2 workers over 1, the processor seconds
   per study (every process the run started, from the kernel's accounting of the child
   processes), and per step the share of the work and its processor seconds per study (from
   the index, where each step records its own), beside the part of the wall time spent before
   the first study step (start-up, selection and retrieval).
4. ``--baseline CHECKOUT``: the same runs first with the code of another checkout of the
   repository (``git worktree add /tmp/base <commit>``), on the same cohort and PACS, its
   figures prefixed ``baseline_``, and the ratios of the two. A baseline too old to record a
   step's processor seconds shows its wall seconds per step only.

Prints its figures last, one ``name: value`` a line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.orm import Session

from cohortflow.models.synth import SynthConfig
from cohortflow.pipelines.pacs import orthanc
from cohortflow.pipelines.pacs.dimse import PacsNode, store_files
from cohortflow.pipelines.synth.cohort import generate

AET = "COHORTFLOW"
ROOT = Path(__file__).resolve().parent.parent
STEPS = ("anonymize", "deface", "qc", "convert", "volumetry", "release")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_once(
    home: Path,
    server: orthanc.OrthancServer,
    scp_port: int,
    cache: Path,
    workers: int,
    code: Path | None = None,
) -> tuple[float, float, dict[str, object]]:
    """Wall seconds, processor seconds (the run's processes, children included) and outcome."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORTFLOW_", "PREFECT_"))}
    env.update(
        COHORTFLOW_HOME=str(home),
        COHORTFLOW_CACHE_DIR=str(cache),
        # the head model is shared, the head fits are not: each measured run registers every
        # head (a fit kept by an earlier run would be read instead, Settings.fits)
        COHORTFLOW_FITS_DIR=str(home / "fits"),
        COHORTFLOW_ORTHANC__DICOM_PORT=str(server.config.dicom_port),
        COHORTFLOW_ORTHANC__HTTP_PORT=str(server.config.http_port),
        COHORTFLOW_ORTHANC__PASSWORD=server.config.password,
        COHORTFLOW_RETRIEVE__SCP_PORT=str(scp_port),
    )
    if code is not None:  # the other checkout's packages come first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    entry = [str(Path(sys.executable).with_name("cohortflow"))]
    if code is not None and not (code / "cohortflow" / "__init__.py").is_file():
        # a checkout from before the one ``cohortflow`` namespace: its command line under its own
        # name (this environment's script would import this checkout's code)
        entry = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]
    command = [
        *entry,
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
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, check=False, cwd=code or ROOT
    )
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode not in (0, 1):
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"cohortflow run failed ({done.returncode}); see above")
    return seconds, cpu, dict(json.loads(done.stdout))


def step_seconds(home: Path) -> tuple[dict[str, float], dict[str, float], float]:
    """Summed wall and processor seconds per step (no processor seconds from a baseline whose
    index does not record them), and the seconds from the run's start to its first step."""
    # read as the run left it: open_index would bring a baseline's index up to this schema
    # first (and show its missing processor seconds as zeros)
    engine = create_engine(f"sqlite:///{home / 'index.sqlite'}")
    try:
        with Session(engine) as session:
            columns = {c["name"] for c in inspect(session.connection()).get_columns("study_steps")}
            cpu_column = ", cpu_seconds" if "cpu_seconds" in columns else ""
            rows = session.execute(
                text(f"SELECT step, seconds, recorded_at{cpu_column} FROM study_steps")
            ).all()
            started = session.execute(text("SELECT started_at FROM runs ORDER BY id")).first()
    finally:
        engine.dispose()
    wall: dict[str, float] = defaultdict(float)
    cpu: dict[str, float] = defaultdict(float)
    for row in rows:
        wall[row[0]] += row[1] or 0.0
        if cpu_column and row[3] is not None:  # none recorded by a baseline's code
            cpu[row[0]] += row[3]
    assert started is not None
    recorded = [(_moment(r[2]) - dt.timedelta(seconds=r[1] or 0.0)) for r in rows]
    return dict(wall), dict(cpu), (min(recorded) - _moment(started[0])).total_seconds()


def _moment(value: object) -> dt.datetime:
    """A stored time as naive UTC (SQLite keeps the text)."""
    found = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return (
        found.replace(tzinfo=None)
        if found.tzinfo is None
        else found.astimezone(dt.UTC).replace(tzinfo=None)
    )


def measure(
    label: str,
    code: Path | None,
    work: Path,
    server: orthanc.OrthancServer,
    scp_port: int,
    cache: Path,
    studies: int,
) -> dict[str, float]:
    """Runs with 1 and 2 workers: the figures, by name (``label`` prefixes them)."""
    figures: dict[str, float] = {}
    homes = {}
    for workers in (1, 2):
        home = work / f"home-{label or 'current'}-{workers}"
        shutil.rmtree(home, ignore_errors=True)
        seconds, processor, outcome = run_once(home, server, scp_port, cache, workers, code)
        homes[workers] = home
        figures[f"workers_{workers}_seconds"] = seconds
        figures[f"workers_{workers}_studies_per_hour"] = studies / seconds * 3600
        figures[f"workers_{workers}_cpu_seconds_per_study"] = processor / studies
        t1 = f"{outcome['t1_with_biomarkers']}/{outcome['t1_series']}"
        print(f"{label or 'current'}, {workers} worker(s): T1s with biomarkers {t1}", flush=True)
    figures["speedup_2_over_1"] = figures["workers_1_seconds"] / figures["workers_2_seconds"]
    wall, cpu, before = step_seconds(homes[1])
    work_seconds = sum(wall.values())
    figures["workers_1_before_first_step_seconds"] = before
    for step in STEPS:
        figures[f"share_{step}_percent"] = (
            100 * wall.get(step, 0.0) / work_seconds if work_seconds else 0.0
        )
        figures[f"per_study_{step}_seconds"] = wall.get(step, 0.0) / studies
        if cpu:
            figures[f"per_study_{step}_cpu_seconds"] = cpu.get(step, 0.0) / studies
    if cpu:
        figures["per_study_steps_cpu_seconds"] = sum(cpu.values()) / studies
    return {f"{label}_{k}" if label else k: v for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 studies")
    parser.add_argument("--studies", type=int)
    parser.add_argument("--work", type=Path, help="keep everything here (default: temporary)")
    parser.add_argument("--cache", type=Path, help="head model cache (default: under --work)")
    parser.add_argument(
        "--baseline", type=Path, help="a checkout of the code to measure first, for comparison"
    )
    args = parser.parse_args()
    studies = args.studies or (4 if args.quick else 10)
    # absolute: Orthanc and the runs start in other folders
    work = (args.work or Path(tempfile.mkdtemp(prefix="cohortflow-e2e-"))).resolve()
    cache = (args.cache or Path(os.environ.get("COHORTFLOW_TEST_CACHE", work / "cache"))).resolve()
    config = SynthConfig(studies=studies, seed=11, protocol_weights={"dementia": 1.0})
    cohort = generate(config, work / "cohort", cache, workers=2, overwrite=True)
    scp_port = free_port()
    pacs_config = orthanc.OrthancConfig(
        folder=work / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        modalities=(orthanc.Modality("cohortflow", AET, "127.0.0.1", scp_port),),
    )
    figures: dict[str, float] = {"studies": studies, "cpus": float(os.cpu_count() or 0)}
    with orthanc.OrthancServer(pacs_config) as server:
        files = sorted(p for p in (cohort.out_dir / "dicom").rglob("*") if p.is_file())
        node = PacsNode(pacs_config.aet, "127.0.0.1", pacs_config.dicom_port)
        store_files(node, files, AET)
        if args.baseline is not None:
            figures |= measure(
                "baseline", args.baseline.resolve(), work, server, scp_port, cache, studies
            )
        figures |= measure("", None, work, server, scp_port, cache, studies)
    if args.baseline is not None:
        for name in (
            "workers_1_cpu_seconds_per_study",
            "workers_2_cpu_seconds_per_study",
            "workers_2_studies_per_hour",
            "workers_1_studies_per_hour",
        ):
            figures[f"{name}_ratio_to_baseline"] = figures[name] / figures[f"baseline_{name}"]
    for name, value in figures.items():
        shown = f"{value:.0f}" if name in ("studies", "cpus") else f"{value:.2f}"
        print(f"{name}: {shown}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
