"""Trigger records.

The schedule itself is the ``observations`` table (archive.models.Observation):
a row per observation, scheduled or observed, keyed by its GPS start second. Its lock
is the archive's (``archive.models.ScheduleLock``, taken with
``archive.service.take_schedule_lock``): an operator's ``observatory schedule observation``
takes it too.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from observatory.core.database import Base, UTCDateTime, utcnow

__all__ = ["Trigger", "TriggerMode"]


class TriggerMode(enum.StrEnum):
    """What a trigger asked for, as ``find`` filters it."""

    MWAX_CORRELATOR = "MWAX_CORRELATOR"
    MWAX_VCS = "MWAX_VCS"
    BUFFER = "BUFFER"


class Trigger(Base):
    """One call of triggerobs, triggervcs or triggerbuffer: successful, refused or pretend."""

    __tablename__ = "triggers"
    __table_args__ = (Index("ix_triggers_project_id_id", "project_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[str] = mapped_column(String(20), default="")
    pretend: Mapped[bool] = mapped_column(Boolean, default=True)
    success: Mapped[bool] = mapped_column(Boolean, default=False)
    creator: Mapped[str] = mapped_column(String(100), default="")
    obsname: Mapped[str] = mapped_column(String(200), default="")
    trigger_mode: Mapped[str] = mapped_column(String(20))
    obsids: Mapped[list[int]] = mapped_column(JSON, default=list)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    errors: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    #: The reply the caller got, whole.
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
