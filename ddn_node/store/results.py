"""What an analysis leaves in the database: its result, per-image results, and the
delivery rows of every object and message it produced.

Two moments, each in the transaction of a lease-fenced lifecycle transition
(``store/lifecycle.py``):

1. the report: :func:`record_report` writes the result row (findings, score, priority,
   thresholds, the SR's identity and file) and the SR's delivery rows, as the SR leaves;
2. the rest: :func:`record_heat_maps` adds the per-image results, the heat-map objects'
   and the notifications' delivery rows, and marks the result complete.

The database is the single record of what the node said: a later, superseding SR finds
its predecessor here (:func:`previous_report`), and the web part reads thresholds here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Row, func, select, update
from sqlalchemy.orm import Session

from ddn_node.store.models import Delivery, ImageResult, Result, Study
from ddn_node.vocabulary import CommitmentState, DeliveryState, ResultKind


@dataclass(frozen=True)
class OutgoingObject:
    """One file to send to one destination: a DICOM object or an adapter message."""

    destination: str
    kind: str  # a ResultKind or a MessageKind
    sop_class_uid: str  # "" for messages
    sop_instance_uid: str  # for messages: the message id
    path: str  # relative to the spool


@dataclass(frozen=True)
class ReportIdentity:
    """How a later SR refers to this one (PS3.3 C.17.2.1), and where its file is."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: str


@dataclass(frozen=True)
class Report:
    """What the SR of one analysis says, as the result row keeps it."""

    model_name: str
    model_version: str
    head: str
    probabilities: Mapping[str, float]
    positive: Sequence[str]
    thresholds: Mapping[str, float]
    heatmap_notes: Mapping[str, str]
    heatmap_caveats: Mapping[str, str]
    abnormality_score: float
    priority: str
    sr: ReportIdentity
    timings_ms: Mapping[str, float]


@dataclass(frozen=True)
class ImageRecord:
    instance_id: int
    probabilities: Mapping[str, float]
    overlay_paths: Mapping[str, str]  # label -> spool path of its Secondary Capture


@dataclass(frozen=True)
class StoredReport:
    result_id: int
    sr: ReportIdentity


def record_report(
    session: Session,
    *,
    study_id: int,
    job_id: int,
    generation: int,
    report: Report,
    deliveries: Sequence[OutgoingObject],
    now: dt.datetime,
) -> int:
    """The result row and the SR's delivery rows; returns the result id."""
    result = Result(
        study_id=study_id,
        job_id=job_id,
        generation=generation,
        model_name=report.model_name,
        model_version=report.model_version,
        head=report.head,
        probabilities=dict(report.probabilities),
        positive=list(report.positive),
        thresholds=dict(report.thresholds),
        heatmap_notes=dict(report.heatmap_notes),
        heatmap_caveats=dict(report.heatmap_caveats),
        abnormality_score=report.abnormality_score,
        priority=report.priority,
        timings_ms=dict(report.timings_ms),
        sr_sop_instance_uid=report.sr.sop_instance_uid,
        sr_series_uid=report.sr.series_instance_uid,
        sr_sop_class_uid=report.sr.sop_class_uid,
        sr_path=report.sr.path,
        created_at=now,
    )
    session.add(result)
    session.flush()
    add_deliveries(session, study_id, result.id, deliveries, now)
    return result.id


def add_deliveries(
    session: Session,
    study_id: int,
    result_id: int,
    objects: Sequence[OutgoingObject],
    now: dt.datetime,
) -> None:
    for obj in objects:
        session.add(
            Delivery(
                study_id=study_id,
                result_id=result_id,
                destination=obj.destination,
                kind=obj.kind,
                sop_class_uid=obj.sop_class_uid,
                sop_instance_uid=obj.sop_instance_uid,
                path=obj.path,
                not_before=now,
            )
        )


def queued_destinations(session: Session, study_id: int, sop_instance_uid: str) -> set[str]:
    """The destinations that already have a delivery row for one object."""
    return set(
        session.scalars(
            select(Delivery.destination).where(
                Delivery.study_id == study_id, Delivery.sop_instance_uid == sop_instance_uid
            )
        )
    )


_IDENTITY = (
    Result.id,
    Result.sr_sop_class_uid,
    Result.sr_sop_instance_uid,
    Result.sr_series_uid,
    Study.study_uid,
    Result.sr_path,
)


def _identity(
    row: Row[int, str | None, str | None, str | None, str, str | None] | None,
) -> tuple[int, ReportIdentity] | None:
    if row is None:
        return None
    result_id, sop_class, sop_uid, series_uid, study_uid, path = row
    if not (sop_class and sop_uid and series_uid and path):
        return None  # a result from before the SR's identity was recorded
    return int(result_id), ReportIdentity(sop_class, sop_uid, series_uid, study_uid, path)


@dataclass(frozen=True)
class SentObject:
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str


def superseded_objects(
    session: Session, study_id: int, *, before_generation: int
) -> list[SentObject]:
    """The SR, Parametric Maps and overlays of the study's earlier analyses that reached a
    destination: what a superseding analysis withdraws."""
    rows = session.execute(
        select(Delivery.kind, Delivery.sop_class_uid, Delivery.sop_instance_uid, Delivery.path)
        .join(Result, Delivery.result_id == Result.id)
        .where(
            Delivery.study_id == study_id,
            Result.generation < before_generation,
            Delivery.kind.in_([ResultKind.SR, ResultKind.PM, ResultKind.SC]),
            Delivery.state == DeliveryState.SENT,
        )
        .order_by(Delivery.id)
    ).all()
    seen: dict[str, SentObject] = {}
    for kind, sop_class, sop_uid, path in rows:
        seen.setdefault(sop_uid, SentObject(kind, sop_class, sop_uid, path))
    return list(seen.values())


