"""The protocol flow on a real multi-process Dask cluster (a scheduler and two workers, each its
own process) and PostgreSQL (a throwaway server), over two of the six dementia-protocol studies
of tests/test_protocol_run.py (``--max-studies``: one a worker; in UID order a clean T1 and one
cut off by the field of view, so a measured series and a failed one; the others would only
repeat what these show, at minutes of the suite's time, which must stay under 30 minutes). It
runs in the other test worker while that file's single-process run goes on; that file compares
the two runs' results for these studies, which must be identical.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cohortflow.pipelines.synth.cohort import CohortResult
from tests.ingest_helpers import free_port
from tests.protocol_helpers import (
    BIN,
    RUN,
    STUDIES,
    Pacs,
    _cohortflow,
    _env,
    _finish,
    _results,
    _wait_http,
    hand_over,
    handed_over,
    loaded_pacs,
)
from tests.test_index_postgres import PostgresServer, postgres  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: the studies the Dask run takes (UID order), one for each worker
DASK_STUDIES = 2


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, dementia6: CohortResult) -> Iterator[Pacs]:
    with loaded_pacs(tmp_path_factory.mktemp("orthanc"), dementia6) as found:
        yield found


def test_dask_cluster_and_postgres_run_the_protocol(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pacs: Pacs,
    model_cache: Path,
    dementia6: CohortResult,
    postgres: PostgresServer,  # noqa: F811
    figures: Any,
) -> None:
    """The run, and its results handed over to tests/test_protocol_run.py, which compares
    them with the single-process run (made there at the same time, in the other worker)."""
    results = handed_over(tmp_path_factory, "dask")
    try:
        _dask_run(tmp_path, pacs, model_cache, dementia6, postgres, figures, results)
    except BaseException as exc:
        hand_over(results, {"error": f"{type(exc).__name__}: {exc}"})
        raise


def _dask_run(
    tmp_path: Path,
    pacs: Pacs,
    model_cache: Path,
    dementia6: CohortResult,
    postgres: PostgresServer,  # noqa: F811
    figures: Any,
    results: Path,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    url = postgres.create_database()
    env = _env(home, pacs, model_cache, COHORTFLOW_INDEX_URL=url)
    prefect_port, scheduler_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=api)
    (tmp_path / "prefect").mkdir()
    log = tmp_path / "cluster.log"
    processes: list[subprocess.Popen[bytes]] = []

    def start(args: list[str]) -> None:
        with log.open("ab") as out:
            processes.append(
                subprocess.Popen(
                    args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    try:
        start(
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(prefect_port),
            ]
        )
        scheduler = f"tcp://127.0.0.1:{scheduler_port}"
        start(
            [
                str(BIN / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(scheduler_port),
                "--no-dashboard",
            ]
        )
        for _ in range(2):
            start(
                [
                    str(BIN / "dask"),
                    "worker",
                    scheduler,
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--memory-limit",
                    "0",
                ]
            )
        _wait_http(f"{api}/health")
        from distributed import Client

        with Client(scheduler, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            pids = set(client.run(os.getpid).values())  # one process per worker
        assert len(pids) == 2 and os.getpid() not in pids
        started = time.monotonic()
        outcome = _finish(
            _cohortflow(
                [*RUN, "--dask-address", scheduler, "--max-studies", str(DASK_STUDIES)],
                env,
                tmp_path / "cli.log",
            ),
            tmp_path / "cli.log",
        )
        seconds = time.monotonic() - started
    finally:
        for process in reversed(processes):
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    # the ones it took each reached their end: every step done (or blocked by a failed one)
    ran = _results(url)
    taken = {row[0] for row in ran["steps"]}
    assert len(taken) == DASK_STUDIES and outcome["studies_selected"] == STUDIES
    assert {status for _, _, status in ran["steps"]} <= {"done", "blocked"}
    assert {row[1] for row in ran["stages"]} >= {row[1] for row in ran["volumes"]}
    hand_over(results, {"outcome": outcome, "results": ran})
    figures(
        f"protocol run on Dask (scheduler + 2 worker processes) and PostgreSQL: {DASK_STUDIES} "
        f"of the {STUDIES} studies in {seconds:.0f} s (compared with the single-process run in "
        "tests/test_protocol_run.py)"
    )
