"""Creating and authenticating users and projects."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from observatory.core.errors import Conflict, Unauthorized
from observatory.core.models import Project, User
from observatory.core.security import hash_secret, key_fingerprint, new_api_key, verify_secret

_USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")
_PROJECT_ID = re.compile(r"^[A-Za-z0-9_]{1,20}$")


def create_user(
    session: Session,
    name: str,
    api_key: str | None = None,
    *,
    email: str | None = None,
    is_admin: bool = False,
) -> tuple[User, str]:
    """Create a user and return it with its API key (the only time the key is seen in clear).

    Raises
    ------
    ValueError
        If the name has characters outside ``A-Za-z0-9_.@-`` or the key is too short.
    Conflict
        If a user of that name exists.
    """
    if not _USER_NAME.match(name):
        raise ValueError(f"user name {name!r} must be 1-100 characters of A-Z a-z 0-9 _ . @ -")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise Conflict(f"user {name!r} already exists")
    key = api_key if api_key is not None else new_api_key()
    if len(key) < 8:
        raise ValueError("an API key must be at least 8 characters long")
    user = User(
        name=name,
        email=email,
        api_key_hash=hash_secret(key),
        api_key_fingerprint=key_fingerprint(key),
        is_admin=is_admin,
    )
    session.add(user)
    session.flush()
    return user, key


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
    if not _PROJECT_ID.match(project_id):
        raise ValueError(f"project id {project_id!r} must be 1-20 characters of A-Z a-z 0-9 _")
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
    """Whether ``secure_key`` opens ``project`` (a project without a key is open to all)."""
    if project.secure_key_hash is None:
        return True
    return bool(secure_key) and verify_secret(secure_key or "", project.secure_key_hash)


def reset_api_key(session: Session, user: User, api_key: str | None = None) -> str:
    """Give ``user`` a new API key (the old one stops working) and return it."""
    key = api_key if api_key is not None else new_api_key()
    if len(key) < 8:
        raise ValueError("an API key must be at least 8 characters long")
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
    """Give ``user`` a portal password (stored as a scrypt hash).

    Raises
    ------
    ValueError
        If the password is shorter than :data:`MIN_PASSWORD_LENGTH` characters.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password must be at least {MIN_PASSWORD_LENGTH} characters long")
    user.password_hash = hash_secret(password)
    session.flush()


def authenticate_password(session: Session, name: str, password: str) -> User:
    """The user signing in to the portal with ``name`` and ``password``.

    Raises
    ------
    Unauthorized
        For an unknown name, a user without a password or a wrong password (one message
        for all three, so the reply does not tell which names exist).
    """
    user = session.scalar(select(User).where(User.name == name))
    if user is None or user.password_hash is None:
        hash_secret(password)  # the same time as a real check, for unknown names too
    elif verify_secret(password, user.password_hash):
        return user
    raise Unauthorized("unknown user name or wrong password")
