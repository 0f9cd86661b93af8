"""Observations and their files: ingest from disk, look up, search."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from astropy.io import fits
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, selectinload

from observatory.archive.filenames import ParsedFileName, legacy_gpubox_channels, parse_file_name
from observatory.archive.models import (
    FileKind,
    Observation,
    ObservationFile,
    ObservationMode,
    ScheduleLock,
)
from observatory.core.accounts import project_id_problem
from observatory.core.database import MAX_SQL_INTEGER
from observatory.core.errors import BadRequest, NotFound
from observatory.core.gpstime import parse_obsid
from observatory.core.models import Project
from observatory.core.storage import Storage, sha1_of_file
from observatory.telescope.instrument import (
    full_band_vcs_s,
    metafits_text_problem,
    validate_coarse_chans,
)

#: Metafits keys mwalib refuses to open a file without.
REQUIRED_METAFITS_KEYS = (
    "ALTITUDE", "AZIMUTH", "BANDWDTH", "CHANNELS", "CREATOR", "DATE-OBS", "DEC", "DELAYS",
    "EXPOSURE", "FILENAME", "FINECHAN", "FREQCENT", "GOODTIME", "GPSTIME", "HA", "INTTIME",
    "LST", "MJD", "MODE", "NINPUTS", "PROJECT", "QUACKTIM", "RA", "RECVRS",
)  # fmt: skip

MAX_PAGE_SIZE = 1000


class IngestError(BadRequest):
    """Files that cannot be ingested; ``problems`` lists each as ``(path, problem)``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {path}: {problem}" for path, problem in problems)
        super().__init__(f"nothing was ingested; {len(problems)} problem(s):\n{lines}")


@dataclass
class IngestReport:
    """What an ingest did."""

    observations_added: list[int] = field(default_factory=list)
    files_added: list[str] = field(default_factory=list)
    files_unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _PlannedFile:
    path: Path
    parsed: ParsedFileName
    size_bytes: int
    sha1: str


def metafits_observation_fields(path: Path) -> dict[str, Any]:
    """Observation columns from a metafits primary header.

    Raises
    ------
    ValueError
        Naming the missing keys or the unreadable file.
    """
    try:
        header = fits.getheader(path, 0)
    except (OSError, ValueError) as exc:
        raise ValueError(f"not a readable FITS file ({exc})") from exc
    missing = [key for key in REQUIRED_METAFITS_KEYS if key not in header]
    if missing:
        raise ValueError(f"metafits is missing required key(s): {', '.join(missing)}")
    try:
        obsid = int(header["GPSTIME"])
        channels = [int(c) for c in str(header["CHANNELS"]).split(",") if c.strip()]
        delays = [int(d) for d in str(header["DELAYS"]).split(",") if d.strip()]
        fields: dict[str, Any] = {
            "obsid": obsid,
            "stoptime": obsid + int(header["EXPOSURE"]),
            "obsname": str(header["FILENAME"]),
            "creator": str(header["CREATOR"]),
            "project_id": str(header["PROJECT"]),
            "mode": str(header["MODE"]),
            "groupid": _optional_int(header.get("GROUPID")),
            "ra_deg": float(header["RA"]),
            "dec_deg": float(header["DEC"]),
            "ra_phase_deg": _optional_float(header.get("RAPHASE")),
            "dec_phase_deg": _optional_float(header.get("DECPHASE")),
            "az_deg": float(header["AZIMUTH"]),
            "el_deg": float(header["ALTITUDE"]),
            "delays": delays,
            "coarse_chans": channels,
            "n_tiles": int(header["NINPUTS"]) // 2,
            "freq_res_khz": float(header["FINECHAN"]),
            "int_time_s": float(header["INTTIME"]),
            "atten_db": _optional_float(header.get("ATTEN_DB")),
            "calibration": bool(header.get("CALIBRAT", False)),
            "calibrator_source": _optional_str(header.get("CALIBSRC")),
        }
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metafits has a malformed value ({exc})") from exc
    if fields["mode"] not in ObservationMode.__members__:
        raise ValueError(f"metafits MODE {fields['mode']!r} is not a known observing mode")
    return fields


def _optional_float(value: object) -> float | None:
    return None if value is None or value == "" else float(value)  # type: ignore[arg-type]


