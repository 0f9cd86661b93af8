"""Calibration fits, their per-tile solutions, and fit requests (specs/calib.md section 3.5)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from observatory.core.database import Base, UTCDateTime, utcnow

#: The ``callback_url`` column's width.
MAX_CALLBACK_URL_CHARS = 2000


class CalibrationFit(Base):
    """One fit of a calibrator observation; ``fitid`` is the Unix time of the fit in microseconds."""

    __tablename__ = "calibration_fits"

    fitid: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    obsid: Mapped[int] = mapped_column(BigInteger, index=True)
    creator: Mapped[str] = mapped_column(String(50), default="calvin")
    code_version: Mapped[str] = mapped_column(String(50), default="")
    fit_time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    fit_niter: Mapped[int | None] = mapped_column(Integer)
    fit_limit: Mapped[float | None] = mapped_column(Float)
    source_list: Mapped[str | None] = mapped_column(String(200))
    num_sources: Mapped[int | None] = mapped_column(Integer)
    calibration_command: Mapped[str] = mapped_column(Text, default="")
    gain_max_cutoff: Mapped[float | None] = mapped_column(Float)
    #: The solver's AO-cal file, relative to the calibration store (the cached solution).
    solution_file: Mapped[str | None] = mapped_column(String(500))
    #: The tile id the fit's delays are referenced to (its own are 0 m by construction: the
    #: lowest unflagged tile others measure against, as calvin's); None when not known.
    reference_tileid: Mapped[int | None] = mapped_column(Integer)

    solutions: Mapped[list[CalibrationSolution]] = relationship(
        back_populates="fit", cascade="all, delete-orphan", order_by="CalibrationSolution.antenna"
    )


class CalibrationSolution(Base):
    """One tile of a fit: cable-length residual (delay) and gain fits per polarisation.

    ``x_delay_m`` is minus the fitted length (calvin's convention, from the legacy
    pipeline); per-coarse-channel arrays are NaN where a channel could not be fitted,
    and a flagged tile is a row of NaNs.
    """

    __tablename__ = "calibration_solutions"

    fitid: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("calibration_fits.fitid", ondelete="CASCADE"), primary_key=True
    )
    tileid: Mapped[int] = mapped_column(Integer, primary_key=True)
    obsid: Mapped[int] = mapped_column(BigInteger)
    #: The tile's metafits Antenna index (the antenna axis of AO-cal files).
    antenna: Mapped[int] = mapped_column(Integer)
    x_delay_m: Mapped[float | None] = mapped_column(Float)
    x_intercept: Mapped[float | None] = mapped_column(Float)
    x_gains: Mapped[list[float | None]] = mapped_column(JSON, default=list)
    y_delay_m: Mapped[float | None] = mapped_column(Float)
    y_intercept: Mapped[float | None] = mapped_column(Float)
    y_gains: Mapped[list[float | None]] = mapped_column(JSON, default=list)
    x_gains_pol0: Mapped[list[float | None]] = mapped_column(JSON, default=list)
    x_gains_pol1: Mapped[list[float | None]] = mapped_column(JSON, default=list)
    y_gains_pol0: Mapped[list[float | None]] = mapped_column(JSON, default=list)
    y_gains_pol1: Mapped[list[float | None]] = mapped_column(JSON, default=list)
    x_gains_sigma_resid: Mapped[list[float | None]] = mapped_column(JSON, default=list)
    y_gains_sigma_resid: Mapped[list[float | None]] = mapped_column(JSON, default=list)
    x_phase_sigma_resid: Mapped[float | None] = mapped_column(Float)
    x_phase_chi2dof: Mapped[float | None] = mapped_column(Float)
    x_phase_fit_quality: Mapped[float | None] = mapped_column(Float)
    y_phase_sigma_resid: Mapped[float | None] = mapped_column(Float)
    y_phase_chi2dof: Mapped[float | None] = mapped_column(Float)
    y_phase_fit_quality: Mapped[float | None] = mapped_column(Float)
    x_gains_fit_quality: Mapped[float | None] = mapped_column(Float)
    y_gains_fit_quality: Mapped[float | None] = mapped_column(Float)

    fit: Mapped[CalibrationFit] = relationship(back_populates="solutions")


class CalibrationRequest(Base):
    """A request to fit a calibrator observation (for a target, maybe an ASVO job and a callback)."""

    __tablename__ = "calibration_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cal_id: Mapped[int] = mapped_column(BigInteger, index=True)
    target_obs_id: Mapped[int | None] = mapped_column(BigInteger)
    asvo_job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    callback_url: Mapped[str | None] = mapped_column(String(MAX_CALLBACK_URL_CHARS))
    realtime: Mapped[bool] = mapped_column(Boolean, default=False)
    bulk_request: Mapped[bool] = mapped_column(Boolean, default=False)
    request_added_datetime: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    assigned_datetime: Mapped[datetime | None] = mapped_column(UTCDateTime)
    calibration_started_datetime: Mapped[datetime | None] = mapped_column(UTCDateTime)
    calibration_completed_datetime: Mapped[datetime | None] = mapped_column(UTCDateTime)
    calibration_fit_id: Mapped[int | None] = mapped_column(BigInteger)
    calibration_error_datetime: Mapped[datetime | None] = mapped_column(UTCDateTime)
    calibration_error_message: Mapped[str | None] = mapped_column(Text)
    callback_attempts: Mapped[int] = mapped_column(Integer, default=0)
    callback_last_attempt_datetime: Mapped[datetime | None] = mapped_column(UTCDateTime)
    callback_delivered_datetime: Mapped[datetime | None] = mapped_column(UTCDateTime)
    callback_error_message: Mapped[str | None] = mapped_column(Text)
