"""The node's Starlette application: its routes, and errors answered as JSON.

Every answer the node gives a machine is JSON with an ``error`` when something
is wrong (a DICOMweb client, Prometheus, a load balancer's health check), never
an HTML page; an unknown resource is 404, a known one with the wrong method
405 with ``Allow``.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute

log = logging.getLogger("pacs_node.web")


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
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error,
                                                        Exception: _failure})
