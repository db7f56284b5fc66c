"""Who may see the worklist: UI users (argon2 passwords, signed session cookie, CSRF token)
and API clients (bearer tokens, stored as sha256 hex in the config).

Nothing here is module-level mutable state: one :class:`Auth` per app lives on
``app.state.auth`` (its rate limiter and revoked-session set included).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Literal

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from itsdangerous import BadSignature, URLSafeTimedSerializer

from ddn_node.config import WebSettings

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

    @property
    def actor(self) -> str:
        """How the audit trail and the worklist history name them."""
        return self.name if self.kind == "user" else f"token:{self.name}"


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
    """Password, token, session and CSRF checks for one app."""

    def __init__(self, web: WebSettings):
        self.web = web
        self.hasher = PasswordHasher()
        self.users = {u.name: u for u in web.users}
        self.tokens = [(t.name, t.sha256) for t in web.tokens]
        # An empty secret means sessions end when the process restarts (documented in the
        # example config); a per-start random key is still unguessable.
        secret = web.secret_key or secrets.token_urlsafe(32)
        self._sessions = URLSafeTimedSerializer(secret, salt="ddn-node.session")
        self._login = URLSafeTimedSerializer(secret, salt="ddn-node.login")
        self.login_limiter = RateLimiter(web.login_rate_per_minute)
        self._revoked: dict[str, float] = {}  # session id -> when it would have expired
        self._revoked_lock = threading.Lock()
        self._dummy_hash: str | None = None
        self._dummy_lock = threading.Lock()

    # -- API tokens ------------------------------------------------------------------

    def check_token(self, authorization: str | None) -> Principal | None:
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = token_sha256(presented.strip())
        found: str | None = None
        # Compare against every configured token, without stopping at a match, so the time
        # taken says nothing about which (or whether one) matched.
        for name, expected in self.tokens:
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return None if found is None else Principal(name=found, kind="token")

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

    def new_session(self, principal: Principal) -> str:
        payload = {
            "u": principal.name,
            "sid": secrets.token_urlsafe(18),
            "csrf": secrets.token_urlsafe(24),
        }
        return self._sessions.dumps(payload)

    def check_session(self, cookie: str | None) -> Principal | None:
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
        with self._revoked_lock:
            if sid in self._revoked:
                return None
        return Principal(name=name, kind="user", role=user.role, session_id=sid, csrf=csrf)

    def revoke(self, principal: Principal) -> None:
        """Log out: the signed cookie stays valid cryptographically, so remember its id."""
        now = time.time()
        with self._revoked_lock:
            for sid, until in list(self._revoked.items()):
                if until < now:
                    del self._revoked[sid]
            self._revoked[principal.session_id] = now + self.web.session_max_age_s

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
