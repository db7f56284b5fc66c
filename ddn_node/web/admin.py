"""Pages for the administrator: instances the node refused, and why.

Only the ``admin`` role sees them (a radiologist gets 403): they name studies of two
patients side by side, and the decision they ask for (correct the PACS, then re-send or
discard) is the administrator's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from ddn_node.store.quarantine import EXPLANATIONS, open_conflicts
from ddn_node.vocabulary import ConflictKind
from ddn_node.web.auth import Principal, require_admin
from ddn_node.web.study import study_path
from ddn_node.web.views import _render

router = APIRouter(include_in_schema=False)


@router.get("/admin/conflicts")
def conflicts_page(
    request: Request, _admin: Annotated[Principal, Depends(require_admin)]
) -> HTMLResponse:
    with request.app.state.database.read() as session:
        rows = [
            {
                "id": c.id,
                "at": c.at,
                "kind": EXPLANATIONS.get(ConflictKind(c.kind), c.kind),
                "calling_ae": c.calling_ae,
                "sop_instance_uid": c.sop_instance_uid,
                "study_uid": c.study_uid,
                "existing_study_uid": c.existing_study_uid,
                "existing_link": study_path(c.existing_study_uid),
                "size": c.size,
                "path": c.path,
            }
            for c in open_conflicts(session)
        ]
    return _render(request, "admin_conflicts.html", rows=rows)
