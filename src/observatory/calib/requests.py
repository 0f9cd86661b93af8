"""Calibration fit requests: filing one for a target, finishing it, and calling back.

``add_cal_request`` finds the calibrator observation nearest the target (same
coarse channels, tiles and attenuation, within ``max_time_separation``) and files a
request to fit it. When the fit finishes (or fails), the request records it, and
its callback URL, if any, gets the source document's JSON: ``cal_id``,
``asvo_job_id``, ``target_obs_id``, ``finished_datetime``, ``success``, ``message``.
Deliveries are retried with exponential backoff until one is accepted (2xx),
and never repeated after that. Each attempt is bounded: it must end within
``CALLBACK_TIMEOUT_S`` overall and its answer may be at most
``CALLBACK_REPLY_MAX_BYTES`` long, and up to ``CALLBACK_WORKERS`` are sent at once, so
that no receiver, however slow or verbose, holds up the others or the server's memory.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import column, func, select, table, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.expression import Exists

from observatory.archive.models import FileKind, Observation, ObservationFile
from observatory.calib.models import MAX_CALLBACK_URL_CHARS, CalibrationFit, CalibrationRequest
from observatory.calib.service import (
    DEFAULT_MAX_TIME_SEPARATION_S,
    antenna_tiles,
    incompatibility,
    matching_tiles,
    rejection_note,
    target_observation,
)
from observatory.core.config import Settings
from observatory.core.errors import BadRequest, Conflict, NotFound
from observatory.telescope import catalogue

log = logging.getLogger(__name__)
#: The longest one callback attempt may take, from connecting to the last byte of the
#: answer read (not per read: a receiver trickling its answer a byte at a time would
#: otherwise hold the attempt for ever). An attempt cut off by it has failed.
CALLBACK_TIMEOUT_S = 30.0
#: The most of a receiver's answer that is read. Only its status matters; an answer longer
#: than this is not read further, and the attempt has failed (a receiver answering
#: hundreds of megabytes would otherwise have them all held in the server's memory).
CALLBACK_REPLY_MAX_BYTES = 16 * 1024
#: How many callbacks are sent at once: a slow receiver holds up one of these for at most
#: ``CALLBACK_TIMEOUT_S``, and the others' callbacks go on meanwhile.
CALLBACK_WORKERS = 8
#: How long a claimed attempt is its server's: another server (a standby on the same
#: database) claims no attempt of that request meanwhile. Longer than an attempt may take
#: (``CALLBACK_TIMEOUT_S``), so that a receiver slow to answer is not sent the callback
#: twice; the pass's own stamp replaces it once the attempt has ended.
CALLBACK_CLAIM_LEASE_S = CALLBACK_TIMEOUT_S + 15.0
#: The ASVO jobs table, only for checking that a job exists (see ``check_asvo_job``).
_ASVO_JOBS = table("asvo_jobs", column("id"))


def check_callback_url(url: str, settings: Settings) -> str:
    """The callback URL, if it may be called.

    Parameters
    ----------
    url
        The URL as the caller gave it.
    settings
        Where ``calib_callback_hosts`` (the hosts allowed, when set) comes from.

    Returns
    -------
    str
        ``url``, unchanged.

    Raises
    ------
    BadRequest
        Naming ``callback_url``, for a URL that is malformed (control characters, an
        unbalanced or invalid ``[IPv6]`` host, a host that cannot be encoded), is not
        http(s), carries credentials, has a port outside 1..65535, or names a host
        outside ``calib_callback_hosts`` (when that list is set), or is longer than
        ``MAX_CALLBACK_URL_CHARS``.
    """
    if len(url) > MAX_CALLBACK_URL_CHARS:  # the column's width: PostgreSQL would refuse it
        raise BadRequest(
            f"callback_url is {len(url)} characters long; at most {MAX_CALLBACK_URL_CHARS} "
            "are allowed"
        )
    # Checked on the raw text: urlsplit silently drops CR, LF and tab, so the parts below
    # would look clean while httpx refuses the URL (or a header is injected) at delivery.
    bad = next((ch for ch in url if not ch.isprintable()), None)
    if bad is not None:
        raise BadRequest(
            f"callback_url {url!r} must not contain control or other non-printable "
            f"characters (found {bad!r} at position {url.index(bad)})"
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL" for an unclosed "[::1"
        raise BadRequest(f"callback_url {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"callback_url {url!r} must be an http or https URL")
    if parts.username is not None or parts.password is not None:
        raise BadRequest("callback_url must not carry credentials")
    try:
        port = parts.port  # urlsplit checks the port only when it is read
    except ValueError as exc:
        raise BadRequest(
            f"callback_url {url!r} has an invalid port ({exc}): use 1 to 65535"
        ) from None
    if port == 0:  # urlsplit takes 0, but nothing can be called on it
        raise BadRequest(f"callback_url {url!r} has an invalid port (0): use 1 to 65535")
    try:
        # What delivery will send: a URL httpx cannot build (a bad [IPv6] host), or whose
        # host it cannot decode (IDNA, read from .host when sending) would otherwise be
        # stored and fail on every attempt.
        httpx.URL(url).host  # noqa: B018
    except (httpx.InvalidURL, ValueError) as exc:  # IDNAError is a ValueError
        raise BadRequest(f"callback_url {url!r} is not a valid URL: {exc}") from None
    allowed = settings.calib_callback_hosts
    if allowed and parts.hostname not in allowed:
        raise BadRequest(
            f"callback_url host {parts.hostname!r} is not allowed (allowed: {', '.join(allowed)})"
        )
    if not allowed:
        address = _address_written(parts.hostname)
        if address is not None and _unusable(address):
            raise BadRequest(
                f"callback_url host {parts.hostname!r} is not a usable address ({address})"
            )
    return url


#: NAT64's well-known prefix (RFC 6052): its last 32 bits are an IPv4 address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: A cloud's instance metadata service at a unique-local IPv6 address (AWS's; its IPv4 one,
#: 169.254.169.254, is link-local).
_METADATA_SERVICES = frozenset({ipaddress.IPv6Address("fd00:ec2::254")})


def _unusable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A link-local, multicast or unspecified address, or a cloud's metadata service; an
    IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64) by that IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _METADATA_SERVICES:
            return True
        carried = address.ipv4_mapped or address.sixtofour
        if carried is None and address in _NAT64:
            carried = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
        address = carried or address
    return address.is_link_local or address.is_multicast or address.is_unspecified


def _address_written(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` is written as, in any spelling the resolver takes as one
    (``0x7f000001``, ``2130706433``, ``127.1``, ``0``, a trailing dot), or None for a name."""
    host = host.removesuffix(".")
    try:
        return ipaddress.ip_address(host.split("%")[0])  # an IPv6 zone is no other address
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


