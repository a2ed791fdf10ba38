"""Logging in and out: the log-in form and its token, the JSON log-in, throttled attempts (per
client address and per account, each refusal and failure audited), the session opened at a
login and ended (every session of the account) at a logout."""

# No ``from __future__ import annotations``: FastAPI reads the route signatures.
import datetime as dt
import hmac
import json
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from cohortflow.models.linkage import audit
from cohortflow.models.users import MAX_LOGGED_NAME, Account, Login, authenticate, end_sessions
from cohortflow.qc.dashboard.board import Dashboard, local_target


def add_routes(router: APIRouter, board: Dashboard) -> None:
    """``/login`` (the form, and its post), ``/logout`` and ``/api/login``."""

    def attempt(request: Request, username: str, password: str) -> Login:
        """A login attempt, throttled per client address and per account (each refusal and
        failure audited)."""
        client = request.client.host if request.client else "unknown"
        waiting = board.throttle.wait(client)
        if waiting > 0:
            with board.db() as session:
                detail = {"client": client, "user": username[:MAX_LOGGED_NAME]}
                audit(session, "login.throttled", json.dumps(detail), actor="anonymous")
            return Login(None, "wait", waiting)
        with board.db() as session:
            login = authenticate(session, username, password, board.policy)
        if login.ok:
            board.throttle.succeeded(client)
        elif login.status == "wrong":
            board.throttle.failed(client)
        return login

    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> HTMLResponse:
        return board.render(
            request,
            "login.html",
            None,
            next=local_target(next),
            failed=None,
            token=login_token(request),
        )

    @router.post("/login", response_model=None)
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
            page = board.render(
                request, "login.html", None, status, next=local_target(next), failed=message,
                token=login_token(request),
            )  # fmt: skip
            page.headers.update(headers)
            return page
        open_session(request, found.account)
        return RedirectResponse(local_target(next), status_code=303)

    @router.post("/logout")
    def logout(request: Request, csrf: Annotated[str, Form()] = "") -> RedirectResponse:
        board.check_token(request, csrf)
        name = request.session.get("user")
        if name:
            with board.db() as session:  # every session of the account ends, not only this one
                end_sessions(session, str(name))
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @router.post("/api/login")
    def api_login(request: Request, body: dict[str, str]) -> Any:
        # a JSON body only: a page elsewhere cannot send one without the browser asking first
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise HTTPException(415, "send the log-in as JSON")
        found = attempt(request, str(body.get("username", "")), str(body.get("password", "")))
        if found.account is None:
            status, message, headers = refusal(found)
            return JSONResponse({"detail": message}, status_code=status, headers=headers)
        open_session(request, found.account)
        who = found.account
        return {"user": who.username, "role": who.role, "csrf": request.session["csrf"]}


def login_token(request: Request) -> str:
    """The log-in form's token, kept in the (not yet logged-in) session."""
    token = request.session.get("login_csrf")
    if not token:
        token = secrets.token_urlsafe(24)
        request.session["login_csrf"] = token
    return str(token)


def refusal(login: Login) -> tuple[int, str, dict[str, str]]:
    """A refused login's status, message and headers (``Retry-After`` while throttled)."""
    if login.status == "wait":
        return 429, login.reason, {"Retry-After": str(login.wait_seconds)}
    return (423 if login.status == "locked" else 401), login.reason, {}


def open_session(request: Request, who: Account) -> None:
    """A fresh session at each login: the account, its epoch, a new form token, the times."""
    request.session.clear()
    moment = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    request.session.update(
        user=who.username,
        csrf=secrets.token_urlsafe(24),
        epoch=who.session_epoch,
        at=moment,
        seen=moment,
    )
