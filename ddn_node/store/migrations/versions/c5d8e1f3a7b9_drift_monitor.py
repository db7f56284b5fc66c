"""the drift monitor: input and score features per analysed image, drift state per feature

Revision ID: c5d8e1f3a7b9
Revises: a7f3c1d9e2b5
Create Date: 2026-12-04 10:00:00

- drift_observations: per scored image the intensity mean and spread, the long side, the
  manufacturer and view, the abnormality score and the label probabilities; no study, no
  UID (retention leaves it alone);
- drift_states: per model version, head and feature the latest PSI / KS against the
  model's validation set, and whether it is in alarm. Issue 18, item 3.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import ddn_node.store.models

revision = "c5d8e1f3a7b9"
down_revision = "a7f3c1d9e2b5"
branch_labels = None
depends_on = None

_UTC = ddn_node.store.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "drift_observations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", _UTC, nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("head", sa.String(length=64), nullable=False),
        sa.Column("intensity_mean", sa.Float(), nullable=False),
        sa.Column("intensity_std", sa.Float(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("manufacturer", sa.String(length=64), nullable=False),
        sa.Column("view", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_observations")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_drift_observations_model",
        "drift_observations",
        ["model_name", "model_version", "head", "id"],
    )
    op.create_table(
        "drift_states",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("head", sa.String(length=64), nullable=False),
        sa.Column("feature", sa.String(length=80), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("psi", sa.Float(), nullable=False),
        sa.Column("ks", sa.Float(), nullable=True),
        sa.Column("alarmed", sa.Boolean(), nullable=False),
        sa.Column("alarmed_since", _UTC, nullable=True),
        sa.Column("updated_at", _UTC, nullable=False),
        sa.Column("histogram", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_states")),
        sa.UniqueConstraint(
            "model_name", "model_version", "head", "feature", name="uq_drift_states_feature"
        ),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("drift_states")
    op.drop_index("ix_drift_observations_model", table_name="drift_observations")
    op.drop_table("drift_observations")
