"""instance identity: earlier versions of a changed instance, and refused identity conflicts

Revision ID: 8c2f4e6a1b37
Revises: 5b1e7c0d2a91
Create Date: 2026-12-01 14:00:00

- instance_versions: the content an instance had before a re-send under the same UID
  changed it (the file is kept, the row says where);
- identity_conflicts: instances refused because a known UID arrived in another study,
  series or patient (issue 15); their bytes are in the spool's quarantine/.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import ddn_node.store.models

revision = "8c2f4e6a1b37"
down_revision = "5b1e7c0d2a91"
branch_labels = None
depends_on = None

_UTC = ddn_node.store.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "instance_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("received_at", _UTC, nullable=False),
        sa.Column("replaced_at", _UTC, nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_instance_versions_instance_id_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance_versions")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_instance_versions_instance_id"), "instance_versions", ["instance_id"])
    op.create_table(
        "identity_conflicts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", _UTC, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=128), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=128), nullable=False),
        sa.Column("study_uid", sa.String(length=128), nullable=False),
        sa.Column("series_uid", sa.String(length=128), nullable=False),
        sa.Column("existing_study_uid", sa.String(length=128), nullable=False),
        sa.Column("existing_series_uid", sa.String(length=128), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("discarded_at", _UTC, nullable=True),
        sa.Column("discarded_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_identity_conflicts")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_identity_conflicts_at"), "identity_conflicts", ["at"])
    op.create_index(
        op.f("ix_identity_conflicts_sop_instance_uid"), "identity_conflicts", ["sop_instance_uid"]
    )


def downgrade() -> None:
    op.drop_table("identity_conflicts")
    op.drop_table("instance_versions")
