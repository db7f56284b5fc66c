"""radiologist feedback per finding, kept when retention deletes the study

Revision ID: a7f3c1d9e2b5
Revises: a4e1c9b7d2f6
Create Date: 2026-12-03 10:00:00

- feedback: one radiologist's review of one result (who, when, the model, its version and
  head, the priority triage decided, an optional note); the study is named by the sha256
  of its Study Instance UID, the result by a link that retention sets to NULL;
- feedback_findings: the verdict (agree / disagree) on each label reviewed, with the
  probability and threshold the model had then. Issue 18, items 1 and 2.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import ddn_node.store.models

revision = "a7f3c1d9e2b5"
down_revision = "a4e1c9b7d2f6"
branch_labels = None
depends_on = None

_UTC = ddn_node.store.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", _UTC, nullable=False),
        sa.Column("user", sa.String(length=128), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=True),
        sa.Column("study_ref", sa.String(length=64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("head", sa.String(length=64), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["result_id"],
            ["results.id"],
            name=op.f("fk_feedback_result_id_results"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_feedback_at"), "feedback", ["at"])
    op.create_index(op.f("ix_feedback_result_id"), "feedback", ["result_id"])
    op.create_index(op.f("ix_feedback_study_ref"), "feedback", ["study_ref"])
    op.create_table(
        "feedback_findings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("feedback_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("model_present", sa.Boolean(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.CheckConstraint("verdict IN ('agree', 'disagree')", name="ck_feedback_findings_verdict"),
        sa.ForeignKeyConstraint(
            ["feedback_id"],
            ["feedback.id"],
            name=op.f("fk_feedback_findings_feedback_id_feedback"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback_findings")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_feedback_findings_feedback_id"), "feedback_findings", ["feedback_id"])


def downgrade() -> None:
    op.drop_table("feedback_findings")
    op.drop_table("feedback")