def _optional_int(value: object) -> int | None:
    return None if value is None or value == "" else int(value)  # type: ignore[call-overload]


def _optional_str(value: object) -> str | None:
    return None if value is None or str(value).strip() == "" else str(value)


def _check_data_file(path: Path, parsed: ParsedFileName) -> None:
    """Raise ValueError if a data file is unreadable or belongs to another observation."""
    if parsed.kind == FileKind.SIM_TRUTH:
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"not readable JSON ({exc})") from exc
        return
    if parsed.kind == FileKind.VOLTAGE:
        if path.stat().st_size == 0:
            raise ValueError("voltage file is empty")
        return
    try:
        header = fits.getheader(path, 0)
    except (OSError, ValueError) as exc:
        raise ValueError(f"not a readable FITS file ({exc})") from exc
    header_obsid = header.get("OBSID", header.get("GPSTIME"))
    if header_obsid is not None and int(header_obsid) != parsed.obsid:
        raise ValueError(f"header says obsid {header_obsid}, the name says {parsed.obsid}")


def _unobserved_channel(parsed: ParsedFileName, receiver_channels: list[int]) -> str | None:
    """Why a correlator or voltage file is of a coarse channel the observation does not have
    (its receiver channel is not in the metafits ``CHANNELS``, or its gpubox number is
    beyond the channel count), else None."""
    if parsed.kind in (FileKind.MWAX_VIS, FileKind.VOLTAGE) and parsed.coarse_chan is not None:
        if parsed.coarse_chan not in receiver_channels:
            return (
                f"receiver channel {parsed.coarse_chan} is not one of observation "
                f"{parsed.obsid}'s channels ({', '.join(map(str, receiver_channels))})"
            )
    elif parsed.kind == FileKind.LEGACY_GPUBOX and parsed.gpubox_number is not None:
        n_chans = len(receiver_channels)
        if not 1 <= parsed.gpubox_number <= n_chans:
            return (
                f"gpubox number {parsed.gpubox_number} is not in 1..{n_chans} "
                f"(observation {parsed.obsid} has {n_chans} coarse channels)"
            )
    return None


