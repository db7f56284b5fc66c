"""Pages for people: login, the worklist, a study, and the forms that change a study.

Templates autoescape everything (Jinja2 ``autoescape=True``): patient names and study
descriptions come from DICOM headers written by anyone, some with ``<script>`` in them.
The pages load only local JS (no inline scripts; the CSP forbids them), which builds rows
with ``textContent``.

Form posts carry the session's CSRF token (hidden field, or ``X-CSRF-Token`` from fetch).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlparse

import anyio
import jinja2
import structlog
from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from markupsafe import Markup

from ddn_node.pipeline.worklist import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    ROW_JSON,
    Order,
    WorklistQuery,
    WorklistRow,
    fetch_row,
    format_duration,
    get_worklist,
    page_etag,
    page_json,
    set_priority_override,
    set_read_status,
)
from ddn_node.store.audit import AuditEventName, audit
from ddn_node.store.feedback import (
    MAX_NOTE,
)
from ddn_node.vocabulary import TRIAGE_PRIORITIES, Priority, ReadStatus, Verdict
from ddn_node.web.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_COOKIE,
    LOGIN_COOKIE_MAX_AGE_S,
    SESSION_COOKIE,
    Auth,
    Principal,
    require_admin,
)
from ddn_node.web.feedback import submit_feedback
from ddn_node.web.images import FULL_PX, THUMB_PX, ImageUnavailable, dicom_thumbnail, png_scaled
from ddn_node.web.reads import audit_read
from ddn_node.web.study import fetch_detail, instance_relpath, overlay_relpath, study_path

log = structlog.get_logger("ddn_node.web")

TEMPLATES = Path(__file__).resolve().parent / "templates"
POLL_MS = 3000
MODALITIES = ("CR", "DX", "CT", "MR", "US", "MG", "NM", "PT", "XA", "RF")

router = APIRouter(include_in_schema=False)


# -- templates ------------------------------------------------------------------------------


def _local_dt(value: dt.datetime | None) -> str:
    if value is None:
        return ""
    # The node's local time zone: the radiologists work in it, the server is in the hospital.
    return value.astimezone().strftime("%Y-%m-%d %H:%M")


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def make_templates(*, asset_version: str, demo: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["local_dt"] = _local_dt
    env.filters["duration"] = format_duration
    env.filters["score"] = _score
    env.globals["asset_version"] = asset_version
    env.globals["demo"] = demo
    env.globals["study_path"] = study_path
    return env


class RowRenderer:
    """Worklist rows as HTML, each rendered once per distinct content.

    Rendering 200 autoescaped rows costs more than the query behind them, and most rows
    are unchanged from one page view to the next. The cache key is the row's full JSON
    (so a changed row is a new key, never a stale one) plus its "waiting" text, which
    changes once a minute. Bounded LRU, safe across the server's worker threads.
    """

    def __init__(self, env: jinja2.Environment, max_rows: int = 2000):
        self._macro = env.get_template("_row.html").module.row  # type: ignore[attr-defined]
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self._max = max_rows
        self._lock = threading.Lock()

    def render(self, rows: list[WorklistRow]) -> Markup:
        parts = []
        for row in rows:
            waiting = format_duration(row.waiting_s)
            key = ROW_JSON.dump_json(row, exclude={"waiting_s"}) + waiting.encode()
            with self._lock:
                html = self._cache.get(key)
                if html is not None:
                    self._cache.move_to_end(key)
            if html is None:
                html = str(self._macro(row, waiting))
                with self._lock:
                    self._cache[key] = html
                    while len(self._cache) > self._max:
                        self._cache.popitem(last=False)
            parts.append(html)
        # Each part came out of the autoescaping template: safe to join as markup.
        return Markup("".join(parts))


def _render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    env: jinja2.Environment = request.app.state.templates
    principal: Principal | None = getattr(request.state, "principal", None)
    html = env.get_template(name).render(
        principal=principal if principal is not None and principal.kind == "user" else None,
        csrf=principal.csrf if principal is not None else "",
        **context,
    )
    return HTMLResponse(html, status_code=status_code)


# -- helpers --------------------------------------------------------------------------------


def safe_next(value: str | None, default: str = "/") -> str:
    """Only local paths: an open redirect after login would be a phishing tool."""
    if not value or not value.startswith("/") or value.startswith("//"):
        return default
    if "\\" in value or any(ord(ch) < 0x20 for ch in value) or urlparse(value).netloc:
        return default
    return value


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def secure_cookies(request: Request) -> bool:
    """Cookies only over HTTPS: served by the node, or by the proxy in front of it."""
    return bool(request.app.state.settings.web.https) or request.url.scheme == "https"


def ui_query(params: Any) -> WorklistQuery:
    """The worklist filters from a page URL; unknown values fall back to defaults, not 422."""
    unread = str(params.get("unread", "true")).lower() not in ("false", "0", "no", "off", "all")
    modality = str(params.get("modality") or "").strip().upper()[:16] or None
    raw_priority = params.get("priority") or ""
    priority = Priority(raw_priority) if raw_priority in Priority.__members__.values() else None
    order: Order = "arrival" if params.get("order") == "arrival" else "priority"
    try:
        offset = max(0, int(params.get("offset") or 0))
        limit = min(MAX_LIMIT, max(1, int(params.get("limit") or DEFAULT_LIMIT)))
    except ValueError:
        offset, limit = 0, DEFAULT_LIMIT
    return WorklistQuery(
        unread=unread, modality=modality, priority=priority, order=order, offset=offset, limit=limit
    )


def query_params(query: WorklistQuery, **changes: Any) -> str:
    """The page URL's query string for ``query`` with ``changes`` (defaults left out)."""
    values = query.model_copy(update=changes)
    out: dict[str, str] = {}
    if not values.unread:
        out["unread"] = "false"
    if values.modality:
        out["modality"] = values.modality
    if values.priority is not None:
        out["priority"] = values.priority.value
    if values.order != "priority":
        out["order"] = values.order
    if values.limit != DEFAULT_LIMIT:
        out["limit"] = str(values.limit)
    if values.offset:
        out["offset"] = str(values.offset)
    return urlencode(out)


