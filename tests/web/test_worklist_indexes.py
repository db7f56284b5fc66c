"""The worklist's queries use the schema's indexes (expressions that match).

SQLite only uses an expression index when the query repeats the indexed expression, and a
partial index when the query repeats its WHERE term; a harmless-looking change to either
side silently turns the list back into a sort of every study. The figures are in the
worklist bench; this test only guards the match.
"""

from __future__ import annotations

from sqlalchemy import text

from ddn_node.bench.worklist import fill
from ddn_node.pipeline.worklist import WorklistQuery, count_statement, rows_statement
from ddn_node.store.engine import Database
from ddn_node.vocabulary import Priority

VIEWS = {
    "unread by priority": (WorklistQuery(), "ix_studies_worklist_priority_unread"),
    "all by priority": (WorklistQuery(unread=False), "ix_studies_worklist_priority"),
    "unread by arrival": (WorklistQuery(order="arrival"), "ix_studies_worklist_arrival_unread"),
    "STAT in the archive": (
        WorklistQuery(unread=False, priority=Priority.STAT),
        "ix_studies_worklist_by_priority",
    ),
}


def _plan(database: Database, statement: object) -> str:
    compiled = statement.compile(database.engine, compile_kwargs={"literal_binds": True})  # type: ignore[attr-defined]
    with database.engine.connect() as conn:
        if database.is_postgres:
            # Small table: without this the planner rightly prefers a scan. The question
            # here is whether the index *can* serve the query, not whether it pays yet.
            conn.execute(text("SET enable_seqscan = off"))
            conn.execute(text("SET enable_sort = off"))
            conn.execute(text("SET enable_incremental_sort = off"))
            rows = conn.execute(text(f"EXPLAIN {compiled}")).all()
        else:
            rows = conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}")).all()
    return "\n".join(str(r[-1]) for r in rows)


def test_worklist_queries_use_their_indexes(database: Database) -> None:
    fill(database, 2000)
    for name, (query, index) in VIEWS.items():
        plan = _plan(database, rows_statement(query))
        assert index in plan, f"{name}: {plan}"
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, f"{name}: {plan}"
    # The unread count searches read_status ranges rather than scanning every study.
    plan = _plan(database, count_statement(WorklistQuery()))
    assert "ix_studies_worklist" in plan, plan
