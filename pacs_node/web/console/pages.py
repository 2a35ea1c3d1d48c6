"""The console's other pages: sign-in, the dashboard, skipped series, destinations (with
their test), the effective configuration and the users.

What Orthanc Explorer and mercure show a PACS admin, for this node: is it up and
taking studies (ports, model, disk, worker, queue), what came through in the
last day, what went wrong lately, which series were not analysed and why, and
can each destination be reached now.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import secrets
import shutil
import urllib.parse
from http import HTTPStatus
from typing import TYPE_CHECKING

import anyio
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from pacs_node.delivery import redact
from pacs_node.web.auth import COOKIE, Doorkeeper, local_path
from pacs_node.web.console.charts import bar_chart
from pacs_node.web.console.render import (PER_PAGE, FormError, forbidden, page, page_number,
                                          read_form, stylesheet, unreadable)
from store.accounts import Role

if TYPE_CHECKING:
    from pacs_node.node import Node

log = logging.getLogger("pacs_node.web.console")

#: The sign-in form's own CSRF cookie (double submit: there is no session yet).
SIGNIN_COOKIE = "lungsys_signin"
#: Configuration keys whose values are never shown.
SECRET_KEYS = {"secret", "password", "token"}


def _status(node: "Node") -> dict:
    """What the dashboard's status panel shows (read in a worker thread)."""
    config, model = node.config, node.model
    free = shutil.disk_usage(node.receiver.storage.incoming).free
    web = config.http
    return {
        "dicom": f"{config.node.ae_title} on {config.node.host}:{node.port}"
                 f"{' (DICOM TLS)' if config.tls.enabled else ''}",
        "http": f"{'https' if web.tls_certificate else 'http'}://{web.host}:{node.stow_port}/",
        "model": model, "checkpoint": config.model.checkpoint or "the shipped model",
        "free_mb": free // (1 << 20), "min_free_mb": config.node.min_free_disk_mb,
        "problems": node.not_ready(), "queue": node.store.queue_depth(),
        "queue_by": sorted(node.store.queue_by_priority().items()),
        "associations": node.receiver.scp.associations, "worker": _worker(node),
        "workers": node.store.workers(node.node_id),
    }


def _worker(node: "Node") -> str:
    """The worker as the dashboard names it: its state and process."""
    supervisor = node.supervisor
    if supervisor is None:
        return ("none here ([worker] local = false): see the workers below"
                if not node.config.worker.local else "in the node's process")
    worker = supervisor.worker
    alive = worker is not None and worker.alive
    return f"{supervisor.state}, {'process ' + str(worker.pid) if alive else 'no process'}"


def _charts(node: "Node") -> list:
    hours = node.store.hourly()
    labels = [h.start.strftime("%H:00") for h in hours]
    charts = [("Series received per hour", [h.received for h in hours], ""),
              ("Jobs analysed per hour", [h.analysed for h in hours], ""),
              ("Deliveries done per hour", [h.delivered for h in hours], ""),
              ("Median time from last instance to results delivered",
               [h.latency_seconds for h in hours], " s")]
    return [(title, bar_chart(values, labels, title, unit)) for title, values, unit in charts]


