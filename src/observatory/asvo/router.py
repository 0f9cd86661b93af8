"""The ``/api`` routes mwa_client and giant-squid call (specs/asvo.md sections 1-3)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from observatory.asvo import service
from observatory.asvo.models import Job, JobType
from observatory.asvo.schemas import (
    CONVERSION_FIELDS,
    DOWNLOAD_VIS_FIELDS,
    VOLTAGE_FIELDS,
    JobEnvelope,
    SubmitResponse,
    submission_openapi,
)
from observatory.core.accounts import SESSION_MAX_AGE_S, api_session_token, session_user
from observatory.core.config import Settings
from observatory.core.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    ServiceError,
    Unauthorized,
    error_body,
)
from observatory.core.models import User
from observatory.core.security import sign_value, unsign_value
from observatory.core.web import get_session, host_cookie_name, read_form

router = APIRouter(prefix="/api", tags=["asvo"])
log = logging.getLogger(__name__)

#: The cookie ``/api/api_login`` sets (an ``api`` session: it ends when the API key changes).
COOKIE_NAME = "MWA_JOB_COOKIE"
#: The portal's sign-in cookie (a ``portal`` session, set by ``POST /login``; its name over
#: https is ``__Host-`` prefixed, :func:`~observatory.core.web.host_cookie_name`). A browser sends
#: it on top-level navigations from other sites too (SameSite=Lax), so besides the portal's
#: pages it opens only the ``/api`` calls that change nothing: ``get_jobs`` and the
#: ``job_results`` websocket; never ``cancel_job``, a GET that changes a job.
PORTAL_COOKIE_NAME = "portal_session"
#: How long a login lasts (giant-squid logs in for every command; mwa_client per run).
COOKIE_MAX_AGE_S = SESSION_MAX_AGE_S
#: How often the websocket looks for changed jobs.
WEBSOCKET_POLL_S = 0.1
#: How often an open /api/job_results socket checks that its cookie is still valid.
WEBSOCKET_SESSION_CHECK_S = 1.0
#: How far a worker's clock may be behind the server's (a link is signed as of its job's
#: completion, never before the job was created).
CLOCK_SKEW_S = 60

_basic = HTTPBasic(auto_error=False)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def portal_cookie(connection: HTTPConnection) -> str | None:
    """The portal's sign-in cookie a request or websocket carries (its ``__Host-`` name
    over https)."""
    return connection.cookies.get(host_cookie_name(connection, PORTAL_COOKIE_NAME))


def cookie_user_id(
    connection: HTTPConnection, session: Session | None = None, *, portal: bool = False
) -> int | None:
    """The user of a request's or websocket's ``MWA_JOB_COOKIE`` (from ``/api/api_login``),
    while it is valid; with ``portal``, else of the portal's sign-in cookie.

    Looks the user up (a new key or a sign-out ends a cookie), in ``session`` or, without
    one, in a session of its own.
    """
    settings: Settings = connection.app.state.settings
    key = settings.secret_key_bytes()
    with contextlib.ExitStack() as stack:
        if session is None:
            session = stack.enter_context(connection.app.state.session_factory())
        user = session_user(session, connection.cookies.get(COOKIE_NAME), key, "api")
        if user is None and portal:
            user = session_user(session, portal_cookie(connection), key, "portal")
        return None if user is None else user.id


SessionDep = Annotated[Session, Depends(get_session)]


def current_user_id(request: Request, session: SessionDep) -> int:
    """The user the ``MWA_JOB_COOKIE`` was issued to (401 without a valid one)."""
    user_id = cookie_user_id(request, session)
    if user_id is None:
        raise Unauthorized("Not logged in: POST /api/api_login with your API key first")
    return user_id


def reading_user_id(request: Request, session: SessionDep) -> int:
    """For calls that change nothing: the ``MWA_JOB_COOKIE``'s user, or the portal's (401)."""
    user_id = cookie_user_id(request, session, portal=True)
    if user_id is None:
        raise Unauthorized("Not logged in: POST /api/api_login with your API key first")
    return user_id


UserDep = Annotated[int, Depends(current_user_id)]
ReaderDep = Annotated[int, Depends(reading_user_id)]


@router.post("/api_login")
def api_login(
    request: Request,
    response: Response,
    session: SessionDep,
    credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
) -> dict[str, str]:
    """HTTP Basic login (user = client version string, password = API key); sets the cookie."""
    if credentials is None:
        raise Unauthorized("HTTP Basic credentials required: client version and API key")
    settings = _settings(request)
    user_id = service.login(session, settings, credentials.username, credentials.password)
    user = session.get(User, user_id)
    if user is None:  # removed since it was authenticated a moment ago
        raise Unauthorized("invalid API key")
    response.set_cookie(
        COOKIE_NAME,
        api_session_token(user, settings.secret_key_bytes()),
        max_age=COOKIE_MAX_AGE_S,
        httponly=True,
        # No Domain (cookie jars and localhost); Secure only where the client will send it back.
        secure=request.url.scheme == "https",
        samesite="lax",
    )
    return {"message": "logged in"}


async def read_submission_form(request: Request) -> dict[str, str]:
    """The submitted form (``read_form``), its refusals with the ASVO's ``error_code`` 0.

    0 is the clients' "invalid input" (specs/asvo.md section 2.2): with the services'
    usual 1, mwa_client drops the job without a word and giant-squid abandons the batch.

    Fields in the query string (``curl -X POST '...?obs_id=...'``) are refused, naming
    them: read as a form they were missing, and the error named the first required one
    ("Download Type: Expected not None") as if it had not been given.
    """
    if request.query_params:
        names = ", ".join(dict.fromkeys(request.query_params.keys()))
        raise service.AsvoError(
            f"job parameters must be sent as a form body (application/x-www-form-urlencoded "
            f"or multipart/form-data, as curl -d or -F sends them), not in the query string "
            f"(found: {names})"
        )
    try:
        return await read_form(request)
    except BadRequest as exc:
        raise service.AsvoError(exc.message) from None


# The form is read whole, unknown keys and all (the clients send extra ones), so /docs
# learns its fields from the schemas' declarations instead.
FormDep = Annotated[dict[str, str], Depends(read_submission_form)]


def _submit(
    request: Request, session: Session, user_id: int, job_type: JobType, form: dict[str, str]
) -> dict[str, int]:
    job = service.submit_job(session, _settings(request), user_id, job_type, form)
    # Committed before the reply: a client that lists its jobs next must see this one.
    session.commit()
    return {"job_id": job.id}


@router.post(
    "/conversion_job",
    response_model=SubmitResponse,
    openapi_extra=submission_openapi(CONVERSION_FIELDS),
)
def conversion_job(
    request: Request, session: SessionDep, user_id: UserDep, form: FormDep
) -> dict[str, int]:
    """Queue a conversion (Birli options as form fields; unknown keys ignored)."""
    return _submit(request, session, user_id, JobType.CONVERSION, form)


@router.post(
    "/download_vis_job",
    response_model=SubmitResponse,
    openapi_extra=submission_openapi(DOWNLOAD_VIS_FIELDS),
)
def download_vis_job(
    request: Request, session: SessionDep, user_id: UserDep, form: FormDep
) -> dict[str, int]:
    """Queue a visibility (``download_type=vis``) or metadata (``vis_meta``) download."""
    return _submit(request, session, user_id, JobType.DOWNLOAD_VISIBILITIES, form)


@router.post(
    "/voltage_job",
    response_model=SubmitResponse,
    openapi_extra=submission_openapi(VOLTAGE_FIELDS),
)
def voltage_job(
    request: Request, session: SessionDep, user_id: UserDep, form: FormDep
) -> dict[str, int]:
    """Queue a voltage download (``offset``, ``duration``, optional channel range)."""
    return _submit(request, session, user_id, JobType.DOWNLOAD_VOLTAGE, form)


@router.post("/beamformer_job")
def beamformer_job(_user_id: UserDep) -> dict[str, int]:
    """Not offered: answered with the clients' error shape."""
    raise service.unsupported("Beamformer")


