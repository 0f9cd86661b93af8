"""Reading raw MWA correlator files in chunks of one coarse channel and a block of time.

Two readers produce the same :class:`RawChunk`:

* :class:`MwalibReader` (the normal path): mwalib's ``CorrelatorContext`` reads
  MWAX and legacy files, undoing the legacy correlator's ordering and
  conjugation in Rust, one (timestep, coarse channel) at a time.
* :class:`PyuvdataReader` (the fallback): files that mwalib refuses, such as
  the cut-down ``_mini`` files of pyuvdata's test data (renamed, and holding
  fewer fine channels than their metafits), are read one coarse channel at a
  time with pyuvdata's ``mwa_corr_fits`` reader, every correction turned off.

Chunks are in pyuvdata's convention: baselines ``(p, q)`` with ``p <= q`` in
metafits Antenna order (autocorrelations included), polarisations XX, XY, YX,
YY, and visibilities conjugated relative to raw MWAX data so that a source in
direction ``s`` carries ``exp(+2 pi i f (x_q - x_p) . s / c)``.

Both readers give the integrations on a regular grid of the integration time,
from the earliest integration any file holds to the latest (as pyuvdata does;
Birli starts at the first integration every channel holds): files that start at
different times, or a gap in the data, leave
integrations for which some coarse channels have no data; those read as zeros
with zero weight (flagged).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import mwalib
import numpy as np
from numpy.typing import NDArray

from observatory.archive.filenames import legacy_gpubox_channels, parse_file_name
from observatory.archive.models import FileKind
from observatory.telescope.instrument import COARSE_CHAN_WIDTH_HZ, ensure_astropy_offline

log = logging.getLogger(__name__)


class ReadError(ValueError):
    """Input files that cannot be converted; the message names the file and the problem."""


@dataclass(frozen=True)
class ObservationMeta:
    """What the conversion needs from the metafits, in metafits Antenna order.

    Attributes
    ----------
    enu_m
        Tile positions (East, North, Height), metres, shape (n_ants, 3).
    cable_length_m
        Electrical cable length of each tile's X and Y input, shape (n_ants, 2).
    digital_gains
        Digital gains (1 = unity) per tile, pol and metafits coarse channel,
        shape (n_ants, 2, n_metafits_coarse_chans).
    metafits_coarse_chans
        Receiver channel numbers in metafits order (the digital gains' last axis).
    """

    obsid: int
    obs_name: str
    project_id: str
    mwax: bool
    antenna_names: tuple[str, ...]
    antenna_numbers: tuple[int, ...]
    enu_m: NDArray[np.float64]
    cable_length_m: NDArray[np.float64]
    flagged_antennas: NDArray[np.bool_]
    digital_gains: NDArray[np.float64]
    metafits_coarse_chans: tuple[int, ...]
    int_time_s: float
    fine_chan_width_hz: float
    fine_chans_per_coarse: int
    quack_time_s: float
    sched_start_gps_s: float
    phase_centre_radec_deg: tuple[float, float] | None
    pointing_radec_deg: tuple[float, float] | None
    cable_delays_applied: bool
    #: What the correlator phased the data to (metafits GEODEL, as mwalib names it):
    #: ``No``, ``Zenith``, ``TilePointing`` (the pointing's fixed azimuth and elevation) or
    #: ``AzElTracking`` (the pointing's RA and Dec, tracked).
    geometric_delays_applied: str
    #: The pointing's azimuth and elevation (degrees), where the tiles' delays point.
    pointing_azel_deg: tuple[float, float]
    deripple_applied: bool
    #: What Birli writes into a measurement set's MWA tables (cotter's): the beamformer
    #: delays (metafits DELAYS, 16), each tile's X and Y receiver inputs and slots, its
    #: receiver, the metafits MODE and whether the observation is of a calibrator.
    beamformer_delays: tuple[int, ...] = ()
    rf_inputs: NDArray[np.int32] | None = None
    receiver_slots: NDArray[np.int32] | None = None
    receivers: NDArray[np.int32] | None = None
    mode: str = ""
    calibrator: bool = False

    @property
    def n_ants(self) -> int:
        return len(self.antenna_names)

    @property
    def n_baselines(self) -> int:
        return self.n_ants * (self.n_ants + 1) // 2

    def baseline_antennas(self) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
        """Antenna indices (p, q), p <= q, of every baseline in chunk order."""
        return np.triu_indices(self.n_ants)


def read_metadata(metafits: str | os.PathLike[str]) -> ObservationMeta:
    """Read an observation's metadata through mwalib.

    Raises
    ------
    ReadError
        If mwalib cannot read the metafits (the message names the file).
    """
    path = Path(metafits)
    try:
        context = mwalib.MetafitsContext(str(path))
    except Exception as exc:  # mwalib raises its own exception types
        hint = ""
        if "QUACKTIM" in str(exc) or "_ppds" in path.name:
            # The metafits a vis_meta download adds (<obsid>_metafits_ppds.fits) lacks keys.
            hint = "; a _metafits_ppds.fits file lacks keys: give <obsid>.metafits"
        raise ReadError(f"{path}: not a readable metafits ({exc}){hint}") from exc
    antennas = context.antennas
    n_ants = len(antennas)
    gains = np.ones((n_ants, 2, len(context.metafits_coarse_chans)))
    cable = np.zeros((n_ants, 2))
    flagged = np.zeros(n_ants, dtype=bool)
    for index, antenna in enumerate(antennas):
        for pol, rf_input in enumerate((antenna.rfinput_x, antenna.rfinput_y)):
            cable[index, pol] = rf_input.electrical_length_m
            gains[index, pol] = rf_input.digital_gains
            flagged[index] |= bool(rf_input.flagged)
    phase_ra, phase_dec = context.ra_phase_center_degrees, context.dec_phase_center_degrees
    point_ra, point_dec = context.ra_tile_pointing_degrees, context.dec_tile_pointing_degrees
    return ObservationMeta(
        obsid=int(context.obs_id),
        obs_name=str(context.obs_name),
        project_id=str(context.project_id),
        mwax=context.mwa_version is not None and "MWAX" in str(context.mwa_version),
        antenna_names=tuple(str(a.tile_name) for a in antennas),
        antenna_numbers=tuple(int(a.tile_id) for a in antennas),
        enu_m=np.array([(a.east_m, a.north_m, a.height_m) for a in antennas], dtype=np.float64),
        cable_length_m=cable,
        flagged_antennas=flagged,
        digital_gains=gains,
        metafits_coarse_chans=tuple(int(c.rec_chan_number) for c in context.metafits_coarse_chans),
        int_time_s=context.corr_int_time_ms / 1000.0,
        fine_chan_width_hz=float(context.corr_fine_chan_width_hz),
        fine_chans_per_coarse=int(context.num_corr_fine_chans_per_coarse),
        quack_time_s=context.quack_time_duration_ms / 1000.0,
        sched_start_gps_s=context.sched_start_gps_time_ms / 1000.0,
        phase_centre_radec_deg=_radec_or_none(phase_ra, phase_dec),
        pointing_radec_deg=_radec_or_none(point_ra, point_dec),
        cable_delays_applied="No" not in str(context.cable_delays_applied),
        geometric_delays_applied=str(context.geometric_delays_applied).rpartition(".")[2],
        pointing_azel_deg=(float(context.az_deg), float(context.alt_deg)),
        deripple_applied=bool(context.deripple_applied),
        beamformer_delays=tuple(int(d) for d in context.delays),
        rf_inputs=np.array([(a.rfinput_x.input, a.rfinput_y.input) for a in antennas], np.int32),
        receiver_slots=np.array(
            [(a.rfinput_x.rec_slot_number, a.rfinput_y.rec_slot_number) for a in antennas],
            np.int32,
        ),
        receivers=np.array([a.rfinput_x.rec_number for a in antennas], np.int32),
        mode=str(context.mode).rpartition(".")[2].upper(),  # MWAMode.Hw_Lfiles -> HW_LFILES
        calibrator=bool(context.calibrator),
    )


@dataclass
class RawChunk:
    """Visibilities of one coarse channel over a block of timesteps.

    Attributes
    ----------
    vis
        complex64, shape (n_times, n_baselines, n_chans, 4), pyuvdata's convention.
    weights
        float32, broadcastable to ``vis.shape``; 0 where the correlator had no data.
    chan_index
        Index of each channel within its coarse channel (0..fine_chans_per_coarse-1).
    freqs_hz
        Centre frequency of each channel.
    time_start_gps_s
        Start of each integration.
    """

    coarse_chan: int
    vis: NDArray[np.complex64]
    weights: NDArray[np.float32]
    chan_index: NDArray[np.intp]
    freqs_hz: NDArray[np.float64]
    time_start_gps_s: NDArray[np.float64]


class VisibilityReader(Protocol):
    """What the engine reads through."""

    meta: ObservationMeta
    coarse_chans: tuple[int, ...]
    time_start_gps_s: NDArray[np.float64]
    chans_per_coarse: int

    def read(self, coarse_chan: int, timesteps: range) -> RawChunk:
        """Visibilities of ``coarse_chan`` for the given timestep indices."""
        ...

    def channel_freqs_hz(self, coarse_chan: int) -> NDArray[np.float64]:
        """Centre frequencies of the channels :meth:`read` returns for ``coarse_chan``."""
        ...


def _radec_or_none(ra_deg: float | None, dec_deg: float | None) -> tuple[float, float] | None:
    return None if ra_deg is None or dec_deg is None else (float(ra_deg), float(dec_deg))


def fine_channel_indices(
    rec_chan: int, freqs_hz: NDArray[np.float64], width_hz: float
) -> NDArray[np.intp]:
    """Index within coarse channel ``rec_chan`` of the fine channels centred at ``freqs_hz``
    (the frequencies pyuvdata gives cut-down files): counted from the coarse channel's lower
    edge, whichever convention places the centres (MWAX's, or the legacy correlator's
    averages of 10 kHz channels, 15 kHz higher at 40 kHz).
    """
    lower_edge_hz = (rec_chan - 0.5) * COARSE_CHAN_WIDTH_HZ
    return np.floor((np.asarray(freqs_hz) - lower_edge_hz) / width_hz).astype(np.intp)


class MwalibReader:
    """Chunks read through mwalib's ``CorrelatorContext``."""

    def __init__(self, metafits: Path, data_files: Sequence[Path], meta: ObservationMeta) -> None:
        self.context = mwalib.CorrelatorContext(str(metafits), [str(p) for p in data_files])
        context = self.context
        # The correlator is the files' (as Birli takes it), not the metafits MODE's: early
        # MWAX observations have MODE = 'HW_LFILES', and the DC channel and the passband
        # depend on it.
        self.meta = replace(meta, mwax="MWAX" in str(context.mwa_version))
        self._coarse_index = {
            int(context.coarse_chans[i].rec_chan_number): i
            for i in context.provided_coarse_chan_indices
        }
        self.coarse_chans = tuple(sorted(self._coarse_index))
        provided = list(context.provided_timestep_indices)
        # Every timestep from the first with data to the last: mwalib's timesteps are a
        # regular grid, and one that no file holds for a channel reads as flagged.
        self._timestep_indices = list(range(min(provided), max(provided) + 1))
        self.time_start_gps_s = regular_time_grid(
            np.array([context.timesteps[i].gps_time_ms / 1000.0 for i in self._timestep_indices]),
            meta.int_time_s,
        )
        self.chans_per_coarse = meta.fine_chans_per_coarse
        # mwalib's centres: the legacy correlator's channels average 10 kHz channels, so
        # they are not MWAX's (channel n/2 on the coarse channel's centre): 15 kHz higher
        # at 40 kHz, which the cable and geometric phases depend on.
        described = context.metafits_context
        all_freqs_hz = np.asarray(described.metafits_fine_chan_freqs_hz, dtype=np.float64)
        self._freqs_hz = {
            int(coarse.rec_chan_number): all_freqs_hz[
                i * self.chans_per_coarse : (i + 1) * self.chans_per_coarse
            ]
            for i, coarse in enumerate(described.metafits_coarse_chans)
        }

    def channel_freqs_hz(self, coarse_chan: int) -> NDArray[np.float64]:
        return self._freqs_hz[coarse_chan]

    def read(self, coarse_chan: int, timesteps: range) -> RawChunk:
        meta = self.meta
        n_chans = self.chans_per_coarse
        coarse_index = self._coarse_index[coarse_chan]
        vis = np.zeros((len(timesteps), meta.n_baselines, n_chans, 4), dtype=np.complex64)
        weights = np.zeros((len(timesteps), meta.n_baselines, 1, 4), dtype=np.float32)
        for row, t in enumerate(timesteps):
            timestep_index = self._timestep_indices[t]
            try:
                floats = self.context.read_by_baseline(timestep_index, coarse_index)
                weight = self.context.read_weights_by_baseline(timestep_index, coarse_index)
            except mwalib.GpuboxErrorNoDataForTimeStepCoarseChannel as exc:
                # No file holds this (timestep, coarse channel): written empty and flagged.
                log.debug("no data for timestep %d, channel %d: %s", t, coarse_chan, exc)
                continue
            except Exception as exc:  # mwalib's error types: a truncated or corrupt file
                raise ReadError(
                    f"cannot read integration {t} of coarse channel {coarse_chan} "
                    f"(a truncated or damaged correlator file?): {exc}"
                ) from exc
            np.conjugate(
                floats.view(np.complex64).reshape(meta.n_baselines, n_chans, 4), out=vis[row]
            )
            weights[row, :, 0, :] = weight.reshape(meta.n_baselines, 4)
        chan_index = np.arange(n_chans)
        return RawChunk(
            coarse_chan=coarse_chan,
            vis=vis,
            weights=weights,
            chan_index=chan_index,
            freqs_hz=self._freqs_hz[coarse_chan],
            time_start_gps_s=self.time_start_gps_s[timesteps.start : timesteps.stop],
        )


class PyuvdataReader:
    """Chunks read through pyuvdata, for files mwalib refuses.

    pyuvdata reads a whole coarse channel at once, so memory is bounded by one
    coarse channel's files, not by the observation.
    """

    def __init__(self, metafits: Path, data_files: Sequence[Path], meta: ObservationMeta) -> None:
        from pyuvdata import UVData

        self.metafits = metafits
        groups: dict[tuple[str, int], list[Path]] = {}
        for path in data_files:
            info = parse_file_name(path.name)
            number = None if info is None else (info.coarse_chan or info.gpubox_number)
            if info is None or number is None:
                raise ReadError(f"{path}: not an MWA correlator file name")
            groups.setdefault((info.kind, number), []).append(path)
        kinds = {kind for kind, _ in groups}
        if len(kinds) > 1:
            raise ReadError(
                "the files are of two correlators (MWAX chNNN and legacy gpuboxNN names); "
                "give the files of one"
            )
        # The correlator is the files', as MwalibReader's: the DC channel and the passband
        # depend on it, and early MWAX observations have MODE = 'HW_LFILES'.
        self.meta = meta = replace(meta, mwax=kinds == {FileKind.MWAX_VIS})
        # The receiver channel comes from the file name, not from pyuvdata's frequencies:
        # pyuvdata places a file by its position in the metafits channel list, counted
        # from the metafits centre as if the channels were contiguous: a picket-fence
        # observation's files landed on other channels, and a file of a channel that the
        # metafits does not list was read at 0 Hz.
        self._files: dict[int, list[Path]] = {}
        self._freqs_hz: dict[int, NDArray[np.float64]] = {}
        time_axes = []
        all_freqs_hz = _fine_chan_freqs_hz(metafits, meta.mwax)
        for (kind, number), group in groups.items():
            rec_chan = _rec_chan_of_file(kind, number, group[0], meta)
            prepare_pyuvdata()
            header = UVData.from_file(
                [str(metafits), *map(str, group)],
                file_type="mwa_corr_fits",
                read_data=False,
                remove_coarse_band=False,  # the engine's choice, not pyuvdata's (DERIPPLE)
            )
            # pyuvdata reads a file's fine channels as the first of its coarse channel
            # (cut-down files hold fewer than the metafits says); their frequencies are
            # mwalib's, as the other reader's, for the correlator that wrote the files.
            self._files[rec_chan] = group
            self._freqs_hz[rec_chan] = all_freqs_hz[rec_chan][: int(header.Nfreqs)]
            time_axes.append(np.unique(header.time_array))
            self.chans_per_coarse = int(header.Nfreqs)
        self.coarse_chans = tuple(sorted(self._files))
        all_times = np.unique(np.concatenate(time_axes))
        # Times arrive as Julian dates (tens of microseconds of rounding); MWA integrations
        # start on whole milliseconds.
        starts = np.round(_jd_to_gps(all_times) - meta.int_time_s / 2, 3)
        self.time_start_gps_s = regular_time_grid(starts, meta.int_time_s)
        self._cache: tuple[int, RawChunk] | None = None

    def _read_uvdata(self, coarse_chan: int) -> Any:
        """One coarse channel's files through pyuvdata, every correction off."""
        files = self._files[coarse_chan]
        try:
            return self._uvdata_from(files)
        except (ValueError, OSError, KeyError, IndexError) as exc:
            # pyuvdata's errors for a damaged file name neither file nor part ("cannot
            # reshape array of size 36060 into shape (8256,8)").
            raise ReadError(
                f"cannot read {', '.join(map(str, files))} (coarse channel {coarse_chan}; a "
                f"truncated or damaged correlator file?): {exc}"
            ) from exc

    def _uvdata_from(self, files: list[Path]) -> Any:
        from pyuvdata import UVData

        return UVData.from_file(
            [str(self.metafits), *map(str, files)],
            file_type="mwa_corr_fits",
            correct_cable_len=False,
            correct_van_vleck=False,
            remove_dig_gains=False,
            remove_coarse_band=False,
            remove_flagged_ants=False,
            flag_init=False,
            phase_to_pointing_center=False,
            propagate_coarse_flags=False,
            data_array_dtype=np.complex64,
        )

    def _read_channel(self, coarse_chan: int) -> RawChunk:
        meta = self.meta
        prepare_pyuvdata()
        uvd = self._read_uvdata(coarse_chan)
        times_gps = _jd_to_gps(uvd.time_array) - meta.int_time_s / 2
        grid = self.time_start_gps_s
        time_rows = np.clip(np.rint((times_gps - grid[0]) / meta.int_time_s), 0, len(grid) - 1)
        time_rows = time_rows.astype(np.intp)
        if np.any(np.abs(grid[time_rows] - times_gps) > TIME_TOLERANCE_S):
            raise ReadError(f"coarse channel {coarse_chan}: integrations differ from the others'")
        index_of_number = {n: i for i, n in enumerate(uvd.telescope.antenna_numbers)}
        names = list(uvd.telescope.antenna_names)
        name_to_meta = {name: i for i, name in enumerate(meta.antenna_names)}
        try:
            to_meta = np.array(
                [name_to_meta[names[index_of_number[n]]] for n in uvd.telescope.antenna_numbers]
            )
        except KeyError as exc:
            raise ReadError(f"antenna {exc} of the data is not in the metafits") from None
        number_to_meta = dict(zip(uvd.telescope.antenna_numbers, to_meta, strict=True))
        p = np.array([number_to_meta[a] for a in uvd.ant_1_array])
        q = np.array([number_to_meta[a] for a in uvd.ant_2_array])
        pols = [int(x) for x in uvd.polarization_array]
        # XX, XY, YX, YY in AIPS numbers; pyuvdata keeps the file's order.
        pol_order = [pols.index(code) for code in (-5, -7, -8, -6)]
        data = uvd.data_array[:, :, pol_order]
        weights = uvd.nsample_array[:, :, pol_order].astype(np.float32)
        swapped = p > q  # keep p <= q: swap the antennas, conjugate, and swap XY with YX
        data[swapped] = np.conj(data[swapped][:, :, [0, 2, 1, 3]])
        weights[swapped] = weights[swapped][:, :, [0, 2, 1, 3]]
        p, q = np.minimum(p, q), np.maximum(p, q)
        n = meta.n_ants
        baseline = p * n - p * (p - 1) // 2 + (q - p)  # row-major upper-triangle index
        vis = np.zeros((len(self.time_start_gps_s), meta.n_baselines, uvd.Nfreqs, 4), np.complex64)
        weight_out = np.zeros(vis.shape, dtype=np.float32)
        vis[time_rows, baseline] = data
        weight_out[time_rows, baseline] = weights
        # Not uvd.freq_array: pyuvdata's frequencies are wrong for picket-fence observations.
        freqs_hz = self._freqs_hz[coarse_chan]
        chan_index = fine_channel_indices(coarse_chan, freqs_hz, meta.fine_chan_width_hz)
        return RawChunk(coarse_chan, vis, weight_out, chan_index, freqs_hz, self.time_start_gps_s)

    def channel_freqs_hz(self, coarse_chan: int) -> NDArray[np.float64]:
        return self._freqs_hz[coarse_chan]

    def read(self, coarse_chan: int, timesteps: range) -> RawChunk:
        if self._cache is None or self._cache[0] != coarse_chan:
            self._cache = (coarse_chan, self._read_channel(coarse_chan))
        whole = self._cache[1]
        block = slice(timesteps.start, timesteps.stop)
        return RawChunk(
            coarse_chan,
            whole.vis[block],
            whole.weights[block],
            whole.chan_index,
            whole.freqs_hz,
            whole.time_start_gps_s[block],
        )


#: pyuvdata's warnings that say nothing to the user of a conversion: each coarse channel is
#: read on its own (the others are "not submitted"), raw autocorrelations carry a rounding
#: residue of imaginary part (removed again after the corrections), and the output's uvw
#: are computed from the antenna positions on purpose.
_EXPECTED_PYUVDATA_WARNINGS = (
    "some coarse channel files were not submitted",
    "Fixing auto-correlations to be be real-only",
    "Recalculating uvw_array",
)


def prepare_pyuvdata() -> None:
    """Get pyuvdata ready for a conversion: offline, quiet where expected, compiled once
    per install.

    Three things, all process-wide and repeatable:

    * astropy offline, with the MWA in its site registry (pyuvdata looks the telescope
      up there), in this process: in a Dask worker or a pool's process too, where nothing
      else may have done it (:func:`~observatory.telescope.site.ensure_astropy_offline`).

    * Ignore :data:`_EXPECTED_PYUVDATA_WARNINGS` (those only). Not
      ``warnings.catch_warnings``: it swaps the whole process's filters and puts the old
      ones back on leaving, so conversions running in threads would undo each other's
      filters (a warning leaks), or, behind a lock, read one at a time. An ignore filter
      for each message is added when it is missing; one added twice by two threads at
      once is harmless.
    * Cache the numba compilation of pyuvdata's baseline-number functions, which pyuvdata
      declares without ``cache=True``: compiling them took 1.5 s in every process (every
      ASVO conversion, every worker). numba keeps the cache beside pyuvdata's sources, or
      in the user's cache directory when those are read-only, and recompiles when they
      change.
    """
    ensure_astropy_offline()
    present = {
        entry[1].pattern
        for entry in warnings.filters
        if entry[0] == "ignore" and entry[1] is not None
    }
    for message in _EXPECTED_PYUVDATA_WARNINGS:
        if re.escape(message) not in present:
            warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)
    _cache_pyuvdata_compilation()


