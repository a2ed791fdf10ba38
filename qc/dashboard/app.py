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
"""

# No ``from __future__ import annotations``: FastAPI reads the dependencies in the route
# signatures (``Depends(role(...))``, made inside create_app) at definition time.
import datetime as dt
import hmac
import json
import logging
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.middleware.sessions import SessionMiddleware

from models.database import IndexDB, open_index
from models.database_limits import is_time_limit, time_limit
from models.disclosure import Disclosure
from models.errors import CohortflowError
from models.linkage import audit
from models.reviews import DECISIONS, record_review
from models.settings import Settings
from models.users import (
    ADMIN,
    MAX_LOGGED_NAME,
    RESEARCHER,
    REVIEWER,
    STEWARD,
    Account,
    Login,
    LoginPolicy,
    account,
    authenticate,
    end_sessions,
)
from qc.dashboard import plots, queries
from qc.dashboard.headers import SecurityHeaders
from qc.dashboard.limits import BodyLimit
from qc.dashboard.throttle import ClientThrottle

log = logging.getLogger(__name__)

_HERE = resources.files("qc.dashboard")
#: who may do what (the README's table of roles says the same; tests/test_dashboard.py checks
#: every route for every role against it)
READ = (REVIEWER, RESEARCHER, STEWARD, ADMIN)
REVIEW = (REVIEWER, ADMIN)
EXPORT = (RESEARCHER, ADMIN)
SAVE_COHORT = (RESEARCHER, STEWARD)
AUDIT = (STEWARD, ADMIN)
#: entries per page of the audit log
AUDIT_PAGE = 200
#: the identified layer of cohort discovery: the data steward only
IDENTIFIED_ROLES = (STEWARD,)


class NotLoggedInError(Exception):
    """No valid session: pages redirect to the login, the API answers 401."""


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
) -> FastAPI:
    """The dashboard over ``settings``' index (or ``index``, left open for the caller).

    ``refresh`` brings cohort discovery's table up to date before a cohort query,
    ``protocols`` (name -> include rules) checks protocol filters and ``disclosure`` protects
    the de-identified counts (keyed by the project key); the command line passes all three
    (they live in ``pipelines``, which the dashboard does not import). Without ``disclosure``
    the de-identified cohort pages refuse to answer. ``release`` is the release check every
    export passes before it is sent (without it, exports are refused)."""
    state: dict[str, IndexDB] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["index"] = index or open_index(settings.index)
        try:
            yield
        finally:
            if index is None:
                state["index"].dispose()

    app = FastAPI(
        title="cohortflow QC dashboard",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI would load scripts from a CDN
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings),
        session_cookie="cohortflow_session",
        max_age=int(settings.dashboard.session_hours * 3600),
        same_site="strict",
        https_only=settings.dashboard.https,
    )
    app.add_middleware(BodyLimit)  # before anything reads a body
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, errors included
    static = Path(str(_HERE.joinpath("static")))
    app.mount("/static", StaticFiles(directory=static), name="static")
    templates = Jinja2Templates(directory=str(_HERE.joinpath("templates")))
    templates.env.filters["pct"] = _pct
    templates.env.filters["num"] = _num
    templates.env.filters["when"] = _when
    templates.env.globals["reason_title"] = queries.reason_title
    page_size = settings.dashboard.page_size
    board = settings.dashboard
    policy = LoginPolicy(
        board.login_free_failures, board.login_max_delay_seconds, board.login_lock_after
    )
    throttle = ClientThrottle(board.client_free_failures, board.login_max_delay_seconds)
    outputs = settings.outputs.resolve()

    @contextmanager
    def db() -> Iterator[Session]:
        """A session whose statements stop after ``dashboard.request_seconds`` (answered 503):
        no question holds the index, or a worker thread, for long."""
        with (
            state["index"].session() as session,
            time_limit(session, settings.dashboard.request_seconds),
        ):
            yield session

    def user(request: Request) -> Account:
        """The session's account, while the session lasts: opened under the account's current
        epoch (no logout, password, role or disable since), within the absolute and the idle
        time limits."""
        name = request.session.get("user")
        if not name:
            raise NotLoggedInError
        with db() as session:
            found = account(session, str(name))
        moment = dt.datetime.now(dt.UTC)
        opened = _moment(request.session.get("at"))
        seen = _moment(request.session.get("seen")) or opened
        if (
            found is None
            or not found.active
            or request.session.get("epoch") != found.session_epoch
            or opened is None
            or seen is None
            or moment - opened > dt.timedelta(hours=settings.dashboard.session_hours)
            or moment - seen > dt.timedelta(minutes=settings.dashboard.idle_minutes)
        ):
            request.session.clear()
            raise NotLoggedInError
        request.session["seen"] = moment.isoformat(timespec="seconds")
        return found

    def role(*allowed: str) -> Callable[[Request], Account]:
        def check(request: Request) -> Account:
            found = user(request)
            if found.role not in allowed:
                raise HTTPException(403, f"the {found.role} role cannot do this")
            return found

        return check

    def check_token(request: Request, token: str | None) -> None:
        expected = str(request.session.get("csrf", ""))
        if not token or not expected or not hmac.compare_digest(token, expected):
            raise HTTPException(403, "the form is stale or came from elsewhere: reload the page")

    def render(
        request: Request, name: str, who: Account | None, status: int = 200, **context: Any
    ) -> HTMLResponse:
        context.update(user=who, csrf=request.session.get("csrf", ""), path=request.url.path)
        return templates.TemplateResponse(request, name, context, status_code=status)

    @app.exception_handler(OperationalError)
    async def _too_long(request: Request, exc: OperationalError) -> Response:
        if not is_time_limit(exc):
            raise exc
        detail = "the question took too long: narrow it (a filter, fewer groups)"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": detail}, status_code=503)
        return render(request, "error.html", None, 503, message=detail)

    @app.exception_handler(NotLoggedInError)
    async def _login_first(request: Request, _: NotLoggedInError) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "log in first"}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)

    def refused(request: Request, action: str, detail: dict[str, Any], actor: str) -> None:
        """A refusal is audited (who, what they asked, why)."""
        client = request.client.host if request.client else None
        payload = {"method": request.method, "path": request.url.path, "client": client, **detail}
        with db() as session:
            audit(session, action, json.dumps(payload, default=str), actor=actor or "anonymous")

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code in (401, 403):
            who = str(request.session.get("user", "") or "")
            refused(request, "refused.dashboard", {"status": exc.status_code,
                                                   "why": str(exc.detail)}, who)  # fmt: skip
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        return render(request, "error.html", None, exc.status_code, message=exc.detail)

    # --- login ------------------------------------------------------------------------------

    def login_token(request: Request) -> str:
        """The log-in form's token, kept in the (not yet logged-in) session."""
        token = request.session.get("login_csrf")
        if not token:
            token = secrets.token_urlsafe(24)
            request.session["login_csrf"] = token
        return str(token)

    def attempt(request: Request, username: str, password: str) -> Login:
        """A login attempt, throttled per client address and per account (each refusal and
        failure audited)."""
        client = request.client.host if request.client else "unknown"
        waiting = throttle.wait(client)
        if waiting > 0:
            with db() as session:
                detail = {"client": client, "user": username[:MAX_LOGGED_NAME]}
                audit(session, "login.throttled", json.dumps(detail), actor="anonymous")
            return Login(None, "wait", waiting)
        with db() as session:
            login = authenticate(session, username, password, policy)
        if login.ok:
            throttle.succeeded(client)
        elif login.status == "wrong":
            throttle.failed(client)
        return login

    def refusal(login: Login) -> tuple[int, str, dict[str, str]]:
        if login.status == "wait":
            return 429, login.reason, {"Retry-After": str(login.wait_seconds)}
        return (423 if login.status == "locked" else 401), login.reason, {}

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> HTMLResponse:
        return render(
            request, "login.html", None, next=_local(next), failed=None, token=login_token(request)
        )

    @app.post("/login", response_model=None)
    def login(
        request: Request,
        username: Annotated[str, Form()],
        password: Annotated[str, Form()],
        next: Annotated[str, Form()] = "/",
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        expected = str(request.session.get("login_csrf", ""))
        if not csrf or not expected or not hmac.compare_digest(csrf, expected):
            raise HTTPException(403, "the log-in form is stale or came from elsewhere: reload it")
        found = attempt(request, username.strip(), password)
        if found.account is None:
            status, message, headers = refusal(found)
            page = render(
                request, "login.html", None, status, next=_local(next), failed=message,
                token=login_token(request),
            )  # fmt: skip
            page.headers.update(headers)
            return page
        _open_session(request, found.account)
        return RedirectResponse(_local(next), status_code=303)

    @app.post("/logout")
    def logout(request: Request, csrf: Annotated[str, Form()] = "") -> RedirectResponse:
        check_token(request, csrf)
        name = request.session.get("user")
        if name:
            with db() as session:  # every session of the account ends, not only this one
                end_sessions(session, str(name))
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @app.post("/api/login")
    def api_login(request: Request, body: dict[str, str]) -> Any:
        # a JSON body only: a page elsewhere cannot send one without the browser asking first
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise HTTPException(415, "send the log-in as JSON")
        found = attempt(request, str(body.get("username", "")), str(body.get("password", "")))
        if found.account is None:
            status, message, headers = refusal(found)
            return JSONResponse({"detail": message}, status_code=status, headers=headers)
        _open_session(request, found.account)
        who = found.account
        return {"user": who.username, "role": who.role, "csrf": request.session["csrf"]}

    # --- overview ---------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def overview_page(
        request: Request, who: Annotated[Account, Depends(role(*READ))]
    ) -> HTMLResponse:
        with db() as session:
            data = queries.overview(session)
        return render(request, "overview.html", who, data=data)

    @app.get("/overview/rates.png")
    def rates_png(who: Annotated[Account, Depends(role(*READ))]) -> Response:
        with db() as session:
            runs = queries.run_points(session)
        return Response(plots.rates_over_time(runs), media_type="image/png")

    @app.get("/api/overview")
    def overview_api(who: Annotated[Account, Depends(role(*READ))]) -> dict[str, Any]:
        with db() as session:
            data = queries.overview(session)
        return {
            "protocols": [o.as_dict() for o in data.outcomes],
            "runs": [asdict(r) for r in data.runs],
            "failures_by_reason": [
                {"stage": s, "reason": r, "series": n} for s, r, n in data.reasons
            ],
            "reviewed": data.reviewed,
            "to_review": data.to_review,
        }

    # --- failures ---------------------------------------------------------------------------

    def failure_filter(
        protocol: str | None = None,
        stage: str | None = None,
        reason: str | None = None,
        scanner: str | None = None,
        status: str = "fail",
        date_from: str | None = Query(None, alias="from"),
        date_to: str | None = Query(None, alias="to"),
        sort: str = "recorded_at",
        order: str = "desc",
        page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    ) -> queries.FailureFilter:
        if status not in queries.STATUSES:
            raise HTTPException(400, f"status must be one of {', '.join(queries.STATUSES)}")
        if sort not in queries.SORTS:
            raise HTTPException(400, f"sort must be one of {', '.join(queries.SORTS)}")
        if order not in ("asc", "desc"):
            raise HTTPException(400, "order must be asc or desc")
        return queries.FailureFilter(
            protocol=protocol or None,
            stage=stage or None,
            reason=reason or None,
            scanner=scanner or None,
            status=status,
            date_from=_day(date_from, "from"),
            date_to=_day(date_to, "to"),
            sort=sort,
            descending=order == "desc",
            page=max(1, page),
        )

    @app.get("/failures", response_class=HTMLResponse)
    def failures_page(
        request: Request,
        who: Annotated[Account, Depends(role(*READ))],
        f: Annotated[queries.FailureFilter, Depends(failure_filter)],
    ) -> HTMLResponse:
        with db() as session:
            data = queries.failures(session, f, page_size)
        params = {k: v for k, v in request.query_params.items() if v}

        def link(**changes: Any) -> str:
            merged = {**params, **{k: str(v) for k, v in changes.items() if v is not None}}
            return "/failures?" + urlencode(merged)

        return render(request, "failures.html", who, data=data, f=f, params=params, link=link)

    @app.get("/api/failures")
    def failures_api(
        who: Annotated[Account, Depends(role(*READ))],
        f: Annotated[queries.FailureFilter, Depends(failure_filter)],
    ) -> dict[str, Any]:
        with db() as session:
            data = queries.failures(session, f, page_size)
        return {
            "total": data.total,
            "page": data.page,
            "pages": data.pages,
            "rows": [asdict(r) for r in data.rows],
        }

    # --- series -----------------------------------------------------------------------------

    def series_or_404(session: Session, uid: str) -> queries.SeriesView:
        view = queries.series_view(session, uid)
        if view is None:
            raise HTTPException(404, f"no series {uid} has stage results")
        return view

    @app.get("/series/{uid}", response_class=HTMLResponse)
    def series_page(
        request: Request, uid: str, who: Annotated[Account, Depends(role(*READ))]
    ) -> HTMLResponse:
        with db() as session:
            view = series_or_404(session, uid)
        return render(
            request,
            "series.html",
            who,
            view=view,
            decisions=DECISIONS,
            can_review=who.role in REVIEW,
        )

    @app.get("/api/series/{uid}")
    def series_api(uid: str, who: Annotated[Account, Depends(role(*READ))]) -> dict[str, Any]:
        with db() as session:
            view = series_or_404(session, uid)
        data = asdict(view)
        data.pop("pictures")
        return dict(json.loads(json.dumps(data, default=str)))

    @app.get("/series/{uid}/picture/{stage}.png")
    def picture(uid: str, stage: str, who: Annotated[Account, Depends(role(*READ))]) -> Response:
        with db() as session:
            view = series_or_404(session, uid)
        found = view.pictures.get(stage)
        if found is None:
            raise HTTPException(404, f"no {stage} picture of series {uid}")
        path = Path(found).resolve()
        # only pictures written under the outputs (the pseudonymized side) are served
        if not path.is_relative_to(outputs) or not path.is_file():
            raise HTTPException(404, f"the {stage} picture of series {uid} is not available")
        return FileResponse(path, media_type="image/png")

    @app.get("/series/{uid}/metrics.png")
    def metrics_png(uid: str, who: Annotated[Account, Depends(role(*READ))]) -> Response:
        with db() as session:
            view = series_or_404(session, uid)
        return Response(plots.metric_distributions(view.metrics), media_type="image/png")

    def review(uid: str, who: Account, decision: str, comment: str) -> None:
        with db() as session:
            view = series_or_404(session, uid)
            try:
                record_review(
                    session,
                    uid,
                    decision,
                    comment,
                    who.username,
                    view.verdict,
                    view.verdict_reason,
                )
            except CohortflowError as exc:
                raise HTTPException(400, str(exc)) from exc

    @app.post("/series/{uid}/review")
    def review_form(
        request: Request,
        uid: str,
        who: Annotated[Account, Depends(role(*REVIEW))],
        decision: Annotated[str, Form()],
        comment: Annotated[str, Form()] = "",
        csrf: Annotated[str, Form()] = "",
    ) -> RedirectResponse:
        check_token(request, csrf)
        review(uid, who, decision, comment)
        return RedirectResponse(f"/series/{uid}#reviews", status_code=303)

    @app.post("/api/series/{uid}/review")
    def review_api(
        request: Request,
        uid: str,
        body: dict[str, str],
        who: Annotated[Account, Depends(role(*REVIEW))],
    ) -> dict[str, str]:
        check_token(request, request.headers.get("x-csrf-token"))
        review(uid, who, body.get("decision", ""), body.get("comment", ""))
        return {"series": uid, "decision": body.get("decision", "")}

    # --- export -----------------------------------------------------------------------------

    @app.get("/export", response_class=HTMLResponse)
    def export_page(
        request: Request, who: Annotated[Account, Depends(role(*EXPORT))]
    ) -> HTMLResponse:
        with db() as session:
            names = queries.protocols(session)
        return render(request, "export.html", who, protocols=names)

    def export(who: Account, protocol: str | None, fmt: str, labels: bytes | None) -> Response:
        from models.errors import ExportError
        from models.export import (
            FORMATS,
            audit_export,
            biomarker_table,
            read_labels,
            release_size_refusal,
            write_table,
        )

        if fmt not in FORMATS:
            raise HTTPException(400, f"format must be one of {', '.join(FORMATS)}")
        with tempfile.TemporaryDirectory(prefix="cohortflow-export-") as tmp:
            try:
                parsed = None
                if labels:
                    path = Path(tmp) / "labels.csv"
                    path.write_bytes(labels)
                    parsed = read_labels(path)
                with db() as session:
                    table = biomarker_table(session, protocol or None, parsed)
                    refusal = release_size_refusal(
                        session, table, settings.cohort.min_cell_patients, protocol, who.username
                    )
                    if refusal is None:
                        audit_export(session, table, protocol or None, fmt, who.username)
                if refusal is not None:  # raised once the refusal is in the log
                    raise refusal
                out = Path(tmp) / f"biomarkers.{fmt}"
                write_table(table, out, fmt)
            except ExportError as exc:
                raise HTTPException(400, str(exc).replace(tmp, "(uploaded)")) from exc
            if release is None:
                raise HTTPException(503, "exports need the release check: serve the dashboard "
                                         "with `cohortflow dashboard`")  # fmt: skip
            pseudonyms = {r.pseudonym for r in table.rows if r.pseudonym}
            with db() as session:
                released = release(session, out, pseudonyms, who.username)
            if not released:
                raise HTTPException(
                    422,
                    "the export holds an identifier of the patients it is about (a label "
                    "column?): not sent; the file is kept on the restricted side for the data "
                    "steward",
                )
            data = out.read_bytes()
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        name = f"biomarkers-{protocol or 'all'}-{stamp}.{fmt}"
        media = "text/csv" if fmt == "csv" else "application/vnd.apache.parquet"
        return Response(
            data,
            media_type=media,
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @app.post("/export")
    def export_form(
        request: Request,
        who: Annotated[Account, Depends(role(*EXPORT))],
        protocol: Annotated[str, Form()] = "",
        format: Annotated[str, Form()] = "csv",
        csrf: Annotated[str, Form()] = "",
        labels: Annotated[UploadFile | None, File()] = None,
    ) -> Response:
        check_token(request, csrf)
        content = labels.file.read() if labels is not None and labels.filename else None
        return export(who, protocol, format, content)

    @app.get("/api/export/biomarkers")
    def export_api(
        who: Annotated[Account, Depends(role(*EXPORT))],
        protocol: str | None = None,
        format: str = "csv",
    ) -> Response:
        return export(who, protocol, format, None)

    # --- cohorts ----------------------------------------------------------------------------

    def cohort_query(
        request: Request, who: Account
    ) -> tuple[Any, tuple[str, ...], str, dict[str, str]]:
        """The filters, grouping and layer of a cohort request (its URL query)."""
        from models.cohort import DEIDENTIFIED, FILTER_NAMES, IDENTIFIED, CohortFilter
        from models.cohort import parse_groups as groups_of

        params = {k: v for k, v in request.query_params.items() if v and k != "by"}
        unknown = sorted(set(params) - set(FILTER_NAMES) - {"identified", "limit", "offset"})
        try:
            if unknown:
                CohortFilter.parse({unknown[0]: params[unknown[0]]})  # names the filter
            flt = CohortFilter.parse({k: params.get(k) for k in FILTER_NAMES}, protocols)
            by = groups_of([b for b in request.query_params.getlist("by") if b][:3])
        except CohortflowError as exc:
            raise HTTPException(400, str(exc)) from exc
        layer = DEIDENTIFIED
        if params.get("identified"):
            if who.role not in IDENTIFIED_ROLES:
                raise HTTPException(403, "the identified layer is for steward accounts only")
            layer = IDENTIFIED
        return flt, by, layer, params

    def cohort_count(who: Account, flt: Any, by: tuple[str, ...], layer: str) -> Any:
        from models.cohort import count

        with db() as session:
            try:
                return count(
                    session,
                    flt,
                    by,
                    layer=layer,
                    disclosure=disclosure,
                    age_band=settings.cohort.age_band_years,
                    actor=who.username,
                )
            except CohortflowError as exc:
                raise HTTPException(400, str(exc)) from exc

    def fresh() -> None:
        if refresh is not None:
            refresh(state["index"])

    @app.get("/cohorts", response_class=HTMLResponse)
    def cohorts_page(
        request: Request, who: Annotated[Account, Depends(role(*READ))]
    ) -> HTMLResponse:
        from models.cohort import FILTERS, GROUPS, saved_cohorts

        fresh()
        flt, by, layer, params = cohort_query(request, who)
        result = cohort_count(who, flt, by, layer)
        with db() as session:
            saved = saved_cohorts(session)
        chart = urlencode([*params.items(), *(("by", b) for b in by)])
        return render(
            request,
            "cohorts.html",
            who,
            filters=FILTERS,
            groups=GROUPS,
            params=params,
            by=by,
            result=result,
            saved=saved,
            chart=chart,
            steward=who.role in IDENTIFIED_ROLES,
            can_save=who.role in SAVE_COHORT,
        )

    @app.get("/cohorts/chart.png")
    def cohorts_chart(request: Request, who: Annotated[Account, Depends(role(*READ))]) -> Response:
        flt, by, layer, _ = cohort_query(request, who)
        result = cohort_count(who, flt, by, layer)
        labels = [" / ".join(c.key) for c in result.cells]
        png = plots.cohort_bars(labels, [c.patients for c in result.cells], result.min_cell)
        return Response(png, media_type="image/png")

    @app.get("/api/cohorts/count")
    def cohorts_count_api(
        request: Request, who: Annotated[Account, Depends(role(*READ))]
    ) -> dict[str, Any]:
        fresh()
        flt, by, layer, _ = cohort_query(request, who)
        return dict(cohort_count(who, flt, by, layer).as_dict())

    @app.get("/api/cohorts/list")
    def cohorts_list_api(
        request: Request,
        who: Annotated[Account, Depends(role(*READ))],
        limit: Annotated[int, Query(ge=1, le=MAX_OFFSET)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> dict[str, Any]:
        from models.cohort import list_series

        fresh()
        flt, _, layer, _ = cohort_query(request, who)
        try:
            with db() as session:
                found = list_series(
                    session,
                    flt,
                    layer=layer,
                    disclosure=disclosure,
                    limit=min(max(limit, 1), 1000),
                    offset=max(offset, 0),
                    actor=who.username,
                )
        except CohortflowError as exc:
            raise HTTPException(400, str(exc)) from exc
        return dict(json.loads(json.dumps(found.as_dict(), default=str)))

    def save(who: Account, name: str, description: str, values: dict[str, str]) -> Any:
        from models.cohort import FILTER_NAMES, CohortFilter, save_cohort

        fresh()
        try:
            flt = CohortFilter.parse({k: values.get(k) for k in FILTER_NAMES}, protocols)
            with db() as session:
                return save_cohort(
                    session,
                    name.strip(),
                    flt,
                    actor=who.username,
                    disclosure=disclosure,
                    description=description,
                )
        except CohortflowError as exc:
            raise HTTPException(400, str(exc)) from exc

    @app.post("/cohorts/save")
    async def cohorts_save(
        request: Request, who: Annotated[Account, Depends(role(*SAVE_COHORT))]
    ) -> RedirectResponse:
        form = await request.form()
        check_token(request, str(form.get("csrf", "")))
        values = {str(k): str(v) for k, v in form.items() if isinstance(v, str)}
        name, description = values.pop("name", ""), values.pop("description", "")
        # the database work in a worker thread, as for every other route: never on the loop
        saved = await run_in_threadpool(save, who, name, description, values)
        return RedirectResponse(f"/cohorts?cohort={saved.name}", status_code=303)

    @app.post("/api/cohorts/save")
    def cohorts_save_api(
        request: Request,
        body: dict[str, Any],
        who: Annotated[Account, Depends(role(*SAVE_COHORT))],
    ) -> dict[str, Any]:
        check_token(request, request.headers.get("x-csrf-token"))
        filters = {str(k): str(v) for k, v in dict(body.get("filters") or {}).items()}
        saved = save(who, str(body.get("name", "")), str(body.get("description", "")), filters)
        return dict(saved.as_dict())

    # --- audit ------------------------------------------------------------------------------

    def audit_rows(q: AuditQuery) -> tuple[list[queries.AuditRow], int]:
        with db() as session:
            return queries.audit_log(
                session,
                AUDIT_PAGE,
                offset=(q.page - 1) * AUDIT_PAGE,
                actor=q.actor or None,
                action=q.action or None,
                since=_day(q.since, "since"),
                until=_day(q.until, "until"),
            )

    @app.get("/audit", response_class=HTMLResponse)
    def audit_page(
        request: Request,
        who: Annotated[Account, Depends(role(*AUDIT))],
        q: Annotated[AuditQuery, Depends()],
    ) -> HTMLResponse:
        rows, total = audit_rows(q)
        filters = {"actor": q.actor, "action": q.action, "since": q.since, "until": q.until}
        return render(
            request,
            "audit.html",
            who,
            rows=rows,
            total=total,
            page=q.page,
            pages=max(1, -(-total // AUDIT_PAGE)),
            filters=filters,
            query=urlencode({k: v for k, v in filters.items() if v}),
        )

    @app.get("/api/audit")
    def audit_api(
        response: Response,
        who: Annotated[Account, Depends(role(*AUDIT))],
        q: Annotated[AuditQuery, Depends()],
    ) -> list[dict[str, Any]]:
        """A page of AUDIT_PAGE entries, newest first; ``X-Total-Count`` says how many match."""
        rows, total = audit_rows(q)
        response.headers["X-Total-Count"] = str(total)
        return [json.loads(json.dumps(asdict(r), default=str)) for r in rows]

    return app


#: the largest page number and row offset a request may ask for (beyond any index; a larger
#: number overflowed the database's integer and answered 500)
MAX_PAGE = 1_000_000
MAX_OFFSET = 1_000_000_000


class AuditQuery:
    """The audit log's page and filters, from the query string (``?page=2&actor=rita&action=
    refused.&since=2026-01-01&until=...``)."""

    def __init__(
        self,
        page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
        actor: str = "",
        action: str = "",
        since: str = "",
        until: str = "",
    ) -> None:
        self.page = max(page, 1)
        self.actor, self.action, self.since, self.until = actor, action, since, until


def _open_session(request: Request, who: Account) -> None:
    request.session.clear()  # a fresh session at each login
    moment = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    request.session.update(
        user=who.username,
        csrf=secrets.token_urlsafe(24),
        epoch=who.session_epoch,
        at=moment,
        seen=moment,
    )


def _moment(text: object) -> dt.datetime | None:
    try:
        found = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return found if found.tzinfo is not None else None


def _local(target: str) -> str:
    """Only redirect within the dashboard (never to another site after login)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _day(text: str | None, name: str) -> dt.date | None:
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise HTTPException(400, f"{name} must be a date (YYYY-MM-DD), not {text!r}") from exc


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _when(value: dt.datetime | None) -> str:
    return "–" if value is None else value.strftime("%Y-%m-%d %H:%M")
