"""Errors the services raise, and how they become HTTP answers.

Every error reply is JSON ``{"error": <message>, "error_code": <int>}``, the shape
the MWA ASVO clients expect; other services use it too so there is one shape. A browser
(a request that asks for ``text/html``) gets the same message as a small page instead.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Mapping
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from observatory.core.observability import current_request_id

log = logging.getLogger(__name__)

#: The status a request whose client went away is recorded with (nginx's).
CLIENT_CLOSED_REQUEST = 499


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


_NON_ASCII_BYTE = re.compile(rb"[\x80-\xff]")


class CheckFormParameters:
    """ASGI middleware: the query string and a form body must be UTF-8 text without NUL.

    A NUL character (``%00``) is answered 400: no parameter of ours may hold one, and
    PostgreSQL refuses NUL in text, so such a value would otherwise fail deep in a query as
    a server error. Text that is not UTF-8 is answered 400 rather than read as something
    else (Starlette would read it as latin-1, or put U+FFFD in place of an escape); raw
    UTF-8 bytes are escaped (:func:`_escaped_parameters`) so they are read as what was sent.
    Form bodies are read here and handed on; other bodies (JSON, uploads) pass untouched.
    """

    def __init__(self, app: ASGIApp, error_codes: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.error_codes = dict(error_codes or {})

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
        if content_type.split(b";")[0].strip().lower() != b"application/x-www-form-urlencoded":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        message = await receive()
        while message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
            message = await receive()
        escaped_body = _escaped_parameters(b"".join(chunks), "the form body")
        if isinstance(escaped_body, str):
            await self._refuse(scope, receive, send, escaped_body)
            return
        if len(escaped_body) != sum(map(len, chunks)):  # escaped: the length it now has
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

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, message: str) -> None:
        path = scope.get("path", "")
        code = next(
            (code for prefix, code in self.error_codes.items() if path.startswith(prefix)),
            ServiceError.error_code,
        )
        await JSONResponse(error_body(message, code), status_code=400)(scope, receive, send)


def _escaped_parameters(data: bytes, what: str) -> bytes | str:
    """A query string or urlencoded body with its raw non-ASCII bytes %-escaped, or why it is
    refused: a NUL, or text (raw or %-escaped) that is not UTF-8.

    Starlette reads a raw byte of a form or query as latin-1 (``curl -d 'x=é'`` sends the
    two bytes of UTF-8's é unescaped, and arrived as ``Ã©``) but a %-escape as UTF-8.
    Escaped, the raw bytes are read as UTF-8 too, as the clients that escape get them.
    """
    if b"%00" in data or b"\x00" in data:
        return "request parameters must not contain NUL characters (%00)"
    try:
        unquote_to_bytes(data.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        return f"{what} is not UTF-8 text"
    if not _NON_ASCII_BYTE.search(data):
        return data
    return _NON_ASCII_BYTE.sub(lambda byte: b"%%%02X" % byte[0][0], data)


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
        if _wants_html(request):
            return _error_page(exc.message, exc.status_code)
        body = {**error_body(exc.message, exc.error_code), **exc.extra}
        return JSONResponse(body, status_code=exc.status_code)

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
