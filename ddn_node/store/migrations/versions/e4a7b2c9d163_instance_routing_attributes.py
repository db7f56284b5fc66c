"""instance routing attributes: what image selection reads (Image Type, station, institution, frames)

Revision ID: e4a7b2c9d163
Revises: 3d9a5c7e2f14
Create Date: 2026-12-02 10:00:00

- instances.image_type: the Image Type values joined by backslashes (a localiser or a
  secondary image is not scored);
- instances.station_name, instances.institution_name: rules route by them;
- instances.frames: the Number of Frames (each frame is one scored image). Issue 16, item 2.

Rows received before this revision read as "" and one frame: a localiser stored then is
scored as before until it is received again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "e4a7b2c9d163"
down_revision = "3d9a5c7e2f14"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("image_type", sa.String(length=128), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("station_name", sa.String(length=16), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("institution_name", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("frames", sa.Integer(), server_default="1", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("frames")
        batch_op.drop_column("institution_name")
        batch_op.drop_column("station_name")
        batch_op.drop_column("image_type")
