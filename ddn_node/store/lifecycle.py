"""A study's lifecycle: every change of a study's state, in one place.

::

    receiving --complete--> queued --claim--> analysing --triage--> (reported)
        ^         |                              |    \\--retry--> queued
        |         +--> not_routed                |     \\--give up--> failed (analysed
        |                                        |          when its report is out)
        |                                        +--analysed--> analysed
        +------------- reopen (a late source image, from any state) ------------+

Completion and re-opening are fenced by the study's own state (a conditional UPDATE), so
several processes do each at most once. Everything a worker does is fenced by its job's
lease: the transition happens only while the worker still holds the lease, in the same
transaction as the rows it writes, so a worker whose lease expired and was taken over
cannot also finish, retry or fail the job.

Callers pass a session from :meth:`Database.session` and commit by leaving it; a function
that returns False has changed nothing (the caller rolls back whatever else it wrote).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from ddn_node.store.models import Job, Result, Study, WorklistEvent, utcnow
from ddn_node.store.queue import JOBS
from ddn_node.vocabulary import (
    RANK,
    URGENCY_RANK,
    JobState,
    Priority,
    ReadStatus,
    StudyState,
    Urgency,
)

# state_reason and priority_reason are TEXT; cap what we write so a runaway error message
# cannot bloat every worklist row.
_REASON_MAX = 2000


@dataclass(frozen=True)
class Route:
    """Which routing rule analyses a study generation, and which of its instances."""

    rule: str
    instance_ids: tuple[int, ...]


@dataclass(frozen=True)
class Lease:
    """A claimed analysis job: the study generation it analyses, and who holds it."""

    job_id: int
    study_id: int
    generation: int
    attempts: int
    owner: str
    lease_s: float
    route: Route | None  # None: a job queued before routes were stored on jobs


@dataclass(frozen=True)
class Completed:
    study_id: int
    study_uid: str
    generation: int
    routed_to: str | None
    forced: bool


@dataclass(frozen=True)
class Triage:
    """What the worklist shows of one analysis (denormalised onto the study row)."""

    abnormality_score: float
    priority: Priority
    rank: int
    reason: str
    top_findings: list[tuple[str, float]]
    model_version: str


def completion_due(now: dt.datetime) -> ColumnElement[bool]:
    """A receiving study whose quiet period, or force-complete cap, has passed."""
    return and_(
        Study.state == StudyState.RECEIVING,
        or_(Study.complete_after <= now, Study.force_complete_at <= now),
    )


def complete(
    session: Session,
    study_id: int,
    route: Route | None,
    now: dt.datetime,
    *,
    not_routed_reason: str = "",
    urgency: int = URGENCY_RANK[Urgency.ROUTINE],
) -> Completed | None:
    """receiving -> queued (with its job, in the queue's class ``urgency``) or not_routed;
    None if the study is not due any more (another sweeper completed it, or an instance
    arrived meanwhile)."""
    forced = bool(
        session.scalar(
            select(Study.id).where(
                Study.id == study_id, Study.complete_after > now, Study.force_complete_at <= now
            )
        )
    )
    values: dict[str, object] = {"generation": Study.generation + 1, "completed_at": now}
    if route is not None:
        values.update(state=StudyState.QUEUED, state_reason="")
    else:
        values.update(state=StudyState.NOT_ROUTED, state_reason=not_routed_reason[:_REASON_MAX])
    row = session.execute(
        update(Study)
        .where(Study.id == study_id, completion_due(now))
        .values(**values)
        .returning(Study.generation, Study.study_uid)
    ).first()
    if row is None:
        return None
    generation, study_uid = row
    if route is not None:
        session.add(
            Job(
                study_id=study_id,
                generation=generation,
                not_before=now,
                rule=route.rule,
                instance_ids=list(route.instance_ids),
                urgency=urgency,
            )
        )
    return Completed(study_id, study_uid, generation, route.rule if route else None, forced)


def claim(
    session: Session, owner: str, lease_s: float, now: dt.datetime | None = None
) -> Lease | None:
    """queued -> analysing: take the most urgent claimable job (the oldest of its class)
    with a lease."""
    job = JOBS.claim(session, owner, lease_s, now)
    if job is None:
        return None
    route = Route(job.rule, tuple(job.instance_ids or ())) if job.rule else None
    lease = Lease(job.id, job.study_id, job.generation, job.attempts, owner, lease_s, route)
    session.execute(
        update(Study)
        .where(Study.id == lease.study_id, Study.generation == lease.generation)
        .values(state=StudyState.ANALYSING, state_reason=f"attempt {lease.attempts}")
    )
    return lease


def hold(session: Session, lease: Lease) -> bool:
    """Renew the lease; False when it was lost (the caller must not write anything)."""
    return JOBS.renew(session, lease.job_id, lease.owner, lease.lease_s)


def triage(session: Session, lease: Lease, decision: Triage, now: dt.datetime) -> bool:
    """The study's new priority, as its report leaves (before the heat maps)."""
    if not hold(session, lease):
        return False
    session.execute(
        update(Study)
        .where(Study.id == lease.study_id)
        .values(
            abnormality_score=decision.abnormality_score,
            priority=decision.priority.value,
            priority_rank=decision.rank,
            priority_reason=decision.reason[:_REASON_MAX],
            ageing_steps=0,
            top_findings=[[name, round(p, 4)] for name, p in decision.top_findings],
            model_version=decision.model_version,
            analysed_at=now,
            # New results are new reading: a study read before (a re-opened one, or one
            # read before its analysis) goes back on the unread list.
            read_status=ReadStatus.UNREAD,
        )
    )
    was_read = session.scalar(
        select(WorklistEvent.id).where(WorklistEvent.study_id == lease.study_id).limit(1)
    )
    if lease.generation > 1 or was_read:
        session.add(
            WorklistEvent(
                study_id=lease.study_id,
                user="ddn-node",
                action=ReadStatus.UNREAD.value,
                value=f"new results (analysis {lease.generation})",
                at=now,
            )
        )
    return True


def analysed(session: Session, lease: Lease, now: dt.datetime) -> bool:
    """analysing -> analysed, and the job done."""
    if not JOBS.finish(
        session, lease.job_id, lease.owner, JobState.DONE, finished_at=now, last_error=""
    ):
        return False
    # Only the generation that is still current moves the study to 'analysed'; if a late
    # instance re-opened it meanwhile, it stays 'receiving'.
    session.execute(
        update(Study)
        .where(
            Study.id == lease.study_id,
            Study.generation == lease.generation,
            Study.state == StudyState.ANALYSING,
        )
        .values(state=StudyState.ANALYSED, state_reason="")
    )
    return True


def retry(
    session: Session, lease: Lease, delay_s: float, reason: str, now: dt.datetime | None = None
) -> bool:
    """analysing -> queued again, ``delay_s`` after ``now``."""
    if not JOBS.retry_later(
        session, lease.job_id, lease.owner, delay_s, now=now, last_error=reason
    ):
        return False
    session.execute(
        update(Study)
        .where(
            Study.id == lease.study_id,
            Study.generation == lease.generation,
            Study.state == StudyState.ANALYSING,
        )
        .values(state=StudyState.QUEUED, state_reason=f"retrying after: {reason}"[:_REASON_MAX])
    )
    return True


def release(session: Session, lease: Lease, now: dt.datetime | None = None) -> bool:
    """Give the job back at once without counting the attempt (a clean shutdown)."""
    return JOBS.release(session, lease.job_id, lease.owner, now)


class Outcome(StrEnum):
    """What giving up on a job left the study as (see :func:`failed`)."""

    REPORTED = "reported"  # its report is out; only the heat maps are missing
    EARLIER_REPORT_STANDS = "earlier_report_stands"
    NOT_ANALYSED = "not_analysed"


def failed(session: Session, lease: Lease, reason: str, now: dt.datetime) -> Outcome | None:
    """Give up on a job, so that the worklist says what the PACS holds (one truth):

    - its report was already out (the heat maps failed): the study is *analysed*, its
      priority the report's, and the reason says the heat maps were not made;
    - an earlier analysis's report is out (a re-analysis failed): the study is *failed*,
      but keeps that report's priority - a STAT finding the PACS shows is not buried in
      the routine band - and the reason says the latest images were not analysed;
    - nothing was ever reported: *failed*, listed as not analysed, with the reason.

    None when the lease was lost (nothing changed).
    """
    if not JOBS.finish(
        session, lease.job_id, lease.owner, JobState.FAILED, last_error=reason, finished_at=now
    ):
        return None
    this_generation = Study.id == lease.study_id, Study.generation == lease.generation
    reported = session.scalar(
        select(Result.id).where(
            Result.job_id == lease.job_id, Result.sr_sop_instance_uid.is_not(None)
        )
    )
    if reported is not None:
        session.execute(
            update(Study)
            .where(*this_generation, Study.state == StudyState.ANALYSING)
            .values(
                state=StudyState.ANALYSED,
                state_reason=f"report sent; heat maps not made: {reason}"[:_REASON_MAX],
            )
        )
        return Outcome.REPORTED
    earlier = session.scalar(
        select(Result.generation)
        .where(Result.study_id == lease.study_id, Result.sr_sop_instance_uid.is_not(None))
        .order_by(Result.generation.desc())
        .limit(1)
    )
    if earlier is not None:
        session.execute(
            update(Study)
            .where(*this_generation)
            .values(
                state=StudyState.FAILED,
                state_reason=(
                    f"the latest images were not analysed ({reason}); "
                    f"the priority is analysis {earlier}'s, whose report the PACS holds"
                )[:_REASON_MAX],
            )
        )
        return Outcome.EARLIER_REPORT_STANDS
    session.execute(
        update(Study)
        .where(*this_generation)
        .values(
            state=StudyState.FAILED,
            state_reason=reason[:_REASON_MAX],
            priority=Priority.NOT_ANALYSED.value,
            priority_rank=RANK[Priority.NOT_ANALYSED],
            priority_reason=f"analysis failed: {reason}"[:_REASON_MAX],
            ageing_steps=0,
        )
    )
    return Outcome.NOT_ANALYSED


def reopen(session: Session, study: Study, now: dt.datetime, force_complete_s: float) -> None:
    """Any state -> receiving: a new or changed source image arrived after completion.

    A job that has not started would analyse an incomplete study: the next completion
    queues the whole study instead.
    """
    study.state = StudyState.RECEIVING
    study.state_reason = "re-opened by a late instance"
    study.force_complete_at = now + dt.timedelta(seconds=force_complete_s)
    session.execute(
        update(Job)
        .where(Job.study_id == study.id, Job.state == JobState.QUEUED)
        .values(state=JobState.SUPERSEDED, finished_at=now)
    )


def raise_by_ageing(
    session: Session, minutes_per_step: float, now: dt.datetime | None = None
) -> int:
    """Raise unread routine (or not analysed) studies one rank per ``minutes_per_step``
    of waiting, never above HIGH; returns how many changed. The steps are recorded on the
    study (``ageing_steps``), so the worklist can say why without parsing prose.

    Only what waits for a read the node took part in ages: a study no rule routes (a CT,
    an ultrasound) has no result and will get none, so it is listed as not analysed in
    the routine band and left there. Raising it to HIGH would put every unrouted study of
    the day above the chest films the model found abnormal, on the node's authority."""
    if minutes_per_step <= 0:
        return 0
    now = now or utcnow()
    threshold = now - dt.timedelta(minutes=minutes_per_step)
    routine, high = RANK[Priority.ROUTINE], RANK[Priority.HIGH]
    rows = session.execute(
        select(Study.id, Study.first_received_at, Study.priority_rank).where(
            Study.read_status != ReadStatus.READ,
            Study.priority_override.is_(None),
            Study.priority_rank >= routine,
            Study.first_received_at <= threshold,
            # Not routed and never analysed: listed, never raised. (One that was analysed
            # before keeps its report, and that report waits to be read.)
            ~and_(
                Study.state == StudyState.NOT_ROUTED,
                Study.priority == Priority.NOT_ANALYSED.value,
            ),
        )
    ).all()
    changed = 0
    for study_id, received, rank in rows:
        steps = math.floor((now - received).total_seconds() / 60 / minutes_per_step)
        new_rank = max(high, routine - steps)
        if new_rank < rank:
            session.execute(
                update(Study)
                .where(Study.id == study_id)
                .values(priority_rank=new_rank, ageing_steps=routine - new_rank)
            )
            changed += 1
    return changed
