"""The QC dashboard over HTTP (FastAPI's test client; the browser tests drive real Chromium in
tests/test_protocol_run.py): access, pages, filters in the URL, reviews, exports, the audit
log, and no identifier anywhere."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from cohortflow.flows.cli.results import release_check_of
from cohortflow.models.database import IndexDB, open_index
from cohortflow.models.disclosure import NOISE_MAX
from cohortflow.models.schema import AuditEntry, Review, StageResult
from cohortflow.models.settings import load_settings
from cohortflow.models.users import authenticate, set_account
from cohortflow.pipelines.cohort.configured import CohortSetup, protocol_roles, refresh_configured
from cohortflow.pipelines.dicom.protocols import load_protocols
from cohortflow.qc.dashboard.app import create_app
from tests.review_helpers import Cohort, build, dashboard_login, login_token

PASSWORD = "correct horse battery"


@pytest.fixture
def site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, IndexDB, Cohort]]:
    home = tmp_path / "home"
    monkeypatch.setenv("COHORTFLOW_HOME", str(home))
    monkeypatch.setenv("COHORTFLOW_DASHBOARD__PAGE_SIZE", "5")
    settings = load_settings(None)
    index = open_index(settings.index)
    cohort = build(index)
    with index.session() as session:
        for name, role in (
            ("rita", "reviewer"),
            ("sam", "researcher"),
            ("ada", "admin"),
            ("stella", "steward"),
        ):
            set_account(session, name, role, PASSWORD)
    app = create_app(
        settings,
        index,
        refresh=lambda db: refresh_configured(settings, db),
        protocols=protocol_roles(settings),
        disclosure=CohortSetup.load(settings).disclosure,
        release=release_check_of(settings),
        qc_policy=load_protocols(settings.protocols_file).qc_of,
    )
    with TestClient(app) as client:
        yield client, index, cohort
    index.dispose()


def login(client: TestClient, name: str) -> str:
    """Log in through the form; returns the page's form token."""
    page = dashboard_login(client, name, PASSWORD)
    assert page.status_code == 200 and f"{name} (" in page.text
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found
    return found.group(1)


def test_nothing_answers_without_a_session(
    site: tuple[TestClient, IndexDB, Cohort],
) -> None:
    client, _, cohort = site
    uid = cohort.subjects[0].pseudo_series
    for path in ("/", "/failures?stage=image_qc", f"/series/{uid}", "/export", "/audit"):
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/login?next=")
    for path in ("/cohorts", "/cohorts/chart.png?by=sex"):
        assert client.get(path, follow_redirects=False).status_code == 303, path
    for path in ("/api/overview", "/api/failures", f"/api/series/{uid}", "/api/export/biomarkers",
                 "/api/cohorts/count", "/api/cohorts/list"):  # fmt: skip
        assert client.get(path).status_code == 401, path
    for path in (f"/series/{uid}/picture/deface.png", f"/series/{uid}/slice.png?plane=axial"):
        assert client.get(path, follow_redirects=False).status_code == 303, path
    assert client.get(f"/api/series/{uid}/volume").status_code == 401
    answer = client.post(f"/api/series/{uid}/review", json={"decision": "accept", "comment": "x"})
    assert answer.status_code == 401
    assert client.get("/static/style.css").status_code == 200  # the login page needs it
    token = login_token(client)
    wrong = client.post(
        "/login", data={"username": "rita", "password": "nope", "next": "/", "csrf": token}
    )
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    # after login, the page asked for first
    answer = client.post(
        "/login",
        data={"username": "rita", "password": PASSWORD, "next": "/failures?stage=header_qc",
              "csrf": token},
        follow_redirects=False,
    )  # fmt: skip
    assert answer.headers["location"] == "/failures?stage=header_qc"
    evil = client.post(
        "/login",
        data={"username": "rita", "password": PASSWORD, "next": "//evil.example/",
              "csrf": login_token(client)},
        follow_redirects=False,
    )  # fmt: skip
    assert evil.headers["location"] == "/"


