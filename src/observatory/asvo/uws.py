"""IVOA UWS 1.1 over the ASVO jobs: job ids, phases, parameters, filters and the XML.

UWS (Universal Worker Service, IVOA Recommendation 1.1 of 2016-10-24) is the job
protocol pyvo and other VO tools drive. Here it is a second door to the ASVO jobs
of ``service``; the mapping (docs/uws.md says the same for users):

- A job made through UWS is PENDING until ``PHASE=RUN``. While it is, it is no ASVO
  job (mwa_client and giant-squid refuse states they do not know), only a
  :class:`~observatory.asvo.models.UwsJob` row. RUN submits it with
  :func:`service.submit_job`: the same validation and messages; a refusal then puts
  the UWS job in ERROR with the message as its ``errorSummary``. Its id ``u<N>``
  never changes; the ASVO job it became is given in ``jobInfo``.
- Jobs made through ``/api`` are listed too, under their ASVO id (``<N>``). The
  ASVO id of a job made through UWS answers as an alias of its ``u<N>`` id.
- Creation checks the parameters at once (a dry run of ``submit_job`` inside a
  savepoint that is rolled back), so plainly wrong ones are refused with the ASVO
  message instead of making a job.
- DELETE cancels an unfinished job and hides it from UWS; the ASVO job, its row in
  get_jobs and its product are left as they are (the product expires as usual).
"""

from __future__ import annotations

import contextlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from observatory.asvo import service
from observatory.asvo.models import TERMINAL_STATES, Job, JobState, JobType, UwsJob
from observatory.core.config import Settings
from observatory.core.database import utcnow
from observatory.core.errors import BadRequest, Forbidden, NotFound
from observatory.core.models import User
from observatory.core.text import is_ascii_integer
from observatory.core.web import whole_number_param

UWS_NS = "http://www.ivoa.net/xml/UWS/v1.0"
XLINK_NS = "http://www.w3.org/1999/xlink"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
#: The namespace the UWS schema leaves open for an implementation's result attributes.
CUSTOM_NS = "urn:uwscustom"
UWS_VERSION = "1.1"
#: The longest a ``WAIT`` blocks (``WAIT=-1``, "until the phase changes", included).
MAX_WAIT_S = 60.0
#: Longest ``RUNID`` kept.
MAX_RUN_ID_CHARS = 200

for _prefix, _uri in (("uws", UWS_NS), ("xlink", XLINK_NS), ("xsi", XSI_NS), ("uwsc", CUSTOM_NS)):
    ET.register_namespace(_prefix, _uri)


