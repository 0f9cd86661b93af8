"""The dispatcher under restarts, outages and a second runner: one run per job, and it recovers.

What an operator reproduced: a job run twice at once (a restarted or second job runner)
failed both runs; after a scheduler outage the runner never reconnected; a scheduler
without workers looked ready; an outage logged a traceback five times a second.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from observatory.archive.simulated import simulate_and_register
from observatory.asvo.dispatcher import Dispatcher, job_task_key
from observatory.asvo.models import Job, JobType
from observatory.asvo.pipeline import run_job
from observatory.asvo.service import submit_job
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from observatory.telescope.simulator import PointSource, _zenith_radec_deg
from servers import dask_scheduler, dask_worker, free_port, wait_until
from threads import in_thread

CORR_OBS = 1320409688  # the real MWAX mini file (seed_archive)
VCS_OBS = 1320416040
BIG_OBS = 1320419640  # simulated: big enough that preprocessing takes a few seconds
BIN = Path(sys.executable).parent


class RecordingClient:
    """Stands in for a connected Dask client: records the keys submitted."""

    status = "running"

    def __init__(self) -> None:
        self.keys: list[str] = []

    def submit(self, _function: Any, _settings: Any, _job_id: int, **options: Any) -> Any:
        self.keys.append(options["key"])
        return _Pending()


class _Pending:
    def done(self) -> bool:
        return False


@pytest.fixture
def seeded(seed_archive: Callable[[int, Mapping[str, str]], Settings]) -> Settings:
    return seed_archive(VCS_OBS, {"carol": "dispatcher-test-key"})


@pytest.fixture
def factory(seeded: Settings) -> Any:
    engine = make_engine(seeded.resolved_database_url)
    yield make_session_factory(engine)
    engine.dispose()


def queue_job(
    factory: sessionmaker[Session], settings: Settings, job_type: JobType, form: dict[str, str]
) -> int:
    with factory() as session:
        job = submit_job(session, settings, 1, job_type, form)
        session.commit()
        return job.id


def job_state(factory: sessionmaker[Session], job_id: int) -> str:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state


def test_only_one_dispatcher_per_database_submits_jobs(
    seeded: Settings, factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    job_id = queue_job(factory, seeded, JobType.DOWNLOAD_VISIBILITIES,
                       {"obs_id": str(CORR_OBS), "download_type": "vis"})  # fmt: skip
    first, second = Dispatcher(seeded, factory), Dispatcher(seeded, factory)
    first._client, second._client = RecordingClient(), RecordingClient()
    try:
        first.tick()
        with caplog.at_level(logging.WARNING, logger="observatory.asvo.dispatcher"):
            second.tick()
            second.tick()
        assert first._client.keys == [job_task_key(job_id)]
        assert second._client.keys == [] and second.standby
        waiting = [r for r in caplog.records if "another dispatcher holds" in r.getMessage()]
        assert len(waiting) == 1  # said once, clearly
        # The first one stops (its process ends): the second takes over, under the same key,
        # so a Dask task still running from the first is the one it waits for.
        first.lock.release()
        second.tick()
        assert second._client.keys == [job_task_key(job_id)] and not second.standby
    finally:
        first.lock.release()
        second.lock.release()


def test_two_runs_of_one_job_at_once_complete_it_once(
    seeded: Settings, factory: sessionmaker[Session]
) -> None:
    # The old task of a restarted runner keeps running on its worker while the new
    # runner's task starts: before, each deleted the other's work files and both failed.
    with factory() as session:
        ra_deg, dec_deg = _zenith_radec_deg(BIG_OBS + 8.0)
        simulate_and_register(
            session, seeded, obsid=BIG_OBS, sources=[PointSource(ra_deg, dec_deg, 20.0)],
            n_tiles=48, coarse_chans=(133, 134, 135, 136), n_timesteps=16,
        )  # fmt: skip
        session.commit()
    job_id = queue_job(factory, seeded, JobType.CONVERSION, {"obs_id": str(BIG_OBS)})
    values = seeded.model_dump()
    results: dict[str, str | BaseException] = {}

    def run(name: str) -> None:
        try:
            results[name] = run_job(values, job_id)
        except BaseException as exc:  # reported below
            results[name] = exc

    old = threading.Thread(target=run, args=("old",))
    old.start()
    wait_until(lambda: job_state(factory, job_id) == "preprocessing" or not old.is_alive(),
               120, "the first run to preprocess")  # fmt: skip
    new = threading.Thread(target=run, args=("new",))
    new.start()
    old.join(300)
    new.join(300)
    assert results == {"old": "completed", "new": "completed"}
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == "completed" and job.error_text is None
        (product,) = job.product["files"] if job.product else [None]
    assert [p.name for p in (seeded.products_dir / str(job_id)).iterdir()] == [product["name"]]
    assert not (seeded.work_dir / str(job_id)).exists()


def test_a_job_that_fails_after_delivering_leaves_no_product(
    seeded: Settings, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The product was written, then recording the completion failed (the database went
    away, say): the job ended in error and its tar stayed on disk for good."""
    from observatory.asvo import pipeline
    from observatory.asvo.models import JobState

    job_id = queue_job(factory, seeded, JobType.DOWNLOAD_VISIBILITIES,
                       {"obs_id": str(CORR_OBS), "download_type": "vis"})  # fmt: skip
    move = pipeline._Tracker.move

    def completion_fails(self: Any, state: JobState, **fields: Any) -> None:
        if state == JobState.COMPLETED:
            assert list((seeded.products_dir / str(job_id)).iterdir())  # delivered by now
            raise RuntimeError("the database went away")
        move(self, state, **fields)

    monkeypatch.setattr(pipeline._Tracker, "move", completion_fails)
    assert run_job(seeded.model_dump(), job_id) == "error"
    assert job_state(factory, job_id) == "error"
    assert not (seeded.products_dir / str(job_id)).exists()