class CallbackRefused(Exception):
    """A callback that may not be sent now; the message says why."""


def callback_address(url: str) -> str:
    """The address to call ``url`` at: the first its host resolves to, when every one it
    resolves to is usable (a name is checked when it is called, not filed).

    The host resolved is the one the HTTP client sends (its IDNA 2008 form: ``faß.de`` is
    ``xn--fa-hia.de``, not IDNA 2003's ``fass.de``).

    Raises
    ------
    CallbackRefused
        If the host does not resolve, or resolves to an address that is not usable.
    httpx.InvalidURL
        For a URL the HTTP client cannot send (one stored before URLs were checked).
    """
    target = httpx.URL(url)
    host = target.raw_host.decode("ascii")
    if not host:
        raise CallbackRefused(f"callback URL {url!r} has no host")
    port = target.port or (443 if target.scheme == "https" else 80)
    if not 0 < port <= 65535:  # httpx takes any number, and the connection wraps it round
        raise CallbackRefused(f"callback URL {url!r}: port {port} is out of range")
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, OverflowError) as exc:
        # Never sent unchecked: the HTTP client would resolve it again, and a resolver
        # that failed once may answer the second time with an address refused here.
        raise CallbackRefused(f"callback host {target.host} does not resolve ({exc})") from None
    for *_, sockaddr in found:
        address = _address_written(str(sockaddr[0]))
        if address is not None and _unusable(address):
            raise CallbackRefused(
                f"callback host {target.host} resolves to {address}, not a usable address"
            )
    if not found:
        raise CallbackRefused(f"callback host {target.host} does not resolve")
    return str(found[0][4][0])


