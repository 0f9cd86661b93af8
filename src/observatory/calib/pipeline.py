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

import functools
import math
import multiprocessing
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
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
from observatory.calib.solver import Solution, normal_matrices, stefcal
from observatory.core.config import Settings
from observatory.core.errors import BadRequest
from observatory.core.locks import resource_lock
from observatory.core.processes import (
    CommandFailed,
    WorkerClosing,
    die_with_parent,
    forking_is_safe,
    run_command,
    stop_if_worker_closing,
)
from observatory.core.storage import Storage, atomic_output
from observatory.preprocess import corrections
from observatory.preprocess.engine import (
    DEFAULT_CHUNK_BYTES,
    PROCESS_BASE_BYTES,
    RFI_CHUNK_FACTOR,
    default_workers,
    memory_limit_bytes,
    picklable_failure,
)
from observatory.preprocess.options import ConversionOptions
from observatory.preprocess.reader import ObservationMeta, RawChunk, VisibilityReader, open_reader
from observatory.preprocess.rfi import aoflagger_flags
from observatory.telescope.catalogue import Source, lookup
from observatory.telescope.instrument import COARSE_CHAN_WIDTH_HZ, SPEED_OF_LIGHT_M_S

#: The lock kind of a calibrator observation's fit (:func:`~observatory.core.locks.resource_lock`):
#: the runs of every request for one calibrator take it in turn.
CALIBRATOR_LOCK_KIND = "calib.calibrator"

#: calvin's settings (specs/calib.md 3.1): phase-fit iterations (its 80 kHz edges are the
#: conversion's default, see ``solve_observation``).
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
#: The solver's iteration limit: calvin runs hyperdrive with ``--max-iterations 500``.
#: Each fit records it as its ``fit_limit`` (the summary's "Niter/Limit" column).
SOLVER_MAX_ITERATIONS = 500


#: The solve's peak memory per byte of a block of raw visibilities (measured about 6: the
#: block, its corrected copy, the weights and the normal matrices' products).
SOLVE_PEAK_PER_RAW_BYTE = 8


class CalibrationFailed(Exception):
    """A calibrator observation that gave no fit (no tile calibrated, or its solve failed)."""


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

    def file_jones(self) -> NDArray[np.complex128]:
        """The solutions as AO-cal and hyperdrive files hold them, (chanblock, antenna, 4).

        The inverse gains, in the convention of the raw data hyperdrive solves on (the
        solve ran on the reader's conjugated data): what Birli applies, and what calvin
        fits its delays on.
        """
        return np.asarray(corrections.convert_solution_convention(self.solution.jones()))

    def save(self, path: Path) -> None:
        """Write it (but its metafits' ``meta``) to an npz file; :meth:`load` reads it back."""
        solution = self.solution
        centroids = self.time_centroids_gps
        with atomic_output(path) as temporary, open(temporary, "wb") as out:
            np.savez(
                out, freqs_hz=self.freqs_hz, gains=solution.gains, iterations=solution.iterations,
                converged=solution.converged, precision=solution.precision,
                reference_antenna=solution.reference_antenna,
                chanblocks_per_coarse=self.chanblocks_per_coarse,
                coarse_chans=np.asarray(self.coarse_chans, dtype=np.int64),
                time_centroids_gps=np.asarray([] if centroids is None else centroids, np.float64),
                max_iterations=self.max_iterations,
            )  # fmt: skip

    @classmethod
    def load(cls, path: Path, meta: ObservationMeta) -> SolvedObservation:
        """What :meth:`save` wrote, with the ``meta`` of its observation's metafits."""
        with np.load(path, allow_pickle=False) as saved:
            return cls(
                meta, saved["freqs_hz"],
                Solution(saved["gains"], saved["iterations"], saved["converged"],
                         saved["precision"], int(saved["reference_antenna"])),
                int(saved["chanblocks_per_coarse"]),
                coarse_chans=tuple(int(c) for c in saved["coarse_chans"]),
                time_centroids_gps=saved["time_centroids_gps"],
                max_iterations=int(saved["max_iterations"]),
            )  # fmt: skip


