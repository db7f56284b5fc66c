"""Which model each routing rule runs live, which candidate shadows it, and promotions.

The config's ``[[routing]] model`` is a rule's starting point. An ML engineer then puts a
candidate beside it (``ddn-node model shadow``): the worker runs the candidate on the same
images after the live report has left, and keeps what it said (``store/shadow.py``),
never sending it. ``ddn-node model promote`` makes the candidate live; ``rollback``
restores what was live before. Each change is one row update and one audit event in one
transaction, and every worker reads the row at the start of each job
(:func:`assignment`), so a change takes effect at the next study in every process on
every host, with no restart and no signal to deliver.

What was promoted wins over the config until rolled back (or ``reset``): ``ddn-node model
status`` and the admin page say which is live and where it came from.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from ddn_node.store.audit import AuditEventName, add_audit
from ddn_node.store.models import ModelAssignment, utcnow


class AssignmentRefused(ValueError):
    """The change cannot be made as asked (nothing to promote, nothing to roll back)."""


@dataclass(frozen=True)
class Assignment:
    """What one routing rule runs now."""

    rule: str
    live: Path
    shadow: Path | None
    promoted: bool  # the live model came from a promotion, not from the config
    previous: Path | None  # what a rollback restores (None with promoted: the config's)
    updated_at: dt.datetime | None
    updated_by: str


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _of(rule: str, configured: Path, row: ModelAssignment | None) -> Assignment:
    if row is None:
        return Assignment(rule, configured, None, False, None, None, "")
    return Assignment(
        rule=rule,
        live=Path(row.live_model) if row.live_model else configured,
        shadow=_path(row.shadow_model),
        promoted=row.live_model is not None,
        previous=_path(row.previous_model),
        updated_at=row.updated_at,
        updated_by=row.updated_by,
    )


def assignment(session: Session, rule: str, configured: Path) -> Assignment:
    """What ``rule`` runs now; ``configured`` is its ``[[routing]] model``."""
    row = session.execute(
        select(ModelAssignment).where(ModelAssignment.rule == rule)
    ).scalar_one_or_none()
    return _of(rule, configured, row)


def _row(session: Session, rule: str) -> ModelAssignment:
    row = session.execute(
        select(ModelAssignment).where(ModelAssignment.rule == rule).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        row = ModelAssignment(rule=rule, updated_by="")
        session.add(row)
    return row


def _touch(row: ModelAssignment, by: str, now: dt.datetime | None) -> None:
    row.updated_at = now or utcnow()
    row.updated_by = by[:128]


def set_shadow(
    session: Session,
    rule: str,
    configured: Path,
    candidate: Path | None,
    *,
    by: str,
    host: str = "",
    model: str = "",
    now: dt.datetime | None = None,
) -> Assignment:
    """Start (``candidate``) or stop (None) shadowing ``rule``'s live model; audited."""
    row = _row(session, rule)
    before = row.shadow_model
    row.shadow_model = None if candidate is None else str(candidate)
    _touch(row, by, now)
    add_audit(
        session,
        AuditEventName.MODEL_SHADOW if candidate else AuditEventName.MODEL_SHADOW_STOPPED,
        actor=by,
        host=host,
        rule=rule,
        model=model,
        path=row.shadow_model or before or "",
    )
    session.flush()
    return _of(rule, configured, row)


def promote(
    session: Session,
    rule: str,
    configured: Path,
    *,
    by: str,
    host: str = "",
    model: str = "",
    now: dt.datetime | None = None,
) -> Assignment:
    """The candidate becomes live; the model it replaces is kept for :func:`rollback`."""
    row = _row(session, rule)
    if not row.shadow_model:
        raise AssignmentRefused(f"routing rule {rule!r} has no shadow model to promote")
    replaced = row.live_model or str(configured)
    row.previous_model, row.live_model, row.shadow_model = replaced, row.shadow_model, None
    _touch(row, by, now)
    add_audit(
        session,
        AuditEventName.MODEL_PROMOTED,
        actor=by,
        host=host,
        rule=rule,
        model=model,
        path=row.live_model,
        replaced=replaced,
    )
    session.flush()
    return _of(rule, configured, row)


def rollback(
    session: Session,
    rule: str,
    configured: Path,
    *,
    by: str,
    host: str = "",
    now: dt.datetime | None = None,
) -> Assignment:
    """What was live before the last promotion is live again (the config's model when it
    was that); the model rolled back from is not kept as a shadow."""
    row = _row(session, rule)
    if row.live_model is None:
        raise AssignmentRefused(
            f"routing rule {rule!r} runs its configured model: nothing to roll back"
        )
    withdrawn = row.live_model
    restored = row.previous_model
    row.live_model = None if restored in (None, str(configured)) else restored
    row.previous_model = None
    _touch(row, by, now)
    add_audit(
        session,
        AuditEventName.MODEL_ROLLED_BACK,
        actor=by,
        host=host,
        rule=rule,
        path=row.live_model or str(configured),
        replaced=withdrawn,
    )
    session.flush()
    return _of(rule, configured, row)
