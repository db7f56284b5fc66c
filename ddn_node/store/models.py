"""The database schema (SQLAlchemy 2.0 ORM).

Every arrow of the data flow in DESIGN.md is a state change in one of these tables, so a
restart resumes exactly where it stopped. The worklist reads only ``studies`` (one query,
no file access): the columns a radiologist sees are copied there at ingest and at analysis.

Changing a table here means writing an Alembic migration in ``store/migrations/versions``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.elements import Grouping
from sqlalchemy.types import TypeDecorator

from ddn_node.store.ordering import effective_priority, effective_rank, not_read, score_key
from ddn_node.vocabulary import (
    URGENCY_RANK,
    DeliveryState,
    InstanceOrigin,
    JobState,
    Priority,
    ReadStatus,
    StudyState,
    Urgency,
    Verdict,
)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# PS3.5 9.1 limits UIDs to 64 characters, but real senders exceed it now and then; the
# columns hold up to 128 so such instances are kept exactly, and the SCP refuses longer ones.
UID_LEN = 128


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC timestamps on both SQLite (which stores naive) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# Row ids appear in logs, URLs and caches: SQLite must never reuse a deleted one.
_SQLITE_ARGS: dict[str, Any] = {"sqlite_autoincrement": True}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)

    # Any: subclasses give a tuple of constraints ending with this dict (SQLAlchemy's form).
    __table_args__: Any = _SQLITE_ARGS


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    dicom_study_id: Mapped[str] = mapped_column(String(16), default="")  # (0020,0010)
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(256), default="")
    referring_physician: Mapped[str] = mapped_column(String(324), default="")
    specific_character_set: Mapped[str] = mapped_column(String(128), default="")
    modalities: Mapped[str] = mapped_column(String(64), default="")  # backslash-joined, sorted
    body_part: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    # What decides how soon the study is analysed (pipeline/urgency.py), from its first
    # instance that says: the order's priority as written (Requested Procedure Priority or
    # Scheduled Procedure Step Priority), Station Name, Institutional Department Name.
    order_priority: Mapped[str] = mapped_column(String(16), default="", server_default="")
    station_name: Mapped[str] = mapped_column(String(16), default="", server_default="")
    department: Mapped[str] = mapped_column(String(64), default="", server_default="")

    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    generation: Mapped[int] = mapped_column(Integer, default=0)  # completions so far
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    complete_after: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    force_complete_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    analysed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)

    # Triage, denormalised for the one-query worklist.
    abnormality_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    priority: Mapped[str] = mapped_column(String(16), default=Priority.NOT_ANALYSED)
    priority_rank: Mapped[int] = mapped_column(Integer, default=2)  # 0 = STAT ... 3 = not analysed
    priority_reason: Mapped[str] = mapped_column(Text, default="")
    priority_override: Mapped[str | None] = mapped_column(String(16), nullable=True)
    top_findings: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    model_version: Mapped[str] = mapped_column(String(128), default="")
    read_status: Mapped[str] = mapped_column(String(16), default=ReadStatus.UNREAD)
    # Where the latest results went, for the worklist: "pacs: SR, SC sent; PM refused".
    delivery_summary: Mapped[str] = mapped_column(Text, default="", server_default="")
    # Ranks that ageing raised the study above its triage band (0: none); set by
    # store/lifecycle.py, reset by every new triage decision.
    ageing_steps: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete")

    __table_args__ = (
        Index("ix_studies_state_complete_after", "state", "complete_after"),
        Index("ix_studies_state_force_complete_at", "state", "force_complete_at"),
        Index("ix_studies_worklist", "read_status", "priority_rank", "abnormality_score"),
        Index("ix_studies_first_received_at", "first_received_at"),
        # The worklist's page query and its count use two equivalent predicates on it.
        CheckConstraint(
            "read_status IN (" + ", ".join(f"'{v.value}'" for v in ReadStatus) + ")",
            name="ck_studies_read_status",
        ),
        _SQLITE_ARGS,
    )


def _worklist_indexes(table: Any) -> None:
    """The indexes behind the worklist's orders and filters (expressions: store/ordering.py).

    Two are partial (unread rows only), for the default view: the list walks a small
    index and stops after one page, however many studies were read. PostgreSQL wants the
    CASE of an expression index in its own parentheses; both databases compare parsed
    expressions, so the query's unparenthesised CASE still matches.
    """
    rank, score, unread, c = (
        Grouping(effective_rank(table)),
        score_key(table),
        not_read(table),
        table.c,
    )
    Index("ix_studies_worklist_priority", rank, score.desc(), c.first_received_at, c.id)
    Index(
        "ix_studies_worklist_priority_unread",
        rank,
        score.desc(),
        c.first_received_at,
        c.id,
        sqlite_where=unread,
        postgresql_where=unread,
    )
    Index(
        "ix_studies_worklist_by_priority",
        effective_priority(table),
        rank,
        score.desc(),
        c.first_received_at,
        c.id,
    )
    Index(
        "ix_studies_worklist_arrival_unread",
        c.first_received_at,
        c.id,
        sqlite_where=unread,
        postgresql_where=unread,
    )


_worklist_indexes(Study.__table__)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[str] = mapped_column(String(12), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LEN))
    instance_number: Mapped[str] = mapped_column(String(12), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    image_laterality: Mapped[str] = mapped_column(String(4), default="")
    photometric: Mapped[str] = mapped_column(String(16), default="")
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    # What routing selects on (pipeline/routing.py): the Image Type (a localiser or a
    # secondary image is not scored), the equipment, and how many frames it holds.
    image_type: Mapped[str] = mapped_column(String(128), default="", server_default="")
    station_name: Mapped[str] = mapped_column(String(16), default="", server_default="")
    institution_name: Mapped[str] = mapped_column(String(64), default="", server_default="")
    frames: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # An acquisition, or a result (the node's own or another's): only sources are routed.
    origin: Mapped[str] = mapped_column(
        String(8), default=InstanceOrigin.SOURCE, server_default="source"
    )

    series: Mapped[Series] = relationship(back_populates="instances")


class InstanceVersion(Base):
    """An instance's earlier content, kept when a re-send under the same UID changed it.

    The file stays where it was; the instance row points at the new one. Deleted with the
    study (rows by cascade, files with the study's folder).
    """

    __tablename__ = "instance_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), index=True
    )
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    replaced_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class IdentityConflict(Base):
    """An instance refused because its identity contradicts what the node already holds.

    A known SOP Instance UID in another study or series, a known Series UID in another
    study, or a study's patient changing: the node never re-points what it has. The bytes
    are kept in the spool's ``quarantine/`` for the administrator; no patient identifiers
    are copied here (the file has them, the existing study's page shows its own).
    """

    __tablename__ = "identity_conflicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN), default="")
    study_uid: Mapped[str] = mapped_column(String(UID_LEN))  # as sent
    series_uid: Mapped[str] = mapped_column(String(UID_LEN))  # as sent
    existing_study_uid: Mapped[str] = mapped_column(String(UID_LEN), default="")
    existing_series_uid: Mapped[str] = mapped_column(String(UID_LEN), default="")
    path: Mapped[str] = mapped_column(Text, default="")  # relative to the spool; "" = discarded
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    discarded_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    discarded_by: Mapped[str] = mapped_column(String(128), default="")


class Job(Base):
    """An analysis of one study generation. Unique per (study, generation): exactly once."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The route decided at completion: the routing rule's name and the instances it
    # selected, so the worker analyses exactly what completion routed.
    rule: Mapped[str] = mapped_column(String(128), default="", server_default="")
    instance_ids: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    # The queue's class (URGENCY_RANK: 0 = STAT is claimed first), decided at completion;
    # first in, first out within a class.
    urgency: Mapped[int] = mapped_column(
        Integer, default=URGENCY_RANK[Urgency.ROUTINE], server_default="2"
    )

    __table_args__ = (
        UniqueConstraint("study_id", "generation", name="uq_jobs_study_generation"),
        Index("ix_jobs_claim", "state", "urgency", "not_before"),
        _SQLITE_ARGS,
    )


class Result(Base):
    """What the model said about one study generation.

    Written when the report (SR) is queued, before the heat maps are drawn: the SR's
    identity and the thresholds it applied are facts from then on. ``completed_at`` is set
    once the heat-map objects are recorded too.
    """

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    generation: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    head: Mapped[str] = mapped_column(String(64))
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)  # study level, per label
    positive: Mapped[list[str]] = mapped_column(JSON)
    abnormality_score: Mapped[float] = mapped_column(Float)
    priority: Mapped[str] = mapped_column(String(16))
    timings_ms: Mapped[dict[str, float]] = mapped_column(JSON)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN), nullable=True)
    sr_series_uid: Mapped[str | None] = mapped_column(String(UID_LEN), nullable=True)
    sr_sop_class_uid: Mapped[str | None] = mapped_column(String(UID_LEN), nullable=True)
    sr_path: Mapped[str | None] = mapped_column(Text, nullable=True)  # relative to the spool
    # label -> the operating point applied
    thresholds: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)
    # label -> why a reported finding has no heat map / what to know of one that has.
    heatmap_notes: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    heatmap_caveats: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)

    images: Mapped[list[ImageResult]] = relationship(back_populates="result", cascade="all, delete")