class Phase(StrEnum):
    """The execution phases of UWS 1.1."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    EXECUTING = "EXECUTING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    ABORTED = "ABORTED"
    UNKNOWN = "UNKNOWN"
    HELD = "HELD"
    SUSPENDED = "SUSPENDED"
    ARCHIVED = "ARCHIVED"


#: The UWS phase of each ASVO job state.
PHASE_OF_STATE: dict[str, Phase] = {
    JobState.QUEUED: Phase.QUEUED,
    JobState.WAITCAL: Phase.QUEUED,
    JobState.STAGING: Phase.EXECUTING,
    JobState.STAGED: Phase.EXECUTING,
    JobState.DOWNLOADING: Phase.EXECUTING,
    JobState.PREPARING: Phase.EXECUTING,
    JobState.PREPROCESSING: Phase.EXECUTING,
    JobState.IMAGING: Phase.EXECUTING,
    JobState.DELIVERING: Phase.EXECUTING,
    JobState.COMPLETED: Phase.COMPLETED,
    JobState.ERROR: Phase.ERROR,
    JobState.CANCELLED: Phase.ABORTED,
    JobState.EXPIRED: Phase.ARCHIVED,
}
#: Phases a ``WAIT`` may block in (the standard's "active" phases).
ACTIVE_PHASES = frozenset({Phase.PENDING, Phase.QUEUED, Phase.EXECUTING})

#: The ``job_type`` shown for a job made through ``/api``.
UWS_JOB_TYPE = {
    JobType.CONVERSION: "conversion",
    JobType.DOWNLOAD_VISIBILITIES: "download_vis",
    JobType.DOWNLOAD_METADATA: "download_vis",
    JobType.DOWNLOAD_VOLTAGE: "voltage",
}
#: UWS job control parameters (case-insensitive), kept apart from the ASVO parameters.
CONTROL_PARAMETERS = frozenset({"phase", "runid"})

_JOB_ID = re.compile(r"u([1-9][0-9]{0,8})|([1-9][0-9]{0,8})")


# ----------------------------------------------------------------------------------------------
# What the documents show


@dataclass(frozen=True)
class ResultRef:
    """One result: a product file of the ASVO job."""

    result_id: str
    href: str | None
    size_bytes: int | None = None
    sha1: str | None = None
    mime_type: str | None = None


@dataclass
class JobView:
    """A UWS job as its documents show it."""

    job_id: str
    phase: Phase
    owner: str | None
    run_id: str | None
    created: datetime
    started: datetime | None = None
    ended: datetime | None = None
    destruction: datetime | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    results: list[ResultRef] = field(default_factory=list)
    error: str | None = None
    asvo_job_id: int | None = None
    asvo_state: str | None = None


@dataclass(frozen=True)
class JobRef:
    """A job in the job list."""

    job_id: str
    phase: Phase
    owner: str | None
    run_id: str | None
    created: datetime


@dataclass(frozen=True)
class ListFilter:
    """The job list's filters: ``PHASE`` (any of), ``AFTER`` and ``LAST`` (ANDed)."""

    phases: frozenset[Phase] = frozenset()
    after: datetime | None = None
    last: int | None = None

    def accepts(self, ref: JobRef) -> bool:
        """Whether the PHASE and AFTER filters let ``ref`` through (ARCHIVED only if asked)."""
        if self.phases:
            if ref.phase not in self.phases:
                return False
        elif ref.phase == Phase.ARCHIVED:
            return False
        return self.after is None or ref.created > self.after


# ----------------------------------------------------------------------------------------------
# Parsing what clients send


def _utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC time (naive taken as UTC): for times clients send; the
    database's are aware UTC already (``UTCDateTime``)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_instant(text: str, name: str) -> datetime:
    """An ISO 8601 instant (UTC when no zone is given).

    Raises
    ------
    BadRequest
        Naming ``name`` if ``text`` is not an ISO 8601 date and time.
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadRequest(f"{name}: {text!r} is not an ISO 8601 date and time") from None
    try:
        return _utc(moment)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before year 1 in UTC
        raise BadRequest(f"{name}: {text!r} falls outside years 1-9999 in UTC") from None


def parse_phases(phases: Iterable[str]) -> frozenset[Phase]:
    """The phases named by ``PHASE`` parameters (in any case).

    Raises
    ------
    BadRequest
        For a name that is not a UWS phase.
    """
    chosen = set()
    for text in phases:
        try:
            chosen.add(Phase(text.strip().upper()))
        except ValueError:
            raise BadRequest(
                f"PHASE: {text!r} is not one of {', '.join(p.value for p in Phase)}"
            ) from None
    return frozenset(chosen)


def parse_list_filter(phases: Iterable[str], after: str | None, last: str | None) -> ListFilter:
    """The job list's filters from the query parameters.

    Raises
    ------
    BadRequest
        For an unknown phase, a malformed ``AFTER`` or a ``LAST`` that is not a
        positive whole number a database can compare with.
    """
    count = None
    if last is not None:
        count = whole_number_param("LAST", last, what="a whole number greater than 0")
        if count < 1:
            raise BadRequest(f"LAST: {last!r} is not a whole number greater than 0")
    return ListFilter(
        parse_phases(phases), None if after is None else parse_instant(after, "AFTER"), count
    )


def parse_wait(text: str | None) -> float:
    """How long a ``WAIT`` may block, in seconds: 0 without one, at most :data:`MAX_WAIT_S`.

    ``WAIT=-1`` (block until the phase changes) blocks for :data:`MAX_WAIT_S`, which
    the standard allows a server to impose.

    Raises
    ------
    BadRequest
        If ``text`` is not a whole number.
    """
    if text is None or not text.strip():
        return 0.0
    if not is_ascii_integer(text.strip()):
        raise BadRequest(f"WAIT: {text!r} is not a whole number of seconds")
    wait_s = int(text)
    return MAX_WAIT_S if wait_s < 0 else min(float(wait_s), MAX_WAIT_S)


def split_fields(fields: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(ASVO parameters, UWS control parameters)``; names are case-insensitive (lower case)."""
    params: dict[str, str] = {}
    control: dict[str, str] = {}
    for name, value in fields.items():
        key = name.strip().lower()
        (control if key in CONTROL_PARAMETERS else params)[key] = str(value)
    return params, control


