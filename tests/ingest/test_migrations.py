"""Alembic migrations: the same revisions build the schema on SQLite and PostgreSQL, and the
models have no change that a migration does not carry."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from ddn_node.store.engine import make_database
from ddn_node.store.migrate import current_revision, head_revision, upgrade
from ddn_node.store.models import Base

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