def shown_url(url: str, keep_path: bool = True) -> str:
    """A URL as the console shows it: no user name or password, no query (a token may be
    there), and without its path when that may hold a secret (a webhook's)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(not a URL)"
    host = parts.netloc.rpartition("@")[2]
    path = parts.path if keep_path else ("/…" if parts.path.strip("/") else "")
    return f"{parts.scheme}://{host}{path}{'?…' if parts.query else ''}"


def effective_config(node: "Node") -> list[tuple[str, list[tuple[str, str]]]]:
    """The configuration as ``[section]`` key/value lines: secrets hidden, URLs without
    credentials or queries, webhook URLs without their paths."""

    def shown(key: str, value, section: str) -> str:
        if key in SECRET_KEYS:
            return "(set)" if value else ""
        if key == "url" and value:
            return shown_url(str(value), keep_path=section != "notifications")
        if isinstance(value, enum.Enum):
            value = value.value
        if isinstance(value, (tuple, list)):
            return ", ".join(str(getattr(v, "value", v)) for v in value)
        return redact(str(value))

    config, out = node.config, []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        items = value if isinstance(value, tuple) else [value]
        for i, section in enumerate(items):
            if not dataclasses.is_dataclass(section):
                continue
            title = (f"[[{field.name}]] {i + 1}" if isinstance(value, tuple)
                     else f"[{field.name}]")
            out.append((title, [(f.name, shown(f.name, getattr(section, f.name), field.name))
                                for f in dataclasses.fields(section)]))
    return out


def page_routes(node: "Node", door: Doorkeeper) -> list[Route]:
    store = node.store

    async def home(request: Request) -> Response:
        return RedirectResponse("/console/", status_code=HTTPStatus.SEE_OTHER)

    async def signin_form(request: Request, message: str = "",
                          status: int = HTTPStatus.OK) -> Response:
        nonce = secrets.token_urlsafe(24)
        response = page(request, None, "signin.html", status, nonce=nonce, message=message,
                        next=local_path(request.query_params.get("next", "/console/")))
        response.set_cookie(SIGNIN_COOKIE, nonce, httponly=True, samesite="strict",
                            secure=door.https, path="/console/signin", max_age=3600)
        return response

    async def signin(request: Request) -> Response:
        peer = request.client.host if request.client else "?"
        try:
            form = await read_form(request)
        except FormError as exc:
            return await signin_form(request, str(exc), exc.status)
        nonce = request.cookies.get(SIGNIN_COOKIE, "")
        if not nonce or not secrets.compare_digest(form.get("nonce", ""), nonce):
            return await signin_form(request, "The form expired: please sign in again.",
                                     HTTPStatus.FORBIDDEN)
        wait = door.waiting(peer, form.get("name", ""))
        if wait:
            return await signin_form(request, f"Too many failed sign-ins from this address: "
                                              f"try again in {wait / 60:.0f} min.",
                                     HTTPStatus.TOO_MANY_REQUESTS)
        me = await door.sign_in(peer, form.get("name", ""), form.get("password", ""))
        if me is None:
            return await signin_form(request, "User name or password not accepted.",
                                     HTTPStatus.UNAUTHORIZED)
        key = await anyio.to_thread.run_sync(store.open_session, me.name)
        response = RedirectResponse(local_path(form.get("next", "/console/")),
                                    status_code=HTTPStatus.SEE_OTHER)
        door.set_cookie(response, key)
        response.delete_cookie(SIGNIN_COOKIE, path="/console/signin")
        return response

    async def signout(request: Request) -> Response:
        me = await door.who(request)
        if me is not None and me.kind == "user":
            try:
                form = await read_form(request)
            except FormError as exc:
                return unreadable(request, me, exc)
            if not door.csrf_ok(me, form):
                return forbidden(request, me, "The form was not sent from this console.")
            await anyio.to_thread.run_sync(store.close_session, request.cookies[COOKIE])
            log.info("console: %s signed out", me.name)
        response = RedirectResponse("/console/signin", status_code=HTTPStatus.SEE_OTHER)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def dashboard(request: Request) -> Response:
        me = await door.page(request, Role.viewer)
        if isinstance(me, Response):
            return me
        status, charts, errors, receiving = await anyio.to_thread.run_sync(
            lambda: (_status(node), _charts(node), store.recent_errors(),
                     store.receiving_series()))
        return page(request, me, "dashboard.html", status=status, charts=charts,
                    errors=errors, receiving=receiving)

    async def skipped(request: Request) -> Response:
        me = await door.page(request, Role.viewer)
        if isinstance(me, Response):
            return me
        number = page_number(request)
        rows, total = await anyio.to_thread.run_sync(store.skipped_series, number, PER_PAGE)
        return page(request, me, "skipped.html", rows=rows, total=total, number=number,
                    pages=max(1, -(-total // PER_PAGE)))

    async def destinations(request: Request, tested: tuple[str, bool, str] | None = None
                           ) -> Response:
        me = await door.page(request, Role.viewer)
        if isinstance(me, Response):
            return me
        counts, failures = await anyio.to_thread.run_sync(lambda: (
            store.delivery_counts(),
            {d.name: store.destination_failures(d.name) for d in node.config.destinations}))
        return page(request, me, "destinations.html", destinations=node.config.destinations,
                    counts=counts, failures=failures, tested=tested, shown_url=shown_url)

    async def test_destination(request: Request) -> Response:
        from pacs_node.probe import ProbeError, probe

        posted = await door.posted(request, Role.operator)
        if isinstance(posted, Response):
            return posted
        me = posted[0]
        name = request.path_params["name"]
        target = next((d for d in node.config.destinations if d.name == name), None)
        if target is None:
            return page(request, me, "message.html", HTTPStatus.NOT_FOUND,
                        title="No such destination", message="No destination of that name.")
        log.info("console: %s tested destination %s", me.name, name)
        try:
            line = await anyio.to_thread.run_sync(probe, target, node.config.node.ae_title)
            tested = (name, True, line)
        except ProbeError as exc:
            tested = (name, False, str(exc))
        return await destinations(request, tested)

    async def configuration(request: Request) -> Response:
        me = await door.page(request, Role.admin)
        if isinstance(me, Response):
            return me
        return page(request, me, "config.html", sections=effective_config(node))

    async def users(request: Request) -> Response:
        me = await door.page(request, Role.admin)
        if isinstance(me, Response):
            return me
        people, tokens = await anyio.to_thread.run_sync(lambda: (store.users(),
                                                                 store.tokens()))
        return page(request, me, "users.html", people=people, tokens=tokens)

    return [Route("/", home, methods=["GET"]),
            Route("/console", home, methods=["GET"]),
            Route("/console/", dashboard, methods=["GET"]),
            Route("/console/static/console.css", stylesheet, methods=["GET"]),
            Route("/console/signin", signin_form, methods=["GET"]),
            Route("/console/signin", signin, methods=["POST"]),
            Route("/console/signout", signout, methods=["POST"]),
            Route("/console/skipped", skipped, methods=["GET"]),
            Route("/console/destinations", destinations, methods=["GET"]),
            Route("/console/destinations/{name}/test", test_destination, methods=["POST"]),
            Route("/console/config", configuration, methods=["GET"]),
            Route("/console/users", users, methods=["GET"])]
