"""The audit trail: who sent what, who was refused, where results went, who changed what.

Rows in ``audit_events``; event names follow the DICOM audit vocabulary loosely
(PS3.15 A.5.3: Association, DICOM Instances Transferred, User Authentication, ...).
Patient names and IDs are not stored here either: UIDs identify the study.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from ddn_node.store.engine import Database
from ddn_node.store.models import AuditEvent


class AuditEventName:
    ASSOCIATION_ACCEPTED = "association.accepted"
    ASSOCIATION_REJECTED = "association.rejected"
    INSTANCES_RECEIVED = "instances.received"
    INSTANCE_REPLACED = "instance.replaced"  # a re-send under the same UID, other content
    IDENTITY_CONFLICT = "instance.identity_conflict"  # refused and quarantined
    CONFLICT_DISCARDED = "conflict.discarded"
    RESULTS_SENT = "results.sent"
    USER_LOGIN = "user.login"
    USER_LOGIN_FAILED = "user.login_failed"
    USER_LOGOUT = "user.logout"
    SESSIONS_ENDED = "user.sessions_ended"  # an admin ended someone's sessions
    # Reads of patient data, through the pages or the API (detail "via": ui / api), with
    # the actor and the study UID (never a patient name or ID).
    WORKLIST_VIEWED = "worklist.viewed"  # one row per request, not per study listed
    STUDY_VIEWED = "study.viewed"
    IMAGE_VIEWED = "image.viewed"  # a thumbnail or a heat-map overlay
    AUDIT_READ = "audit.read"  # someone read the audit trail itself
    WORKLIST_CHANGED = "worklist.changed"
    # A radiologist's review of a result's findings (detail: via, generation, how many
    # labels, whether a note came with it; never which labels or what was said).
    FEEDBACK_RECORDED = "feedback.recorded"
    PURGED = "retention.purged"
    # A model's inputs or scores left its validation set's distribution (detail: model,
    # version, head, the features newly over the PSI threshold with their PSI / KS, window).
    DRIFT_ALARM = "model.drift_alarm"
    # Which model a routing rule runs (detail: rule, model name and version, artifact path,
    # the one it replaced): a candidate put beside the live model, taken away, promoted to
    # live, or rolled back.
    MODEL_SHADOW = "model.shadow_started"
    MODEL_SHADOW_STOPPED = "model.shadow_stopped"
    MODEL_PROMOTED = "model.promoted"
    MODEL_ROLLED_BACK = "model.rolled_back"


def add_audit(
    session: Session,
    event: str,
    *,
    actor: str = "",
    host: str = "",
    outcome: str = "success",
    study_uid: str = "",
    **detail: Any,
) -> None:
    session.add(
        AuditEvent(
            event=event,
            actor=actor[:128],
            host=host[:64],
            outcome=outcome,
            study_uid=study_uid,
            detail=detail,
        )
    )


def audit(database: Database, event: str, **kwargs: Any) -> None:
    with database.session() as session:
        add_audit(session, event, **kwargs)
