"""What an ASVO job does, stage by stage; runs as one task on a Dask worker.

Every state change is committed to the database at once (the database is the
truth: the websocket and get_jobs read it, and a restarted dispatcher resumes
from it). Stages are idempotent and the product is written atomically under a
fixed name, so a job that runs twice (a worker died, the server restarted) still
ends with exactly one correct product. Two runs of one job never overlap: a run
holds the job's lock (:func:`~observatory.core.locks.resource_lock`) from its first look at the job to its
last write, and works in a directory of its own (``work/<job>/<attempt>``); a
run that finds the lock taken waits for it, then finds the job finished.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import blake3
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

# A Dask worker process imports only this module: every table must be known to the ORM
# (the jobs table's foreign key names users).
import observatory.all_models  # noqa: F401
from observatory.archive.models import FileKind, Observation, ObservationFile
from observatory.asvo.models import TERMINAL_STATES, Job, JobState, JobType
from observatory.calib.formats import CalSolutions
from observatory.calib.models import CalibrationRequest
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory, utcnow
from observatory.core.errors import NotFound
from observatory.core.gpstime import now_gps
from observatory.core.locks import LockLost, resource_lock
from observatory.core.processes import CommandFailed, run_command
from observatory.core.storage import Storage, atomic_output, sha1_of_file

log = logging.getLogger(__name__)

#: Product kinds by job type: the last part of ``<obsid>_<jobid>_<kind>.tar``.
PRODUCT_KIND = {
    JobType.CONVERSION: "conversion",
    JobType.DOWNLOAD_VISIBILITIES: "vis",
    JobType.DOWNLOAD_METADATA: "vis_meta",
    JobType.DOWNLOAD_VOLTAGE: "volt",
}


#: The lock kind of ASVO jobs (:func:`~observatory.core.locks.resource_lock`).
JOB_LOCK_KIND = "asvo.job"


class JobCancelled(Exception):
    """The user cancelled the job while it ran."""


class JobFailed(Exception):
    """The job cannot be done; the message becomes the job's ``error_text``."""


class JobEndedElsewhere(Exception):
    """Another run of the job ended it (one that held its lock after this one lost it:
    a PostgreSQL connection cut); its state is that run's."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


class _Tracker:
    """Records the job's progress in the database, and notices cancellation."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        job_id: int,
        still_held: Callable[[], None] = lambda: None,
    ) -> None:
        self.session_factory = session_factory
        self.job_id = job_id
        #: Raises LockLost once the run's lock is gone: then nothing more is written.
        self.still_held = still_held

    def load(self) -> Job:
        with self.session_factory() as session:
            job = session.get(Job, self.job_id)
            if job is None:
                raise JobFailed(f"job {self.job_id} no longer exists")
            session.expunge(job)
            return job

    def check_cancelled(self) -> None:
        if self.load().cancel_requested:
            raise JobCancelled

    def move(self, state: JobState, **fields: Any) -> None:
        """Set the state (unless the job was cancelled or ended meanwhile) and other columns.

        The row is claimed first by an UPDATE that matches only an uncancelled, unfinished
        job, in the transaction that then writes the state: a cancel cannot land between
        the check and the write (a plain read-then-write lost cancels on SQLite, whose
        reads take no lock), nor can a job another run completed be set in error.

        Raises
        ------
        JobCancelled
            If the user cancelled it.
        JobEndedElsewhere
            If another run ended it.
        """
        self.still_held()
        with self.session_factory() as session:
            claim = session.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    Job.cancel_requested.is_(False),
                    Job.state.not_in([s.value for s in TERMINAL_STATES]),
                )
                .values(cancel_requested=False)
            )
            if claim.rowcount == 0:  # type: ignore[attr-defined]
                now = self.load()
                if now.cancel_requested:
                    raise JobCancelled
                raise JobEndedElsewhere(now.state)
            job = session.get(Job, self.job_id, populate_existing=True)
            assert job is not None
            job.state = state.value
            for name, value in fields.items():
                setattr(job, name, value)
            session.commit()


