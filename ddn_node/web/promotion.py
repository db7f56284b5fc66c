"""``/admin/models``: which model each routing rule runs, its candidate, promote, roll back.

The page of ``ddn-node model status``, with the two decisions an administrator takes from
the monitor's comparison (``/admin/monitor``): promote the candidate, or take it away, and
a rollback after a promotion. Putting a new candidate in shadow names a folder on the
node's disk, so that stays a command (``ddn-node model shadow``). Every change is audited
under the logged-in admin's name and reaches every worker at its next study.
"""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ddn_node.pipeline import promotion
from ddn_node.web.auth import Principal, require_admin
from ddn_node.web.reads import client_host
from ddn_node.web.views import _render, require_admin_post

log = structlog.get_logger("ddn_node.web")

router = APIRouter(include_in_schema=False)

ACTIONS = {"promote": "promote", "rollback": "rollback", "stop-shadow": "stop_shadow"}


def _page(request: Request, error: str = "", status_code: int = 200) -> HTMLResponse:
    app = request.app.state
    rules = promotion.status(app.settings, app.database)
    response = _render(request, "admin_models.html", rules=rules, error=error)
    response.status_code = status_code
    return response


@router.get("/admin/models")
def models_page(
    request: Request, _admin: Annotated[Principal, Depends(require_admin)]
) -> HTMLResponse:
    return _page(request)


@router.post("/admin/models/{action}")
def change_model(
    request: Request,
    action: str,
    admin: Annotated[Principal, Depends(require_admin_post)],
    rule: Annotated[str, Form(max_length=64)],
    expect_version: Annotated[str | None, Form(max_length=128)] = None,
) -> Response:
    if action not in ACTIONS:
        return _page(request, f"no such action: {action}", status_code=404)
    app = request.app.state
    kwargs: dict[str, object] = {"by": admin.name, "host": client_host(request)}
    if action == "promote" and expect_version:
        kwargs["expect_version"] = expect_version
    try:
        models = getattr(promotion, ACTIONS[action])(app.settings, app.database, rule, **kwargs)
    except promotion.PromotionError as exc:
        return _page(request, str(exc), status_code=409)
    log.info(
        "web.model_changed",
        action=action,
        rule=rule,
        live=models.live.label,
        shadow=models.shadow.label if models.shadow else None,
        by=admin.name,
    )
    return RedirectResponse("/admin/models", status_code=303)