class CallbackCutOff(Exception):
    """A callback exchange stopped at a limit (``CALLBACK_TIMEOUT_S`` or
    ``CALLBACK_REPLY_MAX_BYTES``); the message says which."""


@dataclass(frozen=True)
class CallbackReply:
    """What a callback receiver answered: its status and the answer's bytes (all of them,
    as it is at most ``CALLBACK_REPLY_MAX_BYTES`` long)."""

    status_code: int
    content: bytes

    @property
    def is_success(self) -> bool:
        """Whether the receiver accepted the callback (a 2xx status)."""
        return 200 <= self.status_code < 300


def _post_callback(url: str, body: dict[str, object], pinned: str | None) -> CallbackReply:
    """POST ``body`` to ``url``, connecting to the ``pinned`` address when given.

    The address checked is the one called: a name resolved again by the HTTP client could
    answer differently the second time (DNS rebinding: a public address for the check, then
    a link-local one for the call). The request keeps the name in its Host header and, over
    https, in the TLS server name the certificate is checked against.

    The whole exchange (connecting, sending, the status and headers, the answer's body) must
    end within ``CALLBACK_TIMEOUT_S``, and the body is read, as it streams in, up to
    ``CALLBACK_REPLY_MAX_BYTES`` only.

    Raises
    ------
    CallbackCutOff
        If the exchange did not end in time, or the answer is longer than allowed.
    httpx.HTTPError
        If the receiver could not be reached or answered malformed HTTP.
    """
    target = httpx.URL(url)
    extensions: dict[str, object] = {}
    if pinned is not None and target.host != pinned:
        if target.scheme == "https":
            extensions["sni_hostname"] = target.host
        headers = {"Host": target.netloc.decode("ascii")}
        target = target.copy_with(host=pinned)
    else:
        headers = {}
    request = httpx.Request("POST", target, json=body, headers=headers, extensions=extensions)
    # Read when called, not bound at import: an operator's (or a test's) change applies.
    deadline_s, limit = CALLBACK_TIMEOUT_S, CALLBACK_REPLY_MAX_BYTES
    try:
        # asyncio's timeout cancels whatever the exchange is waiting on (a connection, a
        # header line, a chunk of the body): httpx's own timeouts are per read, and a
        # receiver sending a byte just within each would never be cut off.
        return asyncio.run(_exchange(request, deadline_s, limit))
    except TimeoutError:
        raise CallbackCutOff(
            f"no complete answer within {deadline_s:g} s (connecting, sending and reading "
            "the answer together): cut off"
        ) from None


async def _exchange(request: httpx.Request, deadline_s: float, limit: int) -> CallbackReply:
    """Send ``request`` and read at most ``limit`` bytes of the answer, all within
    ``deadline_s`` seconds (``TimeoutError`` when not).

    Raises
    ------
    CallbackCutOff
        If the answer is longer than ``limit`` bytes (the rest is not read).
    """
    async with asyncio.timeout(deadline_s):
        async with httpx.AsyncClient(timeout=deadline_s) as client:
            response = await client.send(request, stream=True)
            try:
                content = bytearray()
                # Raw bytes, not decoded: a small compressed answer could inflate to any size.
                async for chunk in response.aiter_raw():
                    if len(content) + len(chunk) > limit:
                        raise CallbackCutOff(
                            f"HTTP {response.status_code} with an answer longer than {limit} "
                            "bytes: cut off, the rest not read"
                        )
                    content += chunk
            finally:
                # Closes the connection of an answer not read to its end: nothing more of
                # it is received.
                await response.aclose()
    return CallbackReply(response.status_code, bytes(content))


