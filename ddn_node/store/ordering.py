"""The worklist's ordering expressions, shared by its query and its indexes.

SQLite uses an expression index only when the query repeats the indexed expression
exactly, so both are built here, from inline literals (never bound parameters). The query
lives in ``pipeline/worklist.py``; the indexes are declared in ``store/models.py``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, case, func, literal_column

from ddn_node.vocabulary import RANK, Priority, ReadStatus


def lit(value: int | float | str) -> ColumnElement[Any]:
    """An inline SQL literal."""
    if isinstance(value, str):
        return literal_column("'" + value.replace("'", "''") + "'")
    return literal_column(repr(value))


def effective_rank(table: Any) -> ColumnElement[int]:
    """The rank the list sorts by: a manual override wins over triage and ageing."""
    c = table.c
    return case(
        (c.priority_override.is_(None), c.priority_rank),
        (c.priority_override == lit(Priority.STAT.value), lit(RANK[Priority.STAT])),
        (c.priority_override == lit(Priority.HIGH.value), lit(RANK[Priority.HIGH])),
        else_=lit(RANK[Priority.ROUTINE]),
    )


def score_key(table: Any) -> ColumnElement[float]:
    # Scores are probabilities in [0, 1]; -1 puts "not analysed yet" last in its band on
    # both SQLite (NULLs sort first) and PostgreSQL (NULLs sort last), without NULLS LAST,
    # which SQLite cannot put in an index.
    return func.coalesce(table.c.abnormality_score, lit(-1.0))


def not_read(table: Any) -> ColumnElement[bool]:
    return table.c.read_status != lit(ReadStatus.READ.value)


def effective_priority(table: Any) -> ColumnElement[str]:
    return func.coalesce(table.c.priority_override, table.c.priority)
