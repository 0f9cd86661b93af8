"""Two runs of one fit request at once (a restarted dispatcher resubmits it): one fit, stored once.

Before the request had a lock, the second run saw the request unfinished while the
first was still fitting, fitted again, and stored a second fit.
"""

from __future__ import annotations

import logging
import threading

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from observatory.archive.simulated import catalogue_point_source, simulate_and_register
from observatory.calib import pipeline
from observatory.calib.models import CalibrationFit, CalibrationRequest
from observatory.core import locks
from observatory.core.config import Settings
from observatory.trigger import pointing
from servers import wait_until

CAL_OBS = 1_450_324_816  # 2025-12-21 04:00 UTC: 3C353 is 60 deg up


def test_two_runs_of_one_request_at_once_store_one_fit(
    settings: Settings,
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    with session_factory() as session:
        simulate_and_register(session, settings, obsid=CAL_OBS, sources=[catalogue_point_source(best[0].name)],
                              n_tiles=8, coarse_chans=tuple(range(109, 133)), fine_chan_khz=40.0, int_time_s=2.0,
                              n_timesteps=2, calibrator=best[0].name)  # fmt: skip
        request = CalibrationRequest(cal_id=CAL_OBS, target_obs_id=CAL_OBS + 600)
        session.add(request)
        session.commit()
        request_id = request.id
    monkeypatch.setattr(locks, "LOCK_POLL_S", 0.05)
    # The first run's fit is held open until the second run has started: the overlap of
    # an old dispatcher's run still fitting and a new dispatcher's run of the same request.
    fitting: list[str] = []
    first_fit_started, let_first_fit_go = threading.Event(), threading.Event()
    real_fit = pipeline.fit_observation

    def held_fit(session: Session, settings: Settings, obsid: int) -> CalibrationFit:
        fitting.append(threading.current_thread().name)
        first_fit_started.set()
        let_first_fit_go.wait(60)
        return real_fit(session, settings, obsid)

    monkeypatch.setattr(pipeline, "fit_observation", held_fit)
    results: dict[str, str | BaseException] = {}

    def run() -> None:
        name = threading.current_thread().name
        try:
            results[name] = pipeline.run_request(settings.model_dump(), request_id)
        except BaseException as exc:  # reported below
            results[name] = exc

    old = threading.Thread(target=run, name="old", daemon=True)
    new = threading.Thread(target=run, name="new", daemon=True)

    def new_run_waits() -> bool:
        return any(
            f"calib.calibrator {CAL_OBS}: another run of it holds its lock" in r.getMessage()
            for r in caplog.records
        )

    try:
        with caplog.at_level(logging.WARNING, logger="observatory.core.locks"):
            old.start()
            assert first_fit_started.wait(60), "the first run never started fitting"
            new.start()
            wait_until(lambda: new_run_waits() or len(fitting) > 1 or not new.is_alive(),
                       60, "the second run to wait or to fit")  # fmt: skip
            assert fitting == ["old"] and new.is_alive()
    finally:
        let_first_fit_go.set()
        old.join(120)
        new.join(120)
    # The second run fitted nothing yet says "completed": it looked at the request only
    # once the first run had stored its fit.
    assert results == {"old": "completed", "new": "completed"}
    assert fitting == ["old"]
    with session_factory() as session:
        fits = session.scalars(select(CalibrationFit).where(CalibrationFit.obsid == CAL_OBS)).all()
        finished_request = session.get(CalibrationRequest, request_id)
        assert len(fits) == 1
        assert finished_request is not None and finished_request.calibration_fit_id == fits[0].fitid