def ingest_directory(
    session: Session, storage: Storage, directory: Path, *, move_files: bool = False
) -> IngestReport:
    """Register the observations and files found under ``directory`` (recursively).

    Every file is checked before anything is written: if any is bad, an
    :class:`IngestError` lists them all and neither the database nor the
    archive changes. A correlator or voltage file of a coarse channel the
    observation does not have (not in its metafits ``CHANNELS``; a legacy
    gpubox number beyond the channel count) is not registered: it is listed in
    :attr:`IngestReport.skipped` with the reason. Files are copied into ``storage`` under
    ``<obsid>/<name>`` (in place if they are already there). Running it again
    on the same files changes nothing. Hidden files, and files in hidden directories
    (a simulation's staging directory), are not looked at.

    The rows are flushed before any file is put in the archive: they hold their
    ``(obsid, name)`` until the transaction ends (PostgreSQL's unique index, SQLite's write
    lock), so an ingest that loses a race for the same names (another transaction
    registered them first) fails at the flush, having replaced no file the other
    registered; and on a failure it removes only the files it put there itself.

    Parameters
    ----------
    session
        The caller commits (or rolls back) the transaction.
    storage
        The archive's storage.
    directory
        Where to look for metafits and data files.
    move_files
        The files are a private copy (a simulation's staging directory): they are moved
        into the archive (renamed, on local storage) rather than copied.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IngestError([(str(directory), "is not a directory")])
    report = IngestReport()
    problems: list[tuple[str, str]] = []
    by_obsid: dict[int, list[tuple[Path, ParsedFileName]]] = defaultdict(list)
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(directory).parts):
            continue
        parsed = parse_file_name(path.name)
        if parsed is None:
            report.skipped.append((str(path), "not an MWA observation file name"))
            continue
        by_obsid[parsed.obsid].append((path, parsed))

    observations: dict[int, dict[str, Any] | Observation] = {}
    planned: list[_PlannedFile] = []
    for obsid, entries in sorted(by_obsid.items()):
        existing = session.get(Observation, obsid)
        metafits_fields = None
        metafits_candidates = [p for p, parsed in entries if parsed.kind == FileKind.METAFITS]
        metafits_candidates += [p for p, parsed in entries if parsed.kind == FileKind.PPDS]
        for metafits_path in metafits_candidates:
            try:
                metafits_fields = metafits_observation_fields(metafits_path)
            except ValueError as exc:
                problems.append((str(metafits_path), str(exc)))
                continue
            if metafits_fields["obsid"] != obsid:
                problems.append(
                    (
                        str(metafits_path),
                        f"GPSTIME {metafits_fields['obsid']} does not match the name",
                    )
                )
            break
        if existing is not None:
            observations[obsid] = existing
        elif metafits_fields is not None:
            observations[obsid] = metafits_fields
        else:
            if not metafits_candidates:
                problems.append(
                    (
                        str(entries[0][0]),
                        f"no metafits for observation {obsid} here or in the archive",
                    )
                )
            continue
        receiver_channels = (
            existing.coarse_chans if existing is not None else metafits_fields["coarse_chans"]  # type: ignore[index]
        )
        mode = str(existing.mode if existing is not None else metafits_fields["mode"])  # type: ignore[index]
        gpubox_map = legacy_gpubox_channels(receiver_channels)
        for path, parsed in entries:
            unobserved = _unobserved_channel(parsed, receiver_channels)
            if unobserved is not None:
                # Left over from another recording of the obsid (a metafits written again
                # with other channels): mwalib panics on such a file, aborting the process
                # that opens it (an ASVO worker). Not registered, and said so; the rest of
                # the observation is.
                reason = f"{unobserved}; not registered (it is not part of this observation)"
                report.skipped.append((str(path), reason))
                continue
            if parsed.kind not in (FileKind.METAFITS, FileKind.PPDS):
                try:
                    _check_data_file(path, parsed)
                except ValueError as exc:
                    problems.append((str(path), str(exc)))
                    continue
            if parsed.kind == FileKind.MWAF and mode.startswith("MWAX"):
                # Birli names an MWAX observation's flag files by receiver channel
                # (<obsid>_137.mwaf), a legacy one's by gpubox number (<obsid>_06.mwaf).
                channel = parsed.gpubox_number
                if channel not in receiver_channels:
                    problems.append((str(path), f"receiver channel {channel} is not one of "
                                                f"observation {obsid}'s {receiver_channels}"))  # fmt: skip
                    continue
                parsed = replace(parsed, coarse_chan=channel, gpubox_number=None)
            if parsed.gpubox_number is not None:
                if not 1 <= parsed.gpubox_number <= len(gpubox_map):
                    problems.append(
                        (
                            str(path),
                            f"gpubox number {parsed.gpubox_number} is not in 1..{len(gpubox_map)}",
                        )
                    )
                    continue
                parsed = ParsedFileName(
                    parsed.obsid,
                    parsed.kind,
                    coarse_chan=gpubox_map[parsed.gpubox_number - 1],
                    gpubox_number=parsed.gpubox_number,
                    batch=parsed.batch,
                    note=parsed.note,
                )
            if parsed.note:
                report.warnings.append((str(path), parsed.note))
            planned.append(_PlannedFile(path, parsed, path.stat().st_size, sha1_of_file(path)))

    # One name of an observation found twice (in two subdirectories): the same file is
    # archived once; different contents are refused (the second was dropped unsaid).
    first_of: dict[tuple[int, str], _PlannedFile] = {}
    for item in list(planned):
        first = first_of.setdefault((item.parsed.obsid, item.path.name), item)
        if first is item:
            continue
        planned.remove(item)
        if first.sha1 == item.sha1:
            report.skipped.append((str(item.path), f"the same file as {first.path}"))
        else:
            problems.append((str(item.path), f"{first.path} has this name with other contents"))

    for item in planned:
        existing_file = session.scalar(
            select(ObservationFile).where(
                ObservationFile.obsid == item.parsed.obsid, ObservationFile.name == item.path.name
            )
        )
        if existing_file is not None and existing_file.sha1 != item.sha1:
            problems.append(
                (
                    str(item.path),
                    f"already archived with different contents (sha1 {existing_file.sha1})",
                )
            )
    if problems:
        raise IngestError(problems)

    for obsid, entry in observations.items():
        if isinstance(entry, dict):
            session.add(Observation(**entry, created_by="ingest"))
            report.observations_added.append(obsid)
    session.flush()

    to_place: list[tuple[Path, str]] = []
    for item in planned:
        key = f"{item.parsed.obsid}/{item.path.name}"
        already = session.scalar(
            select(ObservationFile).where(
                ObservationFile.obsid == item.parsed.obsid,
                ObservationFile.name == item.path.name,
            )
        )
        if already is not None:
            report.files_unchanged.append(str(item.path))
            continue
        if not _is_same_file(storage, key, item.path):
            to_place.append((item.path, key))
        session.add(
            ObservationFile(
                obsid=item.parsed.obsid,
                name=item.path.name,
                kind=item.parsed.kind.value,
                size_bytes=item.size_bytes,
                sha1=item.sha1,
                storage_key=key,
                coarse_chan=item.parsed.coarse_chan,
                batch=item.parsed.batch,
            )
        )
        report.files_added.append(str(item.path))
    # The rows first: a transaction registering the same names at the same moment makes
    # this flush fail (after its commit), before a file of its is replaced here. Copied
    # first, the loser of two recordings of one observation wrote over the winner's files,
    # then removed them on its way out: catalogue rows without files.
    session.flush()
    placed: list[str] = []
    try:
        for path, key in to_place:
            _place(storage, path, key, move=move_files)
            placed.append(key)
    except BaseException:
        # The database rolls back with the caller's transaction; take the files back too.
        # Only this ingest's: its rows hold these names until then.
        for key in placed:
            storage.delete(key)
        raise
    return report


def _place(storage: Storage, path: Path, key: str, *, move: bool) -> None:
    """Put ``path`` in ``storage`` under ``key`` (moved, if ``move``: renamed on local storage)."""
    if move and storage.is_local:
        target = storage.local_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        return
    storage.put_file(path, key)
    if move:
        path.unlink()


def _is_same_file(storage: Storage, key: str, path: Path) -> bool:
    if not storage.is_local or not storage.exists(key):
        return False
    return os.path.samefile(storage.local_path(key), path)


def get_observation(session: Session, obsid: int) -> Observation:
    """The observation with its files.

    Raises
    ------
    NotFound
        If there is no such observation.
    """
    observation = session.scalar(
        select(Observation)
        .options(selectinload(Observation.files))
        .where(Observation.obsid == obsid)
    )
    if observation is None:
        raise NotFound(f"Observation {obsid} does not exist")
    return observation


def metafits_key(session: Session, obsid: int) -> str:
    """Storage key of an observation's metafits (``<obsid>.metafits`` preferred over PPDS).

    Raises
    ------
    NotFound
        If the observation or its metafits is unknown.
    """
    found = metafits_file(get_observation(session, obsid))
    if found is None:
        raise NotFound(f"Observation {obsid} has no metafits file in the archive")
    return found.storage_key


def metafits_file(observation: Observation) -> ObservationFile | None:
    """An observation's archived metafits (``<obsid>.metafits`` preferred over PPDS), if any."""
    candidates = sorted(
        (f for f in observation.files if f.kind in (FileKind.METAFITS, FileKind.PPDS)),
        key=lambda f: f.kind != FileKind.METAFITS,
    )
    return candidates[0] if candidates else None