def test_a_job_cancelled_after_its_run_died_leaves_nothing(
    seeded: Settings, factory: sessionmaker[Session]
) -> None:
    """A run killed mid-job (out of memory, kill -9) left its scratch and product; the job
    was then cancelled, and the next run found it finished and left them for good."""
    from observatory.asvo.service import cancel_job

    job_id = queue_job(factory, seeded, JobType.DOWNLOAD_VISIBILITIES,
                       {"obs_id": str(CORR_OBS), "download_type": "vis"})  # fmt: skip
    scratch = seeded.work_dir / str(job_id) / "attempt-dead" / "x.ms"
    scratch.mkdir(parents=True)
    product = seeded.products_dir / str(job_id) / "x.tar"
    product.parent.mkdir(parents=True)
    product.write_bytes(b"half a tar")
    with factory() as session:
        cancel_job(session, 1, str(job_id))
        session.commit()
    assert run_job(seeded.model_dump(), job_id) == "cancelled"
    assert not (seeded.work_dir / str(job_id)).exists()
    assert not product.parent.exists()


def test_a_run_that_lost_its_lock_does_not_undo_what_another_run_finished(
    seeded: Settings, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose lock went with its PostgreSQL connection ran on beside the next run:
    its failure set the job the other had completed to error (and removed its product)."""
    from observatory.asvo import pipeline
    from observatory.asvo.models import JobState

    job_id = queue_job(factory, seeded, JobType.DOWNLOAD_VISIBILITIES,
                       {"obs_id": str(CORR_OBS), "download_type": "vis"})  # fmt: skip
    deliver = pipeline._deliver

    def completed_meanwhile_then_failing(*args: Any, **kwargs: Any) -> Any:
        delivered = deliver(*args, **kwargs)
        with factory() as session:  # the other run completes the job, with this product
            job = session.get(Job, job_id)
            assert job is not None
            job.state, job.product, job.product_location = "completed", delivered[0], delivered[1]
            session.commit()
        raise RuntimeError("this run's scratch was removed under it")

    monkeypatch.setattr(pipeline, "_deliver", completed_meanwhile_then_failing)
    assert run_job(seeded.model_dump(), job_id) == JobState.COMPLETED.value
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == "completed" and job.error_text is None
    assert list((seeded.products_dir / str(job_id)).iterdir())  # the product is kept


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # a lock SQLite cannot lose
def test_a_run_whose_lock_connection_is_cut_stops_without_writing(
    seeded: Settings, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its advisory lock went with its connection (a PostgreSQL restart, a cut link); the
    run went on unaware beside the next run, and their writes crossed."""
    from sqlalchemy import text

    from observatory.asvo import pipeline

    job_id = queue_job(factory, seeded, JobType.DOWNLOAD_VISIBILITIES,
                       {"obs_id": str(CORR_OBS), "download_type": "vis"})  # fmt: skip
    deliver = pipeline._deliver

    def delivered_then_lock_cut(*args: Any, **kwargs: Any) -> Any:
        delivered = deliver(*args, **kwargs)
        with factory() as session:  # the backend holding this job's advisory lock
            session.execute(text(
                "WITH k AS (SELECT hashtextextended(current_database() || ':' || "
                "current_schema() || ':' || :name, 0) AS key) "
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l, k "
                "WHERE l.locktype = 'advisory' AND l.objsubid = 1 "
                "AND l.classid::bigint = ((k.key >> 32) & 4294967295) "
                "AND l.objid::bigint = (k.key & 4294967295)"
            ), {"name": f"observatory.asvo.job:{job_id}"}).all()  # fmt: skip
        return delivered

    monkeypatch.setattr(pipeline, "_deliver", delivered_then_lock_cut)
    assert run_job(seeded.model_dump(), job_id) == "delivering"
    with factory() as session:  # left for the next run, which holds the lock
        job = session.get(Job, job_id)
        assert job is not None and job.state == "delivering" and job.error_text is None


def test_two_identical_submissions_at_once_queue_one_job(
    seeded: Settings, factory: sessionmaker[Session]
) -> None:
    """Both passed the duplicate check before either committed (PostgreSQL): two jobs of
    one request. Now the second waits for the first's commit, then is refused."""
    from observatory.asvo.service import AsvoError

    form = {"obs_id": str(CORR_OBS), "download_type": "vis"}
    first = factory()
    job = submit_job(first, seeded, 1, JobType.DOWNLOAD_VISIBILITIES, form)
    outcome: list[object] = []

    def second_submission() -> None:
        with factory() as session:
            try:
                submit_job(session, seeded, 1, JobType.DOWNLOAD_VISIBILITIES, form)
                session.commit()
                outcome.append("queued")
            except AsvoError as exc:
                outcome.append(exc)

    other = threading.Thread(target=second_submission)
    other.start()
    other.join(timeout=1.0)  # on PostgreSQL it waits for the first one's commit
    first.commit()
    first.close()
    other.join(timeout=30)
    assert not other.is_alive()
    (refused,) = outcome
    assert isinstance(refused, AsvoError) and refused.error_code == 2, refused
    assert refused.extra == {"job_id": job.id}


def test_an_outage_is_logged_once_and_retried_with_back_off(
    seeded: Settings, factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    # A database that cannot be reached (its directory does not exist).
    broken = make_engine(f"sqlite:///{seeded.data_dir / 'gone' / 'x.sqlite3'}")
    (seeded.data_dir / "gone").rmdir()
    dispatcher = Dispatcher(seeded, make_session_factory(broken), poll_s=0.2, max_backoff_s=30)
    dispatcher._client = RecordingClient()
    try:
        with caplog.at_level(logging.DEBUG, logger="observatory.asvo.dispatcher"):
            delays = [dispatcher.tick() for _ in range(25)]
            dispatcher.session_factory = factory  # the database is back
            recovered = dispatcher.tick()
    finally:
        dispatcher.lock.release()
        broken.dispose()
    assert delays == sorted(delays) and delays[0] > 0.2 and max(delays) == 30
    assert recovered == 0.2
    loud = [
        r
        for r in caplog.records
        if r.name == "observatory.asvo.dispatcher" and r.levelno >= logging.INFO
    ]
    assert [(r.levelname, r.exc_info is not None) for r in loud] == [
        ("ERROR", True),  # the outage starts: one line, one traceback
        ("WARNING", False),  # and ends
    ]
    assert "recovered after 25 failed steps" in loud[1].getMessage()


def test_readiness_names_a_scheduler_without_workers(tmp_path: Path) -> None:
    from distributed import LocalCluster

    cluster = LocalCluster(
        processes=False, n_workers=0, dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )  # fmt: skip
    settings = Settings(data_dir=tmp_path / "data", dask_scheduler=cluster.scheduler_address)
    dispatcher = Dispatcher(settings, make_session_factory(make_engine("sqlite://")))
    try:
        assert dispatcher.dask_status().startswith("unreachable")  # not connected yet
        dispatcher._connect()
        assert dispatcher.dask_status().startswith("no workers")
        cluster.scale(1)
        dispatcher.client.wait_for_workers(1, timeout=60)
        assert dispatcher.dask_status() == "ok"
    finally:
        if dispatcher.client is not None:
            dispatcher.client.close()
        cluster.close()


def test_the_dispatcher_reconnects_after_a_long_scheduler_outage(
    seeded: Settings, factory: sessionmaker[Session], tmp_path: Path
) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes = [
        dask_scheduler(port, tmp_path / "scheduler1.log"),
        dask_worker(address, tmp_path / "w1.log"),
    ]
    settings = seeded.model_copy(update={"dask_scheduler": address})
    # A client gives up on a lost scheduler after its timeout (30 s by default; 2 s here).
    dispatcher = Dispatcher(settings, factory, max_backoff_s=1, dask_connect_timeout_s=2)
    try:
        dispatcher.start()
        wait_until(lambda: dispatcher.client is not None and dispatcher.client.status == "running",
                   60, "the dispatcher to connect")  # fmt: skip
        first_client = dispatcher.client
        for process in processes:
            process.kill(signal.SIGKILL)
            process.stop()
        wait_until(lambda: first_client.status == "closed", 60, "the client to give up")
        processes = [dask_scheduler(port, tmp_path / "scheduler2.log"),
                     dask_worker(address, tmp_path / "w2.log")]  # fmt: skip
        job_id = queue_job(factory, settings, JobType.DOWNLOAD_VISIBILITIES,
                           {"obs_id": str(CORR_OBS), "download_type": "vis"})  # fmt: skip
        wait_until(
            lambda: job_state(factory, job_id) == "completed", 180, "the job after the outage"
        )
        assert dispatcher.client is not first_client and dispatcher.client.status == "running"
    finally:
        dispatcher.stop()
        for process in processes:
            process.stop()


def test_the_job_feed_sends_changes_stamped_by_a_worker_whose_clock_is_behind(
    seeded: Settings, factory: sessionmaker[Session]
) -> None:
    """``updated`` is stamped by the process that commits, a worker on another node: one
    whose clock was more than a second behind the server's had its change never sent."""
    from datetime import timedelta

    from sqlalchemy import update

    from observatory.asvo.service import JobWatch, changed_rows
    from observatory.core.database import utcnow

    job_id = queue_job(factory, seeded, JobType.DOWNLOAD_VISIBILITIES,
                       {"obs_id": str(CORR_OBS), "download_type": "vis"})  # fmt: skip
    watch = JobWatch()

    def worker_moves(state: str, behind: timedelta) -> list[tuple[str, str]]:
        with factory() as session:
            session.execute(
                update(Job).where(Job.id == job_id).values(state=state, updated=utcnow() - behind)
            )
            session.commit()
        return [(f["action"], f["row"]["job_state"]) for f in changed_rows(factory, 1, watch)]

    assert [(f["action"], f["row"]["id"]) for f in changed_rows(factory, 1, watch)] == [
        ("INSERT", job_id)
    ]
    assert worker_moves("staging", timedelta(seconds=5)) == [("UPDATE", "staging")]
    assert worker_moves("staging", timedelta(0)) == []  # read again, not sent again
    # Far behind: the next look that reads every job sends it.
    assert worker_moves("staged", timedelta(minutes=5)) == []
    watch.next_full_look = 0.0
    assert [(f["action"], f["row"]["job_state"]) for f in changed_rows(factory, 1, watch)] == [
        ("UPDATE", "staged")
    ]
    assert changed_rows(factory, 1, watch) == []


# ----------------------------------------------------------------------------------------------
# The dispatcher's own writes against a user's (or a run's) committed meanwhile: what a
# reviewer reproduced on PostgreSQL was a cancel overwritten by the give-up of a broken task.

#: Long enough for anything these tests wait for; never reached when the code is right.
JOIN_S = 60.0


class _BrokenTask:
    """A Dask future whose task broke; reading why (``exception``) first runs ``meanwhile``
    (once per client): what another process commits between the step's read of the jobs and
    its write."""

    status = "error"

    def __init__(self, meanwhile: Callable[[], None]) -> None:
        self.meanwhile = meanwhile

    def done(self) -> bool:
        return True

    def exception(self) -> BaseException:
        self.meanwhile()  # (its client's: once)
        return RuntimeError("KilledWorker: the worker died three times")

    def release(self) -> None:
        pass


class _BrokenTasksClient(RecordingClient):
    def __init__(self, meanwhile: Callable[[], None]) -> None:
        super().__init__()
        self.pending: list[Callable[[], None]] = [meanwhile]

    def meanwhile(self) -> None:
        while self.pending:
            self.pending.pop()()

    def submit(self, _function: Any, _settings: Any, _job_id: int, **options: Any) -> Any:
        self.keys.append(options["key"])
        return _BrokenTask(self.meanwhile)


def test_a_cancel_committed_while_the_dispatcher_gives_the_job_up_stays_cancelled(
    seeded: Settings, factory: sessionmaker[Session]
) -> None:
    """The step read the job (queued), the user cancelled it, then the job's task broke a
    third time: the give-up wrote ``error`` over the cancel from the job the step had read."""
    from observatory.asvo.dispatcher import MAX_TASK_FAILURES
    from observatory.asvo.service import cancel_job

    job_id = queue_job(factory, seeded, JobType.DOWNLOAD_VISIBILITIES,
                       {"obs_id": str(CORR_OBS), "download_type": "vis"})  # fmt: skip
    product = seeded.products_dir / str(job_id) / "x.tar"  # delivered before its run died
    product.parent.mkdir(parents=True)
    product.write_bytes(b"a tar no one will download")

    def user_cancels() -> None:
        with factory() as session:  # GET /api/cancel_job on a web worker
            cancel_job(session, 1, str(job_id))
            session.commit()

    dispatcher = Dispatcher(seeded, factory)
    dispatcher._client = _BrokenTasksClient(user_cancels)
    dispatcher.failures[job_id] = MAX_TASK_FAILURES - 1
    try:
        dispatcher.step()
    finally:
        dispatcher.lock.release()
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.cancel_requested, job.error_text) == ("cancelled", True, None)
    assert not product.parent.exists()  # a cancelled job's product is no one's


def test_a_cancel_in_flight_while_the_dispatcher_gives_the_job_up_wins(
    seeded: Settings, factory: sessionmaker[Session]
) -> None:
    """The cancel's transaction has changed the row and not yet committed when the give-up
    writes: the give-up waits for it, then finds the job cancelled."""
    from observatory.asvo.dispatcher import MAX_TASK_FAILURES
    from observatory.asvo.service import cancel_job

    job_id = queue_job(factory, seeded, JobType.DOWNLOAD_VISIBILITIES,
                       {"obs_id": str(CORR_OBS), "download_type": "vis"})  # fmt: skip
    dispatcher = Dispatcher(seeded, factory)
    dispatcher.failures[job_id] = MAX_TASK_FAILURES - 1
    web = factory()
    step = factory()
    try:
        step.get(Job, job_id)  # the step's read: the job, queued
        cancel_job(web, 1, str(job_id))
        web.flush()  # the row is the cancel's until it commits

        def give_up() -> None:
            dispatcher._record_failure(step, job_id, "KilledWorker")
            step.commit()

        thread, outcome = in_thread(give_up)
        thread.join(1.0)  # (lets a give-up that does not wait write before the commit)
        web.commit()
        thread.join(JOIN_S)
        assert outcome == [None]
    finally:
        web.close()
        step.close()
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.state, job.error_text) == ("cancelled", None)


