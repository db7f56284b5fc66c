"""the analysis queue by urgency: the order's priority and the study's source kept at ingest, each job's class

Revision ID: a4e1c9b7d2f6
Revises: e4a7b2c9d163
Create Date: 2026-12-02 10:00:00

- studies.order_priority, station_name, department: the order's priority as its images
  give it (Requested Procedure Priority (0040,1003) or Scheduled Procedure Step Priority
  (0074,1200)), Station Name and Institutional Department Name; empty for studies
  received before.
- jobs.urgency: the queue's class (0 = STAT ... 3 = LOW), 2 (routine) for the jobs queued
  before, which keep their first in, first out order among themselves.
- ix_jobs_claim now (state, urgency, not_before): the order the claim takes. Issue 16,
  item 5.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "a4e1c9b7d2f6"
down_revision = "e4a7b2c9d163"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch_op:
        batch_op.add_column(
            sa.Column("order_priority", sa.String(length=16), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("station_name", sa.String(length=16), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("department", sa.String(length=64), server_default="", nullable=False)
        )
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("urgency", sa.Integer(), server_default="2", nullable=False))
        batch_op.drop_index("ix_jobs_claim")
        batch_op.create_index("ix_jobs_claim", ["state", "urgency", "not_before"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_claim")
        batch_op.create_index("ix_jobs_claim", ["state", "not_before"])
        batch_op.drop_column("urgency")
    with op.batch_alter_table("studies") as batch_op:
        batch_op.drop_column("department")
        batch_op.drop_column("station_name")
        batch_op.drop_column("order_priority")