@functools.cache
def _cache_pyuvdata_compilation() -> None:
    from numba.core.dispatcher import Dispatcher
    from pyuvdata.utils import bls_numba

    for function in vars(bls_numba).values():
        if isinstance(function, Dispatcher):
            function.enable_caching()


#: Largest difference between a time and its grid slot (MWA times are whole milliseconds).
TIME_TOLERANCE_S = 1e-3


def regular_time_grid(
    time_start_gps_s: NDArray[np.float64], int_time_s: float
) -> NDArray[np.float64]:
    """Every integration from the first of ``time_start_gps_s`` to the last, ``int_time_s`` apart.

    Raises
    ------
    ReadError
        If a time is not a whole number of integrations after the first.
    """
    times = np.unique(np.asarray(time_start_gps_s, dtype=np.float64))
    if len(times) == 0:
        raise ReadError("the correlator files hold no integrations")
    offsets = (times - times[0]) / int_time_s
    slots = np.rint(offsets)
    off_grid = np.abs(offsets - slots) * int_time_s > TIME_TOLERANCE_S
    if off_grid.any():
        raise ReadError(
            f"integrations starting at GPS {times[0]:.3f} s and {times[off_grid][0]:.3f} s "
            f"are not a whole number of {int_time_s:g} s integrations apart"
        )
    return np.asarray(times[0] + int_time_s * np.arange(int(slots[-1]) + 1), dtype=np.float64)