def test_a_calibration_request_fitted_while_the_dispatcher_gives_it_up_keeps_its_fit(
    seeded: Settings, factory: sessionmaker[Session]
) -> None:
    """The run of a request's calibrator stores its fit (finishing every joined request)
    as the dispatcher gives the request up after its own task broke three times: the request
    ended with both its fit and an error, and its callback said it had failed."""
    from datetime import UTC, datetime

    from observatory.asvo.dispatcher import MAX_TASK_FAILURES
    from observatory.calib.models import CalibrationRequest

    with factory() as session:
        request = CalibrationRequest(cal_id=CORR_OBS, target_obs_id=CORR_OBS)
        session.add(request)
        session.commit()
        request_id = request.id
    dispatcher = Dispatcher(seeded, factory)
    dispatcher.calibration_failures[request_id] = MAX_TASK_FAILURES - 1
    run = factory()
    step = factory()
    try:
        step.get(CalibrationRequest, request_id)  # read by the step, unfinished
        fitted = run.get(CalibrationRequest, request_id)
        assert fitted is not None
        fitted.calibration_completed_datetime, fitted.calibration_fit_id = datetime.now(UTC), 7
        run.flush()  # the run's commit is on its way

        thread, outcome = in_thread(
            lambda: dispatcher._record_calibration_failure(step, request_id, "KilledWorker")
        )
        thread.join(1.0)  # (lets a give-up that does not wait write before the commit)
        run.commit()
        thread.join(JOIN_S)
        assert outcome == [None]
    finally:
        run.close()
        step.close()
    with factory() as session:
        request = session.get(CalibrationRequest, request_id)
        assert request is not None and request.calibration_fit_id == 7
        assert request.calibration_completed_datetime is not None
        assert (request.calibration_error_datetime, request.calibration_error_message) == (
            None,
            None,
        )


