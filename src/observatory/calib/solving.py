"""The solve of a calibrator observation: its visibilities to StEFCal's gains per tile and channel.

The data go through the conversion engine's instrumental corrections (cable
lengths, digital gains, passband unless flat) with the coarse-channel edges
(80 kHz), the quack time, flagged tiles and AOFlagger's flags weighted out; the
model is the calibrator's catalogue point source, unphased, in the same (pyuvdata)
convention. A fit runs it as ``observatory calib-solve`` in a process of its own
(:func:`solve_in_process`), which imports this module and not the fits, plots and
services of :mod:`observatory.calib.pipeline`.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from observatory.calib.solver import Solution, normal_matrices, stefcal
from observatory.core.processes import (
    die_with_parent,
    forking_is_safe,
    memory_limit_bytes,
    run_command,
    stop_if_worker_closing,
)
from observatory.core.storage import atomic_output
from observatory.preprocess import corrections
from observatory.preprocess.engine import (
    DEFAULT_CHUNK_BYTES,
    PROCESS_BASE_BYTES,
    RFI_CHUNK_FACTOR,
    call_for_parent,
    default_workers,
)
from observatory.preprocess.options import ConversionOptions
from observatory.preprocess.reader import (
    ObservationMeta,
    RawChunk,
    VisibilityReader,
    open_reader,
    read_metadata,
)
from observatory.preprocess.rfi import aoflagger_flags
from observatory.telescope.catalogue import Source, lookup
from observatory.telescope.instrument import SPEED_OF_LIGHT_M_S

#: The solver's iteration limit: calvin runs hyperdrive with ``--max-iterations 500``.
#: Each fit records it as its ``fit_limit`` (the summary's "Niter/Limit" column).
SOLVER_MAX_ITERATIONS = 500

#: The solve's peak memory per byte of a block of raw visibilities (measured about 6: the
#: block, its corrected copy, the weights and the normal matrices' products).
SOLVE_PEAK_PER_RAW_BYTE = 8


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
        """Write it to an npz file (of ``meta`` only what the data files, not the metafits,
        say: the correlator); :meth:`load` reads it back."""
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
                max_iterations=self.max_iterations, mwax=self.meta.mwax,
            )  # fmt: skip

    @classmethod
    def load(cls, path: Path, metafits: Path) -> SolvedObservation:
        """What :meth:`save` wrote, with the metadata of its observation's ``metafits``
        (read alone: the data files are not opened again)."""
        with np.load(path, allow_pickle=False) as saved:
            return cls(
                replace(read_metadata(metafits), mwax=bool(saved["mwax"])), saved["freqs_hz"],
                Solution(saved["gains"], saved["iterations"], saved["converged"],
                         saved["precision"], int(saved["reference_antenna"])),
                int(saved["chanblocks_per_coarse"]),
                coarse_chans=tuple(int(c) for c in saved["coarse_chans"]),
                time_centroids_gps=saved["time_centroids_gps"],
                max_iterations=int(saved["max_iterations"]),
            )  # fmt: skip


class Unsolvable(ValueError):
    """A solve that produced no solution a fit could use (see :func:`check_solvable`)."""


#: A delay is the slope of phase with frequency: a fit needs at least this many chanblocks.
MIN_USABLE_CHANBLOCKS = 2


def usable_chanblocks(solved: SolvedObservation) -> int:
    """How many chanblocks have a solution for some tile the metafits does not flag."""
    jones = solved.file_jones()
    unflagged = ~solved.meta.flagged_antennas
    return int(np.isfinite(jones[:, unflagged, 0]).any(axis=1).sum())


def check_solvable(solved: SolvedObservation, n_files: int) -> None:
    """Refuse a solve whose data hold too few usable chanblocks for a delay fit.

    With fewer than :data:`MIN_USABLE_CHANBLOCKS` chanblocks solved (e.g. one fine channel
    per coarse channel, and that one flagged as the coarse channel's edge or DC), every
    gain is NaN: nothing was solved. With fewer than 2 unflagged tiles nothing can be
    solved either, but that is the tiles' fault: the fit says so, tile by tile, and it is
    not refused here.

    Raises
    ------
    Unsolvable
        Naming the observation, how many chanblocks were usable and why a fit needs more.
    """
    unflagged = ~solved.meta.flagged_antennas
    n_usable = usable_chanblocks(solved)
    if n_usable < MIN_USABLE_CHANBLOCKS and unflagged.sum() >= 2:
        meta = solved.meta
        raise Unsolvable(
            f"observation {meta.obsid} has {n_usable} usable chanblock(s) of the "
            f"{len(solved.freqs_hz)} in its data files ({n_files} file(s), "
            f"{meta.fine_chan_width_hz / 1e3:g} kHz fine channels, coarse-channel edges "
            f"flagged): a delay fit needs at least {MIN_USABLE_CHANBLOCKS}"
        )


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
    task = _ChanTask(source, timesteps_per_block, edge_chans, flag_dc, flag_rfi)
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
    return SolvedObservation.load(out, metafits)


@dataclass(frozen=True)
class _ChanTask:
    """What each coarse channel's sums take beside the reader."""

    source: Source
    timesteps_per_block: int
    edge_chans: int
    flag_dc: bool
    flag_rfi: bool


#: A coarse channel's normal matrices (A, B) and its channel frequencies.
_ChanSums = tuple[NDArray[np.complex128], NDArray[np.float64], NDArray[np.float64]]


def _chan_sums(reader: VisibilityReader, task: _ChanTask, coarse_chan: int) -> _ChanSums:
    """The normal matrices of one coarse channel, summed over its blocks of time."""
    meta = reader.meta
    n_timesteps = len(reader.time_start_gps_s)
    step = task.timesteps_per_block
    big_a, big_b, freqs_hz = None, None, None
    for start in range(0, n_timesteps, step):
        chunk = reader.read(coarse_chan, range(start, min(start + step, n_timesteps)))
        block_a, block_b = _normal_matrices_of(
            chunk, meta, task.source, task.edge_chans, task.flag_dc, task.flag_rfi
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
    return call_for_parent(_chan_sums, _solve_worker_reader, task, coarse_chan)
