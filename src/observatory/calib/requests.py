"""Calibration fit requests: filing one for a target, finishing it, and calling back.

``add_cal_request`` finds the calibrator observation nearest the target (same
coarse channels and attenuation, within ``max_time_separation``) and files a
request to fit it. When the fit finishes (or fails), the request records it, and
its callback URL, if any, gets the source document's JSON: ``cal_id``,
``asvo_job_id``, ``target_obs_id``, ``finished_datetime``, ``success``, ``message``.
Deliveries are retried with exponential backoff until one is accepted (2xx),
and never repeated after that.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from observatory.archive.models import FileKind, Observation, ObservationFile
from observatory.calib.models import CalibrationRequest
from observatory.calib.service import DEFAULT_MAX_TIME_SEPARATION_S, compatible, target_observation
from observatory.core.config import Settings
from observatory.core.errors import BadRequest, Conflict, NotFound

log = logging.getLogger(__name__)
CALLBACK_TIMEOUT_S = 30.0


def check_callback_url(url: str, settings: Settings) -> str:
    """The callback URL, if it may be called.

    Raises
    ------
    BadRequest
        For a URL that is not http(s), carries credentials, or names a host outside
        ``calib_callback_hosts`` (when that list is set).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"callback_url {url!r} must be an http or https URL")
    if parts.username is not None or parts.password is not None:
        raise BadRequest("callback_url must not carry credentials")
    try:
        parts.port  # noqa: B018 (urlsplit checks the port only when it is read)
    except ValueError as exc:
        raise BadRequest(f"callback_url {url!r} has an invalid port: {exc}") from None
    allowed = settings.calib_callback_hosts
    if allowed and parts.hostname not in allowed:
        raise BadRequest(
            f"callback_url host {parts.hostname!r} is not allowed (allowed: {', '.join(allowed)})"
        )
    if not allowed:
        try:
            address = ipaddress.ip_address(parts.hostname)
        except ValueError:
            address = None
        if address is not None and (
            address.is_link_local or address.is_multicast or address.is_unspecified
        ):
            raise BadRequest(f"callback_url host {parts.hostname!r} is not a usable address")
    return url


def best_calibrator(
    session: Session, target: Observation, max_time_separation_s: int
) -> Observation:
    """The calibrator observation nearest ``target`` with its settings and correlator data
    in the archive (one without cannot be fitted).

    Raises
    ------
    NotFound
        If there is none within ``max_time_separation_s``.
    """
    has_visibilities = (
        select(ObservationFile.id)
        .where(
            ObservationFile.obsid == Observation.obsid,
            ObservationFile.kind.in_([FileKind.MWAX_VIS, FileKind.LEGACY_GPUBOX]),
        )
        .exists()
    )
    found = session.scalars(
        select(Observation).where(
            Observation.calibration.is_(True), Observation.deleted.is_(False),
            Observation.obsid >= target.obsid - max_time_separation_s,
            Observation.obsid <= target.obsid + max_time_separation_s,
            has_visibilities,
        )
    )  # fmt: skip
    matches = sorted(
        (o for o in found if compatible(target, o)),
        key=lambda o: (abs(o.obsid - target.obsid), -o.obsid),
    )
    if not matches:
        raise NotFound(
            f"no calibrator observation within {max_time_separation_s} s of obs_id {target.obsid} "
            "with the same coarse channels and attenuation and its correlator data in the "
            "archive: no fit can be calculated"
        )
    return matches[0]


def add_cal_request(
    session: Session,
    settings: Settings,
    obsid: int,
    *,
    asvo_job_id: int | None = None,
    max_time_separation_s: int = DEFAULT_MAX_TIME_SEPARATION_S,
    callback_url: str | None = None,
) -> CalibrationRequest:
    """File a request to fit the best calibrator observation for ``obsid`` (committed).

    Raises
    ------
    BadRequest
        Unknown obsid, or a callback URL that may not be called.
    NotFound
        No calibrator observation within range.
    Conflict
        The request could not be stored.
    """
    if callback_url:
        check_callback_url(callback_url, settings)
    target = target_observation(session, obsid)
    calibrator = best_calibrator(session, target, max_time_separation_s)
    request = CalibrationRequest(
        cal_id=calibrator.obsid, target_obs_id=target.obsid, asvo_job_id=asvo_job_id,
        callback_url=callback_url or None, realtime=asvo_job_id is not None,
    )  # fmt: skip
    try:
        session.add(request)
        session.commit()
    except SQLAlchemyError as exc:
        session.rollback()
        raise Conflict(f"could not add the calibration request: {exc.__class__.__name__}") from exc
    return request


