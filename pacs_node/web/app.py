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

Every answer over HTTPS carries ``Strict-Transport-Security`` (a year): a browser
that has once reached the console over HTTPS never falls back to plain HTTP for it.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute

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


#: The HSTS header of every answer over HTTPS (RFC 6797): a year.
HSTS = (b"strict-transport-security", b"max-age=31536000")


class StrictTransport:
    """ASGI middleware adding :data:`HSTS` to every answer over HTTPS."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), HSTS]}
            await send(message)

        await self.app(scope, receive, sending)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {404: f"no such resource: {request.method} {request.url.path[:200]}",
               405: f"{request.method} is not allowed here"}.get(exc.status_code, exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _failure(request: Request, exc: Exception) -> JSONResponse:
    """A fault of the node's own: one log line naming it (the traceback at DEBUG), 500."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" in {Path(where.filename).name}:{where.lineno}" if where else ""
    log.error("HTTP %s %s failed: %s%s", request.method, request.url.path[:200],
              type(exc).__name__, place)
    log.debug("HTTP %s %s", request.method, request.url.path[:200], exc_info=exc)
    return JSONResponse({"error": "internal error"}, status_code=500)


def make_app(routes: list[BaseRoute]) -> Starlette:
    """An application of these routes, answering errors as JSON."""
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error,
                                                       Exception: _failure})
    app.add_middleware(StrictTransport)
    app.add_middleware(AccessLog)
    return app
