"""The QC review pages: the overview (success rates, runs over time, failures by reason), the
failure list (filters and sort order in the URL, paginated), the series page (the slice viewer,
pictures, findings, metrics beside the protocol's distribution and acceptance range, history)
and the reviewers' decisions; their JSON under ``/api``."""

# No ``from __future__ import annotations``: FastAPI reads the route signatures.
import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from cohortflow.models.errors import CohortflowError
from cohortflow.models.reviews import DECISIONS, record_review
from cohortflow.models.users import Account
from cohortflow.qc.dashboard import plots, queries, viewer
from cohortflow.qc.dashboard.board import MAX_PAGE, READ, REVIEW, Dashboard, parse_day


def add_routes(router: APIRouter, board: Dashboard) -> None:
    """``/``, ``/failures``, ``/series/{uid}`` (its pictures and reviews) and their API."""
    page_size = board.settings.dashboard.page_size

    # --- overview ---------------------------------------------------------------------------

    @router.get("/", response_class=HTMLResponse)
    def overview_page(
        request: Request, who: Annotated[Account, Depends(board.role(*READ))]
    ) -> HTMLResponse:
        with board.db() as session:
            data = queries.overview(session)
        return board.render(request, "overview.html", who, data=data)

    @router.get("/overview/rates.png")
    def rates_png(who: Annotated[Account, Depends(board.role(*READ))]) -> Response:
        with board.db() as session:
            runs = queries.run_points(session)
        return Response(plots.rates_over_time(runs), media_type="image/png")

    @router.get("/api/overview")
    def overview_api(who: Annotated[Account, Depends(board.role(*READ))]) -> dict[str, Any]:
        with board.db() as session:
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

    @router.get("/failures", response_class=HTMLResponse)
    def failures_page(
        request: Request,
        who: Annotated[Account, Depends(board.role(*READ))],
        f: Annotated[queries.FailureFilter, Depends(failure_filter)],
    ) -> HTMLResponse:
        with board.db() as session:
            data = queries.failures(session, f, page_size)
        params = {k: v for k, v in request.query_params.items() if v}

        def link(**changes: Any) -> str:
            merged = {**params, **{k: str(v) for k, v in changes.items() if v is not None}}
            return "/failures?" + urlencode(merged)

        return board.render(request, "failures.html", who, data=data, f=f, params=params, link=link)

    @router.get("/api/failures")
    def failures_api(
        who: Annotated[Account, Depends(board.role(*READ))],
        f: Annotated[queries.FailureFilter, Depends(failure_filter)],
    ) -> dict[str, Any]:
        with board.db() as session:
            data = queries.failures(session, f, page_size)
        return {
            "total": data.total,
            "page": data.page,
            "pages": data.pages,
            "rows": [asdict(r) for r in data.rows],
        }

    # --- series -----------------------------------------------------------------------------

    def view_of(uid: str) -> queries.SeriesView:
        with board.db() as session:
            view = queries.series_view(session, uid, board.qc_policy)
        if view is None:
            raise HTTPException(404, f"no series {uid} has stage results")
        return view

    @router.get("/series/{uid}", response_class=HTMLResponse)
    def series_page(
        request: Request, uid: str, who: Annotated[Account, Depends(board.role(*READ))]
    ) -> HTMLResponse:
        view = view_of(uid)
        # a picture recorded but not served (written outside the outputs) is said so, not
        # shown as a broken image
        served = {stage: board.picture(found) is not None for stage, found in view.pictures.items()}
        return board.render(
            request,
            "series.html",
            who,
            view=view,
            served=served,
            viewable=served_image(board, view.image) is not None,
            decisions=DECISIONS,
            can_review=who.role in REVIEW,
        )

    @router.get("/api/series/{uid}")
    def series_api(uid: str, who: Annotated[Account, Depends(board.role(*READ))]) -> dict[str, Any]:
        view = view_of(uid)
        data = asdict(view)
        data.pop("pictures")
        data.pop("image")  # where the files lie is the server's business
        data["title"] = view.title
        return dict(json.loads(json.dumps(data, default=str)))

    # --- the slice viewer ---------------------------------------------------------------------

    def volume_of(uid: str) -> viewer.Volume:
        """The series' image (and labels) as the viewer shows it; 404 when there is none."""
        with board.db() as session:
            recorded = queries.series_image(session, uid)
        paths = served_image(board, recorded)
        if paths is None:
            raise HTTPException(404, f"series {uid} has no image under the outputs folder to view")
        image, labels = paths
        try:
            # a file written again is read again
            key = tuple((str(p), *_stamp(p)) for p in (image, labels) if p is not None)
            return board.volumes.get(key, lambda: viewer.read_volume(image, labels))
        except viewer.ViewerError as exc:
            raise HTTPException(404, f"the image of series {uid} cannot be viewed: {exc}") from exc
        except OSError as exc:  # removed or unreadable since it was found (never its path)
            raise HTTPException(404, f"the image of series {uid} cannot be read") from exc

    @router.get("/api/series/{uid}/volume")
    def volume_api(uid: str, who: Annotated[Account, Depends(board.role(*READ))]) -> dict[str, Any]:
        return volume_of(uid).describe()

    @router.get("/series/{uid}/slice.png")
    def slice_png(
        uid: str,
        who: Annotated[Account, Depends(board.role(*READ))],
        plane: Annotated[str, Query(pattern="^(axial|coronal|sagittal)$")] = "axial",
        index: Annotated[int | None, Query(ge=0, le=viewer.MAX_VOXELS)] = None,
        center: Annotated[float | None, Query(ge=-1e12, le=1e12, allow_inf_nan=False)] = None,
        width: Annotated[float | None, Query(gt=0, le=1e12, allow_inf_nan=False)] = None,
        overlay: bool = True,
        opacity: Annotated[float, Query(ge=0, le=1, allow_inf_nan=False)] = 0.7,
    ) -> Response:
        volume = volume_of(uid)
        shown = viewer.PLANES[plane]
        slices = volume.image.shape[shown.normal]
        if index is None:
            index = slices // 2
        if index >= slices:
            raise HTTPException(400, f"index must be below {slices} in the {plane} plane")
        default_center, default_width = volume.window
        png = viewer.render(
            volume,
            shown,
            index,
            default_center if center is None else center,
            default_width if width is None else width,
            overlay,
            opacity,
        )
        return Response(png, media_type="image/png")

    @router.get("/series/{uid}/picture/{stage}.png")
    def picture(
        uid: str, stage: str, who: Annotated[Account, Depends(board.role(*READ))]
    ) -> Response:
        view = view_of(uid)
        found = view.pictures.get(stage)
        if found is None:
            raise HTTPException(404, f"no {stage} picture of series {uid}")
        # only pictures written under the outputs (the pseudonymized side) are served
        path = board.picture(found)
        if path is None:
            raise HTTPException(404, f"the {stage} picture of series {uid} is not available")
        return FileResponse(path, media_type="image/png")

    @router.get("/series/{uid}/metrics.png")
    def metrics_png(uid: str, who: Annotated[Account, Depends(board.role(*READ))]) -> Response:
        return Response(plots.metric_strips(view_of(uid).metrics), media_type="image/png")

    def review(uid: str, who: Account, decision: str, comment: str) -> None:
        with board.db() as session:
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

    @router.post("/series/{uid}/review")
    def review_form(
        request: Request,
        uid: str,
        who: Annotated[Account, Depends(board.role(*REVIEW))],
        decision: Annotated[str, Form()],
        comment: Annotated[str, Form()] = "",
        csrf: Annotated[str, Form()] = "",
    ) -> RedirectResponse:
        board.check_token(request, csrf)
        review(uid, who, decision, comment)
        return RedirectResponse(f"/series/{uid}#reviews", status_code=303)

    @router.post("/api/series/{uid}/review")
    def review_api(
        request: Request,
        uid: str,
        body: dict[str, str],
        who: Annotated[Account, Depends(board.role(*REVIEW))],
    ) -> dict[str, str]:
        board.check_token(request, request.headers.get("x-csrf-token"))
        review(uid, who, body.get("decision", ""), body.get("comment", ""))
        return {"series": uid, "decision": body.get("decision", "")}


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
    """The failure list's filters, from the query string (a route dependency)."""
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
        date_from=parse_day(date_from, "from"),
        date_to=parse_day(date_to, "to"),
        sort=sort,
        descending=order == "desc",
        page=max(1, page),
    )


def served_image(
    board: Dashboard, recorded: queries.SeriesImage | None
) -> tuple[Path, Path | None] | None:
    """A series' image and its labels as the viewer may read them: files under the outputs
    folder only (``Dashboard.served``); labels elsewhere are left out, an image elsewhere
    means no viewer."""
    if recorded is None:
        return None
    image = board.served(recorded.image, under_outputs=recorded.relative)
    if image is None:
        return None
    labels = board.served(recorded.labels) if recorded.labels else None
    return image, labels


def _stamp(path: Path) -> tuple[int, int]:
    """What changes when a file is written again: its size and modification time."""
    found = path.stat()
    return found.st_size, found.st_mtime_ns


def series_or_404(session: Session, uid: str) -> queries.SeriesView:
    view = queries.series_view(session, uid)
    if view is None:
        raise HTTPException(404, f"no series {uid} has stage results")
    return view
