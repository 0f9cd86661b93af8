"""ASVO job logic: client login, submission with the real service's validation and
messages, listing in the clients' row format, cancellation.

The protocol is specified in ../shared/specs/asvo.md (sections 1-3 and the
compatibility checklist); the comments name the section a rule comes from.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from observatory.archive.models import Observation, ObservationMode
from observatory.asvo.models import TERMINAL_STATES, Job, JobState, JobType
from observatory.core.accounts import authenticate_api_key
from observatory.core.config import Settings
from observatory.core.database import MAX_SQL_ID, utcnow
from observatory.core.errors import BadRequest, Forbidden, NotFound, ServiceError
from observatory.core.gpstime import gps_to_utc_iso, now_gps
from observatory.core.models import User
from observatory.core.text import is_ascii_digits, is_ascii_integer
from observatory.preprocess.options import (
    LEGACY_KEYS,
    ConversionOptions,
    OptionError,
    ResolvedOptions,
    parse_bool,
)

#: Error codes the clients act on (section 2.2): 0 invalid input, 2 duplicate job.
ERROR_CODE_INVALID = 0
ERROR_CODE_DUPLICATE = 2

DELIVERIES = ("acacia", "scratch", "dug")
#: Correlator modes whose visibilities can be downloaded or converted.
CORRELATOR_MODES = frozenset(
    {ObservationMode.HW_LFILES, ObservationMode.MWAX_CORRELATOR, ObservationMode.MWAX_CORR_BF}
)
VOLTAGE_MODES = frozenset(
    {ObservationMode.VOLTAGE_START, ObservationMode.VOLTAGE_BUFFER, ObservationMode.MWAX_VCS,
     ObservationMode.MWAX_BUFFER}
)  # fmt: skip
#: ``row.job_params.job_type`` per job type (section 3: "download" and "conversion" are
#: the values seen; the others are our choice, the field being free text to the clients).
PARAMS_JOB_TYPE = {
    JobType.CONVERSION: "conversion",
    JobType.DOWNLOAD_VISIBILITIES: "download",
    JobType.DOWNLOAD_METADATA: "download",
    JobType.DOWNLOAD_VOLTAGE: "download_voltage",
}
OUTAGE_MESSAGES = {
    "full": "Your job cannot be submitted as there is a full outage in progress.",
    "partial": (
        "Your job cannot be submitted as there is a partial outage, "
        "please use a delivery location other than acacia."
    ),
}


class AsvoError(BadRequest):
    """A refused submission: HTTP 400 with ``{"error", "error_code"[, "job_id"]}``."""

    def __init__(
        self, message: str, *, error_code: int = ERROR_CODE_INVALID, job_id: int | None = None
    ) -> None:
        super().__init__(
            message, error_code=error_code, extra={} if job_id is None else {"job_id": job_id}
        )


# ----------------------------------------------------------------------------------------------
# Login (section 1.2)

_CLIENT_VERSION = re.compile(
    r"^(?P<prefix>mantaray-clientv|giant-squidv)(?P<version>[0-9]{1,9}(?:\.[0-9]{1,9})*)"
    r"(?P<suffix>[-+][0-9A-Za-z.+-]+)?$"  # a SemVer pre-release or build (Cargo's versions)
)


def _version_key(text: str, suffix: str | None = None) -> tuple[tuple[int, ...], int]:
    """Comparable: ``2.5`` is ``2.5.0``, and a pre-release (``2.5.1-rc1``) comes before its
    release, as in SemVer."""
    numbers = [int(part) for part in text.split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    pre_release = suffix is not None and suffix.startswith("-")
    return tuple(numbers), 0 if pre_release else 1


def check_client_version(client: str, minimums: Mapping[str, str]) -> None:
    """Accept ``mantaray-clientvX.Y`` and ``giant-squidvX.Y.Z`` at or above the configured minimum.

    Raises
    ------
    BadRequest
        If ``client`` is not a known client's version string.
    Forbidden
        If the client is older than the minimum.
    """
    match = _CLIENT_VERSION.match(client.strip())
    if match is None:
        raise BadRequest(
            f"Unrecognised client {client!r}: use mwa_client (mantaray-clientvX.Y) or "
            "giant-squid (giant-squidvX.Y.Z)",
            error_code=ERROR_CODE_INVALID,
        )
    minimum = minimums.get(match["prefix"])
    version = match["version"] + (match["suffix"] or "")
    if minimum is not None and _version_key(match["version"], match["suffix"]) < _version_key(
        minimum
    ):
        raise Forbidden(
            f"Client version {version} is too old; please upgrade to "
            f"{match['prefix'].removesuffix('v')} {minimum} or newer",
            error_code=ERROR_CODE_INVALID,
        )


def login(session: Session, settings: Settings, client: str, api_key: str) -> int:
    """Check the client version and the API key; returns the user id.

    Raises
    ------
    BadRequest, Forbidden
        For an unknown or too old client.
    Unauthorized
        For a wrong API key.
    """
    check_client_version(client, settings.asvo_min_client_versions)
    return authenticate_api_key(session, api_key).id


# ----------------------------------------------------------------------------------------------
# Submission (sections 2.1-2.3)


#: The job types a user submits by name (the portal's form, UWS's ``job_type``), and the
#: ASVO endpoint each stands for.
JOB_TYPES_BY_NAME = {
    "conversion": JobType.CONVERSION,
    "download_vis": JobType.DOWNLOAD_VISIBILITIES,
    "voltage": JobType.DOWNLOAD_VOLTAGE,
}


def job_type_named(name: str) -> JobType:
    """The job type a ``job_type`` field names (``conversion``, ``download_vis``, ``voltage``).

    Raises
    ------
    AsvoError
        For a missing or unknown name, in the API's words.
    """
    text = name.strip().lower()
    if not text:
        raise AsvoError("Job Type: Expected not None")
    if text not in JOB_TYPES_BY_NAME:
        raise AsvoError(f"Job Type: {text!r} is not one of {', '.join(JOB_TYPES_BY_NAME)}")
    return JOB_TYPES_BY_NAME[text]


def _required(form: Mapping[str, str], key: str, label: str) -> str:
    value = form.get(key, "").strip()
    if not value:
        raise AsvoError(f"{label}: Expected not None")
    return value


def _refused_for(obsid: int | str, reason: str) -> AsvoError:
    """A refusal about one observation, worded as the ASVO words them: giant-squid goes on
    to the next obsid of its batch only after a message that starts so (any other refusal
    ends the batch, specs/asvo.md section 2.2)."""
    return AsvoError(f"Unable to submit job. Observation {obsid}: {reason}")


def _observation(session: Session, form: Mapping[str, str]) -> Observation:
    text = _required(form, "obs_id", "Obs Id")
    if not re.fullmatch(r"[0-9]{10}", text):
        raise AsvoError(f"Obs Id: {text!r} is not a 10-digit observation id")
    observation = session.get(Observation, int(text))
    if observation is None or observation.deleted:
        raise AsvoError(f"Observation {text} does not exist")
    if observation.stoptime > now_gps() and not observation.files:
        # Scheduled, not yet recorded: the job would fail when it ran, finding no files.
        raise _refused_for(
            text,
            f"it has not been observed yet: it ends at "
            f"{gps_to_utc_iso(observation.stoptime)[:19]} UTC; submit the job after that",
        )
    return observation


def _int_field(form: Mapping[str, str], key: str, label: str, low: int, high: int) -> int:
    text = _required(form, key, label)
    if not is_ascii_integer(text):
        raise AsvoError(f"{label}: {text!r} is not a whole number")
    value = int(text)
    if not low <= value <= high:
        raise AsvoError(f"{label}: {value} is outside {low}..{high}")
    return value


def _bool_field(form: Mapping[str, str], key: str) -> bool:
    try:
        return parse_bool(key, form.get(key, "false"))
    except OptionError as exc:
        raise AsvoError(str(exc)) from None


def _common(form: Mapping[str, str], settings: Settings, job_type: JobType) -> dict[str, Any]:
    voltage = job_type == JobType.DOWNLOAD_VOLTAGE
    delivery = form.get("delivery", "").strip().lower() or default_delivery(job_type)
    if delivery not in DELIVERIES:
        raise AsvoError(f"Delivery: {delivery!r} is not one of {', '.join(DELIVERIES)}")
    if voltage and delivery != VOLTAGE_DELIVERY:
        # As the MWA ASVO: voltages are left on scratch (giant-squid: "The only valid
        # value for a voltage job is scratch"; mwa_client: "always left on /scratch").
        raise AsvoError(
            f"Delivery: voltage jobs are delivered to {VOLTAGE_DELIVERY} only, not {delivery!r}"
        )
    if settings.asvo_outage == "partial" and delivery == "acacia":
        raise AsvoError(OUTAGE_MESSAGES["partial"])
    delivery_format = form.get("delivery_format", "").strip().lower()
    if delivery_format not in ("", "tar"):
        raise AsvoError(f"Delivery Format: {delivery_format!r} is not supported (only tar)")
    params: dict[str, Any] = {
        "delivery": delivery, "job_type": PARAMS_JOB_TYPE[job_type], "priority": 1
    }  # fmt: skip
    if delivery_format and delivery != "acacia":  # acacia delivers a tar whatever is asked
        params["delivery_format"] = delivery_format
    return params


#: Where voltage jobs go, the only place they may (their files are far too large to download).
VOLTAGE_DELIVERY = "scratch"


def default_delivery(job_type: JobType) -> str:
    """A job's delivery when the submission names none: acacia, voltages scratch."""
    return VOLTAGE_DELIVERY if job_type == JobType.DOWNLOAD_VOLTAGE else DELIVERIES[0]