def test_overview_failures_and_series_pages(site: tuple[TestClient, IndexDB, Cohort]) -> None:
    client, _, cohort = site
    login(client, "rita")
    page = client.get("/")
    assert "T1s with biomarkers (32 of 40)" in page.text
    assert "image.snr" in page.text and "header.missing_slices" in page.text
    assert client.get("/overview/rates.png").headers["content-type"] == "image/png"
    api = client.get("/api/overview").json()
    assert api["protocols"][0]["t1_with_biomarkers"] == 32 and api["to_review"] == 8
    # filters and order in the URL; five rows a page
    page = client.get("/failures?stage=image_qc&sort=series_uid&order=asc")
    failing = sorted(s.pseudo_series for s in cohort.subjects if s.failed == "image.snr")
    assert re.findall(r'class="uid" href="/series/([^"]+)"', page.text) == failing[:4]
    assert ">4 series<" in page.text
    everything = client.get("/api/failures?sort=series_uid&order=desc&page=2").json()
    assert (everything["total"], everything["pages"], len(everything["rows"])) == (8, 2, 3)
    siemens = client.get("/api/failures?scanner=SIEMENS+Skyra").json()
    assert {r["scanner"] for r in siemens["rows"]} == {"SIEMENS Skyra"}
    assert client.get("/api/failures?from=2020-13-01").status_code == 400
    assert client.get("/api/failures?from=2999-01-01").json()["total"] == 0
    subject = next(s for s in cohort.subjects if s.failed == "header.missing_slices")
    page = client.get(f"/series/{subject.pseudo_series}")
    assert page.status_code == 200
    assert "header.missing_slices" in page.text and "History of stage results" in page.text
    assert page.text.count('class="tag pass"') >= 3  # the history rows
    # titled by what a reviewer recognises, never by a UID (it stays small in the body)
    title = re.search(r"<title>(.*?)</title>", page.text, re.S)
    heading = re.search(r'<h1 data-testid="series-title">(.*?)</h1>', page.text, re.S)
    assert title and heading
    assert heading.group(1) == f"t1_mprage_sag_p2_iso · 3D T1 · {subject.pseudonym}"
    assert subject.pseudo_series not in title.group(1) + heading.group(1)
    assert f'<span class="uid">{subject.pseudo_series}</span>' in page.text
    # the reason labelled by what failed, not by the check's pass text
    reason = re.search(r'data-testid="verdict-reason">(.*?)<', page.text)
    assert reason and reason.group(1) == "slices missing: a gap in the slice positions"
    assert "no gap in the slice positions" not in page.text
    # a finding without a threshold shows a dash, never "None"
    findings = page.text.split('data-testid="findings"')[1].split("</table>")[0]
    assert "None" not in findings and "<td>–</td>" in findings
    metrics = client.get(f"/series/{subject.pseudo_series}/metrics.png")
    assert metrics.status_code == 200 and metrics.headers["content-type"] == "image/png"
    # every metric that can fail a series, with the protocol's acceptance range
    shown = dict(
        re.findall(
            r'data-metric="([a-z_0-9]+)">.*?</td>\s*<td>.*?</td>\s*<td>(.*?)</td>', page.text, re.S
        )
    )
    assert {"snrd_wm", "snr_wm", "inu_range", "coverage_outside", "clipped_fraction"} <= set(shown)
    assert shown["snrd_wm"] == "&gt;= 8" and shown["inu_range"] == "&lt;= 1"
    assert shown["snr_wm"] == "–"  # the protocol sets no range for it
    failed = next(s for s in cohort.subjects if s.failed == "image.snr")
    page = client.get(f"/series/{failed.pseudo_series}")
    assert 'data-metric="snrd_wm"' in page.text and "out of range" in page.text
    assert "signal-to-noise ratio (Dietrich) outside the protocol&#39;s range" in page.text
    assert client.get("/series/2.25.999999").status_code == 404


def test_a_picture_written_outside_the_outputs_is_said_so_not_a_broken_image(
    site: tuple[TestClient, IndexDB, Cohort], tmp_path: Path
) -> None:
    """Regression: a volumetry overlay written outside ``outputs/`` (``cohortflow volumetry
    --out`` elsewhere) was shown as a broken image."""
    client, index, cohort = site
    outputs = load_settings(None).outputs
    inside, outside = outputs / "deface" / "p.png", tmp_path / "elsewhere" / "p.png"
    for path in (inside, outside):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
    uid = next(s for s in cohort.subjects if s.failed is None).pseudo_series
    with index.session() as session:
        for row in session.scalars(select(StageResult).where(StageResult.series_uid == uid)):
            picture = {"deface": inside, "volumetry": outside}.get(row.stage)
            if picture is not None:
                row.metrics = {**(row.metrics or {}), "picture": str(picture)}
    login(client, "rita")
    page = client.get(f"/series/{uid}")
    assert 'data-testid="picture-deface"' in page.text
    assert 'data-testid="picture-volumetry"' not in page.text
    assert 'data-testid="picture-volumetry-not-served"' in page.text
    assert str(outside) not in page.text
    assert client.get(f"/series/{uid}/picture/deface.png").status_code == 200
    assert client.get(f"/series/{uid}/picture/volumetry.png").status_code == 404


