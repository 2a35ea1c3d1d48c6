"""How console pages are made: Jinja2 templates shipped in the package, served with
headers that keep them to themselves.

Every page is rendered on the server (no build step, no script fetched from
anywhere: the node's pages load their one stylesheet from the node itself).
Templates escape every value. Pages are sent with a Content-Security-Policy
that allows nothing but the node's own stylesheet and forms posted to the
node, ``X-Frame-Options: DENY``, no referrer (so that no address of the
console leaves with a link) and ``Cache-Control: no-store`` (a page may show
patient data to an operator).
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from http import HTTPStatus
from importlib.resources import files

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from config import Priority
from store.accounts import Principal, Role

#: Rows on a page of a list (jobs, skipped series).
PER_PAGE = 25
#: The most a console form may send.
MAX_FORM_BYTES = 64 * 1024
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.1f} h"


ENV = Environment(loader=PackageLoader("pacs_node.web.console", "templates"),
                  autoescape=select_autoescape(default=True), trim_blocks=True,
                  lstrip_blocks=True)
ENV.filters.update(when=_when, seconds=_seconds,
                   priority=lambda rank: Priority.of_rank(rank).value)
STYLESHEET = files("pacs_node.web.console").joinpath("static/console.css").read_bytes()


def page(request: Request, principal: Principal | None, template: str,
         code: int = HTTPStatus.OK, **context) -> HTMLResponse:
    """A console page: ``template`` with ``context``, the signed-in principal, the nav."""
    html = ENV.get_template(template).render(
        request=request, me=principal, path=request.url.path,
        operator=bool(principal and principal.role.allows(Role.operator)),
        admin=bool(principal and principal.role.allows(Role.admin)),
        **context)
    return HTMLResponse(html, status_code=code, headers=HEADERS)


def forbidden(request: Request, principal: Principal | None, message: str) -> HTMLResponse:
    return page(request, principal, "message.html", HTTPStatus.FORBIDDEN,
                title="Not allowed", message=message)


def stylesheet(request: Request) -> Response:
    return Response(STYLESHEET, media_type="text/css",
                    headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options":
                             "nosniff"})


def page_number(request: Request) -> int:
    """The ``page`` of a paged list's query: 1 to 100,000 (anything else: 1 or the bound)."""
    try:
        return max(1, min(100_000, int(request.query_params.get("page", "1"))))
    except ValueError:
        return 1


class FormError(Exception):
    """A console form that cannot be read: the HTTP status and why, for the page."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def unreadable(request: Request, principal: Principal | None, exc: FormError) -> HTMLResponse:
    return page(request, principal, "message.html", exc.status, title="Form not read",
                message=str(exc))


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as a dict (first value of each
    field), or FormError: another type, above ``MAX_FORM_BYTES``, more than 100 fields
    or not UTF-8 (each said as such: a page that blamed the CSRF token sent the admin
    reloading a form that could never pass)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != \
            "application/x-www-form-urlencoded":
        raise FormError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                        "The form was not sent as application/x-www-form-urlencoded.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"The form is larger than {MAX_FORM_BYTES // 1024} KiB.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise FormError(HTTPStatus.BAD_REQUEST, "The form is not UTF-8.") from None
    try:
        fields = urllib.parse.parse_qs(text, keep_blank_values=True, max_num_fields=100)
    except ValueError:
        raise FormError(HTTPStatus.BAD_REQUEST, "The form has more than 100 fields.") from None
    return {k: v[0] for k, v in fields.items()}