def _rec_chan_of_file(kind: str, number: int, path: Path, meta: ObservationMeta) -> int:
    """Receiver channel of a correlator file, from the number in its name.

    An MWAX file's name gives the receiver channel (``ch137``); a legacy file's gives its
    gpubox number, the position (from 1) in the legacy correlator's channel order: the
    metafits channels up to 128 ascending, then those above 128 descending.

    Raises
    ------
    ReadError
        If the channel is not one of the metafits' (naming the file).
    """
    channels = meta.metafits_coarse_chans
    if kind == FileKind.MWAX_VIS:
        rec_chan = number
    else:
        gpubox_channels = legacy_gpubox_channels(list(channels))
        if not 1 <= number <= len(gpubox_channels):
            raise ReadError(
                f"{path}: gpubox {number:02d} does not exist in an observation of "
                f"{len(gpubox_channels)} coarse channels (gpubox01 to {len(gpubox_channels):02d})"
            )
        rec_chan = gpubox_channels[number - 1]
    if rec_chan not in channels:
        raise ReadError(
            f"{path}: coarse channel {rec_chan} is not one of the metafits' channels "
            f"({', '.join(map(str, channels))})"
        )
    return rec_chan


def _fine_chan_freqs_hz(metafits: Path, mwax: bool) -> dict[int, NDArray[np.float64]]:
    """Centre frequencies of every metafits coarse channel's fine channels, by receiver
    channel, as mwalib places them for an MWAX or a legacy correlator (whose 40 kHz
    channels average 10 kHz ones, 15 kHz higher than MWAX's)."""
    version = mwalib.MWAVersion.CorrMWAXv2 if mwax else mwalib.MWAVersion.CorrLegacy
    context = mwalib.MetafitsContext(str(metafits), version)
    n_chans = int(context.num_corr_fine_chans_per_coarse)
    all_freqs_hz = np.asarray(context.metafits_fine_chan_freqs_hz, dtype=np.float64)
    return {
        int(coarse.rec_chan_number): all_freqs_hz[i * n_chans : (i + 1) * n_chans]
        for i, coarse in enumerate(context.metafits_coarse_chans)
    }