def test_a_review_is_stored_shown_counted_and_audited(
    site: tuple[TestClient, IndexDB, Cohort],
) -> None:
    client, index, cohort = site
    token = login(client, "rita")
    subject = next(s for s in cohort.subjects if s.failed == "image.snr")
    uid = subject.pseudo_series
    stale = client.post(
        f"/series/{uid}/review", data={"decision": "override", "comment": "ok", "csrf": "x"}
    )
    assert stale.status_code == 403
    page = client.post(
        f"/series/{uid}/review",
        data={"decision": "override", "comment": "SNR fine by eye", "csrf": token},
        follow_redirects=True,
    )
    assert 'data-testid="current-review">override' in page.text
    assert "SNR fine by eye" in page.text
    rows = client.get("/api/failures?stage=image_qc").json()["rows"]
    assert next(r for r in rows if r["series_uid"] == uid)["review"] == "override"
    reasons = client.get("/api/overview").json()["protocols"][0]["t1_reasons"]
    assert reasons["review.override_not_yet_measured"] == 1
    bad = client.post(
        f"/series/{uid}/review", data={"decision": "maybe", "comment": "x", "csrf": token}
    )
    assert bad.status_code == 400 and "decision must be one of" in bad.text
    with index.session() as session:
        assert session.query(Review).count() == 1
        audit = session.query(AuditEntry).filter(AuditEntry.action == "review").one()
        assert audit.actor == "rita" and uid in audit.detail


def test_roles_export_and_the_audit_log(site: tuple[TestClient, IndexDB, Cohort]) -> None:
    client, _, cohort = site
    login(client, "rita")
    assert client.get("/export").status_code == 403
    assert client.get("/api/export/biomarkers").status_code == 403
    assert client.get("/audit").status_code == 403
    client.cookies.clear()
    token = login(client, "sam")
    uid = cohort.subjects[0].pseudo_series
    answer = client.post(
        f"/series/{uid}/review", data={"decision": "accept", "comment": "x", "csrf": token}
    )
    assert answer.status_code == 403  # researchers do not review
    answer = client.post(
        "/export",
        data={"protocol": "dementia", "format": "csv", "csrf": token},
        files={"labels": ("clinical.csv", cohort.labels_csv().encode(), "text/csv")},
    )
    assert answer.status_code == 200
    assert answer.headers["content-disposition"].startswith('attachment; filename="biomarkers-')
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    truth = {s.pseudo_series: s for s in cohort.subjects}
    assert len(rows) == 32
    for row in rows:
        s = truth[row["series"]]
        assert float(row["brain_ml"]) == s.brain and row["diagnosis"] == s.diagnosis
    parquet = client.get("/api/export/biomarkers?format=parquet")
    assert parquet.status_code == 200 and parquet.content[:4] == b"PAR1"
    client.cookies.clear()
    login(client, "ada")
    page = client.get("/audit")
    assert page.text.count("export.biomarkers") == 2 and "login.failed" not in page.text
    assert [a["action"] for a in client.get("/api/audit").json()].count("login") == 3
    # every refusal is audited: rita's three pages, sam's review
    refusals = client.get("/api/audit?action=refused.")
    assert int(refusals.headers["X-Total-Count"]) == 4
    assert sorted(json.loads(r["detail"])["path"] for r in refusals.json()) == sorted(
        ["/export", "/api/export/biomarkers", "/audit", f"/series/{uid}/review"]
    )
    assert {r["actor"] for r in refusals.json()} == {"rita", "sam"}
    assert len(client.get("/api/audit?actor=sam&action=refused.").json()) == 1
    # a failed login too, with the name tried; the log pages and filters
    client.cookies.clear()
    guess = {"username": "eve", "password": "guess"}
    assert client.post("/api/login", json=guess).status_code == 401
    login(client, "ada")
    failed = client.get("/api/audit?action=login.failed").json()
    assert [(r["actor"], json.loads(r["detail"])["user"]) for r in failed] == [("anonymous", "eve")]
    assert client.get("/audit?action=refused.&actor=rita").text.count("refused.dashboard") == 3
    assert client.get("/audit?since=not-a-day").status_code == 400


