"""Who may do what on the node's HTTP service: tokens, sessions, roles and CSRF.

A request is someone when it carries an API token (``Authorization: Bearer
TOKEN``; or HTTP Basic with the token as the password, for the PACS that can
only send a user name and password to a STOW-RS destination) or the cookie of
a console session. Tokens win over cookies, and a request made with a token
needs no CSRF token: a browser never adds one by itself.

- machine routes (STOW-RS, /metrics) answer 401 with ``WWW-Authenticate`` when
  no one is known, 403 when the role is not enough (JSON, as every machine answer);
- console pages send an unknown browser to the sign-in page, and answer 403
  (a page) when the role is not enough;
- every state-changing console form carries the session's CSRF token
  (synchronizer token); one without it, or with another, is refused 403.

The session cookie is ``HttpOnly``, ``SameSite=Lax``, ``Path=/`` and, when the
service runs HTTPS, ``Secure``; the job store holds only its digest
(:mod:`store.accounts`). Failed sign-ins are limited per name and address
(:mod:`pacs_node.failures`, as DICOM user identity), and argon2
verifications (64 MiB each) run two at a time at most, so that a password
guesser can neither find passwords fast nor take the node's memory.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from http import HTTPStatus

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from pacs_node.failures import FailureLimit
from store.accounts import MAX_PASSWORD, Principal, Role

log = logging.getLogger(__name__)

COOKIE = "lungsys_session"
#: Password verifications at once (argon2id takes 64 MiB for each).
VERIFICATIONS = 2
#: Seconds a token found is believed without asking the job store again (a revoked token
#: is refused at most this long after ``lungsys tokens revoke``).
TOKEN_CACHE_SECONDS = 1.0
#: Tokens found remembered at most.
MAX_TRACKED = 4096


def bearer(request: Request) -> str:
    """The token a request carries in ``Authorization`` (Bearer, or Basic's password)."""
    value = request.headers.get("authorization", "")
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(rest.strip(), validate=True).decode("utf-8") \
                .partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


def _refusal(status: HTTPStatus, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="lungsys"'} \
        if status == HTTPStatus.UNAUTHORIZED else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Doorkeeper:
    """Knows who a request is, and refuses what its role does not allow."""

    def __init__(self, store, *, https: bool = False, stow_anonymous: bool = False,
                 metrics_anonymous: bool = False) -> None:
        self.store = store
        self.https = https
        self.stow_anonymous = stow_anonymous
        self.metrics_anonymous = metrics_anonymous
        self.failures = FailureLimit()
        self._tokens: dict[str, tuple[Principal, float]] = {}
        self._limiter = anyio.CapacityLimiter(VERIFICATIONS)

    async def who(self, request: Request) -> Principal | None:
        """The principal of a request (looked up once per request), or None."""
        try:
            return request.state.principal
        except AttributeError:      # not looked up yet for this request
            pass
        token = bearer(request)
        if token:
            found = await self._token(token)
        elif request.cookies.get(COOKIE):
            found = await anyio.to_thread.run_sync(self.store.session_principal,
                                                   request.cookies[COOKIE])
        else:
            found = None
        request.state.principal = found
        return found

    async def _token(self, token: str) -> Principal | None:
        """A token's principal, looked up at most once every ``TOKEN_CACHE_SECONDS`` (a
        sender storing a study one instance a request would otherwise wait for the job
        store at each)."""
        now = time.monotonic()
        cached = self._tokens.get(token)
        if cached is not None and now - cached[1] < TOKEN_CACHE_SECONDS:
            return cached[0]
        found = await anyio.to_thread.run_sync(self.store.token_principal, token)
        if len(self._tokens) >= MAX_TRACKED:
            self._tokens.clear()
        if found is not None:
            self._tokens[token] = (found, now)
        else:
            self._tokens.pop(token, None)
        return found

    async def api(self, request: Request, needed: Role, anonymous: bool = False
                  ) -> JSONResponse | None:
        """None when the request may go on; the 401/403 answer otherwise."""
        if anonymous:
            return None
        principal = await self.who(request)
        if principal is None:
            return _refusal(HTTPStatus.UNAUTHORIZED, "a token is needed (Authorization: "
                                                     "Bearer TOKEN)")
        if not principal.role.allows(needed):
            return _refusal(HTTPStatus.FORBIDDEN, f"{principal.role.value} may not do this "
                                                  f"({needed.value} or above needed)")
        return None

    async def page(self, request: Request, needed: Role) -> Principal | Response:
        """The principal when it may see a console page; the sign-in redirect or 403."""
        from pacs_node.web.console.render import forbidden

        principal = await self.who(request)
        if principal is None:
            return RedirectResponse(f"/console/signin?next={local_path(request.url.path)}",
                                    status_code=HTTPStatus.SEE_OTHER)
        if principal.role == Role.sender or not principal.role.allows(needed):
            return forbidden(request, principal, f"This needs the {needed.value} role "
                                                 f"(you are {principal.role.value}).")
        return principal

    async def posted(self, request: Request, needed: Role
                     ) -> tuple[Principal, dict[str, str]] | Response:
        """The principal and its form, for a console form that changes something: the
        role checked as :meth:`page` does, the form read (a page saying why it cannot be),
        its CSRF token checked (403)."""
        from pacs_node.web.console.render import FormError, forbidden, read_form, unreadable

        principal = await self.page(request, needed)
        if isinstance(principal, Response):
            return principal
        try:
            form = await read_form(request)
        except FormError as exc:
            return unreadable(request, principal, exc)
        if not self.csrf_ok(principal, form):
            return forbidden(request, principal, "The form was not sent from this console "
                                                 "(its CSRF token is missing or stale): "
                                                 "reload the page and try again.")
        return principal, form

    @staticmethod
    def csrf_ok(principal: Principal, form: dict[str, str]) -> bool:
        """A form may change state: made with a token, or carrying the session's CSRF."""
        if principal.kind == "token":
            return True
        return bool(principal.csrf) and hmac.compare_digest(
            form.get("csrf", "").encode(), principal.csrf.encode())

    # --- sign-in -------------------------------------------------------------
    def waiting(self, peer: str, name: str) -> float:
        """Seconds before ``peer`` may try to sign in as ``name`` again (0: now; see
        :class:`pacs_node.failures.FailureLimit`)."""
        return self.failures.waiting(peer, name)

    async def sign_in(self, peer: str, name: str, password: str) -> Principal | None:
        """The user when the password is right. The try is counted as a failure before the
        (slow) check and forgotten if it succeeds, so that concurrent guesses cannot all
        slip under the limit."""
        keys = self.failures.count(peer, name)
        found = await anyio.to_thread.run_sync(self.store.check_password, name[:64],
                                               password[:MAX_PASSWORD], limiter=self._limiter)
        if found is None:
            log.warning("console: sign-in as %r from %s refused", name[:64], peer)
            return None
        log.info("console: %s (%s) signed in from %s", found.name, found.role.value, peer)
        self.failures.forgive(keys)
        return found

    def set_cookie(self, response: Response, key: str) -> None:
        response.set_cookie(COOKIE, key, httponly=True, samesite="lax", secure=self.https,
                            path="/")


def local_path(path: str) -> str:
    """A path safe to go back to after signing in: one of the console's, else its start."""
    return path if path.startswith("/console/") and "//" not in path \
        and "\\" not in path else "/console/"