class ImageResult(Base):
    __tablename__ = "image_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    overlay_paths: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)  # label -> PNG

    result: Mapped[Result] = relationship(back_populates="images")


class Delivery(Base):
    """One outgoing object to one destination: pending -> sending -> sent | failed."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    result_id: Mapped[int | None] = mapped_column(
        ForeignKey("results.id", ondelete="CASCADE"), nullable=True
    )
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # a ResultKind or a MessageKind
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN))
    path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Storage Commitment: "" (not asked), or a CommitmentState; the transaction it is in.
    commitment: Mapped[str] = mapped_column(String(16), default="", server_default="")
    commitment_uid: Mapped[str | None] = mapped_column(String(UID_LEN), nullable=True, index=True)
    committed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="uq_deliveries_dest_sop"),
        Index("ix_deliveries_claim", "state", "not_before"),
        _SQLITE_ARGS,
    )


class AuditEvent(Base):
    """Who did what, for the hospital's audit (PS3.15 A.5 style events)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="success")
    actor: Mapped[str] = mapped_column(String(128), default="")  # AE title or user name
    host: Mapped[str] = mapped_column(String(64), default="")
    study_uid: Mapped[str] = mapped_column(String(UID_LEN), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Set once the event went out to the audit repository (syslog), when one is configured.
    exported_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_audit_events_unexported", "exported_at", "id"), _SQLITE_ARGS)


class WorklistEvent(Base):
    """A radiologist's change to a study's status or priority."""

    __tablename__ = "worklist_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    user: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))  # opened / read / unread / override
    value: Mapped[str] = mapped_column(String(32), default="")


class WebSession(Base):
    """A login session of the web UI, so that ending it holds in every process of the node
    and across restarts (a signed cookie alone stays valid until it expires).

    The cookie carries the session id; only its sha256 is stored, so a copy of the
    database opens no session. Rows past ``expires_at`` are deleted at the next login.
    """

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sid_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user: Mapped[str] = mapped_column(String(128), index=True)
    host: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_by: Mapped[str] = mapped_column(String(128), default="")  # the user, or an admin


class Feedback(Base):
    """One radiologist's review of one result: what they said of its findings.

    Kept when retention deletes the study: nothing here cascades from ``studies``. The link
    to the result (``result_id``) is set to NULL then; what the monitor needs stays on the
    row (the model, its version and head, the priority triage decided) with no patient
    identifiers. The study is named only by ``study_ref``, the sha256 of its Study Instance
    UID (store/feedback.py): whoever holds the UID (the PACS, the SR) can find its feedback
    again, nobody can read a UID, let alone a patient, out of the table.
    """

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    user: Mapped[str] = mapped_column(String(128))
    result_id: Mapped[int | None] = mapped_column(
        ForeignKey("results.id", ondelete="SET NULL"), nullable=True, index=True
    )
    study_ref: Mapped[str] = mapped_column(String(64), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    head: Mapped[str] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(16))  # what triage decided from the result
    note: Mapped[str] = mapped_column(Text, default="")

    findings: Mapped[list[FindingFeedback]] = relationship(
        back_populates="feedback", cascade="all, delete-orphan", order_by="FindingFeedback.id"
    )


class FindingFeedback(Base):
    """The verdict on one label of a result, with what the model said of it then."""

    __tablename__ = "feedback_findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feedback_id: Mapped[int] = mapped_column(
        ForeignKey("feedback.id", ondelete="CASCADE"), index=True
    )
    label: Mapped[str] = mapped_column(String(64))
    model_present: Mapped[bool] = mapped_column(Boolean)  # probability >= threshold
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    verdict: Mapped[str] = mapped_column(String(16))

    feedback: Mapped[Feedback] = relationship(back_populates="findings")

    __table_args__ = (
        CheckConstraint(
            "verdict IN (" + ", ".join(f"'{v.value}'" for v in Verdict) + ")",
            name="ck_feedback_findings_verdict",
        ),
        _SQLITE_ARGS,
    )