def test_no_identifier_on_any_page_or_answer(site: tuple[TestClient, IndexDB, Cohort]) -> None:
    client, _, cohort = site
    login(client, "ada")
    uids = [s.pseudo_series for s in cohort.subjects]
    paths = ["/", "/failures", "/failures?status=warn", "/api/overview", "/api/failures", "/audit"]
    paths += [f"/series/{u}" for u in uids[:10]] + [f"/api/series/{u}" for u in uids[:10]]
    paths += ["/api/export/biomarkers", "/export", "/cohorts?by=year&by=sex"]
    paths += ["/api/cohorts/list?limit=1000", "/api/cohorts/count?by=year&by=age_band"]
    for path in paths:
        text = client.get(path).text
        for value in cohort.planted:
            # whole tokens: a 39-digit pseudonymized UID (a random key here) holds any 8 digits
            found = re.search(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])", text)
            assert found is None, (path, value)


def test_disabled_accounts_lose_their_session(site: tuple[TestClient, IndexDB, Cohort]) -> None:
    client, index, _ = site
    login(client, "rita")
    from cohortflow.models.users import disable_account

    with index.session() as session:
        disable_account(session, "rita")
        assert authenticate(session, "rita", PASSWORD).account is None
    assert client.get("/", follow_redirects=False).status_code == 303


def near(shown: int | None, true: int) -> bool:
    """A de-identified count: the true one perturbed (+/-3) and rounded to 5."""
    return shown is not None and abs(shown - true) <= NOISE_MAX + 2 and shown % 5 == 0


def test_cohorts_page_counts_saves_and_keeps_the_identified_layer_to_stewards(
    site: tuple[TestClient, IndexDB, Cohort],
) -> None:
    client, index, cohort = site
    token = login(client, "sam")  # a researcher: reads, and saves cohorts
    women = [s for s in cohort.subjects if s.sex == "F"]
    page = client.get("/cohorts?sex=F&by=scanner")
    assert page.status_code == 200 and 'data-testid="cohort-chart"' in page.text
    counted = client.get("/api/cohorts/count?sex=F&by=scanner").json()
    assert counted["layer"] == "deidentified" and near(counted["total"]["patients"], len(women))
    by_scanner = {c["scanner"]: c["patients"] for c in counted["cells"]}
    for scanner in {s.scanner for s in women}:
        n = sum(1 for s in women if s.scanner == scanner)
        assert near(by_scanner[scanner], n) if n >= 5 else by_scanner[scanner] is None
    chart = client.get("/cohorts/chart.png?sex=F&by=scanner")
    assert chart.headers["content-type"] == "image/png" and chart.content[:4] == b"\x89PNG"
    # bad input: 400 naming the filter; the identified layer: stewards only
    bad = client.get("/api/cohorts/count?age=old")
    assert bad.status_code == 400 and "filter age" in bad.json()["detail"]
    assert client.get("/api/cohorts/count?sexx=F").status_code == 400
    assert client.get("/api/cohorts/count?identified=1").status_code == 403
    assert 'name="identified"' not in client.get("/cohorts").text  # no such box for them
    # saving: a form with its token (a forged one is refused), then the saved list shows it
    form = {"name": "women", "sex": "F", "description": "feasibility", "csrf": "forged"}
    assert client.post("/cohorts/save", data=form).status_code == 403
    saved = client.post("/cohorts/save", data={**form, "csrf": token}, follow_redirects=True)
    assert saved.status_code == 200 and "feasibility" in saved.text
    inside = client.get("/api/cohorts/count?cohort=women").json()["total"]
    assert near(inside["patients"], len(women))
    answer = client.post(
        "/api/cohorts/save",
        json={"name": "men", "filters": {"sex": "M"}},
        headers={"X-CSRF-Token": token},
    )
    assert answer.status_code == 200
    assert near(answer.json()["patients"], len(cohort.subjects) - len(women))
    # a steward sees real identifiers and years, and each use is audited
    client.post("/logout", data={"csrf": token})
    login(client, "stella")
    rows = client.get("/api/cohorts/list?identified=1&cohort=women&limit=1000").json()["rows"]
    assert {r["accession_number"] for r in rows} == {s.accession for s in women}
    years = client.get("/api/cohorts/count?identified=1&by=year").json()["cells"]
    assert [c["year"] for c in years] == ["2024"]
    with index.session() as session:
        uses = session.scalars(
            select(AuditEntry).where(AuditEntry.action.startswith("cohort.identified"))
        ).all()
        saves = session.scalars(select(AuditEntry).where(AuditEntry.action == "cohort.save")).all()
    assert [(u.action, u.actor) for u in uses] == [
        ("cohort.identified.list", "stella"),
        ("cohort.identified.count", "stella"),
    ]
    assert [s.actor for s in saves] == ["sam", "sam"]


