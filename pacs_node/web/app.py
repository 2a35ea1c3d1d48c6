"""The node's Starlette application: its routes, errors answered as JSON, an access log.

Every answer the node gives a machine is JSON with an ``error`` when something
is wrong (a DICOMweb client, Prometheus, a load balancer's health check), never
an HTML page; an unknown resource is 404, a known one with the wrong method
405 with ``Allow``.

The access log (logger ``pacs_node.web.access``, INFO) has one line per request:
peer, who (user or token label), method, path, status, bytes, milliseconds. The
path is logged without its query (its control characters escaped, as in every
line: :class:`pacs_node.OneLineFormatter`), and no path of the node holds patient data;
health checks, metrics scrapes and the stylesheet are logged at DEBUG only.

Every answer of the application over HTTPS carries ``Strict-Transport-Security``
(``[http] hsts_seconds``, a year by default; 0: none): a browser that has once reached
the console over HTTPS never falls back to plain HTTP for its host name (the front
door's own 400 and 503, and an unexpected fault's 500, come before the application).

A path that is known with or without its last ``/`` (``/console/jobs/``) is redirected to
the known one by a path alone: Starlette's own redirect wrote ``Location`` from the
request's ``Host`` header, which any client sets (a poisoned cache, a link elsewhere).
"""

from __future__ import annotations

import logging
import time
import traceback
from http import HTTPStatus
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Match

log = logging.getLogger("pacs_node.web")
access = logging.getLogger("pacs_node.web.access")
#: Paths asked so often (by machines) that their lines are DEBUG.
QUIET_PATHS = ("/healthz", "/readyz", "/metrics", "/console/static/")


class AccessLog:
    """ASGI middleware writing one access-log line per HTTP request (see the module)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, answer = time.perf_counter(), {"status": 0, "bytes": 0}

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body":
                answer["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:           # answered 500 by Starlette's outermost middleware
            answer["status"] = answer["status"] or 500
            raise
        finally:
            path = scope.get("path", "")[:200]
            who = (scope.get("state") or {}).get("principal")
            level = logging.DEBUG if path.startswith(QUIET_PATHS) else logging.INFO
            access.log(level, "%s %s %s %s %d %d %.0f ms",
                       (scope.get("client") or ("?",))[0], who.name if who else "-",
                       scope.get("method", "?"), path, answer["status"], answer["bytes"],
                       (time.perf_counter() - started) * 1000)


class StrictTransport:
    """ASGI middleware adding ``Strict-Transport-Security`` (RFC 6797) to every answer over
    HTTPS, for ``seconds`` (none when 0)."""

    def __init__(self, app, seconds: int) -> None:
        self.app = app
        self.header = (b"strict-transport-security", b"max-age=%d" % seconds)
        self.seconds = seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("scheme") != "https" or not self.seconds:
            await self.app(scope, receive, send)
            return

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, sending)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404 and request.method in ("GET", "HEAD"):
        known = _known_other_way(request)
        if known:
            return RedirectResponse(known, status_code=HTTPStatus.TEMPORARY_REDIRECT)
    message = {404: f"no such resource: {request.method} {request.url.path[:200]}",
               405: f"{request.method} is not allowed here"}.get(exc.status_code, exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


def _known_other_way(request: Request) -> str | None:
    """The request's path with its last ``/`` added or taken away, if a route knows it."""
    path = request.url.path
    other = path[:-1] if path.endswith("/") else path + "/"
    if not other.startswith("/") or other.startswith("//"):
        return None
    scope = {**request.scope, "path": other}
    if any(route.matches(scope)[0] != Match.NONE for route in request.app.router.routes):
        query = request.url.query
        return quote(other) + (f"?{query}" if query else "")
    return None


async def _failure(request: Request, exc: Exception) -> JSONResponse:
    """A fault of the node's own: one log line naming it (the traceback at DEBUG), 500."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" in {Path(where.filename).name}:{where.lineno}" if where else ""
    log.error("HTTP %s %s failed: %s%s", request.method, request.url.path[:200],
              type(exc).__name__, place)
    log.debug("HTTP %s %s", request.method, request.url.path[:200], exc_info=exc)
    return JSONResponse({"error": "internal error"}, status_code=500)


def make_app(routes: list[BaseRoute], hsts_seconds: int = 0) -> Starlette:
    """An application of these routes, answering errors as JSON (and over HTTPS with
    ``Strict-Transport-Security`` for ``hsts_seconds``)."""
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error,
                                                       Exception: _failure})
    app.router.redirect_slashes = False             # _known_other_way instead
    app.add_middleware(StrictTransport, seconds=hsts_seconds)
    app.add_middleware(AccessLog)
    return app
