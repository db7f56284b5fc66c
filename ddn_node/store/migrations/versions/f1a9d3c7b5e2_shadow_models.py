"""shadow models and promotion: which model each routing rule runs, and what a candidate said

Revision ID: f1a9d3c7b5e2
Revises: c5d8e1f3a7b9
Create Date: 2026-12-05 10:00:00

- model_assignments: per routing rule the promoted live model (NULL: the config's), the
  candidate that shadows it, and what a rollback restores; read by every worker at the
  start of each job, so a promotion needs no restart;
- shadow_results: a candidate's study-level probabilities, thresholds, score and the
  priority triage would have given, per study generation, named by the study's sha256
  like feedback (kept when retention deletes the study), never sent. Issue 18, item 4.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import ddn_node.store.models

revision = "f1a9d3c7b5e2"
down_revision = "c5d8e1f3a7b9"
branch_labels = None
depends_on = None

_UTC = ddn_node.store.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "model_assignments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("live_model", sa.Text(), nullable=True),
        sa.Column("shadow_model", sa.Text(), nullable=True),
        sa.Column("previous_model", sa.Text(), nullable=True),
        sa.Column("updated_at", _UTC, nullable=False),
        sa.Column("updated_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_assignments")),
        sa.UniqueConstraint("rule", name=op.f("uq_model_assignments_rule")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "shadow_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", _UTC, nullable=False),
        sa.Column("study_ref", sa.String(length=64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("head", sa.String(length=64), nullable=False),
        sa.Column("live_model_name", sa.String(length=128), nullable=False),
        sa.Column("live_model_version", sa.String(length=128), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("positive", sa.JSON(), nullable=False),
        sa.Column("abnormality_score", sa.Float(), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("model_ms", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shadow_results")),
        sa.UniqueConstraint(
            "study_ref",
            "generation",
            "model_name",
            "model_version",
            "head",
            name="uq_shadow_results_case",
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_shadow_results_study_ref"), "shadow_results", ["study_ref"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_shadow_results_study_ref"), table_name="shadow_results")
    op.drop_table("shadow_results")
    op.drop_table("model_assignments")