def run_job(settings_values: dict[str, Any], job_id: int) -> str:
    """Run one job to a terminal state under the job's lock; returns that state.

    ``settings_values`` is ``Settings.model_dump()`` (settings travel to Dask
    workers as plain data).
    """
    settings = Settings(**settings_values)
    engine = make_engine(settings.resolved_database_url)
    try:
        with resource_lock(settings, engine, JOB_LOCK_KIND, job_id) as still_held:
            return _run_locked(settings, engine, job_id, still_held)
    finally:
        engine.dispose()


def _run_locked(
    settings: Settings, engine: Engine, job_id: int, still_held: Callable[[], None]
) -> str:
    """``run_job`` while holding the job's lock (``still_held`` raises LockLost once not)."""
    session_factory = make_session_factory(engine)
    tracker = _Tracker(session_factory, job_id, still_held)
    job_dir = settings.work_dir / str(job_id)
    # This run's own scratch: a run that outlived its lock never loses files to this one.
    work_dir = job_dir / f"attempt-{secrets.token_hex(6)}"
    try:
        job = tracker.load()
        # A previous run of this job may have died half-way (worker or server killed); its
        # lock is free, so nothing of it runs any more.
        shutil.rmtree(job_dir, ignore_errors=True)
        if job.state in TERMINAL_STATES:
            # Cancelled (or given up) after a run died: what it delivered is no one's.
            if job.state != JobState.COMPLETED.value:
                remove_product(settings, job)
            return job.state
        # A conversion that applies calibration waits for its solutions before anything is
        # staged: queued -> (waitcal) -> staging ..., the ASVO's order (it went preprocessing
        # -> waitcal -> staging, and checked the staged files twice).
        solutions = _calibration_solutions(settings, job, tracker) if _applies_di_cal(job) else None
        tracker.move(JobState.STAGING, started=job.started or utcnow())
        with session_factory() as session:
            inputs = _inputs(session, Storage(settings.archive_dir), job)
        tracker.move(JobState.STAGED)
        tracker.move(JobState.DOWNLOADING)
        if job.job_type == JobType.CONVERSION:
            tracker.move(JobState.PREPROCESSING)
            members = _convert(settings, job, inputs, solutions, work_dir, tracker)
        else:
            members = [(path, path.name) for path, _ in inputs]
        tracker.check_cancelled()
        tracker.move(JobState.DELIVERING)
        product, location = _deliver(settings, job, members)
        tracker.move(
            JobState.COMPLETED,
            product=product,
            product_location=location,
            completed=utcnow(),
            expires_at=utcnow() + timedelta(days=settings.asvo_product_ttl_days),
        )
        return JobState.COMPLETED.value
    except WaitForCalibration as waiting:
        try:
            # The request the job just filed is recorded with the state, in one write: it
            # is the only one whose outcome is the job's (see ``CALIBRATION_REQUEST_PARAM``).
            filed = (
                {}
                if waiting.request_id is None
                else {"params": {**job.params, CALIBRATION_REQUEST_PARAM: waiting.request_id}}
            )
            tracker.move(JobState.WAITCAL, **filed)
        except JobCancelled:
            return JobState.CANCELLED.value
        except JobEndedElsewhere as ended:
            return ended.state
        except LockLost as lost:
            log.warning("ASVO job %d: this run stops: %s", job_id, lost)
            return tracker.load().state
        return JobState.WAITCAL.value
    except JobCancelled:
        remove_product(settings, tracker.load())
        return JobState.CANCELLED.value
    except LockLost as lost:  # the job is the next run's: its state and product left alone
        log.warning("ASVO job %d: this run stops: %s", job_id, lost)
        return tracker.load().state
    except JobEndedElsewhere as ended:
        log.warning("ASVO job %d was ended (%s) by another run of it", job_id, ended.state)
        if ended.state != JobState.COMPLETED.value:
            remove_product(settings, tracker.load())  # this run's, if it delivered
        return ended.state
    except Exception as exc:  # any failure ends the job in error, with a message for the user
        if isinstance(exc, JobFailed):  # the user's request cannot be met: no server fault
            message = str(exc)
            log.info("ASVO job %d failed: %s", job_id, message)
        else:
            message = f"{type(exc).__name__}: {exc}"
            log.exception("ASVO job %d failed", job_id)
        try:
            tracker.move(JobState.ERROR, error_code=1, error_text=message, completed=utcnow())
        except JobCancelled:
            return JobState.CANCELLED.value
        except JobEndedElsewhere as ended:  # its product is that run's: left alone
            return ended.state
        except LockLost as lost:  # its failure may be the next run's doing (its scratch)
            log.warning("ASVO job %d: this run stops: %s", job_id, lost)
            return tracker.load().state
        # A product delivered before the failure (its completion not recorded) is no one's:
        # nothing expires a job in error, and it would stay on disk for good.
        remove_product(settings, tracker.load())
        return JobState.ERROR.value
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        with suppress(OSError):
            job_dir.rmdir()  # only if empty