#: The ASVO's output of a conversion that names none (specs/asvo.md section 5; giant-squid
#: always names one, uvfits by default).
DEFAULT_CONVERSION_OUTPUT = "ms"


def _conversion_params(
    form: Mapping[str, str], observation: Observation
) -> tuple[dict[str, Any], ResolvedOptions | None]:
    """A conversion's parameters as the job records them, and the options resolved against
    the observation (None when its resolution is not known yet)."""
    if observation.mode not in CORRELATOR_MODES:
        raise _refused_for(
            observation.obsid,
            f"it is a {observation.mode} observation: it has no visibilities to convert",
        )

    def names_output(key: str) -> bool:  # output, or cotter's conversion, in any case
        return LEGACY_KEYS.get(key.strip().lower(), key.strip().lower()) == "output"

    if not any(names_output(k) and str(v).strip() for k, v in form.items()):
        # None given (an empty one is none, not a second one contradicting the default).
        form = {k: v for k, v in form.items() if not names_output(k)}
        form["output"] = DEFAULT_CONVERSION_OUTPUT
    try:
        options = ConversionOptions.from_params(form)
    except OptionError as exc:
        raise AsvoError(str(exc)) from None
    try:  # options that do not fit this observation (its integration time, channels)
        resolved = (
            options.resolve(
                observation.int_time_s,
                observation.freq_res_khz,
                round(1280 / observation.freq_res_khz),
            )
            if observation.int_time_s and observation.freq_res_khz
            else None
        )
    except OptionError as exc:
        raise _refused_for(observation.obsid, str(exc)) from None
    # Always recorded: our engine's default (uvfits) is not the ASVO's (ms), so a job row
    # without it would read as the other format.
    return {**options.to_params(), "output": options.output.value}, resolved