def _jd_to_gps(jd: NDArray[np.float64]) -> NDArray[np.float64]:
    from astropy.time import Time

    return np.asarray(Time(jd, format="jd", scale="utc").gps, dtype=np.float64)


def open_reader(
    metafits: str | os.PathLike[str], data_files: Sequence[str | os.PathLike[str]]
) -> VisibilityReader:
    """Open an observation for chunked reading: mwalib when it can, else pyuvdata.

    Raises
    ------
    ReadError
        If no data file is given, a file is missing or is a ``.mwaf`` flag file, a file is
        from another observation than the metafits, of a coarse channel (or gpubox) it does
        not list, or laid out for another array or resolution, or neither reader accepts
        the files.
    """
    metafits_path = Path(metafits)
    paths = [Path(p) for p in data_files]
    if not paths:
        raise ReadError("no correlator data files given")
    flag_files = [p for p in paths if p.suffix.lower() == ".mwaf"]
    if flag_files:
        # An ASVO download holds them beside the data: say why they are refused, rather
        # than let the readers call the whole set unreadable.
        more = f" (and {len(flag_files) - 1} more)" if len(flag_files) > 1 else ""
        raise ReadError(
            f"{flag_files[0]}{more}: .mwaf flag files are not used (the conversion flags RFI "
            "with AOFlagger itself, unless no_rfi); give only the metafits and the correlator "
            ".fits files"
        )
    for path in [metafits_path, *paths]:
        if not path.is_file():
            raise ReadError(f"{path}: no such file")
    seen: dict[tuple[int, int], Path] = {}
    for path in paths:  # a shell glob given twice: its data would be read twice
        found = path.stat()
        first = seen.setdefault((found.st_dev, found.st_ino), path)
        if first is not path:
            also = "" if first == path else f" (as {first})"
            raise ReadError(f"{path}: given twice{also}; give each data file once")
    meta = read_metadata(metafits_path)
    _check_obsids(metafits_path, meta.obsid, paths)
    for path in paths:
        # Before mwalib sees them: a file laid out for another array or resolution, or of
        # a coarse channel the metafits does not list (left over from another recording of
        # the obsid), makes it panic and abort the whole process (a Dask worker with it).
        _check_layout(metafits_path, meta, path)
        _check_channel(meta, path)
    try:
        return MwalibReader(metafits_path, paths, meta)
    except Exception as mwalib_error:  # mwalib's own error types
        log.info("mwalib refused the files (%s); reading them with pyuvdata", mwalib_error)
        try:
            return PyuvdataReader(metafits_path, paths, meta)
        except ReadError:
            raise
        except Exception as exc:
            raise ReadError(
                f"cannot read the correlator files: mwalib says {mwalib_error}; pyuvdata says {exc}"
            ) from exc