def _page_url(query_string: str) -> str:
    return "/?" + query_string if query_string else "/"


async def csrf_protect(request: Request) -> Principal:
    """Refuse a state-changing form post without this session's CSRF token (403)."""
    principal: Principal = request.state.principal
    presented = request.headers.get(CSRF_HEADER)
    if presented is None:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        presented = value if isinstance(value, str) else None
    origin = request.headers.get("origin")
    same_origin = origin is None or urlparse(origin).netloc == request.headers.get("host", "")
    if not same_origin or not Auth.csrf_ok(principal, presented):
        log.warning(
            "web.csrf_refused", path_part="ui", method=request.method, same_origin=same_origin
        )
        raise HTTPException(
            status_code=403, detail="CSRF token missing or wrong: reload the page and try again"
        )
    return principal


async def require_admin_post(
    request: Request, _csrf_checked: Annotated[Principal, Depends(csrf_protect)]
) -> Principal:
    """A form post of an admin action: this session's CSRF token (checked first, by the
    dependency), then the admin role."""
    return require_admin(request)


# -- login ----------------------------------------------------------------------------------


def _login_page(
    request: Request, next_url: str, error: str = "", status_code: int = 200
) -> HTMLResponse:
    auth: Auth = request.app.state.auth
    cookie, token = auth.new_login_token()
    response = _render(
        request,
        "login.html",
        status_code=status_code,
        login_token=token,
        next_url=next_url,
        error=error,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        cookie,
        max_age=LOGIN_COOKIE_MAX_AGE_S,
        path="/login",
        httponly=True,
        samesite="strict",
        secure=secure_cookies(request),
    )
    return response


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    auth: Auth = request.app.state.auth
    if auth.check_session(request.cookies.get(SESSION_COOKIE)) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, safe_next(next))


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form(max_length=128)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    csrf_token: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/",
) -> Response:
    auth: Auth = request.app.state.auth
    database = request.app.state.database
    client = _client(request)
    next_url = safe_next(next)
    # Before anything costly (argon2 is slow on purpose): a guesser gets 429s, not answers.
    retry_after = auth.login_limiter.hit(client)
    if retry_after:
        log.warning("web.login_rate_limited", client=client)
        response: Response = _login_page(
            request,
            next_url,
            "Too many login attempts. Wait a minute and try again.",
            status_code=429,
        )
        response.headers["retry-after"] = str(int(retry_after) + 1)
        return response
    if not auth.login_token_ok(request.cookies.get(LOGIN_COOKIE), csrf_token):
        log.warning("web.login_csrf_refused", client=client)
        return _login_page(
            request, next_url, "The form expired. Please log in again.", status_code=403
        )
    principal = auth.verify_password(username, password)
    if principal is None:
        # Not the name typed: people type passwords into the user field by mistake. The
        # audit table (not the log) keeps the attempted name for security review.
        log.warning("web.login_failed", known_user=username in auth.users, client=client)
        audit(
            database,
            AuditEventName.USER_LOGIN_FAILED,
            actor=username,
            host=client,
            outcome="failure",
        )
        return _login_page(request, next_url, "Wrong user name or password.", status_code=401)
    log.info("web.login", user=principal.name, client=client)
    audit(database, AuditEventName.USER_LOGIN, actor=principal.name, host=client)
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        auth.new_session(principal, host=client),
        max_age=int(request.app.state.settings.web.session_max_age_s),
        path="/",
        httponly=True,
        samesite="lax",
        secure=secure_cookies(request),
    )
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(request: Request, principal: Annotated[Principal, Depends(csrf_protect)]) -> Response:
    request.app.state.auth.revoke(principal)
    log.info("web.logout", user=principal.name)
    audit(
        request.app.state.database,
        AuditEventName.USER_LOGOUT,
        actor=principal.name,
        host=_client(request),
    )
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=secure_cookies(request))
    return response