def report_of_job(session: Session, job_id: int) -> StoredReport | None:
    """The report an earlier attempt of this job already queued (its SR may be in a PACS)."""
    found = _identity(
        session.execute(
            select(*_IDENTITY)
            .join(Study, Result.study_id == Study.id)
            .where(Result.job_id == job_id)
        ).first()
    )
    return None if found is None else StoredReport(*found)


def previous_report(session: Session, study_id: int, *, before_job: int) -> ReportIdentity | None:
    """The study's latest SR from an analysis other than ``before_job``: what a new SR
    supersedes."""
    found = _identity(
        session.execute(
            select(*_IDENTITY)
            .join(Study, Result.study_id == Study.id)
            .where(
                Result.study_id == study_id,
                Result.job_id != before_job,
                Result.sr_sop_instance_uid.is_not(None),
            )
            .order_by(Result.generation.desc(), Result.id.desc())
            .limit(1)
        ).first()
    )
    return None if found is None else found[1]


def record_heat_maps(
    session: Session,
    *,
    study_id: int,
    result_id: int,
    images: Sequence[ImageRecord],
    deliveries: Sequence[OutgoingObject],
    timings_ms: Mapping[str, float],
    now: dt.datetime,
) -> None:
    """Per-image results and the remaining delivery rows; the result is complete."""
    for image in images:
        session.add(
            ImageResult(
                result_id=result_id,
                instance_id=image.instance_id,
                probabilities=dict(image.probabilities),
                overlay_paths=dict(image.overlay_paths),
            )
        )
    add_deliveries(session, study_id, result_id, deliveries, now)
    session.execute(
        update(Result)
        .where(Result.id == result_id)
        .values(timings_ms=dict(timings_ms), completed_at=now)
    )


COMMITMENT_REQUESTED = CommitmentState.REQUESTED.value
_KIND_ORDER = [ResultKind.SR, ResultKind.SC, ResultKind.PM, ResultKind.KO]


def summarise_deliveries(session: Session, study_id: int) -> str:
    """Write (and return) the study's one-line summary of where its latest results went,
    per destination: "pacs: SR, SC sent (committed); PM refused"."""
    latest = session.scalar(
        select(func.max(Delivery.result_id)).where(Delivery.study_id == study_id)
    )
    rows = session.execute(
        select(Delivery.destination, Delivery.kind, Delivery.state, Delivery.commitment).where(
            Delivery.study_id == study_id,
            Delivery.result_id == latest,
            Delivery.kind.in_([k.value for k in _KIND_ORDER]),
        )
    ).all()
    by_destination: dict[str, dict[str, list[str]]] = {}
    commitments: dict[str, set[str]] = {}
    for destination, kind, state, commitment in rows:
        shown = "sending" if state in (DeliveryState.PENDING, DeliveryState.SENDING) else state
        kinds = by_destination.setdefault(destination, {}).setdefault(shown, [])
        if kind.upper() not in kinds:
            kinds.append(kind.upper())
        if state == DeliveryState.SENT:
            commitments.setdefault(destination, set()).add(commitment)
    parts = []
    for destination in sorted(by_destination):
        states = by_destination[destination]
        words = []
        for state in ("sent", "sending", "refused", "failed"):
            if state in states:
                kinds = sorted(
                    states[state], key=lambda k: [x.value.upper() for x in _KIND_ORDER].index(k)
                )
                words.append(
                    f"{', '.join(kinds)} {state}{_commitment_note(state, commitments.get(destination))}"
                )
        parts.append(f"{destination}: {'; '.join(words)}")
    summary = " | ".join(parts)
    session.execute(
        update(Study).where(Study.id == study_id).values(delivery_summary=summary[:2000])
    )
    return summary


def _commitment_note(state: str, commitments: set[str] | None) -> str:
    if state != "sent" or not commitments or commitments == {""}:
        return ""
    if commitments == {CommitmentState.COMMITTED}:
        return " (committed)"
    if CommitmentState.FAILED in commitments:
        return " (commitment failed)"
    return " (commitment pending)"


@dataclass(frozen=True)
class CommitmentReport:
    """What an N-EVENT-REPORT of Storage Commitment said (PS3.4 J.3.3)."""

    transaction_uid: str
    committed: Sequence[str]
    failed: Mapping[str, int]  # SOP Instance UID -> Failure Reason (PS3.4 J.3.3.1.1)


def record_commitment(session: Session, report: CommitmentReport, now: dt.datetime) -> int:
    """Mark the deliveries of a commitment transaction committed or failed; returns how
    many rows it named. Only rows of that transaction are touched."""
    named = 0
    if report.committed:
        named += _rows(
            session.execute(
                update(Delivery)
                .where(
                    Delivery.commitment_uid == report.transaction_uid,
                    Delivery.sop_instance_uid.in_(list(report.committed)),
                )
                .values(commitment=CommitmentState.COMMITTED, committed_at=now)
            )
        )
    for sop_uid, reason in report.failed.items():
        named += _rows(
            session.execute(
                update(Delivery)
                .where(
                    Delivery.commitment_uid == report.transaction_uid,
                    Delivery.sop_instance_uid == sop_uid,
                )
                .values(
                    commitment=CommitmentState.FAILED,
                    last_error=f"storage commitment failed: reason 0x{reason:04X}",
                )
            )
        )
    studies = session.scalars(
        select(Delivery.study_id)
        .where(Delivery.commitment_uid == report.transaction_uid)
        .distinct()
    )
    for study_id in list(studies):
        summarise_deliveries(session, study_id)
    return named


def _rows(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
