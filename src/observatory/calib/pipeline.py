"""Fitting a calibrator observation from the archive: solve, fit delays and gains, store.

The data go through the conversion engine's instrumental corrections (cable
lengths, digital gains, passband unless flat) with the coarse-channel edges
(80 kHz) and flagged tiles weighted out. The model is the calibrator's
catalogue point source, unphased, in the same (pyuvdata) convention:
``M_pq = S(f) exp(2 pi i f (tau_p - tau_q))`` with ``tau_p = -(x_p . s) / c``.
StEFCal gives each tile's gains per fine channel; the AO-cal solutions are their
inverse; calvin's fits on them give ``x_delay_m`` (minus the fitted length of the
solutions referenced to the lowest unflagged Tile ID) and the gains per coarse
channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from observatory import __version__
from observatory.archive.models import Observation
from observatory.archive.service import correlator_inputs
from observatory.calib.fitting import fit_gain, fit_phase_line
from observatory.calib.formats import CalSolutions
from observatory.calib.models import CalibrationFit
from observatory.calib.plots import draw_all
from observatory.calib.service import store_fit
from observatory.calib.solver import Solution, normal_matrices, stefcal
from observatory.core.config import Settings
from observatory.core.errors import BadRequest
from observatory.core.locks import resource_lock
from observatory.core.storage import Storage
from observatory.preprocess import corrections
from observatory.preprocess.reader import ObservationMeta, open_reader
from observatory.telescope.catalogue import lookup
from observatory.telescope.instrument import SPEED_OF_LIGHT_M_S

#: The lock kind of calibration fit requests (:func:`~observatory.core.locks.resource_lock`).
REQUEST_LOCK_KIND = "calib.request"

#: calvin's settings (specs/calib.md 3.1): edges flagged, phase-fit iterations.
EDGE_WIDTH_HZ = 80_000
PHASE_FIT_NITER = 3
#: The solver's iteration limit: calvin runs hyperdrive with ``--max-iterations 500``.
#: Each fit records it as its ``fit_limit`` (the summary's "Niter/Limit" column).
SOLVER_MAX_ITERATIONS = 500


class CalibrationFailed(Exception):
    """A calibrator observation in which no tile calibrated: no fit is stored."""


@dataclass(frozen=True)
class SolvedObservation:
    """What the solve produced, before the fits."""

    meta: ObservationMeta
    freqs_hz: NDArray[np.float64]
    solution: Solution
    chanblocks_per_coarse: int
    #: The receiver channel numbers solved, in the order of ``freqs_hz`` (those with data files).
    coarse_chans: tuple[int, ...] = ()
    #: Centroid GPS times of the timesteps solved (hyperdrive's timeblock times).
    time_centroids_gps: NDArray[np.float64] | None = None
    #: The iteration limit StEFCal ran with.
    max_iterations: int = SOLVER_MAX_ITERATIONS


def solve_observation(
    metafits: Path,
    data_files: list[Path],
    source_name: str,
    max_iterations: int = SOLVER_MAX_ITERATIONS,
) -> SolvedObservation:
    """Solve one timeblock (the whole observation) against a catalogue point source.

    Parameters
    ----------
    metafits, data_files
        The observation's metafits and correlator files.
    source_name
        The calibrator: a catalogue name, the point-source model.
    max_iterations
        StEFCal's iteration limit per channel and polarisation (recorded in the result).
    """
    reader = open_reader(metafits, data_files)
    meta = reader.meta
    source = lookup(source_name)
    p, q = meta.baseline_antennas()
    positions = meta.enu_m - meta.enu_m.mean(axis=0)
    edge_chans = round(EDGE_WIDTH_HZ / meta.fine_chan_width_hz)
    blocks_a, blocks_b, all_freqs = [], [], []
    for coarse_chan in reader.coarse_chans:
        chunk = reader.read(coarse_chan, range(len(reader.time_start_gps_s)))
        factors = corrections.instrument_factors(
            meta, coarse_chan, chunk.freqs_hz, chunk.chan_index,
            cable=not meta.cable_delays_applied, digital_gains=True, passband=not meta.deripple_applied,
        )  # fmt: skip
        vis = chunk.vis * factors[None] if factors is not None else chunk.vis
        weights = (np.asarray(chunk.weights) > 0).all(axis=-1).astype(np.float64)
        weights = np.broadcast_to(weights, vis.shape[:3]).copy()
        weights[:, meta.flagged_antennas[p] | meta.flagged_antennas[q]] = 0.0
        weights[:, :, corrections.edge_and_dc_channels(chunk.chan_index, meta.fine_chans_per_coarse,
                                                       edge_chans, False)] = 0.0  # fmt: skip
        centres = chunk.time_start_gps_s + meta.int_time_s / 2.0
        directions = corrections.source_directions_enu((source.ra_deg, source.dec_deg), centres)
        tau = -(directions @ positions.T) / SPEED_OF_LIGHT_M_S  # (time, antenna)
        delay = tau[:, p] - tau[:, q]  # (time, baseline)
        flux = np.array([source.flux_jy(f / 1e6) for f in chunk.freqs_hz])
        model = flux[None, None, :] * np.exp(
            2j * np.pi * chunk.freqs_hz[None, None, :] * delay[:, :, None]
        )
        data = vis[..., [0, 3]]
        two_pol_model = np.repeat(model[..., None], 2, axis=-1)
        two_pol_weights = np.repeat(weights[..., None], 2, axis=-1)
        big_a, big_b = normal_matrices(data, two_pol_model, p, q, meta.n_ants, two_pol_weights)
        blocks_a.append(big_a)
        blocks_b.append(big_b)
        all_freqs.append(chunk.freqs_hz)
    solution = stefcal(
        np.concatenate(blocks_a), np.concatenate(blocks_b), max_iterations=max_iterations
    )
    return SolvedObservation(
        meta, np.concatenate(all_freqs), solution, meta.fine_chans_per_coarse,
        coarse_chans=tuple(int(c) for c in reader.coarse_chans),
        time_centroids_gps=np.asarray(reader.time_start_gps_s, np.float64) + meta.int_time_s / 2.0,
        max_iterations=max_iterations,
    )  # fmt: skip


def tile_fits(solved: SolvedObservation, n_coarse_metafits: int) -> list[dict[str, object]]:
    """One ``calibration_solutions`` row per tile, calvin's way (NaN rows for failed tiles).

    The per-coarse-channel arrays have ``n_coarse_metafits`` values in the metafits'
    coarse-channel order, each channel's at its place: a channel with no data file is NaN
    (specs/calib.md 3.4).
    """
    meta, freqs = solved.meta, solved.freqs_hz
    places = _channel_places(solved, n_coarse_metafits)
    jones = solved.solution.jones()  # (chan, antenna, 4): the AO-cal (inverse) solutions
    tile_ids = np.array(meta.antenna_numbers)
    usable = ~meta.flagged_antennas & np.isfinite(jones[:, :, 0]).any(axis=0)
    reference = int(np.flatnonzero(usable)[np.argmin(tile_ids[usable])]) if usable.any() else 0
    rows = []
    for antenna, tileid in enumerate(tile_ids):
        row: dict[str, object] = {"tileid": int(tileid), "antenna": antenna}
        for pol, element in (("x", 0), ("y", 3)):
            raw = jones[:, antenna, element]
            with np.errstate(invalid="ignore", divide="ignore"):  # flagged chanblocks are NaN
                referenced = raw / jones[:, reference, element]
            weights = np.isfinite(referenced).astype(np.float64)
            nan = [math.nan] * n_coarse_metafits
            row |= {f"{pol}_delay_m": math.nan, f"{pol}_intercept": math.nan, f"{pol}_gains": nan,
                    f"{pol}_gains_pol0": nan, f"{pol}_gains_pol1": nan, f"{pol}_gains_sigma_resid": nan}  # fmt: skip
            if not usable[antenna]:
                continue
            try:
                phase = fit_phase_line(freqs, referenced, weights, PHASE_FIT_NITER)
            except ValueError:
                continue
            gain = fit_gain(
                freqs, raw, np.isfinite(raw).astype(np.float64), solved.chanblocks_per_coarse
            )
            row |= {
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
        rows.append(row)
    return rows


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
    solved = solve_observation(metafits, files, observation.calibrator_source)
    jones = solved.solution.jones()  # (chanblock, antenna, 4)
    # One timeblock: hyperdrive's times are centroids, the first timestep's and the last's
    # (specs/calib.md 1.3: obsid + half an integration, ...).
    centroids = solved.time_centroids_gps
    if centroids is None or len(centroids) == 0:
        half = solved.meta.int_time_s / 2.0
        centroids = np.array(
            [observation.obsid + half, (observation.stoptime or observation.obsid) - half]
        )
    start, end = float(centroids[0]), float(centroids[-1])
    solutions = CalSolutions(
        jones=jones.transpose(1, 0, 2)[None], start_gps=start, end_gps=end,
        timeblocks_gps=np.array([[start, end, float(np.mean(centroids))]]),
        chanblock_freqs_hz=solved.freqs_hz, obsid=obsid, tile_names=list(solved.meta.antenna_names),
        tile_flags=solved.meta.flagged_antennas.copy(),
    )  # fmt: skip
    rows = tile_fits(solved, len(solved.meta.metafits_coarse_chans))
    delays = np.array([[row["x_delay_m"], row["y_delay_m"]] for row in rows], dtype=float)
    if not np.isfinite(delays).any():
        n_flagged = int(solved.meta.flagged_antennas.sum())
        raise CalibrationFailed(
            f"no tile of observation {obsid} calibrated ({n_flagged} of {len(rows)} tiles flagged "
            "in the metafits); no fit was stored"
        )
    fit = store_fit(
        session, settings, obsid, solutions, rows, creator="calvin", code_version=__version__,
        fit_niter=PHASE_FIT_NITER, fit_limit=solved.max_iterations,
        source_list=observation.calibrator_source, num_sources=1,
        calibration_command=f"StEFCal against the catalogue point source {observation.calibrator_source}",
    )  # fmt: skip
    draw_all(session, settings, fit)  # the summary pages never wait for a plot
    return fit


def run_request(settings_values: dict[str, object], request_id: int) -> str:
    """A Dask task: fit a request's calibrator and finish the request; returns ``completed``/``error``.

    Idempotent: a request that already finished is left as it is. A fit that fails
    finishes the request with the reason (its callback reports it). Two runs of one
    request never overlap: a run holds the request's lock from its first look at the
    request until its result is stored, so a run resubmitted by a restarted dispatcher
    waits for one still going from before, then finds the request finished.
    """
    from observatory.core.database import make_engine

    settings = Settings(**settings_values)  # type: ignore[arg-type]
    engine = make_engine(settings.resolved_database_url)
    try:
        with resource_lock(settings, engine, REQUEST_LOCK_KIND, request_id):
            return _run_request_locked(settings, engine, request_id)
    finally:
        engine.dispose()


def _run_request_locked(settings: Settings, engine: Engine, request_id: int) -> str:
    """``run_request`` while holding the request's lock."""
    from observatory.calib.models import CalibrationRequest
    from observatory.calib.requests import finish_request
    from observatory.core.database import make_session_factory, utcnow

    with make_session_factory(engine)() as session:
        request = session.get(CalibrationRequest, request_id)
        if request is None:
            return "error"
        if request.calibration_completed_datetime or request.calibration_error_datetime:
            return "completed" if request.calibration_fit_id else "error"
        request.assigned_datetime = request.assigned_datetime or utcnow()
        request.calibration_started_datetime = utcnow()
        session.commit()
        try:
            fit = fit_observation(session, settings, request.cal_id)
        except Exception as exc:  # recorded: the requester is told why
            session.rollback()
            request = session.get(CalibrationRequest, request_id)
            assert request is not None
            finish_request(session, request, error=f"{exc.__class__.__name__}: {exc}")
            session.commit()
            return "error"
        finish_request(session, request, fit_id=fit.fitid)
        session.commit()
        return "completed"
