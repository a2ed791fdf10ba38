"""Security headers on every answer of the dashboard (pages, API, pictures, static files, errors).

- ``Content-Security-Policy``: scripts, styles, images and forms from the dashboard itself only;
  no inline script or style runs (the pages carry none), no plug-in, no ``<base>``, and no other
  site may frame the pages (``frame-ancestors 'none'``; ``X-Frame-Options: DENY`` for older
  browsers).
- ``X-Content-Type-Options: nosniff``: a picture or a CSV is never run as a script.
- ``Referrer-Policy: no-referrer``: a page's address (its filters, a pseudonym) never leaves
  with a link.
- ``Cache-Control: no-store`` on everything but the static files: no page of study data stays in
  a shared computer's browser cache.
- Cookies set on a request that came over TLS (directly, or through a trusted proxy that said
  so) are marked ``Secure``.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``): streamed answers pass through
unbuffered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    )
)

HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")
        tls = scope.get("scheme") == "https"  # directly, or through a trusted proxy

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = (
                    [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
                    if not static
                    else list(message.get("headers", []))
                )
                if tls:  # the session cookie never goes back over plain HTTP
                    headers = [_secure(k, v) for k, v in headers]
                headers.extend(HEADERS)
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def _secure(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    if name.lower() == b"set-cookie" and b"secure" not in value.lower():
        return name, value + b"; Secure"
    return name, value
