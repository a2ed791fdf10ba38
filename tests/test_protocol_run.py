"""The protocol flow end to end: Orthanc -> select -> retrieve -> anonymize -> deface -> QC ->
convert -> volumetry -> success rates, over ten dementia-protocol studies, run by the command line
in a child process (as users run it).

1. SQLite, a local one-worker Dask cluster, killed (SIGKILL, the whole process group) once four
   studies are measured, then rerun: it finishes, with no duplicate and no lost series, and a
   third run redoes nothing.
2. PostgreSQL and a real multi-process Dask cluster (a scheduler and two workers started as
   their own processes, one Prefect server for all): the same results as run 1.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from models.database import open_index
from models.schema import AuditEntry, Biomarker, Linkage, StageResult, StudyStep
from models.synth import CohortTruth
from pipelines.pacs import orthanc
from pipelines.pacs.dimse import PacsNode, store_files
from pipelines.synth.cohort import CohortResult
from tests.ingest_helpers import free_port
from tests.test_index_postgres import PostgresServer, postgres  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDIES = 10
BIN = Path(sys.executable).parent
RUN = ["run", "dementia", "--from", "1990-01-01", "--to", "2030-12-31", "--json"]


@dataclass(frozen=True)
class Pacs:
    server: orthanc.OrthancServer
    scp_port: int


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, dementia10: CohortResult) -> Iterator[Pacs]:
    scp_port = free_port()
    config = orthanc.OrthancConfig(
        folder=tmp_path_factory.mktemp("orthanc"),
        http_port=free_port(),
        dicom_port=free_port(),
        modalities=(orthanc.Modality("cohortflow", "COHORTFLOW", "127.0.0.1", scp_port),),
    )
    with orthanc.OrthancServer(config) as server:
        files = sorted(p for p in (dementia10.out_dir / "dicom").rglob("*") if p.is_file())
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
                (r.series_uid, r.stage, r.status, r.reason_code)
                for r in session.scalars(select(StageResult))
            )
            volumes = sorted(
                (
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


@pytest.fixture(scope="module")
def killed_and_resumed(
    tmp_path_factory: pytest.TempPathFactory,
    pacs: Pacs,
    model_cache: Path,
    dementia10: CohortResult,
) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("single")
    url = f"sqlite:///{home / 'index.sqlite'}"
    env = _env(home, pacs, model_cache)
    log = home / "cli.log"
    args = [*RUN, "--workers", "1"]
    started = time.monotonic()
    first = _cohortflow(args, env, log)
    # kill it once four studies are measured (mid-run: the rest are on their way)
    while time.monotonic() - started < 1500:
        time.sleep(2)
        if first.poll() is not None:
            break
        if (home / "index.sqlite").is_file() and _count(
            url, StudyStep, StudyStep.step == "volumetry", StudyStep.status == "done"
        ) >= 4:
            break
    assert first.poll() is None, "the run ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = _count(url, StudyStep, StudyStep.step == "volumetry")
    assert 4 <= done_before < STUDIES
    seconds_first = time.monotonic() - started

    started = time.monotonic()
    outcome = _finish(_cohortflow(args, env, log), log)
    seconds_rerun = time.monotonic() - started
    started = time.monotonic()
    again = _finish(_cohortflow(args, env, log), log)
    seconds_again = time.monotonic() - started
    return {
        "url": url,
        "home": home,
        "outcome": outcome,
        "again": again,
        "done_before": done_before,
        "truth": dementia10.truth,
        "seconds": (seconds_first, seconds_rerun, seconds_again),
    }


def test_killed_run_resumes_without_duplicates_or_lost_series(
    killed_and_resumed: dict[str, Any], figures: Any
) -> None:
    url, outcome = killed_and_resumed["url"], killed_and_resumed["outcome"]
    _assert_complete(outcome, killed_and_resumed["truth"])
    assert outcome["state"] == "completed"
    # one row per key: stage results per (series, stage), steps per (study, step), one
    # biomarker row per T1 and one linkage row per patient
    results = _results(url)
    assert len({(s, st) for s, st, *_ in results["stages"]}) == len(results["stages"])
    assert len(results["steps"]) == STUDIES * 5
    assert {status for *_, status in results["steps"]} == {"done"}
    assert _count(url, Biomarker) == outcome["t1_with_biomarkers"] + sum(
        1 for v in results["volumes"] if v[-1] == "fail"
    )
    patients = _count(url, Linkage)
    assert 1 <= patients <= STUDIES
    # a third run finds everything done and changes nothing
    assert killed_and_resumed["again"]["t1_with_biomarkers"] == outcome["t1_with_biomarkers"]
    assert _results(url) == results
    # every output is pseudonymized: no planted identifier in the deliverable folders' names
    outputs = killed_and_resumed["home"] / "outputs" / "dementia"
    assert any(outputs.rglob("*_T1w.nii.gz"))
    first, rerun, again = killed_and_resumed["seconds"]
    figures(
        f"protocol run, {STUDIES} dementia studies, 1 worker: killed after "
        f"{killed_and_resumed['done_before']} measured studies at {first:.0f} s, rerun "
        f"finished in {rerun:.0f} s, a third run (nothing to do) {again:.0f} s; "
        f"T1s with biomarkers {outcome['t1_with_biomarkers']}/{outcome['t1_series']}, "
        f"reasons {outcome['t1_reasons']}"
    )


def _wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def test_dask_cluster_and_postgres_give_the_single_process_results(
    tmp_path: Path,
    pacs: Pacs,
    model_cache: Path,
    postgres: PostgresServer,  # noqa: F811
    killed_and_resumed: dict[str, Any],
    figures: Any,
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
            _cohortflow([*RUN, "--dask-address", scheduler], env, tmp_path / "cli.log"),
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
    _assert_complete(outcome, killed_and_resumed["truth"])
    single = killed_and_resumed["outcome"]
    own = ("run_id", "selection_id")  # each run stores its own run and selection rows
    assert {k: v for k, v in outcome.items() if k not in own} == {
        k: v for k, v in single.items() if k not in own
    }
    assert _results(url) == _results(killed_and_resumed["url"])
    figures(
        f"protocol run on Dask (scheduler + 2 worker processes) and PostgreSQL: {STUDIES} "
        f"studies in {seconds:.0f} s, results identical to the single-process run"
    )


# --- the QC dashboard in a real browser, and the biomarker export, over the run --------------

CHROMIUM = Path("/usr/bin/chromium")
PASSWORD = "a long test password"
#: screenshots of the browser test (CI keeps this folder as the test's artefacts)
ARTIFACTS = Path(
    os.environ.get("COHORTFLOW_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")
)


def _labels(truth: CohortTruth, path: Path) -> dict[str, str]:
    """The clinical labels a radiology report would give: diagnosis by accession number (a
    reused accession number keeps its first study's label)."""
    by_accession: dict[str, str] = {}
    for patient in truth.patients:
        for study in patient.studies:
            by_accession.setdefault(study.accession_number, patient.group)
    path.write_text(
        "accession_number,diagnosis\n" + "".join(f"{a},{d}\n" for a, d in by_accession.items())
    )
    return by_accession


def _status(url: str) -> tuple[int, str]:
    """Status and Location of a GET that follows no redirect."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(url, timeout=10) as answer:
            return answer.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location", "")


def test_the_dashboard_in_chromium_and_the_export_over_the_run(
    killed_and_resumed: dict[str, Any], tmp_path: Path, figures: Any
) -> None:
    from playwright.sync_api import sync_playwright

    from tests.test_anonymize import _found, _planted

    home, url, truth = (killed_and_resumed[k] for k in ("home", "url", "truth"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORTFLOW_", "PREFECT_"))}
    env["COHORTFLOW_HOME"] = str(home)
    for name, role in (("rita", "reviewer"), ("sam", "researcher")):
        subprocess.run(
            [str(BIN / "cohortflow"), "users", "add", name, "--role", role, "--password-stdin"],
            input=PASSWORD.encode(),
            env=env,
            check=True,
            capture_output=True,
        )
    # the export from the command line: the index's volumes, exactly
    labels = _labels(truth, tmp_path / "clinical.csv")
    exported = tmp_path / "biomarkers.csv"
    done = subprocess.run(
        [
            str(BIN / "cohortflow"),
            *("export", "biomarkers", "--protocol", "dementia", "--json"),
            *("--labels", str(tmp_path / "clinical.csv"), "--out", str(exported)),
        ],
        env=env,
        capture_output=True,
        check=True,
    )
    assert json.loads(done.stdout)["rows"] == _count(url, Biomarker)
    index = open_index(url)
    try:
        with index.session() as session:
            stored = {b.series_uid: b for b in session.scalars(select(Biomarker))}
            t1_failed = session.scalars(
                select(StageResult.series_uid).where(
                    StageResult.stage.in_(("header_qc", "image_qc")), StageResult.status == "fail"
                )
            ).first()
    finally:
        index.dispose()
    rows = list(csv.DictReader(exported.open()))
    assert {r["series"] for r in rows} == set(stored)
    for row in rows:
        b = stored[row["series"]]
        volumes = ("icv_ml", "gm_ml", "wm_ml", "csf_ml", "brain_ml", "bpf")
        assert [float(row[k]) for k in volumes] == [getattr(b, k) for k in volumes]
        assert row["diagnosis"] in set(labels.values()) and row["pseudonym"]
    planted = _planted(truth)
    assert not _found(planted, exported.read_bytes())

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "dashboard.log"
    with log.open("ab") as out:
        server = subprocess.Popen(
            [str(BIN / "cohortflow"), "dashboard", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    shots = ARTIFACTS / "dashboard"
    shots.mkdir(parents=True, exist_ok=True)
    seen: list[bytes] = []
    try:
        _wait_http(f"{base}/login", 60)
        # without a session: the API answers 401, pages send to the login
        assert _status(f"{base}/api/overview")[0] == 401
        assert _status(f"{base}/api/export/biomarkers")[0] == 401
        code, location = _status(f"{base}/failures?stage=image_qc")
        assert code == 303 and location.startswith("/login?next=")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
            )
            context = browser.new_context(
                accept_downloads=True, viewport={"width": 1400, "height": 1000}
            )
            page = context.new_page()

            def login(name: str) -> None:
                page.goto(f"{base}/")
                assert "/login" in page.url
                page.fill("input[name=username]", name)
                page.fill("input[name=password]", PASSWORD)
                page.click("form.login button[type=submit]")
                page.wait_for_selector("[data-testid=who]")

            def shown(img: str) -> int:
                """The natural width of a loaded picture (0: not loaded)."""
                locator = page.locator(img)
                locator.scroll_into_view_if_needed()
                page.wait_for_function(
                    "(el) => el.complete", arg=locator.element_handle(), timeout=30_000
                )
                return int(locator.evaluate("(el) => el.naturalWidth"))

            login("rita")
            assert page.locator("[data-testid=protocol-dementia]").is_visible()
            assert "T1s with biomarkers" in page.content()
            page.screenshot(path=str(shots / "1-overview.png"), full_page=True)
            seen.append(page.content().encode())
            # the failure list, filtered in the URL by a choice of the form
            page.click("header nav >> text=Failures")
            page.select_option("[data-testid=filter-stage]", "image_qc")
            page.click("[data-testid=apply]")
            page.wait_for_url("**/failures?*stage=image_qc*")
            listed = page.locator("[data-testid=failures] a.uid")
            assert listed.count() >= 1
            assert set(
                page.locator("[data-testid=failures] tbody td:nth-child(3)").all_inner_texts()
            ) == {"image_qc"}
            page.screenshot(path=str(shots / "2-failures.png"), full_page=True)
            seen.append(page.content().encode())
            # a failed series: its pictures, findings, history; record a review
            target = t1_failed or listed.first.inner_text()
            page.goto(f"{base}/series/{target}")
            assert shown("[data-testid=picture-deface]") > 500
            assert shown("[data-testid=metrics-plot]") > 200
            assert page.locator("[data-testid=findings] tbody tr").count() >= 1
            assert page.locator("[data-testid=history] tbody tr").count() >= 5
            page.check("input[name=decision][value=override]")
            page.fill("textarea[name=comment]", "artefact outside the brain; usable")
            page.click("[data-testid=review-form] button[type=submit]")
            page.wait_for_selector("[data-testid=current-review]")
            assert page.inner_text("[data-testid=current-review]") == "override"
            assert "artefact outside the brain; usable" in page.inner_text("[data-testid=reviews]")
            page.screenshot(path=str(shots / "3-series-reviewed.png"), full_page=True)
            seen.append(page.content().encode())
            # a measured T1: the defaced planes and the tissue overlay
            measured = next(iter(stored))
            page.goto(f"{base}/series/{measured}")
            assert shown("[data-testid=picture-deface]") > 500
            assert shown("[data-testid=picture-volumetry]") > 300
            assert "ICV" in page.inner_text("[data-testid=biomarkers]")
            page.screenshot(path=str(shots / "4-series-measured.png"), full_page=True)
            seen.append(page.content().encode())
            # reviewers cannot export; a researcher downloads the table with labels
            assert page.locator("header nav >> text=Export").count() == 0
            page.click("header form.who button")
            login("sam")
            page.click("header nav >> text=Export")
            page.set_input_files("input[name=labels]", str(tmp_path / "clinical.csv"))
            page.select_option("select[name=protocol]", "dementia")
            page.screenshot(path=str(shots / "5-export.png"), full_page=True)
            with page.expect_download() as download:
                page.click("[data-testid=export-form] button[type=submit]")
            saved = tmp_path / "download.csv"
            download.value.save_as(saved)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    downloaded = list(csv.DictReader(saved.open()))
    assert [(r["series"], r["brain_ml"], r["diagnosis"]) for r in downloaded] == [
        (r["series"], r["brain_ml"], r["diagnosis"]) for r in rows
    ]
    for content in seen:
        assert not _found(planted, content), _found(planted, content)
    index = open_index(url)
    try:
        with index.session() as session:
            actions = [a.action for a in session.scalars(select(AuditEntry))]
    finally:
        index.dispose()
    assert actions.count("review") == 1 and actions.count("export.biomarkers") == 2
    figures(
        f"dashboard in Chromium over the run: overview, failures (image_qc), a failed series "
        f"reviewed, a measured series with its pictures, an export of {len(rows)} rows with "
        f"labels; screenshots in {shots}"
    )
