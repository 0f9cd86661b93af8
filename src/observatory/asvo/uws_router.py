"""The ``/uws/asvo`` routes: IVOA UWS 1.1 over the ASVO jobs, for pyvo and other VO tools.

Thin: parse, call :mod:`observatory.asvo.uws`, shape the reply. Documents are
``text/xml``, single values and every error ``text/plain`` (UWS clients show the
body of a refusal; they do not read the ASVO's JSON). docs/uws.md is the guide.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, RedirectResponse
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from observatory.asvo import uws
from observatory.asvo.router import cookie_user_id, download_url_builder
from observatory.core.accounts import authenticate_api_key
from observatory.core.config import Settings
from observatory.core.errors import BadRequest, ServiceError, Unauthorized
from observatory.core.text import is_ascii_digits
from observatory.core.web import check_text_value, get_session, read_form

XML = "text/xml"
#: How often a blocking ``WAIT`` looks at the job's phase.
WAIT_POLL_S = 0.25
#: The challenge of a 401: an API key as a bearer token, or as the password of HTTP Basic.
CHALLENGE = 'Bearer realm="observatory-uws", Basic realm="observatory-uws"'


def _plain_error(exc: ServiceError) -> PlainTextResponse:
    headers = {"WWW-Authenticate": CHALLENGE} if exc.status_code == 401 else None
    return PlainTextResponse(exc.message, status_code=exc.status_code, headers=headers)


class _PlainTextErrorRoute(APIRoute):
    """A route whose refusals are ``text/plain`` messages instead of the ASVO JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def plain_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return _plain_error(exc)
            except RequestValidationError as exc:
                problems = "; ".join(str(error["msg"]) for error in exc.errors())
                return PlainTextResponse(f"invalid request: {problems}", status_code=400)

        return plain_errors


router = APIRouter(prefix="/uws/asvo", tags=["uws"], route_class=_PlainTextErrorRoute)


def _api_key(authorization: str) -> str | None:
    """The API key of an ``Authorization`` header: ``Bearer <key>`` or Basic (any user, key)."""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[2]
    return ""


def uws_user_id(request: Request) -> int:
    """The user: an API key (Bearer or HTTP Basic), else the ASVO login cookie; 401 otherwise."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        key = _api_key(authorization)
        if not key:
            raise Unauthorized("Authorization: use 'Bearer <API key>' or HTTP Basic with the key")
        with request.app.state.session_factory() as session:
            return authenticate_api_key(session, key).id
    user_id = cookie_user_id(request)
    if user_id is None:
        raise Unauthorized(
            "Authentication required: send your API key as 'Authorization: Bearer <key>' "
            "(or as the HTTP Basic password)"
        )
    return user_id


SessionDep = Annotated[Session, Depends(get_session)]
UserDep = Annotated[int, Depends(uws_user_id)]


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _jobs_url(request: Request) -> str:
    return f"{str(request.base_url).rstrip('/')}{router.prefix}"


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _query(request: Request, name: str) -> list[str]:
    """Every value of a query parameter, its name matched without regard to case."""
    return [value for key, value in request.query_params.multi_items() if key.upper() == name]


def _one(fields: dict[str, str], name: str) -> str | None:
    return next((value for key, value in fields.items() if key.upper() == name), None)


async def _fields(request: Request) -> dict[str, str]:
    """The query parameters and the posted form fields (the form wins)."""
    fields = {
        check_text_value("a field name", key): check_text_value(key, value)
        for key, value in request.query_params.items()
    }
    fields.update(await read_form(request))
    return fields


FieldsDep = Annotated[dict[str, str], Depends(_fields)]


def _xml(body: bytes) -> Response:
    return Response(body, media_type=XML)


@router.get("", response_class=Response)
def job_list(request: Request, session: SessionDep, user_id: UserDep) -> Response:
    """The user's jobs (``PHASE`` repeatable, ``AFTER``, ``LAST``), newest first."""
    after, last = _query(request, "AFTER"), _query(request, "LAST")
    filters = uws.parse_list_filter(
        _query(request, "PHASE"), after[-1] if after else None, last[-1] if last else None
    )
    refs = uws.list_jobs(session, user_id, filters)
    return _xml(uws.job_list_document(refs, _jobs_url(request)))