def _job_type(params: Mapping[str, str]) -> JobType:
    return service.job_type_named(params.get("job_type", ""))


def _run_id(control: Mapping[str, str]) -> str | None:
    run_id = control.get("runid")
    if run_id is not None and len(run_id) > MAX_RUN_ID_CHARS:
        raise BadRequest(f"RUNID: longer than {MAX_RUN_ID_CHARS} characters")
    return run_id


# ----------------------------------------------------------------------------------------------
# Finding jobs


def _lookup(session: Session, user_id: int, job_id: str) -> tuple[UwsJob | None, Job | None]:
    """The UWS row and the ASVO job behind ``job_id``, if the user owns them.

    Raises
    ------
    NotFound
        For a malformed id, a job of another user, or one deleted.
    """
    match = _JOB_ID.fullmatch(job_id)
    missing = NotFound(f"Job {job_id} not found")
    if match is None:
        raise missing
    if match[1] is not None:
        row = session.get(UwsJob, int(match[1]))
        if row is None or row.user_id != user_id or row.deleted:
            raise missing
        job = None if row.asvo_job_id is None else session.get(Job, row.asvo_job_id)
        if job is not None and job.deleted:
            raise missing
        return row, job
    job = session.get(Job, int(match[2]))
    if job is None or job.user_id != user_id or job.deleted:
        raise missing
    row = session.scalar(select(UwsJob).where(UwsJob.asvo_job_id == job.id))
    if row is not None and row.deleted:
        raise missing
    return row, job


def _canonical_id(row: UwsJob | None, job: Job | None) -> str:
    if row is not None:
        return f"u{row.id}"
    assert job is not None
    return str(job.id)


def canonical_id(session: Session, user_id: int, job_id: str) -> str:
    """The id the job is known by (``u<N>`` for jobs made through UWS, else the ASVO id).

    Raises
    ------
    NotFound
        If the user has no such job.
    """
    return _canonical_id(*_lookup(session, user_id, job_id))


def _owner(session: Session, user_id: int) -> str | None:
    return session.scalar(select(User.name).where(User.id == user_id))


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _results(job: Job, url_for: service.UrlBuilder) -> list[ResultRef]:
    """One result per product file: the signed download URL of acacia files (as get_jobs
    gives them), ``file:`` URIs of the directories delivered to scratch or dug."""
    if job.state != JobState.COMPLETED or not job.product:
        return []
    results = []
    for number, entry in enumerate(job.product.get("files", []), start=1):
        name = entry.get("name")
        if entry.get("type") == "acacia" and name:
            results.append(
                ResultRef(
                    str(name),
                    url_for(job, dict(entry)),
                    entry.get("size"),
                    entry.get("sha1"),
                    "application/x-tar",
                )
            )
        else:
            path = entry.get("path")
            results.append(
                ResultRef(
                    f"product-{number}",
                    None if path is None else f"file://{path}",
                    entry.get("size"),
                )
            )
    return results