@router.post("/imaging_job")
def imaging_job(_user_id: UserDep) -> dict[str, int]:
    """Not offered: answered with the clients' error shape."""
    raise service.unsupported("Imaging")


@router.post("/preprocessed_imaging_job")
def preprocessed_imaging_job(_user_id: UserDep) -> dict[str, int]:
    """Not offered: answered with the clients' error shape."""
    raise service.unsupported("Imaging")


def download_url_builder(connection: HTTPConnection) -> service.UrlBuilder:
    """Signed, expiring download URLs on the host the client reached (they need no cookie).

    The token is signed as issued when the job completed, not when it is listed: a
    job's URL is then the same in every listing and websocket frame (clients that
    compare rows see an unchanged job as unchanged), and it stops working with the
    product, as the ASVO's own links do (their ``Expires`` is completion + 7 days).
    From a websocket (``ws[s]://``) the URLs are the matching ``http[s]://`` ones.
    """
    settings: Settings = connection.app.state.settings
    key = settings.secret_key_bytes()
    base = str(connection.base_url).rstrip("/")
    if base.startswith("ws"):
        base = "http" + base[2:]

    def url_for(job: Job | service.ProductView, entry: dict[str, Any]) -> str:
        # Never later than now: a worker whose clock runs ahead of this server's would
        # otherwise make a link that is refused as not yet valid.
        now_s = time.time()
        issued_s = min(job.completed.timestamp(), now_s) if job.completed else now_s
        token = sign_value(f"{job.id}/{entry['name']}", key, now_s=issued_s)
        return f"{base}/api/download/{job.id}/{quote(entry['name'])}?token={token}"

    return url_for