#: A conversion's parameters that the duplicate check compares as what they mean for the
#: observation (averaging factors, edge channels), not as they were written.
_RESOLVED_KEYS = ("avg_time_res", "avg_freq_res", "flag_edge_width")


#: Observing modes whose visibilities come from the MWAX correlator (``HW_LFILES`` is the
#: legacy one): their DC fine channel is not flagged unless asked (``dc_flagged``).
MWAX_CORRELATOR_MODES = frozenset({ObservationMode.MWAX_CORRELATOR, ObservationMode.MWAX_CORR_BF})


def _conversion_identity(
    params: Mapping[str, Any], resolved: ResolvedOptions | None, observation: Observation
) -> dict[str, Any]:
    """``params`` as the duplicate check compares them: with the averaging and edge width
    as the factors and channels they resolve to, so that ``avg_freq_res=80`` on an
    observation of 80 kHz channels (what giant-squid sends) is the same request as a CSV
    line that leaves it out. Unresolved (no resolution known), they are compared as given.

    A DC-flag choice that is this observation's default (``flag_dc=false`` on MWAX data,
    ``true`` on legacy data) is the same request as none, and compared as none: so the keys
    of jobs submitted without one stay as they were.
    """
    identity = dict(params)
    default_dc = ConversionOptions().dc_flagged(observation.mode in MWAX_CORRELATOR_MODES)
    if "no_flag_dc" in identity and default_dc is False:
        del identity["no_flag_dc"]
    if "flag_dc" in identity and default_dc is True:
        del identity["flag_dc"]
    if resolved is None:
        return identity
    return {
        **{key: value for key, value in identity.items() if key not in _RESOLVED_KEYS},
        "resolved": [resolved.time_factor, resolved.freq_factor, resolved.edge_chans],
    }