def get_job(session: Session, user_id: int, job_id: str, url_for: service.UrlBuilder) -> JobView:
    """The job as the UWS job document shows it.

    ``url_for`` makes the signed download URLs of products (see ``router.download_url_builder``).

    Raises
    ------
    NotFound
        If the user has no such job.
    """
    row, job = _lookup(session, user_id, job_id)
    view = JobView(
        job_id=_canonical_id(row, job),
        phase=Phase.UNKNOWN,
        owner=_owner(session, user_id),
        run_id=None if row is None else row.run_id,
        created=row.created if row is not None else _asvo(job).created,
    )
    if row is not None:
        view.parameters = dict(row.params)
    elif job is not None:
        view.parameters = {
            "job_type": UWS_JOB_TYPE.get(JobType(job.job_type), str(job.job_type)),
            **{key: _text(value) for key, value in job.params.items() if key != "job_type"},
        }
    if job is None:
        assert row is not None
        view.phase = Phase(row.phase or Phase.UNKNOWN)
        view.ended = row.ended
        view.error = row.error_text if view.phase == Phase.ERROR else None
        return view
    view.phase = PHASE_OF_STATE.get(job.state, Phase.UNKNOWN)
    view.asvo_job_id, view.asvo_state = job.id, job.state
    view.started = job.started
    if job.state in TERMINAL_STATES and job.completed is not None:
        view.ended = job.completed
    view.destruction = job.expires_at
    if view.phase == Phase.ERROR:
        view.error = job.error_text or "The job failed"
    view.results = _results(job, url_for)
    return view


def _asvo(job: Job | None) -> Job:
    assert job is not None
    return job


def job_phase(session: Session, user_id: int, job_id: str) -> Phase:
    """The job's phase (what a ``WAIT`` watches).

    Raises
    ------
    NotFound
        If the user has no such job.
    """
    row, job = _lookup(session, user_id, job_id)
    if job is not None:
        return PHASE_OF_STATE.get(job.state, Phase.UNKNOWN)
    assert row is not None
    return Phase(row.phase or Phase.UNKNOWN)


def list_jobs(session: Session, user_id: int, filters: ListFilter) -> list[JobRef]:
    """The user's jobs through the filters, newest first (not deleted; ARCHIVED only if asked).

    Jobs made through ``/api`` are filtered in the database (there may be thousands);
    jobs made through UWS are fewer and filtered here.
    """
    owner = _owner(session, user_id)
    refs = []
    made_here = session.execute(
        select(UwsJob, Job.state, Job.deleted)
        .outerjoin(Job, UwsJob.asvo_job_id == Job.id)
        .where(UwsJob.user_id == user_id, UwsJob.deleted.is_(False))
    )
    for row, state, job_deleted in made_here:
        if job_deleted:
            continue
        phase = (
            Phase(row.phase or Phase.UNKNOWN)
            if row.asvo_job_id is None
            else PHASE_OF_STATE.get(state, Phase.UNKNOWN)
        )
        refs.append(JobRef(f"u{row.id}", phase, owner, row.run_id, row.created))
    query = select(Job.id, Job.state, Job.created).where(
        Job.user_id == user_id,
        Job.deleted.is_(False),
        ~exists().where(UwsJob.asvo_job_id == Job.id),
    )
    if filters.phases:
        states = [s for s, phase in PHASE_OF_STATE.items() if phase in filters.phases]
        query = query.where(Job.state.in_(states))
    else:
        query = query.where(Job.state != JobState.EXPIRED.value)
    if filters.after is not None:
        query = query.where(Job.created > filters.after)
    if filters.last is not None:
        query = query.order_by(Job.created.desc(), Job.id.desc()).limit(filters.last)
    for job_id, state, created in session.execute(query):
        phase = PHASE_OF_STATE.get(state, Phase.UNKNOWN)
        refs.append(JobRef(str(job_id), phase, owner, None, created))
    refs = [ref for ref in refs if filters.accepts(ref)]
    refs.sort(key=lambda ref: ref.created, reverse=True)
    return refs if filters.last is None else refs[: filters.last]


