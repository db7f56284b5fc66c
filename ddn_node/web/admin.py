"""Pages for the administrator: instances the node refused, and why; the monitor.

Only the ``admin`` role sees them (a radiologist gets 403): they name studies of two
patients side by side, and the decision they ask for (correct the PACS, then re-send or
discard) is the administrator's. The monitor (``/admin/monitor``) is the report of
``ddn-node monitor`` with its figures.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import func, select

from ddn_node.pipeline.monitor import (
    MonitorReport,
    auc_text,
    build_report,
    difference_text,
    hours_text,
    proportion_text,
)
from ddn_node.pipeline.monitor_plots import (
    calibration_png,
    drift_png,
    roc_png,
    shadow_png,
    time_to_read_png,
)
from ddn_node.store.models import DriftObservation, DriftState
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


# -- the monitor: the model against radiologists' feedback, and the triage effect ----------

PLOTS = ("roc", "calibration", "time-to-read", "shadow")


def _report(request: Request) -> MonitorReport:
    settings = request.app.state.settings
    return build_report(request.app.state.database, settings.triage.critical_findings)


@router.get("/admin/monitor")
def monitor_page(
    request: Request, _admin: Annotated[Principal, Depends(require_admin)]
) -> HTMLResponse:
    # Aggregates of feedback that holds no patient identifiers: not a read of patient data.
    report = _report(request)
    return _render(
        request,
        "admin_monitor.html",
        report=report,
        models=list(enumerate(report.models)),
        shadows=list(enumerate(report.shadows)),
        proportion=proportion_text,
        auc=auc_text,
        difference=difference_text,
        hours=hours_text,
    )


@router.get("/admin/monitor/{plot}.png")
def monitor_plot(
    request: Request,
    plot: str,
    _admin: Annotated[Principal, Depends(require_admin)],
    model: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """One figure of the monitor; ``model`` indexes the page's list of model versions (of
    shadow comparisons, for ``shadow``)."""
    if plot not in PLOTS:
        raise HTTPException(status_code=404, detail="no such figure")
    report = _report(request)
    data: bytes | None
    if plot == "time-to-read":
        data = time_to_read_png(report.triage)
    elif plot == "shadow":
        data = shadow_png(report.shadows[model]) if model < len(report.shadows) else None
    elif model >= len(report.models):
        data = None
    else:
        data = (roc_png if plot == "roc" else calibration_png)(report.models[model])
    if data is None:
        raise HTTPException(status_code=404, detail="nothing to draw yet")
    return Response(data, media_type="image/png")


# -- drift: the inputs and scores against the model's validation set -------------------


@router.get("/admin/drift")
def drift_page(
    request: Request, _admin: Annotated[Principal, Depends(require_admin)]
) -> HTMLResponse:
    # Distributions of numbers without identifiers: not a read of patient data.
    with request.app.state.database.read() as session:
        states = list(
            session.scalars(
                select(DriftState).order_by(
                    DriftState.model_name,
                    DriftState.model_version,
                    DriftState.head,
                    DriftState.alarmed.desc(),
                    DriftState.psi.desc(),
                )
            )
        )
        manufacturers = session.execute(
            select(
                DriftObservation.model_name,
                DriftObservation.model_version,
                DriftObservation.head,
                DriftObservation.manufacturer,
                func.count(),
            ).group_by(
                DriftObservation.model_name,
                DriftObservation.model_version,
                DriftObservation.head,
                DriftObservation.manufacturer,
            )
        ).all()
    models: dict[tuple[str, str, str], dict[str, list]] = {}
    for st in states:
        entry = models.setdefault(
            (st.model_name, st.model_version, st.head), {"states": [], "manufacturers": []}
        )
        entry["states"].append(st)
    for name, version, head, maker, n in manufacturers:
        entry = models.setdefault((name, version, head), {"states": [], "manufacturers": []})
        entry["manufacturers"].append((maker or "(none given)", n))
    return _render(
        request,
        "admin_drift.html",
        models=list(models.items()),
        settings=request.app.state.settings.drift,
    )


@router.get("/admin/drift/{state_id}.png")
def drift_plot(
    request: Request, state_id: int, _admin: Annotated[Principal, Depends(require_admin)]
) -> Response:
    with request.app.state.database.read() as session:
        state = session.get(DriftState, state_id)
        if state is None:
            raise HTTPException(status_code=404, detail="no such feature")
        data = drift_png(state.feature, state.histogram, state.psi, state.ks)
    return Response(data, media_type="image/png")