def _has_visibilities() -> Exists:
    """Whether an observation (the outer query's) has correlator data in the archive."""
    return (
        select(ObservationFile.id)
        .where(
            ObservationFile.obsid == Observation.obsid,
            ObservationFile.kind.in_([FileKind.MWAX_VIS, FileKind.LEGACY_GPUBOX]),
        )
        .exists()
    )


def check_asvo_job(session: Session, asvo_job_id: int) -> int:
    """The ASVO job id, if such a job exists.

    Parameters
    ----------
    session
        A database session.
    asvo_job_id
        The job a fit request is filed for.

    Returns
    -------
    int
        ``asvo_job_id``, unchanged.

    Raises
    ------
    BadRequest
        Naming ``asvo_job_id``, when there is no such ASVO job.
    """
    # The id only labels the request (the callback echoes it, as the MWA's service does):
    # a number that is no job is a mistake in the request, refused as the documentation
    # says. It gives no hold on the job: an ASVO job waiting for calibration follows only
    # the request it filed itself, by that request's id (asvo.pipeline), never requests
    # found by this column, which anyone may set.
    # The table is named rather than imported: calib must not depend on asvo.
    found = session.scalar(select(_ASVO_JOBS.c.id).where(_ASVO_JOBS.c.id == asvo_job_id))
    if found is None:
        raise BadRequest(f"asvo_job_id {asvo_job_id} is not an ASVO job")
    return asvo_job_id


#: How long after a calibrator observation ends its data may still arrive in the archive
#: (the telescope records an observation once it has ended; an operator may ingest later).
RECORDING_GRACE_S = 3600


def _calibrators_near(
    session: Session,
    target: Observation,
    max_time_separation_s: int,
    *,
    recorded: bool,
    settings: Settings | None = None,
    match_attenuation: bool = True,
) -> tuple[list[Observation], Counter[str]]:
    """Calibrator observations within range of ``target`` and compatible with it, nearest
    first: those with correlator data in the archive (``recorded``), or those without;
    and how many in range each :func:`~observatory.calib.service.incompatibility` left out
    (another attenuation only with ``match_attenuation``).

    With ``settings`` (where the archive is) and both metafits archived, a calibrator of
    other tiles than the target's is left out too (its fit would be indexed by antenna
    for another array); otherwise the number of tiles is the rule.
    """
    has_visibilities = _has_visibilities()
    found = session.scalars(
        select(Observation).where(
            Observation.calibration.is_(True), Observation.deleted.is_(False),
            Observation.obsid >= target.obsid - max_time_separation_s,
            Observation.obsid <= target.obsid + max_time_separation_s,
            has_visibilities if recorded else ~has_visibilities,
        )
    )  # fmt: skip
    target_tiles = antenna_tiles(session, settings, target.obsid)
    kept: list[Observation] = []
    rejected: Counter[str] = Counter()
    for calibrator in found:
        reason = (
            incompatibility(target, calibrator, match_attenuation=match_attenuation)
            if fittable_source(calibrator.calibrator_source)
            else UNMODELLED_SOURCE
        )
        if reason is None and target_tiles is not None:
            # Only for a calibrator that passed the other checks: its tile ids are in its
            # metafits, read once per calibrator (and cached while the file is unchanged).
            same = matching_tiles(target_tiles, antenna_tiles(session, settings, calibrator.obsid))
            reason = incompatibility(
                target, calibrator, match_attenuation=match_attenuation, same_tiles=same
            )
        if reason is None:
            kept.append(calibrator)
        else:
            rejected[reason] += 1
    kept.sort(key=lambda o: (abs(o.obsid - target.obsid), -o.obsid))
    return kept, rejected


