"""Audit rows for reads of patient data: who saw which study, through which door.

Every response that carries patient data writes one row before it is sent: the worklist
(one row per request, with the filter and how many rows it listed, not one per study),
a study's page or its API detail, each thumbnail and heat-map overlay. The live feed's
``304 Not Modified`` sends nothing and is not a read. Rows name the actor and the Study /
SOP Instance UIDs, never a patient's name or ID (the audit trail leaves the node).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from ddn_node.store.audit import audit
from ddn_node.web.auth import Principal


def client_host(request: Request) -> str:
    return request.client.host if request.client else ""


def audit_read(request: Request, event: str, *, study_uid: str = "", **detail: Any) -> None:
    """One audit row for this request's read (``detail`` must hold no patient data)."""
    principal: Principal = request.state.principal
    path = request.url.path
    audit(
        request.app.state.database,
        event,
        actor=principal.actor,
        host=client_host(request),
        study_uid=study_uid,
        via="api" if path == "/api" or path.startswith("/api/") else "ui",
        **detail,
    )
