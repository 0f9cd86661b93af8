"""ASVO jobs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "asvo_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("job_type", sa.Integer(), nullable=False),
        sa.Column("obs_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("request_key", sa.String(length=64), nullable=False),
        sa.Column("delivery", sa.String(length=10), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.Integer(), nullable=True),
        sa.Column("error_text", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed", sa.DateTime(timezone=True), nullable=True),
        sa.Column("product", sa.JSON(), nullable=True),
        sa.Column("product_location", sa.String(length=500), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_asvo_jobs_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_asvo_jobs")),
    )
    op.create_index(op.f("ix_asvo_jobs_obs_id"), "asvo_jobs", ["obs_id"], unique=False)
    op.create_index("ix_asvo_jobs_user_id_id", "asvo_jobs", ["user_id", "id"], unique=False)
    op.create_index(
        "ix_asvo_jobs_user_id_request_key", "asvo_jobs", ["user_id", "request_key"], unique=False
    )
    op.create_index(
        "ix_asvo_jobs_state_priority_id", "asvo_jobs", ["state", "priority", "id"], unique=False
    )
    op.create_index(
        "ix_asvo_jobs_user_id_updated", "asvo_jobs", ["user_id", "updated"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_asvo_jobs_user_id_updated", table_name="asvo_jobs")
    op.drop_index("ix_asvo_jobs_state_priority_id", table_name="asvo_jobs")
    op.drop_index("ix_asvo_jobs_user_id_request_key", table_name="asvo_jobs")
    op.drop_index("ix_asvo_jobs_user_id_id", table_name="asvo_jobs")
    op.drop_index(op.f("ix_asvo_jobs_obs_id"), table_name="asvo_jobs")
    op.drop_table("asvo_jobs")
