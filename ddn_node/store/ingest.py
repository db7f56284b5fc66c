"""Recording a received instance: study / series / instance rows, duplicates, re-opening.

Called from the DIMSE thread after the file is durably in the spool; the commit of this
transaction is what allows the SCP to answer 0x0000.

Identity is checked before anything is written: a known SOP Instance UID in another study
or series, a known Series UID in another study, or a known study arriving with another
Patient ID raises :class:`IdentityConflict` and changes nothing. Re-pointing the existing
row (what a bare UID lookup does) would show one patient's image in another's study and
analyse it under the wrong name; PACS patient corrections and weak UID generators make
this happen without any attacker.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from functools import cache
from typing import Any

from sqlalchemy import Connection, bindparam, exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ddn_node.store import lifecycle
from ddn_node.store.audit import AuditEventName, add_audit
from ddn_node.store.engine import Database
from ddn_node.store.models import Instance, InstanceVersion, Series, Study, UTCDateTime, utcnow
from ddn_node.vocabulary import ConflictKind, InstanceOrigin, StudyState


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
    origin: str = InstanceOrigin.SOURCE
    # What routing rules match on (pipeline/routing.py).
    image_type: str = ""
    station_name: str = ""  # also the study's, for the analysis queue's urgency rules
    institution_name: str = ""
    frames: int = 1
    # Where the study comes from and how urgent its order is (the analysis queue's order).
    order_priority: str = ""
    department: str = ""


class IdentityConflict(Exception):
    """The instance contradicts a study, series or instance the node already holds."""

    def __init__(self, kind: ConflictKind, existing_study_uid: str, existing_series_uid: str = ""):
        super().__init__(kind.value)
        self.kind = kind
        self.existing_study_uid = existing_study_uid
        self.existing_series_uid = existing_series_uid


@dataclass(frozen=True)
class IngestOutcome:
    study_id: int
    new_instance: bool
    changed: bool  # a duplicate SOP Instance UID with different content
    reopened: bool  # the study had completed and now receives again
    complete_after: dt.datetime
    touched: bool = True  # the study's quiet period starts again (a source image arrived)
    # The file the instance row names now: for an identical re-send, the earlier one (the
    # copy just received is then not needed).
    path: str = ""


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
        if (
            isinstance(value, str)
            and length is not None
            and len(value) > length
            and not key.endswith("uid")
        ):
            value = value[:length]
        out[key] = value
    return out


def _insert_ignore(session: Session, model: type, values: dict[str, object], key: str) -> None:
    dialect = session.get_bind().dialect.name
    stmt_mod = postgresql if dialect == "postgresql" else sqlite
    stmt = (
        stmt_mod.insert(model)
        .values(**_fit(model, values))
        .on_conflict_do_nothing(index_elements=[key])
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
    "order_priority",
    "station_name",
    "department",
)


SeriesKey = tuple[str, str, str]  # (Study UID, Series UID, Patient ID) as sent


def series_key(rec: InstanceRecord) -> SeriesKey:
    return (rec.study_uid, rec.series_uid, rec.patient_id)


class KnownSeries:
    """The (study id, series id) of series this process recently stored into.

    Lets the common case - one more new instance of a series we have, in a study still
    receiving - take a two-statement fast path instead of the full upsert. A stale entry
    (the study was purged meanwhile) only costs a fall back to the full path. Keyed by
    study, series and patient as sent, all checked by the full path that made the entry:
    an instance naming the same series under another study or patient takes the full path
    and its identity checks.
    """

    def __init__(self, capacity: int = 4096):
        self._ids: OrderedDict[SeriesKey, tuple[int, int]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, key: SeriesKey) -> tuple[int, int] | None:
        with self._lock:
            ids = self._ids.get(key)
            if ids is not None:
                self._ids.move_to_end(key)
            return ids

    def put(self, key: SeriesKey, study_id: int, series_id: int) -> None:
        with self._lock:
            self._ids[key] = (study_id, series_id)
            self._ids.move_to_end(key)
            while len(self._ids) > self._capacity:
                self._ids.popitem(last=False)

    def forget(self, key: SeriesKey) -> None:
        with self._lock:
            self._ids.pop(key, None)


def _instance_values(
    rec: InstanceRecord, study_id: int, series_id: int, now: dt.datetime
) -> dict[str, object]:
    values = {f.name: getattr(rec, f.name) for f in fields(rec)}
    values.update(series_id=series_id, study_id=study_id, received_at=now)
    return _fit(Instance, values)


_INSTANCE_COLUMNS = [c.name for c in Instance.__table__.columns if c.name != "id"]


@cache
def _fast_statements(dialect_name: str) -> tuple[Any, Any]:
    """The fast path's two statements, built once with bind parameters.

    Built per call they cost more Python time than SQLite takes to run them.
    """
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    insert_instance = (
        dialect.insert(Instance)
        .values({name: bindparam(name) for name in _INSTANCE_COLUMNS})
        .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        .returning(Instance.id)
    )
    # The cached ids must still name this series of this study (ids of purged rows could
    # in principle be reused): checked in the same statement that touches the study.
    same_series = exists().where(
        Series.id == bindparam("series_id"),
        Series.study_id == bindparam("study_id"),
        Series.series_uid == bindparam("series_uid"),
    )
    touch_study = (
        update(Study)
        .where(Study.id == bindparam("study_id"), Study.state == StudyState.RECEIVING, same_series)
        .values(
            num_instances=Study.num_instances + 1,
            last_received_at=bindparam("now", type_=UTCDateTime()),
            complete_after=bindparam("complete_after", type_=UTCDateTime()),
        )
        .returning(Study.id)
    )
    return insert_instance, touch_study


def _fast_path(
    connection: Connection,
    rec: InstanceRecord,
    ids: tuple[int, int],
    now: dt.datetime,
    complete_after: dt.datetime,
) -> IngestOutcome | None:
    """A new instance of a known series in a study still receiving; None if not that case.

    On a bare connection, not a Session: its two core statements need none of the ORM's
    unit of work, whose set-up and commit cost more Python time than the statements."""
    study_id, series_id = ids
    insert_instance, touch_study = _fast_statements(connection.dialect.name)
    values = _instance_values(rec, study_id, series_id, now)
    row = {name: values.get(name) for name in _INSTANCE_COLUMNS}
    inserted = connection.execute(insert_instance, row).scalar()
    if inserted is None:
        return None  # a duplicate: the full path compares content
    touched = connection.execute(
        touch_study,
        {
            "study_id": study_id,
            "series_id": series_id,
            "series_uid": rec.series_uid,
            "now": now,
            "complete_after": complete_after,
        },
    ).scalar()
    if touched is None:
        return None  # completed meanwhile: the full path re-opens it
    return IngestOutcome(study_id, True, False, False, complete_after, path=rec.path)


def record_instance(
    database: Database,
    rec: InstanceRecord,
    *,
    quiet_period_s: float,
    force_complete_s: float,
    now: dt.datetime | None = None,
    known: KnownSeries | None = None,
    may_reopen: bool = True,
) -> IngestOutcome:
    """Record one stored instance. A source image restarts its study's quiet period; one
    that ``may_reopen`` (a routing rule selects it) re-opens a completed study. A result
    (``rec.origin`` own or other) changes neither: it never starts an analysis.

    Raises :class:`IdentityConflict` (nothing written) when the instance contradicts what
    is held; a re-send with other content keeps the earlier version's file and row."""
    now = now or utcnow()
    complete_after = now + dt.timedelta(seconds=quiet_period_s)
    source = rec.origin == InstanceOrigin.SOURCE
    ids = known.get(series_key(rec)) if known is not None and source else None
    if ids is not None:
        try:
            with database.transaction() as (connection, transaction):
                outcome = _fast_path(connection, rec, ids, now, complete_after)
                if outcome is None:
                    transaction.rollback()
                else:
                    return outcome
        except IntegrityError:
            assert known is not None
            known.forget(series_key(rec))
    full = _full_path(
        database, rec, now, complete_after, force_complete_s, may_reopen=source and may_reopen
    )
    if known is not None:
        known.put(series_key(rec), full.study_id, full.series_id)
    return full.outcome


