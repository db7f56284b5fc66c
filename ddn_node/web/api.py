"""The JSON API (``/api``), described at ``/openapi.json``.

Authentication happens before routing (app.EdgeMiddleware): a bearer token is required on
every ``/api`` path, so a call without a valid token gets 401 even when its body or
parameters are also wrong, and one whose scopes do not allow the call gets 403 (reads need
``read``; status and priority changes and feedback on findings ``worklist:write``). The ``HTTPBearer`` dependency
below only puts the scheme in the OpenAPI document. Reads of patient data are audited
(``web.reads``).
"""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, HTTPException, Query, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from ddn_node.pipeline.worklist import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    Order,
    StudyNotFound,
    WorklistPage,
    WorklistQuery,
    WorklistRow,
    fetch_row,
    get_worklist,
    page_json,
    set_priority_override,
    set_read_status,
)
from ddn_node.store.audit import AuditEventName
from ddn_node.store.feedback import (
    MAX_NOTE,
)
from ddn_node.vocabulary import TRIAGE_PRIORITIES, Priority, ReadStatus, Verdict
from ddn_node.web.auth import Principal
from ddn_node.web.feedback import submit_feedback
from ddn_node.web.reads import audit_read
from ddn_node.web.study import ReviewView, StudyDetail, fetch_detail, review_view

log = structlog.get_logger("ddn_node.web")

router = APIRouter(
    prefix="/api",
    tags=["worklist"],
    dependencies=[
        Security(HTTPBearer(auto_error=False, description="a token from [[web.tokens]]"))
    ],
    responses={
        401: {"description": "no valid bearer token, or an expired one"},
        403: {"description": "the token's scopes do not allow this call"},
    },
)


class StatusChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: ReadStatus = Field(description="opened, read (leaves the unread list) or unread")


class PriorityChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priority: Priority | None = Field(
        description="STAT, HIGH or ROUTINE to override triage; null clears the override"
    )


class FindingVerdictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(max_length=64, description="a label of the result's model head")
    verdict: Verdict = Field(
        description="agree / disagree with what the model said (present or absent)"
    )


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generation: int | None = Field(
        default=None,
        description="the analysis reviewed (result.generation of the study); 409 if it is "
        "no longer the latest. Omitted: the latest",
    )
    findings: list[FindingVerdictIn] = Field(default_factory=list, max_length=256)
    missed: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="labels the model called absent that are present",
    )
    absent_confirmed: bool = Field(
        default=False,
        description="every other label the model called absent is absent (recorded as agree)",
    )
    note: str = Field(default="", max_length=MAX_NOTE, description="free text; no patient data")


class ChangeOutcome(BaseModel):
    changed: bool = Field(
        description="false when the study already had this value (nothing recorded)"
    )
    study: WorklistRow


def _principal(request: Request) -> Principal:
    principal: Principal = request.state.principal
    return principal


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


@router.get(
    "/worklist",
    response_model=WorklistPage,
    summary="The worklist, in the same order as the page",
)
def api_worklist(
    request: Request,
    unread: Annotated[bool, Query(description="only studies not marked read")] = True,
    modality: Annotated[str | None, Query(max_length=16, description="CR, DX, CT, ...")] = None,
    priority: Annotated[
        Priority | None, Query(description="effective priority (override wins)")
    ] = None,
    order: Annotated[
        Order, Query(description="priority (triage) or arrival (oldest first)")
    ] = "priority",
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    query = WorklistQuery(
        unread=unread,
        modality=(modality or "").strip().upper() or None,
        priority=priority,
        order=order,
        limit=limit,
        offset=offset,
    )
    page = get_worklist(request.app.state.database, query)
    audit_read(
        request, AuditEventName.WORKLIST_VIEWED, query=str(request.url.query), rows=len(page.rows)
    )
    # Serialised once by pydantic-core; returning the page would make FastAPI validate it again.
    return Response(page_json(page), media_type="application/json")


@router.get(
    "/studies/{study_uid}",
    response_model=StudyDetail,
    summary="One study: findings, images, deliveries, history",
)
def api_study(request: Request, study_uid: str) -> Response:
    with request.app.state.database.read() as session:
        detail = fetch_detail(session, study_uid)
    if detail is None:
        raise HTTPException(status_code=404, detail="no such study")
    audit_read(request, AuditEventName.STUDY_VIEWED, study_uid=study_uid)
    return Response(detail.model_dump_json(), media_type="application/json")


def _outcome(request: Request, study_uid: str, changed: bool) -> ChangeOutcome:
    with request.app.state.database.read() as session:
        row = fetch_row(session, study_uid)
    if row is None:  # deleted meanwhile (retention)
        raise StudyNotFound(study_uid)
    return ChangeOutcome(changed=changed, study=row)


@router.post(
    "/studies/{study_uid}/status",
    response_model=ChangeOutcome,
    summary="Mark opened / read / unread (scope worklist:write)",
)
def api_status(request: Request, study_uid: str, body: StatusChange) -> ChangeOutcome:
    principal = _principal(request)
    changed = set_read_status(
        request.app.state.database,
        study_uid,
        body.status,
        user=principal.actor,
        host=_client(request),
    )
    if changed:
        log.info(
            "web.status_changed",
            study_uid=study_uid,
            status=body.status.value,
            user=principal.actor,
        )
    return _outcome(request, study_uid, changed)


@router.post(
    "/studies/{study_uid}/priority",
    response_model=ChangeOutcome,
    summary="Override the triage priority, or clear the override (scope worklist:write)",
    responses={
        422: {"description": f"priority not one of {[p.value for p in TRIAGE_PRIORITIES]} or null"}
    },
)
def api_priority(request: Request, study_uid: str, body: PriorityChange) -> ChangeOutcome:
    if body.priority is not None and body.priority not in TRIAGE_PRIORITIES:
        raise HTTPException(
            status_code=422,
            detail=f"priority must be one of {[p.value for p in TRIAGE_PRIORITIES]} or null",
        )
    principal = _principal(request)
    changed = set_priority_override(
        request.app.state.database,
        study_uid,
        body.priority,
        user=principal.actor,
        host=_client(request),
    )
    if changed:
        log.info(
            "web.priority_overridden",
            study_uid=study_uid,
            priority=body.priority.value if body.priority else "clear",
            user=principal.actor,
        )
    return _outcome(request, study_uid, changed)


@router.post(
    "/studies/{study_uid}/feedback",
    response_model=ReviewView,
    status_code=201,
    summary="Agree / disagree with the findings of the latest result, add missed ones "
    "(scope worklist:write)",
    responses={
        404: {"description": "no such study"},
        409: {"description": "the study has no result, or `generation` is not the latest"},
        422: {"description": "a label not of the model's head, or nothing to record"},
    },
)
def api_feedback(request: Request, study_uid: str, body: FeedbackIn) -> ReviewView:
    principal = _principal(request)
    verdicts: dict[str, Verdict] = {}
    for item in body.findings:
        if verdicts.setdefault(item.label, item.verdict) is not item.verdict:
            raise HTTPException(status_code=422, detail=f"two verdicts for {item.label}")
    review = submit_feedback(
        request,
        principal,
        study_uid,
        verdicts=verdicts,
        missed=body.missed,
        absent_confirmed=body.absent_confirmed,
        note=body.note,
        generation=body.generation,
        host=_client(request),
        via="api",
    )
    return review_view(review)


@router.api_route(
    "/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
)
def api_unknown(rest: str) -> Response:
    """Unknown API paths answer 404 only after authentication (the middleware ran first)."""
    raise HTTPException(status_code=404, detail="not found")