class DriftObservation(Base):
    """What one analysed image looked like to the drift monitor (``pipeline/drift.py``).

    A handful of numbers per scored image, no identifiers at all (no study, no UID): the
    monitor compares their distribution over a window with the model's validation set, so
    nothing here cascades from ``studies`` and retention leaves it alone.
    """

    __tablename__ = "drift_observations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    head: Mapped[str] = mapped_column(String(64))
    intensity_mean: Mapped[float] = mapped_column(Float)
    intensity_std: Mapped[float] = mapped_column(Float)
    size: Mapped[int] = mapped_column(Integer)  # the long side in pixels (Rows, Columns)
    manufacturer: Mapped[str] = mapped_column(String(64), default="")
    view: Mapped[str] = mapped_column(String(16), default="")
    score: Mapped[float] = mapped_column(Float)  # the image's abnormality score
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)

    __table_args__ = (
        # The window: the latest rows of one model version and head.
        Index("ix_drift_observations_model", "model_name", "model_version", "head", "id"),
        _SQLITE_ARGS,
    )


class DriftState(Base):
    """The latest drift figures of one feature of one model version and head, and whether
    it is in alarm: the metrics and the admin page read these, the alarm's audit event is
    written when ``alarmed`` turns true."""

    __tablename__ = "drift_states"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    head: Mapped[str] = mapped_column(String(64))
    feature: Mapped[str] = mapped_column(String(80))
    n: Mapped[int] = mapped_column(Integer)  # images in the window
    psi: Mapped[float] = mapped_column(Float)
    ks: Mapped[float | None] = mapped_column(Float, nullable=True)  # numeric features only
    alarmed: Mapped[bool] = mapped_column(Boolean, default=False)
    alarmed_since: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # {"bins": [names], "reference": [shares], "current": [shares]} for the page's plots.
    histogram: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (
        UniqueConstraint(
            "model_name", "model_version", "head", "feature", name="uq_drift_states_feature"
        ),
        _SQLITE_ARGS,
    )


