"""Errors the services raise, and how they become HTTP answers.

Every error reply is JSON ``{"error": <message>, "error_code": <int>}``, the shape
the MWA ASVO clients expect; other services use it too so there is one shape. A browser
(a request that asks for ``text/html``) gets the same message as a small page instead.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping
from urllib.parse import quote_from_bytes, unquote_to_bytes

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ProgrammingError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from observatory.core.config import DataDirectoryMissing
from observatory.core.observability import current_request_id

log = logging.getLogger(__name__)

#: The status a request whose client went away is recorded with (nginx's).
CLIENT_CLOSED_REQUEST = 499

#: The most bytes a request body may hold, as sent, whatever its type (a form, JSON, a
#: multipart form: no route takes an upload). DESIGN: the largest real bodies, an ASVO job
#: (a dozen fields), a trigger call with tens of targets, a Grafana query, are a few KB; a
#: body is refused at 1 MiB while it is read, so a huge one costs neither memory, disk
#: (Starlette spools a multipart form's files to disk) nor time (nginx lets 16 MiB through).
#: A module constant rather than a setting: no deployment needs another value.
MAX_FORM_BODY_BYTES = 1 << 20
#: Form bodies above this many bytes are checked and escaped in a worker thread: the
#: check's %-decoding is Python work per escape, which must not hold up the event loop.
_CHECK_IN_THREAD_BYTES = 64 << 10


class ServiceError(Exception):
    """An error a service reports to its caller, with an HTTP status and a code."""

    status_code = 400
    error_code = 1

    def __init__(
        self,
        message: str,
        *,
        error_code: int | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if error_code is not None:
            self.error_code = error_code
        #: More keys for the JSON body (e.g. the ASVO's ``job_id`` of a duplicate job).
        self.extra = extra or {}

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries, whatever its form (JSON, or a page)."""
        return {}


class BadRequest(ServiceError):
    """The request is malformed or names impossible values (HTTP 400)."""

    status_code = 400


class NotFound(ServiceError):
    """The thing asked for does not exist (HTTP 404)."""

    status_code = 404


class Conflict(ServiceError):
    """The request clashes with the current state (HTTP 409)."""

    status_code = 409


class Unauthorized(ServiceError):
    """No valid credentials (HTTP 401)."""

    status_code = 401


class Forbidden(ServiceError):
    """Valid credentials, but not allowed (HTTP 403)."""

    status_code = 403


class PayloadTooLarge(ServiceError):
    """The request body is larger than the service reads (HTTP 413)."""

    status_code = 413

    @property
    def headers(self) -> dict[str, str]:
        return {"connection": "close"}  # the rest of the body is never read


class TooManyRequests(ServiceError):
    """Refused for now: asked too often (HTTP 429); ``retry_after_s`` says when to try again."""

    status_code = 429

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)}


class ServiceUnavailable(ServiceError):
    """Something the service needs is away for now (HTTP 503): the database, the data
    directory. ``retry_after_s`` says when to try again."""

    status_code = 503
    error_code = 503

    def __init__(self, message: str, *, retry_after_s: int = 30) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)}


def body_too_large_message(what: str, limit: int) -> str:
    """Why a body of more than ``limit`` bytes is refused; ``what`` names the body."""
    return f"{what} is larger than {limit} bytes ({limit / (1 << 20):g} MiB), the most it may hold"


def error_body(message: str, error_code: int) -> dict[str, object]:
    """The JSON body of every error reply."""
    return {"error": message, "error_code": error_code}


def _wants_html(request: Request) -> bool:
    """A browser navigating or posting a form (it asks for HTML); clients ask for JSON or */*."""
    return "text/html" in request.headers.get("accept", "")


def _error_page(message: str, status_code: int) -> HTMLResponse:
    """The error as a small page, for people in a browser."""
    text = html.escape(message)
    return HTMLResponse(
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Error {status_code}'
        f'</title></head><body style="font-family:system-ui,sans-serif;margin:2em"><h1>Error '
        f'{status_code}</h1><p role="alert" id="error-message">{text}</p>'
        '<p><a href="javascript:history.back()">Back</a> · <a href="/">Home</a></p></body></html>',
        status_code=status_code,
    )


#: The bytes a query string or form body keeps as they are: all of ASCII (``%``, ``+``,
#: ``&`` and ``=`` included); only raw non-ASCII bytes are %-escaped.
_ASCII_BYTES = bytes(range(0x80))