def _check_channel(meta: ObservationMeta, path: Path) -> None:
    """Refuse a correlator file whose name gives a coarse channel (or gpubox) the metafits
    does not list; a name that is not an MWA correlator file's is left to the readers.

    Raises
    ------
    ReadError
        Naming the file, its channel and the metafits' (from :func:`_rec_chan_of_file`).
    """
    info = parse_file_name(path.name)
    if info is None or info.kind not in (FileKind.MWAX_VIS, FileKind.LEGACY_GPUBOX):
        return
    number = info.coarse_chan if info.kind == FileKind.MWAX_VIS else info.gpubox_number
    if number is not None:
        _rec_chan_of_file(info.kind, number, path, meta)


def _file_obsids(path: Path) -> set[int]:
    """The obsids a correlator file's name and primary header (``OBSID``) give."""
    from astropy.io import fits

    found = set()
    info = parse_file_name(path.name)
    if info is not None:
        found.add(info.obsid)
    try:
        value = fits.getheader(path, 0).get("OBSID")
    except Exception:  # not FITS: the readers say so
        return found
    with contextlib.suppress(TypeError, ValueError):
        if value is not None:
            found.add(int(value))
    return found


def _check_obsids(metafits: Path, obsid: int, data_files: Sequence[Path]) -> None:
    """Refuse data files whose name or header says they are from another observation.

    Raises
    ------
    ReadError
        Naming the first such file, its obsid and the metafits'.
    """
    foreign = {path: _file_obsids(path) - {obsid} for path in data_files}
    foreign = {path: others for path, others in foreign.items() if others}
    if not foreign:
        return
    path, others = next(iter(foreign.items()))
    more = f" (and {len(foreign) - 1} more file(s))" if len(foreign) > 1 else ""
    raise ReadError(
        f"{path}{more}: the data files are from obsid {min(others)}, "
        f"which does not match the metafits {metafits.name} (obsid {obsid})"
    )


