"""Errors the services raise, and how they become HTTP answers.

Every error reply is JSON ``{"error": <message>, "error_code": <int>}``, the shape
the MWA ASVO clients expect; other services use it too so there is one shape.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


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


def install_error_handlers(app: FastAPI) -> None:
    """Make every error reply of ``app`` JSON in the one shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
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
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), exc.status_code), status_code=exc.status_code
        )
