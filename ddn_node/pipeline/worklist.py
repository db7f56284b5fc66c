"""The worklist: the one query behind the web page, the JSON API and ``ddn-node worklist``.

Everything a radiologist sees in the list is denormalised on ``studies`` (see
store/models.py), so a page of the worklist is one SQL query for its rows plus one count,
with no per-row query and no file access, whatever the number of studies.

Order
-----
``priority`` (the default): effective rank (a manual override wins over triage and
ageing), then abnormality score, highest first, with not-analysed studies (no score) at
the end of their band, then arrival (oldest first), then the row id so that the order is
total and pages never overlap. ``arrival``: first instance received, oldest first; this is
the original order the node keeps recoverable.

The ordering expressions are built from literals (never bound parameters) so that they are
textually the same as in the indexes declared in store/models.py; SQLite only uses an
expression index when the query repeats the indexed expression exactly.

Changes a radiologist makes (opened / read / unread, priority override) go through
:func:`set_read_status` and :func:`set_priority_override`, which record a
``WorklistEvent`` and an audit row in the same transaction as the change.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from sqlalchemy import ColumnElement, Select, func, literal_column, select
from sqlalchemy.orm import Session

from ddn_node.store.audit import AuditEventName, add_audit
from ddn_node.store.engine import Database
from ddn_node.store.models import Study, WorklistEvent, utcnow
from ddn_node.store.ordering import effective_priority, effective_rank, lit, not_read, score_key
from ddn_node.vocabulary import RANK, TRIAGE_PRIORITIES, Priority, ReadStatus, StudyState, band_of

DEFAULT_LIMIT = 200
MAX_LIMIT = 1000
# Counting every study of a large archive costs more than the page itself (PostgreSQL
# counts 100,000 rows in ~10 ms); nobody needs "97,512 studies" to the unit.
COUNT_CAP = 10_000

Order = Literal["priority", "arrival"]


# -- the SQL expressions (shared with the indexes, see store/ordering.py) ----------------

STUDIES = Study.__table__
EFFECTIVE_RANK = effective_rank(STUDIES)
SCORE_KEY = score_key(STUDIES)
NOT_READ = not_read(STUDIES)
UNREAD_IN = STUDIES.c.read_status.in_([ReadStatus.UNREAD.value, ReadStatus.OPENED.value])
EFFECTIVE_PRIORITY = effective_priority(STUDIES)


def order_by(order: Order) -> list[ColumnElement[Any]]:
    c = STUDIES.c
    if order == "arrival":
        return [c.first_received_at.asc(), c.id.asc()]
    return [EFFECTIVE_RANK.asc(), SCORE_KEY.desc(), c.first_received_at.asc(), c.id.asc()]


# -- rows ---------------------------------------------------------------------------------


class WorklistQuery(BaseModel):
    """Filters and order of one worklist page."""

    model_config = ConfigDict(frozen=True)

    unread: bool = Field(default=True, description="only studies not yet marked read")
    modality: str | None = Field(default=None, max_length=16, description="e.g. CR, DX, CT")
    priority: Priority | None = Field(
        default=None, description="effective priority (override wins)"
    )
    order: Order = "priority"
    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    offset: int = Field(default=0, ge=0)


# Rows are plain dataclasses, not pydantic models: a page builds 200 of them per request
# and pydantic's construction (even model_construct) cost more than the SQL query. They are
# serialised by pydantic-core through PAGE_JSON, and FastAPI documents them the same way.


@dataclass(slots=True)
class Finding:
    label: str
    probability: float


@dataclass(slots=True)
class WorklistRow:
    """One study as the worklist shows it. Patient data is plain text: escape when rendering."""

    study_uid: str
    patient_name: Annotated[str, Field(description="DICOM PN as received, e.g. DOE^JANE")]
    patient_name_display: Annotated[str, Field(description="the name for people, e.g. 'DOE, JANE'")]
    patient_id: str
    accession_number: str
    modalities: list[str]
    study_date: str
    study_time: str
    study_datetime: Annotated[
        str | None, Field(description="'YYYY-MM-DD HH:MM' from StudyDate/StudyTime")
    ]
    study_description: str
    num_instances: int
    state: str
    state_reason: str
    analysed: Annotated[
        bool, Field(description="a result exists (perhaps of an earlier generation)")
    ]
    status_text: Annotated[
        str, Field(description="the Status column, e.g. 'not analysed: queued for analysis'")
    ]
    abnormality_score: float | None
    priority: Annotated[
        Priority, Field(description="effective priority: the override if any, else triage's")
    ]
    model_priority: Annotated[Priority, Field(description="what triage decided from the findings")]
    priority_override: Priority | None
    rank: Annotated[
        int, Field(description="effective rank used for ordering (0 = STAT), after ageing")
    ]
    aged: Annotated[bool, Field(description="ageing raised the rank above what triage decided")]
    priority_reason: str
    why: Annotated[str, Field(description="why the study is where it is in the list, for people")]
    top_findings: list[Finding]
    model_version: str
    read_status: ReadStatus
    first_received_at: dt.datetime
    analysed_at: dt.datetime | None
    waiting_s: Annotated[float | None, Field(description="seconds since arrival; null once read")]
    delivery_summary: Annotated[
        str,
        Field(
            description="where the latest results went, e.g. 'pacs: SR, SC sent (committed); PM refused'"
        ),
    ] = ""


@dataclass(slots=True)
class WorklistPage:
    rows: list[WorklistRow]
    total: Annotated[
        int,
        Field(
            description=f"rows matching the filters, all pages; counted up to {COUNT_CAP} (see total_exact)"
        ),
    ]
    total_exact: Annotated[
        bool,
        Field(description=f"false when more than {COUNT_CAP} match and total says {COUNT_CAP}"),
    ]
    query: WorklistQuery
    generated_at: dt.datetime


PAGE_JSON: TypeAdapter[WorklistPage] = TypeAdapter(WorklistPage)
ROW_JSON: TypeAdapter[WorklistRow] = TypeAdapter(WorklistRow)


def page_json(page: WorklistPage) -> bytes:
    return PAGE_JSON.dump_json(page)


def page_etag(page: WorklistPage) -> str:
    """Changes when the list does; waiting times and the generation time tick every second."""
    stable = PAGE_JSON.dump_json(
        page, exclude={"generated_at": True, "rows": {"__all__": {"waiting_s"}}}
    )
    return '"' + hashlib.sha256(stable).hexdigest()[:32] + '"'


_COLUMNS = (
    STUDIES.c.study_uid,
    STUDIES.c.patient_name,
    STUDIES.c.patient_id,
    STUDIES.c.accession_number,
    STUDIES.c.modalities,
    STUDIES.c.study_date,
    STUDIES.c.study_time,
    STUDIES.c.study_description,
    STUDIES.c.num_instances,
    STUDIES.c.state,
    STUDIES.c.state_reason,
    STUDIES.c.abnormality_score,
    STUDIES.c.priority,
    STUDIES.c.priority_rank,
    STUDIES.c.priority_override,
    STUDIES.c.priority_reason,
    STUDIES.c.top_findings,
    STUDIES.c.model_version,
    STUDIES.c.read_status,
    STUDIES.c.first_received_at,
    STUDIES.c.analysed_at,
    STUDIES.c.ageing_steps,
    STUDIES.c.delivery_summary,
    EFFECTIVE_RANK.label("effective_rank"),
)


def format_person_name(pn: str) -> str:
    """DICOM PN (family^given^middle^prefix^suffix, '=' between representations) for people."""
    first = pn.split("=", 1)[0].strip() or pn.strip()
    parts = [p.strip() for p in first.split("^")]
    family, given = ([*parts, "", ""])[:2]
    rest = " ".join(p for p in parts[2:] if p)
    name = family
    if given or rest:
        name = (
            f"{family}, {' '.join(p for p in (given, rest) if p)}"
            if family
            else " ".join(p for p in (given, rest) if p)
        )
    return name or pn


def format_study_datetime(date: str, time: str) -> str | None:
    date = date.strip()
    if len(date) != 8 or not date.isdigit():
        return None
    out = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    digits = time.strip().split(".", 1)[0]
    if len(digits) >= 4 and digits[:4].isdigit():
        out += f" {digits[:2]}:{digits[2:4]}"
    return out


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes = int(seconds // 60)
    if minutes < 1:
        return "<1 min"
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


_PRIORITIES = {p.value: p for p in Priority}
_READ_STATUSES = {r.value: r for r in ReadStatus}


def _priority(value: str | None) -> Priority | None:
    return None if value is None else _PRIORITIES.get(value)


def _findings(raw: Any) -> list[Finding]:
    out: list[Finding] = []
    if not isinstance(raw, list):
        return out
    for item in raw:
        # Written by the worker as [label, probability]; anything else is skipped, not fatal.
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], (int, float)):
            out.append(Finding(label=str(item[0]), probability=float(item[1])))
    return out


_STATE_TEXT: dict[str, str] = {
    StudyState.RECEIVING: "not analysed: receiving images",
    StudyState.QUEUED: "not analysed: queued for analysis",
    StudyState.ANALYSING: "not analysed: analysing",
    StudyState.NOT_ROUTED: "not analysed: no model for this study",
    StudyState.FAILED: "not analysed: analysis failed",
}


def _status_text(state: str, reason: str, analysed: bool) -> str:
    if state == StudyState.ANALYSED:
        # Analysed, with what is missing (heat maps not made) said.
        return f"analysed ({reason})" if reason else StudyState.ANALYSED.value
    text = _STATE_TEXT.get(state, f"not analysed: {state}")
    if analysed:
        # An earlier generation was analysed; new images re-opened the study.
        text = "analysed earlier; now " + text.removeprefix("not analysed: ")
    return f"{text} ({reason})" if reason else text


def _why(
    priority: Priority,
    model_priority: Priority,
    override: Priority | None,
    reason: str,
    rank: int,
    aged: bool,
) -> str:
    if override is not None:
        base = f"{override.value}: set by hand (manual override)"
        return base + (f"; triage said {model_priority.value}: {reason}" if reason else "")
    if model_priority == Priority.NOT_ANALYSED and not reason:
        reason = "no result yet: listed in the ROUTINE band by arrival"
    text = f"{priority.value}: {reason}" if reason else priority.value
    if aged:
        text += f" (raised by ageing to the {band_of(rank).value} band: unread for long)"
    elif rank < RANK[model_priority]:
        # Not ageing: a rank kept from an earlier decision (say, a re-analysis that failed).
        text += f" (ranked {band_of(rank).value} by an earlier decision)"
    return text


def _row(r: Any, now: dt.datetime) -> WorklistRow:
    # Unpacked by position (the order of _COLUMNS): on the list's hot path, named access to
    # 24 columns of 200 rows costs more than the SQL query.
    (
        study_uid,
        patient_name,
        patient_id,
        accession_number,
        modalities,
        study_date,
        study_time,
        study_description,
        num_instances,
        state,
        state_reason,
        score,
        priority_value,
        _rank,
        override_value,
        priority_reason,
        top_findings,
        model_version,
        read_value,
        first_received_at,
        analysed_at,
        ageing_steps,
        delivery_summary,
        effective_rank,
    ) = r
    override = _priority(override_value)
    model_priority = _priority(priority_value) or Priority.NOT_ANALYSED
    priority = override or model_priority
    rank = int(effective_rank)
    aged = override is None and bool(ageing_steps) and rank < RANK[model_priority]
    analysed = analysed_at is not None
    read_status = _READ_STATUSES.get(read_value, ReadStatus.UNREAD)
    return WorklistRow(
        study_uid=study_uid,
        patient_name=patient_name,
        patient_name_display=format_person_name(patient_name),
        patient_id=patient_id,
        accession_number=accession_number,
        modalities=[m for m in modalities.split("\\") if m],
        study_date=study_date,
        study_time=study_time,
        study_datetime=format_study_datetime(study_date, study_time),
        study_description=study_description,
        num_instances=num_instances,
        state=state,
        state_reason=state_reason,
        analysed=analysed,
        status_text=_status_text(state, state_reason, analysed),
        abnormality_score=score,
        priority=priority,
        model_priority=model_priority,
        priority_override=override,
        rank=rank,
        aged=aged,
        priority_reason=priority_reason,
        why=_why(priority, model_priority, override, priority_reason, rank, aged),
        top_findings=_findings(top_findings),
        model_version=model_version,
        read_status=read_status,
        first_received_at=first_received_at,
        analysed_at=analysed_at,
        waiting_s=None
        if read_status is ReadStatus.READ
        else max(0.0, (now - first_received_at).total_seconds()),
        delivery_summary=delivery_summary or "",
    )


def _where(query: WorklistQuery, *, for_count: bool = False) -> list[ColumnElement[bool]]:
    c = STUDIES.c
    conditions: list[ColumnElement[bool]] = []
    if query.unread:
        # The same set of rows, written for each query's index: the page walks the partial
        # index (its WHERE must be repeated verbatim), the count searches the two
        # read_status ranges of ix_studies_worklist instead of scanning every study.
        # Equivalent because read_status only ever holds a ReadStatus value.
        conditions.append(UNREAD_IN if for_count else NOT_READ)
    if query.modality:
        # ``modalities`` is backslash-joined ("CR\DX"): match a whole element. autoescape
        # escapes LIKE wildcards with '/', which also stops PostgreSQL reading '\' as escape.
        wanted = "\\" + query.modality.strip().upper() + "\\"
        conditions.append((lit("\\") + c.modalities + lit("\\")).contains(wanted, autoescape=True))
    if query.priority is not None:
        # str == column falls back to the column's __eq__: an SQL expression, not a bool.
        conditions.append(cast("ColumnElement[bool]", query.priority.value == EFFECTIVE_PRIORITY))
    return conditions


def rows_statement(query: WorklistQuery) -> Select[Any]:
    return (
        select(*_COLUMNS)
        .where(*_where(query))
        .order_by(*order_by(query.order))
        .limit(query.limit)
        .offset(query.offset)
    )


def count_statement(query: WorklistQuery, cap: int = COUNT_CAP) -> Select[Any]:
    """How many match, counting at most ``cap + 1`` (the scan stops there)."""
    matching: Select[Any] = (
        select(literal_column("1")).select_from(STUDIES).where(*_where(query, for_count=True))
    )
    return select(func.count()).select_from(matching.limit(cap + 1).subquery())


def fetch_worklist(
    session: Session, query: WorklistQuery, now: dt.datetime | None = None
) -> WorklistPage:
    """One page of the worklist: the rows in order, and how many match in all."""
    now = now or utcnow()
    rows = session.execute(rows_statement(query)).all()
    if query.offset == 0 and len(rows) < query.limit:
        total = len(rows)  # the page holds every match: no count query needed
    else:
        total = int(session.execute(count_statement(query)).scalar_one())
    exact = total <= COUNT_CAP
    return WorklistPage(
        rows=[_row(r, now) for r in rows],
        total=min(total, COUNT_CAP),
        total_exact=exact,
        query=query,
        generated_at=now,
    )


def get_worklist(
    database: Database, query: WorklistQuery, now: dt.datetime | None = None
) -> WorklistPage:
    with database.read() as session:
        return fetch_worklist(session, query, now)


def fetch_row(
    session: Session, study_uid: str, now: dt.datetime | None = None
) -> WorklistRow | None:
    r = session.execute(select(*_COLUMNS).where(STUDIES.c.study_uid == study_uid)).first()
    return None if r is None else _row(r, now or utcnow())


# -- changes by radiologists ------------------------------------------------------------


class StudyNotFound(LookupError):
    pass


def _lock_study(session: Session, study_uid: str) -> Study:
    # FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers.
    study = session.execute(
        select(Study).where(Study.study_uid == study_uid).with_for_update()
    ).scalar_one_or_none()
    if study is None:
        raise StudyNotFound(study_uid)
    return study


def _record(
    session: Session, study: Study, user: str, host: str, action: str, value: str, before: str
) -> None:
    session.add(WorklistEvent(study_id=study.id, user=user[:128], action=action, value=value))
    add_audit(
        session,
        AuditEventName.WORKLIST_CHANGED,
        actor=user,
        host=host,
        study_uid=study.study_uid,
        action=action,
        value=value,
        before=before,
    )


def set_read_status(
    database: Database, study_uid: str, status: ReadStatus, *, user: str, host: str = ""
) -> bool:
    """Mark a study opened / read / unread. Returns False when it already was (not recorded)."""
    with database.session() as session:
        study = _lock_study(session, study_uid)
        before = study.read_status
        if before == status.value:
            return False
        study.read_status = status.value
        _record(session, study, user, host, status.value, status.value, before)
    return True


def set_priority_override(
    database: Database, study_uid: str, priority: Priority | None, *, user: str, host: str = ""
) -> bool:
    """Set (or with None, clear) the manual priority. Returns False when nothing changed."""
    # "Not analysed" is a fact, not a choice a radiologist can make.
    if priority is not None and priority not in TRIAGE_PRIORITIES:
        raise ValueError(f"priority override must be one of {[p.value for p in TRIAGE_PRIORITIES]}")
    value = priority.value if priority is not None else None
    with database.session() as session:
        study = _lock_study(session, study_uid)
        before = study.priority_override or ""
        if study.priority_override == value:
            return False
        study.priority_override = value
        # value "" = override cleared: triage's priority applies again.
        _record(session, study, user, host, "override", value or "", before)
    return True


class HistoryEntry(BaseModel):
    at: dt.datetime
    user: str
    action: str
    value: str


def fetch_history(session: Session, study_id: int, limit: int = 200) -> list[HistoryEntry]:
    rows = session.execute(
        select(WorklistEvent.at, WorklistEvent.user, WorklistEvent.action, WorklistEvent.value)
        .where(WorklistEvent.study_id == study_id)
        .order_by(WorklistEvent.at.desc(), WorklistEvent.id.desc())
        .limit(limit)
    ).all()
    return [HistoryEntry(at=r.at, user=r.user, action=r.action, value=r.value) for r in rows]
