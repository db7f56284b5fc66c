"""The web part: worklist UI, JSON API (OpenAPI at /openapi.json), /healthz and /metrics.

Access (checked for every request in :class:`EdgeMiddleware`, before routing, so that an
API call without a valid token gets 401 whatever else is wrong with it):

* open: ``GET /healthz``, the login form, ``/static/*`` (CSS and JS, no patient data);
* ``/api/*``: a bearer token from ``[[web.tokens]]`` (sha256 compared in constant time),
  not expired, whose scopes allow the request (``auth.scope_needed``; else 403);
* ``/admin/*``: a UI session of a user with the admin role (else 403);
* everything else, ``/metrics`` and ``/openapi.json`` included: a UI session (login form,
  signed cookie, its row in ``web_sessions`` still open) or a bearer token with ``read``;
  form posts also need the session's CSRF token.

Every response carries the security headers below, and ``Strict-Transport-Security`` when
browsers reach the node over HTTPS (served by it, or ``[web] behind_https_proxy``);
everything but static assets is ``Cache-Control: no-store`` (patient data must not linger
in shared caches or on disk).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Awaitable, Callable, MutableMapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import cookie_parser

from ddn_node.config import Settings, insecure_settings
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline.worklist import StudyNotFound
from ddn_node.store.engine import Database
from ddn_node.store.models import utcnow
from ddn_node.web.auth import SESSION_COOKIE, Auth, Principal, Refused, scope_needed
from ddn_node.web.images import ImageCache
from ddn_node.web.metrics import WebMetrics
from ddn_node.web.views import RowRenderer, make_templates

log = structlog.get_logger("ddn_node.web")

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    # URLs carry study UIDs: do not hand them to other sites. ("no-referrer" would also
    # make browsers send "Origin: null" on our own form posts, which the CSRF check refuses.)
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
NO_STORE = (b"cache-control", b"no-store")
# One year, this host only: other services of the hospital's domain may still be on HTTP.
HSTS = (b"strict-transport-security", b"max-age=31536000")
STATIC_CACHE = (b"cache-control", b"public, max-age=3600")

OPEN_PATHS = frozenset({"/healthz", "/login", "/favicon.ico"})


def _package_version() -> str:
    try:
        return version("ddn-node")
    except PackageNotFoundError:
        return "0.0.0+source"


def _part(path: str) -> str:
    """A coarse label for request metrics (bounded cardinality, no UIDs)."""
    if path.startswith("/api/") or path == "/api":
        return "api"
    if path.startswith("/static/"):
        return "static"
    if path in ("/healthz", "/metrics", "/login", "/logout"):
        return path.strip("/")
    return "ui"


class EdgeMiddleware:
    """Authentication, authorisation (roles, token scopes), security headers and request
    timing, as plain ASGI (cheap)."""

    def __init__(self, app: ASGIApp, auth: Auth, metrics: WebMetrics, https: bool = False):
        self.app = app
        self.auth = auth
        self.metrics = metrics
        self.https = https

    def _headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        # HSTS only means something over HTTPS (browsers ignore it on HTTP, RFC 6797 8.1).
        if self.https or scope.get("scheme") == "https":
            return [*SECURITY_HEADERS, HSTS]
        return SECURITY_HEADERS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        static = path.startswith("/static/")
        extra = self._headers(scope)
        if not (static or path in OPEN_PATHS):
            try:
                principal = await self._authenticate(
                    scope, api=path == "/api" or path.startswith("/api/")
                )
            except SQLAlchemyError as exc:
                # Sessions live in the database: without it nobody can be let in.
                log.error("web.session_check_failed", error=type(exc).__name__)
                await self._answer(
                    scope,
                    receive,
                    send,
                    JSONResponse({"detail": "database unavailable"}, status_code=503),
                )
                return
            if isinstance(principal, Refused):
                await self._refuse(scope, receive, send, principal.detail)
                return
            forbidden = self._forbidden(principal, scope["method"], path)
            if forbidden:
                log.warning(
                    "web.forbidden",
                    path_part=_part(path),
                    method=scope["method"],
                    actor=principal.actor,
                )
                await self._answer(
                    scope, receive, send, JSONResponse({"detail": forbidden}, status_code=403)
                )
                return
            scope.setdefault("state", {})["principal"] = principal

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in extra if h[0] not in present)
                if b"cache-control" not in present:
                    headers.append(STATIC_CACHE if static else NO_STORE)
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.metrics.requests.labels(_part(path)).observe(time.perf_counter() - started)

    @staticmethod
    def _forbidden(principal: Principal, method: str, path: str) -> str:
        """Why this principal may not make this request ("" when it may)."""
        if principal.kind == "token":
            needed = scope_needed(method, path)
            if needed is None:
                return "API tokens cannot do this: it needs a person's login"
            if needed not in principal.scopes:
                return (
                    f"this token's scopes {sorted(principal.scopes)} do not allow this: "
                    f"it needs '{needed}'"
                )
            return ""
        if (path == "/admin" or path.startswith("/admin/")) and not principal.is_admin:
            return "this needs a user with the admin role"
        return ""

    async def _authenticate(self, scope: Scope, *, api: bool) -> Principal | Refused:
        authorization = cookie = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"cookie":
                cookie = value.decode("latin-1")
        if authorization is not None:
            # A presented token is checked even on UI paths, and a wrong one is not
            # rescued by a session cookie: a client that sends a token means the token.
            return self.auth.check_token(authorization)
        refused = Refused("authentication required: a valid bearer token (API) or a login session")
        if api or cookie is None:
            return refused
        value = cookie_parser(cookie).get(SESSION_COOKIE)
        if not value:
            return refused
        # A database read: in a worker thread, so that a slow database (PostgreSQL
        # restarting) holds this request only, not the event loop and every other one.
        principal = await anyio.to_thread.run_sync(self.auth.check_session, value)
        return refused if principal is None else principal

    async def _answer(self, scope: Scope, receive: Receive, send: Send, response: Response) -> None:
        extra = self._headers(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra, NO_STORE]
            await send(message)

        await response(scope, receive, send_with_headers)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, detail: str) -> None:
        path: str = scope["path"]
        wants_page = (
            scope["method"] in ("GET", "HEAD")
            and not path.startswith("/api")
            and not path.startswith("/ui/")
            and path not in ("/metrics", "/openapi.json")
            and not path.endswith(".png")
        )
        response: Response
        if wants_page:
            target = path + (
                "?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else ""
            )
            response = Response(
                status_code=303, headers={"location": "/login?next=" + quote(target, safe="")}
            )
        else:
            log.info("web.unauthorised", path_part=_part(path), method=scope["method"])
            response = JSONResponse(
                {"detail": detail},
                status_code=401,
                headers={"www-authenticate": 'Bearer realm="ddn-node"'},
            )
        await self._answer(scope, receive, send, response)


def _asset_version() -> str:
    digest = hashlib.sha256()
    for path in sorted(STATIC.glob("*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def create_app(
    settings: Settings,
    database: Database,
    spool: Spool,
    clock: Callable[[], dt.datetime] = utcnow,
) -> FastAPI:
    """The web application; all its state on ``app.state`` (nothing global).

    ``clock`` (aware UTC) is what token expiry and sessions are checked against.
    """
    from ddn_node.web import admin, api, promotion, security, views

    app = FastAPI(
        title="ddn-node",
        version=_package_version(),
        description=(
            "Triage worklist of a ddn-node DICOM AI node. Every `/api` call needs "
            "`Authorization: Bearer <token>` (tokens in `[[web.tokens]]`, stored as sha256); "
            "without a valid token the answer is 401."
        ),
        # Swagger UI and ReDoc load their assets from a CDN: not on a hospital network.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    auth = Auth(settings.web, database, clock)
    metrics = WebMetrics(database)
    app.state.settings = settings
    app.state.database = database
    app.state.spool = spool
    app.state.auth = auth
    app.state.metrics = metrics
    app.state.images = ImageCache()
    app.state.templates = make_templates(asset_version=_asset_version(), demo=settings.demo)
    # Outside a demo, serve refused to start with guessable credentials; in one, every
    # page names them (argon2 checks: once per app, not per page).
    app.state.templates.globals["demo_credentials"] = (
        [p.key for p in insecure_settings(settings)] if settings.demo else []
    )
    app.state.rows = RowRenderer(app.state.templates)

    app.include_router(api.router)
    app.include_router(views.router)
    app.include_router(admin.router)
    app.include_router(security.router)
    app.include_router(promotion.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        """Liveness and database reachability, for load balancers and systemd checks."""
        try:
            with database.read() as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            log.error("web.health_database_down", error=repr(exc))
            return JSONResponse({"status": "error", "database": "unreachable"}, status_code=503)
        return JSONResponse({"status": "ok", "database": "ok"})

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.exception_handler(StudyNotFound)
    def study_not_found(request: Request, _exc: StudyNotFound) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "no such study"}, status_code=404)
        return PlainTextResponse("no such study", status_code=404)

    app.add_middleware(EdgeMiddleware, auth=auth, metrics=metrics, https=settings.web.https)
    return app