def _normal_matrices_of(
    chunk: RawChunk, meta: ObservationMeta, source: Source, edge_chans: int, flag_dc: bool,
    flag_rfi: bool,
) -> tuple[NDArray[np.complex128], NDArray[np.float64]]:  # fmt: skip
    """The solver's normal matrices of one block of a coarse channel's visibilities."""
    p, q = meta.baseline_antennas()
    positions = meta.enu_m - meta.enu_m.mean(axis=0)
    factors = corrections.instrument_factors(
        meta, chunk.coarse_chan, chunk.freqs_hz, chunk.chan_index,
        cable=not meta.cable_delays_applied, digital_gains=True, passband=not meta.deripple_applied,
    )  # fmt: skip
    vis = chunk.vis * factors[None] if factors is not None else chunk.vis
    weights = (np.asarray(chunk.weights) > 0).all(axis=-1).astype(np.float64)
    weights = np.broadcast_to(weights, vis.shape[:3]).copy()
    weights[:, meta.flagged_antennas[p] | meta.flagged_antennas[q]] = 0.0
    weights[:, :, corrections.edge_and_dc_channels(chunk.chan_index, meta.fine_chans_per_coarse,
                                                   edge_chans, flag_dc)] = 0.0  # fmt: skip
    # As the conversion (and Birli for calvin): integrations within the quack time.
    weights[corrections.quack_timesteps(meta, chunk.time_start_gps_s)] = 0.0
    # ... and AOFlagger's flags, as the conversion's (Birli's before hyperdrive, for calvin):
    # interference in a few fine channels pulled their solutions, and the gain fits, off.
    if flag_rfi:
        weights[aoflagger_flags(vis, weights == 0.0, p, q)] = 0.0
    centres = chunk.time_start_gps_s + meta.int_time_s / 2.0
    applied = corrections.correlator_directions_enu(meta, centres)
    if applied is not None:  # phased by the correlator (GEODEL): the model is unphased
        vis = vis * corrections.geometric_phasors(meta, -applied, chunk.freqs_hz)
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
    return normal_matrices(data, two_pol_model, p, q, meta.n_ants, two_pol_weights)


