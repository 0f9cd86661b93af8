"""/metadata: observation information (JSON and HTML) and metafits files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse
from sqlalchemy.orm import Session

from observatory.archive import service
from observatory.archive.schemas import FileOut, ObservationDetail, ObservationOut
from observatory.core.gpstime import gps_to_utc
from observatory.core.storage import Storage
from observatory.core.web import (
    flag_param,
    get_archive_storage,
    get_session,
    obsid_param,
    templates_for,
)

router = APIRouter(prefix="/metadata", tags=["metadata"])
templates = templates_for(Path(__file__).parent)

SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_archive_storage)]


def _detail(observation: service.Observation) -> ObservationDetail:
    files = [FileOut.model_validate(f) for f in observation.files]
    return ObservationDetail(
        **ObservationOut.model_validate(observation).model_dump(),
        files=files,
        total_size_bytes=sum(f.size_bytes for f in files),
    )


@router.get("/obs", response_model=ObservationDetail)
def observation_info(session: SessionDep, obs_id: Annotated[str, Query()]) -> ObservationDetail:
    """An observation and its files, as JSON."""
    return _detail(service.get_observation(session, obsid_param(obs_id)))


@router.get("/fits", response_class=Response)
def metafits_file(
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    obs_id: Annotated[str, Query()],
    include_calib: str | None = None,
) -> Response:
    """The observation's metafits file; with ``include_calib=1``, with its best calibration fit.

    The fit is added as the ``CALIBDATA`` table mwalib reads (404 when there is none).
    """
    obsid = obsid_param(obs_id)
    with_calib = flag_param("include_calib", include_calib, default=False)
    key = service.metafits_key(session, obsid)
    headers = {"Content-Disposition": f'attachment; filename="{obsid}_metafits.fits"'}
    if with_calib:
        from observatory.calib.service import best_fit, metafits_with_calibdata

        _, fit = best_fit(session, obsid, settings=request.app.state.settings)
        body = metafits_with_calibdata(storage.local_path(key), fit, obsid)
        return Response(body, media_type="application/fits", headers=headers)
    if storage.is_local:
        return FileResponse(storage.local_path(key), media_type="application/fits", headers=headers)
    return StreamingResponse(storage.open_read(key), media_type="application/fits", headers=headers)


@router.get("/obs_page", response_class=HTMLResponse)
def observation_page(
    request: Request, session: SessionDep, obs_id: Annotated[str, Query()]
) -> HTMLResponse:
    """An observation's information page."""
    observation = service.get_observation(session, obsid_param(obs_id))
    return templates.TemplateResponse(
        request,
        "observation.html",
        {
            "obs": _detail(observation),
            "has_metafits": service.metafits_file(observation) is not None,
            "start_utc": gps_to_utc(observation.obsid),
            "stop_utc": gps_to_utc(observation.stoptime),
        },
    )


@router.get("/find", response_model=list[ObservationOut])
def find(
    session: SessionDep,
    response: Response,
    mintime: int | None = None,
    maxtime: int | None = None,
    projectid: str | None = None,
    mode: str | None = None,
    obsname: str | None = None,
    creator: str | None = None,
    calibration: bool | None = None,
    before: int | None = None,
    page: int = 1,
    pagesize: int = 100,
    count: bool = False,
) -> list[ObservationOut]:
    """Observations overlapping [mintime, maxtime] (GPS seconds), newest first, one page.

    The text filters ignore case (``projectid``: the code as typed, in upper or in lower
    case); ``obsname`` is a substring, the others whole values.

    ``X-Has-More`` says whether a later page has more; with ``count=true`` the
    number of matches over all pages is in ``X-Total-Count``. To walk far into
    the archive pass ``before=<last obsid of the previous page>`` instead of a
    large ``page``: it costs the same at any depth.
    """
    rows, has_more, total = service.find_observations(
        session,
        mintime=mintime,
        maxtime=maxtime,
        project_id=projectid,
        mode=mode,
        obsname=obsname,
        creator=creator,
        calibration=calibration,
        before=before,
        page=page,
        page_size=pagesize,
        with_total=count,
    )
    response.headers["X-Has-More"] = "true" if has_more else "false"
    if total is not None:
        response.headers["X-Total-Count"] = str(total)
    return [ObservationOut.model_validate(row) for row in rows]