# -- the worklist ---------------------------------------------------------------------------


@router.get("/")
def worklist_page(request: Request) -> HTMLResponse:
    query = ui_query(request.query_params)
    page = get_worklist(request.app.state.database, query)
    audit_read(
        request, AuditEventName.WORKLIST_VIEWED, query=query_params(query), rows=len(page.rows)
    )
    here = _page_url(query_params(query))
    prev_qs = (
        query_params(query, offset=max(0, query.offset - query.limit)) if query.offset else None
    )
    more = len(page.rows) == query.limit and (
        not page.total_exact or query.offset + query.limit < page.total
    )
    next_qs = query_params(query, offset=query.offset + query.limit) if more else None
    return _render(
        request,
        "worklist.html",
        page=page,
        rows_html=request.app.state.rows.render(page.rows),
        query=query,
        here=here,
        poll_ms=POLL_MS,
        feed="/ui/worklist.json",
        modalities=sorted(set(MODALITIES) | ({query.modality} if query.modality else set())),
        priorities=list(Priority),
        order_links={
            o: _page_url(query_params(query, order=o, offset=0)) for o in ("priority", "arrival")
        },
        prev_url=None if prev_qs is None else _page_url(prev_qs),
        next_url=None if next_qs is None else _page_url(next_qs),
    )


@router.get("/ui/worklist.json")
def worklist_feed(request: Request) -> Response:
    """The page's live feed: the same rows as JSON; 304 while nothing changed."""
    query = ui_query(request.query_params)
    page = get_worklist(request.app.state.database, query)
    etag = page_etag(page)
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"etag": etag})  # no patient data: no read
    audit_read(
        request, AuditEventName.WORKLIST_VIEWED, query=query_params(query), rows=len(page.rows)
    )
    return Response(page_json(page), media_type="application/json", headers={"etag": etag})


# -- one study ------------------------------------------------------------------------------


@router.get("/studies/{study_uid}")
def study_page(request: Request, study_uid: str) -> HTMLResponse:
    with request.app.state.database.read() as session:
        detail = fetch_detail(session, study_uid)
    if detail is None:
        return _render(request, "not_found.html", status_code=404)
    audit_read(request, AuditEventName.STUDY_VIEWED, study_uid=study_uid)
    # The verdicts already given on the analysis shown, newest first: the form starts there.
    given: dict[str, str] = {}
    if detail.result is not None:
        for review in detail.feedback:
            if review.generation == detail.result.generation:
                for finding in review.findings:
                    given.setdefault(finding.label, finding.verdict.value)
    return _render(
        request,
        "study.html",
        d=detail,
        s=detail.study,
        here=study_path(study_uid),
        overridable=[p.value for p in TRIAGE_PRIORITIES],
        given=given,
        max_note=MAX_NOTE,
    )


def _after_change(request: Request, study_uid: str, changed: bool, next_url: str) -> Response:
    if request.headers.get("x-requested-with") == "fetch":
        with request.app.state.database.read() as session:
            row = fetch_row(session, study_uid)
        return JSONResponse(
            {
                "changed": changed,
                "study": None if row is None else ROW_JSON.dump_python(row, mode="json"),
            }
        )
    return RedirectResponse(safe_next(next_url, study_path(study_uid)), status_code=303)


@router.post("/studies/{study_uid}/status")
def change_status(
    request: Request,
    study_uid: str,
    principal: Annotated[Principal, Depends(csrf_protect)],
    status: Annotated[ReadStatus, Form()],
    next: Annotated[str, Form(max_length=2048)] = "",
) -> Response:
    changed = set_read_status(
        request.app.state.database, study_uid, status, user=principal.actor, host=_client(request)
    )
    if changed:
        log.info(
            "web.status_changed", study_uid=study_uid, status=status.value, user=principal.actor
        )
    return _after_change(request, study_uid, changed, next)


@router.post("/studies/{study_uid}/priority")
def change_priority(
    request: Request,
    study_uid: str,
    principal: Annotated[Principal, Depends(csrf_protect)],
    priority: Annotated[str, Form(max_length=16)] = "",
    next: Annotated[str, Form(max_length=2048)] = "",
) -> Response:
    wanted: Priority | None = None
    if priority and priority != "clear":
        if priority not in [p.value for p in TRIAGE_PRIORITIES]:
            raise HTTPException(
                status_code=422,
                detail=f"priority must be one of {[p.value for p in TRIAGE_PRIORITIES]}",
            )
        wanted = Priority(priority)
    changed = set_priority_override(
        request.app.state.database, study_uid, wanted, user=principal.actor, host=_client(request)
    )
    if changed:
        log.info(
            "web.priority_overridden",
            study_uid=study_uid,
            priority=priority or "clear",
            user=principal.actor,
        )
    return _after_change(request, study_uid, changed, next)


