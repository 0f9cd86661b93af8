"""The conversion: raw correlator files to a calibrated, averaged uvfits and/or measurement set.

Steps, in Birli's order, on chunks of one coarse channel and a block of
integrations (so memory stays bounded), chunks in parallel threads:

1. flags from the correlator weights, flagged tiles, the quack time, the
   coarse-channel edges and (legacy data by default) the DC channel;
2. cable-length correction (unless the correlator applied it);
3. digital gains divided out;
4. the polyphase filterbank passband divided out (unless DERIPPLE says it was);
5. RFI flagging with AOFlagger;
6. geometric correction: phasing to the chosen phase centre;
7. direction-independent calibration solutions multiplied in (``J_p V J_q^H``);
8. weighted averaging in time and frequency;

then each block of integrations is streamed to the uvfits and/or measurement set.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import multiprocessing
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from observatory.calib.formats import CalSolutions, read_solutions
from observatory.core.processes import (
    cpu_share,
    die_with_parent,
    forking_is_safe,
    memory_limit_bytes,
)
from observatory.core.storage import remove_leftover_temporaries, temporary_name
from observatory.preprocess import corrections
from observatory.preprocess.measurement_set import MeasurementSetStream
from observatory.preprocess.options import (
    ConversionOptions,
    OptionError,
    OutputFormat,
    PhaseCentre,
    ResolvedOptions,
)
from observatory.preprocess.reader import (
    TIME_TOLERANCE_S,
    ObservationMeta,
    RawChunk,
    ReadError,
    VisibilityReader,
    fine_channel_indices,
    open_reader,
)
from observatory.preprocess.rfi import aoflagger_flags
from observatory.preprocess.uvfits import UvfitsGroups, UvfitsStream
from observatory.preprocess.writer import OutputDescription
from observatory.telescope.instrument import COARSE_CHAN_WIDTH_HZ

log = logging.getLogger(__name__)

#: progress(chunks done, chunks in all, what was just done)
ProgressCallback = Callable[[int, int, str], None]

#: Upper bound on the raw visibilities of one chunk; a few chunks are in flight at once.
DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024
#: With RFI flagging on, chunks may be this many times larger (longer in time).
RFI_CHUNK_FACTOR = 8


#: The suffixes that name an output's format (UVFITS files are FITS files: ``.fits`` and
#: ``.uvf`` are common names for them too).
OUTPUT_SUFFIXES = {".uvfits": "uvfits", ".uvf": "uvfits", ".fits": "uvfits", ".ms": "ms"}


def output_paths(out: str | os.PathLike[str], output: OutputFormat) -> list[Path]:
    """The files a conversion writes: ``out`` itself, or ``out`` with each format's suffix.

    Raises
    ------
    OptionError
        If ``out``'s suffix contradicts the requested format.
    """
    path = Path(out)
    suffix = path.suffix.lower()
    if output == OutputFormat.BOTH:
        stem = path.with_suffix("") if suffix in OUTPUT_SUFFIXES else path
        return [stem.with_name(stem.name + ".uvfits"), stem.with_name(stem.name + ".ms")]
    if OUTPUT_SUFFIXES.get(suffix) == output.value:
        return [path]
    if suffix in OUTPUT_SUFFIXES:
        raise OptionError("output", output.value, f"the output path {path} ends in {suffix}")
    return [path.with_name(path.name + f".{output.value}")]


class WorkerKilled(RuntimeError, ValueError):
    """A worker process died without a word (the OOM killer, ``kill -9``); a ``ValueError``
    so that the command line reports it in one line (exit 2)."""


class OutputError(OSError, ValueError):
    """An output that cannot be written; the message names the output path and the reason.

    An ``OSError`` (what failed) and a ``ValueError`` (what the caller can fix: the
    command line reports it in one line, exit 2).
    """


def _output_error(target: Path, exc: OSError) -> OutputError:
    """``exc``, raised while writing ``target`` or its hidden temporary, as an :class:`OutputError`."""
    if isinstance(exc, OutputError):
        return exc
    reason = exc.strerror or str(exc)
    if reason.startswith("cannot write"):  # the streams' own messages name the target
        error = OutputError(reason)
    else:
        error = OutputError(f"cannot write {target}: {reason}")
    error.errno = exc.errno
    return error


def check_not_an_input(target: Path, inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse an output that is one of the conversion's input files (``--out`` naming a
    correlator file: UVFITS outputs may end in ``.fits`` too), before any work.

    Raises
    ------
    OutputError
        Naming ``target``.
    """
    if not target.exists():
        return
    for source in inputs:
        try:
            same = os.path.samefile(target, source)
        except OSError:  # a missing input is reported when it is read
            continue
        if same:
            raise OutputError(f"cannot write {target}: it is one of the input files")


def check_writable(target: Path) -> None:
    """Refuse an output whose directory is missing or takes no new files, before any work.

    A missing directory is not made (as Birli: a mistyped path is not turned into a new
    tree). Whether the directory takes files is tried with a hidden temporary (removed at
    once), as the conversion writes: permissions, a read-only or immutable mount, or a
    pseudo file system (``/proc``, ``/sys``) each refuse it in their own way.

    Raises
    ------
    OutputError
        Naming ``target`` and the reason.
    """
    parent = target.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise OutputError(f"cannot write {target}: the directory {parent} {what}")
    _check_replaceable(target)
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=temporary_name(target.name, "probe")):
            pass
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # /proc: the directory exists but takes no files
            exc = OSError(exc.errno, f"{parent} does not take new files")
        raise _output_error(target, exc) from None