#: Why a calibrator whose source the fit has no model of is left out (as the
#: ``incompatibility`` reasons read: "N within range passed over: 1 for ...").
UNMODELLED_SOURCE = (
    "for a source the fit has no model of (none recorded, the Sun, or not catalogued)"
)


def fittable_source(name: str | None) -> bool:
    """Whether the pipeline can fit a calibrator observation of ``name``: its point-source
    model is a catalogue entry (the Sun, and observations without a source, have none)."""
    if not name or name.strip().upper() == "SUN":
        return False
    try:
        catalogue.lookup(name)
    except catalogue.UnknownSourceError:
        return False
    return True


def best_calibrator(
    session: Session,
    target: Observation,
    max_time_separation_s: int,
    *,
    settings: Settings | None = None,
    match_attenuation: bool = True,
) -> Observation:
    """The calibrator observation nearest ``target`` with its settings and correlator data
    in the archive (one without cannot be fitted).

    ``settings`` locates the archive: with it, a calibrator whose metafits has other tiles
    than the target's (each antenna index the same tile id) is not taken; without it, or
    when either metafits is not archived, only the number of tiles is compared. Without
    ``match_attenuation`` one of another attenuation is taken too (``any_gain``).

    Raises
    ------
    NotFound
        If there is none within ``max_time_separation_s``.
    """
    matches, rejected = _calibrators_near(
        session, target, max_time_separation_s, recorded=True, settings=settings,
        match_attenuation=match_attenuation,
    )  # fmt: skip
    if not matches:
        alike = "coarse channels, tiles and attenuation" if match_attenuation else "coarse channels and tiles"  # fmt: skip
        raise NotFound(
            f"no calibrator observation within {max_time_separation_s} s of obs_id {target.obsid} "
            f"with the same {alike} and its correlator "
            f"data in the archive: no fit can be calculated{rejection_note(rejected)}"
        )
    return matches[0]


def awaited_calibrator(
    session: Session,
    target: Observation,
    now_gps_s: float,
    max_time_separation_s: int = DEFAULT_MAX_TIME_SEPARATION_S,
    *,
    settings: Settings | None = None,
) -> Observation | None:
    """A calibrator observation for ``target`` that is scheduled, or has just ended, and
    whose data may still be recorded: a job waiting for calibration waits for it.

    A trigger with ``calibrator=true`` schedules its calibrator after the target, so a
    job for the target can be submitted before the calibrator has been observed.

    Parameters
    ----------
    session
        A database session.
    target
        The observation to be calibrated.
    now_gps_s
        The current GPS time.
    max_time_separation_s
        How far from the target a calibrator may be.
    settings
        Where the archive is: with it, a calibrator whose archived metafits has other tiles
        than the target's is not awaited (as :func:`best_calibrator` would not take it).

    Returns
    -------
    Observation or None
        The nearest such calibrator, or None when no calibrator is still to come
        (none within range, or each ended more than :data:`RECORDING_GRACE_S` ago).
    """
    pending, _ = _calibrators_near(
        session, target, max_time_separation_s, recorded=False, settings=settings
    )
    return next((o for o in pending if o.stoptime + RECORDING_GRACE_S > now_gps_s), None)


def add_cal_request(
    session: Session,
    settings: Settings,
    obsid: int,
    *,
    asvo_job_id: int | None = None,
    max_time_separation_s: int = DEFAULT_MAX_TIME_SEPARATION_S,
    callback_url: str | None = None,
    match_attenuation: bool = True,
) -> CalibrationRequest:
    """File a request to fit the best calibrator observation for ``obsid`` (committed);
    without ``match_attenuation``, the calibrator may have another attenuation.

    Raises
    ------
    BadRequest
        Unknown obsid, a callback URL that may not be called, or an ``asvo_job_id``
        that is no ASVO job.
    NotFound
        No calibrator observation within range.
    Conflict
        The request could not be stored.
    """
    if callback_url:
        check_callback_url(callback_url, settings)
    if asvo_job_id is not None:
        check_asvo_job(session, asvo_job_id)
    target = target_observation(session, obsid)
    calibrator = best_calibrator(
        session, target, max_time_separation_s, settings=settings,
        match_attenuation=match_attenuation,
    )  # fmt: skip
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