def correlator_inputs(session: Session, storage: Storage, obsid: int) -> tuple[Path, list[Path]]:
    """Local paths of an archived observation's metafits and correlator data files.

    Raises
    ------
    NotFound
        If the observation, its metafits or its correlator files are not archived.
    BadRequest
        If the archive is not on local disk (conversion reads files in place).
    """
    if not storage.is_local:
        raise BadRequest("converting archived observations needs the archive on local disk")
    observation = get_observation(session, obsid)
    data_keys = sorted(
        f.storage_key
        for f in observation.files
        if f.kind in (FileKind.MWAX_VIS, FileKind.LEGACY_GPUBOX)
    )
    if not data_keys:
        raise NotFound(
            f"Observation {obsid} has no correlator data files in the archive (mode {observation.mode})"
        )
    metafits = storage.local_path(metafits_key(session, obsid))
    return metafits, [storage.local_path(key) for key in data_keys]


def find_observations(
    session: Session,
    *,
    mintime: int | None = None,
    maxtime: int | None = None,
    project_id: str | None = None,
    mode: str | None = None,
    obsname: str | None = None,
    creator: str | None = None,
    calibration: bool | None = None,
    include_deleted: bool = False,
    before: int | None = None,
    page: int = 1,
    page_size: int = 100,
    with_total: bool = False,
) -> tuple[list[Observation], bool, int | None]:
    """Observations overlapping [mintime, maxtime] (GPS s) that match the filters, newest first.

    The text filters ignore case. ``creator`` is a whole value and ``obsname`` a
    substring (``%`` and ``_`` in it are literal), compared in lower case; ``mode`` is an
    observing mode's name in any case. ``project_id`` is a whole code in any case (through
    the (lower(project_id), obsid) index).

    Returns
    -------
    observations, has_more, total
        One page of results; whether a later page has more; the number of
        matches over all pages if ``with_total`` (counting scans every match,
        so it is asked for, not done by default).

    Notes
    -----
    ``page`` skips rows, which costs time in proportion to the rows skipped;
    ``before`` (the last obsid of the previous page) jumps there through the
    index, so walking deep into the archive stays as fast as the first page.

    Raises
    ------
    BadRequest
        For an empty time range or paging outside its limits.
    """
    if not 1 <= page <= MAX_SQL_INTEGER // MAX_PAGE_SIZE:
        raise BadRequest(f"page must be 1..{MAX_SQL_INTEGER // MAX_PAGE_SIZE}, not {page}")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise BadRequest(f"pagesize must be 1..{MAX_PAGE_SIZE}, not {page_size}")
    for name, seconds in (("mintime", mintime), ("maxtime", maxtime), ("before", before)):
        if seconds is not None and not 0 <= seconds <= MAX_SQL_INTEGER:
            raise BadRequest(f"{name} must be GPS seconds 0..{MAX_SQL_INTEGER}, not {seconds}")
    if mintime is not None and maxtime is not None and maxtime < mintime:
        raise BadRequest(f"maxtime {maxtime} is before mintime {mintime}")
    if mode is not None:
        if mode.upper() not in ObservationMode.__members__:
            raise BadRequest(
                f"mode {mode!r} is not one of {', '.join(ObservationMode.__members__)}"
            )
        # The modes are upper-case names: comparing the canonical form keeps the
        # (mode, obsid) index, which lower(mode) would not.
        mode = mode.upper()
    conditions = []
    if mintime is not None:
        conditions.append(Observation.stoptime > mintime)
    if maxtime is not None:
        conditions.append(Observation.obsid <= maxtime)
    if before is not None:
        conditions.append(Observation.obsid < before)
    if project_id:
        # Through the (lower(project_id), obsid) index: without an index a rare or mistyped
        # code scans the whole table (0.1 ms became 40-80 ms at 100,000 rows).
        conditions.append(func.lower(Observation.project_id) == func.lower(project_id))
    if mode:
        conditions.append(Observation.mode == mode)
    if obsname:
        conditions.append(Observation.obsname.icontains(obsname, autoescape=True))
    if creator:
        # No index on creator to keep. The database's lower() on both sides, not Python's:
        # SQLite's folds only A-Z, so a value lowered in Python ("É" to "é") would no longer
        # equal the stored text even when typed exactly; it is also what ilike does there.
        conditions.append(func.lower(Observation.creator) == func.lower(creator))
    if calibration is not None:
        conditions.append(Observation.calibration.is_(calibration))
    if not include_deleted:
        conditions.append(Observation.deleted.is_(False))
    total = None
    if with_total:
        total = (
            session.scalar(select(func.count()).select_from(Observation).where(*conditions)) or 0
        )
    # One row more than the page tells whether there is a next page without counting.
    rows = list(
        session.scalars(
            select(Observation)
            .where(*conditions)
            .order_by(Observation.obsid.desc())
            .limit(page_size + 1)
            .offset((page - 1) * page_size)
        ).all()
    )
    return rows[:page_size], len(rows) > page_size, total


