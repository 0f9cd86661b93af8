"""An ``apply_di_cal`` job follows only the calibration request it filed itself.

``add_cal_request`` takes an ``asvo_job_id`` from anyone (the MWA's service does, and only
echoes it in the callback). A job in ``waitcal`` took the newest request carrying its id for
its own: anyone could file one for another calibrator and make the job fail ("the
calibration fit of observation X finished but does not apply to this observation").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from backends import sqlite_only
from observatory.app import create_app
from observatory.archive.models import FileKind, Observation, ObservationFile
from observatory.archive.simulated import catalogue_point_source, simulate_and_register
from observatory.asvo.models import Job, JobType
from observatory.asvo.service import submit_job
from observatory.calib.models import CalibrationRequest
from observatory.calib.requests import finish_request
from observatory.core.accounts import create_user
from observatory.core.config import Settings
from observatory.telescope.simulator import PointSource
from observatory.trigger import pointing

TARGET = 1_400_000_000
#: The target's calibrator: the one its job files a request for.
CALIBRATOR = TARGET + 600
#: Another calibrator observation, days away: the one the other party files for.
OTHER = TARGET + 200_000
CHANS = list(range(109, 133))


def _add_observation(session: Session, obsid: int, *, calibration: bool) -> None:
    """A schedule row with a (placeholder) correlator file in the archive's catalogue."""
    session.add(Observation(
        obsid=obsid, stoptime=obsid + 120, mode="MWAX_CORRELATOR", coarse_chans=CHANS,
        calibration=calibration, atten_db=1.0, calibrator_source="HydA" if calibration else None,
    ))  # fmt: skip
    session.add(ObservationFile(
        obsid=obsid, name=f"{obsid}_ch109_000.fits", kind=FileKind.MWAX_VIS, size_bytes=1,
        sha1="0" * 40, storage_key=f"{obsid}/{obsid}_ch109_000.fits",
    ))  # fmt: skip


@pytest.fixture
def job_id(settings: Settings, session_factory: sessionmaker[Session]) -> int:
    """A queued conversion of TARGET with ``apply_di_cal``; TARGET has a calibrator in range."""
    with session_factory() as session:
        for obsid, calibration in ((TARGET, False), (CALIBRATOR, True), (OTHER, True)):
            _add_observation(session, obsid, calibration=calibration)
        user, _key = create_user(session, "victim")
        job = submit_job(session, settings, user.id, JobType.CONVERSION,
                         {"obs_id": str(TARGET), "apply_di_cal": "true", "no_rfi": "true"})  # fmt: skip
        session.commit()
        return job.id


@pytest.fixture
def anonymous(settings: Settings) -> Iterator[TestClient]:
    """A client of the web services with no login (no jobs run)."""
    with TestClient(create_app(settings)) as client:
        yield client


def file_for_another_calibrator(
    client: TestClient, session_factory: sessionmaker[Session], job_id: int
) -> CalibrationRequest:
    """Anyone's ``add_cal_request`` for OTHER naming the job (accepted: the id is a label)."""
    reply = client.get(
        "/calib/add_cal_request",
        params={"obs_id": OTHER, "max_time_separation": 0, "asvo_job_id": job_id},
    )
    assert reply.status_code == 200, reply.text
    with session_factory() as session:
        request = session.scalars(
            select(CalibrationRequest).order_by(CalibrationRequest.id.desc()).limit(1)
        ).one()
        assert (request.cal_id, request.asvo_job_id) == (OTHER, job_id)
        return request


def finish(
    session_factory: sessionmaker[Session], request_id: int, *, error: str | None = None
) -> None:
    with session_factory() as session:
        request = session.get(CalibrationRequest, request_id)
        assert request is not None
        if error is None:
            finish_request(session, request, fit_id=1_700_000_000_000_000)
        else:
            finish_request(session, request, error=error)
        session.commit()


def test_requests_filed_by_others_naming_the_job_do_not_decide_its_outcome(
    settings: Settings,
    session_factory: sessionmaker[Session],
    anonymous: TestClient,
    job_id: int,
) -> None:
    """Before the job first runs, someone files (and sees finished) a request for another
    calibrator naming the job: the job failed at once. Now it files its own and waits for it;
    another such request filed later neither ends its wait nor fails it; its own request's
    failure does."""
    from observatory.asvo import pipeline

    early = file_for_another_calibrator(anonymous, session_factory, job_id)
    finish(session_factory, early.id)  # "finished but does not apply", for the old code
    assert pipeline.run_job(settings.model_dump(), job_id) == "waitcal"
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.error_text is None
        own_id = job.params[pipeline.CALIBRATION_REQUEST_PARAM]
        own = session.get(CalibrationRequest, own_id)
        assert own is not None and own.id != early.id
        assert (own.cal_id, own.target_obs_id, own.asvo_job_id) == (CALIBRATOR, TARGET, job_id)
        assert pipeline.calibration_pending(session, settings, job_id)
    # The newest request carrying the job's id, finished: the job still waits for its own.
    late = file_for_another_calibrator(anonymous, session_factory, job_id)
    finish(session_factory, late.id, error="someone else's fit failed")
    with session_factory() as session:
        assert pipeline.calibration_pending(session, settings, job_id)
    assert pipeline.run_job(settings.model_dump(), job_id) == "waitcal"  # no second request
    with session_factory() as session:
        mine = session.scalars(
            select(CalibrationRequest.id).where(CalibrationRequest.cal_id == CALIBRATOR)
        ).all()
        assert mine == [own_id]
    # Its own request's outcome is the one that counts.
    finish(session_factory, own_id, error="the solve died")
    with session_factory() as session:
        assert not pipeline.calibration_pending(session, settings, job_id)
    assert pipeline.run_job(settings.model_dump(), job_id) == "error"
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.error_text is not None
        assert f"calibration fit of observation {CALIBRATOR} failed" in job.error_text
        assert "the solve died" in job.error_text


