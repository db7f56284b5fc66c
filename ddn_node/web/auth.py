"""Who may see the worklist: UI users (argon2 passwords, signed session cookie, CSRF token)
and API clients (bearer tokens, stored as sha256 hex in the config, with scopes and an
optional expiry).

Sessions are rows of ``web_sessions``: the signed cookie names one, and logging out (or an
admin ending it) ends the row, so the cookie is refused by every process of the node and
after a restart. Roles: ``radiologist`` and ``admin``; everything under ``/admin`` needs an
admin (checked before routing, see app.EdgeMiddleware; :func:`require_admin` is the same
check for a route elsewhere). What a token may do is :func:`scope_needed`.

Nothing here is module-level mutable state: one :class:`Auth` per app lives on
``app.state.auth`` (its rate limiter included).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from fastapi import HTTPException, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import delete, select, update

from ddn_node.config import WebSettings
from ddn_node.store.engine import Database
from ddn_node.store.models import WebSession, utcnow

log = structlog.get_logger("ddn_node.web")

SESSION_COOKIE = "ddn_session"
LOGIN_COOKIE = "ddn_login"  # pre-login CSRF token (double submit), short-lived
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
LOGIN_COOKIE_MAX_AGE_S = 3600


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Someone authenticated: a UI user (with a session) or an API token."""

    name: str
    kind: Literal["user", "token"]
    role: str = "radiologist"
    session_id: str = ""
    csrf: str = ""
    scopes: frozenset[str] = field(default_factory=frozenset)  # tokens only

    @property
    def actor(self) -> str:
        """How the audit trail and the worklist history name them."""
        return self.name if self.kind == "user" else f"token:{self.name}"

    @property
    def is_admin(self) -> bool:
        return self.kind == "user" and self.role == "admin"


@dataclass(frozen=True)
class Refused:
    """Why a presented credential was not accepted (said in the 401)."""

    detail: str


@dataclass(frozen=True)
class SessionInfo:
    """An open UI session, as the admin page lists it (never its id)."""

    user: str
    host: str
    created_at: dt.datetime
    expires_at: dt.datetime


@dataclass(frozen=True)
class _Token:
    name: str
    sha256: str
    scopes: frozenset[str]
    expires_at: dt.datetime | None


# Token requests that change something, and the scope each needs. Any other request but a
# GET / HEAD is not for tokens at all (form posts need a person's session and CSRF token).
# Feedback on findings is a radiologist's work on the worklist: the same scope.
_TOKEN_WRITES = (
    (re.compile(r"^/api/studies/[^/]+/(status|priority|feedback)$"), "worklist:write"),
)


def scope_needed(method: str, path: str) -> str | None:
    """The scope a token needs for this request; None when no token may make it."""
    if path == "/admin" or path.startswith("/admin/"):
        return None  # admin work is done by a person, logged in
    if method in ("GET", "HEAD"):
        return "read"
    if method == "POST":
        for pattern, scope in _TOKEN_WRITES:
            if pattern.match(path):
                return scope
    return None


def require_admin(request: Request) -> Principal:
    """A route dependency: the logged-in user must have the admin role (else 403).

    Everything under ``/admin`` is checked already before routing; use this for an admin
    action elsewhere, and with ``views.csrf_protect`` (or ``views.require_admin_post``)
    for a form post.
    """
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None or not principal.is_admin:
        log.warning(
            "web.admin_refused",
            actor=principal.actor if principal is not None else "",
            method=request.method,
        )
        raise HTTPException(status_code=403, detail="this needs a user with the admin role")
    return principal


