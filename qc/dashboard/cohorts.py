"""Cohort discovery: counts of patients by filters and groups (the page, its chart and the
API), the list of matching series, and saved cohorts. The de-identified layer is protected by
``Dashboard.disclosure`` (without it those pages refuse to answer); the identified layer is for
the data steward only (``IDENTIFIED_ROLES``)."""

# No ``from __future__ import annotations``: FastAPI reads the route signatures.
import json
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from cohortflow.models.errors import CohortflowError
from cohortflow.models.users import Account
from cohortflow.qc.dashboard import plots
from cohortflow.qc.dashboard.board import IDENTIFIED_ROLES, MAX_OFFSET, READ, SAVE_COHORT, Dashboard


def add_routes(router: APIRouter, board: Dashboard) -> None:
    """``/cohorts`` (the page, its chart, saving) and ``/api/cohorts/...``."""
    settings, protocols, disclosure = board.settings, board.protocols, board.disclosure

    def cohort_query(
        request: Request, who: Account
    ) -> tuple[Any, tuple[str, ...], str, dict[str, str]]:
        """The filters, grouping and layer of a cohort request (its URL query)."""
        from cohortflow.models.cohort import DEIDENTIFIED, FILTER_NAMES, IDENTIFIED, CohortFilter
        from cohortflow.models.cohort import parse_groups as groups_of

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
        from cohortflow.models.cohort import count

        with board.db() as session:
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

    @router.get("/cohorts", response_class=HTMLResponse)
    def cohorts_page(
        request: Request, who: Annotated[Account, Depends(board.role(*READ))]
    ) -> HTMLResponse:
        from cohortflow.models.cohort import FILTERS, GROUPS, saved_cohorts

        board.fresh()
        flt, by, layer, params = cohort_query(request, who)
        result = cohort_count(who, flt, by, layer)
        with board.db() as session:
            saved = saved_cohorts(session)
        chart = urlencode([*params.items(), *(("by", b) for b in by)])
        return board.render(
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

    @router.get("/cohorts/chart.png")
    def cohorts_chart(
        request: Request, who: Annotated[Account, Depends(board.role(*READ))]
    ) -> Response:
        flt, by, layer, _ = cohort_query(request, who)
        result = cohort_count(who, flt, by, layer)
        labels = [" / ".join(c.key) for c in result.cells]
        png = plots.cohort_bars(labels, [c.patients for c in result.cells], result.min_cell)
        return Response(png, media_type="image/png")

    @router.get("/api/cohorts/count")
    def cohorts_count_api(
        request: Request, who: Annotated[Account, Depends(board.role(*READ))]
    ) -> dict[str, Any]:
        board.fresh()
        flt, by, layer, _ = cohort_query(request, who)
        return dict(cohort_count(who, flt, by, layer).as_dict())

    @router.get("/api/cohorts/list")
    def cohorts_list_api(
        request: Request,
        who: Annotated[Account, Depends(board.role(*READ))],
        limit: Annotated[int, Query(ge=1, le=MAX_OFFSET)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> dict[str, Any]:
        from cohortflow.models.cohort import list_series

        board.fresh()
        flt, _, layer, _ = cohort_query(request, who)
        try:
            with board.db() as session:
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
        from cohortflow.models.cohort import FILTER_NAMES, CohortFilter, save_cohort

        board.fresh()
        try:
            flt = CohortFilter.parse({k: values.get(k) for k in FILTER_NAMES}, protocols)
            with board.db() as session:
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

    @router.post("/cohorts/save")
    async def cohorts_save(
        request: Request, who: Annotated[Account, Depends(board.role(*SAVE_COHORT))]
    ) -> RedirectResponse:
        form = await request.form()
        board.check_token(request, str(form.get("csrf", "")))
        values = {str(k): str(v) for k, v in form.items() if isinstance(v, str)}
        name, description = values.pop("name", ""), values.pop("description", "")
        # the database work in a worker thread, as for every other route: never on the loop
        saved = await run_in_threadpool(save, who, name, description, values)
        return RedirectResponse(f"/cohorts?cohort={saved.name}", status_code=303)

    @router.post("/api/cohorts/save")
    def cohorts_save_api(
        request: Request,
        body: dict[str, Any],
        who: Annotated[Account, Depends(board.role(*SAVE_COHORT))],
    ) -> dict[str, Any]:
        board.check_token(request, request.headers.get("x-csrf-token"))
        filters = {str(k): str(v) for k, v in dict(body.get("filters") or {}).items()}
        saved = save(who, str(body.get("name", "")), str(body.get("description", "")), filters)
        return dict(saved.as_dict())
