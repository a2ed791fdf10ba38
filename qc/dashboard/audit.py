"""The audit log, for the steward and the admin: a page of entries (newest first, filtered by
actor, action and days) and the same as JSON (``X-Total-Count`` says how many match)."""

# No ``from __future__ import annotations``: FastAPI reads the route signatures.
import json
from dataclasses import asdict
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response

from cohortflow.models.users import Account
from cohortflow.qc.dashboard import queries
from cohortflow.qc.dashboard.board import AUDIT, MAX_PAGE, Dashboard, parse_day

#: entries per page of the audit log
AUDIT_PAGE = 200


def add_routes(router: APIRouter, board: Dashboard) -> None:
    """``/audit`` and ``/api/audit``."""

    def audit_rows(q: AuditQuery) -> tuple[list[queries.AuditRow], int]:
        with board.db() as session:
            return queries.audit_log(
                session,
                AUDIT_PAGE,
                offset=(q.page - 1) * AUDIT_PAGE,
                actor=q.actor or None,
                action=q.action or None,
                since=parse_day(q.since, "since"),
                until=parse_day(q.until, "until"),
            )

    @router.get("/audit", response_class=HTMLResponse)
    def audit_page(
        request: Request,
        who: Annotated[Account, Depends(board.role(*AUDIT))],
        q: Annotated[AuditQuery, Depends()],
    ) -> HTMLResponse:
        rows, total = audit_rows(q)
        filters = {"actor": q.actor, "action": q.action, "since": q.since, "until": q.until}
        return board.render(
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

    @router.get("/api/audit")
    def audit_api(
        response: Response,
        who: Annotated[Account, Depends(board.role(*AUDIT))],
        q: Annotated[AuditQuery, Depends()],
    ) -> list[dict[str, Any]]:
        """A page of AUDIT_PAGE entries, newest first; ``X-Total-Count`` says how many match."""
        rows, total = audit_rows(q)
        response.headers["X-Total-Count"] = str(total)
        return [json.loads(json.dumps(asdict(r), default=str)) for r in rows]


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