def sid_sha256(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


class RateLimiter:
    """At most ``per_minute`` events per key in any sliding 60 s window.

    Keys are client addresses; the number of keys kept is bounded so that a flood of
    spoofed sources cannot grow memory without limit (the oldest keys are dropped).
    """

    def __init__(self, per_minute: int, max_keys: int = 10_000, window_s: float = 60.0):
        self.per_minute = per_minute
        self.window_s = window_s
        self.max_keys = max_keys
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def hit(self, key: str, now: float | None = None) -> float:
        """Count one event; returns 0 if allowed, else the seconds until the next is."""
        now = time.monotonic() if now is None else now
        with self._lock:
            events = self._events.pop(key, None) or deque()
            while events and events[0] <= now - self.window_s:
                events.popleft()
            self._events[key] = events  # most recently used last
            if len(events) >= self.per_minute:
                return max(0.01, events[0] + self.window_s - now)
            events.append(now)
            while len(self._events) > self.max_keys:
                self._events.popitem(last=False)
            return 0.0


class Auth:
    """Password, token, session and CSRF checks for one app.

    ``clock`` gives the time (aware, UTC) that token expiry and session rows are compared
    with; tests pass their own.
    """

    def __init__(
        self,
        web: WebSettings,
        database: Database,
        clock: Callable[[], dt.datetime] = utcnow,
    ):
        self.web = web
        self.database = database
        self.clock = clock
        self.hasher = PasswordHasher()
        self.users = {u.name: u for u in web.users}
        self.tokens = [
            _Token(t.name, t.sha256, frozenset(t.scopes), t.expires_at()) for t in web.tokens
        ]
        # An empty secret means sessions end when the process restarts (documented in the
        # example config); a per-start random key is still unguessable.
        secret = web.secret_key or secrets.token_urlsafe(32)
        self._sessions = URLSafeTimedSerializer(secret, salt="ddn-node.session")
        self._login = URLSafeTimedSerializer(secret, salt="ddn-node.login")
        self.login_limiter = RateLimiter(web.login_rate_per_minute)
        self._dummy_hash: str | None = None
        self._dummy_lock = threading.Lock()

    # -- API tokens ------------------------------------------------------------------

    def check_token(self, authorization: str | None) -> Principal | Refused:
        refused = Refused("authentication required: a valid bearer token (API) or a login session")
        if not authorization:
            return refused
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return refused
        digest = token_sha256(presented.strip())
        found: _Token | None = None
        # Compare against every configured token, without stopping at a match, so the time
        # taken says nothing about which (or whether one) matched.
        for token in self.tokens:
            if hmac.compare_digest(digest, token.sha256) and found is None:
                found = token
        if found is None:
            return refused
        if found.expires_at is not None and self.clock() >= found.expires_at:
            log.warning("web.token_expired", token=found.name)
            # Whoever presents it holds the secret: telling them why saves a support call.
            return Refused(
                f"this API token ({found.name}) expired at {found.expires_at.isoformat()}; "
                "ask the node's administrator for a new one"
            )
        return Principal(name=found.name, kind="token", scopes=found.scopes)

    # -- passwords ---------------------------------------------------------------------

    def _dummy(self) -> str:
        """A hash to verify against for unknown users, so that "no such user" costs the
        same time as "wrong password" and response times do not reveal user names. Made
        with the first user's argon2 parameters, on first need (hashing is slow)."""
        with self._dummy_lock:
            if self._dummy_hash is None:
                hasher = self.hasher
                if self.web.users:
                    # An unreadable hash leaves the default parameters.
                    with contextlib.suppress(InvalidHashError):
                        hasher = PasswordHasher.from_parameters(
                            extract_parameters(self.web.users[0].password_hash)
                        )
                self._dummy_hash = hasher.hash(secrets.token_urlsafe(16))
            return self._dummy_hash

    def verify_password(self, user: str, password: str) -> Principal | None:
        """argon2 verification (slow by design: call it from a worker thread)."""
        settings = self.users.get(user)
        stored = settings.password_hash if settings is not None else self._dummy()
        try:
            self.hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if settings is None:
            return None
        return Principal(name=settings.name, kind="user", role=settings.role)

    # -- sessions ----------------------------------------------------------------------

    def new_session(self, principal: Principal, host: str = "") -> str:
        """Open a session (a row) and return the signed cookie value that names it."""
        session_id = secrets.token_urlsafe(18)
        now = self.clock()
        with self.database.session() as session:
            # Expired rows refuse nothing a signature check would not: keep the table small.
            session.execute(delete(WebSession).where(WebSession.expires_at < now))
            session.add(
                WebSession(
                    sid_sha256=sid_sha256(session_id),
                    user=principal.name,
                    host=host[:64],
                    created_at=now,
                    expires_at=now + dt.timedelta(seconds=self.web.session_max_age_s),
                )
            )
        payload = {"u": principal.name, "sid": session_id, "csrf": secrets.token_urlsafe(24)}
        return self._sessions.dumps(payload)

    def check_session(self, cookie: str | None) -> Principal | None:
        """The user of a session cookie, or None. Reads the database: call it off the
        event loop."""
        if not cookie:
            return None
        try:
            # itsdangerous annotates max_age as int but only compares the age with it.
            payload: Any = self._sessions.loads(
                cookie,
                max_age=self.web.session_max_age_s,  # type: ignore[arg-type]
            )
        except BadSignature:  # includes SignatureExpired
            return None
        if not isinstance(payload, dict):
            return None
        name, sid, csrf = payload.get("u"), payload.get("sid"), payload.get("csrf")
        if not (isinstance(name, str) and isinstance(sid, str) and isinstance(csrf, str)):
            return None
        user = self.users.get(name)
        if user is None:  # removed from the config since: the session ends with it
            return None
        with self.database.read() as session:
            row = session.execute(
                select(WebSession.user, WebSession.expires_at, WebSession.ended_at).where(
                    WebSession.sid_sha256 == sid_sha256(sid)
                )
            ).one_or_none()
        if row is None or row.ended_at is not None or row.user != name:
            return None
        if row.expires_at <= self.clock():
            return None
        return Principal(name=name, kind="user", role=user.role, session_id=sid, csrf=csrf)

    def revoke(self, principal: Principal, by: str = "") -> None:
        """Log out: end this session's row (the signed cookie itself stays valid until it
        expires, so the row is what refuses it, in every process)."""
        with self.database.session() as session:
            session.execute(
                update(WebSession)
                .where(
                    WebSession.sid_sha256 == sid_sha256(principal.session_id),
                    WebSession.ended_at.is_(None),
                )
                .values(ended_at=self.clock(), ended_by=by or principal.name)
            )

    def end_sessions(self, user: str, by: str) -> int:
        """End every open session of ``user`` (an admin's action); how many were open."""
        now = self.clock()
        with self.database.session() as session:
            result = session.execute(
                update(WebSession)
                .where(
                    WebSession.user == user,
                    WebSession.ended_at.is_(None),
                    WebSession.expires_at > now,
                )
                .values(ended_at=now, ended_by=by)
            )
        return int(getattr(result, "rowcount", 0) or 0)

    def open_sessions(self) -> list[SessionInfo]:
        now = self.clock()
        with self.database.read() as session:
            rows = session.execute(
                select(
                    WebSession.user, WebSession.host, WebSession.created_at, WebSession.expires_at
                )
                .where(WebSession.ended_at.is_(None), WebSession.expires_at > now)
                .order_by(WebSession.user, WebSession.created_at)
            ).all()
        return [SessionInfo(r.user, r.host, r.created_at, r.expires_at) for r in rows]

    # -- CSRF --------------------------------------------------------------------------

    @staticmethod
    def csrf_ok(principal: Principal, presented: str | None) -> bool:
        if principal.kind != "user" or not principal.csrf or not presented:
            return False
        return hmac.compare_digest(principal.csrf.encode(), presented.encode())

    def new_login_token(self) -> tuple[str, str]:
        """(cookie value, form value) for the login form's double-submit CSRF check."""
        token = secrets.token_urlsafe(24)
        return self._login.dumps(token), token

    def login_token_ok(self, cookie: str | None, presented: str | None) -> bool:
        if not cookie or not presented:
            return False
        try:
            expected = self._login.loads(cookie, max_age=LOGIN_COOKIE_MAX_AGE_S)
        except BadSignature:
            return False
        return isinstance(expected, str) and hmac.compare_digest(
            expected.encode(), presented.encode()
        )
