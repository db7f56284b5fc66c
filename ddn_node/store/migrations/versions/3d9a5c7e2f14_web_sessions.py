"""web sessions in the database: logging out (or an admin ending a session) holds in every process and across restarts

Revision ID: 3d9a5c7e2f14
Revises: 8c2f4e6a1b37
Create Date: 2026-12-01 15:00:00

- web_sessions: one row per UI login (the sha256 of the cookie's session id, the user, when
  it expires, when and by whom it was ended). Issue 15, item 5.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import ddn_node.store.models

revision = "3d9a5c7e2f14"
down_revision = "8c2f4e6a1b37"
branch_labels = None
depends_on = None

_UTC = ddn_node.store.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sid_sha256", sa.String(length=64), nullable=False),
        sa.Column("user", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=64), nullable=False),
        sa.Column("created_at", _UTC, nullable=False),
        sa.Column("expires_at", _UTC, nullable=False),
        sa.Column("ended_at", _UTC, nullable=True),
        sa.Column("ended_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_sessions")),
        sa.UniqueConstraint("sid_sha256", name=op.f("uq_web_sessions_sid_sha256")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_web_sessions_user"), "web_sessions", ["user"])
    op.create_index(op.f("ix_web_sessions_expires_at"), "web_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_table("web_sessions")
