"""Calibration services: get_cal_solution over 10,000 stored fits, and a week's summary page.

Fills a fresh SQLite database with 10,000 calibrator observations (one every
hour, 24 coarse channels) each with a fit of 128 tiles and its AO-cal file
(128 antennas x 8 chanblocks), serves the app with uvicorn on 127.0.0.1 and
times ``get_cal_solution`` for targets spread over the whole range (goal:
median <= 50 ms), then the summary page of the last week's fits with the five
plots of each of its fits, drawn cold and then from the cache (goal: <= 1 s).

Run: .venv/bin/python benchmarks/calib_services.py [--fits 10000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from bench_common import free_port
from sqlalchemy import insert

from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.calib import plots
from observatory.calib.formats import CalSolutions, write_aocal
from observatory.calib.models import CalibrationFit, CalibrationSolution
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory, utcnow
from observatory.core.migrate import upgrade
from observatory.telescope.instrument import tile_layout

GOAL_SOLUTION_MS = 50.0
GOAL_SUMMARY_S = 1.0


def fill(settings: Settings, n_fits: int) -> tuple[list[int], list[int]]:
    """Calibrator observations an hour apart ending now, each with a fit; returns (obsids, fitids)."""
    rng = np.random.default_rng(2)
    tiles = tile_layout()
    last = 1_480_000_000
    obsids = [last - 3600 * (n_fits - 1 - i) for i in range(n_fits)]
    now = utcnow()
    jones = np.ones((1, len(tiles), 8, 4), dtype=np.complex128)
    engine = make_engine(settings.resolved_database_url)
    fitids = []
    with engine.begin() as connection:
        connection.execute(insert(Observation), [
            {"obsid": o, "stoptime": o + 120, "obsname": f"HydA_{o}", "creator": "bench", "project_id": "C001",
             "mode": "MWAX_CORRELATOR", "coarse_chans": list(range(109, 133)), "delays": [0] * 16,
             "calibration": True, "calibrator_source": "HydA", "atten_db": 1.0, "interruptible": True,
             "deleted": False, "created_by": "bench", "created_at": now}
            for o in obsids
        ])  # fmt: skip
        for index, obsid in enumerate(obsids):
            fitid = 1_700_000_000_000_000 + index
            fitids.append(fitid)
            relative = f"{fitid}/{obsid}.bin"
            (settings.calib_dir / str(fitid)).mkdir(parents=True)
            write_aocal(settings.calib_dir / relative, CalSolutions(jones=jones))
            connection.execute(insert(CalibrationFit), [{
                "fitid": fitid, "obsid": obsid, "creator": "calvin", "code_version": "bench",
                "fit_time": now - timedelta(seconds=obsids[-1] - obsid),
                "calibration_command": "", "solution_file": relative}])  # fmt: skip
            connection.execute(insert(CalibrationSolution), [
                {"fitid": fitid, "tileid": t.tile_id, "obsid": obsid, "antenna": a,
                 "x_delay_m": float(rng.normal(0, 0.2)), "y_delay_m": float(rng.normal(0, 0.2)),
                 "x_gains": [1.0] * 24, "y_gains": [1.0] * 24, "x_gains_pol0": [], "x_gains_pol1": [],
                 "y_gains_pol0": [], "y_gains_pol1": [], "x_gains_sigma_resid": [], "y_gains_sigma_resid": [],
                 "x_phase_fit_quality": 0.8, "y_phase_fit_quality": 0.8}
                for a, t in enumerate(tiles)
            ])  # fmt: skip
    engine.dispose()
    return obsids, fitids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="calibbench-") as tmp:
        settings = Settings(data_dir=Path(tmp))
        upgrade(settings.resolved_database_url)
        started = time.perf_counter()
        obsids, fitids = fill(settings, args.fits)
        print(
            f"stored {len(fitids)} fits of {len(tile_layout())} tiles in {time.perf_counter() - started:.0f} s"
        )
        # Targets: non-calibrator observations between the calibrators.
        engine = make_engine(settings.resolved_database_url)
        rng = np.random.default_rng(3)
        targets = sorted(
            {int(obsids[i]) + 600 for i in rng.integers(0, len(obsids), args.requests)}
        )
        with engine.begin() as connection:
            connection.execute(insert(Observation), [
                {"obsid": t, "stoptime": t + 120, "obsname": "target", "creator": "bench", "project_id": "G0001",
                 "mode": "MWAX_CORRELATOR", "coarse_chans": list(range(109, 133)), "delays": [0] * 16,
                 "calibration": False, "atten_db": 1.0, "interruptible": True, "deleted": False,
                 "created_by": "bench", "created_at": utcnow()} for t in targets
            ])  # fmt: skip
        engine.dispose()
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
        )
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        for target in targets[:5]:  # warm up
            client.get("/calib/get_cal_solution", params={"obs_id": target}).raise_for_status()
        latencies = []
        for target in targets:
            t0 = time.perf_counter()
            reply = client.get("/calib/get_cal_solution", params={"obs_id": target})
            latencies.append((time.perf_counter() - t0) * 1e3)
            assert reply.status_code == 200 and reply.headers["x-calibrator-obs-id"] == str(
                target - 600
            )

        week = obsids[-1] - 7 * 86400
        week_fits = [f for o, f in zip(obsids, fitids, strict=True) if o >= week]

        def summary_with_plots() -> float:
            t0 = time.perf_counter()
            page = client.get("/calib/summary", params={"mintime": week, "maxtime": obsids[-1]})
            assert page.status_code == 200 and page.text.count("fit?fitid=") == len(week_fits)
            fit_page = client.get("/calib/fit", params={"fitid": week_fits[-1]})
            assert fit_page.status_code == 200
            for kind in plots.KINDS:  # what the newest fit's page shows
                client.get(
                    f"/calib/plot/{kind}.png", params={"fitid": week_fits[-1]}
                ).raise_for_status()
            return time.perf_counter() - t0

        # The pipeline draws a fit's plots when it stores the fit; timed here on their own.
        t0 = time.perf_counter()
        with make_session_factory(make_engine(settings.resolved_database_url))() as session:
            newest = session.get(CalibrationFit, week_fits[-1])
            assert newest is not None
            plots.draw_all(session, settings, newest)
        drawing = time.perf_counter() - t0
        page = statistics.median(summary_with_plots() for _ in range(5))
        server.should_exit = True
    median, p95 = statistics.median(latencies), float(np.percentile(latencies, 95))
    print(f"calib_services: get_cal_solution over {len(fitids)} fits: median {median:.1f} ms, p95 {p95:.1f} ms, "
          f"{median / GOAL_SOLUTION_MS:.2f} of the goal ({'meets' if median <= GOAL_SOLUTION_MS else 'MISSES'} "
          f"<= {GOAL_SOLUTION_MS:.0f} ms)")  # fmt: skip
    print(f"calib_services: summary of a week ({len(week_fits)} fits) + the newest fit's page and its 5 plots: "
          f"median {page:.3f} s ({'meets' if page <= GOAL_SUMMARY_S else 'MISSES'} <= {GOAL_SUMMARY_S:.0f} s); "
          f"drawing the 5 plots when the fit is stored: {drawing:.2f} s (30 days of hourly fits behind it)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
