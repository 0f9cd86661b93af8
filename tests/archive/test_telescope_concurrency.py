"""Two simulated telescopes (two job runners, a standby among them) on one database.

What a reviewer reproduced on PostgreSQL: both recorded one ended observation; the one whose
registration lost (a unique violation) removed the files at the paths the other had just
registered: catalogue rows without files. Now only the holder of the telescope's lock
records, and a recording that loses anyway never touches the other's files.
"""

from __future__ import annotations

import os
import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from observatory.archive import runner, simulated
from observatory.archive.models import Observation, ObservationFile
from observatory.archive.runner import TELESCOPE_LOCK, SingleRunnerLock, TelescopeRunner
from observatory.archive.service import ingest_directory, schedule_observation
from observatory.core.config import Settings
from observatory.core.gpstime import now_gps
from observatory.core.storage import Storage, sha1_of_file
from observatory.telescope.simulator import simulate_observation
from servers import wait_until
from threads import in_thread

OBSID = 1480000000
#: Long enough for anything these tests wait for; never reached when the code is right.
JOIN_S = 60.0


def no_dumps(session: Session) -> dict[int, list[tuple[float, float]]]:
    return {}


def _scheduled(session_factory: sessionmaker[Session], start: int, duration_s: int = 8) -> None:
    with session_factory() as session:
        schedule_observation(
            session, start_gps=start, duration_s=duration_s, mode="MWAX_CORRELATOR",
            coarse_chans=[133], project_id="D0000", obsname="by hand", now_gps_s=start - 100,
        )  # fmt: skip
        session.commit()


def _registered_files_on_disk(
    settings: Settings, session_factory: sessionmaker[Session], obsid: int
) -> list[tuple[str, bool]]:
    """Each registered file of ``obsid``, and whether the archive holds it as registered."""
    storage = Storage(settings.archive_dir)
    with session_factory() as session:
        rows = session.scalars(
            select(ObservationFile)
            .where(ObservationFile.obsid == obsid)
            .order_by(ObservationFile.name)
        ).all()
        return [
            (
                row.name,
                storage.exists(row.storage_key)
                and sha1_of_file(storage.local_path(row.storage_key)) == row.sha1,
            )
            for row in rows
        ]


