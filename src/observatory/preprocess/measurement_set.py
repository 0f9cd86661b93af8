"""A measurement set writer that takes each chunk of the data straight into its place.

pyuvdata writes a measurement set only from a complete ``UVData`` object in
memory: for an unaveraged observation, several times the raw data. This writer
lays the set out exactly as pyuvdata's ``write_ms`` does (a test compares every
table and column), using pyuvdata's own pieces: its skeleton (``init_ms_file``),
its subtable writers, fed a metadata-only ``UVData`` (every baseline-time's
coordinates, no visibilities), and the main table's rows in the same order with
the same values. The visibilities, weights and flags come a chunk at a time, in
any order (a block of integrations of a range of channels), and are written into
their rows and channels at once; the per-row weights, which need every channel of
a row, are made from the weights written when the set is finished.

How the set is stored differs from ``write_ms``, not what it holds (the costs below are
casacore's per row, which dominate with many narrow rows: an output with a window per
coarse channel, averaged to one channel each). The data columns are tiled one chunk's
channels wide. When every spectral window has as many channels (always, for the
engine's outputs), the array columns are fixed-shape, as DP3 writes them: casacore
gives each row its arrays as the row is added, where shaping them one by one took a
third of a conversion's time. The standard storage managers have buckets of 32 KiB,
not the skeleton's 128 bytes. Columns with one value in every row are written once
(as the rows are added), and the POINTING table without pyuvdata's quadratic cost.
"""

from __future__ import annotations

import errno
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from astropy.time import Time
from numpy.typing import NDArray

from observatory.core.storage import atomic_output
from observatory.core.text import size_text
from observatory.preprocess.uvfits import DEFAULT_BUFFER_BYTES, AtomicStream
from observatory.preprocess.writer import OutputDescription, spectral_window_ids, to_uvdata
from observatory.telescope.instrument import COARSE_CHAN_WIDTH_HZ

#: Samples (pols x channels x rows) in a tile of the data columns (a complex tile: 256 KiB).
_TILE_SAMPLES = 32768
#: What a set takes beyond its rows' columns (subtables, table files): more than the 1.2 MB
#: measured for a small one.
_FIXED_OVERHEAD_BYTES = 4_000_000
#: Rows of the per-row columns written at a time when the set is finished.
_ROWS_PER_PUT = 1 << 20
#: casacore's ``ColumnDesc::FixedShape`` option: every cell of the column has one shape.
_FIXED_SHAPE = 4
#: Bucket size of the main table's standard storage managers (as DP3 and CASA's fillers).
_SSM_BUCKET_BYTES = 32768
#: Bytes per visibility sample held while a buffer is written (complex64 data and its
#: conjugate, float32 weight, bool flag).
_BYTES_PER_SAMPLE = 8 + 8 + 4 + 1


