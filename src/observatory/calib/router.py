"""/calib: the best calibration solution for an observation, the fits that could calibrate it, fit requests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from observatory.archive import service as archive_service
from observatory.calib import grafana, plots, requests, service
from observatory.core.config import Settings
from observatory.core.database import MAX_SQL_ID
from observatory.core.errors import BadRequest, NotFound
from observatory.core.gpstime import gps_to_utc_iso, now_gps
from observatory.core.storage import Storage
from observatory.core.web import (
    flag_param,
    get_session,
    gps_time_param,
    loads_request_json,
    obsid_param,
    read_form,
    templates_for,
    whole_number_param,
)

router = APIRouter(prefix="/calib", tags=["calibration"])
templates = templates_for(Path(__file__).parent)
SessionDep = Annotated[Session, Depends(get_session)]


def _seconds(value: str | None) -> int:
    """``max_time_separation``: whole seconds, 0 .. ``MAX_TIME_SEPARATION_S`` (the whole archive)."""
    if value is None or value == "":
        return service.DEFAULT_MAX_TIME_SEPARATION_S
    return whole_number_param(
        "max_time_separation", value, what="a whole number of seconds, 0 or more",
        high=service.MAX_TIME_SEPARATION_S,
    )  # fmt: skip


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _best_fit(
    request: Request,
    session: Session,
    obs_id: str,
    prefer_fitid: str | None,
    max_time_separation: str | None,
    allow_after: str | None,
) -> tuple[service.Observation, service.CalibrationFit]:
    """The target and its best fit from the query parameters (``service.best_fit``)."""
    preferred = (
        whole_number_param("prefer_fitid", prefer_fitid, what="a fit id (an integer)")
        if prefer_fitid
        else None
    )
    return service.best_fit(
        session, obsid_param(obs_id),
        max_time_separation_s=_seconds(max_time_separation),
        allow_after=flag_param("allow_after", allow_after, default=True),
        prefer_fitid=preferred, settings=_settings(request),
    )  # fmt: skip


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
    """A zip with the best solution for ``obs_id``: ``<calid>.bin``, flagged tiles, a CASA flag script.

    ``prefer_fitid`` names the fit, at any time separation; one for other coarse channels
    than ``obs_id``'s is a 400 listing both (``obs_id_coarse_chans``, ``fit_coarse_chans``),
    as is one for other tiles (``obs_id_tile_ids``, ``fit_tile_ids``).
    """
    # Every parameter is checked before the fit is looked up: a bad one is a 400 whether
    # or not a fit exists, not a 404 "no fit" that turns into a 400 once one does.
    fmt = service.check_output_format(output_format)
    rebuild = flag_param("nocache", nocache, default=False)
    target, fit = _best_fit(
        request, session, obs_id, prefer_fitid, max_time_separation, allow_after
    )
    body = service.solution_zip(
        session, _settings(request), target, fit, output_format=fmt, nocache=rebuild
    )
    return Response(body, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{target.obsid}_calibration.zip"',
        "X-Calibration-Fit-Id": str(fit.fitid), "X-Calibrator-Obs-Id": str(fit.obsid),
    })  # fmt: skip


@router.get("/get_cal_json")
def get_cal_json(
    request: Request,
    session: SessionDep,
    obs_id: Annotated[str, Query()],
    prefer_fitid: str | None = None,
    max_time_separation: str | None = None,
    allow_after: str | None = None,
) -> dict[str, object]:
    """The best fit for ``obs_id`` (``get_cal_solution``'s choice) as JSON: the fit and its tiles.

    A calibrator observation's own fit: its obsid with ``max_time_separation=0``. 404 when
    no fit is in range, as clients of the MWA's service read it ("no fit found").
    """
    target, fit = _best_fit(
        request, session, obs_id, prefer_fitid, max_time_separation, allow_after
    )
    return service.fit_json(session, _settings(request), target, fit)


@router.get("/get_cal_fits")
def get_cal_fits(
    request: Request,
    session: SessionDep,
    obs_id: Annotated[str, Query()],
    max_time_separation: str | None = None,
    allow_after: str | None = None,
) -> dict[str, list[object]]:
    """Every fit that could calibrate ``obs_id``: ``{fitid: [calid, offset, filename]}``, best first.

    ``filename`` is the fit's hyperdrive FITS (``<calid>_solutions.fits``).
    """
    target = service.target_observation(session, obsid_param(obs_id))
    candidates = service.candidate_fits(
        session, target, max_time_separation_s=_seconds(max_time_separation),
        allow_after=flag_param("allow_after", allow_after, default=True),
        settings=_settings(request),
    )  # fmt: skip
    if not candidates:
        raise NotFound(f"no calibration fits for obs_id {target.obsid}")
    return {str(c.fitid): [c.calid, c.offset_s, c.filename] for c in candidates}


@router.post("/add_cal_request", response_class=Response, operation_id="calib_add_cal_request_post")
@router.get("/add_cal_request", response_class=Response, operation_id="calib_add_cal_request_get")
async def add_cal_request(request: Request) -> Response:
    """File a request to fit the best calibrator for ``obs_id``; 200 with no data."""
    params = dict(request.query_params)
    if request.method == "POST":
        params |= await read_form(request)
    if "obs_id" not in params:
        raise BadRequest("obs_id is required")
    obsid = obsid_param(params["obs_id"])
    # Taken from anyone, as the MWA's service takes it: it only labels the request and is
    # echoed in its callback. An ASVO job never adopts a request by this id (it follows
    # the one it filed, by the request's own id), so it needs no login here.
    job = params.get("asvo_job_id") or None
    if job is not None:
        whole_number_param("asvo_job_id", job, what="a job number", high=MAX_SQL_ID)
    separation_s = _seconds(params.get("max_time_separation"))
    settings = _settings(request)

    def file_request() -> None:
        with request.app.state.session_factory() as session:
            requests.add_cal_request(
                session, settings, obsid, asvo_job_id=int(job) if job else None,
                max_time_separation_s=separation_s,
                callback_url=params.get("callback_url") or None,
            )  # fmt: skip

    await run_in_threadpool(file_request)
    return Response(status_code=200)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = loads_request_json(raw)
    except ValueError as exc:
        raise BadRequest(f"the request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


JsonBody = Annotated[dict[str, Any], Depends(_json_body)]


@router.get("/grafana/", operation_id="calib_grafana_test")
@router.get("/grafana", include_in_schema=False)
def grafana_test() -> dict[str, str]:
    """Grafana's "test connection": 200 means the datasource works."""
    return {"status": "ok"}


@router.post("/grafana/metrics")
def grafana_metrics(request: Request, session: SessionDep, _body: JsonBody) -> list[dict[str, Any]]:
    """The targets a query may name: ``recNN`` per receiver, and ``sources``."""
    return grafana.metrics(session, _settings(request))


@router.get("/grafana/metrics", operation_id="calib_grafana_metrics_listing")
def grafana_metrics_listing(request: Request, session: SessionDep) -> list[dict[str, Any]]:
    """The same list for a plain URL, as the service's documentation gives it (a browser, curl)."""
    return grafana.metrics(session, _settings(request))


@router.post("/grafana/metric-payload-options")
def grafana_payload_options(session: SessionDep, body: JsonBody) -> list[dict[str, Any]]:
    """The choices of one payload option (``name``: channel, source, style or clip)."""
    if "name" not in body:
        raise BadRequest("metric-payload-options needs the payload's name")
    return grafana.payload_options(session, str(body["name"]))


@router.post("/grafana/query")
def grafana_query(request: Request, session: SessionDep, body: JsonBody) -> list[dict[str, Any]]:
    """Data frames for Grafana's targets over its time range."""
    return grafana.query(session, _settings(request), body)


@router.post("/grafana/variable")
def grafana_variable(request: Request, session: SessionDep, body: JsonBody) -> list[dict[str, str]]:
    """A dashboard variable's values (``payload.target``: receivers, sources, channels,
    styles, obsids in the range, tiles) as ``[{"__text", "__value"}]``."""
    return grafana.variable(session, _settings(request), body)


@router.post("/grafana/tag-keys")
def grafana_tag_keys(_body: JsonBody) -> list[dict[str, str]]:
    """The keys of the ad-hoc filters the queries apply: none (``[]``)."""
    return grafana.tag_keys()


@router.post("/grafana/tag-values")
def grafana_tag_values(body: JsonBody) -> list[dict[str, str]]:
    """The values of an ad-hoc filter key (``{"key": ...}``): none, as no key is offered."""
    return grafana.tag_values(body)


def _latest_fit_of(session: Session, cal_id: int) -> service.CalibrationFit:
    fit = session.scalars(
        select(service.CalibrationFit)
        .where(service.CalibrationFit.obsid == cal_id, service.has_calibrated_tile())
        .order_by(service.CalibrationFit.fitid.desc()).limit(1)
    ).first()  # fmt: skip
    if fit is None:
        raise BadRequest(f"cal_id {cal_id} is not found in the calibration solution database")
    return fit


@router.get("/get_calfile_for_obsid", response_class=Response, deprecated=True)
def get_calfile_for_obsid(
    request: Request,
    session: SessionDep,
    obs_id: Annotated[str, Query()],
    any_gain: str | None = None,
    add_request: str | None = None,
) -> Response:
    """Deprecated: the best solution for ``obs_id`` as a zip, with its metafits carrying CALIBDATA.

    ``any_gain`` ignores the attenuation. With ``add_request=1`` and no fit, a fit is
    requested and the reply is empty (what older clients read as "requested").
    """
    settings = _settings(request)
    obsid = obsid_param(obs_id)
    flag_param(
        "add_request", add_request, default=False
    )  # a bad value is a 400 whether or not a fit exists
    try:
        target, fit = service.best_fit(
            session, obsid, match_attenuation=any_gain is None, settings=settings
        )
    except NotFound as exc:
        if flag_param("add_request", add_request, default=False):
            try:
                requests.add_cal_request(
                    session, settings, obsid, match_attenuation=any_gain is None
                )
            except NotFound as no_calibrator:  # "no fit" is a 400 here, as the MWA's was
                raise BadRequest(f"{exc.message}; no fit could be requested: "
                                 f"{no_calibrator.message}") from no_calibrator  # fmt: skip
            return Response(status_code=200)
        raise BadRequest(exc.message) from exc
    metafits = Storage(settings.archive_dir).local_path(
        archive_service.metafits_key(session, obsid)
    )
    body = service.solution_zip(session, settings, target, fit, extra_files={
        f"{obsid}.metafits": service.metafits_with_calibdata(metafits, fit, obsid)})  # fmt: skip
    return Response(body, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{obsid}_calibration.zip"'})  # fmt: skip


@router.get("/get_calfile_for_calid", response_class=Response, deprecated=True)
def get_calfile_for_calid(
    request: Request, session: SessionDep, cal_id: Annotated[str, Query()]
) -> Response:
    """Deprecated: the newest fit of calibrator observation ``cal_id`` as a zip."""
    calid = obsid_param(cal_id, name="cal_id")
    fit = _latest_fit_of(session, calid)
    calibrator = service.target_observation(session, calid)
    body = service.solution_zip(session, _settings(request), calibrator, fit)
    return Response(body, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{calid}_calibration.zip"'})  # fmt: skip


@router.get("/summary", response_class=HTMLResponse)
def summary(
    request: Request, session: SessionDep, mintime: str | None = None, maxtime: str | None = None
) -> HTMLResponse:
    """The fits of observations in a time range: ``maxtime`` (default now) and the 7 days
    before it, or from ``mintime``."""
    first = gps_time_param("mintime", mintime)
    last = gps_time_param("maxtime", maxtime)
    last = now_gps() if last is None else last
    first = last - 7 * 86400 if first is None else first
    if last < first:  # only with a mintime given
        until = maxtime if maxtime is not None else f"now ({gps_to_utc_iso(last)[:19]})"
        raise BadRequest(f"mintime {mintime} is after maxtime {until}")
    # One more than is shown: whether the range holds more than the page lists.
    fits = service.fits_between(session, first, last, service.SUMMARY_MAX_FITS + 1)
    return templates.TemplateResponse(request, "summary.html", {
        "fits": fits[: service.SUMMARY_MAX_FITS], "more": len(fits) > service.SUMMARY_MAX_FITS,
        "max_fits": service.SUMMARY_MAX_FITS, "kinds": plots.KINDS,
        "mintime": mintime or gps_to_utc_iso(first)[:19], "maxtime": maxtime or gps_to_utc_iso(last)[:19],
    })  # fmt: skip


def _fit(session: Session, fitid: str) -> service.CalibrationFit:
    fit = session.get(service.CalibrationFit, whole_number_param("fitid", fitid, what="a fit id"))
    if fit is None:
        raise NotFound(f"no calibration fit {fitid}")
    return fit


@router.get("/fit", response_class=HTMLResponse)
def fit_page(request: Request, session: SessionDep, fitid: Annotated[str, Query()]) -> HTMLResponse:
    """One fit: median residual per receiver and per tile, and its plots."""
    fit = _fit(session, fitid)
    known = service.observation_tiles(session, _settings(request), fit.obsid)
    tiles, receivers = service.fit_residuals(fit, known)
    reference = next((tile for tile in tiles if tile.reference), None)
    return templates.TemplateResponse(request, "fit.html", {
        "fit": fit, "tiles": tiles, "receivers": receivers, "kinds": plots.KINDS,
        "fit_time": service.awst_time(fit), "reference": reference,
    })  # fmt: skip


@router.get("/plot/{kind}.png", response_class=Response)
def plot(
    request: Request, session: SessionDep, kind: str, fitid: Annotated[str, Query()]
) -> Response:
    """A plot of a fit (tilediff, timediff, xydiff, gains, gaintimes) as PNG.

    With an ETag (the image's hash; a matching ``If-None-Match`` is a 304). The history
    plots (timediff, xydiff, gaintimes) are drawn again when another fit joins them,
    so browsers revalidate them on every view (``no-cache``); the others never change
    and are kept for a day. ``If-None-Match: *`` matches any plot (RFC 9110).
    """
    image = plots.plot_png(session, _settings(request), _fit(session, fitid), kind)
    etag = f'"{hashlib.sha1(image).hexdigest()}"'
    headers = {
        "ETag": etag,
        "Cache-Control": "no-cache" if kind in plots.HISTORY_KINDS else "max-age=86400",
    }
    asked = {
        tag.strip().removeprefix("W/")
        for tag in request.headers.get("if-none-match", "").split(",")
    }
    if etag in asked or "*" in asked:
        return Response(status_code=304, headers=headers)
    return Response(image, media_type="image/png", headers=headers)
