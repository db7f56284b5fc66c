"""Recording a received instance: study / series / instance rows, duplicates, re-opening.

Called from the DIMSE thread after the file is durably in the spool; the commit of this
transaction is what allows the SCP to answer 0x0000.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ddn_node.store.engine import Database
from ddn_node.store.models import Instance, Job, JobState, Series, Study, StudyState, utcnow


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP knows about one stored instance (header attributes + the file)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    calling_ae: str = ""
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    accession_number: str = ""
    dicom_study_id: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    referring_physician: str = ""
    specific_character_set: str = ""
    modality: str = ""
    body_part: str = ""
    series_number: str = ""
    series_description: str = ""
    instance_number: str = ""
    view_position: str = ""
    image_laterality: str = ""
    photometric: str = ""
    rows: int | None = None
    columns: int | None = None


@dataclass(frozen=True)
class IngestOutcome:
    study_id: int
    new_instance: bool
    changed: bool  # a duplicate SOP Instance UID with different content
    reopened: bool  # the study had completed and now receives again
    complete_after: dt.datetime


def _fit(model: type, values: dict[str, object]) -> dict[str, object]:
    """Truncate strings to their column length: real headers overflow their VR limits."""
    table = model.__table__  # type: ignore[attr-defined]
    out = {}
    for key, value in values.items():
        column = table.columns.get(key)
        if column is None:
            continue
        length = getattr(column.type, "length", None)
        # Identifiers are never shortened (a cut UID names another object); the SCP has
        # already refused UIDs longer than their columns.
        if isinstance(value, str) and length is not None and len(value) > length and not key.endswith("uid"):
            value = value[:length]
        out[key] = value
    return out


def _insert_ignore(session: Session, model: type, values: dict[str, object], key: str) -> None:
    dialect = session.get_bind().dialect.name
    stmt_mod = postgresql if dialect == "postgresql" else sqlite
    stmt = stmt_mod.insert(model).values(**_fit(model, values)).on_conflict_do_nothing(
        index_elements=[key]
    )
    session.execute(stmt)


_STUDY_ATTRS = (
    "patient_id",
    "patient_name",
    "patient_birth_date",
    "patient_sex",
    "accession_number",
    "dicom_study_id",
    "study_date",
    "study_time",
    "study_description",
    "referring_physician",
    "specific_character_set",
)


def record_instance(
    database: Database,
    rec: InstanceRecord,
    *,
    quiet_period_s: float,
    force_complete_s: float,
    now: dt.datetime | None = None,
) -> IngestOutcome:
    now = now or utcnow()
    complete_after = now + dt.timedelta(seconds=quiet_period_s)
    with database.session() as session:
        _insert_ignore(
            session,
            Study,
            {
                "study_uid": rec.study_uid,
                "calling_ae": rec.calling_ae,
                "first_received_at": now,
                "last_received_at": now,
                "complete_after": complete_after,
                "force_complete_at": now + dt.timedelta(seconds=force_complete_s),
                "state": StudyState.RECEIVING,
                **{a: getattr(rec, a) for a in _STUDY_ATTRS},
            },
            "study_uid",
        )
        study = session.scalars(
            select(Study).where(Study.study_uid == rec.study_uid).with_for_update()
        ).one()
        _insert_ignore(
            session,
            Series,
            {
                "study_id": study.id,
                "series_uid": rec.series_uid,
                "modality": rec.modality,
                "body_part": rec.body_part,
                "series_number": rec.series_number,
                "series_description": rec.series_description,
            },
            "series_uid",
        )
        series = session.scalars(select(Series).where(Series.series_uid == rec.series_uid)).one()

        existing = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == rec.sop_instance_uid)
        ).one_or_none()
        new_instance = existing is None
        changed = False
        if existing is None:
            values = {f.name: getattr(rec, f.name) for f in fields(rec)}
            values.update(series_id=series.id, study_id=study.id, received_at=now)
            session.add(Instance(**_fit(Instance, values)))
            study.num_instances += 1
        elif existing.sha256 != rec.sha256:
            # Same UID, new content (a corrected image): keep the new bytes, analyse again.
            changed = True
            existing.sha256, existing.size, existing.path = rec.sha256, rec.size, rec.path
            existing.received_at = now
        if not (new_instance or changed):
            # An idempotent re-send: nothing about the study changes.
            return IngestOutcome(study.id, False, False, False, study.complete_after or now)

        # Fill attributes an earlier instance left empty (the first one may be a KO or PR).
        for attr in _STUDY_ATTRS:
            if not getattr(study, attr) and getattr(rec, attr):
                setattr(study, attr, _fit(Study, {attr: getattr(rec, attr)})[attr])
        modalities = set(filter(None, study.modalities.split("\\"))) | {rec.modality} - {""}
        study.modalities = "\\".join(sorted(modalities))[:64]
        if not study.body_part and rec.body_part:
            study.body_part = rec.body_part[:64]

        reopened = study.state != StudyState.RECEIVING
        if reopened:
            study.state = StudyState.RECEIVING
            study.state_reason = "re-opened by a late instance"
            study.force_complete_at = now + dt.timedelta(seconds=force_complete_s)
            # A job that has not started would analyse an incomplete study: the next
            # completion enqueues the full one instead.
            session.execute(
                update(Job)
                .where(Job.study_id == study.id, Job.state == JobState.QUEUED)
                .values(state=JobState.SUPERSEDED, finished_at=now)
            )
        study.last_received_at = now
        study.complete_after = complete_after
        return IngestOutcome(study.id, new_instance, changed, reopened, complete_after)


def study_is_known(database: Database, study_uid: str) -> bool:
    with database.read() as session:
        return session.scalar(select(Study.id).where(Study.study_uid == study_uid)) is not None


def mark_state(database: Database, study_id: int, state: StudyState, reason: str = "") -> None:
    with database.session() as session:
        session.execute(
            update(Study).where(Study.id == study_id).values(state=state, state_reason=reason)
        )
