"""Creating and authenticating users and projects."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from observatory.core.database import utcnow
from observatory.core.errors import Conflict, TooManyRequests, Unauthorized
from observatory.core.models import Project, SignInFailures, User
from observatory.core.security import (
    hash_secret,
    key_fingerprint,
    new_api_key,
    sign_value,
    unsign_value,
    verify_secret,
)
from observatory.core.text import is_ascii_digits

_USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,100}")
_PROJECT_ID = re.compile(r"[A-Za-z0-9_]{1,20}")


def create_user(
    session: Session,
    name: str,
    api_key: str | None = None,
    *,
    email: str | None = None,
) -> tuple[User, str]:
    """Create a user and return it with its API key (the only time the key is seen in clear).

    Raises
    ------
    ValueError
        If the name has characters outside ``A-Za-z0-9_.@-`` or the key is too short.
    Conflict
        If a user of that name exists.
    """
    if not _USER_NAME.fullmatch(name):
        raise ValueError(f"user name {name!r} must be 1-100 characters of A-Z a-z 0-9 _ . @ -")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise Conflict(f"user {name!r} already exists")
    key = _usable_api_key(session, api_key)
    user = User(
        name=name,
        email=email,
        api_key_hash=hash_secret(key),
        api_key_fingerprint=key_fingerprint(key),
    )
    session.add(user)
    session.flush()
    return user, key


def _usable_api_key(session: Session, api_key: str | None, owner: User | None = None) -> str:
    """``api_key`` (a new random one if None), checked to be long enough and no other user's:
    a key two users share signs in as one of them.

    Raises
    ------
    ValueError
        If the key is too short.
    Conflict
        If another user has it.
    """
    if api_key is None:
        return new_api_key()
    if len(api_key) < 8:
        raise ValueError("an API key must be at least 8 characters long")
    with contextlib.suppress(Unauthorized):
        holder = authenticate_api_key(session, api_key)
        if holder is not owner:
            raise Conflict("that API key is another user's: choose another (or let one be made)")
    return api_key


def authenticate_api_key(session: Session, api_key: str) -> User:
    """The user an API key belongs to.

    Raises
    ------
    Unauthorized
        If no user has that key.
    """
    if api_key:
        candidates = session.scalars(
            select(User).where(User.api_key_fingerprint == key_fingerprint(api_key))
        )
        for user in candidates:
            if verify_secret(api_key, user.api_key_hash):
                return user
    raise Unauthorized("invalid API key")


def project_id_problem(project_id: object) -> str | None:
    """What is wrong with a project id, or None: 1-20 characters of A-Z a-z 0-9 _.

    The rule projects are created with; the telescope also writes the id into the metafits
    (``PROJECT``), and the database holds 20 characters (PostgreSQL refuses more, SQLite
    does not check).
    """
    if isinstance(project_id, str) and _PROJECT_ID.fullmatch(project_id):
        return None
    return f"project id {project_id!r} must be 1-20 characters of A-Z a-z 0-9 _"


def create_project(
    session: Session,
    project_id: str,
    *,
    priority: int,
    secure_key: str | None = None,
    description: str = "",
) -> Project:
    """Create an observing project, optionally protected by a secure key (stored hashed).

    Raises
    ------
    ValueError
        For an id outside ``A-Za-z0-9_`` (1-20 characters).
    Conflict
        If the project exists.
    """
    problem = project_id_problem(project_id)
    if problem:
        raise ValueError(problem)
    if session.get(Project, project_id) is not None:
        raise Conflict(f"project {project_id!r} already exists")
    project = Project(
        id=project_id,
        priority=priority,
        description=description,
        secure_key_hash=hash_secret(secure_key) if secure_key else None,
    )
    session.add(project)
    session.flush()
    return project


def check_project_key(project: Project, secure_key: str | None) -> bool:
    """Whether ``secure_key`` opens ``project`` (a project without a key opens to none)."""
    if project.secure_key_hash is None or not secure_key:
        return False
    return verify_secret(secure_key, project.secure_key_hash)


def reset_api_key(session: Session, user: User, api_key: str | None = None) -> str:
    """Give ``user`` a new API key and return it.

    The old key stops working, and so do the logins made with it (:func:`api_session_token`).
    """
    key = _usable_api_key(session, api_key, user)
    user.api_key_hash = hash_secret(key)
    user.api_key_fingerprint = key_fingerprint(key)
    session.flush()
    return key


def set_project_key(session: Session, project: Project, secure_key: str | None) -> None:
    """Protect ``project`` with ``secure_key`` (stored hashed), or open it with None."""
    project.secure_key_hash = hash_secret(secure_key) if secure_key else None
    session.flush()


#: The shortest portal password accepted.
MIN_PASSWORD_LENGTH = 8


def set_password(session: Session, user: User, password: str) -> None:
    """Give ``user`` a portal password (stored as a scrypt hash); their portal sessions end.

    Raises
    ------
    ValueError
        If the password is shorter than :data:`MIN_PASSWORD_LENGTH` characters.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password must be at least {MIN_PASSWORD_LENGTH} characters long")
    user.password_hash = hash_secret(password)
    end_portal_sessions(session, user)
    session.execute(delete(SignInFailures).where(SignInFailures.name_digest == _digest(user.name)))


#: Failed sign-ins under a name that are answered at once; after them each attempt waits
#: ``SIGN_IN_FIRST_WAIT_S`` seconds after the last failure, doubling with every further
#: failure up to ``SIGN_IN_MAX_WAIT_S``. DESIGN: a person who mistypes gets five tries
#: and then seconds; a robot guessing one user's password gets about a hundred guesses a
#: day (scrypt bounds only how fast each is checked), and a victim whose name a robot
#: tries can still sign in every 15 minutes (a lock-out would let anyone lock anyone out).
SIGN_IN_FREE_FAILURES = 5
SIGN_IN_FIRST_WAIT_S = 1
SIGN_IN_MAX_WAIT_S = 900
#: Failures older than this are forgotten (and their rows deleted).
SIGN_IN_FORGET_AFTER = timedelta(days=1)


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