def test_two_recordings_of_one_observation_at_once_leave_one_whole_recording(
    settings: Settings, session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both simulate before either registers (as two telescopes polling together do); the
    loser's failed registration must not remove what the winner registered."""
    _scheduled(session_factory, OBSID)
    settings = settings.model_copy(update={"telescope_tiles": 4})
    both_simulated = threading.Barrier(2, timeout=JOIN_S)
    real = simulated.simulate_observation

    def simulate_then_wait(*args: Any, **kwargs: Any) -> Any:
        try:
            result = real(*args, **kwargs)
        except BaseException:
            both_simulated.abort()
            raise
        both_simulated.wait()
        return result

    monkeypatch.setattr(simulated, "simulate_observation", simulate_then_wait)
    observe = partial(runner.observe_due, session_factory, settings, buffer_dumps=no_dumps,
                      now=OBSID + 100)  # fmt: skip
    recordings = [in_thread(observe), in_thread(observe)]
    for thread, _ in recordings:
        thread.join(JOIN_S)
    outcomes = [outcome for _, outcome in recordings]
    assert sorted(outcomes, key=lambda outcome: str(outcome[0])) == [[[OBSID]], [[]]], outcomes
    files = _registered_files_on_disk(settings, session_factory, OBSID)
    assert files and all(whole for _, whole in files), files
    archive = Path(settings.archive_dir)
    assert sorted(p.name for p in (archive / str(OBSID)).iterdir()) == [name for name, _ in files]
    assert list(archive.glob(".*")) == []  # no staging directory left
    # The loser did not take the winner's recording for a failure of its own.
    assert OBSID not in runner._SKIPPED[settings.resolved_database_url]


def test_a_failed_registration_removes_only_the_files_it_moved_into_the_archive(
    settings: Settings, session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file at a recording's path that the recording did not write (another's) stays."""
    _scheduled(session_factory, OBSID)
    settings = settings.model_copy(update={"telescope_tiles": 4})
    real = simulated.ingest_directory
    theirs = Path(settings.archive_dir) / str(OBSID) / f"{OBSID}_truth.json"

    def register_then_fail(session: Session, storage: Storage, directory: Path, **kw: Any) -> Any:
        real(session, storage, directory, **kw)
        # Another run's file replaces one of this run's (as a file is put in place: written
        # under another name, then renamed) before this one fails.
        written = theirs.with_name(f".{theirs.name}.theirs")
        written.write_text("{}")
        os.replace(written, theirs)
        raise RuntimeError("the database refused the registration")

    monkeypatch.setattr(simulated, "ingest_directory", register_then_fail)
    assert (
        runner.observe_due(session_factory, settings, buffer_dumps=no_dumps, now=OBSID + 100) == []
    )
    assert [p.name for p in theirs.parent.iterdir()] == [theirs.name]
    assert list(Path(settings.archive_dir).glob(".*")) == []


class _CountingEvent(threading.Event):
    """A runner's stop event that counts the turns of its loop (one ``wait`` per turn)."""

    def __init__(self) -> None:
        super().__init__()
        self.turns = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.turns += 1
        return super().wait(timeout)


def test_only_one_of_two_telescopes_on_one_database_records(
    settings: Settings, session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second job runner (a standby) polled the same schedule and recorded the observation
    the first was recording. Now it waits for the first's lock, and takes over when it stops."""
    start = now_gps() // 8 * 8 - 800
    _scheduled(session_factory, start)
    settings = settings.model_copy(update={"telescope_tiles": 4})
    first = TelescopeRunner(settings, session_factory, no_dumps, poll_s=0.05)
    second = TelescopeRunner(settings, session_factory, no_dumps, poll_s=0.05)
    second._stop = turns_of_second = _CountingEvent()
    recording = threading.Event()
    simulations: list[int] = []
    real = simulated.simulate_observation

    def simulate(out_dir: Any, obsid: int, **kwargs: Any) -> Any:
        simulations.append(obsid)
        if len(simulations) == 1:  # the first runner's: until the second has polled a while
            recording.set()
            turns = turns_of_second.turns
            wait_until(lambda: turns_of_second.turns >= turns + 3, JOIN_S,
                       "the second telescope to poll while the first records")  # fmt: skip
        return real(out_dir, obsid, **kwargs)

    monkeypatch.setattr(simulated, "simulate_observation", simulate)
    try:
        first.start()
        assert recording.wait(JOIN_S), "the first telescope never began recording"
        second.start()
        wait_until(lambda: _registered_files_on_disk(settings, session_factory, start), JOIN_S,
                   "the recording")  # fmt: skip
        assert simulations == [start]
        assert not first.standby and second.standby
        first.stop()
        # The standby takes over within a few polls of the first one's stop.
        wait_until(lambda: not second.standby, JOIN_S, "the second telescope to take over")
    finally:
        first.stop()
        second.stop()
    assert simulations == [start]
    files = _registered_files_on_disk(settings, session_factory, start)
    assert files and all(whole for _, whole in files), files


def test_the_telescope_and_the_dispatcher_each_hold_their_own_lock(settings: Settings) -> None:
    """Both run in the job runner's process: two holders of one lock there would exclude each
    other. The dispatcher's lock keeps the key (or file) it always had."""
    from sqlalchemy import text

    from observatory.asvo.dispatcher import DispatcherLock
    from observatory.core.database import make_engine

    url = settings.resolved_database_url
    dispatcher, telescope = DispatcherLock(url), SingleRunnerLock(url, TELESCOPE_LOCK, "telescope")
    other = SingleRunnerLock(url, TELESCOPE_LOCK, "another telescope")
    try:
        assert dispatcher.acquire() and telescope.acquire()
        assert not other.acquire()
        telescope.release()
        assert other.acquire()
        engine = make_engine(url)
        try:
            if engine.dialect.name == "postgresql":
                with engine.connect() as connection:  # an earlier version's dispatcher
                    assert not connection.execute(text(
                        "SELECT pg_try_advisory_lock(hashtextextended('observatory.asvo.dispatcher:'"
                        " || current_database() || ':' || current_schema(), 0))"
                    )).scalar_one()  # fmt: skip
            else:
                database = Path(engine.url.database or "")
                assert database.with_name(f"{database.name}.dispatcher-lock").exists()
        finally:
            engine.dispose()
    finally:
        for lock in (dispatcher, telescope, other):
            lock.release()


def test_an_ingest_of_the_archive_skips_a_recording_being_staged(
    settings: Settings, session: Session
) -> None:
    """A staging directory (hidden) inside the directory ingested is not registered from."""
    staged = Path(settings.archive_dir) / f".{OBSID}.staging-somehost-1-abcd"
    simulate_observation(staged, OBSID, n_tiles=4, coarse_chans=(133,), n_timesteps=1)
    report = ingest_directory(session, Storage(settings.archive_dir), Path(settings.archive_dir))
    assert report.observations_added == [] and report.files_added == []
    assert session.get(Observation, OBSID) is None