def solve_observation(
    metafits: Path,
    data_files: list[Path],
    source_name: str,
    max_iterations: int = SOLVER_MAX_ITERATIONS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    flag_rfi: bool = True,
    workers: int | None = None,
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
    chunk_bytes
        Upper bound of the raw visibilities read at once (the conversion's chunk; with
        ``flag_rfi``, up to ``RFI_CHUNK_FACTOR`` times it, as the conversion's, when the
        process's memory limit holds ``SOLVE_PEAK_PER_RAW_BYTE`` times that).
    flag_rfi
        Weight out the samples AOFlagger flags (the conversion's default, and Birli's before
        calvin's hyperdrive). Without it, solving in blocks of time gives exactly the
        solutions of the whole: AOFlagger's flags depend on the stretch of time it sees.
    workers
        Coarse channels read, flagged and summed at once (default: one per CPU, as many as
        the memory holds). In worker processes forked from a program's main thread
        (AOFlagger holds the GIL), else in threads. The result does not depend on it.
    """
    reader = open_reader(metafits, data_files)
    meta = reader.meta
    source = lookup(source_name)
    # The conversion's default edges (80 kHz rounded up to whole channels) and DC channel
    # (legacy data only): one rule for both.
    defaults = ConversionOptions()
    edge_chans = defaults.resolve(
        meta.int_time_s, meta.fine_chan_width_hz / 1e3, meta.fine_chans_per_coarse
    ).edge_chans
    flag_dc = defaults.dc_flagged(meta.mwax)
    if flag_rfi:
        # AOFlagger judges each sample against its neighbours: longer blocks, as the
        # conversion's, as far as the memory this process may use holds them.
        room = (memory_limit_bytes() - PROCESS_BASE_BYTES) // SOLVE_PEAK_PER_RAW_BYTE
        chunk_bytes = max(chunk_bytes, min(chunk_bytes * RFI_CHUNK_FACTOR, room))
    # Time blocks of at most chunk_bytes of raw visibilities: the normal matrices are sums
    # over time, so memory stays bounded whatever the observation's length and resolution.
    raw_bytes_per_timestep = meta.n_baselines * meta.fine_chans_per_coarse * 4 * 8
    timesteps_per_block = max(1, chunk_bytes // raw_bytes_per_timestep)
    coarse_chans = [int(c) for c in reader.coarse_chans]
    task = _ChanTask(source_name, timesteps_per_block, edge_chans, flag_dc, flag_rfi)
    n_workers = max(1, min(
        len(coarse_chans), workers or default_workers(chunk_bytes, SOLVE_PEAK_PER_RAW_BYTE)
    ))  # fmt: skip
    pool: Executor
    if n_workers > 1 and flag_rfi and forking_is_safe():
        # Forked after the first apparent place and AOFlagger's import: astropy's IERS
        # table is parsed, and AOFlagger loaded, once.
        corrections.source_directions_enu(
            (source.ra_deg, source.dec_deg), reader.time_start_gps_s[:1]
        )
        import aoflagger  # noqa: F401

        pool = ProcessPoolExecutor(
            max_workers=n_workers, mp_context=multiprocessing.get_context("fork"),
            initializer=_start_solve_worker, initargs=(os.getpid(), metafits, data_files),
        )  # fmt: skip
        run: Callable[[int], _ChanSums] = functools.partial(_chan_sums_in_worker, task)
    else:  # numpy releases the GIL: threads share the rest of the work
        pool = ThreadPoolExecutor(max_workers=n_workers)
        run = functools.partial(_chan_sums, reader, task)
    try:
        with pool:
            sums = list(pool.map(run, coarse_chans))
    except BrokenProcessPool as exc:  # the OOM killer, or a kill -9: the worker says nothing
        raise RuntimeError("a solve worker process was killed (out of memory?)") from exc
    solution = stefcal(
        np.concatenate([big_a for big_a, _, _ in sums]),
        np.concatenate([big_b for _, big_b, _ in sums]),
        max_iterations=max_iterations,
    )
    return SolvedObservation(
        meta, np.concatenate([freqs for _, _, freqs in sums]), solution, meta.fine_chans_per_coarse,
        coarse_chans=tuple(coarse_chans),
        time_centroids_gps=np.asarray(reader.time_start_gps_s, np.float64) + meta.int_time_s / 2.0,
        max_iterations=max_iterations,
    )  # fmt: skip


def solve_in_process(
    metafits: Path, data_files: list[Path], source_name: str, work_dir: Path
) -> SolvedObservation:
    """:func:`solve_observation` in a process of its own (``observatory calib-solve``).

    As a conversion: a native crash (mwalib on a damaged file, AOFlagger, the OOM killer)
    fails this solve, not the Dask worker running other jobs; and the solve runs in that
    process's main thread, where it may fork workers to flag channels on every core.

    Raises
    ------
    CommandFailed
        If the solve failed (its message) or its process died.
    WorkerClosing
        If the Dask worker running this closes meanwhile (the solve is stopped).
    """
    out = work_dir.absolute() / "solved.npz"
    run_command(  # stopped if its Dask worker closes: the request is run again after
        [
            sys.executable, "-m", "observatory", "calib-solve", "--source", source_name,
            "--out", str(out), "--metafits", str(Path(metafits).absolute()),
            *(str(Path(f).absolute()) for f in data_files),
        ],
        cwd=work_dir, what="calibration solve", poll=stop_if_worker_closing,
    )  # fmt: skip
    return SolvedObservation.load(out, open_reader(metafits, data_files).meta)


@dataclass(frozen=True)
class _ChanTask:
    """What each coarse channel's sums take beside the reader."""

    source_name: str
    timesteps_per_block: int
    edge_chans: int
    flag_dc: bool
    flag_rfi: bool


#: A coarse channel's normal matrices (A, B) and its channel frequencies.
_ChanSums = tuple[NDArray[np.complex128], NDArray[np.float64], NDArray[np.float64]]


def _chan_sums(reader: VisibilityReader, task: _ChanTask, coarse_chan: int) -> _ChanSums:
    """The normal matrices of one coarse channel, summed over its blocks of time."""
    meta = reader.meta
    source = lookup(task.source_name)
    n_timesteps = len(reader.time_start_gps_s)
    step = task.timesteps_per_block
    big_a, big_b, freqs_hz = None, None, None
    for start in range(0, n_timesteps, step):
        chunk = reader.read(coarse_chan, range(start, min(start + step, n_timesteps)))
        block_a, block_b = _normal_matrices_of(
            chunk, meta, source, task.edge_chans, task.flag_dc, task.flag_rfi
        )
        if big_a is None or big_b is None:
            big_a, big_b, freqs_hz = block_a, block_b, chunk.freqs_hz
        else:
            big_a += block_a
            big_b += block_b
    assert big_a is not None and big_b is not None and freqs_hz is not None, "no timesteps"
    return big_a, big_b, freqs_hz


_solve_worker_reader: VisibilityReader | None = None


def _start_solve_worker(parent_pid: int, metafits: Path, data_files: list[Path]) -> None:
    """Process-pool initializer: die with the parent; open the files as it did."""
    global _solve_worker_reader
    die_with_parent(parent_pid)
    _solve_worker_reader = open_reader(metafits, data_files)


def _chan_sums_in_worker(task: _ChanTask, coarse_chan: int) -> _ChanSums:
    assert _solve_worker_reader is not None, "worker not initialised"
    try:
        return _chan_sums(_solve_worker_reader, task, coarse_chan)
    except Exception as exc:
        failure = picklable_failure(exc)
        if failure is exc:
            raise
    raise failure  # outside the handler: no chain back to what could not be pickled


@dataclass(frozen=True)
class TileFits:
    """The ``calibration_solutions`` rows of a solve, and why tiles did not calibrate."""

    rows: list[dict[str, object]]
    #: Reason -> number of tiles that did not calibrate for it.
    failures: Counter[str]


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
    element: 0 for X, 3 for Y). Raises ValueError with fewer than 2 usable chanblocks."""
    with np.errstate(invalid="ignore", divide="ignore"):  # flagged chanblocks are NaN
        referenced = jones[:, antenna, element] / jones[:, reference, element]
    weights = np.isfinite(referenced).astype(np.float64)
    return fit_phase_line(freqs_hz, referenced, weights, PHASE_FIT_NITER)


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
    return TileFits(rows, failures)


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
    # (Without this check such an observation fails tile by tile, which reads as if the
    # tiles were at fault.) With fewer than 2 unflagged tiles nothing can be solved at
    # all: that is the tiles' fault, and said so below.
    unflagged = ~solved.meta.flagged_antennas
    n_usable = int(np.isfinite(jones[:, unflagged, 0]).any(axis=1).sum())
    if n_usable < 2 and unflagged.sum() >= 2:
        raise CalibrationFailed(
            f"observation {obsid} has {n_usable} usable chanblock(s) of the {len(jones)} in "
            f"its data files ({len(files)} file(s), {solved.meta.fine_chan_width_hz / 1e3:g} kHz "
            "fine channels, coarse-channel edges flagged): a delay fit needs at least 2; no "
            "fit was stored"
        )
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

    with make_session_factory(engine)() as session:
        request = session.get(CalibrationRequest, request_id)
        if request is None:
            return "error"
        if request.calibration_completed_datetime or request.calibration_error_datetime:
            return "completed" if request.calibration_fit_id else "error"
        cal_id = request.cal_id
        request.assigned_datetime = request.assigned_datetime or utcnow()
        request.calibration_started_datetime = utcnow()
        session.commit()
        try:
            fit = fit_observation(session, settings, cal_id)
        except WorkerClosing:  # not the request's failure: it is run again after a restart
            session.rollback()
            raise
        except Exception as exc:  # recorded: the requesters are told why
            session.rollback()
            for joined in _unfinished_requests(session, cal_id):
                finish_request(session, joined, error=f"{exc.__class__.__name__}: {exc}")
            session.commit()
            return "error"
        for joined in _unfinished_requests(session, cal_id):
            finish_request(session, joined, fit_id=fit.fitid)
        session.commit()
        return "completed"


def _unfinished_requests(session: Session, cal_id: int) -> list[CalibrationRequest]:
    """The requests for calibrator ``cal_id`` that have not finished (they join its fit)."""
    return list(session.scalars(
        select(CalibrationRequest).where(
            CalibrationRequest.cal_id == cal_id,
            CalibrationRequest.calibration_completed_datetime.is_(None),
            CalibrationRequest.calibration_error_datetime.is_(None),
        ).order_by(CalibrationRequest.id)
    ))  # fmt: skip
