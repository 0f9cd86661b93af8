"""The schedule (observations), its lock, and the archive of their files."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from observatory.core.database import Base, UTCDateTime, utcnow


class ObservationMode(enum.StrEnum):
    """Observing modes, named as mwalib's ``MWAMode`` names them."""

    NO_CAPTURE = "NO_CAPTURE"
    HW_LFILES = "HW_LFILES"
    VOLTAGE_START = "VOLTAGE_START"
    VOLTAGE_STOP = "VOLTAGE_STOP"
    VOLTAGE_BUFFER = "VOLTAGE_BUFFER"
    CORR_MODE_CHANGE = "CORR_MODE_CHANGE"
    MWAX_CORRELATOR = "MWAX_CORRELATOR"
    MWAX_VCS = "MWAX_VCS"
    MWAX_BUFFER = "MWAX_BUFFER"
    MWAX_BEAMFORMER = "MWAX_BEAMFORMER"
    MWAX_CORR_BF = "MWAX_CORR_BF"


class FileKind(enum.StrEnum):
    """What an archived file is."""

    METAFITS = "metafits"
    PPDS = "ppds"
    MWAX_VIS = "mwax_vis"
    LEGACY_GPUBOX = "legacy_gpubox"
    VOLTAGE = "voltage"
    MWAF = "mwaf"
    SIM_TRUTH = "sim_truth"


class Observation(Base):
    """One scheduled observation; its id is its GPS start second."""

    __tablename__ = "observations"
    # (column, obsid) pairs let a filtered, newest-first page stop after one page of rows.
    # Project codes are found in any case: the index is of lower(project_id).
    __table_args__ = (
        Index("ix_observations_lower_project_id_obsid", text("lower(project_id)"), "obsid"),
        Index("ix_observations_mode_obsid", "mode", "obsid"),
    )

    obsid: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    stoptime: Mapped[int] = mapped_column(BigInteger, index=True)
    obsname: Mapped[str] = mapped_column(String(200), default="")
    creator: Mapped[str] = mapped_column(String(100), default="")
    project_id: Mapped[str] = mapped_column(String(20), default="")
    mode: Mapped[str] = mapped_column(String(30))
    groupid: Mapped[int | None] = mapped_column(BigInteger, index=True)
    ra_deg: Mapped[float | None] = mapped_column(Float)
    dec_deg: Mapped[float | None] = mapped_column(Float)
    ra_phase_deg: Mapped[float | None] = mapped_column(Float)
    dec_phase_deg: Mapped[float | None] = mapped_column(Float)
    az_deg: Mapped[float | None] = mapped_column(Float)
    el_deg: Mapped[float | None] = mapped_column(Float)
    delays: Mapped[list[int]] = mapped_column(JSON, default=list)
    coarse_chans: Mapped[list[int]] = mapped_column(JSON, default=list)
    n_tiles: Mapped[int | None] = mapped_column(Integer)
    freq_res_khz: Mapped[float | None] = mapped_column(Float)
    int_time_s: Mapped[float | None] = mapped_column(Float)
    atten_db: Mapped[float | None] = mapped_column(Float)
    calibration: Mapped[bool] = mapped_column(Boolean, default=False)
    calibrator_source: Mapped[str | None] = mapped_column(String(100))
    #: False for observations no trigger may interrupt, whatever its project's priority.
    interruptible: Mapped[bool] = mapped_column(Boolean, default=True)
    #: With subarrays: each subarray's target and pointing (JSON list), else null.
    subarray_pointings: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    files: Mapped[list[ObservationFile]] = relationship(
        back_populates="observation",
        cascade="all, delete-orphan",
        order_by="ObservationFile.name",
    )

    @property
    def exposure_s(self) -> int:
        """Duration in seconds."""
        return self.stoptime - self.obsid

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (without files)."""
        return {column.key: getattr(self, column.key) for column in self.__table__.columns} | {
            "exposure_s": self.exposure_s
        }


class ObservationFile(Base):
    """A file of an observation, stored in the archive."""

    __tablename__ = "files"
    __table_args__ = (
        UniqueConstraint("obsid", "name", name="uq_files_obsid_name"),
        Index("ix_files_obsid_kind", "obsid", "kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    obsid: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("observations.obsid", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(20))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha1: Mapped[str] = mapped_column(String(40))
    storage_key: Mapped[str] = mapped_column(String(500))
    coarse_chan: Mapped[int | None] = mapped_column(Integer)
    batch: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    observation: Mapped[Observation] = relationship(back_populates="files")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "name": self.name,
            "kind": self.kind,
            "size_bytes": self.size_bytes,
            "sha1": self.sha1,
            "coarse_chan": self.coarse_chan,
            "batch": self.batch,
        }


class ScheduleLock(Base):
    """One row (id 1, made by migration 0004); every schedule change updates it first, so
    changes happen one at a time (:func:`observatory.archive.service.take_schedule_lock`).

    An UPDATE takes PostgreSQL's row lock and SQLite's write lock alike, so the
    check "does this fit / may this project override what is there?" and the write that
    follows cannot interleave with another change's: a trigger's (``trigger.service``) or
    an operator's (``archive.service.schedule_observation``). It lives here, below both,
    because the archive may not import the trigger domain.
    """

    __tablename__ = "schedule_lock"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    changes: Mapped[int] = mapped_column(BigInteger, default=0)
