"""Health and metrics: what a load balancer, a monitoring system and Prometheus ask.

- ``GET /healthz``: the process answers (200), nothing else is looked at;
- ``GET /readyz``: 200 when the node can take and process studies: the job
  store answers, the free disk is above ``[node] min_free_disk_mb``, the worker
  is alive and its model loaded; 503 with the reasons otherwise;
- ``GET /metrics``: Prometheus' text format (:mod:`pacs_node.web.metrics`), for a
  token of the viewer role or above unless ``[http] metrics_anonymous``.

The checks run in a worker thread (the job store may be slow to answer): the
event loop keeps serving STOW-RS meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from store.accounts import Role

if TYPE_CHECKING:
    from pacs_node.node import Node
    from pacs_node.web.auth import Doorkeeper


def health_routes(node: "Node", door: "Doorkeeper") -> list[Route]:
    """The three routes; /metrics needs a token of the viewer role or above (or a signed-in
    user) unless ``[http] metrics_anonymous``."""
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        reasons = await anyio.to_thread.run_sync(node.not_ready)
        if reasons:
            return JSONResponse({"ready": False, "reasons": reasons}, status_code=503)
        return JSONResponse({"ready": True})

    async def metrics(request: Request) -> Response:
        if (refusal := await door.api(request, Role.viewer, door.metrics_anonymous)):
            return refusal
        body = await anyio.to_thread.run_sync(node.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return [Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics, methods=["GET"])]