# ----------------------------------------------------------------------------------------------
# Changing jobs


def _check_submission(
    session: Session, settings: Settings, user_id: int, params: Mapping[str, str]
) -> None:
    """Run the ASVO validation of ``params`` without queuing anything (savepoint rolled back).

    Raises
    ------
    AsvoError
        With the message ``/api`` gives for the same fields.
    """
    job_type = _job_type(params)
    with session.begin_nested() as savepoint:
        service.submit_job(session, settings, user_id, job_type, params)
        savepoint.rollback()


def create_job(
    session: Session, settings: Settings, user_id: int, fields: Mapping[str, str]
) -> UwsJob:
    """A new PENDING job from the posted fields (run at once if they hold ``PHASE=RUN``).

    ``fields``: ``job_type`` (conversion | download_vis | voltage), the fields of the
    matching ``/api`` endpoint, and optionally the UWS ``RUNID`` and ``PHASE=RUN``.

    Raises
    ------
    AsvoError
        If the ASVO service would refuse the job now (its message).
    BadRequest
        For a ``PHASE`` other than RUN or an over-long ``RUNID``.
    """
    params, control = split_fields(fields)
    run_id = _run_id(control)
    phase = control.get("phase", "").strip().upper()
    if phase not in ("", "RUN"):
        raise BadRequest(f"PHASE: {control['phase']!r} at creation can only be RUN")
    _check_submission(session, settings, user_id, params)
    row = UwsJob(
        user_id=user_id,
        params=params,
        run_id=run_id,
        phase=Phase.PENDING.value,
        created=utcnow(),
        deleted=False,
    )
    session.add(row)
    session.flush()
    if phase == "RUN":
        _run(session, settings, row)
    return row


def _claim_pending(session: Session, row: UwsJob) -> bool:
    """Whether ``row`` is still PENDING (no ASVO job yet): then this transaction holds it.

    An UPDATE that matches the row only while it is PENDING, not submitted and not deleted:
    PostgreSQL's row lock, SQLite's write lock, either way held to the commit. Of two
    requests changing one job at once (``PHASE=RUN`` and ``PHASE=ABORT`` on two web
    workers), the second waits for the first's commit and then finds the job no longer
    PENDING. Read unlocked, both went on: the job was submitted, and stayed queued, although
    the user's ABORT had been answered. ``row`` is read again either way: after a claim that
    failed it is as the winner left it.
    """
    claim = session.execute(
        update(UwsJob)
        .where(
            UwsJob.id == row.id,
            UwsJob.phase == Phase.PENDING.value,
            UwsJob.asvo_job_id.is_(None),
            UwsJob.deleted.is_(False),
        )
        .values(phase=Phase.PENDING.value)
        .execution_options(synchronize_session=False)
    )
    session.refresh(row)
    return bool(claim.rowcount == 1)  # type: ignore[attr-defined]


def _run(session: Session, settings: Settings, row: UwsJob) -> None:
    """Submit a PENDING job as an ASVO job; a refusal puts it in ERROR with the message.

    A job no longer PENDING (run, aborted or deleted by another request, perhaps at this
    very moment: see :func:`_claim_pending`) is left as it is.
    """
    if not _claim_pending(session, row):
        return
    try:
        job = service.submit_job(session, settings, row.user_id, _job_type(row.params), row.params)
    except service.AsvoError as exc:
        row.phase, row.error_text, row.ended = Phase.ERROR.value, exc.message, utcnow()
        return
    row.asvo_job_id, row.phase = job.id, None


def change_phase(
    session: Session, settings: Settings, user_id: int, job_id: str, phase: str
) -> str:
    """``PHASE=RUN`` (submit a PENDING job) or ``PHASE=ABORT`` (cancel); returns the job's id.

    RUN of a job that is past PENDING and ABORT of a finished job change nothing.

    Raises
    ------
    NotFound
        If the user has no such job.
    BadRequest
        For another phase.
    """
    row, job = _lookup(session, user_id, job_id)
    value = phase.strip().upper()
    if value == "RUN":
        if row is not None and job is None:
            _run(session, settings, row)
    elif value == "ABORT":
        _abort(session, user_id, row, job)
    else:
        raise BadRequest(f"PHASE: {phase!r} is not RUN or ABORT")
    return _canonical_id(row, job)