def finish_request(
    session: Session,
    request: CalibrationRequest,
    *,
    fit_id: int | None = None,
    error: str | None = None,
) -> None:
    """Record the end of a request's fit: a fit id, or an error message (exactly one)."""
    if (fit_id is None) == (error is None):
        raise ValueError("a request finishes with a fit id or with an error, not both or neither")
    now = datetime.now(UTC)
    if fit_id is not None:
        request.calibration_completed_datetime, request.calibration_fit_id = now, fit_id
    else:
        request.calibration_error_datetime, request.calibration_error_message = now, error
    session.flush()


def callback_body(request: CalibrationRequest) -> dict[str, object]:
    """The JSON a callback URL receives."""
    finished = request.calibration_completed_datetime or request.calibration_error_datetime
    success = request.calibration_fit_id is not None
    return {
        "cal_id": request.cal_id, "asvo_job_id": request.asvo_job_id,
        "target_obs_id": request.target_obs_id,
        "finished_datetime": finished.astimezone(UTC).isoformat() if finished else None,
        "success": success,
        "message": f"calibration fit {request.calibration_fit_id} of {request.cal_id} finished"
        if success else f"calibration of {request.cal_id} failed: {request.calibration_error_message}",
    }  # fmt: skip


def deliver_callbacks(
    session_factory: sessionmaker[Session], settings: Settings, *, now: datetime | None = None
) -> int:
    """Call back every finished request that is due; returns how many were accepted.

    A request is due when it has a callback URL, is not delivered, has attempts
    left, and its backoff (``calib_callback_backoff_s`` doubling per attempt) has passed.
    """
    now = now or datetime.now(UTC)
    accepted = 0
    with session_factory() as session:
        pending = session.scalars(
            select(CalibrationRequest).where(
                CalibrationRequest.callback_url.is_not(None),
                CalibrationRequest.callback_delivered_datetime.is_(None),
                CalibrationRequest.callback_attempts < settings.calib_callback_attempts,
                (CalibrationRequest.calibration_completed_datetime.is_not(None))
                | (CalibrationRequest.calibration_error_datetime.is_not(None)),
            )
        ).all()
        for request in pending:
            last = request.callback_last_attempt_datetime
            if last is not None:
                wait = timedelta(
                    seconds=settings.calib_callback_backoff_s * 2 ** (request.callback_attempts - 1)
                )
                if last + wait > now:
                    continue
            request.callback_attempts += 1
            request.callback_last_attempt_datetime = now
            try:
                reply = httpx.post(
                    request.callback_url or "",
                    json=callback_body(request),
                    timeout=CALLBACK_TIMEOUT_S,
                )
                ok, problem = reply.is_success, f"HTTP {reply.status_code}"
            except httpx.HTTPError as exc:
                ok, problem = False, f"{exc.__class__.__name__}: {exc}"
            if ok:
                request.callback_delivered_datetime, request.callback_error_message = now, None
                accepted += 1
            else:
                request.callback_error_message = problem
                log.warning("callback for calibration request %s failed (%s), attempt %d",
                            request.id, problem, request.callback_attempts)  # fmt: skip
            session.commit()
    return accepted


class CallbackSender:
    """A background thread delivering due callbacks every ``poll_s`` seconds."""

    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], *, poll_s: float = 5.0
    ) -> None:
        self._settings, self._session_factory, self._poll_s = settings, session_factory, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="calib-callbacks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(CALLBACK_TIMEOUT_S + 5)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                deliver_callbacks(self._session_factory, self._settings)
            except Exception:  # keep delivering; the database may be away for a moment
                log.exception("callback delivery pass failed")
