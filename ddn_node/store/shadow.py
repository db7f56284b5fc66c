"""What candidate models said: one row per study generation and candidate, never sent.

A shadow result is written after the live model's report has left (``pipeline/
analysis.py``, ``ModelSteps.shadow``), so a slow or failing candidate delays and changes
nothing a radiologist or the PACS sees. Rows are named like feedback (the sha256 of the
Study Instance UID, ``store/feedback.study_ref``) and carry no patient identifiers, so the
comparison with the live model against the radiologists' verdicts (``pipeline/monitor.py``)
outlives retention.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ddn_node.store.models import ShadowResult, utcnow


@dataclass(frozen=True)
class ShadowRecord:
    """A candidate's verdict on one study generation, beside the live model's."""

    study_ref: str
    generation: int
    rule: str
    model_name: str
    model_version: str
    head: str
    live_model_name: str
    live_model_version: str
    probabilities: Mapping[str, float]
    thresholds: Mapping[str, float]
    positive: Sequence[str]
    abnormality_score: float
    priority: str
    model_ms: float


def record_shadow(session: Session, record: ShadowRecord, now: dt.datetime | None = None) -> bool:
    """Keep one shadow result; False when this case was already recorded (a retried job
    runs the candidate again on the same generation: the first answer stands)."""
    row = ShadowResult(
        at=now or utcnow(),
        study_ref=record.study_ref,
        generation=record.generation,
        rule=record.rule,
        model_name=record.model_name,
        model_version=record.model_version,
        head=record.head,
        live_model_name=record.live_model_name,
        live_model_version=record.live_model_version,
        probabilities=dict(record.probabilities),
        thresholds=dict(record.thresholds),
        positive=list(record.positive),
        abnormality_score=record.abnormality_score,
        priority=record.priority,
        model_ms=record.model_ms,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        return False
    return True


def shadow_results(session: Session) -> list[ShadowRecord]:
    """Every shadow result, oldest first."""
    rows = session.scalars(select(ShadowResult).order_by(ShadowResult.id))
    return [
        ShadowRecord(
            study_ref=r.study_ref,
            generation=r.generation,
            rule=r.rule,
            model_name=r.model_name,
            model_version=r.model_version,
            head=r.head,
            live_model_name=r.live_model_name,
            live_model_version=r.live_model_version,
            probabilities={str(k): float(v) for k, v in (r.probabilities or {}).items()},
            thresholds={str(k): float(v) for k, v in (r.thresholds or {}).items()},
            positive=list(r.positive or []),
            abnormality_score=r.abnormality_score,
            priority=r.priority,
            model_ms=r.model_ms,
        )
        for r in rows
    ]
