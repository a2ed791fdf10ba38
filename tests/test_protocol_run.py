"""The protocol flow end to end: Orthanc -> select -> retrieve -> anonymize -> deface -> QC ->
convert -> volumetry -> success rates, over six dementia-protocol studies, run by the command line
in a child process (as users run it).

1. SQLite, a local one-worker Dask cluster, killed (SIGKILL, the whole process group) once three
   studies are measured, then rerun: it finishes, with no duplicate and no lost series, and a
   third run redoes nothing. The first run starts its private Prefect server, as a run without
   one does; the later runs (here and below) use a Prefect server of the module's own, as a
   deployment's runs do (each private server took 7 to 14 s to start).
2. The run of tests/test_protocol_dask.py (PostgreSQL, a multi-process Dask cluster; it runs in
   the other test worker at the same time) gave the same results as run 1.
3. The QC dashboard in Chromium and the biomarker export, over run 1.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cohortflow.models.database import open_index
from cohortflow.models.schema import AuditEntry, Biomarker, Linkage, StageResult, StudyStep
from cohortflow.models.synth import CohortTruth
from cohortflow.models.volumes import VOLUME_NAMES
from cohortflow.pipelines.synth.cohort import CohortResult
from tests.ingest_helpers import free_port
from tests.protocol_helpers import (
    BIN,
    RUN,
    STUDIES,
    Pacs,
    _assert_complete,
    _cohortflow,
    _count,
    _env,
    _finish,
    _results,
    _wait_http,
    comparable,
    hand_over,
    handed_over,
    loaded_pacs,
    of_studies,
    prefect_server,
    wait_for,
)
from tests.viewer_helpers import changed, natural, natural_size, settled, viewed

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, dementia6: CohortResult) -> Iterator[Pacs]:
    with loaded_pacs(tmp_path_factory.mktemp("orthanc"), dementia6) as found:
        yield found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The module's Prefect server: ``served()`` waits for it and gives its API URL."""
    with prefect_server(tmp_path_factory.mktemp("prefect")) as ready:
        yield ready