def test_a_broken_calibration_request_is_still_given_up(
    seeded: Settings, factory: sessionmaker[Session]
) -> None:
    from observatory.asvo.dispatcher import MAX_TASK_FAILURES
    from observatory.calib.models import CalibrationRequest

    with factory() as session:
        request = CalibrationRequest(cal_id=CORR_OBS, target_obs_id=CORR_OBS)
        session.add(request)
        session.commit()
        request_id = request.id
    dispatcher = Dispatcher(seeded, factory)
    with factory() as session:
        for _ in range(MAX_TASK_FAILURES):
            dispatcher._record_calibration_failure(session, request_id, "KilledWorker")
    with factory() as session:
        request = session.get(CalibrationRequest, request_id)
        assert request is not None and request.calibration_completed_datetime is None
        assert request.calibration_error_message == "internal error: KilledWorker"


def test_a_job_changed_while_the_dispatcher_expires_it_is_left_as_changed(
    seeded: Settings, factory: sessionmaker[Session]
) -> None:
    """``_expire`` read the completed jobs past their expiry and wrote ``expired`` (and removed
    the product) whatever had been committed since: here the product's life is extended."""
    from datetime import timedelta

    from observatory.asvo.models import JobState
    from observatory.core.database import utcnow

    job_id = queue_job(factory, seeded, JobType.DOWNLOAD_VISIBILITIES,
                       {"obs_id": str(CORR_OBS), "download_type": "vis"})  # fmt: skip
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.expires_at = JobState.COMPLETED.value, utcnow() - timedelta(hours=1)
        job.product = {"files": []}
        session.commit()
    product = seeded.products_dir / str(job_id) / "x.tar"
    product.parent.mkdir(parents=True)
    product.write_bytes(b"a product kept for another week")
    dispatcher = Dispatcher(seeded, factory)
    extend = factory()
    step = factory()
    try:
        extended = extend.get(Job, job_id)
        assert extended is not None
        extended.expires_at = utcnow() + timedelta(days=7)
        extend.flush()  # committed once the dispatcher has read the job as due

        def expire() -> None:
            dispatcher._expire(step)
            step.commit()

        thread, outcome = in_thread(expire)
        thread.join(1.0)  # (lets an expiry that does not wait write before the commit)
        extend.commit()
        thread.join(JOIN_S)
        assert outcome == [None]
    finally:
        extend.close()
        step.close()
    assert job_state(factory, job_id) == "completed"
    assert product.exists()
    # Past its (new) expiry it does expire, product and all.
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
    with factory() as session:
        dispatcher._expire(session)
        session.commit()
    assert job_state(factory, job_id) == "expired"
    assert not product.parent.exists()
