"""Fitting a simulated calibrator observation recovers the injected cable delays and gains."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from backends import sqlite_only
from correlator_phasing import KINDS, phased_by_the_correlator
from observatory.archive.models import Observation
from observatory.archive.simulated import catalogue_point_source, simulate_and_register
from observatory.calib.formats import read_aocal, read_hyperdrive
from observatory.calib.models import CalibrationFit
from observatory.calib.pipeline import fit_observation
from observatory.calib.service import solution_path
from observatory.core.config import Settings
from observatory.telescope.instrument import SPEED_OF_LIGHT_M_S
from observatory.telescope.simulator import SimulationTruth, load_truth
from observatory.trigger import pointing

CAL_OBS = 1_450_324_816  # 2025-12-21 04:00 UTC: 3C353 is 60 deg up


@sqlite_only
def test_fit_recovers_injected_delays_and_gains(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    source = best[0]
    with session_factory() as session:
        simulate_and_register(
            session, settings, obsid=CAL_OBS, sources=[catalogue_point_source(source.name)], n_tiles=16,
            coarse_chans=tuple(range(109, 133)), fine_chan_khz=40.0, int_time_s=2.0, n_timesteps=4,
            calibrator=source.name, flagged_antennas=(5,),
        )  # fmt: skip
        session.commit()
        fit = fit_observation(session, settings, CAL_OBS)
        session.commit()
        rows = {row.tileid: row for row in fit.solutions}
        cached = solution_path(settings, fit)
    assert cached is not None and read_aocal(cached).n_antennas == 16
    hyperdrive = read_hyperdrive(cached.with_name(f"{CAL_OBS}_solutions.fits"))
    assert hyperdrive.n_antennas == 16 and hyperdrive.chanblock_freqs_hz is not None
    truth = load_truth(settings.archive_dir / str(CAL_OBS) / f"{CAL_OBS}_truth.json")
    tile_ids = [t.tile_id for t in truth.tiles]
    reference = int(np.argmin(tile_ids))
    flagged = tile_ids[5]
    assert all(getattr(rows[flagged], f"{p}_delay_m") is None for p in ("x", "y"))  # NaN -> NULL
    assert all(g is None for g in rows[flagged].x_gains)
    for antenna, tileid in enumerate(tile_ids):
        if tileid == flagged:
            continue
        row = rows[tileid]
        for pol, name in ((0, "x"), (1, "y")):
            # A tile late by dtau: hyperdrive's solutions' phase rises by 2 pi f dtau, the
            # fitted length is +c dtau and calvin stores minus it.
            injected_m = -(
                (truth.delay_errors_ns[antenna, pol] - truth.delay_errors_ns[reference, pol])
                * 1e-9
                * SPEED_OF_LIGHT_M_S
            )
            assert getattr(row, f"{name}_delay_m") == pytest.approx(injected_m, abs=0.02), (
                tileid,
                name,
            )
            gains = np.array(getattr(row, f"{name}_gains"), dtype=float)
            assert np.allclose(gains, truth.gain_amplitudes[antenna, pol], rtol=0.02), (
                tileid,
                name,
            )
            assert getattr(row, f"{name}_phase_fit_quality") > 0.5
    assert fit.creator == "calvin" and fit.obsid == CAL_OBS and fit.source_list == source.name
    # The tile the delays are referenced to is recorded (its own are 0 m).
    assert fit.reference_tileid == tile_ids[reference]
    assert rows[tile_ids[reference]].x_delay_m == rows[tile_ids[reference]].y_delay_m == 0.0


def test_a_request_is_fitted_and_called_back(
    settings: Settings, session_factory: sessionmaker[Session], asvo_job: Callable[[int], int]
) -> None:
    """add_cal_request -> the dispatcher fits on Dask -> the callback arrives -> get_cal_solution serves it."""
    import time

    from fastapi.testclient import TestClient

    from observatory.app import create_app
    from observatory.archive.models import Observation
    from servers import CallbackReceiver

    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    target = CAL_OBS + 600
    with session_factory() as session:
        simulate_and_register(session, settings, obsid=CAL_OBS, sources=[catalogue_point_source(best[0].name)],
                              n_tiles=8, coarse_chans=tuple(range(109, 133)), fine_chan_khz=40.0, int_time_s=2.0,
                              n_timesteps=2, calibrator=best[0].name)  # fmt: skip
        calibrator = session.get(Observation, CAL_OBS)
        assert calibrator is not None
        session.add(Observation(obsid=target, stoptime=target + 120, mode="MWAX_CORRELATOR",
                                coarse_chans=calibrator.coarse_chans, atten_db=calibrator.atten_db))  # fmt: skip
        session.commit()
    job_id = asvo_job(target)
    receiver = CallbackReceiver(failures=0)
    app_settings = settings.model_copy(update={"calib_callback_backoff_s": 1.0})
    with TestClient(create_app(app_settings, run_jobs=True)) as client:
        assert client.get("/calib/get_cal_solution", params={"obs_id": target}).status_code == 404
        reply = client.get("/calib/add_cal_request", params={"obs_id": target, "asvo_job_id": job_id,
                                                            "callback_url": receiver.url})  # fmt: skip
        assert reply.status_code == 200
        deadline = time.monotonic() + 120
        while not receiver.bodies:
            assert time.monotonic() < deadline, "no callback"
            time.sleep(0.5)
        (body,) = receiver.bodies
        assert (
            body["success"] is True
            and body["cal_id"] == CAL_OBS
            and body["target_obs_id"] == target
        )
        assert body["asvo_job_id"] == job_id
        solution = client.get("/calib/get_cal_solution", params={"obs_id": target})
        assert solution.status_code == 200 and solution.headers["x-calibrator-obs-id"] == str(
            CAL_OBS
        )
    receiver.server.shutdown()


@sqlite_only
def test_conversion_with_apply_di_cal_waits_for_calibration(
    settings: Settings, session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fit yet, a calibrator in range: the job files a request, waits (waitcal), then completes."""
    import time

    # The job's own request is what is tested: the dispatcher's automatic request for the
    # calibrator could otherwise fit it before the job asks.
    monkeypatch.setattr("observatory.asvo.dispatcher.request_unfitted_calibrators", lambda _s: [])

    from fastapi.testclient import TestClient

    from observatory.app import create_app
    from observatory.calib.models import CalibrationRequest
    from observatory.core.accounts import create_user
    from observatory.telescope.simulator import PointSource

    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    target = CAL_OBS + 600
    chans = tuple(range(109, 133))
    with session_factory() as session:
        simulate_and_register(session, settings, obsid=CAL_OBS, sources=[catalogue_point_source(best[0].name)],
                              n_tiles=8, coarse_chans=chans, fine_chan_khz=40.0, int_time_s=2.0, n_timesteps=2,
                              calibrator=best[0].name)  # fmt: skip
        simulate_and_register(session, settings, obsid=target, sources=[PointSource(best[0].ra_deg, best[0].dec_deg, 50.0)],
                              n_tiles=8, coarse_chans=chans, fine_chan_khz=40.0, int_time_s=2.0, n_timesteps=2)  # fmt: skip
        create_user(session, "cal-user", "waitcal-api-key")
        session.commit()
    with TestClient(create_app(settings, run_jobs=True)) as client:
        assert (
            client.post(
                "/api/api_login", auth=("mantaray-clientv2.0", "waitcal-api-key")
            ).status_code
            == 200
        )
        reply = client.post("/api/conversion_job", data={"obs_id": str(target), "apply_di_cal": "true",
                                                         "no_rfi": "true", "output": "uvfits"})  # fmt: skip
        assert reply.status_code == 200, reply.text
        job_id = reply.json()["job_id"]
        seen: list[str] = []
        deadline = time.monotonic() + 240
        while not seen or seen[-1] not in ("completed", "error"):
            assert time.monotonic() < deadline, seen
            (row,) = [
                e["row"] for e in client.get("/api/get_jobs").json() if e["row"]["id"] == job_id
            ]
            if not seen or seen[-1] != row["job_state"]:
                seen.append(row["job_state"])
            time.sleep(0.1)
    assert seen[-1] == "completed", (seen, row["error_text"])
    assert "waitcal" in seen
    with session_factory() as session:
        (request,) = session.scalars(select(CalibrationRequest)).all()
        assert (
            request.asvo_job_id == job_id
            and request.cal_id == CAL_OBS
            and request.calibration_fit_id
        )


