"""Fitting a calibrator observation from the archive: solve, fit delays and gains, store.

The data go through the conversion engine's instrumental corrections (cable
lengths, digital gains, passband unless flat) with the coarse-channel edges
(80 kHz) and flagged tiles weighted out. The model is the calibrator's
catalogue point source, unphased, in the same (pyuvdata) convention:
``M_pq = S(f) exp(2 pi i f (tau_p - tau_q))`` with ``tau_p = -(x_p . s) / c``.
StEFCal gives each tile's gains per fine channel; the AO-cal solutions are their
inverse, conjugated into the raw data's convention as hyperdrive writes them.
calvin's fits on them give ``x_delay_m`` (minus the fitted length of the solutions
referenced to the lowest unflagged Tile ID: ``-c dtau`` for a tile whose signal
arrives late by ``dtau``) and the gains per coarse channel.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from observatory import __version__
from observatory.archive.models import Observation
from observatory.archive.service import correlator_inputs
from observatory.calib.fitting import PhaseFit, fit_gain, fit_phase_line
from observatory.calib.formats import CalSolutions
from observatory.calib.models import CalibrationFit, CalibrationRequest
from observatory.calib.plots import draw_all
from observatory.calib.service import store_fit
from observatory.calib.solving import (
    SolvedObservation,
    Unsolvable,
    check_solvable,
    solve_in_process,
)
from observatory.core.config import Settings
from observatory.core.errors import BadRequest
from observatory.core.locks import resource_lock
from observatory.core.processes import (
    CommandFailed,
    WorkerClosing,
    stop_if_worker_closing,
)
from observatory.core.storage import Storage
from observatory.preprocess.reader import ObservationMeta
from observatory.telescope.instrument import COARSE_CHAN_WIDTH_HZ

#: The lock kind of a calibrator observation's fit (:func:`~observatory.core.locks.resource_lock`):
#: the runs of every request for one calibrator take it in turn.
CALIBRATOR_LOCK_KIND = "calib.calibrator"

#: calvin's settings (specs/calib.md 3.1): phase-fit iterations (its 80 kHz edges are the
#: conversion's default, see ``solving.solve_observation``).
PHASE_FIT_NITER = 3
#: A phase fit is a delay measurement only with at least this quality (the fraction of
#: all chanblocks its clipping kept). Good fits keep ~0.75-0.88 (real hyperdrive
#: solutions 0.77-0.84, specs/calib.md 3.3); a tile of noise, or a calibrator too faint
#: for its noise, keeps ~0.3-0.6.
MIN_PHASE_FIT_QUALITY = 0.5
#: ... and with phase residuals spread by at most this (radians). Good fits: ~0.08 rad
#: (real, specs/calib.md 3.3) up to ~0.3 rad on faint simulated calibrators; noise,
#: whose phases follow no line, ~0.85-1.4 rad whatever its quality.
MAX_PHASE_SIGMA_RESID_RAD = 0.6


class CalibrationFailed(Exception):
    """A calibrator observation that gave no fit (no tile calibrated, or its solve failed)."""


@dataclass(frozen=True)
class TileFits:
    """The ``calibration_solutions`` rows of a solve, and why tiles did not calibrate."""

    rows: list[dict[str, object]]
    #: Reason -> number of tiles that did not calibrate for it.
    failures: Counter[str]
    #: The tile id the delays are referenced to (0 m by construction); None when it did
    #: not calibrate (no other tile did).
    reference_tileid: int | None = None


def delay_limit_m(meta: ObservationMeta) -> float | None:
    """The largest cable-length residual that is physically possible, or None if unknown.

    A residual is the error in the recorded electrical length of a tile's cable minus
    that of the reference tile's. Each recorded and each real length lies between 0 and
    the longest cable of the array, so each error is within plus or minus that length,
    and their difference within twice it. A fitted delay beyond it is no delay at all:
    the phase line of noise (whose FFT peak can be anywhere on its +-3750 m grid).
    """
    lengths = np.abs(np.asarray(meta.cable_length_m, dtype=np.float64))
    longest = float(np.nanmax(lengths)) if lengths.size and np.isfinite(lengths).any() else 0.0
    return 2.0 * longest if longest > 0 else None


def _phase_problem(phase: PhaseFit, limit_m: float | None) -> str | None:
    """Why a phase fit is no delay measurement (see the thresholds above), or None."""
    if limit_m is not None and not abs(phase.length_m) <= limit_m:
        return f"with a delay beyond +-{limit_m:.0f} m (twice the longest cable)"
    if not phase.quality >= MIN_PHASE_FIT_QUALITY:
        return f"with a phase fit quality below {MIN_PHASE_FIT_QUALITY}"
    if not phase.sigma_resid <= MAX_PHASE_SIGMA_RESID_RAD:
        return f"with a phase residual spread above {MAX_PHASE_SIGMA_RESID_RAD} rad"
    return None


#: How many other tiles a reference candidate is tried against (see ``_reference_tile``).
REFERENCE_CHECK_TILES = 3


def _referenced_phase(
    jones: NDArray[np.complex128], antenna: int, reference: int, element: int,
    freqs_hz: NDArray[np.float64],
) -> PhaseFit:  # fmt: skip
    """The phase line of ``antenna``'s solutions relative to ``reference``'s (one Jones
    element: 0 for X, 3 for Y). Raises ValueError with fewer than 2 usable chanblocks.

    Over the chanblocks solved for some tile: those flagged for every tile by design (the
    coarse channels' edges and DC) are no part of a fit's quality. At 320 kHz the edges
    are half of each coarse channel, and counted, they held every fit below
    ``MIN_PHASE_FIT_QUALITY``: good tiles were left uncalibrated.
    """
    solved = np.isfinite(jones[:, :, element]).any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):  # flagged chanblocks are NaN
        referenced = jones[solved, antenna, element] / jones[solved, reference, element]
    weights = np.isfinite(referenced).astype(np.float64)
    return fit_phase_line(freqs_hz[solved], referenced, weights, PHASE_FIT_NITER)


def _reference_tile(
    jones: NDArray[np.complex128], usable: NDArray[np.bool_], tile_ids: NDArray[np.int64],
    freqs_hz: NDArray[np.float64], limit_m: float | None,
) -> int:  # fmt: skip
    """The reference tile: the lowest-id usable tile against which most of the next
    ``REFERENCE_CHECK_TILES`` tiles give a delay measurement in both polarisations.

    calvin's reference is the lowest tile id; but a dead tile the metafits does not flag
    has finite solutions of noise, and every other tile referenced to it fails: one dead
    tile lost the whole calibrator, the error blaming the others.
    """
    candidates = np.flatnonzero(usable)[np.argsort(tile_ids[usable], kind="stable")]
    if len(candidates) == 0:
        return 0

    def measures(antenna: int, reference: int) -> bool:
        try:
            return all(
                _phase_problem(_referenced_phase(jones, antenna, reference, element, freqs_hz),
                               limit_m) is None
                for element in (0, 3)
            )  # fmt: skip
        except ValueError:
            return False

    for candidate in candidates:
        others = [int(a) for a in candidates if a != candidate][:REFERENCE_CHECK_TILES]
        if not others or 2 * sum(measures(a, int(candidate)) for a in others) > len(others):
            return int(candidate)
    return int(candidates[0])  # none better: the tiles fail whatever the reference


def tile_fits(solved: SolvedObservation, n_coarse_metafits: int) -> TileFits:
    """One ``calibration_solutions`` row per tile, calvin's way (NaN rows for failed tiles).

    The per-coarse-channel arrays have ``n_coarse_metafits`` values in the metafits'
    coarse-channel order, each channel's at its place: a channel with no data file is NaN
    (specs/calib.md 3.4).

    A tile calibrates when both its polarisations give a delay measurement: a phase fit
    (at least 2 usable chanblocks) within :func:`delay_limit_m`, of quality at least
    ``MIN_PHASE_FIT_QUALITY`` and residual spread at most ``MAX_PHASE_SIGMA_RESID_RAD``.
    Otherwise its row is NaN (a tile whose X or Y solutions are noise is flagged as a
    whole, as hyperdrive reads a Jones with a NaN in it). The reference tile (the lowest
    tile id that others measure against, :func:`_reference_tile`) has delay 0 by
    construction: it counts as calibrated only when another tile did.
    """
    meta, freqs = solved.meta, solved.freqs_hz
    places = _channel_places(solved, n_coarse_metafits)
    jones = solved.file_jones()
    tile_ids = np.array(meta.antenna_numbers)
    usable = ~meta.flagged_antennas & np.isfinite(jones[:, :, 0]).any(axis=0)
    limit_m = delay_limit_m(meta)
    reference = _reference_tile(jones, usable, tile_ids, freqs, limit_m)
    nan = [math.nan] * n_coarse_metafits
    failed_row: dict[str, object] = {f"{pol}_{name}": value for pol in ("x", "y") for name, value in (
        ("delay_m", math.nan), ("intercept", math.nan), ("gains", nan), ("gains_pol0", nan),
        ("gains_pol1", nan), ("gains_sigma_resid", nan), ("phase_sigma_resid", math.nan),
        ("phase_chi2dof", math.nan), ("phase_fit_quality", math.nan),
        ("gains_fit_quality", math.nan))}  # fmt: skip
    rows: list[dict[str, object]] = []
    failures: Counter[str] = Counter()
    for antenna, tileid in enumerate(tile_ids):
        row: dict[str, object] = {"tileid": int(tileid), "antenna": antenna, **failed_row}
        rows.append(row)
        if meta.flagged_antennas[antenna]:
            failures["flagged in the metafits"] += 1
            continue
        if not usable[antenna]:
            failures["with no solution from the solver"] += 1
            continue
        fitted: dict[str, object] = {}
        problem = None
        for pol, element in (("x", 0), ("y", 3)):
            raw = jones[:, antenna, element]
            try:
                phase = _referenced_phase(jones, antenna, reference, element, freqs)
            except ValueError:
                problem = "with fewer than 2 usable chanblocks"
                break
            if (problem := _phase_problem(phase, limit_m)) is not None:
                break
            gain = fit_gain(
                freqs, raw, np.isfinite(raw).astype(np.float64), solved.chanblocks_per_coarse
            )
            fitted |= {
                f"{pol}_delay_m": -phase.length_m,  # calvin stores minus the length
                f"{pol}_intercept": phase.intercept,
                f"{pol}_phase_sigma_resid": phase.sigma_resid, f"{pol}_phase_chi2dof": phase.chi2dof,
                f"{pol}_phase_fit_quality": phase.quality,
                f"{pol}_gains": _pad(gain.gains, places, n_coarse_metafits),
                f"{pol}_gains_pol0": _pad(gain.pol0, places, n_coarse_metafits),
                f"{pol}_gains_pol1": _pad(gain.pol1, places, n_coarse_metafits),
                f"{pol}_gains_sigma_resid": _pad(gain.sigma_resid, places, n_coarse_metafits),
                f"{pol}_gains_fit_quality": gain.quality,
            }  # fmt: skip
        if problem is not None:
            failures[problem] += 1
        else:
            row |= fitted
    calibrated = [a for a, row in enumerate(rows) if np.isfinite(float(row["x_delay_m"]))]  # type: ignore[arg-type]
    if calibrated == [reference]:  # its 0 m is relative to no other tile
        rows[reference] |= failed_row
        failures["the reference tile, with no other tile calibrated"] += 1
    # The reference is recorded only when it calibrated (another tile measured against it).
    reference_tileid = (
        int(tile_ids[reference]) if reference in calibrated and len(calibrated) > 1 else None
    )
    return TileFits(rows, failures, reference_tileid)


def _channel_places(solved: SolvedObservation, n: int) -> NDArray[np.int64]:
    """Where each solved coarse channel goes in the metafits' coarse-channel order (-1: nowhere)."""
    n_solved = len(solved.freqs_hz) // max(solved.chanblocks_per_coarse, 1)
    if not solved.coarse_chans:  # channel numbers unknown: in order
        return np.arange(n_solved, dtype=np.int64)
    metafits = np.asarray(solved.meta.metafits_coarse_chans, dtype=np.int64)
    solved_chans = np.asarray(solved.coarse_chans[:n_solved], dtype=np.int64)
    match = metafits[None, :] == solved_chans[:, None]  # (solved, metafits)
    places = np.where(match.any(axis=1), match.argmax(axis=1), -1)
    return np.where(places < n, places, -1).astype(np.int64)


def _pad(values: NDArray[np.float64], places: NDArray[np.int64], n: int) -> list[float]:
    """``values`` (one per solved coarse channel) at their ``places`` among ``n``; NaN elsewhere."""
    padded = np.full(n, np.nan)
    k = min(len(values), len(places))
    keep = places[:k] >= 0
    padded[places[:k][keep]] = np.asarray(values[:k], dtype=np.float64)[keep]
    return [float(v) for v in padded]


def _whole_band(
    solved: SolvedObservation, jones: NDArray[np.complex128]
) -> tuple[NDArray[np.complex128], NDArray[np.float64]]:
    """The solutions (chanblock, antenna, 4) and chanblock frequencies over the metafits'
    whole band, in frequency order: a coarse channel with no data file gets NaN solutions
    (flagged), at the frequencies its fine channels would have had.

    A target observed with every channel is calibrated with the calibrator's fit: solutions
    for the channels that had files only were refused for it ("do not cover ... coarse
    channel(s) 110"), in every format served.
    """
    per_coarse = solved.chanblocks_per_coarse
    band = sorted(solved.meta.metafits_coarse_chans)
    solved_chans = list(solved.coarse_chans)
    if not solved_chans or solved_chans == band or per_coarse < 1:
        return jones, solved.freqs_hz
    # Each channel's fine-channel offsets from its centre are the same (MWAX's or legacy's).
    offsets_hz = solved.freqs_hz[:per_coarse] - solved_chans[0] * COARSE_CHAN_WIDTH_HZ
    freqs_hz = (np.asarray(band, dtype=np.float64)[:, None] * COARSE_CHAN_WIDTH_HZ
                + offsets_hz[None, :]).ravel()  # fmt: skip
    whole = np.full((len(band) * per_coarse, *jones.shape[1:]), np.nan, dtype=jones.dtype)
    for index, chan in enumerate(solved_chans):
        place = band.index(chan)
        whole[place * per_coarse : (place + 1) * per_coarse] = jones[
            index * per_coarse : (index + 1) * per_coarse
        ]
        freqs_hz[place * per_coarse : (place + 1) * per_coarse] = solved.freqs_hz[
            index * per_coarse : (index + 1) * per_coarse
        ]
    return whole, freqs_hz


def fit_observation(session: Session, settings: Settings, obsid: int) -> CalibrationFit:
    """Solve and fit an archived calibrator observation, and store the fit (flushed, not committed).

    A solve in which no tile calibrated (no finite delay in either polarisation, e.g.
    every tile but one flagged) stores nothing: it is not a solution for any target.

    Raises
    ------
    BadRequest
        If the observation is not a calibrator observation with files in the archive.
    CalibrationFailed
        If no tile calibrated.
    """
    observation = session.get(Observation, obsid)
    if observation is None or not observation.calibration or not observation.calibrator_source:
        raise BadRequest(f"observation {obsid} is not a calibrator observation in the archive")
    metafits, files = correlator_inputs(session, Storage(settings.archive_dir), obsid)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.work_dir, prefix=f"calib-{obsid}-") as work:
        try:
            solved = solve_in_process(metafits, files, observation.calibrator_source, Path(work))
        except CommandFailed as exc:
            raise CalibrationFailed(f"observation {obsid} could not be solved: {exc}") from None
    jones = solved.file_jones()
    # A delay is the slope of phase with frequency: it needs 2 chanblocks with solutions.
    # calib-solve refuses such a solve itself (the message comes through CommandFailed
    # above); checked again here, by the same rule, for a solve made otherwise. With fewer
    # than 2 unflagged tiles nothing can be solved at all: that is the tiles' fault, and
    # said so below.
    try:
        check_solvable(solved, len(files))
    except Unsolvable as exc:
        raise CalibrationFailed(f"{exc}; no fit was stored") from None
    # One timeblock: hyperdrive's times are centroids, the first timestep's and the last's
    # (specs/calib.md 1.3: obsid + half an integration, ...).
    centroids = solved.time_centroids_gps
    if centroids is None or len(centroids) == 0:
        half = solved.meta.int_time_s / 2.0
        centroids = np.array(
            [observation.obsid + half, (observation.stoptime or observation.obsid) - half]
        )
    start, end = float(centroids[0]), float(centroids[-1])
    band_jones, band_freqs_hz = _whole_band(solved, jones)
    solutions = CalSolutions(
        jones=band_jones.transpose(1, 0, 2)[None], start_gps=start, end_gps=end,
        timeblocks_gps=np.array([[start, end, float(np.mean(centroids))]]),
        chanblock_freqs_hz=band_freqs_hz, obsid=obsid, tile_names=list(solved.meta.antenna_names),
        tile_flags=solved.meta.flagged_antennas.copy(),
    )  # fmt: skip
    fitted = tile_fits(solved, len(solved.meta.metafits_coarse_chans))
    rows = fitted.rows
    delays = np.array([[row["x_delay_m"], row["y_delay_m"]] for row in rows], dtype=float)
    calibrated = np.isfinite(delays).any(axis=1)
    if not calibrated.any():
        why = ", ".join(
            f"{n} of {len(rows)} tiles {reason}" for reason, n in fitted.failures.most_common()
        )
        raise CalibrationFailed(
            f"no tile of observation {obsid} calibrated ({why}); no fit was stored"
        )
    # The solutions of a tile that did not calibrate are no solutions (noise, or nothing):
    # NaN, which hyperdrive and the conversion read as a flagged tile.
    solutions.jones[:, ~calibrated] = np.nan
    fit = store_fit(
        session, settings, obsid, solutions, rows, creator="calvin", code_version=__version__,
        fit_niter=PHASE_FIT_NITER, fit_limit=solved.max_iterations,
        source_list=observation.calibrator_source, num_sources=1,
        reference_tileid=fitted.reference_tileid,
        calibration_command=f"StEFCal against the catalogue point source {observation.calibrator_source}",
    )  # fmt: skip
    draw_all(session, settings, fit)  # the summary pages never wait for a plot
    return fit


