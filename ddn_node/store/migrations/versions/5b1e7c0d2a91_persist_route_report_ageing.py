"""persist what later steps need: the route on the job, the report on the result, ageing as data

Revision ID: 5b1e7c0d2a91
Revises: 066efc19da9c
Create Date: 2026-12-01 09:00:00

- jobs.rule, jobs.instance_ids: the route completion decided (the worker no longer routes
  the study again at claim);
- results.sr_series_uid, sr_sop_class_uid, sr_path, thresholds, completed_at: the SR's
  identity and the operating points it applied (no SR file is read back, no manifest
  re-parsed); a result row now exists from the moment its SR is queued;
- results.heatmap_notes, heatmap_caveats: why a reported finding has no heat map, and what
  to know of one drawn without localisation evidence (the study page says so);
- studies.ageing_steps: how far ageing raised a study, instead of a sentence appended to
  priority_reason. Rows aged before this revision are converted;
- instances.origin: source image, or a result (the node's own, or another's), which is
  never routed and never re-opens a study;
- deliveries.commitment, commitment_uid, committed_at: Storage Commitment of sent objects;
  studies.delivery_summary: where a study's results went, for the worklist.
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

import ddn_node.store.models

revision = "5b1e7c0d2a91"
down_revision = "066efc19da9c"
branch_labels = None
depends_on = None

_AGEING_TEXT = re.compile(r" \(raised by ageing after [^)]* min waiting\)")
_BAND = {"STAT": 0, "HIGH": 1, "ROUTINE": 2, "NOT_ANALYSED": 2}


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("rule", sa.String(length=128), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("instance_ids", sa.JSON(), nullable=True))
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sr_series_uid", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("sr_sop_class_uid", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("sr_path", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("thresholds", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("heatmap_notes", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("heatmap_caveats", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "completed_at", ddn_node.store.models.UTCDateTime(timezone=True), nullable=True
            )
        )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("ageing_steps", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("origin", sa.String(length=8), server_default="source", nullable=False)
        )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("delivery_summary", sa.Text(), server_default="", nullable=False)
        )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("commitment", sa.String(length=16), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("commitment_uid", sa.String(length=128), nullable=True))
        batch_op.add_column(
            sa.Column(
                "committed_at", ddn_node.store.models.UTCDateTime(timezone=True), nullable=True
            )
        )
        batch_op.create_index(
            batch_op.f("ix_deliveries_commitment_uid"), ["commitment_uid"], unique=False
        )

    bind = op.get_bind()
    # Results written before this revision were complete when written.
    bind.execute(sa.text("UPDATE results SET completed_at = created_at"))
    aged = bind.execute(
        sa.text(
            "SELECT id, priority, priority_rank, priority_reason FROM studies "
            "WHERE priority_reason LIKE '%raised by ageing%'"
        )
    ).all()
    for study_id, priority, rank, reason in aged:
        steps = max(0, _BAND.get(priority, 2) - int(rank))
        bind.execute(
            sa.text(
                "UPDATE studies SET ageing_steps = :steps, priority_reason = :reason WHERE id = :id"
            ),
            {"steps": steps, "reason": _AGEING_TEXT.sub("", reason), "id": study_id},
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_commitment_uid"))
        batch_op.drop_column("committed_at")
        batch_op.drop_column("commitment_uid")
        batch_op.drop_column("commitment")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("delivery_summary")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("origin")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("ageing_steps")
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("completed_at")
        batch_op.drop_column("heatmap_caveats")
        batch_op.drop_column("heatmap_notes")
        batch_op.drop_column("thresholds")
        batch_op.drop_column("sr_path")
        batch_op.drop_column("sr_sop_class_uid")
        batch_op.drop_column("sr_series_uid")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("instance_ids")
        batch_op.drop_column("rule")