def _inputs(session: Session, storage: Storage, job: Job) -> list[tuple[Path, FileKind]]:
    """The archived files a job needs, as local paths, with what each holds."""
    observation = session.get(Observation, job.obs_id)
    if observation is None or observation.deleted:
        raise JobFailed(f"Observation {job.obs_id} does not exist")
    files = session.scalars(
        select(ObservationFile)
        .where(ObservationFile.obsid == job.obs_id)
        .order_by(ObservationFile.name)
    ).all()
    params = job.params
    if job.job_type in (JobType.DOWNLOAD_VISIBILITIES, JobType.CONVERSION):
        kinds = {FileKind.METAFITS, FileKind.MWAX_VIS, FileKind.LEGACY_GPUBOX, FileKind.MWAF}
        chosen = [f for f in files if f.kind in kinds]
        if not any(f.kind in (FileKind.MWAX_VIS, FileKind.LEGACY_GPUBOX) for f in chosen):
            raise JobFailed(f"Observation {job.obs_id} has no visibility files in the archive")
    elif job.job_type == JobType.DOWNLOAD_METADATA:
        chosen = [f for f in files if f.kind in (FileKind.METAFITS, FileKind.PPDS, FileKind.MWAF)]
        if not any(f.kind in (FileKind.METAFITS, FileKind.PPDS) for f in chosen):
            # Not recorded (yet): an ended observation's files reach the archive later,
            # and a buffer never dumped, or a capture too large to record, never does.
            raise JobFailed(f"Observation {job.obs_id} has no metafits in the archive")
    elif job.job_type == JobType.DOWNLOAD_VOLTAGE:
        start_s = job.obs_id + int(params["offset"])
        stop_s = start_s + int(params["duration"])
        low, high = (
            (params["from_channel"], params["to_channel"])
            if params.get("channel_range")
            else (0, 255)
        )
        chosen = [
            f
            for f in files
            if f.kind == FileKind.METAFITS
            or (
                f.kind == FileKind.VOLTAGE
                and f.coarse_chan is not None
                and low <= f.coarse_chan <= high
                and _subfile_overlaps(f.name, start_s, stop_s)
            )
        ]
        if not any(f.kind == FileKind.VOLTAGE for f in chosen):
            raise JobFailed(
                f"Observation {job.obs_id} has no voltage files for seconds {start_s}-{stop_s} "
                f"in channels {low}-{high}"
            )
    else:
        raise JobFailed(f"job type {job.job_type} is not run by this server")
    paths = []
    for record in chosen:
        path = storage.local_path(record.storage_key)
        if not path.is_file():
            raise JobFailed(
                f"{record.name} of observation {job.obs_id} is missing from the archive"
            )
        # Staged files are checked against the catalogue, as the archive's staging does: a
        # damaged file would otherwise be delivered with checksums of its damaged bytes.
        size_bytes = path.stat().st_size
        damage = (
            f"{size_bytes} bytes where the catalogue records {record.size_bytes}"
            if size_bytes != record.size_bytes
            else f"its SHA-1 is not the catalogue's {record.sha1}"
            if sha1_of_file(path) != record.sha1
            else None
        )
        if damage is not None:
            log.error("archive file %s (observation %d) is damaged: %s", path, job.obs_id, damage)
            raise JobFailed(
                f"{record.name} of observation {job.obs_id} is damaged in the archive "
                f"({damage}); the observatory's operators have been told (in its log)"
            )
        paths.append((path, FileKind(record.kind)))
    return paths


