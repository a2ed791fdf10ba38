"""The QC dashboard web application (FastAPI, server-rendered with Jinja2).

Pages: overview (success rates per protocol, stage, scanner and over time; failures by reason),
the failure list (filters and sort order in the URL, paginated), the series page (pictures,
findings, metrics beside the protocol's distribution, biomarkers, history, reviews), the
export page and the audit log. JSON under ``/api``. Every asset is served by the app itself.

Access: a login (``cohortflow users add``) opens a signed session cookie (``SameSite=strict``,
HttpOnly). Without one, pages redirect to ``/login`` and the API answers 401. Roles:
reviewer (read, review), researcher (read, export), admin (everything, the audit log). Forms
carry a per-session token against cross-site requests. Logins, reviews and exports land in the
audit log.

The routes are grouped by job, one module a group, each adding its routes to the app's own
router given the one shared ``Dashboard`` (``board.py``): ``auth.py`` (log in and out),
``review.py`` (overview, failures, series, reviews), ``exports.py``, ``cohorts.py`` and
``audit.py``.
"""

import datetime as dt
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from starlette.middleware.sessions import SessionMiddleware

from cohortflow.models.database import IndexDB, open_index
from cohortflow.models.database_limits import is_time_limit
from cohortflow.models.disclosure import Disclosure
from cohortflow.models.settings import Settings
from cohortflow.models.users import LoginPolicy
from cohortflow.qc.dashboard import audit, auth, cohorts, exports, queries, review
from cohortflow.qc.dashboard.board import (
    AUDIT,
    EXPORT,
    IDENTIFIED_ROLES,
    READ,
    REVIEW,
    SAVE_COHORT,
    Dashboard,
    NotLoggedInError,
)
from cohortflow.qc.dashboard.headers import SecurityHeaders
from cohortflow.qc.dashboard.limits import BodyLimit
from cohortflow.qc.dashboard.throttle import ClientThrottle
from cohortflow.qc.policy import QcPolicy

#: the roles of each right, read here by tests/test_dashboard.py (declared in ``board.py``)
__all__ = [
    "AUDIT",
    "EXPORT",
    "IDENTIFIED_ROLES",
    "READ",
    "REVIEW",
    "SAVE_COHORT",
    "create_app",
    "session_secret",
]

log = logging.getLogger(__name__)

_HERE = resources.files("cohortflow.qc.dashboard")
#: the groups of routes, in the order they are served
GROUPS = (auth, review, exports, cohorts, audit)


def session_secret(settings: Settings) -> str:
    """The key that signs session cookies: made once, kept with the project's secrets."""
    path = settings.home / "secrets" / "dashboard.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = path.with_name(path.name + ".part")
        temp.write_text(secrets.token_hex(32))
        temp.chmod(0o600)
        temp.replace(path)
    return path.read_text().strip()


def create_app(
    settings: Settings,
    index: IndexDB | None = None,
    *,
    refresh: Callable[[IndexDB], object] | None = None,
    protocols: Mapping[str, Sequence[str]] | None = None,
    disclosure: Disclosure | None = None,
    release: Callable[[Session, Path, set[str], str], bool] | None = None,
    qc_policy: Callable[[str | None], QcPolicy] | None = None,
) -> FastAPI:
    """The dashboard over ``settings``' index (or ``index``, left open for the caller).

    ``refresh`` brings cohort discovery's table up to date before a cohort query,
    ``protocols`` (name -> include rules) checks protocol filters and ``disclosure`` protects
    the de-identified counts (keyed by the project key); the command line passes all three
    (they live in ``pipelines``, which the dashboard does not import). Without ``disclosure``
    the de-identified cohort pages refuse to answer. ``release`` is the release check every
    export passes before it is sent (without it, exports are refused). ``qc_policy`` gives a
    protocol's QC policy: the series page draws each metric's acceptance range from it (without
    it, none is drawn)."""
    conf = settings.dashboard
    shared = Dashboard(
        settings=settings,
        templates=_templates(),
        policy=LoginPolicy(
            conf.login_free_failures, conf.login_max_delay_seconds, conf.login_lock_after
        ),
        throttle=ClientThrottle(conf.client_free_failures, conf.login_max_delay_seconds),
        outputs=settings.outputs.resolve(),
        refresh=refresh,
        protocols=protocols,
        disclosure=disclosure,
        release=release,
        qc_policy=qc_policy,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        shared.opened["index"] = index or open_index(settings.index)
        try:
            yield
        finally:
            if index is None:
                shared.index.dispose()

    app = FastAPI(
        title="cohortflow QC dashboard",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI would load scripts from a CDN
        redoc_url=None,
        openapi_url=None,
    )
    app.state.dashboard = shared  # for whoever holds only the app
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings),
        session_cookie="cohortflow_session",
        max_age=int(conf.session_hours * 3600),
        same_site="strict",
        https_only=conf.https,
    )
    app.add_middleware(BodyLimit)  # before anything reads a body
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, errors included
    static = Path(str(_HERE.joinpath("static")))
    app.mount("/static", StaticFiles(directory=static), name="static")
    for group in GROUPS:  # on the app's own router (an included router would nest)
        group.add_routes(app.router, shared)
    _handle_errors(app, shared)
    return app


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(_HERE.joinpath("templates")))
    templates.env.filters["pct"] = _pct
    templates.env.filters["num"] = _num
    templates.env.filters["when"] = _when
    templates.env.filters["dash"] = _dash
    templates.env.filters["sig"] = _sig
    templates.env.globals["reason_title"] = queries.reason_title
    return templates


def _handle_errors(app: FastAPI, board: Dashboard) -> None:
    """A statement past the time limit answers 503, no session leads to the login (401 from
    the API), and every 401 and 403 lands in the audit log."""

    @app.exception_handler(OperationalError)
    async def _too_long(request: Request, exc: OperationalError) -> Response:
        if not is_time_limit(exc):
            raise exc
        detail = "the question took too long: narrow it (a filter, fewer groups)"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": detail}, status_code=503)
        return board.render(request, "error.html", None, 503, message=detail)

    @app.exception_handler(NotLoggedInError)
    async def _login_first(request: Request, _: NotLoggedInError) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "log in first"}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code in (401, 403):
            who = str(request.session.get("user", "") or "")
            detail = {"status": exc.status_code, "why": str(exc.detail)}
            board.refused(request, "refused.dashboard", detail, who)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        return board.render(request, "error.html", None, exc.status_code, message=exc.detail)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _sig(value: float | None) -> str:
    """A measured value to three significant digits, whatever its scale (a metric can be
    0.000128 or 60,025): whole numbers from 100 up, powers of ten below 0.001."""
    if value is None:
        return "–"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.2e}"


def _dash(value: Any) -> str:
    """A value as it is, a missing one (None, empty) as a dash: never "None" on a page."""
    return "–" if value is None or value == "" else str(value)


def _when(value: dt.datetime | None) -> str:
    return "–" if value is None else value.strftime("%Y-%m-%d %H:%M")