@router.get("/get_jobs", response_model=list[JobEnvelope])
def get_jobs(request: Request, session: SessionDep, user_id: ReaderDep) -> list[dict[str, Any]]:
    """Every job of the user, as change-feed envelopes ``{action, table, row}``.

    Changes nothing, so the portal's sign-in cookie also opens it.
    """
    # Returned as text: each job keeps its serialised row, and validating 10,000 rows
    # against the response model would cost more than building them (it documents the shape).
    body = service.list_jobs_json(session, user_id, download_url_builder(request))
    return Response(body, media_type="application/json")  # type: ignore[return-value]


class _LenientRangeFileResponse(FileResponse):
    """A file response that also understands giant-squid's ``Range: Range: bytes=N-SIZE``.

    giant-squid (``--keep-tar``) sends the header value with the header name in
    front and an end offset one past the last byte (specs/asvo.md section 4.1).
    """

    # Products are large: 1 MiB reads instead of Starlette's 64 KiB (fewer thread hops).
    chunk_size = 1024 * 1024

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope["headers"]
        if self.stat_result is not None:
            size = self.stat_result.st_size
            normalised = [
                (name, _normalise_range(value, size) if name == b"range" else value)
                for name, value in headers
            ]
            headers = [(name, value) for name, value in normalised if value is not None]
        requested = dict(headers).get(b"range")
        if requested is not None and self.stat_result is not None:
            # Starlette answers a malformed Range in plain text; our errors are JSON.
            try:
                self._parse_range_header(requested.decode("latin-1"), self.stat_result.st_size)
            except MalformedRangeHeader as exc:
                reply = JSONResponse(error_body(f"Range header: {exc.content}", 1), status_code=400)
                await reply(scope, receive, send)
                return
            except RangeNotSatisfiable:
                pass  # Starlette's 416 names the size in Content-Range, as RFC 9110 asks
        await super().__call__({**scope, "headers": headers}, receive, send)

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        """As Starlette's, but a unit other than bytes is ignored (RFC 9110 section 14.2)."""
        units = http_range.split("=", 1)[0] if "=" in http_range else None
        if units is not None and units.strip().lower() != "bytes":
            return []  # no ranges: the whole file, 200
        return super()._parse_range_header(http_range, file_size)


def _normalise_range(value: bytes, size: int) -> bytes | None:
    """A Range header as Starlette reads it; None to answer with the whole file.

    giant-squid's ``Range: bytes=SIZE-SIZE`` comes after it found its complete file
    corrupt and emptied it: it wants the whole file (a 416 made it log an error and ask
    again). Any other start at or past the end is still 416.
    """
    text = value.decode("latin-1").strip()
    giant_squid = text.lower().startswith("range:")
    if giant_squid:
        text = text[len("range:") :].strip()
    match = re.fullmatch(r"bytes=(\d+)-(\d+)", text)
    if match and giant_squid and int(match[1]) == size:
        return None
    if match and int(match[2]) >= size:
        text = f"bytes={match[1]}-{size - 1}"
    return text.encode("latin-1")


