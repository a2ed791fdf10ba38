"""Request body limits, checked before a body is read (issue 23).

Each request may send at most the limit of its route: the labels upload of the export pages
``UPLOAD_BYTES``, every other request ``BODY_BYTES`` (log-in forms, reviews, cohort saves are a
few hundred bytes). A declared ``Content-Length`` above the limit is answered 413 at once,
without reading anything; a body sent without one (chunked) is counted as it arrives, ends for
the application at the limit, and is answered 413. A plain ASGI middleware: nothing of the
body is buffered here.
"""

from __future__ import annotations

import json

from cohortflow.qc.dashboard.headers import ASGIApp, Message, Receive, Scope, Send

#: a labels file for the export: a CSV of accession numbers and clinical labels
UPLOAD_BYTES = 20 * 1024 * 1024
#: everything else (forms and JSON bodies)
BODY_BYTES = 64 * 1024
#: the routes that take an upload
UPLOAD_PATHS = ("/export", "/api/export/biomarkers")


def limit_for(path: str) -> int:
    return UPLOAD_BYTES if path in UPLOAD_PATHS else BODY_BYTES


class BodyLimit:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = limit_for(str(scope.get("path", "")))
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _answer(send, 400, "the Content-Length header is not a number")
                return
            if size > limit:
                await _answer(send, 413, f"the request body is larger than {limit} bytes")
                return
        # a body without a declared length (chunked) is counted as it arrives; past the limit
        # the application sees it end there, and whatever it answers is replaced by the 413
        received, over, answered = 0, False, False

        async def counted() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def watched(message: Message) -> None:
            nonlocal answered
            if not over:
                await send(message)
            elif not answered:
                answered = True
                await _answer(send, 413, f"the request body is larger than {limit} bytes")

        await self.app(scope, counted, watched)
        if over and not answered:
            await _answer(send, 413, f"the request body is larger than {limit} bytes")


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
