"""What the portal's pages show and do, apart from HTTP: forgery tokens, job rows, searches."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from observatory.archive import service as archive_service
from observatory.archive.models import Observation, ObservationFile
from observatory.asvo.models import TERMINAL_STATES, Job, JobType
from observatory.asvo.service import VOLTAGE_MODES, ProductView, UrlBuilder
from observatory.core.errors import BadRequest
from observatory.core.gpstime import gps_to_utc, now_gps, parse_obsid
from observatory.core.security import texts_match
from observatory.core.web import gps_time_param

JOB_TYPE_LABELS = {
    JobType.CONVERSION: "conversion",
    JobType.DOWNLOAD_VISIBILITIES: "visibility download",
    JobType.DOWNLOAD_METADATA: "metadata download",
    JobType.DOWNLOAD_VOLTAGE: "voltage download",
    JobType.CANCEL_JOB: "cancel",
    JobType.DOWNLOAD_BEAMFORMER: "beamformer",
    JobType.IMAGING: "imaging",
}


def job_type_label(job_type: int) -> str:
    """What the jobs page calls a job type (the number itself for one it does not know)."""
    try:
        return JOB_TYPE_LABELS[JobType(job_type)]
    except (ValueError, KeyError):
        return str(job_type)


def job_type_labels() -> dict[int, str]:
    """Every label by job type number: the jobs page's script names live rows with these."""
    return {int(job_type): label for job_type, label in JOB_TYPE_LABELS.items()}


def new_forgery_secret() -> str:
    """A random value for the anti-forgery cookie."""
    return secrets.token_urlsafe(24)


def forgery_token(key: bytes, cookie_value: str, *, session: str | None) -> str:
    """The token forms must carry: an HMAC of the anti-forgery cookie and the sign-in.

    ``session`` is the value of the portal's sign-in cookie the page was shown with (None
    or empty before signing in: the sign-in form's pre-session token). A page on another
    site can make the browser send the cookies but can neither read them nor compute the
    HMAC without the server's key. Binding the token to the sign-in matters against a
    page that can *set* cookies for this host (a sibling subdomain, plain http, another
    port): it may plant an anti-forgery cookie whose token it got anonymously, but that
    token is not the one for the user's sign-in cookie, which it cannot read (a sign-in
    cookie it planted instead would sign the browser in as someone else, not the user).
    """
    session = session or ""
    # Lengths first: no other (session, cookie) pair makes the same message.
    message = f"csrf:{len(session)}:{session}:{cookie_value}"
    return hmac.new(key, message.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def check_forgery_token(
    key: bytes, cookie_value: str | None, token: str | None, *, session: str | None
) -> None:
    """Raise ``BadRequest`` unless ``token`` is the one for this anti-forgery cookie and
    sign-in (``session``: the request's portal sign-in cookie, None without one).

    The sign-in cookie need not be valid any more: a form posted after the sign-in ended
    passes, and its handler sends the browser to the sign-in form.

    Raises
    ------
    BadRequest
        When the cookie or the token is missing or they do not match.
    """
    if (
        not cookie_value
        or not token
        or not texts_match(token, forgery_token(key, cookie_value, session=session))
    ):
        raise BadRequest(
            "the form's security token is missing or out of date: reload the page and try again"
        )


@dataclass(frozen=True)
class JobView:
    """One row of the jobs page."""

    job_id: int
    obs_id: int
    job_type: str
    state: str
    created_utc: str
    error_text: str | None
    files: list[dict[str, Any]]
    cancellable: bool


def _utc_text(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def job_views(session: Session, user_id: int, url_for: UrlBuilder) -> list[JobView]:
    """The user's jobs, newest first, with their product download links."""
    rows = session.execute(
        select(
            Job.id,
            Job.obs_id,
            Job.job_type,
            Job.state,
            Job.created,
            Job.error_text,
            Job.product,
            Job.completed,
        )
        .where(Job.user_id == user_id, Job.deleted.is_(False))
        .order_by(Job.id.desc())
    )
    views = []
    terminal = {state.value for state in TERMINAL_STATES}
    for job_id, obs_id, job_type, state, created, error_text, product, completed in rows:
        files = []
        if state == "completed" and product:
            reference = ProductView(job_id, state, product, completed)
            for entry in product.get("files", []):
                if entry.get("type") == "acacia":
                    files.append({**entry, "url": url_for(reference, entry)})
                else:
                    files.append(dict(entry))
        views.append(
            JobView(
                job_id=job_id,
                obs_id=obs_id,
                job_type=job_type_label(job_type),
                state=state,
                created_utc=_utc_text(created),
                error_text=error_text,
                files=files,
                cancellable=state not in terminal,
            )
        )
    return views


@dataclass(frozen=True)
class ObservationView:
    """One row of the observations page."""

    obsid: int
    obsname: str
    start_utc: str
    duration_s: int
    project_id: str | None
    mode: str
    #: Ended: its data can be asked for (the ASVO refuses a job for one still to come).
    observed: bool
    #: Has files in the archive: a job for it can run (they arrive after it ends).
    archived: bool


def search_observations(
    session: Session, *, mintime: str, maxtime: str, project_id: str, mode: str, page: int
) -> tuple[list[ObservationView], bool]:
    """Observations for the browser's form (newest first, 100 a page) and whether more follow."""
    first, last = gps_time_param("From", mintime), gps_time_param("To", maxtime)
    rows, has_more, _ = archive_service.find_observations(
        session,
        mintime=None if first is None else int(first),
        maxtime=None if last is None else int(last),
        project_id=project_id.strip() or None,
        mode=mode.strip() or None,
        page=max(page, 1),
        page_size=100,
    )
    now = now_gps()
    archived = set(
        session.scalars(
            select(ObservationFile.obsid)
            .where(ObservationFile.obsid.in_([row.obsid for row in rows]))
            .distinct()
        )
    )
    views = [
        ObservationView(
            obsid=row.obsid,
            obsname=row.obsname,
            start_utc=gps_to_utc(row.obsid).strftime("%Y-%m-%d %H:%M:%S"),
            duration_s=row.stoptime - row.obsid,
            project_id=row.project_id,
            mode=row.mode,
            observed=row.stoptime <= now,
            archived=row.obsid in archived,
        )
        for row in rows
    ]
    return views, has_more


def job_type_for(session: Session, obs_id: str) -> str:
    """The submission form's job type for an observation: a voltage download for a voltage
    observation (a conversion would be refused), else a conversion."""
    try:
        observation = session.get(Observation, parse_obsid(obs_id))
    except ValueError:  # not an obsid (or beyond any): the form says so when submitted
        observation = None
    if observation is not None and observation.mode in VOLTAGE_MODES:
        return "voltage"
    return "conversion"
