"""Calibration fits, their per-tile solutions, and fit requests

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "calibration_fits",
        sa.Column("fitid", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("obsid", sa.BigInteger(), nullable=False),
        sa.Column("creator", sa.String(length=50), nullable=False),
        sa.Column("code_version", sa.String(length=50), nullable=False),
        sa.Column("fit_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fit_niter", sa.Integer(), nullable=True),
        sa.Column("fit_limit", sa.Float(), nullable=True),
        sa.Column("source_list", sa.String(length=200), nullable=True),
        sa.Column("num_sources", sa.Integer(), nullable=True),
        sa.Column("calibration_command", sa.Text(), nullable=False),
        sa.Column("gain_max_cutoff", sa.Float(), nullable=True),
        sa.Column("solution_file", sa.String(length=500), nullable=True),
        sa.PrimaryKeyConstraint("fitid", name=op.f("pk_calibration_fits")),
    )
    op.create_index(op.f("ix_calibration_fits_obsid"), "calibration_fits", ["obsid"], unique=False)
    op.create_table(
        "calibration_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cal_id", sa.BigInteger(), nullable=False),
        sa.Column("target_obs_id", sa.BigInteger(), nullable=True),
        sa.Column("asvo_job_id", sa.Integer(), nullable=True),
        sa.Column("callback_url", sa.String(length=2000), nullable=True),
        sa.Column("realtime", sa.Boolean(), nullable=False),
        sa.Column("bulk_request", sa.Boolean(), nullable=False),
        sa.Column("request_added_datetime", sa.DateTime(timezone=True), nullable=False),
        sa.Column("assigned_datetime", sa.DateTime(timezone=True), nullable=True),
        sa.Column("calibration_started_datetime", sa.DateTime(timezone=True), nullable=True),
        sa.Column("calibration_completed_datetime", sa.DateTime(timezone=True), nullable=True),
        sa.Column("calibration_fit_id", sa.BigInteger(), nullable=True),
        sa.Column("calibration_error_datetime", sa.DateTime(timezone=True), nullable=True),
        sa.Column("calibration_error_message", sa.Text(), nullable=True),
        sa.Column("callback_attempts", sa.Integer(), nullable=False),
        sa.Column("callback_last_attempt_datetime", sa.DateTime(timezone=True), nullable=True),
        sa.Column("callback_delivered_datetime", sa.DateTime(timezone=True), nullable=True),
        sa.Column("callback_error_message", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibration_requests")),
    )
    op.create_index(
        op.f("ix_calibration_requests_asvo_job_id"),
        "calibration_requests",
        ["asvo_job_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_calibration_requests_cal_id"), "calibration_requests", ["cal_id"], unique=False
    )
    op.create_table(
        "calibration_solutions",
        sa.Column("fitid", sa.BigInteger(), nullable=False),
        sa.Column("tileid", sa.Integer(), nullable=False),
        sa.Column("obsid", sa.BigInteger(), nullable=False),
        sa.Column("antenna", sa.Integer(), nullable=False),
        sa.Column("x_delay_m", sa.Float(), nullable=True),
        sa.Column("x_intercept", sa.Float(), nullable=True),
        sa.Column("x_gains", sa.JSON(), nullable=False),
        sa.Column("y_delay_m", sa.Float(), nullable=True),
        sa.Column("y_intercept", sa.Float(), nullable=True),
        sa.Column("y_gains", sa.JSON(), nullable=False),
        sa.Column("x_gains_pol0", sa.JSON(), nullable=False),
        sa.Column("x_gains_pol1", sa.JSON(), nullable=False),
        sa.Column("y_gains_pol0", sa.JSON(), nullable=False),
        sa.Column("y_gains_pol1", sa.JSON(), nullable=False),
        sa.Column("x_gains_sigma_resid", sa.JSON(), nullable=False),
        sa.Column("y_gains_sigma_resid", sa.JSON(), nullable=False),
        sa.Column("x_phase_sigma_resid", sa.Float(), nullable=True),
        sa.Column("x_phase_chi2dof", sa.Float(), nullable=True),
        sa.Column("x_phase_fit_quality", sa.Float(), nullable=True),
        sa.Column("y_phase_sigma_resid", sa.Float(), nullable=True),
        sa.Column("y_phase_chi2dof", sa.Float(), nullable=True),
        sa.Column("y_phase_fit_quality", sa.Float(), nullable=True),
        sa.Column("x_gains_fit_quality", sa.Float(), nullable=True),
        sa.Column("y_gains_fit_quality", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["fitid"],
            ["calibration_fits.fitid"],
            name=op.f("fk_calibration_solutions_fitid_calibration_fits"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("fitid", "tileid", name=op.f("pk_calibration_solutions")),
    )


def downgrade() -> None:
    op.drop_table("calibration_solutions")
    op.drop_index(op.f("ix_calibration_requests_cal_id"), table_name="calibration_requests")
    op.drop_index(op.f("ix_calibration_requests_asvo_job_id"), table_name="calibration_requests")
    op.drop_table("calibration_requests")
    op.drop_index(op.f("ix_calibration_fits_obsid"), table_name="calibration_fits")
    op.drop_table("calibration_fits")