def _voltage_params(form: Mapping[str, str], observation: Observation) -> dict[str, Any]:
    if observation.mode not in VOLTAGE_MODES:
        raise _refused_for(
            observation.obsid, f"it is a {observation.mode} observation: it has no voltages"
        )
    length_s = observation.stoptime - observation.obsid
    offset = _int_field(form, "offset", "Offset", 0, MAX_SQL_ID)
    duration = _int_field(form, "duration", "Duration", 1, MAX_SQL_ID)
    # Bounds of this observation's length: giant-squid sends one offset and duration for
    # every obsid of its batch.
    if offset > max(length_s - 1, 0):
        raise _refused_for(
            observation.obsid, f"Offset: {offset} is outside 0..{max(length_s - 1, 0)}"
        )
    if duration > length_s - offset:
        raise _refused_for(
            observation.obsid, f"Duration: {duration} is outside 1..{length_s - offset}"
        )
    params: dict[str, Any] = {"offset": offset, "duration": duration, "download_type": "volt"}
    # giant-squid sends channel_range=true with the channels; a CSV row may give the channels
    # alone, which must not quietly become every channel (terabytes of voltages).
    given_channels = any(str(form.get(key, "")).strip() for key in ("from_channel", "to_channel"))
    if "channel_range" in form and not _bool_field(form, "channel_range") and given_channels:
        raise AsvoError("from_channel/to_channel were given with channel_range=false: drop one")
    if _bool_field(form, "channel_range") or given_channels:
        # A range with one end given (giant-squid's -f without -t) is refused in the API's
        # words, with what to do: which end was meant open is anyone's guess.
        for key, label, other in (("from_channel", "From Channel", "to_channel"),
                                  ("to_channel", "To Channel", "from_channel")):  # fmt: skip
            if not str(form.get(key, "")).strip() and str(form.get(other, "")).strip():
                raise AsvoError(
                    f"{label}: Expected not None: a channel range needs both from_channel and "
                    "to_channel (inclusive; the same number for one channel)"
                )
        low = _int_field(form, "from_channel", "From Channel", 0, 255)
        high = _int_field(form, "to_channel", "To Channel", 0, 255)
        if high < low:  # "outside 134..255" read as a limit of the channel numbers
            raise AsvoError(
                f"To Channel: {high} is below From Channel {low}: to_channel must not be below "
                "from_channel (the range is inclusive; the same number for one channel)"
            )
        observed = set(observation.coarse_chans)
        if observed and not observed & set(range(low, high + 1)):
            raise _refused_for(
                observation.obsid,
                f"channels {low}-{high} hold none of the observation's coarse channels "
                f"({', '.join(map(str, sorted(observed)))})",
            )
        params.update(channel_range=True, from_channel=low, to_channel=high)
    return params