#: At most this many automatic requests are filed per dispatcher pass (newest calibrators
#: first), so that a large backlog (an archive ingested at once) trickles in.
AUTO_REQUESTS_PER_PASS = 100


def request_unfitted_calibrators(
    session: Session, limit: int = AUTO_REQUESTS_PER_PASS
) -> list[CalibrationRequest]:
    """File a bulk (low-priority) fit request for each calibrator observation that needs one.

    calvin's rule (specs/calib.md 3.5, ``get_unattempted_unrequested_cal_obsids``): a
    calibrator observation (``calibration`` true, not deleted, with a calibrator other
    than the Sun, which calvin never calibrates on, and, as :func:`fittable_source`
    says, one the catalogue has a model of) with correlator data in the archive,
    no fit and no request yet. Each such observation is requested once: a request that
    failed is not filed again (a person can, with ``add_cal_request``).

    Parameters
    ----------
    session
        A database session; the requests are committed.
    limit
        At most this many requests (the newest observations first).

    Returns
    -------
    list of CalibrationRequest
        The requests filed (``bulk_request`` true, ``realtime`` false, for no target but
        the calibrator itself).
    """
    has_visibilities = _has_visibilities()
    fitted = select(CalibrationFit.fitid).where(CalibrationFit.obsid == Observation.obsid).exists()
    requested = (
        select(CalibrationRequest.id).where(CalibrationRequest.cal_id == Observation.obsid).exists()
    )
    candidates = session.execute(
        select(Observation.obsid, Observation.calibrator_source)
        .where(
            Observation.calibration.is_(True), Observation.deleted.is_(False),
            Observation.calibrator_source.is_not(None),
            func.upper(Observation.calibrator_source) != "SUN",
            has_visibilities, ~fitted, ~requested,
        )
        .order_by(Observation.obsid.desc())
    )  # fmt: skip
    # The same rule as a person's request (fittable_source): a calibrator the catalogue has
    # no model of cannot be fitted, and is left out rather than filed to fail.
    fittable = (obsid for obsid, source in candidates if fittable_source(source))
    obsids = list(itertools.islice(fittable, limit))
    filed = [
        CalibrationRequest(cal_id=obsid, target_obs_id=obsid, realtime=False, bulk_request=True)
        for obsid in obsids
    ]
    if filed:
        session.add_all(filed)
        session.commit()
        log.info("filed fit requests for %d calibrator observation(s)", len(filed))
    return filed


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
    Any failure to send one request's callback (an HTTP error, a URL httpx refuses, an
    exchange cut off at ``CALLBACK_TIMEOUT_S`` or ``CALLBACK_REPLY_MAX_BYTES``, anything
    else raised while building or sending it) is a failed attempt of that request:
    counted, recorded in ``callback_error_message`` and logged; the other requests are
    still called back.

    Each attempt is claimed (its count raised, committed) before it is sent: of several
    servers on one database (a standby among them), only the one whose claim succeeded
    sends it. The attempts claimed are sent by up to ``CALLBACK_WORKERS`` threads at once
    (the network only; the database is written from this thread), so that a receiver that
    is slow to answer holds up no other's callback.
    """
    now = now or datetime.now(UTC)
    accepted = 0
    with session_factory() as session:
        claimed = _claim_due_callbacks(session, settings, now)
        if not claimed:
            return 0
        with ThreadPoolExecutor(
            max_workers=min(CALLBACK_WORKERS, len(claimed)), thread_name_prefix="calib-callback"
        ) as pool:
            # The body is built here: the ORM objects stay in this thread's session.
            attempts = {
                pool.submit(
                    _attempt_callback, request.callback_url or "", callback_body(request), settings
                ): request
                for request in claimed
            }
            for done in as_completed(attempts):
                request = attempts[done]
                ok, problem, unforeseen = done.result()
                request.callback_last_attempt_datetime = now  # the lease ends: back-off from now
                if ok:
                    request.callback_delivered_datetime, request.callback_error_message = now, None
                    accepted += 1
                else:
                    request.callback_error_message = problem
                    log.warning("callback for calibration request %s failed (%s), attempt %d",
                                request.id, problem, request.callback_attempts,
                                exc_info=unforeseen)  # fmt: skip
                session.commit()
    return accepted


def _claim_due_callbacks(
    session: Session, settings: Settings, now: datetime
) -> list[CalibrationRequest]:
    """Claim an attempt of every request whose callback is due (committed), and return
    those claimed: a request another server claimed meanwhile is left to it.

    At most ``CALLBACK_WORKERS``, so that each claimed attempt is sent at once (the others
    are due at the next pass). A claim stamps the request's last attempt
    ``CALLBACK_CLAIM_LEASE_S`` ahead: while its attempt may be in flight, no server takes
    the next one (stamped with the pass's time, a second server took the retry of an
    attempt still waiting for a slow receiver, which then got the callback twice).
    """
    pending = session.scalars(
        select(CalibrationRequest).where(
            CalibrationRequest.callback_url.is_not(None),
            CalibrationRequest.callback_delivered_datetime.is_(None),
            CalibrationRequest.callback_attempts < settings.calib_callback_attempts,
            (CalibrationRequest.calibration_completed_datetime.is_not(None))
            | (CalibrationRequest.calibration_error_datetime.is_not(None)),
        )
    ).all()
    claimed: list[CalibrationRequest] = []
    for request in pending:
        if len(claimed) == CALLBACK_WORKERS:
            break
        last = request.callback_last_attempt_datetime
        if last is not None:
            wait = timedelta(
                seconds=settings.calib_callback_backoff_s * 2 ** (request.callback_attempts - 1)
            )
            if last + wait > now:
                continue
        # The ORM sets the claimed values on ``request`` too (no reading it back).
        won = session.execute(
            update(CalibrationRequest)
            .where(
                CalibrationRequest.id == request.id,
                CalibrationRequest.callback_attempts == request.callback_attempts,
                CalibrationRequest.callback_delivered_datetime.is_(None),
            )
            .values(
                callback_attempts=CalibrationRequest.callback_attempts + 1,
                callback_last_attempt_datetime=now + timedelta(seconds=CALLBACK_CLAIM_LEASE_S),
            )
        ).rowcount  # type: ignore[attr-defined]
        session.commit()
        if won != 1:  # another server took this attempt since the query above
            session.expire(request)  # the values set on it are not the database's
            continue
        claimed.append(request)
    return claimed


def _attempt_callback(
    url: str, body: dict[str, object], settings: Settings
) -> tuple[bool, str | None, Exception | None]:
    """Send one callback attempt (in a worker thread: no database here).

    Returns
    -------
    tuple of (bool, str or None, Exception or None)
        Whether the receiver accepted it; if not, why (for ``callback_error_message``),
        and the exception when the failure was unforeseen (logged with its traceback).
    """
    try:
        # A name is checked by what it resolves to when called (and not at all for
        # the hosts an operator allowed).
        pinned = None if settings.calib_callback_hosts else callback_address(url)
        reply = _post_callback(url, body, pinned)
    except (CallbackRefused, CallbackCutOff) as exc:
        return False, str(exc), None
    except httpx.HTTPError as exc:
        return False, f"{exc.__class__.__name__}: {exc}", None
    except Exception as exc:
        # Anything else (a URL stored before it was checked, which httpx refuses
        # with InvalidURL or an IDNA error; an unforeseen failure) is this
        # request's failed attempt: counted, and never the end of the other
        # requests' deliveries.
        return False, f"{exc.__class__.__name__}: {exc}", exc
    if reply.is_success:
        return True, None, None
    return False, f"HTTP {reply.status_code}", None


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