def _subfile_overlaps(name: str, start_s: int, stop_s: int) -> bool:
    """Whether an MWAX sub-file (8 s from the GPS second in its name) overlaps [start, stop)."""
    try:
        gps_s = int(name.split("_")[1])
    except (IndexError, ValueError):
        return True
    return gps_s < stop_s and gps_s + 8 > start_s


def _convert(
    settings: Settings,
    job: Job,
    inputs: list[tuple[Path, FileKind]],
    solutions: CalSolutions | None,
    work_dir: Path,
    tracker: _Tracker,
) -> list[tuple[Path, str]]:
    """Run the preprocessing engine; returns the outputs as (path, name in the product).

    The conversion runs as ``observatory preprocess`` in a process of its own
    (:func:`~observatory.core.processes.run_command`), as the MWA's ASVO runs Birli: a
    native crash fails this job only. Cancellation stops it with SIGTERM, which it handles
    by removing its partial output.
    """
    from observatory.calib.formats import write_aocal, write_hyperdrive
    from observatory.preprocess.options import ConversionOptions

    options = ConversionOptions.from_params(job.params)
    # By the catalogue's kind, not the name: a metafits may be <obsid>_metafits.fits.
    metafits = [path for path, kind in inputs if kind == FileKind.METAFITS]
    data = [path for path, kind in inputs if kind in (FileKind.MWAX_VIS, FileKind.LEGACY_GPUBOX)]
    if not metafits:
        raise JobFailed(f"Observation {job.obs_id} has no metafits in the archive")
    # Absolute paths: the conversion runs in the work directory, and the data directory
    # may be relative (the demo's ./observatory-data).
    work_dir = work_dir.absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "observatory", "preprocess", "--metafits", str(metafits[0].absolute()),
        *(str(p.absolute()) for p in data), "--out", str(work_dir / str(job.obs_id)),
        *(f"--option={key}={value}" for key, value in options.to_params().items()),
    ]  # fmt: skip
    if solutions is not None:
        # hyperdrive's FITS keeps the chanblock frequencies and timeblocks; AO-cal has neither.
        with_freqs = solutions.chanblock_freqs_hz is not None
        path = work_dir / ("solutions.fits" if with_freqs else "solutions.bin")
        (write_hyperdrive if with_freqs else write_aocal)(path, solutions)
        command += ["--solutions", str(path)]
    try:
        stdout = run_command(command, cwd=work_dir, what="conversion", poll=tracker.check_cancelled)
    except CommandFailed as exc:
        raise JobFailed(str(exc)) from None
    written = [
        Path(line.removeprefix("wrote ").strip())
        for line in stdout.splitlines()
        if line.startswith("wrote ")
    ]
    if not written or not all(path.exists() for path in written):
        raise JobFailed(f"the conversion reported no output ({stdout!r})")
    return [(path, path.name) for path in written]


class WaitForCalibration(Exception):
    """The job needs a calibration fit that has been requested and is not ready yet.

    Parameters
    ----------
    request_id
        The id of the calibration request the job has just filed, to be recorded in the
        job (:data:`CALIBRATION_REQUEST_PARAM`); None when it filed none now (it waits
        for a request filed earlier, or for its calibrator observation to be recorded).
    """

    def __init__(self, request_id: int | None = None) -> None:
        super().__init__(request_id)
        self.request_id = request_id