class CheckFormParameters:
    """ASGI middleware: the query string and a form body must be UTF-8 text without NUL, and
    any request body at most ``max_body_bytes`` (:data:`MAX_FORM_BODY_BYTES`) long.

    A NUL character (``%00``) is answered 400: no parameter of ours may hold one, and
    PostgreSQL refuses NUL in text, so such a value would otherwise fail deep in a query as
    a server error. Text that is not UTF-8 is answered 400 rather than read as something
    else (Starlette would read it as latin-1, or put U+FFFD in place of an escape); raw
    UTF-8 bytes are escaped (:func:`_escaped_parameters`) so they are read as what was sent.

    Form bodies are read here and handed on, only for a request some route takes (method
    and path): any other (a POST to a GET-only path, an unknown path) is answered 405 or
    404 by the router without its body being read. A body is read only up to the limit:
    one that declares more (``Content-Length``) is refused before any of it is read, one
    that sends more is refused at the first chunk beyond it, 413 with ``Connection:
    close`` (the server then drops the rest instead of reading it). Other bodies (JSON,
    multipart forms) are handed on as they arrive, counted: the handler reading past the
    limit gets :class:`PayloadTooLarge`, answered as every service error is.
    """

    def __init__(
        self,
        app: ASGIApp,
        error_codes: Mapping[str, int] | None = None,
        max_body_bytes: int = MAX_FORM_BODY_BYTES,
    ) -> None:
        self.app = app
        self.error_codes = dict(error_codes or {})
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"")
        if query:
            escaped = _escaped_parameters(query, "the query string")
            if isinstance(escaped, str):
                await self._refuse(scope, receive, send, escaped)
                return
            if escaped is not query:
                scope = {**scope, "query_string": escaped}
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        # As Starlette matches it (any case, spaces around), so no form goes unchecked.
        is_form = (
            content_type.split(b";")[0].strip().lower() == b"application/x-www-form-urlencoded"
        )
        too_large = body_too_large_message(
            "the form body" if is_form else "the request body", self.max_body_bytes
        )
        declared = _content_length(scope)
        # Matching the routes costs a little per request: only for a form, or a refusal.
        if (is_form or (declared or 0) > self.max_body_bytes) and not _routed(scope):
            await self.app(scope, receive, send)
            return
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(scope, receive, send, too_large, status_code=413)
            return
        if not is_form:  # the router answers an unrouted one without reading its body
            await self.app(scope, self._counted(scope, receive, too_large), send)
            return
        chunks: list[bytes] = []
        size = 0
        message = await receive()
        while message["type"] == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:  # a chunked body, or one longer than declared
                await self._refuse(scope, receive, send, too_large, status_code=413)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
            message = await receive()
        body = b"".join(chunks)
        escaped_body = (
            await anyio.to_thread.run_sync(_escaped_parameters, body, "the form body")
            if size > _CHECK_IN_THREAD_BYTES
            else _escaped_parameters(body, "the form body")
        )
        if isinstance(escaped_body, str):
            await self._refuse(scope, receive, send, escaped_body)
            return
        if len(escaped_body) != size:  # escaped: the length it now has
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(escaped_body)).encode()))
            scope = {**scope, "headers": headers}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            if message["type"] != "http.request":
                return message  # the client went away while sending
            return {"type": "http.request", "body": escaped_body, "more_body": False}

        await self.app(scope, replay, send)

    def _counted(self, scope: Scope, receive: Receive, too_large: str) -> Receive:
        """``receive``, raising :class:`PayloadTooLarge` at the first chunk beyond the limit."""
        size = 0

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_body_bytes:
                    raise PayloadTooLarge(too_large, error_code=self._error_code(scope))
            return message

        return counted

    def _error_code(self, scope: Scope) -> int:
        """The ``error_code`` of a refusal under this path (the ASVO's 0 under ``/api/``)."""
        path = scope.get("path", "")
        return next(
            (code for prefix, code in self.error_codes.items() if path.startswith(prefix)),
            ServiceError.error_code,
        )

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, message: str, status_code: int = 400
    ) -> None:
        """Answer ``message`` in the one error shape (a page for browsers)."""
        code = self._error_code(scope)
        response: Response
        if _wants_html(Request(scope)):
            response = _error_page(message, status_code)
        else:
            response = JSONResponse(error_body(message, code), status_code=status_code)
        if status_code == 413:
            # The rest of the body is never read: the connection cannot carry another
            # request after it, and closing it spares the server reading it to discard it.
            response.headers["connection"] = "close"
        await response(scope, receive, send)


