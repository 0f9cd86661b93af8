"""What HTTP handlers share: the session dependency, the archive storage, obsid, number and JSON parsing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from observatory.core.database import MAX_SQL_INTEGER
from observatory.core.errors import BadRequest
from observatory.core.gpstime import parse_obsid, utc_to_gps
from observatory.core.storage import Storage


def loads_request_json(text: str | bytes) -> Any:
    """``json.loads`` for what a caller sent: every failure is a ``json.JSONDecodeError``.

    ``json.loads`` raises ``RecursionError`` for deeply nested arrays (``[[[[...``), which
    would otherwise escape the handlers' ``ValueError`` and become a 500.
    """
    try:
        return json.loads(text)
    except RecursionError:
        document = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        raise json.JSONDecodeError("nested too deeply", document, 0) from None


def get_session(request: Request) -> Iterator[Session]:
    """A database session per request: committed if the handler succeeds, else rolled back."""
    session: Session = request.app.state.session_factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_archive_storage(request: Request) -> Storage:
    """The storage holding observation files."""
    storage: Storage = request.app.state.archive_storage
    return storage


def obsid_param(value: str) -> int:
    """Parse an ``obs_id`` query value, answering 400 with the reason if it is malformed."""
    try:
        return parse_obsid(value)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


def whole_number_param(
    name: str, value: str, *, what: str = "a whole number", high: int = MAX_SQL_INTEGER
) -> int:
    """Parse a query value that must be a whole number 0..``high``, answering 400 naming ``name``.

    Decimal digits only (``str.isdigit`` also takes superscripts, which ``int`` refuses),
    and never above what a database column holds.
    """
    text = value.strip()
    if not text.isdecimal():
        raise BadRequest(f"{name} must be {what}, not {value!r}")
    number = int(text)
    if number > high:
        raise BadRequest(f"{name} {value!r} is out of range (0 .. {high})")
    return number


def gps_time_param(name: str, value: str | None) -> float | None:
    """GPS seconds from a value holding GPS seconds or an ISO time (blank or absent: None).

    An ISO time without a zone is UTC; one with a zone (``Z``, ``+08:00``) is converted.

    Raises
    ------
    BadRequest
        Naming ``name`` when the value is neither, or beyond what a database column holds.
    """
    text = (value or "").strip()
    if not text:
        return None
    if text.replace(".", "", 1).isdecimal():
        seconds = float(text)
        if seconds > MAX_SQL_INTEGER:
            raise BadRequest(f"{name} {value!r} is out of range (0 .. {MAX_SQL_INTEGER})")
        return seconds
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{name}: {value!r} is neither GPS seconds nor a UTC time like 2026-11-30T12:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return utc_to_gps(moment)


def templates_for(package_dir: Path) -> Jinja2Templates:
    """Jinja2 templates from a domain's ``templates/`` directory."""
    return Jinja2Templates(directory=str(package_dir / "templates"))