VERDICT_FIELD = "verdict:"  # + the label: one radio group per reported finding


@router.post("/studies/{study_uid}/feedback")
async def give_feedback(
    request: Request,
    study_uid: str,
    principal: Annotated[Principal, Depends(csrf_protect)],
) -> Response:
    """The study page's feedback form: one radio group per reported finding (field
    ``verdict:<label>``, agree / disagree / nothing), ``missed`` checkboxes for the labels
    the model called absent, ``absent_confirmed``, ``note`` and the ``generation`` the
    page showed. Field names carry labels, so the form is read as a whole."""
    form = await request.form()  # parsed once already by csrf_protect: cached
    verdicts: dict[str, Verdict] = {}
    for key, value in form.multi_items():
        if key.startswith(VERDICT_FIELD) and isinstance(value, str) and value:
            if value not in Verdict.__members__.values():
                raise HTTPException(status_code=422, detail="a verdict is agree or disagree")
            verdicts[key.removeprefix(VERDICT_FIELD)] = Verdict(value)
    missed = [v for v in form.getlist("missed") if isinstance(v, str) and v]
    note = form.get("note")
    raw_generation = form.get("generation")
    try:
        generation = int(raw_generation) if isinstance(raw_generation, str) else None
    except ValueError:
        generation = None
    next_url = form.get("next")
    # A database write: off the event loop, like the plain-def routes.
    await anyio.to_thread.run_sync(
        lambda: submit_feedback(
            request,
            principal,
            study_uid,
            verdicts=verdicts,
            missed=missed,
            absent_confirmed=form.get("absent_confirmed") == "1",
            note=note if isinstance(note, str) else "",
            generation=generation,
            host=_client(request),
            via="ui",
        )
    )
    target = safe_next(next_url if isinstance(next_url, str) else "", study_path(study_uid))
    return RedirectResponse(target, status_code=303)


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"cache-control": "private, no-store"})


@router.get("/studies/{study_uid}/instances/{sop_uid}/thumbnail.png")
def thumbnail(request: Request, study_uid: str, sop_uid: str) -> Response:
    # A plain def: FastAPI runs it in a worker thread, off the event loop (decoding a
    # compressed image may take hundreds of milliseconds).
    state = request.app.state
    with state.database.read() as session:
        relpath = instance_relpath(session, study_uid, sop_uid)
    if relpath is None:
        raise HTTPException(status_code=404, detail="no such image")
    try:
        data = dicom_thumbnail(state.images, _in_spool(state.spool.root, relpath), THUMB_PX)
    except ImageUnavailable as exc:
        log.warning(
            "web.thumbnail_unavailable",
            study_uid=study_uid,
            sop_instance_uid=sop_uid,
            error=str(exc),
        )
        raise HTTPException(status_code=404, detail="image cannot be displayed") from None
    audit_read(
        request,
        AuditEventName.IMAGE_VIEWED,
        study_uid=study_uid,
        sop_instance_uid=sop_uid,
        image="thumbnail",
    )
    return _png(data)


@router.get("/studies/{study_uid}/instances/{sop_uid}/overlays/{label}.png")
def overlay(
    request: Request, study_uid: str, sop_uid: str, label: str, full: bool = False
) -> Response:
    state = request.app.state
    with state.database.read() as session:
        relpath = overlay_relpath(session, study_uid, sop_uid, label)
    if relpath is None:
        raise HTTPException(status_code=404, detail="no such overlay")
    try:
        data = png_scaled(
            state.images, _in_spool(state.spool.root, relpath), FULL_PX if full else THUMB_PX
        )
    except ImageUnavailable as exc:
        log.warning(
            "web.overlay_unavailable", study_uid=study_uid, sop_instance_uid=sop_uid, error=str(exc)
        )
        raise HTTPException(status_code=404, detail="overlay cannot be displayed") from None
    audit_read(
        request,
        AuditEventName.IMAGE_VIEWED,
        study_uid=study_uid,
        sop_instance_uid=sop_uid,
        image="overlay",  # not which finding: the audit trail carries no clinical content
    )
    return _png(data)


def _in_spool(root: Path, relpath: str) -> Path:
    """The file under the spool; a stored path that climbs out of it is refused."""
    base = root.resolve()
    path = (base / relpath).resolve()
    if not path.is_relative_to(base):
        raise ImageUnavailable("path outside the spool")
    return path