def test_an_export_with_an_identifier_is_not_sent(site: tuple[TestClient, IndexDB, Cohort]) -> None:
    """The release check runs on every export the dashboard makes: a researcher's labels file
    whose note carries a patient's name gives a refusal, not a download."""
    client, index, cohort = site
    token = login(client, "sam")
    first = cohort.subjects[0]
    lines = ["accession_number,diagnosis,note"]
    lines += [f"{s.accession},{s.diagnosis}," for s in cohort.subjects[1:]]
    lines.append(f"{first.accession},{first.diagnosis},phoned Mrs Testname")
    answer = client.post(
        "/export",
        data={"protocol": "dementia", "format": "csv", "csrf": token},
        files={"labels": ("clinical.csv", ("\n".join(lines) + "\n").encode(), "text/csv")},
    )
    assert answer.status_code == 422 and "identifier" in answer.text
    assert "Testname" not in answer.text
    with index.session() as session:
        held = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "release.quarantined")
        ).all()
    assert [h.actor for h in held] == ["sam"]


def test_security_headers_on_every_answer_and_no_inline_script_or_style(
    site: tuple[TestClient, IndexDB, Cohort],
) -> None:
    """Issue 23, item 4: a strict Content-Security-Policy (nothing inline, nothing from
    elsewhere, no framing), nosniff, no referrer and no caching of study data, on pages, API
    answers, pictures, errors and the login page; the pages carry no inline script or style
    for the policy to block. (tests/test_protocol_run.py renders the pages in Chromium under
    this policy.)"""
    from cohortflow.qc.dashboard.headers import CONTENT_SECURITY_POLICY

    client, _, cohort = site
    uid = cohort.subjects[0].pseudo_series

    def secured(answer: httpx.Response, path: str) -> None:
        h = answer.headers
        assert h["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert "script-src 'self'" in h["content-security-policy"]
        assert "unsafe-inline" not in h["content-security-policy"]
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
        assert h["referrer-policy"] == "no-referrer"
        if not path.startswith("/static/"):
            assert h["cache-control"] == "no-store", path

    for path in ("/login", "/static/style.css", "/", "/api/overview", "/nonexistent"):
        secured(client.get(path, follow_redirects=False), path)
    login(client, "stella")
    pages = ("/", "/failures?stage=image_qc", f"/series/{uid}", "/export", "/audit", "/cohorts")
    for path in (*pages, "/api/overview", "/overview/rates.png", "/api/failures?from=x"):
        answer = client.get(path)
        secured(answer, path)
        if answer.headers["content-type"].startswith("text/html"):
            assert not re.search(r"<script(?![^>]*\bsrc=)", answer.text), path
            assert "<style" not in answer.text and " style=" not in answer.text, path
            assert not re.search(r"\son[a-z]+=", answer.text), path  # onclick= and the like


def test_bodies_are_bounded_and_malformed_input_answers_4xx(
    site: tuple[TestClient, IndexDB, Cohort],
) -> None:
    """Issue 23, item 4: a body above its route's limit is refused with 413 before it is read
    (declared or chunked); an oversized login writes no audit entry; numbers beyond any index
    and a labels row with an extra field answer 4xx, never 500."""
    from cohortflow.qc.dashboard.limits import BODY_BYTES, UPLOAD_BYTES

    client, index, cohort = site
    with index.session() as session:
        before = len(session.scalars(select(AuditEntry)).all())
    big = client.post("/login", data={"username": "x" * (5 << 20), "password": "p", "next": "/"})
    assert big.status_code == 413
    chunked = client.post(
        "/api/login", content=(b"x" * 4096 for _ in range(BODY_BYTES // 4096 + 2))
    )
    assert chunked.status_code == 413
    with index.session() as session:
        assert len(session.scalars(select(AuditEntry)).all()) == before  # nothing logged
    token = login(client, "sam")
    huge = client.post(
        "/export",
        data={"protocol": "dementia", "format": "csv", "csrf": token},
        files={"labels": ("clinical.csv", b"a" * (UPLOAD_BYTES + 1), "text/csv")},
    )
    assert huge.status_code == 413
    extra = cohort.labels_csv().replace("\n", ",surplus\n", 2).split("\n", 1)
    bad = "accession_number,diagnosis\n" + extra[1]
    answer = client.post(
        "/export",
        data={"protocol": "dementia", "format": "csv", "csrf": token},
        files={"labels": ("clinical.csv", bad.encode(), "text/csv")},
    )
    assert answer.status_code == 400 and "more than the header" in answer.text
    for path in (
        "/api/cohorts/list?offset=9223372036854775808",
        "/api/cohorts/list?limit=-1",
        "/api/failures?page=9223372036854775808",
        "/failures?page=0",
        "/api/cohorts/list?offset=x",
    ):
        assert client.get(path).status_code in (400, 422), path


#: every route of the dashboard and the right it needs (None: open to everyone)
ROUTES = {
    ("GET", "/login"): None,
    ("POST", "/login"): None,
    ("POST", "/logout"): None,
    ("POST", "/api/login"): None,
    ("GET", "/"): "read",
    ("GET", "/overview/rates.png"): "read",
    ("GET", "/api/overview"): "read",
    ("GET", "/failures"): "read",
    ("GET", "/api/failures"): "read",
    ("GET", "/series/{uid}"): "read",
    ("GET", "/api/series/{uid}"): "read",
    ("GET", "/series/{uid}/picture/{stage}.png"): "read",
    ("GET", "/series/{uid}/metrics.png"): "read",
    ("GET", "/series/{uid}/slice.png"): "read",
    ("GET", "/api/series/{uid}/volume"): "read",
    ("POST", "/series/{uid}/review"): "review",
    ("POST", "/api/series/{uid}/review"): "review",
    ("GET", "/export"): "export",
    ("POST", "/export"): "export",
    ("GET", "/api/export/biomarkers"): "export",
    ("GET", "/cohorts"): "read",
    ("GET", "/cohorts/chart.png"): "read",
    ("GET", "/api/cohorts/count"): "read",
    ("GET", "/api/cohorts/list"): "read",
    ("POST", "/cohorts/save"): "save cohorts",
    ("POST", "/api/cohorts/save"): "save cohorts",
    ("GET", "/audit"): "audit log",
    ("GET", "/api/audit"): "audit log",
}


def _readme_rights() -> dict[str, set[str]]:
    """The README's table of roles: right (its first words) -> the roles that have it."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = [ln.strip() for ln in readme.splitlines() if ln.strip().startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "right", header
    rights = {}
    for line in lines[1:]:  # the separator row (|---|) starts without a space
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = cells[0].split(" (")[0]
        rights[name] = {role for role, cell in zip(header[1:], cells[1:], strict=True) if cell}
        if len(rights) == 6:
            break
    return rights


def test_every_route_for_every_role_as_the_readme_says(
    site: tuple[TestClient, IndexDB, Cohort],
) -> None:
    """Issue 23, item 8: the README's role table is the code's, and every route answers each
    role by it (403 for a role without the right, never 403 for one with it)."""
    from cohortflow.qc.dashboard import app as dashboard

    rights = _readme_rights()
    code = {
        "read": dashboard.READ,
        "review": dashboard.REVIEW,
        "export": dashboard.EXPORT,
        "save cohorts": dashboard.SAVE_COHORT,
        "identified layer of cohort discovery": dashboard.IDENTIFIED_ROLES,
        "audit log": dashboard.AUDIT,
    }
    assert rights == {k: set(v) for k, v in code.items()}
    client, _, cohort = site
    served = {
        (method, route.path)
        for route in client.app.routes  # type: ignore[attr-defined]
        if hasattr(route, "methods") and not route.path.startswith("/static")
        for method in route.methods - {"HEAD"}
    }
    assert served == set(ROUTES), served ^ set(ROUTES)
    uid = cohort.subjects[0].pseudo_series
    users = {"reviewer": "rita", "researcher": "sam", "steward": "stella", "admin": "ada"}
    for role, user in users.items():
        client.cookies.clear()
        token = login(client, user)
        for (method, path), right in ROUTES.items():
            if right is None:
                continue
            url = path.format(uid=uid, stage="deface")
            if method == "GET":
                answer = client.get(url, follow_redirects=False)
            else:
                answer = client.post(
                    url,
                    data={"csrf": token, "name": f"c{role}", "sex": "F", "decision": "accept",
                          "comment": "matrix", "format": "csv"},
                    headers={"X-CSRF-Token": token},
                    follow_redirects=False,
                )  # fmt: skip
            allowed = role in rights[right]
            assert (answer.status_code == 403) is not allowed, (role, method, path, answer.text)
            assert answer.status_code != 401, (role, method, path)
        identified = client.get("/api/cohorts/count?identified=1")
        steward = role in rights["identified layer of cohort discovery"]
        assert (identified.status_code == 403) is not steward, role


# --- accounts and sessions (issue 23, items 2 and 3) -----------------------------------------


def _board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> TestClient:
    """A dashboard with its own settings (``COHORTFLOW_DASHBOARD__<NAME>``) and two accounts."""
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    for name, value in env.items():
        monkeypatch.setenv(f"COHORTFLOW_DASHBOARD__{name.upper()}", value)
    settings = load_settings(None)
    index = open_index(settings.index)
    with index.session() as session:
        set_account(session, "rita", "reviewer", PASSWORD)
        set_account(session, "ada", "admin", PASSWORD)
    index.dispose()
    return TestClient(create_app(settings))


def _try(client: TestClient, name: str, password: str) -> httpx.Response:
    return dashboard_login(client, name, password, follow=False)


def test_passwords_names_and_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A password policy; names unique without regard to case; argon2id, with an earlier scrypt
    hash replaced at the next login; an unknown name answered in the time of a wrong password."""
    import base64
    import hashlib
    import statistics
    import time

    from cohortflow.models.errors import AccountError
    from cohortflow.models.schema import User

    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    index = open_index(load_settings(None).index)
    with index.session() as session:
        for weak, why in (
            ("aaaaaaaaaa", "at least 12"),
            ("a" * 14, "one character repeated"),
            (" " * 14, "one character repeated"),
            ("the-rita-password", "contains the user name"),
        ):
            with pytest.raises(AccountError, match=why):
                set_account(session, "rita", "admin", weak)
        set_account(session, "rita", "reviewer", PASSWORD)
        with pytest.raises(AccountError, match="names do not differ by case"):
            set_account(session, "RITA", "admin", PASSWORD)
        row = session.scalars(select(User).where(User.username == "rita")).one()
        assert row.password_hash.startswith("$argon2id$")
        assert authenticate(session, "RITA", PASSWORD).account.username == "rita"  # type: ignore[union-attr]
        # the scheme before: scrypt at 2**15, read once more and replaced
        salt = b"0123456789abcdef"
        digest = hashlib.scrypt(
            PASSWORD.encode(), salt=salt, n=2**15, r=8, p=1, maxmem=128 * 2**20, dklen=32
        )
        b64 = base64.b64encode
        row.password_hash = f"scrypt$32768$8$1${b64(salt).decode()}${b64(digest).decode()}"
    with index.session() as session:
        assert authenticate(session, "rita", PASSWORD).ok
        row = session.scalars(select(User).where(User.username == "rita")).one()
        assert row.password_hash.startswith("$argon2id$")

    def seconds(name: str) -> float:
        with index.session() as session:
            started = time.perf_counter()
            assert not authenticate(session, name, "not the password").ok
            took = time.perf_counter() - started
        with index.session() as session:  # no waiting between the tries
            session.scalars(select(User)).one().failed_logins = 0
        return took

    # interleaved, so that a load from elsewhere (the other test worker) falls on both alike
    pairs = [(seconds("nobody"), seconds("rita")) for _ in range(7)]
    unknown = statistics.median(u for u, _ in pairs)
    wrong = statistics.median(w for _, w in pairs)
    assert abs(unknown / wrong - 1) < 0.2, (unknown, wrong)
    index.dispose()


def test_failed_logins_wait_then_lock_until_an_admin_unlocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cohortflow.flows.cli import main as cli

    client = _board(tmp_path, monkeypatch, login_free_failures="2", login_lock_after="4")
    with client:
        assert _try(client, "rita", "wrong password 1").status_code == 401
        assert _try(client, "rita", "wrong password 2").status_code == 401
        assert _try(client, "rita", "wrong password 3").status_code == 401  # now waits 1 s
        waiting = _try(client, "rita", PASSWORD)  # refused unchecked, even the right one
        assert waiting.status_code == 429 and int(waiting.headers["retry-after"]) >= 1
        time.sleep(1.2)
        assert _try(client, "rita", "wrong password 4").status_code == 401  # the 4th: locked
        locked = _try(client, "rita", PASSWORD)
        assert locked.status_code == 423 and "ask an admin" in locked.text
        assert cli(["users", "list", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)["users"]
        assert {u["name"]: u["locked"] for u in listed} == {"ada": False, "rita": True}
        assert cli(["users", "unlock", "rita"]) == 0
        assert _try(client, "rita", PASSWORD).status_code == 303
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/").text)
        assert token
        client.post("/logout", data={"csrf": token.group(1)})
        assert _try(client, "ada", PASSWORD).status_code == 303
        actions = [e["action"] for e in client.get("/api/audit?action=").json()]
        for action in ("login.failed", "login.throttled", "user.locked", "login.locked"):
            assert action in actions, action
        assert "user.unlock" in actions


def test_one_client_guessing_many_names_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _board(tmp_path, monkeypatch, client_free_failures="3")
    with client:
        for n in range(3):
            assert _try(client, f"guess{n}", "not a password").status_code == 401
        assert _try(client, "guess3", "not a password").status_code == 401  # waits from here
        assert _try(client, "rita", PASSWORD).status_code == 429


def test_sessions_end_at_logout_password_or_role_change_disable_and_timeouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cohortflow.models.users import disable_account

    monkeypatch.setenv("COHORTFLOW_DASHBOARD__IDLE_MINUTES", "0.03")  # 1.8 s
    client = _board(tmp_path, monkeypatch)
    settings = load_settings(None)
    other = TestClient(client.app)
    with client, other:

        def live(c: TestClient) -> bool:
            return c.get("/api/overview").status_code == 200

        def both() -> str:
            assert _try(client, "rita", PASSWORD).status_code == 303
            assert _try(other, "rita", PASSWORD).status_code == 303
            assert live(client) and live(other)
            found = re.search(r'name="csrf" value="([^"]+)"', client.get("/").text)
            assert found
            return found.group(1)

        token = both()
        client.post("/logout", data={"csrf": token})
        assert not live(other)  # a logout ends every session of the account
        index = open_index(settings.index)
        for change in (
            lambda s: set_account(s, "rita", "reviewer", "another good password"),
            lambda s: set_account(s, "rita", "researcher", PASSWORD),
            lambda s: disable_account(s, "rita"),
        ):
            with index.session() as session:
                set_account(session, "rita", "reviewer", PASSWORD)
            both()
            with index.session() as session:
                change(session)
            assert not live(client) and not live(other)
        with index.session() as session:
            set_account(session, "rita", "reviewer", PASSWORD)
        index.dispose()
        both()
        time.sleep(2.2)  # idle longer than the setting
        assert not live(client)


def test_a_statement_past_the_request_time_limit_stops(tmp_path: Path) -> None:
    """The dashboard's per-request limit (``dashboard.request_seconds``): a statement still
    running at the deadline is interrupted (then answered 503); the connection goes back to the
    pool without the limit."""
    import time as clock

    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from cohortflow.models.database_limits import is_time_limit, time_limit

    index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    endless = text(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
        "SELECT count(*) FROM c"
    )
    started = clock.perf_counter()
    with (
        pytest.raises(OperationalError) as stopped,
        index.session() as session,
        time_limit(session, 0.3),
    ):
        session.execute(endless)
    assert is_time_limit(stopped.value) and clock.perf_counter() - started < 5
    for _ in range(3):  # the pooled connection carries no limit any more
        with index.session() as session:
            small = text("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                         "WHERE x < 2000000) SELECT count(*) FROM c")  # fmt: skip
            clock.sleep(0.35)
            assert session.execute(small).scalar() == 2000000
    index.dispose()


def test_plots_requested_together_are_all_drawn() -> None:
    """The routes run in a pool of threads; two strip plots with log-scale ticks drawn at once
    broke matplotlib's shared mathtext parser, and the browser got a broken picture (the
    dashboard's browser test, twice). Eight drawn from eight threads: every one a PNG."""
    from concurrent.futures import ThreadPoolExecutor

    from cohortflow.qc.dashboard import plots
    from cohortflow.qc.dashboard.queries import MetricView

    def draw(n: int) -> bytes:
        cohort = [1e-5 * (k + 1) for k in range(20)]  # over two decades: a log axis
        metrics = [MetricView(f"m{i}", 1e-4 * (i + n + 1), cohort, 1e-6, 1e-2) for i in range(3)]
        return plots.metric_strips(metrics)

    with ThreadPoolExecutor(8) as pool:
        drawn = list(pool.map(draw, range(8)))
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in drawn)