def _download_link_refusal(job: Job, token: str, settings: Settings) -> ServiceError | None:
    """Why a download link of ``job`` (its ``token`` verified) no longer works, if it does not.

    It works until the job's own ``expires_at`` (set at completion), when the dispatcher
    deletes its product: after that the product is gone, 404 (what giant-squid reports as
    expired; specs/asvo.md section 4.1). A job without one (completed by an older version)
    lasts ``asvo_product_ttl_days`` from its completion.
    """
    issued_s = int(token.rsplit(".", 2)[1])  # the token's own timestamp: it verified
    # A link signed before the job was created is one to an earlier job of the same id
    # (SQLite gives the id of a deleted last row to the next job) and the same file name.
    if issued_s < job.created.timestamp() - CLOCK_SKEW_S:
        return Forbidden("This download link is not valid (or has expired)")
    expires_at = job.expires_at
    if expires_at is None:
        completed = job.completed or datetime.fromtimestamp(issued_s, UTC)
        expires_at = completed + timedelta(days=settings.asvo_product_ttl_days)
    if time.time() > expires_at.timestamp():
        return NotFound(
            f"Job {job.id}'s product has expired ({expires_at:%Y-%m-%d %H:%M} UTC): "
            "it no longer exists; submit the job again"
        )
    return None


@router.head("/download/{job_id}/{name}", operation_id="asvo_download_head")
@router.get("/download/{job_id}/{name}", operation_id="asvo_download_get")
def download(
    request: Request, session: SessionDep, job_id: int, name: str, token: str = ""
) -> FileResponse:
    """A product, by the signed URL get_jobs gave (no cookie needed); Range supported."""
    settings = _settings(request)
    # The signature binds the link to the job and the file; how long it works is the
    # job's own expiry below, not the age allowed by the current product lifetime: that
    # may have been lowered since the job completed, and links to products still alive
    # (and listed) would be refused.
    if unsign_value(token, settings.secret_key_bytes(), max_age_s=math.inf) != f"{job_id}/{name}":
        raise Forbidden("This download link is not valid (or has expired)")
    job = session.get(Job, job_id)
    refusal = None if job is None else _download_link_refusal(job, token, settings)
    if refusal is not None:
        raise refusal
    path = service.product_file(session, job_id, name, settings.products_dir)
    # stat_result given to the constructor, which sets Content-Length, Last-Modified and ETag
    # from it (set afterwards, GET replies were chunked and HEAD replies had no size).
    return _LenientRangeFileResponse(
        path, media_type="application/x-tar", filename=name, stat_result=os.stat(path)
    )


#: The close code of a websocket opened by a page of another origin (4000 + HTTP's 403).
WEBSOCKET_FOREIGN_ORIGIN_CODE = 4403
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: A websocket's scheme as the scheme of the pages that may open it (a page at
#: ``https://host`` opens ``wss://host``). uvicorn's ``--proxy-headers`` has already set it
#: from a trusted proxy's ``X-Forwarded-Proto`` (``wss`` behind nginx's TLS).
_PAGE_SCHEMES = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