#: Modes an operator can put in the schedule by hand (``observatory schedule observation``):
#: correlator and voltage observations the telescope records once they end, and voltage
#: buffering, which records nothing until a ``triggerbuffer`` dumps it.
SCHEDULABLE_MODES = ("MWAX_CORRELATOR", "MWAX_VCS", "MWAX_BUFFER")
#: ``created_by`` of observations scheduled by hand (the simulated telescope records them).
SCHEDULED_BY_OPERATOR = "schedule"
#: DESIGN: the longest observation an operator may schedule by hand, 2 days: the longest a
#: trigger may observe (``trigger.service.MAX_TRIGGER_S``; the archive may not import the
#: trigger domain, which sits above it, and a test keeps the two equal). Nothing in the real
#: system's documents gives a limit; a longer observation only blocks the schedule (one of
#: 99999999999992 s, three million years, was accepted), and a voltage capture that long
#: claims the whole VCS disk.
MAX_SCHEDULED_OBSERVATION_S = 2 * 86400
#: How many seconds of 24-channel voltage capture the VCS disk can still take at a GPS time,
#: read in the given session (``trigger.service.vcs_free_s`` with the settings bound, which
#: the ``observatory`` command hands in): the archive does not depend on the trigger domain.
VcsFreeReader = Callable[[Session, float], int]


