"""Accounts shared by every service: users (with API keys) and projects."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from observatory.core.database import Base, UTCDateTime, utcnow


class User(Base):
    """A person or robot that uses the services; authenticated by an API key."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    email: Mapped[str | None] = mapped_column(String(200))
    # The key itself is never stored: a scrypt hash, and a short SHA-256 prefix to find the row.
    api_key_hash: Mapped[str] = mapped_column(String(200))
    api_key_fingerprint: Mapped[str] = mapped_column(String(16), index=True)
    #: scrypt hash of the portal password; None until ``observatory users set-password``.
    password_hash: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: Portal sign-ins made before this moment no longer count (set by signing out and by a
    #: new password: it ends the user's sessions in every browser); None: all count.
    portal_sessions_valid_after: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class Project(Base):
    """An observing project (e.g. ``G0055``): triggers are made on its behalf."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(20), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    secure_key_hash: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SignInFailures(Base):
    """Failed portal sign-ins under one user name, known or not: the sign-in throttle.

    Keyed by a digest of the name as typed (any length), so that a name no user has is
    throttled as a user's is: the replies must not tell which names exist.
    """

    __tablename__ = "sign_in_failures"
    __table_args__ = (Index("ix_sign_in_failures_last_failure", "last_failure"),)

    name_digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Failures since the last success (or since the row was forgotten).
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