class MeasurementSetStream(AtomicStream):
    """Writes one measurement set, a chunk at a time in any order, atomically.

    Use as a context manager; call :meth:`write` with chunks until every integration
    of every channel of the description has been written once. The set appears at
    ``path`` only when complete.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        description: OutputDescription,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        chunk_chans: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.buffer_bytes = buffer_bytes
        self.uvd = to_uvdata(description)  # metadata only
        self.description = description
        self.project_id = description.meta.project_id
        self.n_baselines = description.meta.n_baselines
        self.n_times = len(description.time_centres_gps_s)
        self.n_blts = self.n_times * self.n_baselines
        self.n_chans = len(description.freqs_hz)
        #: Channels of the chunks to come: the width of the data's tiles.
        self.chunk_chans = chunk_chans or self.n_chans
        window_ids = spectral_window_ids(description.freqs_hz, description.channel_width_hz)
        if window_ids is None:
            self.windows = [slice(0, len(description.freqs_hz))]
        else:
            # pyuvdata writes windows in the order of their ids; ours ascend with frequency.
            self.windows = [
                slice(int(columns[0]), int(columns[-1]) + 1)
                for columns in (np.flatnonzero(window_ids == w) for w in np.unique(window_ids))
            ]
        from pyuvdata import utils

        # The pols in CASA's order (ours already are: then this is a whole slice).
        self.pol_order = utils.tools.slicify(
            utils.pol.determine_pol_order(self.uvd.polarization_array, order="CASA"),
            allow_empty=True,
        )
        widths = {window.stop - window.start for window in self.windows}
        #: Channels of every row's arrays when the windows are all as wide (then the array
        #: columns are fixed-shape); None otherwise.
        self._cell_chans = widths.pop() if len(widths) == 1 else None
        # WEIGHT: per row and pol, the median weight over the row's channels; SIGMA follows
        # from it. write_ms keeps the medians in float32 with one window, float64 with
        # several (which rounds SIGMA differently): the same here.
        self._row_weight_dtype = np.float32 if len(self.windows) == 1 else np.float64
        intervals = np.unique(self.uvd.integration_time)
        #: The integration time of every row (INTERVAL and EXPOSURE), if they share one.
        self._interval = float(intervals[0]) if len(intervals) == 1 else None
        self._context = atomic_output(self.path)
        self._temporary: Path | None = None
        self._table: Any = None

    def __enter__(self) -> MeasurementSetStream:
        from pyuvdata.utils.io import ms as ms_utils

        self._temporary = self._context.__enter__()
        try:
            self._check_free_space()
            self._table = ms_utils.init_ms_file(str(self._temporary))
            self._make_array_columns()
            self._widen_standard_buckets()
            self._add_rows()
        except BaseException as failure:
            # Closed before its directory goes: casacore aborts the process when a table
            # whose files were removed is destroyed later.
            self._abandon(failure)
            raise
        return self

    def _check_free_space(self) -> None:
        """Refuse to start a set the file system cannot hold.

        casacore cannot reserve space, and a write it cannot make when it flushes its
        cache at the end aborts the process (C++ ``terminate``) instead of raising; so the
        free space is checked first (another writer can still take it meanwhile).
        """
        n_pols = len(self.uvd.polarization_array)
        # Per sample: DATA 8 bytes, WEIGHT_SPECTRUM 4, FLAG a bit; per row about 150 bytes;
        # and the subtables, table files and tiles' rounding: about 1.2 MB for a small set,
        # where a set of 1.6 MB by the first terms took 2.8 MB (and casacore aborted).
        needed_bytes = (
            self.n_blts * (self.n_chans * n_pols * (8 + 4 + 1 / 8) + 150) * 1.02
            + _FIXED_OVERHEAD_BYTES
        )
        stats = os.statvfs(self.path.parent)  # the temporary is made beside the target
        free_bytes = stats.f_bavail * stats.f_frsize
        if needed_bytes > free_bytes:
            raise OSError(
                errno.ENOSPC,
                f"cannot write {self.path}: it needs about {size_text(needed_bytes)} and "
                f"{size_text(free_bytes)} are free (No space left on device)",
            )

    def _make_array_columns(self) -> None:
        """Store DATA, FLAG and WEIGHT_SPECTRUM in tiles one chunk's channels wide; and when
        every row's arrays have one shape, make the array columns fixed-shape.

        Each chunk then writes whole tiles. In tiles across the band (casacore's default),
        every chunk would rewrite every tile, and casacore would cache them all: the whole
        column in memory. The columns are made again in the empty skeleton, with the same
        descriptions (fixed-shape: with their shape as well). Fixed-shape columns are kept
        by the tiled column storage manager, which adds rows a tile at a time (the tiled
        shape storage manager, pyuvdata's choice, adds them one by one).
        """
        from casacore import tables

        n_pols = len(self.uvd.polarization_array)
        tile_rows = max(1, _TILE_SAMPLES // (n_pols * self.chunk_chans))
        groups = {"DATA": "TiledData", "FLAG": "TiledFlag", "WEIGHT_SPECTRUM": "TiledWgtSpectrum"}
        # Cell shapes in C order, (channels, pols); tile shapes in casacore's, pols first.
        tiles = {name: [n_pols, self.chunk_chans, tile_rows] for name in groups}
        cell_shapes: dict[str, list[int]] = {}
        manager_type = "TiledShapeStMan"
        if self._cell_chans is not None:
            manager_type = "TiledColumnStMan"
            cell_shapes = {name: [self._cell_chans, n_pols] for name in groups}
            groups |= {"WEIGHT": "TiledWgt", "SIGMA": "TiledSigma"}  # pyuvdata's groups
            for name in ("WEIGHT", "SIGMA"):
                cell_shapes[name] = [n_pols]
                tiles[name] = [n_pols, _TILE_SAMPLES // n_pols]
        descriptions = {name: self._table.getcoldesc(name) for name in groups}
        self._table.removecols(list(groups))
        for name, group in groups.items():
            description = dict(descriptions[name])
            if name in cell_shapes:
                description["shape"] = np.array(cell_shapes[name])
                description["option"] = _FIXED_SHAPE
            self._table.addcols(
                tables.makecoldesc(name, description),
                {
                    "TYPE": manager_type,
                    "NAME": group,
                    "SPEC": {"DEFAULTTILESHAPE": np.array(tiles[name], dtype=np.int32)},
                },
            )
        for name in ("DATA", "FLAG", "WEIGHT_SPECTRUM"):
            # A chunk writes along the rows of its tiles: a few tiles at a time suffice.
            self._table.setmaxcachesize(name, self.buffer_bytes)

    def _widen_standard_buckets(self) -> None:
        """Keep ANTENNA1, ANTENNA2, DATA_DESC_ID and FLAG_ROW in buckets of 32 KiB.

        The skeleton sizes its standard storage managers for the rows it has, none: buckets
        of 128 bytes, a few dozen rows each, with an index (1.5 MB for 6 million rows) that
        each row written searches and each reader loads. The columns are made again in the
        empty skeleton with the same descriptions, managers and groups.
        """
        from casacore import tables

        names = ["ANTENNA1", "ANTENNA2", "DATA_DESC_ID", "FLAG_ROW"]
        descriptions = {name: self._table.getcoldesc(name) for name in names}
        groups = {name: self._table.getdminfo(name)["NAME"] for name in names}
        self._table.removecols(names)
        for name in names:
            self._table.addcols(
                tables.makecoldesc(name, descriptions[name]),
                {
                    "TYPE": "StandardStMan",
                    "NAME": groups[name],
                    "SPEC": {"BUCKETSIZE": _SSM_BUCKET_BYTES},
                },
            )

    def _add_rows(self) -> None:
        """Every row of the main table, with its arrays (this takes a while for a large set).

        Fixed-shape columns give each row its arrays as it is added; otherwise they are
        shaped one by one. Rows added after the first take over its values in the columns
        of the incremental storage manager: INTERVAL and EXPOSURE, one value in every row,
        are written once, there (FIELD_ID, the one phase centre, keeps its initial 0, as
        ARRAY_ID does in write_ms's sets)."""
        n_rows = self.n_blts * len(self.windows)
        if self._interval is not None:
            self._table.addrows(1)
            for name in ("INTERVAL", "EXPOSURE"):
                self._table.putcell(name, 0, self._interval)
            n_rows -= 1
        self._table.addrows(n_rows)
        if self._cell_chans is None:
            self._shape_cells()

    def _shape_cells(self) -> None:
        """Give every row its arrays (zeros): the tiled storage manager writes a chunk's
        channels into a row only once the row's arrays exist with their shape."""
        n_pols = len(self.uvd.polarization_array)
        for window_index, window in enumerate(self.windows):
            n_chans = window.stop - window.start
            step = max(1, self.buffer_bytes // (n_chans * n_pols * _BYTES_PER_SAMPLE))
            for start in range(0, self.n_blts, step):
                n_rows = min(step, self.n_blts - start)
                row = window_index * self.n_blts + start
                for name, dtype in (("DATA", np.complex64), ("WEIGHT_SPECTRUM", np.float32),
                                    ("FLAG", np.bool_)):  # fmt: skip
                    self._table.putcol(
                        name, np.zeros((n_rows, n_chans, n_pols), dtype), row, n_rows
                    )

    def _close(self) -> None:
        if self._table is not None:
            table, self._table = self._table, None
            table.close()

    def write(
        self,
        first_time: int,
        first_chan: int,
        vis: NDArray[np.complex64],
        weights: NDArray[np.float32],
        flags: NDArray[np.bool_],
    ) -> None:
        """Write a chunk into its rows and channels: output integrations ``first_time`` on,
        channels ``first_chan`` on.

        As :meth:`observatory.preprocess.uvfits.UvfitsStream.write`: shape (times, baselines,
        channels, 4), pols in chunk order.
        """
        n_times, n_bl, n_chans, n_pols = vis.shape
        self._record(first_time, first_chan, n_times, n_chans)
        vis = vis.reshape(n_times * n_bl, n_chans, n_pols)
        weights = weights.reshape(vis.shape)
        flags = flags.reshape(vis.shape)
        first_blt = first_time * self.n_baselines
        step = max(1, self.buffer_bytes // (n_chans * n_pols * _BYTES_PER_SAMPLE))
        for window_index, window in enumerate(self.windows):
            # The chunk's channels in this window, as columns of the chunk and of the window.
            low = max(window.start, first_chan)
            high = min(window.stop, first_chan + n_chans)
            if low >= high:
                continue
            chunk_chans = slice(low - first_chan, high - first_chan)
            corner = [low - window.start, 0]
            far_corner = [high - 1 - window.start, n_pols - 1]
            for start in range(0, len(vis), step):
                stop = min(start + step, len(vis))
                row = window_index * self.n_blts + first_blt + start
                # CASA's convention is the conjugate of pyuvdata's (write_ms's flip_conj).
                columns = {
                    "DATA": np.conjugate(vis[start:stop, chunk_chans][..., self.pol_order]),
                    "WEIGHT_SPECTRUM": weights[start:stop, chunk_chans][..., self.pol_order],
                    "FLAG": flags[start:stop, chunk_chans][..., self.pol_order],
                }
                for name, values in columns.items():
                    self._table.putcolslice(name, values, corner, far_corner, [], row, stop - start)

    def _write_row_columns(self) -> None:
        """WEIGHT, SIGMA and FLAG_ROW of every row, from the weights and flags written.

        FLAG_ROW (every sample of the row flagged), which CASA and WSClean read, is set
        where pyuvdata's ``write_ms`` leaves it false.
        """
        n_pols = len(self.uvd.polarization_array)
        for window_index, window in enumerate(self.windows):
            n_chans = window.stop - window.start
            step = max(1, self.buffer_bytes // (n_chans * n_pols * (4 + 1)))
            for start in range(0, self.n_blts, step):
                row, n_rows = window_index * self.n_blts + start, min(step, self.n_blts - start)
                weights = self._table.getcol("WEIGHT_SPECTRUM", row, n_rows)
                row_weights = np.median(weights, axis=1).astype(self._row_weight_dtype)
                sigma = np.zeros_like(row_weights)
                np.power(row_weights, -0.5, where=row_weights != 0, out=sigma)
                self._table.putcol("WEIGHT", row_weights, row, n_rows)
                self._table.putcol("SIGMA", sigma, row, n_rows)
                flag_row = self._table.getcol("FLAG", row, n_rows).all(axis=(1, 2))
                self._table.putcol("FLAG_ROW", flag_row, row, n_rows)

    def _finish(self) -> None:
        """The main table's per-row columns and keywords, then the subtables (as write_ms)."""
        from pyuvdata.utils.io import ms as ms_utils

        self._write_row_columns()
        uvd, table = self.uvd, self._table
        _, time_index = np.unique(uvd.time_array, return_inverse=True)
        time_mjd_s = self._time_centres_mjd_s[time_index]
        uvd._set_scan_numbers()
        table.putcolkeyword("DATA", "QuantumUnits", uvd.vis_units)
        # Rows are window-major: every baseline-time of the first window, then the next.
        # Written a slice of baseline-times at a time: nothing here is sized to every row.
        for window_index in range(len(self.windows)):
            for start in range(0, self.n_blts, _ROWS_PER_PUT):
                blts = slice(start, min(start + _ROWS_PER_PUT, self.n_blts))
                row, n_rows = window_index * self.n_blts + start, blts.stop - start
                columns = {
                    "ANTENNA1": uvd.ant_1_array[blts],
                    "ANTENNA2": uvd.ant_2_array[blts],
                    "DATA_DESC_ID": np.full(n_rows, window_index),
                    "SCAN_NUMBER": uvd.scan_number_array[blts],
                    "TIME": time_mjd_s[blts],
                    "TIME_CENTROID": time_mjd_s[blts],
                    "UVW": -uvd.uvw_array[blts],  # flip_conj negates uvw too
                }  # FIELD_ID: 0 in every row, as the rows were added (see _add_rows)
                if self._interval is None:  # else written with the rows
                    columns["INTERVAL"] = uvd.integration_time[blts]
                    columns["EXPOSURE"] = uvd.integration_time[blts]
                for name, values in columns.items():
                    table.putcol(name, values, row, n_rows)
        if uvd.extra_keywords:
            table.putkeyword("pyuvdata_extra", uvd.extra_keywords)
        if uvd.pol_convention is not None:
            table.putkeyword("pyuvdata_polconv", uvd.pol_convention)
        table.putkeyword("pyuvdata_flip_conj", True)
        table.done()
        self._table = None
        filepath = str(self._temporary)
        ms_utils.write_ms_antenna(filepath, uvobj=uvd)
        ms_utils.write_ms_data_description(filepath, uvobj=uvd)
        ms_utils.write_ms_feed(filepath, uvobj=uvd)
        ms_utils.write_ms_field(filepath, uvobj=uvd)
        ms_utils.write_ms_history(filepath, uvobj=uvd)
        ms_utils.write_ms_observation(filepath, uvobj=uvd)
        self._write_observation_span(filepath)
        self._write_pointing(filepath)
        ms_utils.write_ms_polarization(filepath, pol_order=self.pol_order, uvobj=uvd)
        ms_utils.write_ms_source(filepath, uvobj=uvd)
        ms_utils.write_ms_spectral_window(filepath, uvobj=uvd)
        self._write_mwa_tables(filepath)

    def _write_mwa_tables(self, filepath: str) -> None:
        """The MWA tables and columns Birli writes (cotter's, as Marlu emulates them).

        ``MWA_TILE_POINTING`` (the beamformer delays, which EveryBeam and WSClean's MWA
        beam read: without it ``-apply-primary-beam`` fails), ``MWA_SUBBAND``, and the
        ``MWA_*`` columns of ANTENNA, FIELD, OBSERVATION and SPECTRAL_WINDOW, filled as
        Birli fills them.
        """
        from casacore import tables

        description, meta = self.description, self.description.meta
        _, ra_deg, dec_deg = description.phase_centre
        epoch = {"QuantumUnits": ["s"], "MEASINFO": {"type": "epoch", "Ref": "UTC"}}
        first_centre_s = self._time_centres_mjd_s[0]
        n_times = len(description.time_centres_gps_s)
        sched_start_mjd_s = _mjd_s(np.array([meta.sched_start_gps_s]))[0]
        coarse_chans = np.unique(np.floor(description.freqs_hz / COARSE_CHAN_WIDTH_HZ + 0.5))
        centre_chan = int(coarse_chans[len(coarse_chans) // 2]) if len(coarse_chans) else 0
        n_ants = meta.n_ants
        rf_inputs = meta.rf_inputs if meta.rf_inputs is not None else np.zeros((n_ants, 2))
        slots = meta.receiver_slots if meta.receiver_slots is not None else np.zeros((n_ants, 2))
        receivers = meta.receivers if meta.receivers is not None else np.zeros(n_ants)
        subtables: dict[str, tuple[list[Any], dict[str, Any]]] = {
            "MWA_TILE_POINTING": (
                [tables.makearrcoldesc("INTERVAL", 0.0, keywords=epoch),
                 tables.makearrcoldesc("DELAYS", 0, valuetype="int"),
                 tables.makearrcoldesc("DIRECTION", 0.0)],
                {"INTERVAL": np.array([[first_centre_s, first_centre_s + n_times * description.int_time_s]]),
                 "DELAYS": np.array([meta.beamformer_delays or (0,) * 16], dtype=np.int32),
                 "DIRECTION": np.radians([[ra_deg, dec_deg]])},
            ),
            "MWA_SUBBAND": (
                [tables.makescacoldesc("NUMBER", 0), tables.makescacoldesc("GAIN", 0.0),
                 tables.makescacoldesc("FLAG_ROW", False)],
                {"NUMBER": np.arange(len(coarse_chans), dtype=np.int32),
                 "GAIN": np.zeros(len(coarse_chans)),  # metafits CHANGAIN, deprecated: 0
                 "FLAG_ROW": np.zeros(len(coarse_chans), dtype=bool)},
            ),
        }  # fmt: skip
        with tables.table(filepath, ack=False, readonly=False) as main:
            for name, (columns, values) in subtables.items():
                n_rows = len(next(iter(values.values())))
                path = f"{filepath}/{name}"
                with tables.table(
                    path, tables.maketabdesc(columns), nrow=n_rows, ack=False
                ) as subtable:
                    for column, column_values in values.items():
                        subtable.putcol(column, column_values)
                main.putkeyword(name, f"Table: {path}")
        columns_of: dict[str, tuple[list[Any], dict[str, Any]]] = {
            "ANTENNA": (
                [tables.makearrcoldesc("MWA_INPUT", 0, valuetype="int"),
                 tables.makescacoldesc("MWA_TILE_NR", 0),
                 tables.makescacoldesc("MWA_RECEIVER", 0),
                 tables.makearrcoldesc("MWA_SLOT", 0, valuetype="int"),
                 tables.makearrcoldesc("MWA_CABLE_LENGTH", 0.0)],
                {"MWA_INPUT": np.asarray(rf_inputs, np.int32),
                 "MWA_TILE_NR": np.asarray(meta.antenna_numbers, np.int32),
                 "MWA_RECEIVER": np.asarray(receivers, np.int32),
                 "MWA_SLOT": np.asarray(slots, np.int32),
                 "MWA_CABLE_LENGTH": np.asarray(meta.cable_length_m, np.float64)},
            ),
            "FIELD": ([tables.makescacoldesc("MWA_HAS_CALIBRATOR", False)],
                      {"MWA_HAS_CALIBRATOR": [meta.calibrator]}),
            "OBSERVATION": (
                [tables.makescacoldesc("MWA_GPS_TIME", 0.0),
                 tables.makescacoldesc("MWA_FILENAME", ""),
                 tables.makescacoldesc("MWA_OBSERVATION_MODE", ""),
                 tables.makescacoldesc("MWA_FLAG_WINDOW_SIZE", 0),
                 tables.makescacoldesc("MWA_DATE_REQUESTED", 0.0, keywords=epoch)],
                {"MWA_GPS_TIME": [float(meta.sched_start_gps_s)],
                 "MWA_FILENAME": [meta.obs_name], "MWA_OBSERVATION_MODE": [meta.mode],
                 # Birli's num_sel_timesteps + 1: the integrations held, not the padding
                 "MWA_FLAG_WINDOW_SIZE": [description.native_times + 1],
                 "MWA_DATE_REQUESTED": [sched_start_mjd_s]},
            ),
            "SPECTRAL_WINDOW": (
                [tables.makescacoldesc("MWA_CENTRE_SUBBAND_NR", 0)],
                # Every window: the band's centre coarse channel; and each window's own centre
                # as its REF_FREQUENCY, as Birli (Marlu) writes it (write_ms puts the band's
                # first channel in every window's row).
                {"MWA_CENTRE_SUBBAND_NR": np.full(len(self.windows), centre_chan, np.int32),
                 "REF_FREQUENCY": np.array([np.median(description.freqs_hz[window])
                                           for window in self.windows])},
            ),
        }  # fmt: skip
        for name, (columns, values) in columns_of.items():
            with tables.table(f"{filepath}/{name}", ack=False, readonly=False) as subtable:
                subtable.addcols(tables.maketabdesc(columns))
                for column, column_values in values.items():
                    subtable.putcol(column, column_values)

    @cached_property
    def _time_centres_mjd_s(self) -> NDArray[np.float64]:
        """The integrations' centres in order, MJD seconds (UTC), from their GPS seconds."""
        return _mjd_s(np.sort(np.asarray(self.description.time_centres_gps_s, np.float64)))

    def _write_observation_span(self, filepath: str) -> None:
        """OBSERVATION's TIME_RANGE (first integration's start to last one's end, MJD
        seconds) and PROJECT: pyuvdata leaves them [0, 0] and empty, and CASA's listobs
        and plotms read the observation's span from there."""
        from casacore import tables

        uvd = self.uvd
        first, last = np.argmin(uvd.time_array), np.argmax(uvd.time_array)
        centres_s = self._time_centres_mjd_s[[0, -1]]
        halves_s = uvd.integration_time[[first, last]] / 2
        span_s = np.array([centres_s[0] - halves_s[0], centres_s[1] + halves_s[1]])
        with tables.table(filepath + "::OBSERVATION", ack=False, readonly=False) as observation:
            observation.putcell("TIME_RANGE", 0, span_s)
            observation.putcell("PROJECT", 0, self.project_id)

    def _write_pointing(self, filepath: str) -> None:
        """The POINTING table: every antenna at every integration, where the tiles point.

        The MWA's tiles hold an azimuth and elevation (the beamformer delays), so the sky
        direction they point to drifts with the Earth's rotation: DIRECTION is that
        direction (J2000) at each integration, TRACKING false; TARGET is the pointing
        centre the metafits records (RA, DEC). pyuvdata's ``write_ms_pointing`` writes the
        celestial pole ("ZENITH") for every row, and puts the columns row by row into
        casacore's incremental storage manager, which takes time growing with the square
        of the rows (2 s for 16,000 rows, minutes for a long observation). Here TARGET
        goes into the first row before the others are added, which take it over, and
        DIRECTION into all rows at once (0.2 s for 256,000 rows; a second column written
        whole after it took minutes).
        """
        from casacore import tables

        from observatory.telescope.sky import radec_of_azel

        uvd, meta = self.uvd, self.description.meta
        n_ants = int(np.max(uvd.telescope.antenna_numbers)) + 1
        times = self._time_centres_mjd_s
        centres_gps_s = np.asarray(self.description.time_centres_gps_s, dtype=np.float64)
        in_time_order = np.argsort(centres_gps_s)
        # Baseline-times are time-major: each integration's rows follow one another.
        intervals = np.median(uvd.integration_time.reshape(len(times), -1), axis=1)
        intervals = intervals[in_time_order]
        n_rows = n_ants * len(times)
        az_deg, el_deg = meta.pointing_azel_deg
        ra_deg, dec_deg = radec_of_azel(
            np.full(len(times), az_deg), np.full(len(times), el_deg), centres_gps_s[in_time_order]
        )
        # Cells of (polynomial term, RA/Dec), as FIELD's PHASE_DIR: casacore's [2, NUM_POLY+1].
        # (write_ms's (2, 1) cells read as two directions, the second nonsense.)
        directions = np.repeat(
            np.radians(np.stack([ra_deg, dec_deg], axis=1))[:, None, :], n_ants, axis=0
        )
        target = (
            np.radians(np.array(meta.pointing_radec_deg))[None, :]
            if meta.pointing_radec_deg is not None
            else directions[len(directions) // 2]
        )
        with tables.table(filepath + "::POINTING", ack=False, readonly=False) as pointing:
            pointing.addrows(1)
            pointing.putcell("TARGET", 0, target)
            pointing.addrows(n_rows - 1)
            pointing.putcol("DIRECTION", directions)
            pointing.putcol("ANTENNA_ID", np.tile(np.arange(n_ants, dtype=np.int32), len(times)))
            pointing.putcol("TIME", np.repeat(times, n_ants))
            pointing.putcol("INTERVAL", np.repeat(intervals, n_ants))
            names = np.asarray([meta.obs_name] * n_rows, dtype=np.bytes_)
            pointing.putcol("NAME", names, nrow=n_rows)
            pointing.putcol("NUM_POLY", np.zeros(n_rows, dtype=np.int32))
            pointing.putcol("TIME_ORIGIN", np.repeat(times, n_ants))
            pointing.putcol("TRACKING", np.zeros(n_rows, dtype=bool))


def _mjd_s(gps_s: NDArray[np.float64]) -> NDArray[np.float64]:
    """GPS seconds as MJD seconds (UTC), a measurement set's times.

    From astropy's two-part Julian date: a single float64 Julian date (pyuvdata's
    time_array) resolves only 40 microseconds, which left integrations 2 s +- 16 us apart.
    """
    utc = Time(np.asarray(gps_s, dtype=np.float64), format="gps").utc
    return np.asarray((utc.jd1 - 2400000.5) * 86400.0 + utc.jd2 * 86400.0, dtype=np.float64)
