"""Alembic environment: runs the node's migrations on the connection it is handed."""

from __future__ import annotations

from alembic import context

from ddn_node.store.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - the node always passes a connection
    raise RuntimeError("run migrations through 'ddn-node db upgrade'")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
