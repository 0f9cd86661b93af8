"""What HTTP handlers share: the session dependency, the archive storage, form, obsid, number and
JSON parsing."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from observatory.core.database import MAX_SQL_INTEGER
from observatory.core.errors import BadRequest
from observatory.core.gpstime import parse_obsid, utc_to_gps
from observatory.core.storage import Storage
from observatory.core.text import is_ascii_digits, size_text


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


#: Fields a form may hold, and characters a field's value may hold: no form of ours needs
#: more, and a UWS job keeps fields it does not know (one request could otherwise store
#: megabytes in the job's row).
MAX_FORM_FIELDS = 100
MAX_FORM_VALUE_CHARS = 10_000
#: Control characters other than tab, line feed and carriage return, lone surrogates and
#: the non-characters U+FFFE and U+FFFF: XML 1.0 (UWS job documents) cannot hold them,
#: and PostgreSQL refuses NUL in text.
_CONTROL_CHARACTER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")
_JSON_TYPE = re.compile(r"application/(?:[\w.+-]*\+)?json\b")


def check_text_value(name: str, value: str) -> str:
    """``value`` if a parameter may hold it: no control character, at most
    :data:`MAX_FORM_VALUE_CHARS` characters.

    Raises
    ------
    BadRequest
        Naming ``name`` and what is wrong with its value.
    """
    if _CONTROL_CHARACTER.search(value):
        raise BadRequest(
            f"{name} holds a control character (such as NUL or ESC) or a non-character"
        )
    if len(value) > MAX_FORM_VALUE_CHARS:
        raise BadRequest(f"{name} is longer than {MAX_FORM_VALUE_CHARS} characters")
    return value


async def read_form(request: Request) -> dict[str, str]:
    """The fields of a posted form (urlencoded or multipart), each given once, as text.

    Raises
    ------
    BadRequest
        For a JSON body (the services take forms, as the MWA clients send them), a file
        where text is expected, a field given twice (the last would silently win), more
        than :data:`MAX_FORM_FIELDS` fields, or a value :func:`check_text_value` refuses.
    """
    if _JSON_TYPE.match(request.headers.get("content-type", "").strip().lower()):
        raise BadRequest(
            "parameters are read from a form (application/x-www-form-urlencoded or "
            "multipart/form-data), not from a JSON body"
        )
    too_many = f"a form may hold at most {MAX_FORM_FIELDS} fields"
    try:
        form = await request.form(max_fields=MAX_FORM_FIELDS, max_files=MAX_FORM_FIELDS)
    except HTTPException as exc:  # Starlette's, for a form it cannot parse within the limits
        raise BadRequest(too_many if "Too many" in str(exc.detail) else str(exc.detail)) from None
    if len(form) > MAX_FORM_FIELDS:  # max_fields counts text fields only, max_files files
        raise BadRequest(too_many)
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        check_text_value("a field name", key)
        if isinstance(value, UploadFile):
            raise BadRequest(f"{key} is a file; it must be a text value")
        if key in fields:
            raise BadRequest(f"{key} is given more than once; give it once")
        fields[key] = check_text_value(key, value)
    return fields


def is_secure(connection: HTTPConnection) -> bool:
    """Whether the client reached us over TLS (``https``, ``wss``: the scheme uvicorn took
    from a trusted proxy's ``X-Forwarded-Proto``)."""
    return connection.url.scheme in ("https", "wss")


def host_cookie_name(connection: HTTPConnection, name: str) -> str:
    """``name``, ``__Host-`` prefixed over TLS.

    Browsers accept a ``__Host-`` cookie only from this host over https, Secure, for ``/``
    and without ``Domain``: a sibling subdomain or a plain http page cannot set (or
    overwrite) it. Over plain http the prefix is not allowed (it requires Secure).
    """
    return f"__Host-{name}" if is_secure(connection) else name


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


def obsid_param(value: str, *, name: str = "obsid") -> int:
    """Parse an obsid-valued parameter, answering 400 with the reason (naming ``name``)."""
    try:
        return parse_obsid(value, name)
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
    if not is_ascii_digits(text):
        raise BadRequest(f"{name} must be {what}, not {value!r}")
    number = int(text)
    if number > high:
        raise BadRequest(f"{name} {value!r} is out of range (0 .. {high})")
    return number


def flag_param(name: str, value: str | None, *, default: bool) -> bool:
    """A switch given as 0 or 1, as the MWA's web services take them; blank or absent: ``default``.

    Raises
    ------
    BadRequest
        Naming ``name`` for any other value (``true`` was once silently read as 0).
    """
    if value is None or not value.strip():
        return default
    if value.strip() not in ("0", "1"):
        raise BadRequest(f"{name} must be 0 or 1, not {value!r}")
    return value.strip() == "1"


#: 9999-12-31T23:59:59 UTC in GPS seconds: the latest time a UTC date shows.
LAST_UTC_GPS_S = 253_086_336_017.0


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
    if is_ascii_digits(text.replace(".", "", 1)):
        seconds = float(text)
        if seconds > LAST_UTC_GPS_S:  # a time no UTC date can show (the pages show both)
            raise BadRequest(
                f"{name} {value!r} is out of range (0 .. {LAST_UTC_GPS_S:.0f}, 9999-12-31)"
            )
        return seconds
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{name}: {value!r} is neither GPS seconds nor a UTC time like 2026-11-30T12:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return utc_to_gps(moment)
    except (OverflowError, ValueError):  # its zone moves it past year 1 or 9999
        raise BadRequest(
            f"{name} {value!r} is out of range (0 .. {LAST_UTC_GPS_S:.0f}, 9999-12-31)"
        ) from None


def templates_for(package_dir: Path) -> Jinja2Templates:
    """Jinja2 templates from a domain's ``templates/`` directory (with ``size_text``)."""
    templates = Jinja2Templates(directory=str(package_dir / "templates"))
    templates.env.filters["size_text"] = size_text
    return templates


class AnswerHeadAsGet:
    """ASGI middleware: a HEAD request to a path only GET serves is answered as that GET,
    without its body.

    HTTP asks every general-purpose server to answer HEAD wherever it answers GET (RFC 9110,
    9.3.2; ``curl -I`` and link checkers send it), and FastAPI's routes declare GET alone:
    HEAD was a 405. The GET runs whole (its headers, Content-Length included, are the
    GET's). A route that declares HEAD itself (the ASVO download, which answers without
    reading the file) is left to do so.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or _routed(scope):
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, headers_only)
        finally:
            # The router records the route it chose on the scope it was given: handed back,
            # metrics and the access line name it (they said "unmatched" for every HEAD).
            for key in ("route", "endpoint", "path_params"):
                if key in as_get:
                    scope[key] = as_get[key]


def _routed(scope: Scope) -> bool:
    """Whether a route of the application takes the request as it is (method and path)."""
    routes = scope["app"].router.routes
    return any(route.matches(scope)[0] == Match.FULL for route in routes)


#: Headers every answer carries: no page of the site may be shown inside another site's
#: frame (a page can frame a signed-in portal page invisibly and have the user click its
#: buttons: a new API key, a cancel), and no answer is taken for another type than it says.
_PROTECTIVE_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
)


class RefuseFraming:
    """ASGI middleware adding :data:`_PROTECTIVE_HEADERS` to every HTTP answer (errors too),
    unless the answer set one of them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def protected(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [header for header in _PROTECTIVE_HEADERS if header[0] not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, protected)
