"""What a worklist row says: ageing, failures, names, times (pipeline.worklist, no HTTP)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import update
from worklist_factory import add_study, analyse

from ddn_node.config import TriageSettings
from ddn_node.pipeline.triage import apply_ageing
from ddn_node.pipeline.worklist import (
    WorklistQuery,
    format_duration,
    format_person_name,
    format_study_datetime,
    get_worklist,
)
from ddn_node.store.engine import Database
from ddn_node.store.models import Study


def test_ageing_failures_and_explanations(sqlite_database: Database) -> None:
    db = sqlite_database
    h = dt.timedelta(hours=1)
    high = add_study(db, received_ago=0.5 * h)
    old_routine = add_study(db, received_ago=5 * h)
    new_routine = add_study(db, received_ago=0.2 * h)
    failed = add_study(db, received_ago=0.1 * h)
    analyse(db, high, {"Mass": 0.7})
    analyse(db, old_routine, {"Mass": 0.1})
    analyse(db, new_routine, {"Mass": 0.3})
    analyse(db, failed, {"Pneumothorax": 0.9})  # STAT at first...
    with db.session() as session:  # ...then a re-analysis fails, as the worker records it
        session.execute(
            update(Study)
            .where(Study.study_uid == failed)
            .values(
                state="failed",
                state_reason="no image could be decoded",
                priority="NOT_ANALYSED",
                priority_reason="analysis failed: no image could be decoded",
            )
        )
    assert apply_ageing(db, TriageSettings(ageing_minutes_per_step=60)) == 1

    rows = {r.study_uid: r for r in get_worklist(db, WorklistQuery()).rows}
    order = [r.study_uid for r in get_worklist(db, WorklistQuery()).rows]
    assert order == [failed, high, old_routine, new_routine]
    aged = rows[old_routine]
    assert aged.aged and aged.rank == 1 and aged.priority.value == "ROUTINE"
    assert "raised by ageing" in aged.why
    stale = rows[failed]
    assert not stale.aged and stale.priority.value == "NOT_ANALYSED" and stale.rank == 0
    assert stale.why == (
        "NOT_ANALYSED: analysis failed: no image could be decoded (ranked STAT by an earlier decision)"
    )
    assert stale.status_text == "analysed earlier; now analysis failed (no image could be decoded)"
    assert not rows[new_routine].aged and rows[new_routine].why.startswith(
        "ROUTINE: abnormality score 0.30"
    )


def test_formatting() -> None:
    assert format_person_name("DOE^JANE^Q^DR^") == "DOE, JANE Q DR"
    assert format_person_name("Yamada^Tarou=山田^太郎") == "Yamada, Tarou"
    assert format_person_name("^^^") == "^^^"
    assert format_person_name("") == ""
    assert format_study_datetime("20261127", "101530.123") == "2026-11-27 10:15"
    assert format_study_datetime("2026", "") is None
    assert format_duration(30) == "<1 min"
    assert format_duration(3 * 3600 + 5 * 60) == "3 h 05 min"
    assert format_duration(3 * 86400 + 7200) == "3 d 2 h"
    assert format_duration(None) == ""
