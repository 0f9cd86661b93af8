"""The ``/api`` routes mwa_client and giant-squid call (specs/asvo.md sections 1-3)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from sqlalchemy.orm import Session

from observatory.asvo import service
from observatory.asvo.models import JobType
from observatory.asvo.schemas import JobEnvelope, SubmitResponse
from observatory.core.config import Settings
from observatory.core.errors import Unauthorized
from observatory.core.security import sign_value, unsign_value
from observatory.core.web import get_session

router = APIRouter(prefix="/api", tags=["asvo"])

COOKIE_NAME = "MWA_JOB_COOKIE"
#: How long a login lasts (giant-squid logs in for every command; mwa_client per run).
COOKIE_MAX_AGE_S = 7 * 86_400

_basic = HTTPBasic(auto_error=False)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def current_user_id(request: Request) -> int:
    """The user the ``MWA_JOB_COOKIE`` was issued to (401 without a valid one)."""
    token = request.cookies.get(COOKIE_NAME)
    key = _settings(request).secret_key_bytes()
    value = None if token is None else unsign_value(token, key, max_age_s=COOKIE_MAX_AGE_S)
    if value is None or not value.startswith("user:"):
        raise Unauthorized("Not logged in: POST /api/api_login with your API key first")
    return int(value.removeprefix("user:"))


SessionDep = Annotated[Session, Depends(get_session)]
UserDep = Annotated[int, Depends(current_user_id)]


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
    response.set_cookie(
        COOKIE_NAME,
        sign_value(f"user:{user_id}", settings.secret_key_bytes()),
        max_age=COOKIE_MAX_AGE_S,
        httponly=True,
        # No Domain (cookie jars and localhost); Secure only where the client will send it back.
        secure=request.url.scheme == "https",
        samesite="lax",
    )
    return {"message": "logged in"}


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {key: str(value) for key, value in form.items()}


FormDep = Annotated[dict[str, str], Depends(_form)]


@router.post("/conversion_job", response_model=SubmitResponse)
def conversion_job(
    request: Request, session: SessionDep, user_id: UserDep, form: FormDep
) -> dict[str, int]:
    """Queue a conversion (Birli options as form fields; unknown keys ignored)."""
    job = service.submit_job(session, _settings(request), user_id, JobType.CONVERSION, form)
    return {"job_id": job.id}


@router.post("/download_vis_job", response_model=SubmitResponse)
def download_vis_job(
    request: Request, session: SessionDep, user_id: UserDep, form: FormDep
) -> dict[str, int]:
    """Queue a visibility (``download_type=vis``) or metadata (``vis_meta``) download."""
    job = service.submit_job(
        session, _settings(request), user_id, JobType.DOWNLOAD_VISIBILITIES, form
    )
    return {"job_id": job.id}


@router.post("/voltage_job", response_model=SubmitResponse)
def voltage_job(
    request: Request, session: SessionDep, user_id: UserDep, form: FormDep
) -> dict[str, int]:
    """Queue a voltage download (``offset``, ``duration``, optional channel range)."""
    job = service.submit_job(session, _settings(request), user_id, JobType.DOWNLOAD_VOLTAGE, form)
    return {"job_id": job.id}


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


@router.get("/get_jobs", response_model=list[JobEnvelope])
def get_jobs(session: SessionDep, user_id: UserDep) -> list[dict[str, Any]]:
    """Every job of the user, as change-feed envelopes ``{action, table, row}``."""
    return service.list_jobs(session, user_id)


@router.get("/cancel_job")
def cancel_job(session: SessionDep, user_id: UserDep, job_id: str = "") -> dict[str, Any]:
    """Cancel a job: 200, 400 (malformed or already finished) or 404 (no such job)."""
    job = service.cancel_job(session, user_id, job_id)
    return {"job_id": job.id, "job_state": job.state}
