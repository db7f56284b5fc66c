"""Radiologists' feedback on the model's findings: recorded, audited, read back.

A review is of one result (the latest one of a study: what the study page shows). For each
label of the result's head the radiologist may say *agree* or *disagree*: with a reported
finding (the model called it present), or with an absent one, where *disagree* means the
model missed it. ``absent_confirmed`` says "everything else the model called absent is
absent": those labels are recorded as *agree*, so a review that adds nothing still counts
its true negatives (the monitor's AUC needs both classes), and a label left unmentioned
without it counts for nothing.

Rows are copies, not references (see ``models.Feedback``): probability, threshold, the
model's version and triage's priority at the time, the study only as the sha256 of its
UID. Retention deletes the study; the feedback stays. Each review writes one audit row
(``feedback.recorded``) with the study UID and how many labels it covered, never which or
what was said (the audit trail leaves the node and carries no clinical content).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from ddn_node.store.audit import AuditEventName, add_audit
from ddn_node.store.engine import Database
from ddn_node.store.models import Feedback, FindingFeedback, Result, Study, utcnow
from ddn_node.vocabulary import Verdict

MAX_NOTE = 2000


class FeedbackRefused(ValueError):
    """The review cannot be recorded as given (the caller answers 422)."""


class NoResult(LookupError):
    """No such study, or it has no result to review (404 / 409)."""

    def __init__(self, message: str, *, study_exists: bool):
        super().__init__(message)
        self.study_exists = study_exists


class StaleResult(LookupError):
    """The review names an analysis that is no longer the study's latest (409)."""


def study_ref(study_uid: str) -> str:
    """The only name feedback keeps for a study: not reversible, found again from the UID."""
    return hashlib.sha256(
        b"ddn-node feedback\x00" + study_uid.encode("ascii", "replace")
    ).hexdigest()


@dataclass(frozen=True)
class FindingVerdict:
    label: str
    model_present: bool
    probability: float
    threshold: float | None
    verdict: Verdict

    @property
    def radiologist_present(self) -> bool:
        return self.model_present != (self.verdict is Verdict.DISAGREE)


@dataclass(frozen=True)
class Review:
    id: int
    at: dt.datetime
    user: str
    generation: int
    model_name: str
    model_version: str
    head: str
    priority: str
    note: str
    findings: list[FindingVerdict]


def _review(row: Feedback) -> Review:
    return Review(
        id=row.id,
        at=row.at,
        user=row.user,
        generation=row.generation,
        model_name=row.model_name,
        model_version=row.model_version,
        head=row.head,
        priority=row.priority,
        note=row.note,
        findings=[
            FindingVerdict(
                label=f.label,
                model_present=f.model_present,
                probability=f.probability,
                threshold=f.threshold,
                verdict=Verdict(f.verdict),
            )
            for f in row.findings
        ],
    )


def _latest_result(session: Session, study_uid: str) -> Result:
    study_id = session.execute(
        select(Study.id).where(Study.study_uid == study_uid)
    ).scalar_one_or_none()
    if study_id is None:
        raise NoResult("no such study", study_exists=False)
    result = session.execute(
        select(Result)
        .where(Result.study_id == study_id)
        .order_by(Result.generation.desc(), Result.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    if result is None:
        raise NoResult("the study has no result to give feedback on", study_exists=True)
    return result


def _numbers(raw: object) -> dict[str, float]:
    if not isinstance(raw, dict):
        return {}
    return {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))}


def record_feedback(
    database: Database,
    study_uid: str,
    *,
    verdicts: Mapping[str, Verdict],
    missed: Iterable[str] = (),
    absent_confirmed: bool = False,
    note: str = "",
    user: str,
    host: str = "",
    via: str = "ui",
    generation: int | None = None,
    now: dt.datetime | None = None,
) -> Review:
    """Record one review of the study's latest result and audit it.

    ``verdicts``: label -> agree / disagree, for any label of the result's head;
    ``missed``: labels the model called absent that are present (the same as *disagree*
    with them); ``generation``: the analysis the reviewer saw, refused if it is no longer
    the latest (a re-analysis finished while the page was open).
    """
    note = note.strip()
    if len(note) > MAX_NOTE:
        raise FeedbackRefused(f"the note is longer than {MAX_NOTE} characters")
    with database.session() as session:
        result = _latest_result(session, study_uid)
        if generation is not None and generation != result.generation:
            raise StaleResult(
                f"analysis #{generation} is no longer the latest (#{result.generation}): "
                "reload the study and review what it shows now"
            )
        probabilities = _numbers(result.probabilities)
        thresholds = _numbers(result.thresholds)
        positive = set(result.positive or [])
        wanted: dict[str, Verdict] = dict(verdicts)
        for label in missed:
            if label in positive:
                raise FeedbackRefused(f"{label} was reported: agree or disagree with it instead")
            if wanted.get(label, Verdict.DISAGREE) is not Verdict.DISAGREE:
                raise FeedbackRefused(f"{label} is both missed and agreed absent")
            wanted[label] = Verdict.DISAGREE
        unknown = sorted(set(wanted) - set(probabilities))
        if unknown:
            raise FeedbackRefused(
                f"not labels of the model's head {result.head}: {', '.join(unknown)}"
            )
        if absent_confirmed:
            for label in probabilities:
                if label not in positive:
                    wanted.setdefault(label, Verdict.AGREE)
        if not wanted and not note:
            raise FeedbackRefused("nothing to record: give a verdict, a missed finding or a note")
        row = Feedback(
            at=now or utcnow(),
            user=user[:128],
            result_id=result.id,
            study_ref=study_ref(study_uid),
            generation=result.generation,
            model_name=result.model_name,
            model_version=result.model_version,
            head=result.head,
            priority=result.priority,
            note=note,
            findings=[
                FindingFeedback(
                    label=label,
                    model_present=label in positive,
                    probability=probabilities[label],
                    threshold=thresholds.get(label),
                    verdict=verdict.value,
                )
                # The model's order (most probable first), as the page lists them.
                for label, verdict in sorted(
                    wanted.items(), key=lambda kv: (-probabilities[kv[0]], kv[0])
                )
            ],
        )
        session.add(row)
        add_audit(
            session,
            AuditEventName.FEEDBACK_RECORDED,
            actor=user,
            host=host,
            study_uid=study_uid,
            via=via,
            generation=result.generation,
            labels=len(wanted),
            note=bool(note),
        )
        session.flush()
        return _review(row)


def reviews_of_study(session: Session, study_id: int, limit: int = 100) -> list[Review]:
    """The reviews of this study's results, newest first (while the study exists)."""
    rows = session.execute(
        select(Feedback)
        .join(Result, Feedback.result_id == Result.id)
        .where(Result.study_id == study_id)
        .options(selectinload(Feedback.findings))
        .order_by(Feedback.at.desc(), Feedback.id.desc())
        .limit(limit)
    ).scalars()
    return [_review(r) for r in rows]