def run_request(settings_values: dict[str, object], request_id: int) -> str:
    """A Dask task: fit a request's calibrator and finish the request; returns ``completed``/``error``.

    Idempotent: a request that already finished is left as it is. A fit that fails
    finishes the request with the reason (its callback reports it). Two runs for one
    calibrator never overlap: a run holds the calibrator's lock from its first look at
    the request until its result is stored, so a run resubmitted by a restarted
    dispatcher waits for one still going from before, then finds the request finished.

    Requests for the same calibrator join: a fit has no parameter but the calibrator
    observation, so the fit (or failure) of one finishes every request for that
    calibrator not finished by then, and their runs, waiting on the lock, find them
    finished without fitting again. Each request keeps its own ASVO job and callback.
    """
    from observatory.core.database import make_engine, make_session_factory

    settings = Settings(**settings_values)  # type: ignore[arg-type]
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            request = session.get(CalibrationRequest, request_id)
            if request is None:
                return "error"
            cal_id = request.cal_id
        with resource_lock(settings, engine, CALIBRATOR_LOCK_KIND, cal_id):
            return _run_request_locked(settings, engine, request_id)
    finally:
        engine.dispose()


def _run_request_locked(settings: Settings, engine: Engine, request_id: int) -> str:
    """``run_request`` while holding the lock of the request's calibrator."""
    from observatory.calib.requests import finish_request
    from observatory.core.database import make_session_factory, utcnow

    stop_if_worker_closing()  # the lock came while the server stops: nothing started yet
    with make_session_factory(engine)() as session:
        request = session.get(CalibrationRequest, request_id)
        if request is None:
            return "error"
        if request.calibration_completed_datetime or request.calibration_error_datetime:
            return "completed" if request.calibration_fit_id else "error"
        cal_id = request.cal_id
        # Scratch of an earlier run of this calibrator's fit whose worker was killed
        # (kill -9, the OOM killer): no run of it is going on while this one holds its lock.
        for stale in settings.work_dir.glob(f"calib-{cal_id}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        started = utcnow()
        # Every unfinished request of this calibrator joins this run's fit: each is started
        # now (those filed while it runs, when it ends), not only the one that runs it.
        _join_unfinished_requests(session, cal_id, started)
        session.commit()
        try:
            fit = fit_observation(session, settings, cal_id)
        except WorkerClosing:  # not the request's failure: it is run again after a restart
            session.rollback()
            raise
        except Exception as exc:  # recorded: the requesters are told why
            session.rollback()
            for joined in _join_unfinished_requests(session, cal_id, started):
                finish_request(session, joined, error=f"{exc.__class__.__name__}: {exc}")
            session.commit()
            return "error"
        for joined in _join_unfinished_requests(session, cal_id, started):
            finish_request(session, joined, fit_id=fit.fitid)
        session.commit()
        return "completed"


def _join_unfinished_requests(
    session: Session, cal_id: int, started: datetime
) -> list[CalibrationRequest]:
    """The unfinished requests of calibrator ``cal_id``, marked as started at ``started``
    (the run of its fit they join; a run holds the calibrator's lock, so no other started
    them since)."""
    joined = _unfinished_requests(session, cal_id)
    for request in joined:
        request.assigned_datetime = request.assigned_datetime or started
        request.calibration_started_datetime = started
    return joined


def _unfinished_requests(session: Session, cal_id: int) -> list[CalibrationRequest]:
    """The requests for calibrator ``cal_id`` that have not finished (they join its fit)."""
    return list(session.scalars(
        select(CalibrationRequest).where(
            CalibrationRequest.cal_id == cal_id,
            CalibrationRequest.calibration_completed_datetime.is_(None),
            CalibrationRequest.calibration_error_datetime.is_(None),
        ).order_by(CalibrationRequest.id)
    ))  # fmt: skip
