"""ASVO jobs: what a user ordered, the state it is in, and the product it made."""

from __future__ import annotations

from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    event,
)
from sqlalchemy.orm import Mapped, mapped_column

from observatory.core.database import Base, UTCDateTime, utcnow


class JobType(IntEnum):
    """Job types as the clients number them (``row.job_type``)."""

    CONVERSION = 0
    DOWNLOAD_VISIBILITIES = 1
    DOWNLOAD_METADATA = 2
    DOWNLOAD_VOLTAGE = 3
    CANCEL_JOB = 4
    DOWNLOAD_BEAMFORMER = 5
    IMAGING = 6


class JobState(StrEnum):
    """The only job states the clients accept (giant-squid panics on any other)."""

    QUEUED = "queued"
    WAITCAL = "waitcal"
    STAGING = "staging"
    STAGED = "staged"
    DOWNLOADING = "downloading"
    PREPARING = "preparing"
    PREPROCESSING = "preprocessing"
    IMAGING = "imaging"
    DELIVERING = "delivering"
    COMPLETED = "completed"
    ERROR = "error"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


#: States a job never leaves (except completed -> expired).
TERMINAL_STATES = frozenset(
    {JobState.COMPLETED, JobState.ERROR, JobState.EXPIRED, JobState.CANCELLED}
)


class Job(Base):
    """One ASVO job of one user."""

    __tablename__ = "asvo_jobs"
    __table_args__ = (
        Index("ix_asvo_jobs_user_id_id", "user_id", "id"),
        Index("ix_asvo_jobs_user_id_request_key", "user_id", "request_key"),
        Index("ix_asvo_jobs_state_priority_id", "state", "priority", "id"),
        Index("ix_asvo_jobs_user_id_updated", "user_id", "updated"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    job_type: Mapped[int] = mapped_column(Integer)
    obs_id: Mapped[int] = mapped_column(BigInteger, index=True)
    state: Mapped[str] = mapped_column(String(20), default=JobState.QUEUED.value)
    #: What the user asked for, normalised: ``row.job_params`` in get_jobs.
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: SHA-256 of the job type and normalised parameters: finds duplicates.
    request_key: Mapped[str] = mapped_column(String(64))
    delivery: Mapped[str] = mapped_column(String(10))
    priority: Mapped[int] = mapped_column(Integer, default=1)
    error_code: Mapped[int | None] = mapped_column(Integer)
    error_text: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: ``{"files": [...]}`` once completed (the get_jobs ``product``), else None.
    product: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Storage key of the product tar (acacia) or the delivered directory (scratch, dug).
    product_location: Mapped[str | None] = mapped_column(String(500))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The get_jobs row without ``id`` and ``product`` (JSON members, no braces), kept
    #: up to date on every change so that listing thousands of jobs is string joining.
    row_json: Mapped[str] = mapped_column(Text, default="")
    #: Last change of any kind: the websocket sends rows changed since it last looked.
    updated: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


@event.listens_for(Job, "before_insert")
@event.listens_for(Job, "before_update")
def _keep_row_json(_mapper: Any, _connection: Any, job: Job) -> None:
    """Refresh the stored get_jobs row on every ORM write, in whichever process writes.

    Registered here, with the model, so that a Dask worker (which never imports
    the service module) keeps the row current too.
    """
    from observatory.asvo.service import row_members_json

    job.created = job.created or utcnow()
    job.row_json = row_members_json(job)


class UwsJob(Base):
    """A job made through the UWS interface (``/uws/asvo``), or a UWS-side mark on an ASVO job.

    A UWS job is PENDING until ``PHASE=RUN``; while it is, it is no ASVO job (the
    clients' get_jobs and websocket must never show a state they do not know), only
    this row. At RUN it is submitted as an ASVO job and ``asvo_job_id`` links to it;
    its UWS id (``u<id>``) stays the same. A row may also only hide an ASVO job made
    through ``/api`` from the UWS interface (``deleted`` with ``asvo_job_id``).
    """

    __tablename__ = "asvo_uws_jobs"
    __table_args__ = (Index("ix_asvo_uws_jobs_user_id_created", "user_id", "created"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    #: The ASVO job parameters as posted (``job_type`` and the /api form fields).
    params: Mapped[dict[str, str]] = mapped_column(JSON)
    #: The client's ``RUNID``, returned as given.
    run_id: Mapped[str | None] = mapped_column(String(200))
    #: The UWS phase while no ASVO job exists (PENDING, ERROR, ABORTED); None once linked.
    phase: Mapped[str | None] = mapped_column(String(12))
    #: Why RUN could not submit the job (the ASVO refusal), for ``errorSummary``.
    error_text: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: When the job ended without becoming an ASVO job (ERROR at RUN, ABORT while PENDING).
    ended: Mapped[datetime | None] = mapped_column(UTCDateTime)
    asvo_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("asvo_jobs.id", ondelete="CASCADE"), unique=True
    )
    #: Destroyed through UWS (DELETE): hidden from ``/uws/asvo``, the ASVO job untouched.
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
