"""Retention: purge studies (instances, results, rows, files) older than the configured age.

A study is purged only when nothing is pending for it: it is analysed, not routed or failed
(not receiving, queued or being analysed), and none of its deliveries is pending or being
sent. Its age is counted from its last received instance, so a re-opened study is young
again. Every purge is audited (study UID, counts), never with patient data.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass

import structlog
from sqlalchemy import delete, exists, select

from ddn_node.config import RetentionSettings
from ddn_node.dicom.spool import Spool, safe_component
from ddn_node.store.audit import AuditEventName, add_audit
from ddn_node.store.engine import Database
from ddn_node.store.models import Delivery, Instance, Study, utcnow
from ddn_node.vocabulary import DeliveryState, StudyState

log = structlog.get_logger("ddn_node.retention")

FINAL_STATES = (StudyState.ANALYSED, StudyState.NOT_ROUTED, StudyState.FAILED)


@dataclass(frozen=True)
class Purged:
    study_uid: str
    instances: int


def purge_expired(
    database: Database,
    spool: Spool,
    policy: RetentionSettings,
    now: dt.datetime | None = None,
    batch: int = 100,
) -> list[Purged]:
    """Purge up to ``batch`` expired studies; returns what was purged."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=policy.max_age_days)
    pending_delivery = exists().where(
        Delivery.study_id == Study.id,
        Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]),
    )
    with database.read() as session:
        candidates = session.execute(
            select(Study.id, Study.study_uid)
            .where(
                Study.last_received_at < cutoff, Study.state.in_(FINAL_STATES), ~pending_delivery
            )
            .order_by(Study.last_received_at)
            .limit(batch)
        ).all()
    purged = []
    for study_id, study_uid in candidates:
        with database.session() as session:
            # Re-check inside the write transaction: an instance may have just re-opened it.
            still = session.scalar(
                select(Study.id).where(
                    Study.id == study_id,
                    Study.last_received_at < cutoff,
                    Study.state.in_(FINAL_STATES),
                    ~pending_delivery,
                )
            )
            if still is None:
                continue
            n_instances = len(
                session.scalars(select(Instance.id).where(Instance.study_id == study_id)).all()
            )
            session.execute(
                delete(Study).where(Study.id == study_id)
            )  # cascades to every child row
            add_audit(
                session,
                AuditEventName.PURGED,
                actor="retention",
                study_uid=study_uid,
                instances=n_instances,
                max_age_days=policy.max_age_days,
            )
        # Files after the rows: a crash in between leaves unreferenced files, never rows
        # pointing at missing files.
        for folder in ("studies", "results"):
            shutil.rmtree(spool.root / folder / safe_component(study_uid), ignore_errors=True)
        purged.append(Purged(study_uid, n_instances))
        log.info("retention.study_purged", study_uid=study_uid, instances=n_instances)
    return purged
