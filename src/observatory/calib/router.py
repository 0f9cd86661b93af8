"""/calib: the best calibration solution for an observation, the fits that could calibrate it, fit requests."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from observatory.calib import requests, service
from observatory.core.config import Settings
from observatory.core.errors import BadRequest, NotFound
from observatory.core.web import get_session, obsid_param

router = APIRouter(prefix="/calib", tags=["calibration"])
SessionDep = Annotated[Session, Depends(get_session)]


def _flag(name: str, value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    if value not in ("0", "1"):
        raise BadRequest(f"{name} must be 0 or 1, not {value!r}")
    return value == "1"


def _seconds(value: str | None) -> int:
    if value is None or value == "":
        return service.DEFAULT_MAX_TIME_SEPARATION_S
    if not value.isdigit():
        raise BadRequest(f"max_time_separation must be a whole number of seconds, not {value!r}")
    return int(value)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


@router.get("/get_cal_solution", response_class=Response)
def get_cal_solution(
    request: Request,
    session: SessionDep,
    obs_id: Annotated[str, Query()],
    prefer_fitid: str | None = None,
    max_time_separation: str | None = None,
    allow_after: str | None = None,
    nocache: str | None = None,
    output_format: str = "aocal",
) -> Response:
    """A zip with the best solution for ``obs_id``: ``<calid>.bin``, flagged tiles, a CASA flag script."""
    if prefer_fitid is not None and not prefer_fitid.isdigit():
        raise BadRequest(f"prefer_fitid must be a fit id (an integer), not {prefer_fitid!r}")
    target, fit = service.best_fit(
        session, obsid_param(obs_id),
        max_time_separation_s=_seconds(max_time_separation),
        allow_after=_flag("allow_after", allow_after, True),
        prefer_fitid=int(prefer_fitid) if prefer_fitid else None,
    )  # fmt: skip
    body = service.solution_zip(
        session, _settings(request), target, fit, output_format=output_format,
        nocache=_flag("nocache", nocache, False),
    )  # fmt: skip
    return Response(body, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{target.obsid}_calibration.zip"',
        "X-Calibration-Fit-Id": str(fit.fitid), "X-Calibrator-Obs-Id": str(fit.obsid),
    })  # fmt: skip


@router.get("/get_cal_fits")
def get_cal_fits(
    session: SessionDep,
    obs_id: Annotated[str, Query()],
    max_time_separation: str | None = None,
    allow_after: str | None = None,
) -> dict[str, list[object]]:
    """Every fit that could calibrate ``obs_id``: ``{fitid: [calid, offset, filename]}``, best first."""
    target = service.target_observation(session, obsid_param(obs_id))
    candidates = service.candidate_fits(
        session, target, max_time_separation_s=_seconds(max_time_separation),
        allow_after=_flag("allow_after", allow_after, True),
    )  # fmt: skip
    if not candidates:
        raise NotFound(f"no calibration fits for obs_id {target.obsid}")
    return {
        str(c.fitid): [c.calid, c.offset_s, c.filename.rsplit("/", 1)[-1] if c.filename else None]
        for c in candidates
    }


@router.post("/add_cal_request", response_class=Response, operation_id="calib_add_cal_request_post")
@router.get("/add_cal_request", response_class=Response, operation_id="calib_add_cal_request_get")
async def add_cal_request(request: Request) -> Response:
    """File a request to fit the best calibrator for ``obs_id``; 200 with no data."""
    params = dict(request.query_params)
    if request.method == "POST":
        params |= {k: str(v) for k, v in (await request.form()).items()}
    if "obs_id" not in params:
        raise BadRequest("obs_id is required")
    obsid = obsid_param(params["obs_id"])
    job = params.get("asvo_job_id") or None
    if job is not None and not job.isdigit():
        raise BadRequest(f"asvo_job_id must be a job number, not {job!r}")
    settings = _settings(request)

    def file_request() -> None:
        with request.app.state.session_factory() as session:
            requests.add_cal_request(
                session, settings, obsid, asvo_job_id=int(job) if job else None,
                max_time_separation_s=_seconds(params.get("max_time_separation")),
                callback_url=params.get("callback_url") or None,
            )  # fmt: skip

    await run_in_threadpool(file_request)
    return Response(status_code=200)
