"""Export: the export page, and the biomarker table sent as CSV or Parquet (from the form, with
an optional table of labels, or from the API). Every export is audited, refused below the
release size, and passes the release check (``Dashboard.release``) before it is sent."""

# No ``from __future__ import annotations``: FastAPI reads the route signatures.
import datetime as dt
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, Response

from cohortflow.models.users import Account
from cohortflow.qc.dashboard import queries
from cohortflow.qc.dashboard.board import EXPORT, Dashboard


def add_routes(router: APIRouter, board: Dashboard) -> None:
    """``/export`` (the page and the form's post) and ``/api/export/biomarkers``."""
    settings, release = board.settings, board.release

    @router.get("/export", response_class=HTMLResponse)
    def export_page(
        request: Request, who: Annotated[Account, Depends(board.role(*EXPORT))]
    ) -> HTMLResponse:
        with board.db() as session:
            names = queries.protocols(session)
        return board.render(request, "export.html", who, protocols=names)

    def export(who: Account, protocol: str | None, fmt: str, labels: bytes | None) -> Response:
        from cohortflow.models.errors import ExportError
        from cohortflow.models.export import (
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
                with board.db() as session:
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
            with board.db() as session:
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

    @router.post("/export")
    def export_form(
        request: Request,
        who: Annotated[Account, Depends(board.role(*EXPORT))],
        protocol: Annotated[str, Form()] = "",
        format: Annotated[str, Form()] = "csv",
        csrf: Annotated[str, Form()] = "",
        labels: Annotated[UploadFile | None, File()] = None,
    ) -> Response:
        board.check_token(request, csrf)
        content = labels.file.read() if labels is not None and labels.filename else None
        return export(who, protocol, format, content)

    @router.get("/api/export/biomarkers")
    def export_api(
        who: Annotated[Account, Depends(board.role(*EXPORT))],
        protocol: str | None = None,
        format: str = "csv",
    ) -> Response:
        return export(who, protocol, format, None)
