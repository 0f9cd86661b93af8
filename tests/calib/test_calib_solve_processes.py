"""The calibration solve uses every core, and runs in a process of its own for a fit."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from backends import sqlite_only
from observatory.archive.simulated import catalogue_point_source, simulate_and_register
from observatory.calib import pipeline, solving
from observatory.calib.pipeline import CalibrationFailed, fit_observation
from observatory.calib.solving import SolvedObservation, solve_observation
from observatory.core.config import Settings
from observatory.telescope.simulator import RfiBurst, SimulatedObservation, simulate_observation

CAL_OBS = 1_450_324_816  # 3C353 60 degrees up
SOURCE = catalogue_point_source("3C353")


def _calibrator(directory: Path) -> SimulatedObservation:
    """A small calibrator observation over 3 coarse channels, a transmitter in one."""
    return simulate_observation(
        directory, CAL_OBS, n_tiles=8, coarse_chans=(109, 110, 111), n_timesteps=6,
        sources=[SOURCE], calibrator=SOURCE.name, delay_error_scatter_ns=2.0, noise_sigma_jy=1.0,
        rfi=[RfiBurst(110, (10, 12), (1, 4), 20_000.0)],
    )  # fmt: skip


def _assert_same(solved: SolvedObservation, expected: SolvedObservation) -> None:
    np.testing.assert_array_equal(solved.solution.gains, expected.solution.gains)
    np.testing.assert_array_equal(solved.freqs_hz, expected.freqs_hz)
    assert solved.coarse_chans == expected.coarse_chans


#: A solve from the main thread of a fresh interpreter (this one keeps other tests' threads,
#: beside which nothing is forked), each pool worker started recorded as a file of its pid.
_SOLVE_IN_A_MAIN_THREAD = """
import os, sys
from pathlib import Path
import numpy as np
from observatory.calib import solving
started, out, metafits, *data = sys.argv[1:]
real_start = solving._start_solve_worker
def recording_start(*args):
    (Path(started) / str(os.getpid())).touch()
    real_start(*args)
