"""One study in detail: the API's ``/api/studies/{uid}`` and the study page share this.

A handful of indexed queries (study, latest result, its image results, instances,
deliveries, history); the thresholds are the ones the analysis applied, recorded with its
result.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import quote

import structlog
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from ddn_node.pipeline.worklist import HistoryEntry, WorklistRow, fetch_history, fetch_row
from ddn_node.store.feedback import Review, reviews_of_study
from ddn_node.store.models import Delivery, ImageResult, Instance, Result, Series, Study
from ddn_node.vocabulary import Verdict

log = structlog.get_logger("ddn_node.web")

MAX_IMAGES = 60  # a CT study may hold thousands of slices; the page is for the analysed images


class FindingView(BaseModel):
    label: str
    probability: float
    heat_map: str | None = Field(
        default=None,
        description="for a reported finding: 'outlined', or why it has no heat map, or what to know of the one it has",
    )
    threshold: float | None = Field(
        description="operating threshold the analysis applied (unknown for results from before 0.2)"
    )
    present: bool


class ResultView(BaseModel):
    generation: int
    model_name: str
    model_version: str
    head: str
    created_at: dt.datetime
    abnormality_score: float
    priority: str
    findings: list[FindingView]
    timings_ms: dict[str, float]


class OverlayView(BaseModel):
    label: str = Field(description="the findings outlined on this overlay, comma separated")
    labels: list[str]
    probability: float | None
    url: str
    full_url: str


class ImageView(BaseModel):
    sop_instance_uid: str
    modality: str
    view_position: str
    laterality: str
    rows: int | None
    columns: int | None
    analysed: bool
    thumbnail_url: str
    probabilities: dict[str, float]
    overlays: list[OverlayView]


class DeliveryView(BaseModel):
    destination: str
    kind: str
    sop_instance_uid: str
    state: str
    attempts: int
    last_status: str | None = Field(description="DIMSE status of the last attempt, hex")
    last_error: str
    commitment: str = Field(
        default="", description="Storage Commitment: '', requested, committed or failed"
    )
    created_at: dt.datetime
    sent_at: dt.datetime | None


class FindingFeedbackView(BaseModel):
    label: str
    model_present: bool = Field(description="the model reported it (probability >= threshold)")
    probability: float
    threshold: float | None
    verdict: Verdict = Field(
        description="agree / disagree with the model's call; disagree with an absent label: missed"
    )
    radiologist_present: bool = Field(description="what the radiologist says")


class ReviewView(BaseModel):
    at: dt.datetime
    user: str
    generation: int = Field(description="the analysis reviewed (results.generation)")
    model_name: str
    model_version: str
    note: str
    findings: list[FindingFeedbackView]


def review_view(review: Review) -> ReviewView:
    return ReviewView(
        at=review.at,
        user=review.user,
        generation=review.generation,
        model_name=review.model_name,
        model_version=review.model_version,
        note=review.note,
        findings=[
            FindingFeedbackView(
                label=f.label,
                model_present=f.model_present,
                probability=f.probability,
                threshold=f.threshold,
                verdict=f.verdict,
                radiologist_present=f.radiologist_present,
            )
            for f in review.findings
        ],
    )


class StudyDetail(BaseModel):
    study: WorklistRow
    patient_sex: str
    patient_birth_date: str
    referring_physician: str
    body_part: str
    calling_ae: str
    result: ResultView | None
    images: list[ImageView]
    images_omitted: int
    deliveries: list[DeliveryView]
    history: list[HistoryEntry]
    feedback: list[ReviewView] = Field(
        default_factory=list, description="radiologists' reviews of the findings, newest first"
    )


def _heat_map_note(result: Result, label: str) -> str | None:
    """What the study page says of a reported finding's heat map (None: not recorded,
    for results from before 0.2)."""
    notes, caveats = result.heatmap_notes, result.heatmap_caveats
    if notes is None:
        return None
    if label in notes:
        return f"no heat map: {notes[label]}"
    if caveats and label in caveats:
        return f"outlined; the heat map was {caveats[label]}"
    return "outlined"


def _overlay_views(
    study_uid: str, sop_uid: str, overlays: dict[str, str], probs: dict[str, float]
) -> list[OverlayView]:
    """One view per overlay file (an overlay shows every finding outlined on its image;
    results from before 0.2 have one overlay per finding)."""
    by_path: dict[str, list[str]] = {}
    for label in sorted(overlays, key=lambda lab: -probs.get(lab, 0.0)):
        by_path.setdefault(overlays[label], []).append(label)
    return [
        OverlayView(
            label=", ".join(labels),
            labels=labels,
            probability=probs.get(labels[0]) if len(labels) == 1 else None,
            url=overlay_url(study_uid, sop_uid, labels[0]),
            full_url=overlay_url(study_uid, sop_uid, labels[0], full=True),
        )
        for labels in by_path.values()
    ]


def study_path(study_uid: str) -> str:
    return "/studies/" + quote(study_uid, safe="")


def thumbnail_url(study_uid: str, sop_uid: str) -> str:
    return f"{study_path(study_uid)}/instances/{quote(sop_uid, safe='')}/thumbnail.png"


def overlay_url(study_uid: str, sop_uid: str, label: str, full: bool = False) -> str:
    url = f"{study_path(study_uid)}/instances/{quote(sop_uid, safe='')}/overlays/{quote(label, safe='')}.png"
    return url + ("?full=1" if full else "")


def latest_result(session: Session, study_id: int) -> Result | None:
    return session.execute(
        select(Result)
        .where(Result.study_id == study_id)
        .order_by(Result.generation.desc(), Result.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def _floats(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        return {}
    return {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))}


def fetch_detail(session: Session, study_uid: str) -> StudyDetail | None:
    row = fetch_row(session, study_uid)
    if row is None:
        return None
    study = session.execute(
        select(
            Study.id,
            Study.patient_sex,
            Study.patient_birth_date,
            Study.referring_physician,
            Study.body_part,
            Study.calling_ae,
        ).where(Study.study_uid == study_uid)
    ).one()
    result = latest_result(session, study.id)
    result_view: ResultView | None = None
    per_image: dict[int, tuple[dict[str, float], dict[str, str]]] = {}
    if result is not None:
        limits = _floats(result.thresholds)
        probs = _floats(result.probabilities)
        positive = set(result.positive or [])
        findings = [
            FindingView(
                label=label,
                probability=p,
                threshold=limits.get(label),
                present=label in positive,
                heat_map=_heat_map_note(result, label) if label in positive else None,
            )
            for label, p in sorted(probs.items(), key=lambda kv: kv[1], reverse=True)
        ]
        result_view = ResultView(
            generation=result.generation,
            model_name=result.model_name,
            model_version=result.model_version,
            head=result.head,
            created_at=result.created_at,
            abnormality_score=result.abnormality_score,
            priority=result.priority,
            findings=findings,
            timings_ms=_floats(result.timings_ms),
        )
        for image in session.execute(
            select(
                ImageResult.instance_id, ImageResult.probabilities, ImageResult.overlay_paths
            ).where(ImageResult.result_id == result.id)
        ):
            overlays = image.overlay_paths if isinstance(image.overlay_paths, dict) else {}
            per_image[image.instance_id] = (_floats(image.probabilities), overlays)

    instances = list(
        session.execute(
            select(
                Instance.id,
                Instance.sop_instance_uid,
                Series.modality,
                Instance.view_position,
                Instance.image_laterality,
                Instance.rows,
                Instance.columns,
            )
            .join(Series, Instance.series_id == Series.id)
            .where(Instance.study_id == study.id, Instance.rows.is_not(None))
            .order_by(Series.series_number, Instance.instance_number, Instance.id)
        ).all()
    )
    # The analysed images first: they are why the study is where it is in the list.
    instances.sort(key=lambda i: i.id not in per_image)
    images = []
    for inst in instances[:MAX_IMAGES]:
        probs, overlays = per_image.get(inst.id, ({}, {}))
        images.append(
            ImageView(
                sop_instance_uid=inst.sop_instance_uid,
                modality=inst.modality,
                view_position=inst.view_position,
                laterality=inst.image_laterality,
                rows=inst.rows,
                columns=inst.columns,
                analysed=inst.id in per_image,
                thumbnail_url=thumbnail_url(study_uid, inst.sop_instance_uid),
                probabilities=dict(sorted(probs.items(), key=lambda kv: kv[1], reverse=True)),
                overlays=_overlay_views(study_uid, inst.sop_instance_uid, overlays, probs),
            )
        )
    deliveries = [
        DeliveryView(
            destination=d.destination,
            kind=d.kind,
            sop_instance_uid=d.sop_instance_uid,
            state=d.state,
            attempts=d.attempts,
            last_status=None if d.last_status is None else f"0x{d.last_status:04X}",
            last_error=d.last_error,
            commitment=d.commitment,
            created_at=d.created_at,
            sent_at=d.sent_at,
        )
        for d in session.execute(
            select(Delivery)
            .where(Delivery.study_id == study.id)
            .order_by(Delivery.result_id.desc(), Delivery.id)  # newest analysis first
            .limit(200)
        ).scalars()
    ]
    return StudyDetail(
        study=row,
        patient_sex=study.patient_sex,
        patient_birth_date=study.patient_birth_date,
        referring_physician=study.referring_physician,
        body_part=study.body_part,
        calling_ae=study.calling_ae,
        result=result_view,
        images=images,
        images_omitted=max(0, len(instances) - MAX_IMAGES),
        deliveries=deliveries,
        history=fetch_history(session, study.id),
        feedback=[review_view(r) for r in reviews_of_study(session, study.id)],
    )


def overlay_relpath(session: Session, study_uid: str, sop_uid: str, label: str) -> str | None:
    """The spool-relative PNG of one overlay of the latest result, or None."""
    study_id = session.execute(
        select(Study.id).where(Study.study_uid == study_uid)
    ).scalar_one_or_none()
    if study_id is None:
        return None
    result = latest_result(session, study_id)
    if result is None:
        return None
    paths = session.execute(
        select(ImageResult.overlay_paths)
        .join(Instance, ImageResult.instance_id == Instance.id)
        .where(ImageResult.result_id == result.id, Instance.sop_instance_uid == sop_uid)
    ).scalar_one_or_none()
    if not isinstance(paths, dict):
        return None
    value = paths.get(label)
    return value if isinstance(value, str) else None


def instance_relpath(session: Session, study_uid: str, sop_uid: str) -> str | None:
    return session.execute(
        select(Instance.path)
        .join(Study, Instance.study_id == Study.id)
        .where(Study.study_uid == study_uid, Instance.sop_instance_uid == sop_uid)
    ).scalar_one_or_none()
