"""The portal's sign-in throttle: failed sign-ins per user name

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sign_in_failures",
        sa.Column("name_digest", sa.String(64), primary_key=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_failure", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_sign_in_failures_last_failure", "sign_in_failures", ["last_failure"])


def downgrade() -> None:
    op.drop_index("ix_sign_in_failures_last_failure", table_name="sign_in_failures")
    op.drop_table("sign_in_failures")