def _abort(session: Session, user_id: int, row: UwsJob | None, job: Job | None) -> None:
    """Cancel the job: a PENDING one becomes ABORTED, an unfinished ASVO job is cancelled.

    A PENDING job is claimed first (:func:`_claim_pending`): if a ``PHASE=RUN`` submitted
    it meanwhile, its ASVO job is cancelled instead; a finished job is left as it is.
    """
    if job is None and row is not None:
        if _claim_pending(session, row):
            row.phase, row.ended = Phase.ABORTED.value, utcnow()
            return
        if row.asvo_job_id is None:
            return  # aborted, or refused at RUN, by another request: nothing left to cancel
        job = session.get(Job, row.asvo_job_id, populate_existing=True)
    if job is not None and job.state not in TERMINAL_STATES:
        # Refused if it finished between the read above and the cancel's own claim (an
        # UPDATE of an unfinished job only): an ABORT of a finished job changes nothing.
        with contextlib.suppress(service.AsvoError):
            service.cancel_job(session, user_id, str(job.id))


def delete_job(session: Session, user_id: int, job_id: str) -> None:
    """Destroy the job for UWS: cancel it if unfinished, then hide it from ``/uws/asvo``.

    The ASVO job (its get_jobs row, its product until it expires) is kept.

    Raises
    ------
    NotFound
        If the user has no such job.
    """
    row, job = _lookup(session, user_id, job_id)
    _abort(session, user_id, row, job)
    if row is None:
        assert job is not None
        try:
            with session.begin_nested():
                row = UwsJob(user_id=user_id, params={}, asvo_job_id=job.id, created=job.created)
                session.add(row)
        except IntegrityError:
            # Another DELETE of this job made its mark meanwhile (the ASVO job is unique
            # there): a second insert was a 500. That mark is this one's too.
            row = session.scalar(select(UwsJob).where(UwsJob.asvo_job_id == job.id))
            assert row is not None
    row.deleted = True
    session.flush()


def update_parameters(
    session: Session, settings: Settings, user_id: int, job_id: str, fields: Mapping[str, str]
) -> str:
    """Change parameters (and ``RUNID``) of a PENDING job; returns its id.

    Raises
    ------
    NotFound
        If the user has no such job.
    Forbidden
        If the job is past PENDING.
    AsvoError
        If the ASVO service would refuse the changed job (its message).
    """
    row, job = _lookup(session, user_id, job_id)
    # Claimed (see _claim_pending): parameters changed while a RUN submits the job at the same
    # moment would be shown as the job's, and not be the ones it runs with.
    if row is None or job is not None or not _claim_pending(session, row):
        phase = job_phase(session, user_id, job_id)
        raise Forbidden(f"Job {job_id} is {phase}: parameters can only be changed while PENDING")
    params, control = split_fields(fields)
    merged = {**row.params, **params}
    _check_submission(session, settings, user_id, merged)
    row.params = merged
    if "runid" in control:
        row.run_id = _run_id(control)
    return _canonical_id(row, job)


# ----------------------------------------------------------------------------------------------
# XML documents (schema: UWS 1.1, namespace http://www.ivoa.net/xml/UWS/v1.0)


def _uws(tag: str) -> str:
    return f"{{{UWS_NS}}}{tag}"


