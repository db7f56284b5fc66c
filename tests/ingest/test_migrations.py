"""Alembic migrations: the same revisions build the schema on SQLite and PostgreSQL, and the
models have no change that a migration does not carry."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from ddn_node.store.engine import make_database
from ddn_node.store.migrate import current_revision, head_revision, upgrade
from ddn_node.store.models import Base, UTCDateTime

EXPRESSION_INDEXES = {
    "ix_studies_worklist_priority",
    "ix_studies_worklist_priority_unread",
    "ix_studies_worklist_by_priority",
}


def test_upgrade_is_idempotent_and_matches_models(db_url: str) -> None:
    db = make_database(db_url)
    try:
        assert current_revision(db) is None
        upgrade(db)
        upgrade(db)
        assert current_revision(db) == head_revision()
        with db.engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
            listing = (
                "SELECT indexname FROM pg_indexes WHERE tablename = 'studies'"
                if db.is_postgres
                else "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'studies'"
            )
            present = set(conn.exec_driver_sql(listing).scalars())
        # Alembic cannot compare expression indexes (it reports them as removed and added
        # on PostgreSQL, and skips them on SQLite): check that they exist by name instead;
        # tests/web/test_worklist_indexes.py checks that the queries use them.
        diff = [
            d
            for d in diff
            if not (d[0] in ("add_index", "remove_index") and d[1].name in EXPRESSION_INDEXES)
        ]
        assert diff == [], f"models changed without a migration: {diff}"
        assert present >= EXPRESSION_INDEXES
    finally:
        db.dispose()


def test_cli_db_upgrade(make_node, postgres_url: str) -> None:
    node = make_node(postgres_url)
    result = node.cli("db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert "database at" in result.stderr
    assert f"current={head_revision()}" in node.cli("db", "current").stdout


OLD_STUDY = {"read_status": "unread", "state": "analysed", "generation": 1}


def _row_for(table: sa.Table, **values: object) -> dict[str, object]:
    """A row with a plain value in every NOT NULL column, then ``values``."""
    plain = {sa.Integer: 0, sa.Float: 0.0, sa.JSON: None}
    row: dict[str, object] = {}
    for column in table.columns:
        if column.primary_key or column.nullable:
            continue
        if isinstance(column.type, sa.DateTime | UTCDateTime):
            row[column.name] = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.UTC)
        else:
            row[column.name] = next((v for t, v in plain.items() if isinstance(column.type, t)), "")
    return row | values


# The worklist's expression indexes cannot be reflected; the columns are what matter here.
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection")
def test_upgrade_converts_aged_rows_and_completes_old_results(db_url: str) -> None:
    """A hospital's database from before the ageing fact was data: the sentence ageing
    appended to the reason becomes ``ageing_steps``, and results written then count as
    complete (they were), so nothing waits for pictures that were drawn long ago."""
    db = make_database(db_url)
    try:
        upgrade(db, "066efc19da9c")
        meta = sa.MetaData()
        meta.reflect(db.engine, only=["studies", "jobs", "results"])
        studies, jobs, results = (meta.tables[t] for t in ("studies", "jobs", "results"))
        aged_reason = "score 40 % (raised by ageing after 240 min waiting)"
        with db.engine.begin() as conn:
            conn.execute(
                studies.insert(),
                [
                    _row_for(
                        studies,
                        **OLD_STUDY,
                        id=1,
                        study_uid="1.2.3.1",
                        priority="HIGH",
                        priority_rank=0,
                        priority_reason=aged_reason,
                    ),
                    _row_for(
                        studies,
                        **OLD_STUDY,
                        id=2,
                        study_uid="1.2.3.2",
                        priority="STAT",
                        priority_rank=0,
                        priority_reason="score 95 %",
                    ),
                ],
            )
            conn.execute(
                jobs.insert(), [_row_for(jobs, id=1, study_id=1, generation=1, state="done")]
            )
            conn.execute(
                results.insert(),
                [
                    _row_for(
                        results,
                        id=1,
                        study_id=1,
                        job_id=1,
                        generation=1,
                        probabilities={},
                        positive=[],
                        priority="HIGH",
                        timings_ms={},
                    )
                ],
            )
        upgrade(db)
        with db.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT id, ageing_steps, priority_reason FROM studies ORDER BY id")
            ).all()
            completed = conn.execute(sa.text("SELECT completed_at FROM results")).scalar()
        assert [tuple(r) for r in rows] == [(1, 1, "score 40 %"), (2, 0, "score 95 %")]
        assert completed is not None
    finally:
        db.dispose()
