"""The dispatcher: hands queued jobs (and calibration fit requests) to Dask, cancels, expires, resumes.

One dispatcher runs beside the web server (``observatory serve``), and only one per
database: it holds a lock (:class:`DispatcherLock`; a PostgreSQL advisory lock, or a
lock file beside a SQLite database) while it dispatches, and a second ``observatory
serve`` on the same database waits (standby) until that lock is free. It keeps no
state of its own that matters: every loop reads the jobs table, so after a crash or
restart it finds the jobs that are not finished and submits them again, under the
same Dask keys (``asvo-job-<id>-<n>``); a job's task takes a lock of its own
(``pipeline.run_job``), so a run still going from before the restart finishes and
the new one then finds the job done. Calibration fit requests are resubmitted the
same way (``calibration-request-<id>-<n>``) and their task takes the request's lock
(``calib.pipeline.run_request``; both locks are ``core.locks.resource_lock``).

The loop outlives outages: a failed step (database or scheduler unreachable) is
logged once, with its traceback, and retried with exponential back-off; its end is
logged once too. A Dask client that gave up on its scheduler (Dask closes it after
``distributed.comm.timeouts.connect``, 30 s) is replaced by a new one.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from observatory.archive.runner import SingleRunnerLock
from observatory.asvo.models import TERMINAL_STATES, Job, JobState
from observatory.asvo.pipeline import (
    JobCancelled,
    JobEndedElsewhere,
    JobFailed,
    _Tracker,
    calibration_pending,
    remove_product,
    run_job,
)
from observatory.calib.models import CalibrationRequest
from observatory.calib.pipeline import run_request
from observatory.calib.requests import finish_request, request_unfitted_calibrators
from observatory.core.config import Settings
from observatory.core.database import utcnow

log = logging.getLogger(__name__)

#: Broken tasks (beyond Dask's own retries) before a job is given up as an error.
MAX_TASK_FAILURES = 3

#: Dask priority of bulk calibration requests (the automatic ones): after everything else.
BULK_PRIORITY = -10

#: Client states in which a Dask client will never talk to its scheduler again.
_DEAD_CLIENT = frozenset({"closing", "closed"})


def job_task_key(job_id: int, generation: int = 0) -> str:
    """The Dask key of a job's task: the same in every dispatcher process.

    ``generation`` counts the job's earlier tasks that this dispatcher saw end without
    finishing the job (waitcal, a broken task): Dask may still hold such a task's result
    under its key, and a new task under the same key would return that result unrun.
    """
    return f"asvo-job-{job_id}-{generation}"


class DispatcherLock(SingleRunnerLock):
    """Only one dispatcher per database (see :class:`SingleRunnerLock`).

    PostgreSQL: the advisory lock ``observatory.asvo.dispatcher:<database>:<schema>``;
    SQLite: ``<database>.dispatcher-lock`` beside the database file (the key and the file
    it has always had: a job runner of an earlier version still excludes this one). The
    mechanism lives in the archive, below both, because the simulated telescope holds a
    lock of its own of the same kind.
    """

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url, "asvo.dispatcher", what="ASVO dispatcher")


class Dispatcher:
    """Runs ASVO jobs on a Dask cluster (``OBSERVATORY_DASK_SCHEDULER``) or an in-process one."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        poll_s: float = 0.2,
        *,
        max_backoff_s: float = 30.0,
        dask_connect_timeout_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.poll_s = poll_s
        #: Longest wait between steps while they fail (and between lock attempts on standby).
        self.max_backoff_s = max_backoff_s
        #: How long one attempt to connect a new Dask client to the scheduler may take.
        self.dask_connect_timeout_s = dask_connect_timeout_s
        self.futures: dict[int, Any] = {}
        self.failures: dict[int, int] = {}
        self.generations: dict[int, int] = {}
        self.calibration_futures: dict[int, Any] = {}
        self.calibration_generations: dict[int, int] = {}
        #: Failed tasks per calibration request (see _record_calibration_failure).
        self.calibration_failures: dict[int, int] = {}
        #: Calibration requests seen finishing with a fit stored (the metric of that name).
        self.calibration_fits_stored = 0
        self.lock = DispatcherLock(settings.resolved_database_url)
        #: Whether this dispatcher waits for another one (on the same database) to stop.
        self.standby = False
        self._failed_steps = 0
        self._outage_started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._cluster: Any = None

    def start(self) -> None:
        """Start the in-process cluster (without a scheduler address) and the loop in a thread.

        The client of an external scheduler is connected by the loop, which keeps
        trying (with back-off) while the scheduler cannot be reached.
        """
        from distributed import LocalCluster

        if not self.settings.dask_scheduler:
            # In-process: worker threads in this process (the demo and the tests).
            # Its HTTP servers start even without a dashboard, on every interface unless
            # given an address: loopback only.
            self._cluster = LocalCluster(
                processes=False,
                n_workers=1,
                threads_per_worker=2,
                dashboard_address=None,
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                worker_dashboard_address="127.0.0.1:0",
            )
            self._connect()
        self._thread = threading.Thread(target=self._loop, name="asvo-dispatcher", daemon=True)
        self._thread.start()

    @property
    def client(self) -> Any:
        """The Dask client (None before it connects); readiness checks ask its scheduler."""
        return self._client

    def dask_status(self, timeout_s: float = 2.0) -> str:
        """``ok``, or why this dispatcher's Dask cluster cannot run jobs now (for readiness).

        Blocking (a scheduler round trip): call it off the event loop.
        """
        client = self._client
        if client is None or client.status != "running":
            return f"unreachable (client {getattr(client, 'status', 'not connected')})"
        try:
            identity = client.sync(client.scheduler.identity, n_workers=-1,
                                   callback_timeout=timeout_s)  # fmt: skip
        except Exception as exc:
            return f"unreachable ({exc.__class__.__name__})"
        if not identity.get("workers"):
            return "no workers (the scheduler has no Dask worker connected: jobs wait)"
        return "ok"

    def stop(self) -> None:
        """Stop the loop and disconnect; running jobs resume at the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self.lock.release()

    def _connect(self) -> None:
        from distributed import Client

        if self._cluster is not None:
            self._client = Client(self._cluster)
        else:
            self._client = Client(self.settings.dask_scheduler, timeout=self.dask_connect_timeout_s)

    def _ensure_client(self) -> None:
        """Connect a client, or replace one that gave up on its scheduler."""
        if self._client is not None and self._client.status not in _DEAD_CLIENT:
            return
        if self._client is not None:
            log.warning("ASVO dispatcher: the Dask client is %s (scheduler lost); reconnecting",
                        self._client.status)  # fmt: skip
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
            # Their tasks were cancelled with the connection; submitted again below.
            self.futures.clear()
            self.calibration_futures.clear()
        self._connect()
        log.info("ASVO dispatcher: connected to the Dask scheduler %s",
                 self.settings.dask_scheduler or "(in-process)")  # fmt: skip

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(self.tick())

    def tick(self) -> float:
        """One turn of the loop: returns how long to wait before the next.

        Takes (or checks) the dispatcher lock and the Dask client, then runs a
        ``step``. A failure is logged once per outage (with its traceback) and the
        wait doubles, up to ``max_backoff_s``; the first success after it is logged.
        """
        try:
            self._ensure_client()
            if not self._hold_lock():
                return min(self.max_backoff_s, max(self.poll_s, 5.0))
            self.step()
        except Exception:
            self._failed_steps += 1
            if self._failed_steps == 1:
                self._outage_started = time.monotonic()
                log.exception("ASVO dispatcher step failed; retrying with back-off (up to %g s), "
                              "silently until it succeeds", self.max_backoff_s)  # fmt: skip
            else:
                log.debug("ASVO dispatcher step failed again", exc_info=True)
            return float(min(self.max_backoff_s, self.poll_s * 2 ** min(self._failed_steps, 30)))
        if self._failed_steps:
            log.warning("ASVO dispatcher recovered after %d failed steps (%.0f s)",
                        self._failed_steps, time.monotonic() - self._outage_started)  # fmt: skip
            self._failed_steps = 0
        return self.poll_s

    def _hold_lock(self) -> bool:
        held = self.lock.acquire()
        if not held and not self.standby:
            log.warning("ASVO dispatcher: another dispatcher holds %s; this one dispatches "
                        "nothing and waits until that one stops", self.lock.description)  # fmt: skip
        elif held and self.standby:
            log.warning("ASVO dispatcher: took %s; dispatching", self.lock.description)
        self.standby = not held
        return held

    def step(self) -> None:
        """One pass: submit new or orphaned jobs, cancel, reap finished futures, expire."""
        with self.session_factory() as session:
            unfinished = session.scalars(
                select(Job)
                .where(Job.state.not_in([s.value for s in TERMINAL_STATES]), Job.deleted.is_(False))
                .order_by(Job.priority.desc(), Job.id)
            ).all()
            for job in unfinished:
                if job.state == JobState.WAITCAL.value and calibration_pending(
                    session, self.settings, job.id
                ):
                    continue  # resumed once its calibration request has finished
                if job.id not in self.futures:
                    self.futures[job.id] = self._client.submit(
                        run_job,
                        self.settings.model_dump(),
                        job.id,
                        key=job_task_key(job.id, self.generations.get(job.id, 0)),
                        priority=job.priority,
                        pure=False,
                        retries=2,
                    )
            active_ids = {job.id for job in unfinished}
            for job_id, future in list(self.futures.items()):
                if job_id not in active_ids:
                    # Cancelled (or finished). A task not yet started is kept, not cancelled:
                    # it takes the job's lock and removes what a run that died left of it
                    # (its scratch; its product, once the job is cancelled), then ends.
                    if future.done():
                        del self.futures[job_id]
                        self.generations.pop(job_id, None)
                elif future.done():
                    # The task ended without leaving the job finished (its worker died and
                    # Dask's retries ran out, the task itself broke, or it waits for a
                    # calibration): run it again, under the next key, a few times, then
                    # give the job up with the reason.
                    del self.futures[job_id]
                    self.generations[job_id] = self.generations.get(job_id, 0) + 1
                    if future.status == "error":
                        self._record_failure(session, job_id, future.exception())
                    future.release()
            self._expire(session)
            session.commit()
            self._calibration_requests(session)

    def _calibration_requests(self, session: Session) -> None:
        """Submit calibration fit requests that have not finished (once each per process).

        Calibrator observations in the archive that have no fit and no request get a bulk
        request first (``request_unfitted_calibrators``). Bulk requests are low priority:
        they are submitted only while no ASVO job task and no other request is in hand (a
        fit of the archive's backlog would otherwise hold workers a user's job needs; Dask's
        priority orders only tasks that wait), and then at a lower Dask priority.
        """
        request_unfitted_calibrators(session)
        pending = session.execute(
            select(CalibrationRequest.id, CalibrationRequest.bulk_request).where(
                CalibrationRequest.calibration_completed_datetime.is_(None),
                CalibrationRequest.calibration_error_datetime.is_(None),
            ).order_by(CalibrationRequest.bulk_request, CalibrationRequest.request_added_datetime)
        ).all()  # fmt: skip
        busy = bool(self.futures) or any(not bulk for _, bulk in pending)
        for request_id, bulk in pending:
            if bulk and busy:
                continue
            if request_id not in self.calibration_futures:
                generation = self.calibration_generations.get(request_id, 0)
                self.calibration_futures[request_id] = self._client.submit(
                    run_request, self.settings.model_dump(), request_id,
                    key=f"calibration-request-{request_id}-{generation}", pure=False, retries=2,
                    priority=BULK_PRIORITY if bulk else 0,
                )  # fmt: skip
        for request_id, future in list(self.calibration_futures.items()):
            if future.done():  # finished, or broke before finishing: then submitted again
                del self.calibration_futures[request_id]
                self.calibration_generations[request_id] = (
                    self.calibration_generations.get(request_id, 0) + 1
                )
                if future.status == "finished" and future.result() == "completed":
                    self.calibration_fits_stored += 1
                elif future.status == "error":
                    self._record_calibration_failure(session, request_id, future.exception())
                future.release()

    def _record_calibration_failure(
        self, session: Session, request_id: int, reason: object
    ) -> None:
        """A request whose task keeps breaking (its worker killed, the task itself broken)
        fails after ``MAX_TASK_FAILURES``, with the reason: submitted again for ever, the
        ASVO jobs waiting for it (``waitcal``) never ended."""
        if not _given_up(self.calibration_failures, request_id, "calibration request", reason):
            return
        # Claimed first, as a job's run claims its job (pipeline._Tracker.move): an UPDATE
        # that matches only an unfinished request takes its row (PostgreSQL's row lock,
        # SQLite's write lock) and waits for a run finishing it at this moment. A read
        # first (the request as this step loaded it, or a read racing that run's commit)
        # set a request that had just got its fit in error too.
        claim = session.execute(
            update(CalibrationRequest)
            .where(
                CalibrationRequest.id == request_id,
                CalibrationRequest.calibration_completed_datetime.is_(None),
                CalibrationRequest.calibration_error_datetime.is_(None),
            )
            .values(calibration_error_datetime=None)
        )
        if claim.rowcount == 0:  # type: ignore[attr-defined]
            session.rollback()  # finished meanwhile (or gone): as its run left it
            return
        request = session.get(CalibrationRequest, request_id, populate_existing=True)
        assert request is not None  # the claim matched it, and holds it
        finish_request(session, request, error=f"internal error: {reason}")
        session.commit()

    def _record_failure(self, session: Session, job_id: int, reason: object) -> None:
        """Count a broken task of a job; at ``MAX_TASK_FAILURES`` give the job up as an error.

        Unless it was cancelled or ended meanwhile: the state is written by the runs' own
        claim (``pipeline._Tracker.move``), an UPDATE that matches only an uncancelled,
        unfinished job, in its own transaction. The job as this step loaded it (``session``'s
        identity map) may be stale: written from it, a user's cancel committed since was
        overwritten with ``error``.
        """
        if not _given_up(self.failures, job_id, "ASVO job", reason):
            return
        # Cancelled, ended by another run, or gone: its state stays as it is.
        with contextlib.suppress(JobCancelled, JobEndedElsewhere, JobFailed):
            _Tracker(self.session_factory, job_id).move(
                JobState.ERROR, error_code=1, error_text=f"internal error: {reason}",
                completed=utcnow(),
            )  # fmt: skip
        job = session.get(Job, job_id, populate_existing=True)
        if job is not None and job.state != JobState.COMPLETED.value:
            # Delivered, perhaps, before the run died: a product of a job given up or
            # cancelled is no one's (no run of it comes after this to remove it).
            remove_product(self.settings, job)
        # Runs that died (a worker killed for its memory, say) cleaned nothing up: their
        # attempt directories, conversion scratch included, would stay in work/ for good.
        shutil.rmtree(self.settings.work_dir / str(job_id), ignore_errors=True)

    def _expire(self, session: Session) -> None:
        """Completed jobs past their expiry lose their product and become ``expired``.

        Each is claimed by an UPDATE that matches it only while it is still completed and
        past its expiry (waiting for a transaction changing it at this moment), and loses
        its product only then: a job changed since it was read is left as it is now. The
        claim changes nothing; the state is written through the ORM, as every job write
        is, so that the stored get_jobs row and the change stamp the websocket reads
        follow it (written by the UPDATE, clients were shown the job completed for good).
        """
        now = utcnow()
        due = session.scalars(
            select(Job.id).where(Job.state == JobState.COMPLETED.value, Job.expires_at < now)
        ).all()
        for job_id in due:
            claim = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.state == JobState.COMPLETED.value,
                    Job.expires_at < now,
                )
                .values(state=JobState.COMPLETED.value)
            )
            if claim.rowcount == 0:  # type: ignore[attr-defined]
                continue
            job = session.get(Job, job_id, populate_existing=True)
            assert job is not None  # the claim matched it, and holds it
            job.state = JobState.EXPIRED.value
            session.flush()
            remove_product(self.settings, job)


def _given_up(failures: dict[int, int], key: int, what: str, reason: object) -> bool:
    """Count a failed task of ``what`` ``key`` in ``failures``; whether that makes
    ``MAX_TASK_FAILURES`` (then it is given up, with the reason)."""
    failures[key] = failures.get(key, 0) + 1
    log.warning("%s %d: task failed (%s)", what, key, reason)
    return failures[key] >= MAX_TASK_FAILURES
