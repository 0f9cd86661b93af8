"""Trigger records, the schedule lock, non-interruptible observations

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("observations") as batch:
        batch.add_column(
            sa.Column("interruptible", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch.add_column(sa.Column("subarray_pointings", sa.JSON(), nullable=True))
    op.create_table(
        "triggers",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("project_id", sa.String(20), nullable=False),
        sa.Column("pretend", sa.Boolean(), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("creator", sa.String(100), nullable=False),
        sa.Column("obsname", sa.String(200), nullable=False),
        sa.Column("trigger_mode", sa.String(20), nullable=False),
        sa.Column("obsids", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_triggers_created_at", "triggers", ["created_at"])
    op.create_index("ix_triggers_project_id_id", "triggers", ["project_id", "id"])
    op.create_table(
        "schedule_lock",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("changes", sa.BigInteger(), nullable=False),
    )
    op.execute("INSERT INTO schedule_lock (id, changes) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("schedule_lock")
    op.drop_index("ix_triggers_project_id_id", table_name="triggers")
    op.drop_index("ix_triggers_created_at", table_name="triggers")
    op.drop_table("triggers")
    with op.batch_alter_table("observations") as batch:
        batch.drop_column("subarray_pointings")
        batch.drop_column("interruptible")