def _routed(scope: Scope) -> bool:
    """Whether a route of the application takes the request as it is (method and path).

    True when the application is not known (the middleware around a bare ASGI app):
    then every form is checked.
    """
    router = getattr(scope.get("app"), "router", None)
    if router is None:
        return True
    return any(route.matches(scope)[0] == Match.FULL for route in router.routes)


def _content_length(scope: Scope) -> int | None:
    """The body length a request declares, if it declares a readable one."""
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            text = value.strip()
            return int(text) if text.isdigit() else None
    return None


def _escaped_parameters(data: bytes, what: str) -> bytes | str:
    """A query string or urlencoded body with its raw non-ASCII bytes %-escaped, or why it is
    refused: a NUL, or text (raw or %-escaped) that is not UTF-8.

    Starlette reads a raw byte of a form or query as latin-1 (``curl -d 'x=é'`` sends the
    two bytes of UTF-8's é unescaped, and arrived as ``Ã©``) but a %-escape as UTF-8.
    Escaped, the raw bytes are read as UTF-8 too, as the clients that escape get them.
    The escape is ``quote_from_bytes`` keeping all of ASCII: a table look-up per byte done
    in C (``%C3%A9``, upper case, as before), not a Python call per byte.
    """
    if b"%00" in data or b"\x00" in data:
        return "request parameters must not contain NUL characters (%00)"
    try:
        unquote_to_bytes(data.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        return f"{what} is not UTF-8 text"
    if data.isascii():
        return data
    return quote_from_bytes(data, safe=_ASCII_BYTES).encode("ascii")


class CatchUnhandledErrors:
    """ASGI middleware: an exception no handler took is logged and answered 500 in the one shape.

    Without it Starlette's outermost middleware answers ``text/plain`` "Internal Server
    Error" and uvicorn logs the traceback after the request's context has ended, so the
    line has no request id. Installed inside the request-id middleware, this logs the
    traceback (logger ``observatory.core.errors``) with the request's id and answers
    ``{"error": ..., "error_code": 500}`` naming the id (a page for browsers). When the
    response had already started, the error is logged and re-raised: the server then
    drops the connection, the only honest end of a half-sent body.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except ClientDisconnect:
            # The client went away before its request was read: no fault of the server's.
            # Answered (to no one) 499, nginx's "client closed request", so the access log
            # and the metrics count it as the client's, not as a 5xx.
            log.info("client closed the connection during %s %s (request id %s)",
                     scope.get("method"), scope.get("path"), current_request_id() or "-")  # fmt: skip
            if not started:
                await Response(status_code=CLIENT_CLOSED_REQUEST)(scope, receive, watch)
        except Exception:
            request_id = current_request_id()
            log.exception(
                "unhandled error answering %s %s (request id %s)",
                scope.get("method"),
                scope.get("path"),
                request_id or "-",
                extra={"method": scope.get("method"), "path": scope.get("path")},
            )
            if started:
                raise
            message = "internal server error" + (
                f" (request id {request_id})" if request_id else ""
            )
            response: Response
            if _wants_html(Request(scope)):
                response = _error_page(message, 500)
            else:
                response = JSONResponse(error_body(message, 500), status_code=500)
            await response(scope, receive, send)


def install_error_handlers(
    app: FastAPI, parameter_error_codes: Mapping[str, int] | None = None
) -> None:
    """Make every error reply of ``app`` JSON in the one shape (a page for browsers).

    Call it before :func:`~observatory.core.observability.install_observability`, so that
    unhandled errors are caught inside the request-id middleware (their log line and
    reply carry the request's id). ``parameter_error_codes`` maps path prefixes to the
    ``error_code`` that a request refused for a NUL character, or for parameters that are
    not UTF-8 text, gets there (the ASVO's clients read 0 as "invalid input", 1 as a server
    failure); elsewhere it is 1.
    """
    app.add_middleware(CatchUnhandledErrors)
    app.add_middleware(CheckFormParameters, error_codes=parameter_error_codes)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return _service_error_response(request, exc)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(ProgrammingError)
    async def _database_error(request: Request, exc: Exception) -> Response:
        reason = database_unavailable_reason(exc) if isinstance(exc, DBAPIError) else None
        if reason is not None and reason[0] == SCHEMA_NOT_MIGRATED:
            engine = getattr(request.app.state, "engine", None)
            if engine is not None and await anyio.to_thread.run_sync(_at_head, engine):
                reason = None  # migrated, and still a table missing: a bug (a model without
                # its migration, a misspelt table), not something db upgrade mends
        if reason is None:
            raise exc  # a bug (bad SQL, a missing column): a 500 with its traceback
        message, detail = reason
        _log_unavailable(request, f"{message} ({detail})")
        return _service_error_response(request, ServiceUnavailable(message))

    @app.exception_handler(DataDirectoryMissing)
    async def _data_dir_missing(request: Request, exc: DataDirectoryMissing) -> Response:
        # An outage of the installation, not a bug: one line without a traceback. The path
        # is the operator's to know (the log), not every visitor's.
        _log_unavailable(request, str(exc))
        return _service_error_response(
            request, ServiceUnavailable("service unavailable: its storage is not available")
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc'] if part not in ('query', 'body', 'path'))}: {err['msg']}"
            for err in exc.errors()
        )
        return JSONResponse(error_body(f"invalid request: {problems}", 1), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Its headers too: a 405 must say which methods are allowed (RFC 9110 section 15.5.6).
        response: Response
        if _wants_html(request):
            response = _error_page(str(exc.detail), exc.status_code)
        else:
            body = error_body(str(exc.detail), exc.status_code)
            response = JSONResponse(body, status_code=exc.status_code)
        response.headers.update(exc.headers or {})
        return response


def _service_error_response(request: Request, exc: ServiceError) -> Response:
    """``exc`` in the one error shape (a page for browsers), with its headers."""
    response: Response
    if _wants_html(request):
        response = _error_page(exc.message, exc.status_code)
    else:
        body = {**error_body(exc.message, exc.error_code), **exc.extra}
        response = JSONResponse(body, status_code=exc.status_code)
    response.headers.update(exc.headers)
    return response


#: PostgreSQL error codes (SQLSTATE) of a server that is away for now: connection
#: exceptions (class 08), too little memory, disk or connections (class 53), shut down or
#: starting (57P01 to 57P03).
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "53", "57P01", "57P02", "57P03")
#: A table the query needs is not there: the schema was never migrated (PostgreSQL's
#: undefined_table, SQLite's message).
_UNDEFINED_TABLE_SQLSTATE = "42P01"
#: SQLite's messages of a database file that cannot be used for now.
_SQLITE_UNAVAILABLE = ("unable to open database file", "database is locked", "disk i/o error")


#: The 503's message of a missing table in a database not at the shipped head revision.
SCHEMA_NOT_MIGRATED = (
    "database unavailable: its schema is not migrated (a table is missing); the operator "
    "must run observatory db upgrade"
)


def _at_head(engine: Engine) -> bool:
    """Whether the database is at the newest revision this version ships (or cannot say)."""
    from observatory.core.migrate import current_revision, head_revision

    try:
        return current_revision(engine) == head_revision()
    except DBAPIError:
        return False


def database_unavailable_reason(exc: DBAPIError) -> tuple[str, str] | None:
    """Why ``exc`` means the database is unavailable, or None when it is a bug of ours.

    Only a connection that cannot be made or was lost, a server shutting down or out of
    resources, and a missing table (:data:`SCHEMA_NOT_MIGRATED`; the handler then checks
    that the database is not at the head revision, where a missing table is a bug) count:
    a syntax error or a missing column stays an error of the code, answered 500 with its
    traceback.

    Returns
    -------
    tuple of str, or None
        The message for the caller (``database unavailable: ...``; no host or user
        names), and the driver's first line of detail for the log.
    """
    original = exc.orig
    detail = (str(original).strip().splitlines() or [type(original).__name__])[0]
    sqlstate = getattr(original, "sqlstate", None)
    lowered = detail.lower()
    if sqlstate == _UNDEFINED_TABLE_SQLSTATE or lowered.startswith("no such table"):
        return SCHEMA_NOT_MIGRATED, detail
    from_psycopg = type(original).__module__.startswith("psycopg")
    connection_lost = (
        exc.connection_invalidated
        # psycopg: a failed connect, or a connection the server closed, has no SQLSTATE.
        or (
            isinstance(exc, OperationalError)
            and from_psycopg
            and (sqlstate is None or sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES))
        )
        or (isinstance(exc, OperationalError) and lowered.startswith(_SQLITE_UNAVAILABLE))
    )
    if not connection_lost:
        return None
    return (
        f"database unavailable: it cannot be reached ({type(original).__name__}); try again later",
        detail,
    )


def _log_unavailable(request: Request, message: str) -> None:
    """The WARNING line of a request answered 503 because something it needs is away."""
    log.warning(
        "service unavailable answering %s %s (request id %s): %s",
        request.method,
        request.url.path,
        current_request_id() or "-",
        message,
        extra={"method": request.method, "path": request.url.path},
    )