def _request_key(user_id: int, job_type: JobType, obs_id: int, params: Mapping[str, Any]) -> str:
    canonical = json.dumps([user_id, int(job_type), obs_id, params], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit_job(
    session: Session,
    settings: Settings,
    user_id: int,
    job_type: JobType,
    form: Mapping[str, str],
) -> Job:
    """Validate a submission and queue the job.

    ``form`` holds the posted form fields (strings); unknown keys are ignored.

    Raises
    ------
    AsvoError
        Naming the bad key (error_code 0), or for a duplicate (error_code 2 with its job_id).
    """
    if settings.asvo_outage == "full":
        raise AsvoError(OUTAGE_MESSAGES["full"])
    params = _common(form, settings, job_type)
    resolved: ResolvedOptions | None = None
    if job_type == JobType.DOWNLOAD_VISIBILITIES:
        download_type = _required(form, "download_type", "Download Type").lower()
        if download_type not in ("vis", "vis_meta"):
            raise AsvoError(f"Download Type: {download_type!r} is not one of vis, vis_meta")
        if download_type == "vis_meta":
            job_type = JobType.DOWNLOAD_METADATA
        observation = _observation(session, form)
        if download_type == "vis" and observation.mode not in CORRELATOR_MODES:
            raise _refused_for(
                observation.obsid,
                f"it is a {observation.mode} observation: it has no visibilities to download",
            )
        params["download_type"] = download_type
    else:
        observation = _observation(session, form)
        if job_type == JobType.CONVERSION:
            conversion, resolved = _conversion_params(form, observation)
            params.update(conversion)
        elif job_type == JobType.DOWNLOAD_VOLTAGE:
            params.update(_voltage_params(form, observation))
    allow_resubmit = _bool_field(form, "allow_resubmit")
    identity = (
        _conversion_identity(params, resolved, observation)
        if job_type == JobType.CONVERSION
        else params
    )
    key = _request_key(user_id, job_type, observation.obsid, identity)
    # One submission of a user at a time, to its commit: two identical ones at once both
    # passed the duplicate check (and the active-job limit). A write to the user's row
    # (changing nothing) takes PostgreSQL's row lock and SQLite's write lock, both held to
    # the commit: the second submission's checks then see the first one's job.
    session.execute(update(User).where(User.id == user_id).values(name=User.name))
    _refuse_duplicate(session, user_id, key, allow_resubmit)
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.user_id == user_id, Job.state.not_in([s.value for s in TERMINAL_STATES]))
    )
    if (active or 0) >= settings.asvo_max_active_jobs:
        raise AsvoError(
            f"You already have {active} jobs queued or running (the limit is "
            f"{settings.asvo_max_active_jobs}); wait for some to finish"
        )
    params["obs_id"] = str(observation.obsid)
    job = Job(
        user_id=user_id,
        job_type=int(job_type),
        obs_id=observation.obsid,
        state=JobState.QUEUED.value,
        params=params,
        request_key=key,
        delivery=params["delivery"],
        priority=params["priority"],
        cancel_requested=False,
        deleted=False,
    )
    session.add(job)
    session.flush()
    return job


def _refuse_duplicate(session: Session, user_id: int, key: str, allow_resubmit: bool) -> None:
    """Section 2.3: the same request as an existing job is refused with error_code 2."""
    same = session.scalars(
        select(Job)
        .where(Job.user_id == user_id, Job.request_key == key, Job.deleted.is_(False))
        .order_by(Job.id.desc())
    ).all()
    for job in same:
        running = job.state not in TERMINAL_STATES
        if running:
            message = (
                "Job already queued or processing."
                if allow_resubmit
                else "Job already queued, processing or complete"
            )
            raise AsvoError(message, error_code=ERROR_CODE_DUPLICATE, job_id=job.id)
        if job.state == JobState.COMPLETED and not allow_resubmit:
            raise AsvoError(
                "Job already queued, processing or complete",
                error_code=ERROR_CODE_DUPLICATE,
                job_id=job.id,
            )