#: The key of a job's ``params`` that holds the id of the calibration request the job filed
#: for itself (``apply_di_cal``). Only that request's outcome is the job's: anyone may file a
#: request naming an ASVO job (``add_cal_request``'s ``asvo_job_id``, which the MWA's service
#: takes from anyone and only echoes in the callback), so requests are never matched to a
#: job by that column. A submitted job cannot set this key (its params are rebuilt from the
#: known options), and the request it names must carry the job's id besides.
CALIBRATION_REQUEST_PARAM = "calibration_request_id"


def _applies_di_cal(job: Job) -> bool:
    """Whether the job is a conversion that applies calibration solutions."""
    from observatory.preprocess.options import ConversionOptions

    return (
        job.job_type == JobType.CONVERSION
        and ConversionOptions.from_params(job.params).apply_di_cal
    )


def _calibration_solutions(settings: Settings, job: Job, tracker: _Tracker) -> CalSolutions:
    """The best calibration solution for the job's observation, or a request for one.

    Raises
    ------
    WaitForCalibration
        When a fit has been requested (now, or earlier by this job) and has not finished,
        or the calibrator observation is yet to be recorded.
    JobFailed
        When there is no calibrator observation in range, or the fit the job requested
        failed (or finished without one that applies). Requests filed by anyone else,
        even naming this job, never decide this.
    """
    from observatory.calib.requests import add_cal_request
    from observatory.calib.service import best_fit, fit_solutions

    with tracker.session_factory() as session:
        try:
            _, fit = best_fit(session, job.obs_id, settings=settings)
            return fit_solutions(session, settings, fit)
        except NotFound:
            pass
        own = _own_calibration_request(session, job)
        if own is not None and own.calibration_error_datetime is not None:
            raise JobFailed(f"apply_di_cal: the calibration fit of observation {own.cal_id} failed: "
                            f"{own.calibration_error_message}")  # fmt: skip
        if own is not None and own.calibration_completed_datetime is not None:
            raise JobFailed(f"apply_di_cal: the calibration fit of observation {own.cal_id} finished "
                            "but does not apply to this observation")  # fmt: skip
        if own is None:
            try:
                filed = add_cal_request(session, settings, job.obs_id, asvo_job_id=job.id)
            except NotFound as exc:
                if _awaited_calibrator(session, settings, job.obs_id) is not None:
                    raise WaitForCalibration from None  # its calibrator is yet to be recorded
                raise JobFailed(f"apply_di_cal: no calibration solution is available for observation "
                                f"{job.obs_id}, and {exc.message}") from None  # fmt: skip
            raise WaitForCalibration(filed.id)
    raise WaitForCalibration


def _own_calibration_request(session: Session, job: Job) -> CalibrationRequest | None:
    """The calibration request ``job`` filed for itself, if it has filed one.

    Parameters
    ----------
    session
        A database session.
    job
        The job, as loaded (its ``params`` hold the request's id once it filed one).

    Returns
    -------
    CalibrationRequest or None
        The request whose id the job recorded (:data:`CALIBRATION_REQUEST_PARAM`), or None
        when it recorded none or that request is gone, or names another job.
    """
    request_id = job.params.get(CALIBRATION_REQUEST_PARAM)
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        return None
    request = session.get(CalibrationRequest, request_id)
    # The request was filed with the job's id: one that is not (the row's id reused after
    # a deletion, a value from anywhere else) is no request of this job.
    if request is None or request.asvo_job_id != job.id:
        return None
    return request


def _awaited_calibrator(session: Session, settings: Settings, obsid: int) -> Observation | None:
    from observatory.calib.requests import awaited_calibrator

    target = session.get(Observation, obsid)
    if target is None:
        return None
    return awaited_calibrator(session, target, now_gps(), settings=settings)


def calibration_pending(session: Session, settings: Settings, job_id: int) -> bool:
    """Whether a job in ``waitcal`` still waits: for the calibration request it filed, or,
    before it has filed one, for its calibrator observation to be recorded.

    Only the job's own request counts (:func:`_own_calibration_request`): one filed by
    anyone else with the job's id as ``asvo_job_id`` neither holds the job nor releases it.
    """
    job = session.get(Job, job_id)
    if job is None:
        return False
    own = _own_calibration_request(session, job)
    if own is None:
        return _awaited_calibrator(session, settings, job.obs_id) is not None
    return own.calibration_completed_datetime is None and own.calibration_error_datetime is None