#: Visibility values per baseline, fine channel and polarisation: real and imaginary.
_VALUES_PER_POL = 2
_N_POLS = 4


def _check_layout(metafits: Path, meta: ObservationMeta, path: Path) -> None:
    """Refuse a correlator file whose headers describe another array or resolution.

    The primary header's ``NINPUTS``, ``INTTIME``, ``FINECHAN`` and ``NFINECHS`` (as far
    as the file has them) and the first integration's HDU shapes must fit the metafits:
    MWAX visibilities are (baselines) x (fine channels x 4 pols x 2) and its weights
    (baselines) x (4 pols); legacy gpubox visibilities (fine channels) x (baselines x 4
    pols x 2). Cut-down files (pyuvdata's ``_mini`` test files) may hold fewer fine
    channels than the metafits says; a file that is not FITS is left to the readers.

    Raises
    ------
    ReadError
        Naming the file, what it holds and what the metafits says.
    """
    from astropy.io import fits

    def mismatch(what: str, expected: str) -> ReadError:
        return ReadError(
            f"{path}: {what}, which does not match the metafits {metafits.name} ({expected})"
        )

    n_bl = meta.n_baselines
    try:
        hdus = fits.open(path, memmap=False)
    except Exception:  # not FITS, or damaged: the readers say so
        return
    with hdus:
        images = []  # the first integration's visibilities and (MWAX) weights
        try:
            primary = hdus[0].header
            for index in (1, 2):
                images.append(hdus[index].header)
        except IndexError:
            pass
        except Exception:  # a damaged header: the readers say so
            return
        inputs = primary.get("NINPUTS")
        if isinstance(inputs, int) and inputs != 2 * meta.n_ants:
            raise mismatch(f"the file holds {inputs // 2} tiles", f"{meta.n_ants} tiles")
        checks = (
            ("INTTIME", meta.int_time_s, "s integrations"),
            ("FINECHAN", meta.fine_chan_width_hz / 1000.0, "kHz fine channels"),
            ("NFINECHS", meta.fine_chans_per_coarse, "fine channels per coarse channel"),
        )
        for key, expected, unit in checks:
            value = primary.get(key)
            if isinstance(value, (int, float)) and abs(value - expected) > 1e-6 * max(1, expected):
                raise mismatch(f"the file holds {value:g} {unit}", f"{expected:g} {unit}")
        if not images:
            return  # no integrations: the readers say so
        shapes = [(h.get("NAXIS"), h.get("NAXIS1") or 0, h.get("NAXIS2") or 0) for h in images]
        naxis, axis1, axis2 = shapes[0]
        if naxis != 2:
            raise mismatch(
                f"its first data HDU has {naxis} axes, not 2", "an image per integration"
            )
        mwax = primary.get("CORR_VER") == 2
        if mwax:  # rows of baselines, each fine channels x pols x (re, im)
            n_chans, rest = divmod(axis1, _N_POLS * _VALUES_PER_POL)
            n_baselines = axis2
        else:  # legacy: rows of fine channels, each baselines x pols x (re, im)
            n_baselines, rest = divmod(axis1, _N_POLS * _VALUES_PER_POL)
            n_chans = axis2
        if rest or n_baselines != n_bl:
            raise mismatch(
                f"its first data HDU is {axis1} x {axis2} values, {_tiles_of(n_baselines, rest)}",
                f"{meta.n_ants} tiles, {n_bl} baselines x {_N_POLS} pols",
            )
        if not 0 < n_chans <= meta.fine_chans_per_coarse:
            raise mismatch(
                f"its first data HDU holds {n_chans} fine channels",
                f"{meta.fine_chans_per_coarse} fine channels per coarse channel",
            )
        if mwax and len(shapes) > 1 and shapes[1][1:] != (_N_POLS, n_bl):
            raise mismatch(
                f"its first weights HDU is {shapes[1][1]} x {shapes[1][2]} values",
                f"{_N_POLS} pols x {n_bl} baselines",
            )


def _tiles_of(n_baselines: int, rest: int) -> str:
    """``16 tiles`` for 136 baselines, or how many baselines when no tile count gives them."""
    n_tiles = round((np.sqrt(8 * n_baselines + 1) - 1) / 2)
    if rest == 0 and n_tiles * (n_tiles + 1) // 2 == n_baselines:
        return f"{n_tiles} tiles ({n_baselines} baselines)"
    return f"not a whole number of baselines x {_N_POLS} pols"
