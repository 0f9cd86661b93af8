"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "observations",
        sa.Column("obsid", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("stoptime", sa.BigInteger(), nullable=False),
        sa.Column("obsname", sa.String(length=200), nullable=False),
        sa.Column("creator", sa.String(length=100), nullable=False),
        sa.Column("project_id", sa.String(length=20), nullable=False),
        sa.Column("mode", sa.String(length=30), nullable=False),
        sa.Column("groupid", sa.BigInteger(), nullable=True),
        sa.Column("ra_deg", sa.Float(), nullable=True),
        sa.Column("dec_deg", sa.Float(), nullable=True),
        sa.Column("ra_phase_deg", sa.Float(), nullable=True),
        sa.Column("dec_phase_deg", sa.Float(), nullable=True),
        sa.Column("az_deg", sa.Float(), nullable=True),
        sa.Column("el_deg", sa.Float(), nullable=True),
        sa.Column("delays", sa.JSON(), nullable=False),
        sa.Column("coarse_chans", sa.JSON(), nullable=False),
        sa.Column("n_tiles", sa.Integer(), nullable=True),
        sa.Column("freq_res_khz", sa.Float(), nullable=True),
        sa.Column("int_time_s", sa.Float(), nullable=True),
        sa.Column("atten_db", sa.Float(), nullable=True),
        sa.Column("calibration", sa.Boolean(), nullable=False),
        sa.Column("calibrator_source", sa.String(length=100), nullable=True),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("obsid", name=op.f("pk_observations")),
    )
    with op.batch_alter_table("observations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_observations_groupid"), ["groupid"], unique=False)
        batch_op.create_index("ix_observations_mode_obsid", ["mode", "obsid"], unique=False)
        batch_op.create_index(
            "ix_observations_project_id_obsid", ["project_id", "obsid"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_observations_stoptime"), ["stoptime"], unique=False)

    op.create_table(
        "projects",
        sa.Column("id", sa.String(length=20), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("secure_key_hash", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("email", sa.String(length=200), nullable=True),
        sa.Column("api_key_hash", sa.String(length=200), nullable=False),
        sa.Column("api_key_fingerprint", sa.String(length=16), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_users_api_key_fingerprint"), ["api_key_fingerprint"], unique=False
        )

    op.create_table(
        "files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("obsid", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha1", sa.String(length=40), nullable=False),
        sa.Column("storage_key", sa.String(length=500), nullable=False),
        sa.Column("coarse_chan", sa.Integer(), nullable=True),
        sa.Column("batch", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["obsid"],
            ["observations.obsid"],
            name=op.f("fk_files_obsid_observations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
        sa.UniqueConstraint("obsid", "name", name="uq_files_obsid_name"),
    )
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index("ix_files_obsid_kind", ["obsid", "kind"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index("ix_files_obsid_kind")

    op.drop_table("files")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_users_api_key_fingerprint"))

    op.drop_table("users")
    op.drop_table("projects")
    with op.batch_alter_table("observations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_observations_stoptime"))
        batch_op.drop_index("ix_observations_project_id_obsid")
        batch_op.drop_index("ix_observations_mode_obsid")
        batch_op.drop_index(batch_op.f("ix_observations_groupid"))

    op.drop_table("observations")
