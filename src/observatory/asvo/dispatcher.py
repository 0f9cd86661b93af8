"""The dispatcher: hands queued jobs (and calibration fit requests) to Dask, cancels, expires, resumes.

One dispatcher runs beside the web server (``observatory serve``). It keeps no
state of its own that matters: every loop reads the jobs table, so after a crash
or restart it simply finds the jobs that are not finished and runs them again
(their stages are idempotent).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from observatory.asvo.models import TERMINAL_STATES, Job, JobState
from observatory.asvo.pipeline import calibration_pending, remove_product, run_job
from observatory.calib.models import CalibrationRequest
from observatory.calib.pipeline import run_request
from observatory.core.config import Settings
from observatory.core.database import utcnow

log = logging.getLogger(__name__)

#: Broken tasks (beyond Dask's own retries) before a job is given up as an error.
MAX_TASK_FAILURES = 3


class Dispatcher:
    """Runs ASVO jobs on a Dask cluster (``OBSERVATORY_DASK_SCHEDULER``) or an in-process one."""

    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], poll_s: float = 0.2
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.poll_s = poll_s
        self.futures: dict[int, Any] = {}
        self.failures: dict[int, int] = {}
        self.calibration_futures: dict[int, Any] = {}
        #: Calibration requests seen finishing with a fit stored (the metric of that name).
        self.calibration_fits_stored = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._cluster: Any = None

    def start(self) -> None:
        """Connect to (or start) the Dask cluster and begin the loop in a thread."""
        from distributed import Client, LocalCluster

        if self.settings.dask_scheduler:
            self._client = Client(self.settings.dask_scheduler)
        else:
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
            self._client = Client(self._cluster)
        self._thread = threading.Thread(target=self._loop, name="asvo-dispatcher", daemon=True)
        self._thread.start()

    @property
    def client(self) -> Any:
        """The Dask client (None before ``start``); readiness checks ask its scheduler."""
        return self._client

    def stop(self) -> None:
        """Stop the loop and disconnect; running jobs resume at the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # the loop must survive a failed database round trip
                log.exception("ASVO dispatcher step failed")
            self._stop.wait(self.poll_s)

    def step(self) -> None:
        """One pass: submit new or orphaned jobs, cancel, reap finished futures, expire."""
        with self.session_factory() as session:
            unfinished = session.scalars(
                select(Job)
                .where(Job.state.not_in([s.value for s in TERMINAL_STATES]), Job.deleted.is_(False))
                .order_by(Job.priority.desc(), Job.id)
            ).all()
            for job in unfinished:
                if job.state == JobState.WAITCAL.value and calibration_pending(session, job.id):
                    continue  # resumed once its calibration request has finished
                if job.id not in self.futures:
                    self.futures[job.id] = self._client.submit(
                        run_job,
                        self.settings.model_dump(),
                        job.id,
                        key=f"asvo-job-{job.id}-{utcnow().timestamp()}",
                        priority=job.priority,
                        pure=False,
                        retries=2,
                    )
            active_ids = {job.id for job in unfinished}
            for job_id, future in list(self.futures.items()):
                if job_id not in active_ids:
                    # Cancelled (or finished): a queued task need not start at all.
                    if not future.done():
                        future.cancel()
                    del self.futures[job_id]
                elif future.done():
                    # The task ended without leaving the job finished (its worker died and
                    # Dask's retries ran out, or the task itself broke): run it again, a
                    # few times, then give the job up with the reason.
                    del self.futures[job_id]
                    if future.status == "error":
                        self._record_failure(session, job_id, future.exception())
            self._expire(session)
            session.commit()
            self._calibration_requests(session)

    def _calibration_requests(self, session: Session) -> None:
        """Submit calibration fit requests that have not finished (once each per process)."""
        pending = session.scalars(
            select(CalibrationRequest.id).where(
                CalibrationRequest.calibration_completed_datetime.is_(None),
                CalibrationRequest.calibration_error_datetime.is_(None),
            ).order_by(CalibrationRequest.bulk_request, CalibrationRequest.request_added_datetime)
        ).all()  # fmt: skip
        for request_id in pending:
            if request_id not in self.calibration_futures:
                self.calibration_futures[request_id] = self._client.submit(
                    run_request, self.settings.model_dump(), request_id,
                    key=f"calibration-request-{request_id}-{utcnow().timestamp()}", pure=False, retries=2,
                )  # fmt: skip
        for request_id, future in list(self.calibration_futures.items()):
            if future.done():  # finished, or broke before finishing: then submitted again
                del self.calibration_futures[request_id]
                if future.status == "finished" and future.result() == "completed":
                    self.calibration_fits_stored += 1

    def _record_failure(self, session: Session, job_id: int, reason: object) -> None:
        failures = self.failures.get(job_id, 0) + 1
        self.failures[job_id] = failures
        log.warning("ASVO job %d: task failed (%s)", job_id, reason)
        if failures < MAX_TASK_FAILURES:
            return
        job = session.get(Job, job_id)
        if job is not None and job.state not in TERMINAL_STATES:
            job.state = JobState.ERROR.value
            job.error_code = 1
            job.error_text = f"internal error: {reason}"
            job.completed = utcnow()

    def _expire(self, session: Session) -> None:
        """Completed jobs past their expiry lose their product and become ``expired``."""
        now = utcnow()
        due = session.scalars(
            select(Job).where(Job.state == JobState.COMPLETED.value, Job.expires_at < now)
        ).all()
        for job in due:
            remove_product(self.settings, job)
            job.state = JobState.EXPIRED.value