def _check_identity(
    session: Session, rec: InstanceRecord, study: Study, series: Series, existing: Instance | None
) -> None:
    """Raise IdentityConflict when the study has another patient, or the series or the
    known instance lives elsewhere. (An empty Patient ID on either side is no evidence.)"""
    if study.patient_id and rec.patient_id and study.patient_id != rec.patient_id:
        raise IdentityConflict(ConflictKind.STUDY_OTHER_PATIENT, study.study_uid)
    if series.study_id != study.id:
        raise IdentityConflict(ConflictKind.SERIES_OTHER_STUDY, _study_uid(session, series))
    if existing is not None and existing.study_id != study.id:
        raise IdentityConflict(
            ConflictKind.INSTANCE_OTHER_STUDY,
            _study_uid(session, existing.series),
            existing.series.series_uid,
        )
    if existing is not None and existing.series_id != series.id:
        raise IdentityConflict(
            ConflictKind.INSTANCE_OTHER_SERIES, study.study_uid, existing.series.series_uid
        )


def _study_uid(session: Session, series: Series) -> str:
    return session.scalars(select(Study.study_uid).where(Study.id == series.study_id)).one()


def _keep_version(
    session: Session, existing: Instance, rec: InstanceRecord, now: dt.datetime
) -> None:
    """Record the content ``existing`` had, point it at the new file, and audit the change."""
    session.add(
        InstanceVersion(
            instance_id=existing.id,
            path=existing.path,
            size=existing.size,
            sha256=existing.sha256,
            calling_ae=existing.calling_ae,
            received_at=existing.received_at,
            replaced_at=now,
        )
    )
    add_audit(
        session,
        AuditEventName.INSTANCE_REPLACED,
        actor=rec.calling_ae,
        study_uid=rec.study_uid,
        sop_instance_uid=rec.sop_instance_uid,
        previous_sha256=existing.sha256,
        sha256=rec.sha256,
    )
    existing.sha256, existing.size, existing.path = rec.sha256, rec.size, rec.path
    existing.calling_ae = rec.calling_ae[:16]
    existing.received_at = now