# ----------------------------------------------------------------------------------------------
# Listing (section 3) and cancelling (section 2.4)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.replace(tzinfo=None).isoformat()


#: Builds a product file's download URL: (job, product file entry) -> URL.
UrlBuilder = Callable[[Any, dict[str, Any]], str]


def _product(job: Job | ProductView, url_for: UrlBuilder | None) -> dict[str, Any] | None:
    if job.state != JobState.COMPLETED or not job.product:
        return None
    files = []
    for entry in job.product.get("files", []):
        entry = dict(entry)
        name = entry.pop("name", None)
        if entry.get("type") == "acacia" and url_for is not None and name is not None:
            entry["url"] = url_for(job, {**entry, "name": name})
        files.append(entry)
    return {"files": files}


def job_row(job: Job, action: str = "INSERT", url_for: UrlBuilder | None = None) -> dict[str, Any]:
    """The change-feed envelope the clients read (get_jobs element, websocket frame).

    ``url_for`` makes the signed download URL of acacia products (it depends on
    the host the client reached).
    """
    return {
        "action": action,
        "table": "jobs",
        "row": {
            "id": job.id,
            "job_type": job.job_type,
            "job_state": job.state,
            "user_id": job.user_id,
            "job_params": dict(job.params),
            "error_code": job.error_code,
            "error_text": job.error_text,
            "created": _iso(job.created),
            "started": _iso(job.started),
            "completed": _iso(job.completed),
            "product": _product(job, url_for),
        },
    }


def row_members_json(job: Job) -> str:
    """The row's members except ``id`` and ``product``, as JSON text without braces."""
    row = job_row(job)["row"]
    del row["id"], row["product"]
    return json.dumps(row, separators=(",", ":"))[1:-1]


def list_jobs_json(session: Session, user_id: int, url_for: UrlBuilder | None = None) -> str:
    """Every job of the user that is not deleted, oldest first: the get_jobs body as JSON text.

    Joins each job's stored row text, adding the id and the product (whose signed
    URL depends on the host the client reached).
    """
    rows = session.execute(
        select(Job.id, Job.state, Job.product, Job.completed, Job.row_json)
        .where(Job.user_id == user_id, Job.deleted.is_(False))
        .order_by(Job.id)
    )
    parts = []
    for job_id, state, product, completed, members in rows:
        if not members:  # written outside the ORM: build it the long way
            job = session.get(Job, job_id)
            assert job is not None
            members = row_members_json(job)
        files = _product(ProductView(job_id, state, product, completed), url_for)
        parts.append(
            f'{{"action":"INSERT","table":"jobs","row":{{"id":{job_id},{members},'
            f'"product":{json.dumps(files, separators=(",", ":"))}}}}}'
        )
    return "[" + ",".join(parts) + "]"


class ProductView:
    """The columns :func:`_product` and a ``UrlBuilder`` read, without loading the job."""

    def __init__(
        self,
        job_id: int,
        state: str,
        product: dict[str, Any] | None,
        completed: datetime | None,
    ) -> None:
        self.id, self.state, self.product, self.completed = job_id, state, product, completed


def product_file(session: Session, job_id: int, name: str, products_dir: Path) -> Path:
    """The product file a (verified) download URL names.

    Raises
    ------
    NotFound
        If the job has no such product, or it has expired.
    """
    job = session.get(Job, job_id)
    names = [f.get("name") for f in (job.product or {}).get("files", [])] if job else []
    if job is None or job.deleted or name not in names:
        raise NotFound(f"Product {name} does not exist")
    if job.state != JobState.COMPLETED:
        raise NotFound(f"Product {name} no longer exists; it may have expired")
    path = products_dir / str(job.id) / name
    if not path.is_file():
        raise NotFound(f"Product {name} no longer exists; it may have expired")
    return path