class ModelAssignment(Base):
    """Which model artifact a routing rule runs live, and which candidate shadows it.

    The config's ``[[routing]] model`` is where a rule starts; a promotion writes the
    candidate here, and every worker reads this row when it starts a job, so a promotion
    takes effect at the next study without restarting any process (``store/assignments.py``).
    """

    __tablename__ = "model_assignments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule: Mapped[str] = mapped_column(String(64), unique=True)
    # None: the rule's configured model is live.
    live_model: Mapped[str | None] = mapped_column(Text, nullable=True)
    shadow_model: Mapped[str | None] = mapped_column(Text, nullable=True)
    # What was live before the last promotion: what a rollback restores (None: the config's).
    previous_model: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(128), default="")

    __table_args__ = (_SQLITE_ARGS,)


class ShadowResult(Base):
    """What a candidate model said of one study generation: stored, never sent.

    Like feedback, named only by ``study_ref`` (the sha256 of the Study Instance UID,
    store/feedback.py) and kept when retention deletes the study, so ``ddn-node monitor``
    can go on comparing the candidate with the live model on the same reviewed studies.
    """

    __tablename__ = "shadow_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    study_ref: Mapped[str] = mapped_column(String(64), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    rule: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    head: Mapped[str] = mapped_column(String(64))
    # The live model of the same analysis, for the comparison's pairs.
    live_model_name: Mapped[str] = mapped_column(String(128))
    live_model_version: Mapped[str] = mapped_column(String(128))
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)  # study level, per label
    thresholds: Mapped[dict[str, float]] = mapped_column(JSON)  # the candidate's own
    positive: Mapped[list[str]] = mapped_column(JSON)
    abnormality_score: Mapped[float] = mapped_column(Float)
    priority: Mapped[str] = mapped_column(String(16))  # what triage would have decided
    model_ms: Mapped[float] = mapped_column(Float, default=0.0)

    __table_args__ = (
        UniqueConstraint(
            "study_ref",
            "generation",
            "model_name",
            "model_version",
            "head",
            name="uq_shadow_results_case",
        ),
        _SQLITE_ARGS,
    )
