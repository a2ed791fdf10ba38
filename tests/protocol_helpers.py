"""Shared by the protocol-run tests (tests/test_protocol_run.py, tests/test_protocol_dask.py):
the PACS loaded with the six dementia-protocol studies, the command line in a child process,
what a run left in the index, and the hand-over of one file's results to the other (the two
files run side by side in the two test workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from cohortflow.models.database import open_index
from cohortflow.models.schema import Biomarker, StageResult, StudyStep
from cohortflow.models.synth import CohortTruth
from cohortflow.pipelines.pacs import orthanc
from cohortflow.pipelines.pacs.dimse import PacsNode, store_files
from cohortflow.pipelines.synth.cohort import CohortResult
from tests.ingest_helpers import free_port, run_folder

STUDIES = 6
BIN = Path(sys.executable).parent
RUN = ["run", "dementia", "--from", "1990-01-01", "--to", "2030-12-31", "--json"]


@dataclass(frozen=True)
class Pacs:
    server: orthanc.OrthancServer
    scp_port: int


@contextmanager
def loaded_pacs(folder: Path, cohort: CohortResult) -> Iterator[Pacs]:
    """A throwaway Orthanc holding ``cohort``, knowing cohortflow's storage SCP."""
    scp_port = free_port()
    config = orthanc.OrthancConfig(
        folder=folder,
        http_port=free_port(),
        dicom_port=free_port(),
        modalities=(orthanc.Modality("cohortflow", "COHORTFLOW", "127.0.0.1", scp_port),),
    )
    with orthanc.OrthancServer(config) as server:
        files = sorted(p for p in (cohort.out_dir / "dicom").rglob("*") if p.is_file())
        node = PacsNode(config.aet, "127.0.0.1", config.dicom_port)
        assert not store_files(node, files, "COHORTFLOW").failed
        yield Pacs(server, scp_port)


def _env(home: Path, pacs: Pacs, model_cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORTFLOW_", "PREFECT_"))}
    env.update(
        COHORTFLOW_HOME=str(home),
        COHORTFLOW_CACHE_DIR=str(model_cache),
        COHORTFLOW_ORTHANC__DICOM_PORT=str(pacs.server.config.dicom_port),
        COHORTFLOW_ORTHANC__HTTP_PORT=str(pacs.server.config.http_port),
        COHORTFLOW_ORTHANC__PASSWORD=pacs.server.config.password,
        COHORTFLOW_RETRIEVE__SCP_PORT=str(pacs.scp_port),
        COHORTFLOW_RETRIEVE__BACKOFF_SECONDS="0.05",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # one project key for every run: the same pseudonyms, so runs can be compared
        COHORTFLOW_PSEUDONYM_KEY_SOURCE="env:CF_TEST_PROJECT_KEY",
        CF_TEST_PROJECT_KEY="0123456789abcdef" * 4,
        **extra,
    )
    return env


@contextmanager
def prefect_server(folder: Path) -> Iterator[Callable[[], str]]:
    """A Prefect server of the tests' own, as a deployment runs one (runs given its
    ``PREFECT_API_URL`` start no private server): started at once, so that it boots while the
    PACS is loaded; yields the function that waits for it and returns its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(folder), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    with (folder / "server.log").open("ab") as log:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def ready() -> str:
        _wait_http(f"{url}/health", timeout=180)
        return url

    try:
        yield ready
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _cohortflow(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen(
            [str(BIN / "cohortflow"), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,  # killable as a group, Dask workers and Prefect server too
        )


def _finish(process: subprocess.Popen[bytes], log: Path, timeout: float = 1500) -> dict[str, Any]:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode in (0, 1), log.read_text(errors="replace")[-4000:]
    return dict(json.loads(out))


def _count(url: str, table: Any, *where: Any) -> int:
    index = open_index(url)
    try:
        with index.session() as session:
            return int(session.scalar(select(func.count()).select_from(table).where(*where)) or 0)
    finally:
        index.dispose()


def _results(url: str) -> dict[str, Any]:
    """What a run produced, comparable across runs and databases."""
    index = open_index(url)
    try:
        with index.session() as session:
            stages = sorted(
                (r.study_uid, r.series_uid, r.stage, r.status, r.reason_code)
                for r in session.scalars(select(StageResult))
            )
            volumes = sorted(
                (
                    b.study_uid,
                    b.series_uid,
                    round(b.icv_ml, 3),
                    round(b.brain_ml, 3),
                    round(b.bpf, 5),
                    b.qc_status,
                )
                for b in session.scalars(select(Biomarker))
            )
            steps = sorted(
                (s.study_uid, s.step, s.status) for s in session.scalars(select(StudyStep))
            )
    finally:
        index.dispose()
    return {"stages": stages, "volumes": volumes, "steps": steps}


def of_studies(results: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``results`` (from ``_results``, read back from JSON) narrowed to the studies ``other``
    holds: their pseudonymized UIDs for stages and volumes, the UIDs as received for steps."""
    pseudonymized = {row[0] for row in other["stages"]}
    received = {row[0] for row in other["steps"]}
    return {
        "stages": [r for r in results["stages"] if r[0] in pseudonymized],
        "volumes": [r for r in results["volumes"] if r[0] in pseudonymized],
        "steps": [r for r in results["steps"] if r[0] in received],
    }


def _assert_complete(outcome: dict[str, Any], truth: CohortTruth) -> None:
    """Every selected series reached its end or stopped with a reason; none was lost; every T1
    the generator left clean yielded biomarkers (the others may be stopped by their fault)."""
    t1s = [se for p in truth.patients for st in p.studies for se in st.series if se.kind == "t1_3d"]
    assert outcome["studies_selected"] == STUDIES
    assert outcome["series_retrieved"] == outcome["series_selected"]
    assert "not_processed" not in outcome["series_reasons"]
    assert outcome["t1_series"] == len(t1s)
    explained = sum(outcome["t1_reasons"].values())
    assert outcome["t1_with_biomarkers"] + explained == outcome["t1_series"]
    assert outcome["t1_with_biomarkers"] >= sum(1 for se in t1s if not se.faults) > 0


def _wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def handed_over(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Where a protocol-run test leaves its results for the other file (this test run's
    folder, the same for both workers)."""
    return run_folder(tmp_path_factory) / f"protocol-{name}.json"


def hand_over(path: Path, payload: dict[str, Any]) -> None:
    temp = path.with_name(path.name + ".part")
    temp.write_text(json.dumps(payload, default=str))
    temp.replace(path)


def wait_for(path: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear in {timeout:.0f} s")
        time.sleep(5)
    return dict(json.loads(path.read_text()))


def comparable(results: dict[str, Any]) -> dict[str, Any]:
    """Results as they read back from JSON (tuples become lists)."""
    return dict(json.loads(json.dumps(results, default=str)))