def cancel_job(session: Session, user_id: int, job_text: str) -> Job:
    """Cancel a job of the user (its running work stops at the next stage boundary).

    Raises
    ------
    BadRequest
        For a malformed id, or a job that has already finished.
    NotFound
        If the user has no such job.
    """
    text = str(job_text).strip()
    if not is_ascii_digits(text) or not 0 < int(text) <= MAX_SQL_ID:
        raise AsvoError(f"Job Id: {job_text!r} is not a job id")
    job_id = int(text)
    # Claimed by one UPDATE that matches only an unfinished job, so a job finishing at the same
    # moment is either cancelled or completed, never completed and then marked cancelled.
    claim = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.user_id == user_id,
            Job.deleted.is_(False),
            Job.state.not_in([state.value for state in TERMINAL_STATES]),
        )
        .values(cancel_requested=True)
    )
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.user_id != user_id or job.deleted:
        raise NotFound(f"Job Id {job_id} not found", error_code=ERROR_CODE_INVALID)
    if claim.rowcount == 0:  # type: ignore[attr-defined]
        raise AsvoError(f"Job {job_id} is {job.state} and cannot be cancelled")
    job.state = JobState.CANCELLED.value
    job.cancel_requested = True
    job.completed = utcnow()
    return job


def unsupported(kind: str) -> ServiceError:
    """The refusal for job kinds this server does not run."""
    return AsvoError(f"{kind} jobs are not offered by this server")


#: A websocket's look reads the jobs updated since its previous look less this overlap: a
#: commit that raced the look, or a worker whose clock is a little behind the server's
#: (``updated`` is stamped by the process that commits), is read again, not missed.
WATCH_OVERLAP = timedelta(seconds=10)
#: ... and every this many seconds it reads all the user's jobs, whatever their stamps: a
#: worker whose clock is further behind has its changes sent at the latest then.
WATCH_FULL_LOOK_S = 60.0


class JobWatch:
    """What a websocket has sent: the (state, error_text) per job, when it last looked,
    and when it is next to read every job (a monotonic time)."""

    def __init__(self) -> None:
        self.sent: dict[int, tuple[str, str | None]] = {}
        self.since: datetime | None = None
        self.next_full_look = time.monotonic() + WATCH_FULL_LOOK_S


def changed_rows(
    session_factory: sessionmaker[Session],
    user_id: int,
    watch: JobWatch,
    url_for: UrlBuilder | None = None,
) -> list[dict[str, Any]]:
    """Websocket frames for the user's jobs that changed since the last call.

    The first call sends every current row; later calls read only jobs updated
    since the previous look (less ``WATCH_OVERLAP``), and every ``WATCH_FULL_LOOK_S``
    all of them again; a row is sent only when its state or error changed. A deleted
    job gets a DELETE frame.
    """
    frames = []
    now = utcnow()
    query = select(Job).where(Job.user_id == user_id).order_by(Job.id)
    if time.monotonic() >= watch.next_full_look:
        watch.since = None
        watch.next_full_look = time.monotonic() + WATCH_FULL_LOOK_S
    if watch.since is not None:
        query = query.where(Job.updated >= watch.since - WATCH_OVERLAP)
    with session_factory() as session:
        for job in session.scalars(query):
            if job.deleted:
                if watch.sent.pop(job.id, None) is not None:
                    frames.append(job_row(job, action="DELETE"))
                continue
            signature = (job.state, job.error_text)
            if watch.sent.get(job.id) != signature:
                action = "UPDATE" if job.id in watch.sent else "INSERT"
                frames.append(job_row(job, action=action, url_for=url_for))
                watch.sent[job.id] = signature
    watch.since = now
    return frames