def _check_replaceable(target: Path) -> None:
    """What is at ``target`` already may be replaced only by the same kind of output: a
    file by a uvfits file, a measurement set by a measurement set. Anything else (a
    directory named like a uvfits file, a file or another directory named like a
    measurement set) is refused: it would be deleted, or fail once all the work is done.

    Raises
    ------
    OutputError
        Naming ``target`` and what is there.
    """
    if not os.path.lexists(target):
        return
    if OUTPUT_SUFFIXES.get(target.suffix.lower()) == "uvfits":
        if target.is_dir():
            raise OutputError(f"cannot write {target}: it is a directory (remove it, or "
                              "give another --out)")  # fmt: skip
        return
    if target.is_symlink():
        raise OutputError(f"cannot write {target}: it is a symlink (remove it, or give "
                          "another --out)")  # fmt: skip
    if not target.is_dir():
        raise OutputError(f"cannot write {target}: it is a file, not a measurement set (a "
                          "directory); remove it, or give another --out")  # fmt: skip
    if not (target / "table.dat").is_file():
        raise OutputError(
            f"cannot write {target}: it is a directory that holds no measurement set "
            "(no table.dat), which converting over it would delete; remove it, or give "
            "another --out"
        )


@dataclass(frozen=True)
class _Plan:
    """Everything decided before the first chunk is read."""

    meta: ObservationMeta
    resolved: ResolvedOptions
    coarse_chans: tuple[int, ...]
    chans_per_coarse: int
    #: The files' integrations, and as many padded to whole averaging blocks.
    n_times: int
    n_times_padded: int
    time_block: int
    #: Upper bound of one chunk's raw visibilities (with RFI flagging, RFI_CHUNK_FACTOR times
    #: what was asked).
    chunk_bytes: int
    phase_centre: tuple[str, float, float]
    flag_dc: bool
    calibration: _Calibration | None


def _phase_centre(meta: ObservationMeta, options: ConversionOptions) -> tuple[str, float, float]:
    if options.centre == PhaseCentre.CUSTOM:
        assert options.phase_centre_ra_deg is not None and options.phase_centre_dec_deg is not None
        return ("custom", options.phase_centre_ra_deg, options.phase_centre_dec_deg)
    name = meta.obs_name or str(meta.obsid)
    if options.centre == PhaseCentre.PHASE and meta.phase_centre_radec_deg is not None:
        return (name, *meta.phase_centre_radec_deg)
    if meta.pointing_radec_deg is not None:
        return (name, *meta.pointing_radec_deg)
    raise OptionError(
        "centre", options.centre.value, "the metafits gives no phase or pointing centre"
    )


@dataclass(frozen=True)
class _Calibration:
    """Solutions laid out for the data: the timeblocks the data use, per antenna and channel.

    Attributes
    ----------
    jones
        complex64, (timeblocks, n_ants, channels of the metafits band, 2, 2), in the
        reader's convention (the file's conjugated); channels without data hold an
        arbitrary chanblock (they are never read).
    bounds_gps
        (timeblocks, 2): the GPS interval of integration centres each timeblock covers.
    """

    jones: NDArray[np.complex64]
    bounds_gps: NDArray[np.float64]

    def timeblocks(self, centres_gps: NDArray[np.float64]) -> NDArray[np.intp]:
        """Each integration's timeblock: the one covering its centre, else the nearest."""
        centres = np.asarray(centres_gps, dtype=np.float64)[:, None]
        early = self.bounds_gps[None, :, 0] - centres
        late = centres - self.bounds_gps[None, :, 1]
        return np.asarray(np.maximum(np.maximum(early, late), 0.0).argmin(axis=1), np.intp)


def _timeblock_bounds(solutions: CalSolutions, solutions_name: str) -> NDArray[np.float64]:
    """The GPS interval each timeblock of ``solutions`` covers, (timeblocks, 2).

    hyperdrive's TIMEBLOCKS table gives each timeblock's first and last centroid; an
    AO-cal file only the start and end of them all, which its timeblocks share evenly
    (as ``calibrate -t`` makes them).

    Raises
    ------
    ReadError
        For several timeblocks without the times to tell them apart.
    """
    n_blocks = solutions.n_timeblocks
    if solutions.timeblocks_gps is not None and len(solutions.timeblocks_gps) == n_blocks:
        return np.asarray(solutions.timeblocks_gps[:, :2], dtype=np.float64)
    if n_blocks == 1:
        return np.array([[-np.inf, np.inf]])
    start, end = solutions.start_gps, solutions.end_gps
    if start is None or end is None or not end > start:
        raise ReadError(
            f"{solutions_name}: it has {n_blocks} timeblocks but no start and end times to "
            "place them; give solutions with one timeblock, or with their times"
        )
    edges = np.linspace(start, end, n_blocks + 1)
    return np.column_stack([edges[:-1], edges[1:]])