def _origin_triple(scheme: str, netloc: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an origin, default port filled in; None if malformed."""
    if scheme not in _DEFAULT_PORTS:
        return None
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:  # a port that is no number or out of range, an unclosed [
        return None
    if not parts.hostname or "@" in parts.netloc or parts.path or parts.query or parts.fragment:
        return None
    return scheme, parts.hostname, port or _DEFAULT_PORTS[scheme]


def _own_origin(websocket: WebSocket) -> str:
    """The origin of the pages that may open ``websocket``: ``http[s]://`` and its Host."""
    scheme = _PAGE_SCHEMES.get(websocket.scope.get("scheme", ""), "?")
    return f"{scheme}://{websocket.headers.get('host', '?')}"


def foreign_origin(websocket: WebSocket) -> str | None:
    """The ``Origin`` of a websocket opened by a page of another origin; None when it may open.

    A browser sends the portal's sign-in cookie (SameSite=Lax) with a websocket opened by
    any page of the same *site*: another port of this host, a sibling subdomain. Such a
    page must not read the user's jobs and their signed download links, so a browser's
    socket is accepted only from this origin: the scheme, host and port the request came
    to (its ``Host`` header, which nginx passes on as the client sent it, and the scheme
    uvicorn took from a trusted proxy's ``X-Forwarded-Proto``).

    Every browser sends an ``Origin`` with a websocket; a socket without one is a
    program's (this package's client sends none, and authenticates with
    ``MWA_JOB_COOKIE``), and no page can make a browser open one. websocket-client, the
    library of the real mwa_client, sends the origin of the address it connects to,
    which is this one.
    """
    origins = websocket.headers.getlist("origin")
    if not origins:
        return None
    own_scheme, _, own_host = _own_origin(websocket).partition("://")
    own = _origin_triple(own_scheme, own_host)
    if len(origins) == 1 and own is not None:
        scheme, _, netloc = origins[0].strip().partition("://")
        # "null" (a sandboxed frame, a file), a path or anything else malformed: refused.
        if _origin_triple(scheme.lower(), netloc) == own:
            return None
    return ", ".join(origins)


@router.websocket("/job_results")
async def job_results(websocket: WebSocket) -> None:
    """Job rows as they change: every current row on connect, then one frame per change.

    The rows are sent by one task while another receives: only a receive notices that
    the client has gone (a send finds out only when a row changes, which may be never),
    and a handler that outlives its client polls for ever and holds up server shutdown.
    The portal's jobs page uses it with its sign-in cookie (it only reads); a page of
    another origin may not open it (:func:`foreign_origin`).
    """
    origin = foreign_origin(websocket)
    if origin is not None:
        # Refused before the cookie is even looked at. A page's origin is public, and an
        # operator whose proxy does not pass X-Forwarded-Proto finds the cause here.
        log.warning(
            "refused a job_results websocket from origin %r: this site is %r",
            origin, _own_origin(websocket),
        )  # fmt: skip
        await websocket.close(
            code=WEBSOCKET_FOREIGN_ORIGIN_CODE, reason="origin not allowed: not this site's page"
        )
        return
    user_id = await run_in_threadpool(cookie_user_id, websocket, None, portal=True)
    if user_id is None:
        await websocket.close(code=4401, reason="not logged in")
        return
    await websocket.accept()
    session_factory = websocket.app.state.session_factory
    watch = service.JobWatch()
    url_for = download_url_builder(websocket)

    async def send_changes() -> None:
        checked = time.monotonic()
        while True:
            if time.monotonic() - checked >= WEBSOCKET_SESSION_CHECK_S:
                # A sign-out, a new password or API key ends the cookie, and this socket:
                # its frames carry signed download links.
                if await run_in_threadpool(cookie_user_id, websocket, None, portal=True) != user_id:
                    await websocket.close(code=4401, reason="signed out")
                    return
                checked = time.monotonic()
            frames = await run_in_threadpool(
                service.changed_rows, session_factory, user_id, watch, url_for
            )
            for frame in frames:
                await websocket.send_text(json.dumps(frame))
            await asyncio.sleep(WEBSOCKET_POLL_S)

    async def wait_for_disconnect() -> None:
        # Whatever the client sends is ignored; its disconnect (or server shutdown) ends this.
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    # anyio, not bare asyncio tasks: the server's (or test client's) cancellation of the
    # handler then reaches both halves.
    async with anyio.create_task_group() as group:

        async def until_done(half: Callable[[], Awaitable[None]]) -> None:
            # A send or receive on a closed socket raises: the client went.
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await half()
            group.cancel_scope.cancel()

        group.start_soon(until_done, send_changes)
        group.start_soon(until_done, wait_for_disconnect)


@router.get("/cancel_job")
def cancel_job(
    session: SessionDep,
    user_id: UserDep,
    job_id: Annotated[str, Query(description="The job's id, as its submission answered.")] = "",
) -> dict[str, Any]:
    """Cancel a job: 200, 400 (malformed or already finished) or 404 (no such job).

    A GET that changes a job (the clients' protocol), so only the ``/api/api_login`` cookie
    opens it: a browser's portal cookie would come along with a link from any site. The
    portal cancels with a POST that carries its forgery token.
    """
    job = service.cancel_job(session, user_id, job_id)
    session.commit()
    return {"job_id": job.id, "job_state": job.state}
