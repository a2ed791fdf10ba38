"""The dashboard as it is served (``cohortflow dashboard``, a child process, real HTTP and TLS),
as a hospital's security review would try it (issue 23): HTTPS with a throw-away certificate and
a Secure session cookie; a pattern that backtracks for ever in Python's ``re`` answered at once
while another client logs in.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from cohortflow.models.database import open_index
from cohortflow.models.repository import now
from cohortflow.models.schema import AuditEntry, Patient, Series, Study
from cohortflow.models.settings import load_settings
from cohortflow.models.users import set_account
from tests.ingest_helpers import free_port
from tests.protocol_helpers import BIN
from tests.review_helpers import build
from tests.test_scp_tls import Authority

pytestmark = [pytest.mark.integration]

PASSWORD = "correct horse battery"
#: a study description on which ``^MR HEAD(.|.|.)*#`` backtracks 3**40 times in Python's re
HOSTILE = "MR HEAD" + "x" * 40


@contextmanager
def _serve(home: Path, tmp_path: Path, tls: bool, **env: str) -> Iterator[tuple[str, Path | None]]:
    """``cohortflow dashboard`` (HTTPS with a throw-away certificate when ``tls``) on a free
    port; yields its base URL and the authority's certificate."""
    bundle, args = None, []
    if tls:
        authority = Authority(tmp_path, "test-ca")
        cert, key = authority.issue("dashboard", server=True)
        bundle, args = authority.bundle, ["--tls-cert", str(cert), "--tls-key", str(key)]
    port = free_port()
    log_file = tmp_path / f"dashboard-{port}.log"
    log = log_file.open("wb")
    process = subprocess.Popen(
        [str(BIN / "cohortflow"), "dashboard", "--port", str(port), *args],
        env={**os.environ, "COHORTFLOW_HOME": str(home), **env},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    verify = ssl.create_default_context(cafile=str(bundle)) if bundle else True
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/login", verify=verify, timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError(log_file.read_text()) from None
                time.sleep(0.2)
        yield url, bundle
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        log.close()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An index of 40 studies and one with a hostile description, and two accounts."""
    home = tmp_path / "home"
    monkeypatch.setenv("COHORTFLOW_HOME", str(home))
    index = open_index(load_settings(None).index)
    build(index)
    with index.session() as session:
        set_account(session, "sam", "researcher", PASSWORD)
        set_account(session, "rita", "reviewer", PASSWORD)
        patient = Patient(patient_key="key-hostile", patient_id="PIDX", patient_sex="F")
        session.add(patient)
        session.flush()
        study = Study(
            study_instance_uid="1.2.826.0.1.99.999",
            patient_pk=patient.id,
            study_date=now().date(),
            study_description=HOSTILE,
        )
        session.add(study)
        session.flush()
        session.add(Series(series_instance_uid="1.2.826.0.1.99.999.1", study_pk=study.id))
    index.dispose()
    return home


@pytest.fixture
def served(home: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with _serve(home, tmp_path, tls=True) as (url, bundle):
        assert bundle is not None
        yield url, bundle


def _client(url: str, bundle: Path | None) -> httpx.Client:
    verify = ssl.create_default_context(cafile=str(bundle)) if bundle else True
    return httpx.Client(base_url=url, verify=verify, timeout=30)


def _login(client: httpx.Client, name: str, password: str = PASSWORD) -> httpx.Response:
    """Log in through the form (its token first), as a browser does."""
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token
    return client.post(
        "/login",
        data={"username": name, "password": password, "next": "/", "csrf": token.group(1)},
    )


def test_https_with_a_secure_session_cookie(served: tuple[str, Path]) -> None:
    url, bundle = served
    with _client(url, bundle) as client:
        answer = _login(client, "sam")
        assert answer.status_code == 303
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith("cohortflow_session=")
        assert "; Secure" in cookie and "httponly" in cookie.lower()
        assert "samesite=strict" in cookie.lower()
        assert client.get("/").status_code == 200
        assert "server" not in client.get("/login").headers  # no server banner
    plain = url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on that port
        httpx.get(f"{plain}/login", timeout=5)


def test_a_backtracking_pattern_does_not_hold_up_a_login(
    served: tuple[str, Path], figures: object
) -> None:
    """``^MR HEAD(.|.|.)*#`` against the hostile description: minutes in Python's re (it held
    every other client for 9 s at 20 characters); RE2 answers at once, and a login made
    meanwhile by another client answers as fast as alone."""
    url, bundle = served
    with _client(url, bundle) as researcher, _client(url, bundle) as other:
        assert _login(researcher, "sam").status_code == 303
        alone = []
        for _ in range(3):
            other.cookies.clear()
            started = time.perf_counter()
            assert _login(other, "rita").status_code == 303
            alone.append(time.perf_counter() - started)
        hostile: dict[str, float | int] = {}

        def ask() -> None:
            started = time.perf_counter()
            answer = researcher.get(
                "/api/cohorts/count", params={"study_description": "^MR HEAD(.|.|.)*#"}
            )
            hostile.update(status=answer.status_code, seconds=time.perf_counter() - started)

        thread = threading.Thread(target=ask)
        other.cookies.clear()
        thread.start()
        started = time.perf_counter()
        assert _login(other, "rita").status_code == 303
        meanwhile = time.perf_counter() - started
        thread.join(30)
        assert hostile["status"] == 200
        # Python's re held every other client for 9 s at 20 characters and takes minutes at
        # these 47: the bounds tell that apart, not the machine's load. A login alone takes
        # 0.2 s of argon2id; beside the other test workers (and at the suite's start, the test
        # cache's warm-up) one took 0.66 s against 0.18-0.37 s alone.
        assert hostile["seconds"] < 5.0, hostile
        assert meanwhile < max(2.0, 3 * statistics.median(alone)), (meanwhile, alone)
    report = figures  # a callable fixture
    assert callable(report)
    report(
        f"ReDoS check (served over HTTPS): ^MR HEAD(.|.|.)*# against a 47-character description "
        f"answered {hostile['status']} in {hostile['seconds']:.3f} s; a login meanwhile "
        f"{meanwhile:.3f} s (alone: {min(alone):.3f}-{max(alone):.3f} s)"
    )


@pytest.mark.parametrize("trusted", [False, True])
def test_a_trusted_proxy_is_believed_and_no_one_else(
    home: Path, tmp_path: Path, trusted: bool
) -> None:
    """Behind a TLS proxy (nginx, README): its X-Forwarded-Proto makes the cookie Secure only
    when its address is in ``dashboard.trusted_proxies``."""
    env = {"COHORTFLOW_DASHBOARD__TRUSTED_PROXIES": '["127.0.0.1"]'} if trusted else {}
    with _serve(home, tmp_path, tls=False, **env) as (url, _), _client(url, None) as client:
        client.headers.update({"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.1.2.3"})
        # the log-in page's session cookie (a browser then sends it back over HTTPS only)
        answer = client.get("/login")
        assert answer.status_code == 200
        assert ("; Secure" in answer.headers["set-cookie"]) is trusted


def test_chromium_runs_no_inline_script_under_the_policy(home: Path, tmp_path: Path) -> None:
    """The Content-Security-Policy as a browser applies it: a script injected inline into a
    page (here by rewriting the page on its way, keeping the server's headers) does not run,
    and Chromium reports the violation; the page itself works (its style sheet loads)."""
    from playwright.sync_api import Route, sync_playwright

    with _serve(home, tmp_path, tls=False) as (url, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page()
            messages: list[str] = []
            page.on("console", lambda m: messages.append(m.text))

            def inject(route: Route) -> None:
                answer = route.fetch()
                body = answer.text().replace(
                    "</body>", "<script>window.injected = 'ran'</script></body>"
                )
                route.fulfill(response=answer, body=body)

            page.route(f"{url}/login*", inject)
            page.goto(f"{url}/login")
            assert page.evaluate("window.injected") is None
            assert any("Content Security Policy" in m for m in messages), messages
            rules = page.evaluate("[...document.styleSheets].map(s => s.cssRules.length)")
            assert rules and rules[0] > 0  # the dashboard's own style sheet applies
            page.unroute(f"{url}/login*")
            page.fill("input[name=username]", "sam")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/")
            assert "sam (" in page.content()
        finally:
            browser.close()


def test_the_review_findings_replayed_over_http(
    home: Path, tmp_path: Path, figures: object
) -> None:
    """Issue 23's findings against the served dashboard: a 100 MB upload refused with 413
    before it is read (the server's memory does not grow); an unknown name refused in a wrong
    password's time (within 20 %); a lockout after the configured failures, audited; a session
    dead after its account logged out elsewhere; the security headers on the answers."""
    import socket
    from urllib.parse import urlparse

    import psutil

    env = {
        "COHORTFLOW_DASHBOARD__LOGIN_FREE_FAILURES": "8",
        "COHORTFLOW_DASHBOARD__LOGIN_LOCK_AFTER": "9",
        "COHORTFLOW_DASHBOARD__CLIENT_FREE_FAILURES": "100",
    }
    with _serve(home, tmp_path, tls=False, **env) as (url, _):
        port = int(urlparse(url).port or 0)
        server = next(
            p
            for p in psutil.process_iter(["cmdline"])
            if "dashboard" in (p.info["cmdline"] or []) and str(port) in p.info["cmdline"]
        )
        with _client(url, None) as sam:
            assert _login(sam, "sam").status_code == 303
            token = re.search(r'name="csrf" value="([^"]+)"', sam.get("/export").text)
            assert token
            rss = server.memory_info().rss
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                cookie = "; ".join(f"{k}={v}" for k, v in sam.cookies.items())
                raw.sendall(
                    f"POST /export HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n"
                    f"Content-Type: multipart/form-data; boundary=b\r\n"
                    f"Content-Length: {100 * 2**20}\r\n\r\n".encode()
                    + b"--b\r\n" + b"x" * 65536
                )  # fmt: skip
                started = time.perf_counter()
                first = raw.recv(4096).decode(errors="replace")
            assert first.startswith("HTTP/1.1 413"), first[:200]
            assert time.perf_counter() - started < 2
            assert server.memory_info().rss - rss < 20 * 2**20
            for header in ("content-security-policy", "x-frame-options", "referrer-policy"):
                assert header in sam.get("/").headers, header
            # the same time for a name that does not exist as for a wrong password
            with _client(url, None) as guesser:

                def refused(name: str) -> float:
                    started = time.perf_counter()
                    assert _login(guesser, name, "not the password").status_code == 401
                    return time.perf_counter() - started

                # interleaved, so that the other test worker's load falls on both alike
                pairs = [(refused("nobody"), refused("rita")) for _ in range(5)]
                unknown = statistics.median(u for u, _ in pairs)
                wrong = statistics.median(w for _, w in pairs)
                # the median of each pair's ratio: a burst of load falls within a pair, where
                # the medians of the two series apart failed once under the other worker's load
                ratio = statistics.median(u / w for u, w in pairs)
                assert abs(ratio - 1) < 0.2, pairs
                # rita has failed 5 times: 3 more pass unchecked-free, the 9th locks
                for n in range(4):
                    assert _login(guesser, "rita", f"still wrong {n}").status_code == 401, n
                locked = _login(guesser, "rita", PASSWORD)
                assert locked.status_code == 423
            audit = sam.get("/audit?action=user.locked")
            assert audit.status_code == 403  # a researcher does not read the audit log
            # two sessions of one account: a logout ends both
            with _client(url, None) as elsewhere:
                assert _login(elsewhere, "sam").status_code == 303
                assert sam.get("/api/overview").status_code == 200
                page = elsewhere.get("/")
                token = re.search(r'name="csrf" value="([^"]+)"', page.text)
                assert token
                elsewhere.post("/logout", data={"csrf": token.group(1)})
                assert sam.get("/api/overview").status_code == 401
    index = open_index(load_settings(None).index)
    with index.session() as session:
        actions = {e.action for e in session.scalars(select(AuditEntry))}
    index.dispose()
    assert {"login.failed", "user.locked", "login.locked", "logout"} <= actions
    assert callable(figures)
    figures(
        f"Login timing (served over HTTP, median of 5 interleaved): unknown name {unknown:.3f} s, "
        f"wrong password {wrong:.3f} s ({100 * (unknown / wrong - 1):+.1f} %); locked (423) "
        f"at the 9th failure; 100 MB upload answered 413 before it was read"
    )


def _cohortflow(*args: str, stdin: str | None = None) -> None:
    """An administrator's ``cohortflow users ...`` on the served dashboard's index."""
    done = subprocess.run(
        [str(BIN / "cohortflow"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_sessions_end_over_http(home: Path, tmp_path: Path) -> None:
    """A served session dies when its account's password changes, its role changes or it is
    disabled (``cohortflow users``, from another process), and after the idle limit."""
    new = "another horse battery"
    with _serve(home, tmp_path, tls=False, COHORTFLOW_DASHBOARD__IDLE_MINUTES="0.05") as (url, _):
        steps: list[tuple[tuple[str, ...], str | None]] = [
            (("users", "add", "sam", "--role", "researcher", "--password-stdin"), new + "\n"),
            (("users", "add", "sam", "--role", "reviewer", "--password-stdin"), new + "\n"),
            (("users", "disable", "sam"), None),
        ]
        password = PASSWORD
        for args, stdin in steps:
            with _client(url, None) as sam:
                assert _login(sam, "sam", password).status_code == 303, args
                assert sam.get("/api/overview").status_code == 200
                _cohortflow(*args, stdin=stdin)
                assert sam.get("/api/overview").status_code == 401, args
                password = new
        with _client(url, None) as sam:
            assert _login(sam, "sam", new).status_code == 401  # disabled
        # the idle limit (3 s here): a session used within it lives, one left longer dies
        with _client(url, None) as rita:
            assert _login(rita, "rita").status_code == 303
            for _ in range(3):
                time.sleep(1.5)
                assert rita.get("/api/overview").status_code == 200
            time.sleep(3.5)
            assert rita.get("/api/overview").status_code == 401