#: Blocks in which a product's bytes are hashed and written.
_HASH_BLOCK_BYTES = 1 << 20


def _product_name(job: Job) -> str:
    return f"{job.obs_id}_{job.id}_{PRODUCT_KIND[JobType(job.job_type)]}.tar"


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through.

    SHA-1 is what the MWA's clients verify; BLAKE3 (three times faster to check) is
    what ours verify when the server publishes it. A tar stream writes 10 KiB at a
    time; the bytes are gathered into blocks of ``_HASH_BLOCK_BYTES`` first, as BLAKE3
    runs at 2.5 GB/s on 10 KiB updates and 6 GB/s on 1 MiB ones. ``flush`` before
    reading the digests.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.sha1 = hashlib.sha1()
        self.blake3 = blake3.blake3()
        self.size = 0
        self._pending = bytearray()

    def write(self, data: bytes) -> int:
        self._pending += data
        self.size += len(data)
        if len(self._pending) >= _HASH_BLOCK_BYTES:
            self._write_pending()
        return len(data)

    def _write_pending(self) -> None:
        self.sha1.update(self._pending)
        self.blake3.update(self._pending)
        self.handle.write(self._pending)
        self._pending = bytearray()

    def flush(self) -> None:
        self._write_pending()
        self.handle.flush()


def _deliver(
    settings: Settings, job: Job, members: list[tuple[Path, str]]
) -> tuple[dict[str, Any], str]:
    """Write the product; returns (get_jobs ``product``, its location)."""
    if job.delivery == "acacia":
        name = _product_name(job)
        path = settings.products_dir / str(job.id) / name
        # Only the finished product may be left: not the temporaries of a run that died.
        shutil.rmtree(path.parent, ignore_errors=True)
        with atomic_output(path) as temporary:
            writer = _write_tar(temporary, members)
        product = {
            "files": [
                {
                    "type": "acacia",
                    "name": name,
                    "size": writer.size,
                    "sha1": writer.sha1.hexdigest(),
                    "blake3": writer.blake3.hexdigest(),
                }
            ]
        }
        return product, str(path)
    target = settings.delivery_root(job.delivery) / _group(job) / "asvo" / str(job.id)
    with _replaced_directory(target) as temporary:
        if job.params.get("delivery_format") == "tar":  # one tar, as acacia's, in the directory
            _write_tar(temporary / _product_name(job), members)
        else:
            for source, arcname in members:
                destination = temporary / arcname
                if source.is_dir():
                    shutil.copytree(source, destination)
                else:
                    shutil.copy2(source, destination)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return {"files": [{"type": job.delivery, "path": str(target), "size": size}]}, str(target)


def _write_tar(path: Path, members: list[tuple[Path, str]]) -> _HashingWriter:
    """Write ``members`` (source, name in the tar) as an uncompressed tar at ``path``: giant-squid
    untars the stream as it downloads. Returns the writer, with the tar's size and hashes."""
    with open(path, "wb") as raw:
        writer = _HashingWriter(raw)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for source, arcname in members:
                tar.add(source, arcname=arcname)
        writer.flush()
    return writer


def _group(job: Job) -> str:
    return str(job.params.get("user_pawsey_group") or f"user{job.user_id}")


@contextmanager
def _replaced_directory(target: Path) -> Iterator[Path]:
    """A temporary directory beside ``target`` that replaces it when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        shutil.rmtree(target, ignore_errors=True)
        temporary.rename(target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def remove_product(settings: Settings, job: Job) -> None:
    """Delete a job's product (cancelled, failed or expired); nothing is left half-written."""
    if job.delivery == "acacia":
        shutil.rmtree(settings.products_dir / str(job.id), ignore_errors=True)
    else:
        target = settings.delivery_root(job.delivery) / _group(job) / "asvo" / str(job.id)
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(target.with_name(f".{target.name}.partial"), ignore_errors=True)