@pytest.fixture(scope="module")
def killed_and_resumed(
    tmp_path_factory: pytest.TempPathFactory,
    served: Any,
    pacs: Pacs,
    model_cache: Path,
    dementia6: CohortResult,
) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("single")
    url = f"sqlite:///{home / 'index.sqlite'}"
    env = _env(home, pacs, model_cache)
    log = home / "cli.log"
    args = [*RUN, "--workers", "1"]
    started = time.monotonic()
    first = _cohortflow(args, env, log)
    # kill it once three studies are measured (mid-run: the rest are on their way)
    while time.monotonic() - started < 1500:
        time.sleep(2)
        if first.poll() is not None:
            break
        if (home / "index.sqlite").is_file() and _count(
            url, StudyStep, StudyStep.step == "volumetry", StudyStep.status == "done"
        ) >= 3:
            break
    assert first.poll() is None, "the run ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = _count(url, StudyStep, StudyStep.step == "volumetry")
    assert 3 <= done_before < STUDIES
    seconds_first = time.monotonic() - started

    env = {**env, "PREFECT_API_URL": served()}  # from here on, the module's server
    started = time.monotonic()
    outcome = _finish(_cohortflow(args, env, log), log)
    seconds_rerun = time.monotonic() - started
    started = time.monotonic()
    again = _finish(_cohortflow(args, env, log), log)
    seconds_again = time.monotonic() - started
    hand_over(
        handed_over(tmp_path_factory, "single"),
        {"outcome": outcome, "results": _results(url)},
    )
    return {
        "url": url,
        "home": home,
        "env": env,
        "outcome": outcome,
        "again": again,
        "done_before": done_before,
        "truth": dementia6.truth,
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
    assert len({(s, st) for _, s, st, *_ in results["stages"]}) == len(results["stages"])
    assert len(results["steps"]) == STUDIES * 6  # anonymize ... volumetry, release
    assert {status for *_, status in results["steps"]} == {"done"}
    assert _count(url, Biomarker) == outcome["t1_with_biomarkers"] + sum(
        1 for v in results["volumes"] if v[-1] == "fail"
    )
    patients = _count(url, Linkage)
    assert 1 <= patients <= STUDIES
    # each head is registered once: volumetry started from defacing's fit of every T1 it
    # measured (the deface reference is the protocol's T1)
    index = open_index(url)
    with index.session() as session:
        measured = [
            r.metrics
            for r in session.scalars(select(StageResult).where(StageResult.stage == "volumetry"))
            if r.metrics.get("icv_ml") is not None
        ]
    index.dispose()
    assert measured and {m.get("affine_from") for m in measured} == {"handed"}
    assert all("head_fit" not in dict(m.get("seconds") or {}) for m in measured)
    # a third run finds everything done and changes nothing
    assert killed_and_resumed["again"]["t1_with_biomarkers"] == outcome["t1_with_biomarkers"]
    assert _results(url) == results
    # every output is pseudonymized: the release check finds none of the identifiers the
    # index holds for the run's patients in any deliverable (DICOM, NIfTI, sidecars, overlays)
    outputs = killed_and_resumed["home"] / "outputs" / "dementia"
    assert any(outputs.rglob("*_T1w.nii.gz"))
    log = killed_and_resumed["home"] / "phi-scan.log"
    scan = _cohortflow(["phi-scan", str(outputs), "--json"], killed_and_resumed["env"], log)
    released = _finish(scan, log)
    assert scan.returncode == 0 and released["hits"] == [], released["hits"][:5]
    assert 1 <= released["patients"] <= patients
    assert released["identifiers"] > 20 * released["patients"]
    first, rerun, again = killed_and_resumed["seconds"]
    figures(
        f"protocol run, {STUDIES} dementia studies, 1 worker: killed after "
        f"{killed_and_resumed['done_before']} measured studies at {first:.0f} s, rerun "
        f"finished in {rerun:.0f} s, a third run (nothing to do) {again:.0f} s; "
        f"T1s with biomarkers {outcome['t1_with_biomarkers']}/{outcome['t1_series']}, "
        f"reasons {outcome['t1_reasons']}"
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
    # a table of six studies' T1s: a project that exports so few lowers its smallest cell (the
    # default, 5 patients, refuses the export: tests/test_export.py)
    env["COHORTFLOW_COHORT__MIN_CELL_PATIENTS"] = "1"
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
            flair = session.scalars(
                select(StageResult.series_uid).where(
                    StageResult.stage == "convert",
                    StageResult.status.in_(("pass", "warn")),
                    StageResult.role.like("flair%"),
                )
            ).first()
    finally:
        index.dispose()
    rows = list(csv.DictReader(exported.open()))
    assert {r["series"] for r in rows} == set(stored)
    for row in rows:
        b = stored[row["series"]]
        assert [float(row[k]) for k in VOLUME_NAMES] == [getattr(b, k) for k in VOLUME_NAMES]
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
            assert shown("img[src='/overview/rates.png']") > 300  # drawn by the server
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
            # its slice viewer: scrolled by the wheel and the keys, the overlay of volumetry's
            # tissue classes toggled and made fainter, another plane, each at its size
            title = page.inner_text("[data-testid=series-title]")
            assert "3D T1" in title and measured not in title and measured not in page.title()
            meta = settled(page)
            assert meta["overlay"] is True
            last = viewed(page, measured, meta, "7-viewer-t1-axial.png", shots)
            page.uncheck("[data-testid=overlay-toggle]")
            off = changed(page, last, "overlay=0")
            page.screenshot(path=str(shots / "8-viewer-t1-overlay-off.png"), full_page=True)
            page.check("[data-testid=overlay-toggle]")
            on = changed(page, off, "overlay=1")
            page.fill("[data-testid=opacity-slider]", "25")
            assert changed(page, on, "opacity=0.25") != off
            page.click("[data-testid=plane-sagittal]")
            changed(page, on, "plane=sagittal")
            natural_size(page, meta, "sagittal")
            page.screenshot(path=str(shots / "9-viewer-t1-sagittal.png"), full_page=True)
            # every metric that can fail a series, beside the protocol's: a strip plot
            plot = natural(page, "[data-testid=metrics-plot]")
            assert plot[0] >= 900 and plot[1] >= 400
            assert page.locator("[data-testid=metrics] tr[data-metric=inu_range]").count() == 1
            # a defaced FLAIR: the same viewer, no overlay
            assert flair is not None
            page.goto(f"{base}/series/{flair}")
            assert "FLAIR" in page.inner_text("[data-testid=series-title]")
            meta = settled(page)
            assert meta["overlay"] is False and page.is_disabled("[data-testid=overlay-toggle]")
            viewed(page, flair, meta, "10-viewer-flair-defaced.png", shots)
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
            # cohort discovery: count the dementia T1s by sex, with the server's bar chart
            page.click("header nav >> text=Cohorts")
            page.fill("[data-testid=filter-protocol]", "dementia:t1_3d")
            page.select_option("[data-testid=by-0]", "sex")
            page.click("[data-testid=count]")
            page.wait_for_url("**/cohorts?*protocol=dementia%3At1_3d*")
            assert shown("[data-testid=cohort-chart]") > 300
            total = page.inner_text("[data-testid=cohort-total]").split()
            # studies and series: perturbed and rounded to 5 (models/disclosure.py)
            shown_counts = [int(v.replace(",", "")) for v in total[2:4]]
            assert all(abs(v - STUDIES) <= 5 and v % 5 == 0 for v in shown_counts), total
            page.screenshot(path=str(shots / "6-cohorts.png"), full_page=True)
            seen.append(page.content().encode())
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
        f"reviewed, a measured series with its pictures and its slice viewer scrolled, its "
        f"overlay toggled, a defaced FLAIR's viewer, an export of {len(rows)} rows with "
        f"labels; screenshots in {shots}"
    )


def test_dask_and_postgres_gave_the_single_process_results(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    killed_and_resumed: dict[str, Any],
) -> None:
    """What tests/test_protocol_dask.py's run left (it ran in the other worker meanwhile)."""
    if not any(item.path.name == "test_protocol_dask.py" for item in request.session.items):
        pytest.skip("the Dask + PostgreSQL run is not part of this test session")
    dask = wait_for(handed_over(tmp_path_factory, "dask"), timeout=1800)
    assert "error" not in dask, dask.get("error")
    single = comparable(_results(killed_and_resumed["url"]))
    # the studies the Dask run took: the same stage verdicts, volumes and steps, to the digit
    assert dask["results"]["stages"] and dask["results"]["volumes"]
    assert dask["results"] == of_studies(single, dask["results"])
    assert dask["outcome"]["studies_selected"] == killed_and_resumed["outcome"]["studies_selected"]


# --- a saved cohort drives a run (last: the reviews above change what a new run does) --------


def test_a_saved_cohort_drives_a_run_over_exactly_its_studies(
    killed_and_resumed: dict[str, Any], pacs: Pacs, figures: Any
) -> None:
    from cohortflow.models.schema import SelectedSeries, Selection

    home, url = killed_and_resumed["home"], killed_and_resumed["url"]
    truth: CohortTruth = killed_and_resumed["truth"]
    env = dict(killed_and_resumed["env"])  # the module's Prefect server too
    log = home / "cohort.log"
    save = ["cohort", "save", "women", "--sex", "F", "--protocol", "dementia:t1_3d", "--json"]
    # three women: a project that saves cohorts this small lowers its smallest cell (the
    # default, 5, refuses them: tests/test_disclosure.py); the counts kept are perturbed
    small = {**env, "COHORTFLOW_COHORT__MIN_CELL_PATIENTS": "1"}
    saved = _finish(_cohortflow(save, small, log), log)
    women = [st for p in truth.patients if p.sex == "F" for st in p.studies]
    assert 0 < len(women) < STUDIES and saved["studies"] > 0
    started = time.monotonic()
    outcome = _finish(_cohortflow([*RUN[:2], "--cohort", "women", "--json"], env, log), log)
    seconds = time.monotonic() - started
    index = open_index(url)
    try:
        with index.session() as session:
            selection = session.get(Selection, outcome["selection_id"])
            assert selection is not None and selection.listed_from == "cohort women"
            chosen = set(
                session.scalars(
                    select(SelectedSeries.study_instance_uid).where(
                        SelectedSeries.selection_id == selection.id
                    )
                )
            )
    finally:
        index.dispose()
    # exactly the cohort's studies, each with the series the protocol's rules choose
    assert chosen == {st.study_instance_uid for st in women}
    assert outcome["studies_selected"] == len(women)
    assert outcome["t1_series"] == sum(1 for st in women for se in st.series if se.kind == "t1_3d")
    assert outcome["series_retrieved"] == outcome["series_selected"]  # all already archived
    figures(
        f"a saved cohort of {len(women)} studies (women, dementia T1s) ran in {seconds:.0f} s "
        f"(everything already done but what the review changed): selection {selection.id} "
        f"listed from 'cohort women', T1s with biomarkers {outcome['t1_with_biomarkers']}/"
        f"{outcome['t1_series']}"
    )


def test_a_leak_in_a_delivered_file_is_quarantined_by_the_next_run(
    killed_and_resumed: dict[str, Any], pacs: Pacs, figures: Any
) -> None:
    """The run's release step: every file a study delivered is searched for its patient's
    identifiers. A patient ID written into a delivered sidecar after the run (what a faulty
    converter or a hand edit would leave) is found by the next run, which checks again because
    what was delivered changed: the file goes to restricted/quarantine (audited) and its series
    fails the release stage with the reason; the other studies are not checked again."""
    from cohortflow.pipelines.release.scan import Matcher, targets

    home, url = killed_and_resumed["home"], killed_and_resumed["url"]
    env = dict(killed_and_resumed["env"])  # the module's Prefect server too
    log = home / "leak.log"
    sidecar = sorted((home / "outputs" / "dementia" / "nifti").rglob("*_T1w.json"))[0]
    pseudonym = sidecar.name.split("_")[0].removeprefix("sub-")
    index = open_index(url)
    try:
        with index.session() as session:
            matcher = Matcher(targets(session, {pseudonym}))
            before = {
                (s.study_uid, s.step): s.recorded_at for s in session.scalars(select(StudyStep))
            }
    finally:
        index.dispose()
    patient_id = next(w for w, ts in matcher.targets.items() if ts[0].kind == "patient_id")
    data = json.loads(sidecar.read_text())
    data["ProcedureComment"] = f"for {patient_id}"
    sidecar.write_text(json.dumps(data))
    outcome = _finish(_cohortflow(RUN, env, log), log)
    assert not sidecar.exists()
    quarantined = home / "restricted" / "quarantine" / sidecar.name
    assert quarantined.is_file() and patient_id in quarantined.read_text()
    index = open_index(url)
    try:
        with index.session() as session:
            released = {
                r.series_uid: r
                for r in session.scalars(select(StageResult).where(StageResult.stage == "release"))
            }
            failed = [r for r in released.values() if r.status == "fail"]
            redone = {
                (s.study_uid, s.step)
                for s in session.scalars(select(StudyStep))
                if before.get((s.study_uid, s.step)) != s.recorded_at
            }
            audited = [
                e.detail
                for e in session.scalars(
                    select(AuditEntry).where(AuditEntry.action == "release.quarantined")
                )
            ]
    finally:
        index.dispose()
    assert len(failed) == 1 and failed[0].reason_code == "release.identifier_found"
    assert "patient_id" in (failed[0].message or "")
    assert failed[0].role == "t1_3d"  # the series of the sidecar: a T1
    assert len(released) > len(failed)  # every other delivered series passed
    assert len(redone) == 1 and next(iter(redone))[1] == "release"  # only that study's check
    assert len(audited) == 1 and str(quarantined) in audited[0]
    assert outcome["t1_reasons"].get("release.identifier_found") == 1
    figures(
        f"release check in the run: a patient ID planted in 1 of {len(released)} delivered "
        f"series' files was found by the next run, quarantined and the series failed"
    )