@router.post("", response_class=Response)
def create_job(
    request: Request, session: SessionDep, user_id: UserDep, fields: FieldsDep
) -> Response:
    """A new PENDING job (``PHASE=RUN`` runs it at once): 303 to it; 400 with the reason."""
    row = uws.create_job(session, _settings(request), user_id, fields)
    session.commit()
    return _see_other(f"{_jobs_url(request)}/u{row.id}")


@router.get("/{job_id}", response_class=Response)
async def job(request: Request, job_id: str, user_id: UserDep) -> Response:
    """The job document; ``WAIT=N`` blocks (at most 60 s) while the phase is active and
    unchanged (and, with ``PHASE=P``, only while it is ``P``)."""
    waits = _query(request, "WAIT")
    wait_s = uws.parse_wait(waits[-1] if waits else None)
    expected = uws.parse_phases(_query(request, "PHASE"))
    factory = request.app.state.session_factory

    def read_phase() -> uws.Phase:
        with factory() as session:
            return uws.job_phase(session, user_id, job_id)

    def read_view() -> uws.JobView:
        with factory() as session:
            return uws.get_job(session, user_id, job_id, download_url_builder(request))

    if wait_s > 0:
        phase = await run_in_threadpool(read_phase)
        if phase in uws.ACTIVE_PHASES and (not expected or phase in expected):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s
            while (remaining := deadline - loop.time()) > 0:
                await asyncio.sleep(min(WAIT_POLL_S, remaining))
                if await request.is_disconnected() or await run_in_threadpool(read_phase) != phase:
                    break
    return _xml(uws.job_document(await run_in_threadpool(read_view)))


def _delete(request: Request, session: Session, user_id: int, job_id: str) -> Response:
    uws.delete_job(session, user_id, job_id)
    session.commit()
    return _see_other(_jobs_url(request))


@router.delete("/{job_id}", response_class=Response)
def delete_job(request: Request, session: SessionDep, user_id: UserDep, job_id: str) -> Response:
    """Cancel the job if unfinished and remove it from UWS (the ASVO job is kept): 303 to the list."""
    return _delete(request, session, user_id, job_id)


@router.post("/{job_id}", response_class=Response)
def post_job(
    request: Request, session: SessionDep, user_id: UserDep, job_id: str, fields: FieldsDep
) -> Response:
    """``ACTION=DELETE`` (as DELETE), or ``PHASE=RUN|ABORT`` (as POST to /phase)."""
    action, phase = _one(fields, "ACTION"), _one(fields, "PHASE")
    if action is not None:
        if action.strip().upper() != "DELETE":
            raise BadRequest(f"ACTION: {action!r} is not DELETE")
        return _delete(request, session, user_id, job_id)
    if phase is None:
        raise BadRequest("POST to a job takes ACTION=DELETE or PHASE=RUN|ABORT")
    return _change_phase(request, session, user_id, job_id, phase)


def _change_phase(
    request: Request, session: Session, user_id: int, job_id: str, phase: str
) -> Response:
    canonical = uws.change_phase(session, _settings(request), user_id, job_id, phase)
    session.commit()
    return _see_other(f"{_jobs_url(request)}/{canonical}")


@router.get("/{job_id}/phase", response_class=PlainTextResponse)
def phase(session: SessionDep, user_id: UserDep, job_id: str) -> str:
    """The phase, as text."""
    return uws.job_phase(session, user_id, job_id).value


@router.post("/{job_id}/phase", response_class=Response)
def post_phase(
    request: Request, session: SessionDep, user_id: UserDep, job_id: str, fields: FieldsDep
) -> Response:
    """``PHASE=RUN`` submits a PENDING job, ``PHASE=ABORT`` cancels: 303 to the job."""
    phase = _one(fields, "PHASE")
    if phase is None:
        raise BadRequest("PHASE: Expected RUN or ABORT")
    return _change_phase(request, session, user_id, job_id, phase)