solving._start_solve_worker = recording_start
solved = solving.solve_observation(Path(metafits), [Path(d) for d in data], "3C353", workers=2)
np.savez(out, gains=solved.solution.gains, freqs_hz=solved.freqs_hz)
print(os.getpid())
"""


def test_channels_are_flagged_and_summed_in_forked_processes_with_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AOFlagger holds the GIL: from a main thread running alone, coarse channels go to
    worker processes (two here, each its own process); from another thread (a Dask
    worker's), to threads. The solutions are the same whichever way, and the same as one
    channel at a time."""
    sim = _calibrator(tmp_path / "sim")
    one_by_one = solve_observation(sim.metafits_path, sim.vis_paths, SOURCE.name, workers=1)
    assert np.isfinite(one_by_one.solution.gains).mean() > 0.5
    started = tmp_path / "started"
    started.mkdir()
    out = tmp_path / "in_processes.npz"
    solved = subprocess.run(
        [sys.executable, "-c", _SOLVE_IN_A_MAIN_THREAD, str(started), str(out),
         str(sim.metafits_path), *map(str, sim.vis_paths)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert solved.returncode == 0, solved.stderr
    workers = {int(p.name) for p in started.iterdir()}
    assert len(workers) == 2 and int(solved.stdout) not in workers
    with np.load(out) as in_processes:
        np.testing.assert_array_equal(in_processes["gains"], one_by_one.solution.gains)
        np.testing.assert_array_equal(in_processes["freqs_hz"], one_by_one.freqs_hz)

    real_start = solving._start_solve_worker

    def recording_start(*args: Any) -> None:
        (started / str(os.getpid())).touch()
        real_start(*args)

    monkeypatch.setattr(solving, "_start_solve_worker", recording_start)
    for path in started.iterdir():
        path.unlink()
    results: list[SolvedObservation] = []
    thread = threading.Thread(
        target=lambda: results.append(
            solve_observation(sim.metafits_path, sim.vis_paths, SOURCE.name, workers=2)
        )
    )
    thread.start()
    thread.join()
    assert not list(started.iterdir())  # no process forked from a thread
    _assert_same(results[0], one_by_one)


def test_the_solve_command_writes_what_the_pipeline_reads(tmp_path: Path) -> None:
    sim = _calibrator(tmp_path / "sim")
    out = tmp_path / "solved.npz"
    done = subprocess.run(
        [sys.executable, "-m", "observatory", "calib-solve", "--metafits", str(sim.metafits_path),
         *map(str, sim.vis_paths), "--source", SOURCE.name, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out}"
    loaded = SolvedObservation.load(out, sim.metafits_path)  # no data file opened
    expected = solve_observation(sim.metafits_path, sim.vis_paths, SOURCE.name)
    _assert_same(loaded, expected)
    for field in dataclasses.fields(loaded.meta):  # the metadata the data files would give
        np.testing.assert_equal(
            getattr(loaded.meta, field.name), getattr(expected.meta, field.name)
        )
    np.testing.assert_array_equal(loaded.time_centroids_gps, expected.time_centroids_gps)
    assert loaded.chanblocks_per_coarse == expected.chanblocks_per_coarse
    assert loaded.max_iterations == expected.max_iterations
    np.testing.assert_array_equal(loaded.solution.iterations, expected.solution.iterations)
    np.testing.assert_array_equal(loaded.file_jones(), expected.file_jones())

    missing = subprocess.run(
        [sys.executable, "-m", "observatory", "calib-solve", "--metafits", str(sim.metafits_path),
         str(tmp_path / "gone.fits"), "--source", SOURCE.name, "--out", str(tmp_path / "x.npz")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 2 and "gone.fits" in missing.stderr, missing.stderr
    assert not (tmp_path / "x.npz").exists()


def _solve_processes() -> list[Any]:
    """This process's children running ``observatory calib-solve``."""
    import psutil

    return [
        child
        for child in psutil.Process().children(recursive=True)
        if "calib-solve" in " ".join(child.cmdline())
    ]


@sqlite_only  # the database is not the subject
def test_a_solve_that_crashes_fails_the_fit_and_not_the_worker(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """A native abort (mwalib's panic on a damaged file, the OOM killer) kills the solve's
    own process: the fit fails saying so, the process that asked carries on, and the next
    fit of the same observation is stored."""
    with session_factory() as session:
        simulate_and_register(
            session, settings, obsid=CAL_OBS, sources=[SOURCE], n_tiles=8,
            coarse_chans=(109, 110), n_timesteps=4, calibrator=SOURCE.name,
        )  # fmt: skip
        session.commit()
    failures: list[BaseException] = []

    def fit() -> None:
        with session_factory() as session:
            try:
                fit_observation(session, settings, CAL_OBS)
            except BaseException as exc:
                failures.append(exc)

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.monotonic() + 60
    while not (processes := _solve_processes()):
        assert time.monotonic() < deadline and thread.is_alive(), "no solve process started"
        time.sleep(0.01)
    processes[0].send_signal(signal.SIGKILL)
    thread.join(timeout=120)
    assert len(failures) == 1 and isinstance(failures[0], CalibrationFailed), failures
    assert str(failures[0]) == (
        f"observation {CAL_OBS} could not be solved: the calibration solve process died of "
        "SIGKILL (a crash in a native library, or out of memory)"
    )
    assert not list(settings.work_dir.glob("calib-*"))  # its scratch removed
    with session_factory() as session:
        stored = fit_observation(session, settings, CAL_OBS)
        assert stored.obsid == CAL_OBS and stored.solutions
    assert not _solve_processes()


@sqlite_only
def test_a_solve_stops_when_its_dask_worker_closes_and_its_request_stays_to_run_again(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """A server stopping closes its in-process Dask worker, which waited for a running
    calibrator's solve (minutes) to end. Now the solve is stopped; its request is neither
    completed nor failed, so the next start fits it."""
    from distributed import Client, LocalCluster
    from sqlalchemy import select

    from observatory.calib.models import CalibrationFit, CalibrationRequest
    from observatory.calib.requests import request_unfitted_calibrators

    with session_factory() as session:
        simulate_and_register(
            session, settings, obsid=CAL_OBS, sources=[SOURCE], n_tiles=8,
            coarse_chans=(109, 110), n_timesteps=4, calibrator=SOURCE.name,
        )  # fmt: skip
        (request,) = request_unfitted_calibrators(session)
        session.commit()
        request_id = request.id
    cluster = LocalCluster(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, worker_dashboard_address="127.0.0.1:0",
    )  # fmt: skip
    try:
        client = Client(cluster)
        future = client.submit(pipeline.run_request, settings.model_dump(), request_id, pure=False)
        deadline = time.monotonic() + 60
        while not _solve_processes():
            assert time.monotonic() < deadline and not future.done(), "no solve process started"
            time.sleep(0.01)
        client.close()
    finally:
        cluster.close()
    with session_factory() as session:
        request = session.get(CalibrationRequest, request_id)
        assert request is not None and request.calibration_started_datetime is not None
        assert request.calibration_completed_datetime is None
        assert request.calibration_error_datetime is None
        assert session.scalars(select(CalibrationFit)).all() == []
    deadline = time.monotonic() + 10
    while _solve_processes():  # SIGTERM'd (it dies of it at once: nothing to clean up)
        assert time.monotonic() < deadline, "the solve process was left running"
        time.sleep(0.05)
    assert not list(settings.work_dir.glob("calib-*"))  # the stopped run's scratch removed
    # A run whose worker was killed outright left its scratch: the next run removes it.
    stale = settings.work_dir / f"calib-{CAL_OBS}-killed"
    (stale / "solved.npz.tmp").mkdir(parents=True)
    assert pipeline.run_request(settings.model_dump(), request_id) == "completed"
    assert not stale.exists()
