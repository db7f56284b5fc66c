"""Instances refused for an identity conflict: their rows, for the administrator.

The SCP records one row per refusal (and its bytes under the spool's ``quarantine/``);
the admin page and ``ddn-node conflicts`` list the open ones, and discarding one is an
audited decision, never automatic: the sender still holds the instance and may need it
once the PACS has corrected the patient or the UIDs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from ddn_node.store.audit import AuditEventName, add_audit
from ddn_node.store.models import IdentityConflict, utcnow
from ddn_node.vocabulary import ConflictKind

# What each kind means, for people (page and CLI).
EXPLANATIONS = {
    ConflictKind.INSTANCE_OTHER_STUDY: "this SOP Instance UID is already stored in another study",
    ConflictKind.INSTANCE_OTHER_SERIES: "this SOP Instance UID is already stored in another series",
    ConflictKind.SERIES_OTHER_STUDY: "this Series Instance UID is already stored in another study",
    ConflictKind.STUDY_OTHER_PATIENT: "this Study Instance UID is already stored for another Patient ID",
}


@dataclass(frozen=True)
class Refusal:
    """What the SCP knows of one refused instance."""

    kind: ConflictKind
    calling_ae: str
    host: str
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    existing_study_uid: str
    existing_series_uid: str
    path: str
    size: int
    sha256: str


def record_refusal(session: Session, refusal: Refusal) -> None:
    """One conflict row and its audit event (outcome failure), in the caller's transaction."""
    session.add(
        IdentityConflict(
            kind=refusal.kind.value,
            calling_ae=refusal.calling_ae[:16],
            sop_instance_uid=refusal.sop_instance_uid,
            sop_class_uid=refusal.sop_class_uid,
            study_uid=refusal.study_uid,
            series_uid=refusal.series_uid,
            existing_study_uid=refusal.existing_study_uid,
            existing_series_uid=refusal.existing_series_uid,
            path=refusal.path,
            size=refusal.size,
            sha256=refusal.sha256,
        )
    )
    add_audit(
        session,
        AuditEventName.IDENTITY_CONFLICT,
        actor=refusal.calling_ae,
        host=refusal.host,
        outcome="failure",
        study_uid=refusal.existing_study_uid,
        kind=refusal.kind.value,
        sop_instance_uid=refusal.sop_instance_uid,
        sent_study_uid=refusal.study_uid,
    )


def open_conflicts(session: Session, limit: int = 500) -> Sequence[IdentityConflict]:
    """Refusals not yet discarded, newest first."""
    return session.scalars(
        select(IdentityConflict)
        .where(IdentityConflict.discarded_at.is_(None))
        .order_by(IdentityConflict.id.desc())
        .limit(limit)
    ).all()


def mark_discarded(
    session: Session, conflict_id: int, actor: str, now: dt.datetime | None = None
) -> str | None:
    """Mark one open refusal discarded (audited); returns its quarantine path to delete,
    or None when there is no such open refusal."""
    row = session.get(IdentityConflict, conflict_id)
    if row is None or row.discarded_at is not None:
        return None
    path = row.path
    row.discarded_at = now or utcnow()
    row.discarded_by = actor[:128]
    row.path = ""
    add_audit(
        session,
        AuditEventName.CONFLICT_DISCARDED,
        actor=actor,
        study_uid=row.existing_study_uid,
        conflict_id=conflict_id,
        sop_instance_uid=row.sop_instance_uid,
    )
    return path