def _view(request: Request, session: Session, user_id: int, job_id: str) -> uws.JobView:
    return uws.get_job(session, user_id, job_id, download_url_builder(request))


@router.get("/{job_id}/executionduration", response_class=PlainTextResponse)
def execution_duration(session: SessionDep, user_id: UserDep, job_id: str) -> str:
    """Always 0: jobs may run as long as they need."""
    uws.job_phase(session, user_id, job_id)
    return "0"


@router.post("/{job_id}/executionduration", response_class=Response)
def post_execution_duration(
    request: Request, session: SessionDep, user_id: UserDep, job_id: str, fields: FieldsDep
) -> Response:
    """Accepted and ignored (the server keeps 0, unlimited, as the standard allows): 303."""
    canonical = uws.canonical_id(session, user_id, job_id)
    value = _one(fields, "EXECUTIONDURATION") or ""
    if not is_ascii_digits(value.strip()):  # 0 is "unlimited"; a negative duration means nothing
        raise BadRequest(f"EXECUTIONDURATION: {value!r} is not a whole number of seconds (>= 0)")
    return _see_other(f"{_jobs_url(request)}/{canonical}")


@router.get("/{job_id}/destruction", response_class=PlainTextResponse)
def destruction(request: Request, session: SessionDep, user_id: UserDep, job_id: str) -> str:
    """When the product expires (ISO 8601), or empty before the job has completed."""
    moment = _view(request, session, user_id, job_id).destruction
    return "" if moment is None else uws.format_instant(moment)


@router.post("/{job_id}/destruction", response_class=Response)
def post_destruction(
    request: Request, session: SessionDep, user_id: UserDep, job_id: str, fields: FieldsDep
) -> Response:
    """Accepted and ignored (products expire after the configured lifetime): 303."""
    canonical = uws.canonical_id(session, user_id, job_id)
    uws.parse_instant(_one(fields, "DESTRUCTION") or "", "DESTRUCTION")
    return _see_other(f"{_jobs_url(request)}/{canonical}")


@router.get("/{job_id}/error", response_class=PlainTextResponse)
def error(request: Request, session: SessionDep, user_id: UserDep, job_id: str) -> str:
    """The error message of a job in ERROR (empty otherwise)."""
    return _view(request, session, user_id, job_id).error or ""


@router.get("/{job_id}/quote", response_class=PlainTextResponse)
def quote(session: SessionDep, user_id: UserDep, job_id: str) -> str:
    """Empty: no completion time is predicted."""
    uws.job_phase(session, user_id, job_id)
    return ""


@router.get("/{job_id}/parameters", response_class=Response)
def parameters(request: Request, session: SessionDep, user_id: UserDep, job_id: str) -> Response:
    """The ASVO parameters of the job."""
    return _xml(uws.parameters_document(_view(request, session, user_id, job_id)))


@router.post("/{job_id}/parameters", response_class=Response)
def post_parameters(
    request: Request, session: SessionDep, user_id: UserDep, job_id: str, fields: FieldsDep
) -> Response:
    """Change parameters of a PENDING job (403 later; 400 if the ASVO would refuse): 303."""
    canonical = uws.update_parameters(session, _settings(request), user_id, job_id, fields)
    session.commit()
    return _see_other(f"{_jobs_url(request)}/{canonical}")


@router.get("/{job_id}/results", response_class=Response)
def results(request: Request, session: SessionDep, user_id: UserDep, job_id: str) -> Response:
    """One result per product file, with its signed download URL, size and SHA-1."""
    return _xml(uws.results_document(_view(request, session, user_id, job_id)))


@router.get("/{job_id}/owner", response_class=PlainTextResponse)
def owner(request: Request, session: SessionDep, user_id: UserDep, job_id: str) -> str:
    """The owner's user name."""
    return _view(request, session, user_id, job_id).owner or ""