@sqlite_only
def test_calibdata_metafits_and_the_deprecated_services(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    import io
    import zipfile

    from astropy.io import fits
    from fastapi.testclient import TestClient

    from observatory.app import create_app

    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    target = CAL_OBS + 600
    chans = tuple(range(109, 133))
    with session_factory() as session:
        for obsid, calibrator in ((CAL_OBS, best[0].name), (target, None)):
            simulate_and_register(session, settings, obsid=obsid, sources=[catalogue_point_source(best[0].name)],
                                  n_tiles=8, coarse_chans=chans, fine_chan_khz=40.0, int_time_s=2.0, n_timesteps=2,
                                  calibrator=calibrator)  # fmt: skip
        session.commit()
        fit = fit_observation(session, settings, CAL_OBS)
        session.commit()
        x_delays = {row.tileid: row.x_delay_m for row in fit.solutions}
    with TestClient(create_app(settings)) as client:
        reply = client.get("/metadata/fits", params={"obs_id": target, "include_calib": 1})
        assert reply.status_code == 200
        with fits.open(io.BytesIO(reply.content)) as hdus:
            table = hdus["CALIBDATA"]
            assert table.header["CALFITUS"] == fit.fitid and table.header["CALOBSID"] == CAL_OBS
            assert table.header["CALFITID"] == fit.fitid // 1_000_000  # Unix seconds (mwalib)
            assert table.header["TAROBSID"] == target and table.header["CALCRTR"] == "calvin"
            assert table.header["CALDTIME"].endswith("+08:00")
            data = table.data
            tiledata = hdus["TILEDATA"].data  # row for row, as mwalib 3.0 reads it
            assert list(zip(data["Antenna"], data["Pol"], strict=True)) == list(
                zip(tiledata["Antenna"], tiledata["Pol"], strict=True)
            )
            assert len(data) == 16 and list(data["Pol"][:2]) == ["Y", "X"]  # as the MWA's tables
            for row in data[data["Pol"] == "X"]:
                assert row["delay_m"] == pytest.approx(x_delays[int(row["Tile"])], abs=1e-6)
            assert data["gains"].shape == (16, 24)
            assert "TILEDATA" in [h.name for h in hdus]  # the rest of the metafits is kept
        # mwalib reads the metafits as served: each row matched to its rf input, the
        # delays as fitted.
        import mwalib

        with_calib = tmp_path / f"{target}_with_calib.metafits"
        with_calib.write_bytes(reply.content)
        context = mwalib.MetafitsContext(str(with_calib), None)
        assert context.num_calibration_fits == 16
        for calibration in context.calibration_fits:
            if calibration.rf_input.pol == mwalib.Pol.X:
                expected = x_delays[calibration.rf_input.tile_id]
                assert calibration.delay_metres == pytest.approx(expected, abs=1e-6)
        plain = client.get("/metadata/fits", params={"obs_id": target})
        with fits.open(io.BytesIO(plain.content)) as hdus:
            assert "CALIBDATA" not in [h.name for h in hdus]

        old = client.get("/calib/get_calfile_for_obsid", params={"obs_id": target})
        assert old.status_code == 200
        with zipfile.ZipFile(io.BytesIO(old.content)) as archive:
            assert sorted(archive.namelist()) == sorted([f"{CAL_OBS}.bin", f"{target}_flagged_tiles.txt",
                                                         f"{target}_flags.py", f"{target}.metafits"])  # fmt: skip
            (tmp_path / "zipped.metafits").write_bytes(archive.read(f"{target}.metafits"))
        zipped = mwalib.MetafitsContext(str(tmp_path / "zipped.metafits"), None)
        assert zipped.num_calibration_fits == 16
        by_calid = client.get("/calib/get_calfile_for_calid", params={"cal_id": CAL_OBS})
        with zipfile.ZipFile(io.BytesIO(by_calid.content)) as archive:
            assert (
                f"{CAL_OBS}.bin" in archive.namelist()
                and f"{CAL_OBS}_flags.py" in archive.namelist()
            )
        assert (
            client.get("/calib/get_calfile_for_calid", params={"cal_id": target}).status_code == 400
        )
        far = client.get("/calib/get_calfile_for_obsid", params={"obs_id": CAL_OBS + 200_000})
        assert far.status_code == 400
        # No fit, and no calibrator to fit: add_request=1 is a 400 saying both (not a 404,
        # which this service gives for a target with no metafits).
        with session_factory() as session:
            session.add(Observation(obsid=CAL_OBS + 200_000, stoptime=CAL_OBS + 200_120,
                                    mode="MWAX_CORRELATOR", coarse_chans=list(range(109, 133))))  # fmt: skip
            session.commit()
        nothing = client.get(
            "/calib/get_calfile_for_obsid", params={"obs_id": CAL_OBS + 200_000, "add_request": 1}
        )
        assert nothing.status_code == 400 and "no fit could be requested" in nothing.json()["error"]


@sqlite_only
def test_a_second_fit_within_a_week_draws_its_history_plots(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Two calibrators an hour apart, each fitted in its own session (as the dispatcher does).

    The second fit's time-history plots read the first fit back from the database; its
    ``fit_time`` must compare with the new fit's (SQLite used to give it back naive, and
    drawing failed with "can't subtract offset-naive and offset-aware datetimes").
    """
    from datetime import UTC, timedelta

    from observatory.calib import plots

    later = CAL_OBS + 3600
    fitids = []
    for obsid in (CAL_OBS, later):
        best = pointing.best_calibrator(obsid + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
        assert best is not None
        with session_factory() as session:
            simulate_and_register(session, settings, obsid=obsid, sources=[catalogue_point_source(best[0].name)],
                                  n_tiles=8, coarse_chans=(109, 110), fine_chan_khz=40.0,
                                  int_time_s=2.0, n_timesteps=2, calibrator=best[0].name)  # fmt: skip
            session.commit()
            fitids.append(fit_observation(session, settings, obsid).fitid)  # draws every plot
            session.commit()
    first_id, second_id = fitids
    with session_factory() as session:
        first = session.get(CalibrationFit, first_id)
        second = session.get(CalibrationFit, second_id)
        assert first is not None and second is not None
        for kind in plots.KINDS:
            assert plots.cached_plot_path(session, settings, second, kind).is_file(), kind
        assert first is not None and second is not None
        for fit in (first, second):  # aware UTC on every backend
            assert fit.fit_time.utcoffset() == timedelta(0) and fit.fit_time.tzinfo is UTC
        assert timedelta(0) < second.fit_time - first.fit_time < timedelta(days=7)
        assert [f.fitid for f in plots._history(session, second, 7)] == [first_id]


@sqlite_only
def test_a_calibrator_in_which_no_tile_calibrates_is_a_failed_fit(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Every tile but one flagged: nothing to solve. No fit is stored; the request fails, saying why."""
    from observatory.calib.models import CalibrationRequest
    from observatory.calib.pipeline import CalibrationFailed, run_request
    from observatory.calib.requests import callback_body

    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    with session_factory() as session:
        simulate_and_register(session, settings, obsid=CAL_OBS, sources=[catalogue_point_source(best[0].name)],
                              n_tiles=8, coarse_chans=(109, 110), n_timesteps=2, calibrator=best[0].name,
                              flagged_antennas=tuple(range(7)))  # fmt: skip
        session.commit()
        with pytest.raises(CalibrationFailed, match=r"no tile of observation \d+ calibrated"):
            fit_observation(session, settings, CAL_OBS)
        session.rollback()
        assert session.scalars(select(CalibrationFit)).all() == []
        request = CalibrationRequest(cal_id=CAL_OBS, target_obs_id=CAL_OBS + 600, asvo_job_id=7)
        session.add(request)
        session.commit()
        request_id = request.id
    assert run_request(settings.model_dump(), request_id) == "error"
    with session_factory() as session:
        request = session.get(CalibrationRequest, request_id)
        assert request is not None and request.calibration_fit_id is None
        body = callback_body(request)
        assert body["success"] is False
        assert "no tile of observation" in str(body["message"])
        assert "7 of 8 tiles flagged" in str(body["message"])
        assert session.scalars(select(CalibrationFit)).all() == []


def test_a_missing_coarse_channel_file_is_nan_at_its_own_channel(tmp_path: Path) -> None:
    """Channel 110's file is missing: its gains are NaN, and 111 and 112 keep their own (spec 3.4)."""
    from observatory.calib.pipeline import tile_fits
    from observatory.calib.solving import solve_observation
    from observatory.telescope.simulator import simulate_observation

    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    chans = (109, 110, 111, 112)
    sim = simulate_observation(tmp_path, CAL_OBS, n_tiles=8, coarse_chans=chans, n_timesteps=2,
                               sources=[catalogue_point_source(best[0].name)], gain_amplitude_scatter=0.1,
                               delay_error_scatter_ns=2.0, noise_sigma_jy=1.0, calibrator=best[0].name)  # fmt: skip
    files = [f for f in sim.vis_paths if "_ch110_" not in f.name]
    assert len(files) < len(sim.vis_paths)
    solved = solve_observation(sim.metafits_path, files, best[0].name)
    assert list(solved.meta.metafits_coarse_chans) == list(chans)
    rows = tile_fits(solved, len(chans)).rows
    truth = sim.truth
    for row in rows:
        antenna = int(row["antenna"])  # type: ignore[call-overload]
        for pol, name in ((0, "x"), (1, "y")):
            gains = np.array(row[f"{name}_gains"], dtype=float)
            assert gains.shape == (4,) and np.isnan(gains[1]), (row["tileid"], name, gains)
            for key in ("gains_pol0", "gains_pol1", "gains_sigma_resid"):
                assert np.isnan(row[f"{name}_{key}"][1])  # type: ignore[index]
            expected = truth.gain_amplitudes[antenna, pol, [0, 2, 3]]
            assert np.allclose(gains[[0, 2, 3]], expected, rtol=0.02), (row["tileid"], name, gains)


def fit_small_calibrator(session: Session, settings: Settings) -> CalibrationFit:
    """Simulate and fit the best calibrator up at CAL_OBS: 8 tiles, 2 coarse channels, 2 x 2 s."""
    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    simulate_and_register(session, settings, obsid=CAL_OBS, sources=[catalogue_point_source(best[0].name)],
                          n_tiles=8, coarse_chans=(109, 110), int_time_s=2.0, n_timesteps=2,
                          calibrator=best[0].name)  # fmt: skip
    session.commit()
    fit = fit_observation(session, settings, CAL_OBS)
    session.commit()
    return fit


@sqlite_only
def test_solution_times_are_centroids_and_get_cal_fits_names_the_hyperdrive_file(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Two 2 s timesteps from the obsid: start obsid+1, end obsid+3 (spec 1.3, as hyperdrive writes)."""
    from fastapi.testclient import TestClient

    from observatory.app import create_app

    with session_factory() as session:
        fit = fit_small_calibrator(session, settings)
        fitid = fit.fitid
        cached = solution_path(settings, fit)
    assert cached is not None
    aocal = read_aocal(cached)
    assert (aocal.start_gps, aocal.end_gps) == (CAL_OBS + 1.0, CAL_OBS + 3.0)
    hyperdrive = read_hyperdrive(cached.with_name(f"{CAL_OBS}_solutions.fits"))
    assert hyperdrive.timeblocks_gps is not None
    assert hyperdrive.timeblocks_gps.tolist() == [[CAL_OBS + 1.0, CAL_OBS + 3.0, CAL_OBS + 2.0]]
    with TestClient(create_app(settings)) as client:
        body = client.get(
            "/calib/get_cal_fits", params={"obs_id": CAL_OBS, "max_time_separation": 0}
        ).json()
    assert body == {str(fitid): [CAL_OBS, 0, f"{fitid}/{CAL_OBS}_solutions.fits"]}
    assert (settings.calib_dir / body[str(fitid)][2]).is_file()


@sqlite_only
def test_a_fit_records_its_iteration_limit_and_the_summary_shows_niter_over_limit(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """fit_limit is the solver's iteration limit (calvin: hyperdrive --max-iterations 500)."""
    import re

    from fastapi.testclient import TestClient

    from observatory.app import create_app
    from observatory.calib.pipeline import PHASE_FIT_NITER
    from observatory.calib.service import calibdata_hdu
    from observatory.calib.solving import SOLVER_MAX_ITERATIONS

    with session_factory() as session:
        fit = fit_small_calibrator(session, settings)
        assert (
            (fit.fit_niter, fit.fit_limit) == (PHASE_FIT_NITER, SOLVER_MAX_ITERATIONS) == (3, 500)
        )
        header = calibdata_hdu(fit, CAL_OBS).header
        assert (header["CALITERS"], header["CALITLIM"]) == (3, 500.0)
        fitid = fit.fitid
    with TestClient(create_app(settings)) as client:
        page = client.get(
            "/calib/summary", params={"mintime": CAL_OBS - 60, "maxtime": CAL_OBS + 60}
        )
    assert page.status_code == 200 and f"fit?fitid={fitid}" in page.text
    assert re.findall(r'<td class="niter">([^<]*)</td>', page.text) == ["3/500"]


def test_status_codes_of_get_cal_fits_and_the_deprecated_get_calfile_for_obsid(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """As the MWA's documentation says (../shared/sources/calibration-web-services.txt)."""
    from fastapi.testclient import TestClient

    from observatory.app import create_app

    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    with session_factory() as session:
        simulate_and_register(session, settings, obsid=CAL_OBS, sources=[catalogue_point_source(best[0].name)],
                              n_tiles=4, coarse_chans=(109,), n_timesteps=1)  # fmt: skip
        session.commit()
    with TestClient(create_app(settings)) as client:
        unknown = CAL_OBS + 8
        for path in ("get_cal_fits", "get_cal_solution", "get_calfile_for_obsid"):
            reply = client.get(f"/calib/{path}", params={"obs_id": unknown})
            assert reply.status_code == 400, (path, reply.text)
        reply = client.get("/calib/get_cal_fits", params={"obs_id": CAL_OBS})
        assert reply.status_code == 404
        assert reply.json() == {
            "error": f"no calibration fits for obs_id {CAL_OBS}",
            "error_code": 1,
        }
        solution = client.get("/calib/get_cal_solution", params={"obs_id": CAL_OBS})
        assert solution.status_code == 404
        # The deprecated service answers 400 for "no fit", as the MWA's did ("400 if the
        # cal_id is not found in the calibration solution database"), with the same message.
        old = client.get("/calib/get_calfile_for_obsid", params={"obs_id": CAL_OBS})
        assert old.status_code == 400
        assert old.json()["error"] == solution.json()["error"]
        # add_request is 0 or 1: another value is not silently "no request".
        bad = client.get(
            "/calib/get_calfile_for_obsid", params={"obs_id": CAL_OBS, "add_request": 2}
        )
        assert bad.status_code == 400 and "add_request must be 0 or 1" in bad.json()["error"]


@sqlite_only
def test_nocache_rebuilds_a_file_laid_out_as_the_cached_one(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """``nocache=1``: the solutions from the table rows, with the cached file's chanblocks, times, tiles."""
    import io
    import zipfile

    from fastapi.testclient import TestClient

    from observatory.app import create_app

    with session_factory() as session:
        fit = fit_small_calibrator(session, settings)
        fitid, cached = fit.fitid, solution_path(settings, fit)
    assert cached is not None
    cached_aocal = read_aocal(cached)
    cached_hyperdrive = read_hyperdrive(cached.with_name(f"{CAL_OBS}_solutions.fits"))
    rebuilt: dict[str, Path] = {}
    with TestClient(create_app(settings)) as client:
        for output_format, name in (
            ("aocal", f"{CAL_OBS}.bin"),
            ("hyperdrive", f"{CAL_OBS}_solutions.fits"),
        ):
            reply = client.get("/calib/get_cal_solution", params={
                "obs_id": CAL_OBS, "prefer_fitid": fitid, "nocache": 1, "output_format": output_format,
            })  # fmt: skip
            assert reply.status_code == 200, reply.text
            with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
                rebuilt[output_format] = tmp_path / name
                rebuilt[output_format].write_bytes(archive.read(name))
    aocal = read_aocal(rebuilt["aocal"])
    hyperdrive = read_hyperdrive(rebuilt["hyperdrive"])
    assert (aocal.start_gps, aocal.end_gps) == (cached_aocal.start_gps, cached_aocal.end_gps)
    assert aocal.jones.shape == cached_aocal.jones.shape
    assert hyperdrive.timeblocks_gps is not None and cached_hyperdrive.timeblocks_gps is not None
    assert hyperdrive.timeblocks_gps.tolist() == cached_hyperdrive.timeblocks_gps.tolist()
    assert (
        hyperdrive.chanblock_freqs_hz is not None
        and cached_hyperdrive.chanblock_freqs_hz is not None
    )
    assert np.allclose(hyperdrive.chanblock_freqs_hz, cached_hyperdrive.chanblock_freqs_hz)
    assert hyperdrive.tile_names == cached_hyperdrive.tile_names
    assert hyperdrive.tile_flags is not None and cached_hyperdrive.tile_flags is not None
    assert hyperdrive.tile_flags.tolist() == cached_hyperdrive.tile_flags.tolist()
    # The fits describe the solved solutions: phase and amplitude agree where both are finite
    # (a simulated sky of one point source, so the lines fit it closely).
    both = np.isfinite(aocal.jones) & np.isfinite(cached_aocal.jones)
    diagonal = both[..., [0, 3]]
    ratio = aocal.jones[..., [0, 3]][diagonal] / cached_aocal.jones[..., [0, 3]][diagonal]
    assert diagonal.sum() > 0.5 * diagonal.size
    assert np.median(np.abs(np.angle(ratio))) < 0.05
    assert np.median(np.abs(np.abs(ratio) - 1)) < 0.05


@sqlite_only
def test_a_fit_calibrates_a_target_at_another_frequency_resolution(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """The cached hyperdrive FITS (chanblock frequencies) maps the calibrator's 40 kHz
    chanblocks onto a 20 kHz target; its AO-cal file (no frequencies) by Birli's channel
    ratio, each chanblock over two consecutive channels: the same mapping, the same data."""
    from observatory.archive.service import correlator_inputs
    from observatory.calib.service import fit_solutions
    from observatory.core.storage import Storage
    from observatory.preprocess.engine import preprocess
    from observatory.preprocess.options import ConversionOptions

    target_obs = CAL_OBS + 600
    with session_factory() as session:
        fit = fit_small_calibrator(session, settings)
        simulate_and_register(session, settings, obsid=target_obs, sources=[catalogue_point_source("3C444")],
                              n_tiles=8, coarse_chans=(109, 110), fine_chan_khz=20.0, int_time_s=2.0,
                              n_timesteps=2)  # fmt: skip
        session.commit()
        solutions = fit_solutions(session, settings, fit)
        metafits, files = correlator_inputs(session, Storage(settings.archive_dir), target_obs)
        cached_aocal = solution_path(settings, fit)
    assert solutions.chanblock_freqs_hz is not None and solutions.n_chanblocks == 2 * 32
    options = ConversionOptions.from_params({"no_rfi": "true", "apply_di_cal": "true"})
    (written,) = preprocess(metafits, files, options, tmp_path / "t.uvfits", solutions=solutions)
    from pyuvdata import UVData

    calibrated = UVData.from_file(str(written))
    assert calibrated.Nfreqs == 2 * 64 and np.isfinite(calibrated.data_array).all()
    assert cached_aocal is not None
    (by_ratio,) = preprocess(
        metafits, files, options, tmp_path / "u.uvfits", solutions=cached_aocal
    )
    np.testing.assert_allclose(
        UVData.from_file(str(by_ratio)).data_array, calibrated.data_array, rtol=1e-6
    )


def test_a_dead_tile_with_the_lowest_id_is_not_the_reference(tmp_path: Path) -> None:
    """A dead tile the metafits does not flag has solutions of noise: as calvin's reference
    (the lowest tile id) it failed every other tile, and the error blamed them."""
    from astropy.io import fits as pyfits

    from observatory.calib.pipeline import tile_fits
    from observatory.calib.solving import solve_observation
    from observatory.telescope.simulator import simulate_observation

    source = catalogue_point_source("3C353")
    # The tile of the lowest id records only its receiver's noise: the simulator's dead
    # (flagged) tile, whose flag the metafits then loses.
    sim = simulate_observation(tmp_path, 1450324816, n_tiles=16, coarse_chans=(109, 110, 111, 112),
                               n_timesteps=4, sources=[source], calibrator=source.name,
                               flagged_antennas=[0], delay_error_scatter_ns=2.0,
                               noise_sigma_jy=1.0)  # fmt: skip
    with pyfits.open(sim.metafits_path, mode="update") as metafits:
        metafits["TILEDATA"].data["Flag"][:] = 0
    solved = solve_observation(sim.metafits_path, sim.vis_paths, source.name)
    fits = tile_fits(solved, 4)
    assert dict(fits.failures) == {"with a phase residual spread above 0.6 rad": 1}
    assert fits.reference_tileid == int(solved.meta.antenna_numbers[1])  # recorded for the fit
    delays = np.array([row["x_delay_m"] for row in fits.rows], dtype=np.float64)
    assert np.isnan(delays[0]) and np.isfinite(delays[1:]).all()
    assert delays[1] == 0.0  # the next tile is the reference
    errors_ns = load_truth(sim.truth_path).delay_errors_ns[:, 0]
    expected_m = -(errors_ns[1:] - errors_ns[1]) * 1e-9 * SPEED_OF_LIGHT_M_S
    np.testing.assert_allclose(delays[1:], expected_m, atol=0.02)


@pytest.mark.parametrize("applied", KINDS)
def test_data_the_correlator_phased_give_the_same_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, applied: str
) -> None:
    """Metafits GEODEL: the model is of unphased data; phased ones gave delays metres off,
    every tile reported calibrated."""
    from observatory.calib import solving
    from observatory.calib.pipeline import tile_fits
    from observatory.calib.solving import solve_observation
    from observatory.telescope.simulator import simulate_observation

    source = catalogue_point_source("3C353")
    sim = simulate_observation(tmp_path, 1450324816, n_tiles=8, coarse_chans=(109, 110, 111, 112),
                               n_timesteps=4, sources=[source], calibrator=source.name,
                               delay_error_scatter_ns=2.0, noise_sigma_jy=1.0)  # fmt: skip

    def delays() -> np.ndarray:
        fits = tile_fits(solve_observation(sim.metafits_path, sim.vis_paths, source.name), 4)
        return np.array([[row["x_delay_m"], row["y_delay_m"]] for row in fits.rows], float)

    unphased = delays()
    monkeypatch.setattr(solving, "open_reader", phased_by_the_correlator(solving.open_reader,
                                                                         applied))  # fmt: skip
    np.testing.assert_allclose(delays(), unphased, atol=1e-3)


@sqlite_only
def test_a_calibrator_missing_a_channel_file_gives_solutions_for_the_whole_band(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """Its fit is the best for targets observed with every channel: solutions for the
    channels with files only were refused for them ("do not cover ... coarse channel 110")."""
    from observatory.archive.models import ObservationFile
    from observatory.preprocess.engine import preprocess
    from observatory.preprocess.options import ConversionOptions

    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    with session_factory() as session:
        simulate_and_register(session, settings, obsid=CAL_OBS, sources=[catalogue_point_source(best[0].name)],
                              n_tiles=8, coarse_chans=(109, 110, 111, 112), fine_chan_khz=160.0,
                              int_time_s=2.0, n_timesteps=2, calibrator=best[0].name)  # fmt: skip
        session.commit()
        all_files = sorted((settings.archive_dir / str(CAL_OBS)).glob("*_ch*.fits"))
        missing = next(f for f in session.scalars(select(ObservationFile)) if "_ch110_" in f.name)
        session.delete(missing)
        session.commit()
        fit = fit_observation(session, settings, CAL_OBS)
        session.commit()
        cached = solution_path(settings, fit)
    assert cached is not None
    hyperdrive = read_hyperdrive(cached.with_name(f"{CAL_OBS}_solutions.fits"))
    freqs = hyperdrive.chanblock_freqs_hz
    assert freqs is not None and len(freqs) == 4 * 8 and np.all(np.diff(freqs) == 160e3)
    for solutions in (hyperdrive, read_aocal(cached)):
        unflagged = np.isfinite(solutions.jones[0]).all(axis=(0, 2))  # per chanblock
        assert not unflagged[8:16].any() and unflagged[16:24].any()
    # The calibrator's own four channels convert with these solutions (channel 110 flagged).
    (metafits,) = (settings.archive_dir / str(CAL_OBS)).glob("*metafits*")
    options = ConversionOptions.from_params({"no_rfi": "true", "apply_di_cal": "true"})
    preprocess(metafits, all_files, options, tmp_path / "cal.uvfits", solutions=cached)


def test_every_tile_of_a_320_khz_calibrator_calibrates(tmp_path: Path) -> None:
    """The coarse channels' edges (80 kHz each side: half of the four 320 kHz channels) were
    counted against each phase fit's quality, which then could not reach 0.5: good tiles
    were left uncalibrated."""
    from observatory.calib.pipeline import tile_fits
    from observatory.calib.solving import solve_observation
    from observatory.telescope.simulator import simulate_observation

    source = catalogue_point_source("3C353")
    sim = simulate_observation(tmp_path, 1450324816, n_tiles=8, coarse_chans=(109, 110, 111, 112),
                               fine_chan_khz=320.0, n_timesteps=2, sources=[source],
                               calibrator=source.name, delay_error_scatter_ns=2.0,
                               noise_sigma_jy=1.0)  # fmt: skip
    solved = solve_observation(sim.metafits_path, sim.vis_paths, source.name, flag_rfi=False,
                               workers=1)  # fmt: skip
    fits = tile_fits(solved, len(solved.meta.metafits_coarse_chans))
    assert dict(fits.failures) == {}
    assert all(np.isfinite(row["x_delay_m"]) and np.isfinite(row["y_delay_m"]) for row in fits.rows)


def test_integrations_within_the_quack_time_are_not_solved_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The correlator's first integrations (metafits QUACKTIM) hold settling data: the
    conversion flags them, the pipeline solved on them."""
    from observatory.calib import solving
    from observatory.calib.pipeline import tile_fits
    from observatory.calib.solving import solve_observation
    from observatory.telescope.simulator import simulate_observation

    source = catalogue_point_source("3C353")
    sim = simulate_observation(tmp_path, 1450324816, n_tiles=8, coarse_chans=(109, 110, 111, 112),
                               n_timesteps=4, sources=[source], calibrator=source.name,
                               delay_error_scatter_ns=2.0, noise_sigma_jy=1.0,
                               quack_time_s=2.0)  # fmt: skip

    def delays() -> np.ndarray:
        fits = tile_fits(solve_observation(sim.metafits_path, sim.vis_paths, source.name), 4)
        return np.array([[row["x_delay_m"], row["y_delay_m"]] for row in fits.rows], float)

    clean = delays()
    real_open = solving.open_reader

    def settling(metafits: Path, files: list[Path]) -> object:
        reader = real_open(metafits, files)
        read = reader.read

        def read_settling(coarse_chan: int, timesteps: range) -> object:
            chunk = read(coarse_chan, timesteps)
            rng = np.random.default_rng(coarse_chan)
            first = chunk.time_start_gps_s < sim.truth.obsid + 2.0  # within the quack time
            chunk.vis[first] = 1e4 * rng.normal(size=chunk.vis[first].shape)
            return chunk

        reader.read = read_settling
        return reader

    monkeypatch.setattr(solving, "open_reader", settling)
    np.testing.assert_allclose(delays(), clean, atol=0.02)


def test_the_legacy_dc_channel_is_not_solved_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The legacy correlator's centre fine channel holds the PFB's DC offset: the conversion
    flags it on legacy data (Birli's default), the pipeline solved on it."""
    import dataclasses

    from observatory.calib import solving
    from observatory.calib.pipeline import tile_fits
    from observatory.calib.solving import solve_observation
    from observatory.telescope.simulator import simulate_observation

    source = catalogue_point_source("3C353")
    sim = simulate_observation(tmp_path, 1450324816, n_tiles=8, coarse_chans=(109, 110, 111, 112),
                               n_timesteps=4, sources=[source], calibrator=source.name,
                               delay_error_scatter_ns=2.0, noise_sigma_jy=1.0)  # fmt: skip
    real_open = solving.open_reader

    def legacy(dc_offset: float) -> Callable[[Path, list[Path]], object]:
        def open_legacy(metafits: Path, files: list[Path]) -> object:
            reader = real_open(metafits, files)
            reader.meta = dataclasses.replace(reader.meta, mwax=False)
            read = reader.read

            def read_with_dc(coarse_chan: int, timesteps: range) -> object:
                chunk = read(coarse_chan, timesteps)
                centre = chunk.chan_index == reader.meta.fine_chans_per_coarse // 2
                chunk.vis[:, :, centre] += dc_offset
                return chunk

            reader.read = read_with_dc
            return reader

        return open_legacy

    def delays(dc_offset: float) -> np.ndarray:
        monkeypatch.setattr(solving, "open_reader", legacy(dc_offset))
        fits = tile_fits(solve_observation(sim.metafits_path, sim.vis_paths, source.name), 4)
        return np.array([[row["x_delay_m"], row["y_delay_m"]] for row in fits.rows], float)

    np.testing.assert_allclose(delays(1e4), delays(0.0), atol=1e-6)


def test_the_solve_reads_in_time_blocks_and_gives_the_same_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each coarse channel was read whole: a real observation (128 tiles, minutes at 0.5 s)
    needs tens of GB at once. The normal matrices are sums over time, so blocks give the
    same solutions."""
    from observatory.calib import solving
    from observatory.calib.solving import solve_observation
    from observatory.telescope.simulator import simulate_observation

    source = catalogue_point_source("3C353")
    sim = simulate_observation(tmp_path, 1450324816, n_tiles=8, coarse_chans=(109, 110),
                               n_timesteps=5, sources=[source], calibrator=source.name,
                               delay_error_scatter_ns=2.0, noise_sigma_jy=1.0)  # fmt: skip
    # Without RFI flagging: AOFlagger's flags depend on the stretch of time it is given.
    whole = solve_observation(sim.metafits_path, sim.vis_paths, source.name, flag_rfi=False)
    real_open = solving.open_reader
    block_lengths: list[int] = []

    def counting(metafits: Path, files: list[Path]) -> object:
        reader = real_open(metafits, files)
        read = reader.read

        def read_counted(coarse_chan: int, timesteps: range) -> object:
            block_lengths.append(len(timesteps))
            return read(coarse_chan, timesteps)

        reader.read = read_counted
        return reader

    monkeypatch.setattr(solving, "open_reader", counting)
    one_timestep_bytes = 8 * 9 // 2 * 32 * 4 * 8  # 8 tiles' baselines with autos, 32 channels
    blocked = solve_observation(
        sim.metafits_path,
        sim.vis_paths,
        source.name,
        chunk_bytes=2 * one_timestep_bytes,
        flag_rfi=False,
        workers=1,  # the channels one after the other: their reads in order
    )
    assert block_lengths == [2, 2, 1] * 2  # 5 timesteps, 2 coarse channels
    assert np.isfinite(whole.solution.gains).mean() > 0.5
    np.testing.assert_allclose(
        blocked.solution.gains, whole.solution.gains, rtol=1e-9, atol=1e-12, equal_nan=True
    )
    # With RFI flagging, blocks RFI_CHUNK_FACTOR times longer (AOFlagger wants stretches of
    # time), as far as the process's memory holds SOLVE_PEAK_PER_RAW_BYTE times them.
    for limit_timesteps, blocks in ((10, [5]), (3, [3, 2])):  # 8 timesteps; 3
        block_lengths.clear()
        monkeypatch.setattr(
            solving, "memory_limit_bytes",
            lambda n=limit_timesteps: solving.PROCESS_BASE_BYTES
            + n * one_timestep_bytes * solving.SOLVE_PEAK_PER_RAW_BYTE,
        )  # fmt: skip
        solve_observation(sim.metafits_path, sim.vis_paths, source.name,
                          chunk_bytes=one_timestep_bytes, workers=1)  # fmt: skip
        assert block_lengths == blocks * 2, limit_timesteps


def test_our_solutions_are_in_hyperdrive_s_convention_and_calibrate_their_data(
    tmp_path: Path,
) -> None:
    """hyperdrive solves on the raw data (mwalib's, unconjugated), so its solutions are the
    inverse of the raw data's gains, not of pyuvdata's conjugated ones. Ours are written the
    same way (the fits, the AO-cal and hyperdrive files), and the conversion applies such
    solutions back to the gain-free sky: ours were the conjugate, and the conversion applied
    hyperdrive's conjugated."""
    from observatory.calib.formats import CalSolutions, write_aocal
    from observatory.calib.solving import solve_observation
    from observatory.preprocess.engine import preprocess
    from observatory.preprocess.options import ConversionOptions
    from observatory.telescope.simulator import simulate_observation

    source = catalogue_point_source("3C353")
    chans = (109, 110)
    sim = simulate_observation(tmp_path / "sim", CAL_OBS, n_tiles=8, coarse_chans=chans,
                               n_timesteps=4, sources=[source], calibrator=source.name,
                               gain_amplitude_scatter=0.2, delay_error_scatter_ns=3.0, seed=5)  # fmt: skip
    solved = solve_observation(sim.metafits_path, sim.vis_paths, source.name)
    jones = solved.file_jones()  # (chanblock, antenna, 4), one chanblock per fine channel
    raw_gains = np.concatenate([sim.truth.complex_gains(c, "mwax") for c in chans], axis=2)
    solved_chans = np.isfinite(jones[:, :, 0]).all(axis=1)
    assert solved_chans.sum() > 0.8 * len(solved_chans)  # all but the coarse-channel edges
    reference = solved.solution.reference_antenna
    for element, pol in ((0, 0), (3, 1)):
        solutions = jones[solved_chans][:, :, element]
        referenced = solutions / solutions[:, reference, None]
        expected = (raw_gains[reference, pol] / raw_gains[:, pol]).T[solved_chans]  # g_ref / g_a
        np.testing.assert_allclose(referenced, expected, rtol=1e-3)
        assert np.abs(np.angle(expected)).max() > 1  # the conjugate would fail: the delays show

    solutions_path = tmp_path / "solutions.bin"
    write_aocal(solutions_path, CalSolutions(jones=jones.transpose(1, 0, 2)[None]))
    options = ConversionOptions.from_params(
        {"no_rfi": "true", "no_geometric_delay": "true", "apply_di_cal": "true"}
    )
    (written,) = preprocess(sim.metafits_path, sim.vis_paths, options, tmp_path / "cal.uvfits",
                            solutions=solutions_path)  # fmt: skip
    from pyuvdata import UVData

    assert UVData.from_file(str(written)).Nfreqs == len(jones)
    data, want = xx_and_gain_free_sky(written, sim.truth)
    np.testing.assert_allclose(data, want, rtol=1e-3, atol=1e-3)


def xx_and_gain_free_sky(
    path: Path, truth: SimulationTruth
) -> tuple[NDArray[np.complex128], NDArray[np.complex128]]:
    """The unflagged XX cross-correlations of an unphased, unaveraged uvfits, and the same
    samples of the simulated sky without the instrument's gains and cables."""
    from pyuvdata import UVData

    from observatory.telescope.simulator import predict_visibilities

    uvd = UVData.from_file(str(path))
    xx = list(uvd.polarization_array).index(-5)
    n = truth.n_tiles
    got, wanted = [], []
    for t, time in enumerate(np.unique(uvd.time_array)):
        sky = np.concatenate(
            [predict_visibilities(truth, t, c, domain="uvdata", include_cable=False,
                                  include_gains=False) for c in truth.coarse_chans], axis=1,
        )  # fmt: skip
        rows = np.flatnonzero(uvd.time_array == time)
        p, q = uvd.ant_1_array[rows] - 1, uvd.ant_2_array[rows] - 1  # uvfits numbers from 1
        cross = p != q
        baseline = p * n - p * (p - 1) // 2 + (q - p)  # the simulator's (p <= q) order
        flags = uvd.flag_array[rows][cross][:, :, xx]
        assert (~flags).sum() > 0.8 * flags.size
        got.append(uvd.data_array[rows][cross][:, :, xx][~flags])
        wanted.append(sky[baseline[cross], :, 0][~flags])
    return np.concatenate(got), np.concatenate(wanted)


def test_the_simulated_array_has_one_gain_per_tile_and_channel() -> None:
    """In whatever order an observation's channels are given (the simulator sorts them)."""
    from observatory.archive.simulated import instrument_gains

    both, delays = instrument_gains(4, [140, 130])
    low, same_delays = instrument_gains(4, [130])
    np.testing.assert_array_equal(both[:, :, :1], low)
    np.testing.assert_array_equal(delays, same_delays)
    with pytest.raises(ValueError, match="outside the receiver channels"):
        instrument_gains(4, [256])


@sqlite_only
def test_a_calibrator_s_fit_calibrates_a_target_of_the_same_array(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """The simulated array has one instrument: each observation drew its own gains and
    cable errors, so a target calibrated with its calibrator's fit (the demo's and the
    ASVO's apply_di_cal) came out with the phases of two unrelated instruments."""
    from observatory.archive.service import correlator_inputs
    from observatory.calib.service import fit_solutions
    from observatory.core.storage import Storage
    from observatory.preprocess.engine import preprocess
    from observatory.preprocess.options import ConversionOptions

    target_obs = CAL_OBS + 600
    with session_factory() as session:
        fit = fit_small_calibrator(session, settings)
        simulate_and_register(session, settings, obsid=target_obs, sources=[catalogue_point_source("3C444")],
                              n_tiles=8, coarse_chans=(109, 110), int_time_s=2.0, n_timesteps=2,
                              seed=7)  # fmt: skip
        session.commit()
        solutions = fit_solutions(session, settings, fit)
        metafits, files = correlator_inputs(session, Storage(settings.archive_dir), target_obs)
    options = ConversionOptions.from_params(
        {"no_rfi": "true", "no_geometric_delay": "true", "apply_di_cal": "true"}
    )
    (written,) = preprocess(metafits, files, options, tmp_path / "t.uvfits", solutions=solutions)
    truth = load_truth(settings.archive_dir / str(target_obs) / f"{target_obs}_truth.json")
    data, sky = xx_and_gain_free_sky(written, truth)
    phase_error = np.abs(np.angle(data / sky))
    assert np.median(phase_error) < 0.05 and phase_error.max() < 0.3
    np.testing.assert_allclose(np.median(np.abs(data) / np.abs(sky)), 1.0, rtol=0.02)


def test_interference_in_a_few_channels_is_flagged_out_of_the_fit(tmp_path: Path) -> None:
    """As the conversion (and Birli before calvin's hyperdrive): AOFlagger's flags. A strong
    narrow-band transmitter in 3 fine channels of one coarse channel took that channel's
    gain fits 90 % off."""
    from observatory.calib.pipeline import tile_fits
    from observatory.calib.solving import solve_observation
    from observatory.telescope.simulator import RfiBurst, simulate_observation

    source = catalogue_point_source("3C353")
    burst = RfiBurst(coarse_chan=110, fine_chans=(12, 15), timesteps=(2, 6), amplitude_jy=20_000.0)
    sim = simulate_observation(tmp_path, CAL_OBS, n_tiles=16, coarse_chans=(109, 110, 111, 112),
                               n_timesteps=8, sources=[source], calibrator=source.name,
                               gain_amplitude_scatter=0.2, delay_error_scatter_ns=2.0,
                               noise_sigma_jy=2.0, rfi=[burst], seed=3)  # fmt: skip
    fits = tile_fits(solve_observation(sim.metafits_path, sim.vis_paths, source.name), 4)
    assert not fits.failures
    truth = load_truth(sim.truth_path)
    for pol, name in ((0, "x"), (1, "y")):
        gains = np.array([row[f"{name}_gains"] for row in fits.rows], dtype=np.float64)
        np.testing.assert_allclose(gains, truth.gain_amplitudes[:, pol], rtol=0.01)


def test_an_upgrade_turns_the_conjugated_pipeline_s_fits_into_hyperdrive_s_convention(
    db_url: str,
) -> None:
    """Fits of version 0.1.0's pipeline had the other sign of delay and intercept, and cached
    files the conversion would now apply with each gain's phase doubled. The migration
    corrects the former and stops serving the latter; fits from elsewhere stay as they are."""
    from sqlalchemy import text

    from observatory.core.database import make_engine
    from observatory.core.migrate import upgrade

    upgrade(db_url, "0010")
    engine = make_engine(db_url)
    ours = "StEFCal against the catalogue point source HydA"
    fits = [(1, "0.1.0", ours), (2, "1.7.30", "hyperdrive di-calibrate ..."), (3, "0.1.0", "msok")]
    with engine.begin() as connection:
        for fitid, version, command in fits:
            connection.execute(
                text(
                    "INSERT INTO calibration_fits (fitid, obsid, creator, code_version, fit_time, "
                    "calibration_command, solution_file) VALUES (:fitid, 1400000000, 'calvin', "
                    ":version, CURRENT_TIMESTAMP, :command, :file)"
                ),
                {"fitid": fitid, "version": version, "command": command, "file": f"{fitid}/x.bin"},
            )
            connection.execute(text(
                "INSERT INTO calibration_solutions (fitid, tileid, obsid, antenna, x_delay_m, "
                "x_intercept, y_delay_m, y_intercept, x_gains, y_gains, x_gains_pol0, "
                "x_gains_pol1, y_gains_pol0, y_gains_pol1, x_gains_sigma_resid, "
                "y_gains_sigma_resid) VALUES (:fitid, 11, 1400000000, 0, 1.5, 0.25, -2.0, NULL, "
                "'[0.5]', '[0.5]', '[]', '[]', '[]', '[]', '[]', '[]')"
            ), {"fitid": fitid})  # fmt: skip
    upgrade(db_url)
    with engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT f.fitid, f.solution_file, s.x_delay_m, s.x_intercept, s.y_delay_m, "
            "s.y_intercept FROM calibration_fits f JOIN calibration_solutions s "
            "ON s.fitid = f.fitid ORDER BY f.fitid"
        )).all()  # fmt: skip
    engine.dispose()
    assert [tuple(row) for row in rows] == [
        (1, None, -1.5, -0.25, 2.0, None),
        (2, "2/x.bin", 1.5, 0.25, -2.0, None),
        (3, "3/x.bin", 1.5, 0.25, -2.0, None),
    ]