def test_a_request_id_in_the_job_that_names_another_job_is_not_its_own(
    settings: Settings,
    session_factory: sessionmaker[Session],
    anonymous: TestClient,
    job_id: int,
) -> None:
    """The recorded id must name a request filed for this job: any other is ignored."""
    from observatory.asvo import pipeline

    with session_factory() as session:
        stranger = CalibrationRequest(cal_id=OTHER, target_obs_id=OTHER, asvo_job_id=None,
                                      calibration_error_datetime=datetime.now(UTC),
                                      calibration_error_message="not this job's")  # fmt: skip
        session.add(stranger)
        session.flush()
        job = session.get(Job, job_id)
        assert job is not None
        job.params = {**job.params, pipeline.CALIBRATION_REQUEST_PARAM: stranger.id}
        session.commit()
    assert pipeline.run_job(settings.model_dump(), job_id) == "waitcal"
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        own = session.get(CalibrationRequest, job.params[pipeline.CALIBRATION_REQUEST_PARAM])
        assert own is not None and (own.cal_id, own.asvo_job_id) == (CALIBRATOR, job_id)


CAL_OBS = 1_450_324_816  # 2025-12-21 04:00 UTC: 3C353 is 60 deg up (as tests/calib)


@sqlite_only
def test_a_job_completes_with_its_own_calibrator_s_fit_whatever_others_file(
    settings: Settings, session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end on the dispatcher: a request for another calibrator naming the job, filed
    anonymously before the job runs, failed the job when its fit failed. The job now fits its
    own calibrator, waits, and completes with that fit."""
    # The job's own request is what is tested: the dispatcher's automatic request for the
    # calibrator would otherwise fit it before the job asks.
    monkeypatch.setattr("observatory.asvo.dispatcher.request_unfitted_calibrators", lambda _s: [])
    from observatory.asvo import pipeline

    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    target, other = CAL_OBS + 600, CAL_OBS + 200_000
    chans = tuple(range(109, 133))
    with session_factory() as session:
        simulate_and_register(session, settings, obsid=CAL_OBS, sources=[catalogue_point_source(best[0].name)],
                              n_tiles=8, coarse_chans=chans, fine_chan_khz=40.0, int_time_s=2.0, n_timesteps=2,
                              calibrator=best[0].name)  # fmt: skip
        simulate_and_register(session, settings, obsid=target, sources=[PointSource(best[0].ra_deg, best[0].dec_deg, 50.0)],
                              n_tiles=8, coarse_chans=chans, fine_chan_khz=40.0, int_time_s=2.0, n_timesteps=2)  # fmt: skip
        recorded = session.get(Observation, CAL_OBS)
        assert recorded is not None
        # Another calibrator observation, whose fit fails (its data file is not really there).
        session.add(Observation(
            obsid=other, stoptime=other + 120, mode="MWAX_CORRELATOR", coarse_chans=list(chans),
            calibration=True, atten_db=recorded.atten_db, calibrator_source=best[0].name,
        ))  # fmt: skip
        session.add(ObservationFile(
            obsid=other, name=f"{other}_ch109_000.fits", kind=FileKind.MWAX_VIS, size_bytes=1,
            sha1="0" * 40, storage_key=f"{other}/{other}_ch109_000.fits",
        ))  # fmt: skip
        user, _key = create_user(session, "victim")
        job = submit_job(session, settings, user.id, JobType.CONVERSION,
                         {"obs_id": str(target), "apply_di_cal": "true", "no_rfi": "true",
                          "output": "uvfits"})  # fmt: skip
        session.commit()
        job_id = job.id
    with TestClient(create_app(settings)) as anonymous:
        reply = anonymous.get(
            "/calib/add_cal_request",
            params={"obs_id": other, "max_time_separation": 0, "asvo_job_id": job_id},
        )
        assert reply.status_code == 200, reply.text
    states: list[str] = []
    with TestClient(create_app(settings, run_jobs=True)):
        deadline = time.monotonic() + 240
        while not states or states[-1] not in ("completed", "error"):
            assert time.monotonic() < deadline, states
            with session_factory() as session:
                row = session.get(Job, job_id)
                assert row is not None
                if not states or states[-1] != row.state:
                    states.append(row.state)
                error_text = row.error_text
            time.sleep(0.1)
    assert states[-1] == "completed", (states, error_text)
    assert "waitcal" in states
    with session_factory() as session:
        row = session.get(Job, job_id)
        assert row is not None
        own = session.get(CalibrationRequest, row.params[pipeline.CALIBRATION_REQUEST_PARAM])
        assert own is not None and own.asvo_job_id == job_id and own.cal_id == CAL_OBS
        assert own.calibration_fit_id is not None
        # The conversion applied the fit of its own calibrator: the one chosen for the target.
        from observatory.calib.service import best_fit

        _, fit = best_fit(session, target, settings=settings)
        assert (fit.obsid, fit.fitid) == (CAL_OBS, own.calibration_fit_id)
        others = session.scalars(
            select(CalibrationRequest).where(CalibrationRequest.cal_id == other)
        ).all()
        assert [r.asvo_job_id for r in others] == [job_id]