#: The id of the schedule lock's one row (made by migration 0004).
SCHEDULE_LOCK_ID = 1


def take_schedule_lock(session: Session) -> None:
    """Hold the schedule's lock until ``session``'s transaction ends.

    Every change of the schedule takes it before it reads what it checks (overlaps,
    override rules, disk room): a trigger's (``trigger.service``) and an operator's
    (:func:`schedule_observation`). Without it, two changes each checked the schedule
    before the other had written: overlapping observations, or a trigger and an operator
    inserting the same obsid (the loser's commit failed, a trigger answered 500).

    An UPDATE of the lock's row: PostgreSQL's row lock, SQLite's write lock (either
    way held to the commit or rollback). Make it the transaction's first statement: on
    SQLite a transaction that read before it writes may find its snapshot stale.

    Raises
    ------
    RuntimeError
        If the lock's row is missing (a database not made by the migrations): an UPDATE
        of no row would lock nothing, and changes would interleave unnoticed.
    """
    taken = session.execute(
        update(ScheduleLock)
        .where(ScheduleLock.id == SCHEDULE_LOCK_ID)
        .values(changes=ScheduleLock.changes + 1)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        raise RuntimeError(
            "the schedule lock's row is missing (schedule_lock id 1): run observatory db upgrade"
        )


def overlapping_observation(session: Session, start_gps: int, stop_gps: int) -> Observation | None:
    """An observation of the schedule (not deleted) running at some time in
    ``[start_gps, stop_gps)``, or None: the telescope makes one observation at a time."""
    return session.scalars(
        select(Observation)
        .where(
            Observation.deleted.is_(False),
            Observation.obsid < stop_gps,
            Observation.stoptime > start_gps,
        )
        .order_by(Observation.obsid)
    ).first()


def check_project_known(session: Session, project_id: str) -> None:
    """Refuse an observation for a project that is not registered, as a trigger's project is
    checked; a fresh installation with no projects registered (the CLI's default D0000)
    takes any well-formed id.

    Raises
    ------
    ValueError
        Naming the project.
    """
    if (
        session.get(Project, project_id) is None
        and session.scalar(select(Project.id).limit(1)) is not None
    ):
        raise ValueError(f"project_id {project_id!r} is not a known project")


def schedule_observation(
    session: Session,
    *,
    start_gps: int,
    duration_s: int,
    mode: str,
    coarse_chans: Sequence[int],
    project_id: str,
    obsname: str,
    now_gps_s: float,
    vcs_free_s: VcsFreeReader | None = None,
    interruptible: bool = True,
) -> Observation:
    """Put an observation in the schedule by hand, as an operator does.

    The checks that read the schedule are made under the schedule's lock
    (:func:`take_schedule_lock`), the one triggers take, and the caller's commit (or
    rollback) frees it: an overlap check and its insert cannot interleave with another
    operator's or a trigger's.

    Parameters
    ----------
    session
        A database session; best with no transaction open (the lock is then its
        transaction's first statement). The caller commits or rolls back.
    start_gps, duration_s
        When it starts (its obsid) and how long it lasts: whole multiples of 8 s, in the
        future, lasting at most :data:`MAX_SCHEDULED_OBSERVATION_S`.
    mode
        One of :data:`SCHEDULABLE_MODES`. A voltage capture (``MWAX_VCS``) must fit on the
        VCS disk, as a ``triggervcs`` capture must.
    coarse_chans
        Receiver channels (1..255, at most 24).
    project_id, obsname
        Its project (see :func:`project_id_problem`; once projects are registered, one of
        them) and name (the name as a metafits holds it: printable ASCII).
    now_gps_s
        The current GPS time (advanced by the time the lock was waited for).
    vcs_free_s
        Reads the VCS disk's room (:data:`VcsFreeReader`); required for ``MWAX_VCS``.
    interruptible
        False protects it from triggers: no other project's trigger may truncate or delete
        it, whatever its priority (``trigger.service.blockers``); its own project's may.

    Returns
    -------
    Observation
        The new row, pointed at the zenith (delays 0), ``created_by``
        :data:`SCHEDULED_BY_OPERATOR`.

    Raises
    ------
    ValueError
        Naming what is wrong: a start or duration off the 8-s grid, a start in the past,
        a duration over :data:`MAX_SCHEDULED_OBSERVATION_S`, an unknown mode, bad channels
        or name, a malformed or unknown project, an overlap with the schedule, or a voltage
        capture the VCS disk has no room for.
    TypeError
        For ``MWAX_VCS`` without ``vcs_free_s``.
    """
    if start_gps % 8 or duration_s <= 0 or duration_s % 8:
        raise ValueError(
            f"start {start_gps} and duration {duration_s} s must be whole multiples of 8 s "
            "(observations start and stop on 8-second boundaries)"
        )
    # An obsid every service accepts (a start past year 2065 was taken, then refused by
    # /metadata/obs and the ASVO; and no command removes it from the schedule).
    parse_obsid(start_gps, "start")
    if duration_s > MAX_SCHEDULED_OBSERVATION_S:
        raise ValueError(
            f"duration {duration_s} s is longer than the {MAX_SCHEDULED_OBSERVATION_S} s "
            "(2 days) one observation may last: schedule several"
        )
    called = time.monotonic()
    if mode not in SCHEDULABLE_MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(SCHEDULABLE_MODES)}")
    # MWAX_BUFFER writes nothing to the VCS disk until a triggerbuffer dump, which checks it.
    captures_voltages = mode == "MWAX_VCS"
    if captures_voltages and vcs_free_s is None:
        raise TypeError("scheduling an MWAX_VCS capture needs vcs_free_s to read the VCS disk")
    channels = list(validate_coarse_chans(coarse_chans))
    problem = metafits_text_problem(obsname) if obsname else "is empty"
    if problem:
        raise ValueError(f"obsname {problem}")
    # Refused here, not when the telescope fails to record it (which it only logs).
    problem = project_id_problem(project_id)
    if problem:
        raise ValueError(problem)
    # Everything above reads no table. From here the schedule is read and written under
    # its lock: another change waits for this one's commit and then sees this row.
    take_schedule_lock(session)
    # The time now, not when the call began: the lock may have been waited for (a trigger
    # planning under it), and an observation must not be booked after its start.
    now_gps_s += time.monotonic() - called
    if start_gps < now_gps_s:
        raise ValueError(f"start {start_gps} is in the past (now {int(now_gps_s)})")
    check_project_known(session, project_id)
    stop_gps = start_gps + duration_s
    other = overlapping_observation(session, start_gps, stop_gps)
    if other is not None:
        raise ValueError(
            f"{start_gps} to {stop_gps} overlaps observation {other.obsid} ({other.obsname}, "
            f"{other.obsid} to {other.stoptime})"
        )
    if captures_voltages and vcs_free_s is not None:  # (checked above: it is given)
        # Under the lock, as triggervcs checks its capture, and in the unit of vcsfree.
        needed_s = full_band_vcs_s(duration_s, len(channels))
        free_s = vcs_free_s(session, now_gps_s)
        if needed_s > free_s:
            raise ValueError(
                f"the voltage capture needs {needed_s:.0f} s of 24-channel capture; the VCS "
                f"disk has room for {free_s} s"
            )
    observation = Observation(
        obsid=start_gps, stoptime=stop_gps, obsname=obsname, creator="operator",
        project_id=project_id, mode=mode, delays=[0] * 16, coarse_chans=channels,
        el_deg=90.0, az_deg=0.0, interruptible=interruptible, deleted=False,
        created_by=SCHEDULED_BY_OPERATOR,
    )  # fmt: skip
    session.add(observation)
    session.flush()
    return observation