def format_instant(moment: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, to the millisecond (the standard's form of instants)."""
    return _utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _add(parent: ET.Element, tag: str, text: str | None, *, nil: bool = True) -> ET.Element:
    element = ET.SubElement(parent, _uws(tag))
    if text is None:
        if nil:
            element.set(f"{{{XSI_NS}}}nil", "true")
    else:
        element.text = text
    return element


def _instant(parent: ET.Element, tag: str, moment: datetime | None) -> None:
    _add(parent, tag, None if moment is None else format_instant(moment))


#: What XML 1.0 cannot hold (control characters, lone surrogates, U+FFFE, U+FFFF).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _serialise(root: ET.Element) -> bytes:
    """The document, always well-formed: ElementTree writes any character, and a value
    stored before it was checked (a failed job's error text, which may quote a command's
    output) would make the job's document unreadable for good (U+FFFD in their place)."""
    for element in root.iter():
        if element.text:
            element.text = _NOT_XML.sub("\ufffd", element.text)
        for name, value in element.attrib.items():
            element.attrib[name] = _NOT_XML.sub("\ufffd", value)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _parameters_element(parameters: Mapping[str, str]) -> ET.Element:
    element = ET.Element(_uws("parameters"))
    for name, value in parameters.items():
        ET.SubElement(element, _uws("parameter"), {"id": name}).text = value
    return element


def _results_element(results: Iterable[ResultRef]) -> ET.Element:
    element = ET.Element(_uws("results"))
    for result in results:
        attributes = {"id": result.result_id}
        if result.href is not None:
            attributes[f"{{{XLINK_NS}}}href"] = result.href
        if result.size_bytes is not None:
            attributes["size"] = str(result.size_bytes)
        if result.mime_type is not None:
            attributes["mime-type"] = result.mime_type
        if result.sha1 is not None:
            attributes[f"{{{CUSTOM_NS}}}sha1"] = result.sha1
        ET.SubElement(element, _uws("result"), attributes)
    return element


def job_document(view: JobView) -> bytes:
    """The ``<uws:job>`` document of ``/uws/asvo/{id}``."""
    root = ET.Element(_uws("job"), {"version": UWS_VERSION})
    _add(root, "jobId", view.job_id)
    if view.run_id is not None:
        _add(root, "runId", view.run_id)
    _add(root, "ownerId", view.owner)
    _add(root, "phase", view.phase.value)
    _add(root, "quote", None)
    _instant(root, "creationTime", view.created)
    _instant(root, "startTime", view.started)
    _instant(root, "endTime", view.ended)
    _add(root, "executionDuration", "0")
    _instant(root, "destruction", view.destruction)
    root.append(_parameters_element(view.parameters))
    root.append(_results_element(view.results))
    if view.error is not None:
        summary = ET.SubElement(root, _uws("errorSummary"), {"type": "fatal", "hasDetail": "false"})
        _add(summary, "message", view.error)
    if view.asvo_job_id is not None:
        info = ET.SubElement(root, _uws("jobInfo"))
        ET.SubElement(info, "asvo_job_id").text = str(view.asvo_job_id)
        ET.SubElement(info, "asvo_state").text = view.asvo_state
    return _serialise(root)


def job_list_document(refs: Iterable[JobRef], jobs_url: str) -> bytes:
    """The ``<uws:jobs>`` document of ``/uws/asvo``; ``jobs_url`` is its absolute URL."""
    root = ET.Element(_uws("jobs"), {"version": UWS_VERSION})
    for ref in refs:
        element = ET.SubElement(
            root,
            _uws("jobref"),
            {"id": ref.job_id, f"{{{XLINK_NS}}}href": f"{jobs_url}/{ref.job_id}"},
        )
        _add(element, "phase", ref.phase.value)
        if ref.run_id is not None:
            _add(element, "runId", ref.run_id)
        _add(element, "ownerId", ref.owner)
        _instant(element, "creationTime", ref.created)
    return _serialise(root)


def parameters_document(view: JobView) -> bytes:
    """The ``<uws:parameters>`` document of ``/uws/asvo/{id}/parameters``."""
    return _serialise(_parameters_element(view.parameters))


def results_document(view: JobView) -> bytes:
    """The ``<uws:results>`` document of ``/uws/asvo/{id}/results``."""
    return _serialise(_results_element(view.results))