@dataclass(frozen=True)
class _Full:
    outcome: IngestOutcome
    study_id: int
    series_id: int


def warm_up(database: Database) -> None:
    """Run both paths once on a made-up instance, and roll back: SQLAlchemy compiles each
    statement on its first use in a process (~0.1 s for the full path), which the first
    instance after a start would otherwise wait for, once per SCP process."""
    now = utcnow()
    uid = f"2.25.{uuid.uuid4().int}"  # no instance the node holds
    rec = InstanceRecord(
        study_uid=uid,
        series_uid=f"{uid}.1",
        sop_instance_uid=f"{uid}.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path="",
        size=0,
        sha256="",
    )
    with database.rolled_back() as session:
        full = _full_in(session, rec, now, now, 0.0, may_reopen=False)
        second = replace(rec, sop_instance_uid=f"{uid}.1.2")
        _fast_path(session.connection(), second, (full.study_id, full.series_id), now, now)


def _full_path(
    database: Database,
    rec: InstanceRecord,
    now: dt.datetime,
    complete_after: dt.datetime,
    force_complete_s: float,
    *,
    may_reopen: bool,
) -> _Full:
    with database.session() as session:
        return _full_in(session, rec, now, complete_after, force_complete_s, may_reopen=may_reopen)


def _full_in(
    session: Session,
    rec: InstanceRecord,
    now: dt.datetime,
    complete_after: dt.datetime,
    force_complete_s: float,
    *,
    may_reopen: bool,
) -> _Full:
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
    _check_identity(session, rec, study, series, existing)
    new_instance = existing is None
    changed = False
    if existing is None:
        session.add(Instance(**_instance_values(rec, study.id, series.id, now)))
        study.num_instances += 1
    elif existing.sha256 != rec.sha256:
        # Same UID, new content (a corrected image): analyse the new bytes, and keep
        # the earlier ones (their file stays where it is) for whoever asks what was
        # analysed before.
        changed = True
        _keep_version(session, existing, rec, now)
    if not (new_instance or changed):
        # An idempotent re-send: nothing about the study changes.
        assert existing is not None
        return _Full(
            IngestOutcome(
                study.id,
                False,
                False,
                False,
                study.complete_after or now,
                touched=False,
                path=existing.path,
            ),
            study.id,
            series.id,
        )

    # Fill attributes an earlier instance left empty (the first one may be a KO or PR).
    for attr in _STUDY_ATTRS:
        if not getattr(study, attr) and getattr(rec, attr):
            setattr(study, attr, _fit(Study, {attr: getattr(rec, attr)})[attr])
    modalities = set(filter(None, study.modalities.split("\\"))) | {rec.modality} - {""}
    study.modalities = "\\".join(sorted(modalities))[:64]
    if not study.body_part and rec.body_part:
        study.body_part = rec.body_part[:64]

    reopened = study.state != StudyState.RECEIVING and may_reopen
    if reopened:
        lifecycle.reopen(session, study, now, force_complete_s)
    touched = study.state == StudyState.RECEIVING and rec.origin == InstanceOrigin.SOURCE
    if touched:
        study.last_received_at = now
        study.complete_after = complete_after
    return _Full(
        IngestOutcome(
            study.id,
            new_instance,
            changed,
            reopened,
            study.complete_after or complete_after,
            touched,
            rec.path,
        ),
        study.id,
        series.id,
    )