def _band_chanblocks(
    reader: VisibilityReader, solutions: CalSolutions, solutions_name: str
) -> NDArray[np.intp]:
    """The chanblock of the solutions for each channel of the metafits band.

    With chanblock frequencies (hyperdrive), a channel takes the chanblock whose
    frequency is within half a chanblock width of its own; without them (AO-cal), the
    solutions have one chanblock per fine channel, of the whole band or of the channels
    the data hold, in frequency order, or one per block of consecutive fine channels of
    the band when their number divides it (Birli's rule: solutions averaged in frequency).

    Raises
    ------
    ReadError
        If a channel of the data has no chanblock (naming ``solutions_name``).
    """
    meta = reader.meta
    band = sorted(meta.metafits_coarse_chans)
    n_band = len(band) * meta.fine_chans_per_coarse
    # The band columns and frequencies of the channels the data hold, in frequency order.
    columns, freqs = [], []
    for coarse_chan in reader.coarse_chans:
        chan_freqs = reader.channel_freqs_hz(coarse_chan)
        index = fine_channel_indices(coarse_chan, chan_freqs, meta.fine_chan_width_hz)
        columns.append(band.index(coarse_chan) * meta.fine_chans_per_coarse + index)
        freqs.append(chan_freqs)
    data_columns, data_freqs = np.concatenate(columns), np.concatenate(freqs)
    n_blocks = solutions.n_chanblocks
    block = np.zeros(n_band, dtype=np.intp)
    block_freqs = solutions.chanblock_freqs_hz
    if block_freqs is not None and len(block_freqs) == n_blocks and np.isfinite(block_freqs).all():
        block_freqs = np.asarray(block_freqs, dtype=np.float64)
        # A chanblock's width is their spacing (one chanblock: a fine channel of the data).
        spacing = np.diff(np.unique(block_freqs))
        width = float(np.min(spacing)) if len(spacing) else meta.fine_chan_width_hz
        nearest = np.abs(data_freqs[:, None] - block_freqs[None, :]).argmin(axis=1)
        offset = np.abs(data_freqs - block_freqs[nearest])
        # Inclusive: MWAX channels are centred on the coarse channel, so a finer channel
        # can sit exactly halfway between two chanblocks (it takes the lower one).
        uncovered = offset > width / 2 * (1 + 1e-6)
        if uncovered.any():
            missing = sorted(
                {int(c) for c in data_columns[uncovered] // meta.fine_chans_per_coarse}
            )
            raise ReadError(
                f"{solutions_name}: its {n_blocks} chanblocks "
                f"({block_freqs.min() / 1e6:.3f}-{block_freqs.max() / 1e6:.3f} MHz) do not cover "
                f"{int(uncovered.sum())} of the data's {len(data_freqs)} channels (coarse "
                f"channel(s) {', '.join(str(band[i]) for i in missing)}); give solutions for "
                "this observation's frequencies"
            )
        block[data_columns] = nearest
    elif n_blocks == n_band:
        block[:] = np.arange(n_band)
    elif n_blocks == len(data_columns):
        block[data_columns] = np.arange(n_blocks)
    elif n_blocks < n_band and n_band % n_blocks == 0:
        # Birli's channel ratio: solutions of coarser channels (a calibration averaged in
        # frequency) each cover that many consecutive fine channels of the band.
        block[:] = np.arange(n_band) // (n_band // n_blocks)
        log.info(
            "%s: %d solution channels for the band's %d: each covers %d fine channels",
            solutions_name, n_blocks, n_band, n_band // n_blocks,
        )  # fmt: skip
    else:
        whole = f" ({len(data_columns)} with data)" if len(data_columns) != n_band else ""
        raise ReadError(
            f"{solutions_name}: the calibration solution has {n_blocks} channels, but the data "
            f"has {n_band} channels{whole} ({len(band)} coarse channels of "
            f"{meta.fine_chans_per_coarse}); without chanblock frequencies the solutions need "
            "one channel per fine channel, or a number of channels that divides the band's"
        )
    return block


def _calibration(
    reader: VisibilityReader,
    solutions: CalSolutions,
    solutions_name: str,
    centres_gps: NDArray[np.float64],
    *,
    report: bool = True,
) -> _Calibration:
    """The solutions for the data read by ``reader``, whose integrations are centred at ``centres_gps``.

    Raises
    ------
    ReadError
        If the solutions are for another number of antennas, do not cover the data's
        channels, or have timeblocks they give no times for (naming ``solutions_name``).
    """
    meta = reader.meta
    empty = [f"no {axis}" for axis, n in (("timeblocks", solutions.n_timeblocks),
                                          ("channels", solutions.n_chanblocks)) if n == 0]  # fmt: skip
    if empty:
        raise ReadError(f"{solutions_name}: the solutions hold {' and '.join(empty)}")
    if solutions.n_antennas != meta.n_ants:
        raise ReadError(
            f"{solutions_name}: the solutions are for {solutions.n_antennas} antennas, "
            f"but obsid {meta.obsid} has {meta.n_ants}; give solutions for this array"
        )
    chanblocks = _band_chanblocks(reader, solutions, solutions_name)
    bounds = _timeblock_bounds(solutions, solutions_name)
    # Only the timeblocks some integration uses: memory follows the data, not the file.
    used = np.unique(_Calibration(np.empty(0, np.complex64), bounds).timeblocks(centres_gps))
    if solutions.n_timeblocks > 1 and report:
        log.info(
            "%s: applying timeblock(s) %s of %d to the integrations they cover",
            solutions_name, ", ".join(map(str, used)), solutions.n_timeblocks,
        )  # fmt: skip
    matrices = corrections.convert_solution_convention(
        solutions.jones_matrices()[used][:, :, chanblocks]
    )
    return _Calibration(np.asarray(matrices, dtype=np.complex64), bounds[used])


def _plan(
    reader: VisibilityReader,
    options: ConversionOptions,
    solutions: CalSolutions | None,
    chunk_bytes: int,
    solutions_name: str = "the calibration solutions",
    *,
    report: bool = True,
) -> _Plan:
    """What a conversion does (the same in every worker); ``report`` logs what it decided."""
    meta = reader.meta
    resolved = options.resolve(
        meta.int_time_s, meta.fine_chan_width_hz / 1000.0, meta.fine_chans_per_coarse
    )
    if reader.chans_per_coarse % resolved.freq_factor:
        raise OptionError(
            "avg_freq_res", options.avg_freq_res_khz,
            f"the files hold {reader.chans_per_coarse} channels per coarse channel, "
            f"which do not divide by {resolved.freq_factor}",
        )  # fmt: skip
    missing = sorted(set(meta.metafits_coarse_chans) - set(reader.coarse_chans))
    if missing and not options.allow_missing:
        raise ReadError(
            f"no files for coarse channels {', '.join(map(str, missing))} of the metafits; "
            "give them, or set allow_missing=true"
        )
    unknown = sorted(set(reader.coarse_chans) - set(meta.metafits_coarse_chans))
    if unknown:
        raise ReadError(f"files hold coarse channels {unknown} that the metafits does not list")
    coarse_chans = converted_coarse_chans(meta.metafits_coarse_chans, reader.coarse_chans)
    if missing and report:
        flagged = sorted(set(coarse_chans) - set(reader.coarse_chans))
        left_out = sorted(set(missing) - set(flagged))
        log.warning(
            "obsid %d: no files for coarse channels %s; %s", meta.obsid,
            ", ".join(map(str, missing)),
            "; ".join(part for part in (
                f"{', '.join(map(str, flagged))} written flagged" if flagged else "",
                f"{', '.join(map(str, left_out))} beyond the band's ends left out" if left_out else "",
            ) if part),
        )  # fmt: skip
    if options.apply_di_cal and solutions is None:
        raise OptionError(
            "apply_di_cal", True, "needs a solutions file (AO-cal .bin or hyperdrive FITS)"
        )
    n_times = len(reader.time_start_gps_s)
    steps = np.diff(reader.time_start_gps_s)
    if np.any(np.abs(steps - meta.int_time_s) > TIME_TOLERANCE_S):
        # The readers give a regular grid; averaging and phasing rely on it.
        raise ReadError(
            f"the integrations of obsid {meta.obsid} are not {meta.int_time_s:g} s apart"
        )
    factor = resolved.time_factor
    n_times_padded = math.ceil(n_times / factor) * factor
    bytes_per_time = meta.n_baselines * reader.chans_per_coarse * 4 * 8
    if not options.no_rfi:
        # AOFlagger judges each sample against its neighbours in time: give it long
        # stretches (the whole observation when it fits in RFI_CHUNK_FACTOR chunks).
        chunk_bytes *= RFI_CHUNK_FACTOR
    blocks_per_chunk = max(1, chunk_bytes // (bytes_per_time * factor))
    longest_block = min(n_times_padded, blocks_per_chunk * factor)
    # Blocks of equal length, none longer than memory allows: a remainder block of one
    # integration (32 = 31 + 1) gives AOFlagger nothing to compare with, and its RFI stayed.
    n_blocks = math.ceil(n_times_padded / longest_block)
    time_block = math.ceil(n_times_padded / (n_blocks * factor)) * factor
    return _Plan(
        meta=meta,
        resolved=resolved,
        coarse_chans=coarse_chans,
        chans_per_coarse=reader.chans_per_coarse,
        n_times=n_times,
        n_times_padded=n_times_padded,
        time_block=time_block,
        chunk_bytes=chunk_bytes,
        phase_centre=_phase_centre(meta, options),
        flag_dc=options.dc_flagged(meta.mwax),
        calibration=None
        if solutions is None
        else _calibration(
            reader,
            solutions,
            solutions_name,
            _padded_starts(reader.time_start_gps_s, n_times_padded, meta.int_time_s)
            + meta.int_time_s / 2,
            report=report,
        ),
    )


def converted_coarse_chans(
    metafits_coarse_chans: Sequence[int], with_files: Sequence[int]
) -> tuple[int, ...]:
    """The coarse channels a conversion writes, in frequency order (Birli's rule).

    Every channel of the metafits from the lowest to the highest that has files: one
    without files in between is written, flagged, so that the band stays one contiguous
    spectral window; channels without files beyond either end are left out.
    """
    low, high = min(with_files), max(with_files)
    return tuple(c for c in sorted(metafits_coarse_chans) if low <= c <= high)


def _channel_freqs_hz(reader: VisibilityReader, coarse_chan: int) -> NDArray[np.float64]:
    """The centre frequencies of ``coarse_chan``'s channels, with files or without."""
    if coarse_chan in reader.coarse_chans:
        return reader.channel_freqs_hz(coarse_chan)
    # No files: the channels the others hold, moved to its frequency.
    reference = reader.coarse_chans[0]
    return reader.channel_freqs_hz(reference) + (coarse_chan - reference) * COARSE_CHAN_WIDTH_HZ


def _chunk_without_files(reader: VisibilityReader, coarse_chan: int, timesteps: range) -> RawChunk:
    """A chunk of a coarse channel no file holds: no data, weight 0 (so flagged)."""
    freqs_hz = _channel_freqs_hz(reader, coarse_chan)
    shape = (len(timesteps), reader.meta.n_baselines)
    return RawChunk(
        coarse_chan,
        np.zeros((*shape, len(freqs_hz), 4), dtype=np.complex64),
        np.zeros((*shape, 1, 4), dtype=np.float32),
        fine_channel_indices(coarse_chan, freqs_hz, reader.meta.fine_chan_width_hz),
        freqs_hz,
        reader.time_start_gps_s[timesteps.start : timesteps.stop],
    )


def _padded_starts(
    time_start_gps_s: NDArray[np.float64], n_times: int, int_time_s: float
) -> NDArray[np.float64]:
    """``time_start_gps_s`` continued to ``n_times`` integrations, ``int_time_s`` apart."""
    extra = n_times - len(time_start_gps_s)
    last = time_start_gps_s[-1]
    return np.concatenate([time_start_gps_s, last + int_time_s * np.arange(1, extra + 1)])


def _padded(chunk: RawChunk, n_times: int, int_time_s: float) -> RawChunk:
    """Extend a chunk to ``n_times`` integrations with empty (zero-weight) ones."""
    extra = n_times - chunk.vis.shape[0]
    if extra <= 0:
        return chunk
    vis = np.concatenate([chunk.vis, np.zeros((extra, *chunk.vis.shape[1:]), np.complex64)])
    weights = np.broadcast_to(chunk.weights, chunk.vis.shape[:2] + chunk.weights.shape[2:])
    weights = np.concatenate([weights, np.zeros((extra, *weights.shape[1:]), np.float32)])
    times = _padded_starts(chunk.time_start_gps_s, n_times, int_time_s)
    return RawChunk(chunk.coarse_chan, vis, weights, chunk.chan_index, chunk.freqs_hz, times)


def _process(
    chunk: RawChunk,
    plan: _Plan,
    options: ConversionOptions,
    phase_directions: Callable[[], NDArray[np.float64]],
) -> tuple[NDArray[np.complex64], NDArray[np.float32], NDArray[np.bool_], int]:
    """One chunk through steps 1-8; returns averaged (vis, weights, flags, RFI-flagged count).

    ``phase_directions`` gives the phase centre's (East, North, Up) direction at
    each of the chunk's integrations (only called when phasing).
    """
    meta = plan.meta
    vis = chunk.vis
    # 1. flags, the same for all pols: (times, baselines, channels)
    flags = np.zeros(vis.shape[:3], dtype=bool)
    flags |= (chunk.weights <= 0).any(axis=-1)
    p, q = meta.baseline_antennas()
    bad_antenna = meta.flagged_antennas[p] | meta.flagged_antennas[q]
    flags[:, bad_antenna] = True
    flags[corrections.quack_timesteps(meta, chunk.time_start_gps_s)] = True
    edge = corrections.edge_and_dc_channels(
        chunk.chan_index, meta.fine_chans_per_coarse, plan.resolved.edge_chans, plan.flag_dc
    )
    flags[:, :, edge] = True
    if not options.no_digital_gains:
        flags[:, corrections.baselines_without_digital_gain(meta, chunk.coarse_chan)] = True
    # 2-4. instrumental corrections, combined into one factor per (baseline, channel, pol)
    factors = corrections.instrument_factors(
        meta,
        chunk.coarse_chan,
        chunk.freqs_hz,
        chunk.chan_index,
        cable=not options.no_cable_delay and not meta.cable_delays_applied,
        digital_gains=not options.no_digital_gains,
        passband=not options.no_passband_gains and not meta.deripple_applied,
    )
    if factors is not None:
        vis *= factors[None]
    # 5. RFI
    rfi_count = 0
    if not options.no_rfi:
        found = aoflagger_flags(vis, flags, p, q)
        rfi_count = int(np.count_nonzero(found & ~flags))
        flags |= found
    # 6. phasing
    if not options.no_geometric_delay:
        vis *= corrections.geometric_phasors(meta, phase_directions(), chunk.freqs_hz)
    # 7. calibration
    if plan.calibration is not None:
        band = sorted(meta.metafits_coarse_chans).index(chunk.coarse_chan)
        columns = band * meta.fine_chans_per_coarse + chunk.chan_index
        timeblocks = plan.calibration.timeblocks(chunk.time_start_gps_s + meta.int_time_s / 2)
        for timeblock in np.unique(timeblocks):
            rows = np.flatnonzero(timeblocks == timeblock)
            jones = plan.calibration.jones[timeblock][:, columns]
            if rows[-1] - rows[0] + 1 == len(rows):  # consecutive (the usual): in place
                corrections.apply_jones(vis[rows[0] : rows[-1] + 1], jones, meta)
            else:
                part = vis[rows]
                corrections.apply_jones(part, jones, meta)
                vis[rows] = part
        unsolved = ~np.isfinite(vis)
        flags |= unsolved.any(axis=-1)
        vis[unsolved] = 0
    # Float32 rounding in the products above leaves autocorrelations a hair off Hermitian.
    corrections.make_autos_hermitian(vis, meta)
    # 8. averaging
    averaged, weight_sum, out_flags = corrections.average(
        vis,
        chunk.weights,
        flags[..., None],
        plan.resolved.time_factor,
        plan.resolved.freq_factor,
    )
    return averaged, weight_sum, out_flags, rfi_count


def preprocess(
    metafits: str | os.PathLike[str],
    data_files: Sequence[str | os.PathLike[str]],
    options: ConversionOptions,
    out: str | os.PathLike[str],
    *,
    solutions: str | os.PathLike[str] | CalSolutions | None = None,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[Path]:
    """Convert one observation's raw correlator files.

    Parameters
    ----------
    metafits, data_files
        The observation's metafits and its correlator FITS files (MWAX or legacy).
    options
        The conversion options (see :class:`ConversionOptions`).
    out
        Output path; its suffix (``.uvfits``, ``.uvf`` or ``.fits``; ``.ms``) must agree with
        ``options.output``, and is added when missing. With ``output=both`` the
        two files share ``out``'s stem.
    solutions
        Direction-independent solutions to apply (AO-cal ``.bin`` or hyperdrive
        FITS, or already read). Required by, and implies, ``apply_di_cal``.
    progress
        Called after each chunk with (chunks done, chunks in all, description).
    workers
        Chunks processed at once, in threads or processes (default: :func:`default_workers`,
        one per CPU as far as the memory allows; at most the chunk count).
    chunk_bytes
        Upper bound of one chunk's raw visibilities.

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    OptionError
        For options that do not fit the observation (naming key, value, allowed range).
    ReadError
        For missing or unreadable input files, data files of another observation than
        the metafits, or solutions for another array (naming the file).
    """
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise OptionError("workers", workers, "must be a positive whole number")
    targets = output_paths(out, options.output)
    inputs = [metafits, *data_files]
    if isinstance(solutions, (str, os.PathLike)):
        inputs.append(solutions)
    for target in targets:
        check_not_an_input(target, inputs)
        check_writable(target)
    for target in targets:  # what runs killed outright (kill -9, the OOM killer) left
        for leftover in remove_leftover_temporaries(target):
            log.warning("removed %s, left by a conversion that was killed", leftover)
    solutions_name = "the calibration solutions"
    if isinstance(solutions, (str, os.PathLike)):
        solutions_name = f"solutions file {solutions}"
        solutions = read_solutions(Path(solutions))
    reader = open_reader(metafits, data_files)
    plan = _plan(reader, options, solutions, chunk_bytes, solutions_name)
    meta = plan.meta
    resolved = plan.resolved
    n_times_out = plan.n_times_padded // resolved.time_factor
    chans_out = plan.chans_per_coarse // resolved.freq_factor
    n_coarse = len(plan.coarse_chans)
    out_freqs = np.concatenate(
        [
            _channel_freqs_hz(reader, c).reshape(chans_out, resolved.freq_factor).mean(axis=1)
            for c in plan.coarse_chans
        ]
    )
    # Each integration's own start (the reader's regular grid, with the padding that
    # fills the last averaging block): phasing and output times both come from these.
    native_starts = _padded_starts(reader.time_start_gps_s, plan.n_times_padded, meta.int_time_s)
    time_centres_gps = (
        native_starts.reshape(n_times_out, resolved.time_factor).mean(axis=1) + meta.int_time_s / 2
    )
    history = (
        f"Converted by observatory-services preprocess from obsid {meta.obsid} with options "
        f"{options.to_params() or 'default'}."
    )
    if options.no_geometric_delay:
        # As Birli: the phase centre and uvw are recorded, the data are left unrotated.
        history += " No geometric correction: the data are not phased to the recorded phase centre."
    blocks = _time_blocks(plan)
    jobs = [(b, c) for b in range(len(blocks)) for c in range(n_coarse)]

    description = OutputDescription(
        meta=meta,
        time_centres_gps_s=time_centres_gps,
        freqs_hz=out_freqs,
        channel_width_hz=meta.fine_chan_width_hz * resolved.freq_factor,
        int_time_s=meta.int_time_s * resolved.time_factor,
        phase_centre=plan.phase_centre,
        history=history,
        native_times=len(reader.time_start_gps_s),
        calibrated=plan.calibration is not None,
    )
    rfi_flagged = 0
    with contextlib.ExitStack() as stack:
        # Each finished chunk goes straight into its place in the outputs: nothing waits
        # for the rest of its integrations (with RFI flagging a block is the whole
        # observation).
        uvfits_streams: list[UvfitsStream] = []
        ms_streams: list[MeasurementSetStream] = []
        for path in targets:
            try:  # a full disk is found here, before any work
                if OUTPUT_SUFFIXES.get(path.suffix.lower()) == "uvfits":
                    uvfits_streams.append(
                        stack.enter_context(
                            UvfitsStream(path, description, buffer_bytes=chunk_bytes)
                        )
                    )
                else:
                    ms_streams.append(
                        stack.enter_context(
                            MeasurementSetStream(
                                path, description, buffer_bytes=chunk_bytes, chunk_chans=chans_out
                            )
                        )
                    )
            except OSError as exc:
                raise _output_error(path, exc) from exc
        n_workers = max(1, min(len(jobs), workers or default_workers(plan.chunk_bytes)))
        # Before the workers start: the first apparent-place computation in a process
        # parses astropy's IERS table, which takes three times as long when it competes
        # with the workers for the GIL.
        centres_gps = native_starts + meta.int_time_s / 2
        directions = corrections.source_directions_enu(plan.phase_centre[1:], centres_gps)
        applied = corrections.correlator_directions_enu(meta, centres_gps)
        if applied is not None:  # phased by the correlator (GEODEL): phased again from there
            directions = directions - applied
        # The workers write their chunks into the uvfits themselves (any process may write
        # its groups). A measurement set has one writer, this process: chunks come to it
        # in memory from threads, or from processes through a scratch file each (the
        # pickled copies cost each side the chunk's size again), removed once written.
        writers = [stream.groups for stream in uvfits_streams]
        pool: Executor
        if options.no_rfi or n_workers == 1 or not forking_is_safe():
            # numpy releases the GIL: threads share the work without copying chunks around.
            # Processes are forked only from a program's main thread running alone:
            # inside a service (a Dask worker thread, a daemonic worker process) or beside
            # another thread forking is not safe.
            runner = _ChunkRunner(reader, plan, options, directions, writers, bool(ms_streams))
            pool, run = ThreadPoolExecutor(max_workers=n_workers), runner.run
        else:
            # AOFlagger's binding holds the GIL: flag in processes, each reading its own
            # chunks. Forked, not spawned, so that scripts calling preprocess() need no
            # ``if __name__ == "__main__"`` guard; this process runs no threads of its own here.
            scratch = None
            if ms_streams:
                scratch = Path(
                    stack.enter_context(
                        tempfile.TemporaryDirectory(
                            dir=targets[0].parent, prefix=temporary_name(targets[0].name, "scratch")
                        )
                    )
                )
            pool = ProcessPoolExecutor(
                max_workers=n_workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(
                    os.getpid(),
                    Path(metafits),
                    [Path(f) for f in data_files],
                    options,
                    solutions,
                    chunk_bytes,
                    directions,
                    writers,
                    scratch,
                ),
            )
            run = _run_in_worker
        with pool:
            pending: dict[Future[_ChunkResult], tuple[int, int]] = {}
            queue = list(jobs)
            done = 0
            # At most two chunks per worker in flight: memory stays bounded by the chunk size.
            while queue or pending:
                while queue and len(pending) < 2 * n_workers:
                    job = queue.pop(0)
                    pending[pool.submit(run, *job)] = job
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    block_index, coarse_index = pending.pop(future)
                    try:
                        output, rfi = future.result()
                    except BaseException as failure:
                        for other in pending:
                            other.cancel()
                        if isinstance(failure, BrokenProcessPool):
                            # The OOM killer, or a kill -9: the worker can say nothing.
                            # The pool fails every chunk in flight, not only the killed one's.
                            raise WorkerKilled(
                                "a worker process was killed (out of memory?); nothing was written"
                            ) from failure
                        raise
                    rfi_flagged += rfi
                    block = blocks[block_index]
                    first_time = block.start // resolved.time_factor
                    first_chan = coarse_index * chans_out
                    n_times_out = len(block) // resolved.time_factor
                    for uvfits_stream in uvfits_streams:
                        uvfits_stream.mark_written(first_time, first_chan, n_times_out, chans_out)
                    if output is not None:
                        arrays = _load_scratch(output) if isinstance(output, Path) else output
                        for ms_stream in ms_streams:
                            ms_stream.write(first_time, first_chan, *arrays)
                        del arrays
                        if isinstance(output, Path):
                            output.unlink()
                    del output
                    done += 1
                    if progress is not None:
                        progress(
                            done,
                            len(jobs),
                            f"coarse channel {plan.coarse_chans[coarse_index]}, "
                            # The files' integrations, not the padding of the last block.
                            f"integrations {block.start}-{min(block.stop, plan.n_times) - 1}",
                        )
        # Every output finished before any is published: a failure while finishing one
        # (a full disk, a stop signal) then publishes none.
        for stream in (*uvfits_streams, *ms_streams):
            try:
                stream.finish()
            except OSError as exc:
                raise _output_error(stream.path, exc) from exc
    if not options.no_rfi:
        log.info("AOFlagger flagged %d samples of obsid %d", rfi_flagged, meta.obsid)
    return targets


def default_workers(chunk_bytes: int, peak_per_chunk_byte: int = 2) -> int:
    """Chunks processed at once when the caller does not say: one per CPU of the task's
    share (:func:`~observatory.core.processes.cpu_share`), as many as fit.

    Each worker needs about ``peak_per_chunk_byte`` times a chunk (``chunk_bytes`` of raw
    visibilities, RFI factor included; for the conversion twice: the chunk it processes
    and the result of one waiting to be written), beside the process itself. Inside a
    4 GiB Dask worker on a big node, one per CPU would not fit.
    """
    allowance = memory_limit_bytes() - PROCESS_BASE_BYTES
    return max(1, min(cpu_share(), allowance // (peak_per_chunk_byte * chunk_bytes)))


def _time_blocks(plan: _Plan) -> list[range]:
    """The blocks of integrations processed together (each a multiple of the time factor)."""
    return [
        range(start, min(start + plan.time_block, plan.n_times_padded))
        for start in range(0, plan.n_times_padded, plan.time_block)
    ]


#: A chunk's averaged (vis, weights, flags), each (times, baselines, channels, 4).
_ChunkArrays = tuple[NDArray[np.complex64], NDArray[np.float32], NDArray[np.bool_]]
#: What a worker returns for a chunk: for the measurement sets its arrays (in memory, or
#: in a scratch file), None without one; and the count of samples AOFlagger flagged.
_ChunkResult = tuple[_ChunkArrays | Path | None, int]


class _ChunkRunner:
    """Reads and processes one chunk (a block of integrations of one coarse channel).

    It writes the chunk into the uvfits outputs itself (``writers``); for measurement
    sets (``for_ms``) it returns the arrays, or saves them in a file in ``scratch``.
    """

    def __init__(
        self,
        reader: VisibilityReader,
        plan: _Plan,
        options: ConversionOptions,
        directions_enu: NDArray[np.float64],
        writers: Sequence[UvfitsGroups],
        for_ms: bool,
        scratch: Path | None = None,
    ) -> None:
        self.reader = reader
        self.plan = plan
        self.options = options
        self.directions_enu = directions_enu
        self.writers = writers
        self.for_ms = for_ms
        self.scratch = scratch
        self.blocks = _time_blocks(plan)
        self.n_times = len(reader.time_start_gps_s)

    def run(self, block_index: int, coarse_index: int) -> _ChunkResult:
        """Process one chunk and write it into the uvfits outputs."""
        block = self.blocks[block_index]
        stored = range(block.start, min(block.stop, self.n_times))
        coarse_chan = self.plan.coarse_chans[coarse_index]
        if coarse_chan in self.reader.coarse_chans:
            chunk = self.reader.read(coarse_chan, stored)
        else:
            chunk = _chunk_without_files(self.reader, coarse_chan, stored)
        vis, weights, flags, rfi = _process(
            _padded(chunk, len(block), self.plan.meta.int_time_s),
            self.plan,
            self.options,
            lambda: self.directions_enu[block.start : block.stop],
        )
        first_time = block.start // self.plan.resolved.time_factor
        for writer in self.writers:
            writer.write_data(first_time, coarse_index * vis.shape[2], vis, weights, flags)
        if not self.for_ms:
            return None, rfi
        if self.scratch is None:
            return (vis, weights, flags), rfi
        return _save_scratch(
            self.scratch / f"{block_index}-{coarse_index}", vis, weights, flags
        ), rfi


def _save_scratch(
    path: Path, vis: NDArray[np.complex64], weights: NDArray[np.float32], flags: NDArray[np.bool_]
) -> Path:
    """Save a chunk's arrays for the process writing the measurement set."""
    try:
        with open(path, "wb") as handle:
            for array in (vis, weights, flags):
                np.lib.format.write_array(handle, np.ascontiguousarray(array))
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot write the conversion's scratch file {path} "
            f"({exc.strerror or exc}); it needs free space beside the output",
        ) from exc
    return path


def _load_scratch(path: Path) -> _ChunkArrays:
    """A chunk's arrays saved by :func:`_save_scratch`."""
    with open(path, "rb") as handle:
        vis, weights, flags = (np.lib.format.read_array(handle) for _ in range(3))
    return vis, weights, flags


_worker_runner: _ChunkRunner | None = None


def _start_worker(
    parent_pid: int,
    metafits: Path,
    data_files: list[Path],
    options: ConversionOptions,
    solutions: CalSolutions | None,
    chunk_bytes: int,
    directions_enu: NDArray[np.float64],
    writers: list[UvfitsGroups],
    scratch: Path | None,
) -> None:
    """Process-pool initializer: die with the parent; open the files and plan as it did."""
    global _worker_runner
    die_with_parent(parent_pid)
    from observatory.telescope.site import ensure_astropy_offline

    ensure_astropy_offline()
    reader = open_reader(metafits, data_files)
    plan = _plan(reader, options, solutions, chunk_bytes, report=False)  # the parent did
    _worker_runner = _ChunkRunner(
        reader, plan, options, directions_enu, writers, scratch is not None, scratch
    )


def _run_in_worker(block_index: int, coarse_index: int) -> _ChunkResult:
    assert _worker_runner is not None, "worker not initialised"
    return call_for_parent(_worker_runner.run, block_index, coarse_index)


_Result = TypeVar("_Result")


def call_for_parent(function: Callable[..., _Result], *args: Any) -> _Result:
    """``function(*args)`` in a pool's worker process, failing with what its parent can read.

    The failure goes back pickled, with its chain once tblib's pickling is installed
    (Dask installs it): one that cannot be pickled (mwalib's exception types, or an
    error chained from one) would break the pool, reported as a killed worker. It is
    replaced by one like it, raised outside the ``except`` block so that it carries no
    such chain.
    """
    try:
        return function(*args)
    except Exception as exc:
        try:
            pickle.dumps(exc)
        except Exception:
            failure = (
                ReadError(str(exc))
                if isinstance(exc, ReadError)
                else RuntimeError(f"{type(exc).__name__}: {exc}")
            )
        else:
            raise
    raise failure


#: What a conversion process takes before any chunk: numpy, astropy, pyuvdata, mwalib,
#: AOFlagger and astropy's IERS table (measured 0.4 GB).
PROCESS_BASE_BYTES = 400 * 1024 * 1024
