"""Who may use the node's HTTP service: users, API tokens and sign-in sessions.

users       people who sign in to the console: a name, a role, an argon2id hash of
            the password (never the password)
api_tokens  machine clients (STOW-RS senders, Prometheus, scripts): a label, a role,
            the SHA-256 of the token (the token itself is shown once, at creation)
web_sessions  one signed-in browser: the SHA-256 of its cookie, its CSRF token, until when

Roles, each with what the ones before it may do: ``viewer`` reads the console
(no patient names or IDs) and the metrics; ``operator`` also sees patient data,
retries and re-runs jobs and deliveries, tests destinations, downloads results
and stores over STOW-RS; ``admin`` also reads the configuration and the users.
``sender`` (tokens only) stores over STOW-RS and nothing else; ``worker`` (tokens
only, for ``lungsys worker`` with ``[worker] instances = "wado"``) retrieves the
series of the node's jobs over WADO-RS and hands their results back, and
nothing else (no other role may retrieve instances).

A token has 256 random bits, so a fast digest suffices to keep it out of the
job store and to look it up by; a password has not, so it is hashed with
argon2id (argon2-cffi's defaults, RFC 9106's second recommended option). A
session key is a token too: the job store never holds what a cookie says.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import hashlib
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import DateTime, Enum, ForeignKey, Integer, String, delete, select, update
from sqlalchemy.orm import Mapped, mapped_column

from store.models import Base, utcnow

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

#: What a token starts with (so that a leaked one is recognisable, e.g. by secret scanners).
TOKEN_PREFIX = "lsy_"
#: The longest password (sign-in reads no more of one).
MAX_PASSWORD = 1024
#: A console session ends this long after its sign-in ...
SESSION_HOURS = 12
#: ... or after this long without a request.
SESSION_IDLE_MINUTES = 60


class Role(str, enum.Enum):
    """What a user or token may do (see the module); ``sender`` and ``worker`` are for
    tokens only."""

    sender = "sender"
    worker = "worker"
    viewer = "viewer"
    operator = "operator"
    admin = "admin"

    def allows(self, needed: "Role") -> bool:
        """True when this role may do what ``needed`` may (sender: only sender's; worker:
        only worker's)."""
        if needed == Role.sender:
            return self in (Role.sender, Role.operator, Role.admin)
        if needed == Role.worker or self == Role.worker:
            return self == needed
        return self != Role.sender and _RANK[self] >= _RANK[needed]


_RANK = {Role.viewer: 1, Role.operator: 2, Role.admin: 3}
_HASHER = PasswordHasher()


class User(Base):
    """A person who signs in to the console."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(Enum(Role))
    password_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_sign_in: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class ApiToken(Base):
    """A machine client's bearer token (its SHA-256 only)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(Enum(Role))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_used: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class WebSession(Base):
    """One signed-in browser."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                         index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a signed-in user (with the session's CSRF token) or a
    token."""

    name: str
    role: Role
    kind: str                 # "user" or "token"
    csrf: str = ""


class AccountError(ValueError):
    """A user or token that cannot be added, found or removed: one line why."""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _name(value: str, what: str) -> str:
    if not value or len(value) > 64 or not value.isprintable() or any(c.isspace()
                                                                      for c in value):
        raise AccountError(f"a {what} must be one word of 1 to 64 printable characters")
    return value


def hash_password(password: str) -> str:
    """The argon2id hash of a password (what ``users add`` stores)."""
    if not 8 <= len(password) <= MAX_PASSWORD:
        raise AccountError(f"a password needs 8 to {MAX_PASSWORD} characters")
    return _HASHER.hash(password)


class Accounts:
    """Users, tokens and sessions (a mixin of :class:`store.api.JobStore`)."""

    def session(self) -> "Session": ...          # provided by JobStore
    def read_session(self) -> "Session": ...     # provided by JobStore
    _noting: set[int]                            # tokens whose last use is being written
    _noting_lock: threading.Lock                 # (both set by JobStore)

    # --- users ---------------------------------------------------------------
    def add_user(self, name: str, role: Role | str, password_hash: str) -> None:
        role = Role(role)
        if role in (Role.sender, Role.worker):
            raise AccountError(f"{role.value} is a role for tokens; a user is viewer, "
                               f"operator or admin")
        with self.session() as s, s.begin():
            if s.scalar(select(User.id).where(User.name == _name(name, "user name"))):
                raise AccountError(f"user {name} exists already")
            s.add(User(name=name, role=role, password_hash=password_hash))

    def remove_user(self, name: str) -> None:
        """Remove a user and end their sessions."""
        with self.session() as s, s.begin():
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                raise AccountError(f"no user {name}")
            s.execute(delete(WebSession).where(WebSession.user_id == user.id))
            s.delete(user)

    def users(self) -> list[User]:
        with self.read_session() as s:
            return list(s.scalars(select(User).order_by(User.name)))

    def check_password(self, name: str, password: str) -> Principal | None:
        """The user when the password is theirs (argon2 verification: slow by design)."""
        with self.read_session() as s:
            user = s.scalar(select(User).where(User.name == name))
            stored = user.password_hash if user is not None else None
        try:
            # an unknown name takes as long as a wrong password: no user-name oracle
            _HASHER.verify(stored if stored is not None else _dummy_hash(), password)
            if stored is None:
                return None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return Principal(user.name, user.role, "user")

    # --- tokens --------------------------------------------------------------
    def create_token(self, label: str, role: Role | str) -> str:
        """A new token for ``label``: returned once, only its digest kept."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.session() as s, s.begin():
            if s.scalar(select(ApiToken.id).where(ApiToken.label == _name(label, "label"))):
                raise AccountError(f"a token labelled {label} exists already")
            s.add(ApiToken(label=label, role=Role(role), digest=_digest(token)))
        return token

    def revoke_token(self, label: str) -> None:
        with self.session() as s, s.begin():
            if not s.execute(delete(ApiToken).where(ApiToken.label == label)).rowcount:
                raise AccountError(f"no token labelled {label}")

    def tokens(self) -> list[ApiToken]:
        with self.read_session() as s:
            return list(s.scalars(select(ApiToken).order_by(ApiToken.label)))

    def token_principal(self, token: str) -> Principal | None:
        """Who a bearer token is, or None (unknown or revoked). A read that takes no lock
        (a STOW-RS request never waits behind the receivers' writes), and a write of its
        last use at most once a minute, in a thread of its own that nothing waits for: a
        job store locked by another process had held each request 10 s, then failed it."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = _digest(token)
        with self.read_session() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.digest == digest))
        if row is None:
            return None
        now = utcnow()
        if row.last_used is None or now - row.last_used > dt.timedelta(minutes=1):
            with self._noting_lock:
                due = row.id not in self._noting
                self._noting.add(row.id)
            if due:
                threading.Thread(target=self._note_use, args=(row.id, now), daemon=True,
                                 name="lungsys-token-use").start()
        return Principal(row.label, row.role, "token")

    def _note_use(self, token_id: int, now: dt.datetime) -> None:
        """A token's last use, written when the job store lets it (or not at all)."""
        try:
            with self.session() as s, s.begin():
                s.execute(update(ApiToken).where(ApiToken.id == token_id)
                          .values(last_used=now))
        except Exception as exc:        # locked, gone: the next use a minute on tries again
            log.debug("a token's last use was not recorded: %s", type(exc).__name__)
        finally:
            with self._noting_lock:
                self._noting.discard(token_id)

    # --- sessions ------------------------------------------------------------
    def open_session(self, name: str) -> str:
        """A new session for a user who just signed in: the cookie's value."""
        key = secrets.token_urlsafe(32)
        with self.session() as s, s.begin():
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                raise AccountError(f"no user {name}")
            user.last_sign_in = utcnow()
            s.add(WebSession(digest=_digest(key), user_id=user.id,
                             csrf=secrets.token_urlsafe(32)))
            s.execute(delete(WebSession).where(       # sessions that ended, anyone's
                WebSession.created_at < utcnow() - dt.timedelta(hours=SESSION_HOURS)))
        return key

    def session_principal(self, key: str) -> Principal | None:
        """Who a session cookie is (the user's role as it is now), or None once it ended.
        Read without a lock; written only when it ended or was last seen 30 s ago."""
        if not key or len(key) > 100:
            return None
        now = utcnow()
        with self.read_session() as s:
            found = s.execute(select(WebSession, User).join(User, WebSession.user_id == User.id)
                              .where(WebSession.digest == _digest(key))).first()
        if found is None:
            return None
        row, user = found
        ended = (now - row.created_at > dt.timedelta(hours=SESSION_HOURS)
                 or now - row.seen_at > dt.timedelta(minutes=SESSION_IDLE_MINUTES))
        if ended or now - row.seen_at > dt.timedelta(seconds=30):
            with self.session() as s, s.begin():
                q = (delete(WebSession) if ended else update(WebSession).values(seen_at=now))
                s.execute(q.where(WebSession.id == row.id))
        return None if ended else Principal(user.name, user.role, "user", row.csrf)

    def close_session(self, key: str) -> None:
        with self.session() as s, s.begin():
            s.execute(delete(WebSession).where(WebSession.digest == _digest(key)))


@functools.cache
def _dummy_hash() -> str:
    return _HASHER.hash(secrets.token_urlsafe(16))
