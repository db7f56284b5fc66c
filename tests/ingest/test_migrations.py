"""Alembic migrations: the same revisions build the schema on SQLite and PostgreSQL, and the
models have no change that a migration does not carry."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from ddn_node.store.engine import make_database
from ddn_node.store.migrate import current_revision, head_revision, upgrade
from ddn_node.store.models import Base


def test_upgrade_is_idempotent_and_matches_models(db_url: str) -> None:
    db = make_database(db_url)
    try:
        assert current_revision(db) is None
        upgrade(db)
        upgrade(db)
        assert current_revision(db) == head_revision()
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"models changed without a migration: {diff}"
    finally:
        db.dispose()


def test_cli_db_upgrade(make_node, postgres_url: str) -> None:
    node = make_node(postgres_url)
    result = node.cli("db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert "database at" in result.stderr
    assert f"current={head_revision()}" in node.cli("db", "current").stdout
