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

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from ddn_node.config import Settings
from ddn_node.pipeline.routing import header_lookup, route_study, study_instances
from ddn_node.pipeline.urgency import Urgent, decide_urgency
from ddn_node.store import lifecycle
from ddn_node.store.engine import Database
from ddn_node.store.lifecycle import Completed, Route
from ddn_node.store.models import Study, utcnow

log = structlog.get_logger("ddn_node.completion")

__all__ = ["Completed", "CompletionTracker"]


class CompletionTracker:
    def __init__(self, settings: Settings, database: Database):
        self.settings = settings
        self.database = database

    def due_study_ids(self, now: dt.datetime | None = None) -> list[int]:
        now = now or utcnow()
        with self.database.read() as session:
            return list(
                session.scalars(
                    select(Study.id)
                    .where(lifecycle.completion_due(now))
                    .order_by(Study.complete_after)
                )
            )

    def complete(self, study_id: int, now: dt.datetime | None = None) -> Completed | None:
        """Complete one study if it is still due; None if someone else did, or it re-opened."""
        now = now or utcnow()
        with self.database.session() as session:
            stored = study_instances(session, study_id)
            facts = [s.facts for s in stored]
            # A rule that names an attribute the database does not keep reads it from the
            # stored header (only then, and only for the instances that rule reaches).
            # (The spool's paths are relative to its root, as dicom/spool.py lays it out.)
            paths = {s.facts.instance_id: s.path for s in stored}
            root = self.settings.node.spool_dir
            lookup = header_lookup(lambda f: str(root / paths[f.instance_id]))
            routed = route_study(self.settings.routing, facts, lookup)
            route = (
                Route(routed.rule.name, tuple(f.instance_id for f in routed.instances))
                if routed is not None
                else None
            )
            modalities = sorted({f.modality for f in facts})
            urgent = self._urgency(session, study_id)
            done = lifecycle.complete(
                session,
                study_id,
                route,
                now,
                not_routed_reason=f"no routing rule matches this study (modalities {modalities})",
                urgency=urgent.rank,
            )
        if done is None:
            return None
        log.info(
            "completion.study_complete",
            study_uid=done.study_uid,
            generation=done.generation,
            routed_to=done.routed_to,
            forced=done.forced,
            instances=len(facts),
            urgency=urgent.urgency.value if done.routed_to else None,
            urgency_reason=urgent.reason if done.routed_to else None,
        )
        return done

    def _urgency(self, session: Session, study_id: int) -> Urgent:
        """The queue's class for the study's job, from what ingest kept of its order and
        source."""
        row = session.execute(
            select(
                Study.order_priority, Study.calling_ae, Study.station_name, Study.department
            ).where(Study.id == study_id)
        ).one()
        return decide_urgency(
            self.settings.queue.urgency,
            order_priority=row.order_priority,
            calling_ae=row.calling_ae,
            station=row.station_name,
            department=row.department,
        )

    def sweep(self, now: dt.datetime | None = None) -> list[Completed]:
        out = []
        for study_id in self.due_study_ids(now):
            done = self.complete(study_id, now)
            if done is not None:
                out.append(done)
        return out
