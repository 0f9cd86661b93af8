"""The reference tile of each calibration fit

A fit's delays are referenced to one tile (the lowest unflagged tile others measure
against, as calvin's), whose own delays are therefore exactly 0 m in both polarisations.
When that tile is flagged in a later observation the reference moves, and every tile's
residual moves by the old reference's offset: the pages and Grafana need to know which
tile each fit is referenced to. This revision records it, and fills it in for the fits
already stored from their rows: the lowest tile id whose X and Y delays are both exactly 0
(NULL when no tile's are).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN (no table rebuild on SQLite: calibration_solutions references it).
    op.add_column("calibration_fits", sa.Column("reference_tileid", sa.Integer(), nullable=True))
    op.execute(
        sa.text(
            "UPDATE calibration_fits SET reference_tileid = (SELECT MIN(s.tileid) "
            "FROM calibration_solutions s WHERE s.fitid = calibration_fits.fitid "
            "AND s.x_delay_m = 0 AND s.y_delay_m = 0)"
        )
    )


def downgrade() -> None:
    op.drop_column("calibration_fits", "reference_tileid")
