"""Index observations by lower(project_id): /metadata/find matches project codes in any case

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_observations_lower_project_id_obsid",
        "observations",
        [sa.text("lower(project_id)"), "obsid"],
    )
    op.drop_index("ix_observations_project_id_obsid", table_name="observations")


def downgrade() -> None:
    op.create_index("ix_observations_project_id_obsid", "observations", ["project_id", "obsid"])
    op.drop_index("ix_observations_lower_project_id_obsid", table_name="observations")
