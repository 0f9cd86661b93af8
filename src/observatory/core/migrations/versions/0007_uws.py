"""UWS jobs: ASVO jobs made through /uws/asvo while PENDING, and their link to the ASVO job

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "asvo_uws_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("run_id", sa.String(length=200), nullable=True),
        sa.Column("phase", sa.String(length=12), nullable=True),
        sa.Column("error_text", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended", sa.DateTime(timezone=True), nullable=True),
        sa.Column("asvo_job_id", sa.Integer(), nullable=True),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["asvo_job_id"],
            ["asvo_jobs.id"],
            name=op.f("fk_asvo_uws_jobs_asvo_job_id_asvo_jobs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_asvo_uws_jobs_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_asvo_uws_jobs")),
        sa.UniqueConstraint("asvo_job_id", name=op.f("uq_asvo_uws_jobs_asvo_job_id")),
    )
    op.create_index(
        "ix_asvo_uws_jobs_user_id_created", "asvo_uws_jobs", ["user_id", "created"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_asvo_uws_jobs_user_id_created", table_name="asvo_uws_jobs")
    op.drop_table("asvo_uws_jobs")
