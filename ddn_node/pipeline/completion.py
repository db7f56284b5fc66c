"""Study completion: turning "no instance for a while" into an analysis job, exactly once.

No DICOM message says a study is complete, and closing an association means nothing
(PS3.4 B.4): a study may arrive over several associations. A study completes when its quiet
period (per calling AE) has passed since its last instance, or when the force-complete cap
since its first instance is reached for studies that keep trickling in. Completion is one
conditional UPDATE plus the job INSERT in the same transaction, keyed by (study,
generation), so several sweepers in several processes complete a study once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import structlog
from sqlalchemy import and_, or_, select, update

from ddn_node.config import Settings
from ddn_node.pipeline.routing import route_study, study_instances
from ddn_node.store.engine import Database
from ddn_node.store.models import Job, Study, StudyState, utcnow

log = structlog.get_logger("ddn_node.completion")


@dataclass(frozen=True)
class Completed:
    study_id: int
    study_uid: str
    generation: int
    routed_to: str | None
    forced: bool


def _due(now: dt.datetime):  # type: ignore[no-untyped-def]
    return and_(
        Study.state == StudyState.RECEIVING,
        or_(Study.complete_after <= now, Study.force_complete_at <= now),
    )


class CompletionTracker:
    def __init__(self, settings: Settings, database: Database):
        self.settings = settings
        self.database = database

    def due_study_ids(self, now: dt.datetime | None = None) -> list[int]:
        now = now or utcnow()
        with self.database.read() as session:
            return list(session.scalars(select(Study.id).where(_due(now)).order_by(Study.complete_after)))

    def next_deadline(self) -> dt.datetime | None:
        """The earliest moment a receiving study may complete (for precise timers)."""
        with self.database.read() as session:
            row = session.execute(
                select(Study.complete_after, Study.force_complete_at)
                .where(Study.state == StudyState.RECEIVING)
                .order_by(Study.complete_after)
                .limit(1)
            ).first()
        if row is None:
            return None
        return min(t for t in row if t is not None)

    def complete(self, study_id: int, now: dt.datetime | None = None) -> Completed | None:
        """Complete one study if it is still due; None if someone else did, or it re-opened."""
        now = now or utcnow()
        with self.database.session() as session:
            facts = [stored.facts for stored in study_instances(session, study_id)]
            route = route_study(self.settings.routing, facts)
            forced = bool(
                session.scalar(
                    select(Study.id).where(
                        Study.id == study_id,
                        Study.complete_after > now,
                        Study.force_complete_at <= now,
                    )
                )
            )
            values: dict[str, object] = {
                "generation": Study.generation + 1,
                "completed_at": now,
            }
            if route is not None:
                values.update(state=StudyState.QUEUED, state_reason="")
            else:
                modalities = sorted({f.modality for f in facts})
                values.update(
                    state=StudyState.NOT_ROUTED,
                    state_reason=f"no routing rule matches this study (modalities {modalities})",
                )
            row = session.execute(
                update(Study)
                .where(Study.id == study_id, _due(now))
                .values(**values)
                .returning(Study.generation, Study.study_uid)
            ).first()
            if row is None:
                return None
            generation, study_uid = row
            if route is not None:
                session.add(Job(study_id=study_id, generation=generation, not_before=now))
        done = Completed(study_id, study_uid, generation, route.rule.name if route else None, forced)
        log.info(
            "completion.study_complete",
            study_uid=study_uid,
            generation=generation,
            routed_to=done.routed_to,
            forced=forced,
            instances=len(facts),
        )
        return done

    def sweep(self, now: dt.datetime | None = None) -> list[Completed]:
        out = []
        for study_id in self.due_study_ids(now):
            done = self.complete(study_id, now)
            if done is not None:
                out.append(done)
        return out
