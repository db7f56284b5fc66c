"""The security officer's pages: open sessions (and ending them), the audit trail.

Under ``/admin``: only a logged-in user with the admin role gets here (EdgeMiddleware
refuses anyone else with 403 before routing; ``require_admin`` says so again per route).
Reading the audit trail is itself audited.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import select

from ddn_node.store.audit import AuditEventName, audit
from ddn_node.store.models import AuditEvent
from ddn_node.web.auth import Auth, Principal, require_admin
from ddn_node.web.reads import client_host
from ddn_node.web.views import _render, require_admin_post

log = structlog.get_logger("ddn_node.web")

router = APIRouter(include_in_schema=False)

MAX_AUDIT_PAGE = 1000


@router.get("/admin/sessions")
def sessions_page(
    request: Request, _admin: Annotated[Principal, Depends(require_admin)]
) -> HTMLResponse:
    auth: Auth = request.app.state.auth
    sessions = auth.open_sessions()
    open_by_user = Counter(s.user for s in sessions)
    users = [
        {"name": u.name, "role": u.role, "open": open_by_user[u.name]}
        for u in request.app.state.settings.web.users
    ]
    return _render(request, "admin_sessions.html", sessions=sessions, users=users)


@router.post("/admin/sessions/end")
def end_sessions(
    request: Request,
    admin: Annotated[Principal, Depends(require_admin_post)],
    user: Annotated[str, Form(max_length=128)],
) -> Response:
    auth: Auth = request.app.state.auth
    ended = auth.end_sessions(user, by=admin.name)
    log.info("web.sessions_ended", user=user, sessions=ended, by=admin.name)
    audit(
        request.app.state.database,
        AuditEventName.SESSIONS_ENDED,
        actor=admin.name,
        host=client_host(request),
        user=user,
        sessions=ended,
    )
    return RedirectResponse("/admin/sessions", status_code=303)


@router.get("/admin/audit.json")
def audit_trail(
    request: Request,
    admin: Annotated[Principal, Depends(require_admin)],
    limit: Annotated[int, Query(ge=1, le=MAX_AUDIT_PAGE)] = 100,
    before: Annotated[int | None, Query(ge=1, description="older than this row id")] = None,
    event: Annotated[str | None, Query(max_length=64)] = None,
) -> JSONResponse:
    """The audit trail, newest first, a page at a time (``next_before`` pages on)."""
    stmt = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if before is not None:
        stmt = stmt.where(AuditEvent.id < before)
    if event:
        stmt = stmt.where(AuditEvent.event == event)
    with request.app.state.database.read() as session:
        rows: list[dict[str, Any]] = [
            {
                "id": r.id,
                "at": r.at.isoformat(),
                "event": r.event,
                "outcome": r.outcome,
                "actor": r.actor,
                "host": r.host,
                "study_uid": r.study_uid,
                "detail": r.detail,
                "exported_at": r.exported_at.isoformat() if r.exported_at else None,
            }
            for r in session.scalars(stmt)
        ]
    audit(
        request.app.state.database,
        AuditEventName.AUDIT_READ,
        actor=admin.name,
        host=client_host(request),
        events=len(rows),
        filter=event or "",
    )
    next_before = rows[-1]["id"] if len(rows) == limit else None
    return JSONResponse({"events": rows, "next_before": next_before})
