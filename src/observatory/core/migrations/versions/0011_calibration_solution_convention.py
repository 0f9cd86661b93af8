"""Calibration fits of this package's pipeline in hyperdrive's convention

Up to version 0.1.0 the pipeline wrote the conjugate of hyperdrive's solutions and fitted its
delays on them, so those fits' delays and phase intercepts have the other sign from calvin's
(and the conversion, which now applies solution files as Birli does, would double the gains'
phases with their cached files). This revision negates their delays and intercepts and stops
serving their cached files (left on disk, no longer referenced): their solutions are rebuilt
from the corrected rows (the phase and gain fits). Re-fitting the calibrator
(``add_cal_request``) gives per-channel solutions again. Fits of other origins (their
``code_version`` and ``calibration_command`` are not this pipeline's) are left as they are.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The fits the conjugated pipeline made: its version and the command it recorded.
_OLD_FITS = (
    "SELECT fitid FROM calibration_fits WHERE code_version = '0.1.0' "
    "AND calibration_command LIKE 'StEFCal against the catalogue point source%'"
)


def _negate_phase_fits() -> None:
    op.execute(
        sa.text(
            "UPDATE calibration_solutions SET x_delay_m = -x_delay_m, y_delay_m = -y_delay_m, "
            "x_intercept = -x_intercept, y_intercept = -y_intercept "
            f"WHERE fitid IN ({_OLD_FITS})"
        )
    )


def upgrade() -> None:
    _negate_phase_fits()
    op.execute(
        sa.text(f"UPDATE calibration_fits SET solution_file = NULL WHERE fitid IN ({_OLD_FITS})")
    )


def downgrade() -> None:
    # The solution files stay unreferenced: the older code rebuilds them from the rows.
    _negate_phase_fits()