def sign_in_wait_s(failures: int) -> int:
    """Seconds an attempt must wait after the last of ``failures`` failed sign-ins."""
    if failures < SIGN_IN_FREE_FAILURES:
        return 0
    doublings = min(failures - SIGN_IN_FREE_FAILURES, 30)
    return int(min(SIGN_IN_MAX_WAIT_S, SIGN_IN_FIRST_WAIT_S * 2**doublings))


def _record_sign_in_failure(session: Session, digest: str, now: datetime) -> None:
    """Count a failure under ``digest``: one statement (an upsert), so that attempts at the
    same moment each count (a read and a write would let one lose the other's)."""
    session.execute(
        delete(SignInFailures).where(SignInFailures.last_failure < now - SIGN_IN_FORGET_AFTER)
    )
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    insert = dialect.insert(SignInFailures).values(name_digest=digest, failures=1, last_failure=now)
    session.execute(
        insert.on_conflict_do_update(
            index_elements=[SignInFailures.name_digest],
            set_={"failures": SignInFailures.failures + 1, "last_failure": now},
        )
    )


def authenticate_password(
    session: Session, name: str, password: str, *, now: datetime | None = None
) -> User:
    """The user signing in to the portal with ``name`` and ``password``.

    Failures are counted per name, known or not (:data:`SIGN_IN_FREE_FAILURES`); a
    success clears them.

    Raises
    ------
    TooManyRequests
        While the name's failures make attempts wait (checked before the password, and
        not counted as a failure).
    Unauthorized
        For an unknown name, a user without a password or a wrong password (one message
        for all three, so the reply does not tell which names exist).
    """
    now = now or utcnow()
    digest = _digest(name)
    # As the database has it now (the failures are counted by statements, not this object).
    failed = session.get(SignInFailures, digest, populate_existing=True)
    if failed is not None and failed.last_failure >= now - SIGN_IN_FORGET_AFTER:
        ready_at = failed.last_failure + timedelta(seconds=sign_in_wait_s(failed.failures))
        if ready_at > now:
            wait_s = math.ceil((ready_at - now).total_seconds())
            raise TooManyRequests(
                f"too many failed sign-ins under this name: try again in {wait_s} s",
                retry_after_s=wait_s,
            )
    user = session.scalar(select(User).where(User.name == name))
    if user is None or user.password_hash is None:
        hash_secret(password or "-")  # the same time as a real check, for unknown names too
    elif verify_secret(password, user.password_hash):
        if failed is not None:
            session.delete(failed)
        return user
    _record_sign_in_failure(session, digest, now)
    raise Unauthorized("unknown user name or wrong password")


# ----------------------------------------------------------------------------------------------
# Sessions: the signed cookies of /api/api_login and of the portal's sign-in.

#: How long a sign-in lasts (giant-squid logs in for every command; mwa_client per run).
SESSION_MAX_AGE_S = 7 * 86_400

#: ``api``: made by ``/api/api_login`` from an API key; it authenticates every ``/api`` call.
#: ``portal``: made by the portal's sign-in from a password; a browser sends it on other
#: sites' top-level navigations too (SameSite=Lax), so it only opens pages and the ``/api``
#: calls that change nothing.
SessionKind = Literal["api", "portal"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _microseconds(moment: datetime) -> int:
    """Whole microseconds since 1970 (exact: no float rounding)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def api_session_token(user: User, key: bytes) -> str:
    """The signed value of the cookie ``/api/api_login`` sets.

    It names the user and the fingerprint of the API key it was made with, so it stops
    working when the key changes (:func:`reset_api_key`).
    """
    return sign_value(f"api:{user.id}:{user.api_key_fingerprint}", key)


def portal_session_token(user: User, key: bytes, *, now: datetime | None = None) -> str:
    """The signed value of the portal's sign-in cookie.

    It names the user and the moment of signing in (microseconds), so
    :func:`end_portal_sessions` ends it.
    """
    return sign_value(f"portal:{user.id}:{_microseconds(now or utcnow())}", key)


def session_user(session: Session, token: str | None, key: bytes, kind: SessionKind) -> User | None:
    """The user a session cookie of ``kind`` was issued to, while it is valid.

    None for a missing, forged, malformed or expired (older than :data:`SESSION_MAX_AGE_S`)
    token, one of another kind, one of a user who is gone, an ``api`` token made with a key
    the user no longer has, and a ``portal`` token made before the user's portal sessions
    were ended.
    """
    value = None if not token else unsign_value(token, key, max_age_s=SESSION_MAX_AGE_S)
    if value is None:
        return None
    parts = value.split(":")
    if len(parts) != 3 or parts[0] != kind or not is_ascii_digits(parts[1]):
        return None
    user = session.get(User, int(parts[1]))
    if user is None:
        return None
    if kind == "api":
        current = hmac.compare_digest(parts[2], user.api_key_fingerprint)
    else:
        ended = user.portal_sessions_valid_after
        current = is_ascii_digits(parts[2]) and (
            ended is None or int(parts[2]) >= _microseconds(ended)
        )
    return user if current else None


def end_portal_sessions(session: Session, user: User, *, now: datetime | None = None) -> None:
    """End every portal session of ``user`` made until now, in every browser."""
    user.portal_sessions_valid_after = now or utcnow()
    session.flush()
