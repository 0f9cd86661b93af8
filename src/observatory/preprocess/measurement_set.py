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
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
from astropy.time import Time
from numpy.typing import NDArray

from observatory.core.storage import atomic_output
from observatory.preprocess.uvfits import DEFAULT_BUFFER_BYTES, AtomicStream
from observatory.preprocess.writer import OutputDescription, spectral_window_ids, to_uvdata

#: Samples (pols x channels x rows) in a tile of the data columns (a complex tile: 256 KiB).
_TILE_SAMPLES = 32768
#: Rows of the per-row columns written at a time when the set is finished.
_ROWS_PER_PUT = 1 << 20
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
        # WEIGHT: per row and pol, the median weight over the row's channels; SIGMA follows
        # from it. write_ms keeps the medians in float32 with one window, float64 with
        # several (which rounds SIGMA differently): the same here.
        self._row_weight_dtype = np.float32 if len(self.windows) == 1 else np.float64
        self._context = atomic_output(self.path)
        self._temporary: Path | None = None
        self._table: Any = None

    def __enter__(self) -> MeasurementSetStream:
        from pyuvdata.utils.io import ms as ms_utils

        self._temporary = self._context.__enter__()
        try:
            self._check_free_space()
            self._table = ms_utils.init_ms_file(str(self._temporary))
            self._tile_by_chunk()
            self._table.addrows(self.n_blts * len(self.windows))
            self._shape_cells()
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
        # Per sample: DATA 8 bytes, WEIGHT_SPECTRUM 4, FLAG a bit; per row about 150 bytes.
        needed_bytes = self.n_blts * (self.n_chans * n_pols * (8 + 4 + 1 / 8) + 150)
        stats = os.statvfs(self.path.parent)  # the temporary is made beside the target
        free_bytes = stats.f_bavail * stats.f_frsize
        if needed_bytes > free_bytes:
            raise OSError(
                errno.ENOSPC,
                f"cannot write {self.path}: it needs about {needed_bytes / 1e9:.2f} GB and "
                f"{free_bytes / 1e9:.2f} GB are free (No space left on device)",
            )

    def _tile_by_chunk(self) -> None:
        """Store DATA, FLAG and WEIGHT_SPECTRUM in tiles one chunk's channels wide.

        Each chunk then writes whole tiles. In tiles across the band (casacore's default),
        every chunk would rewrite every tile, and casacore would cache them all: the whole
        column in memory. The columns are made again, with the same descriptions, in the
        empty skeleton.
        """
        from casacore import tables

        n_pols = len(self.uvd.polarization_array)
        tile_rows = max(1, _TILE_SAMPLES // (n_pols * self.chunk_chans))
        groups = {"DATA": "TiledData", "FLAG": "TiledFlag", "WEIGHT_SPECTRUM": "TiledWgtSpectrum"}
        descriptions = {name: self._table.getcoldesc(name) for name in groups}
        self._table.removecols(list(groups))
        for name, group in groups.items():
            self._table.addcols(
                tables.makecoldesc(name, descriptions[name]),
                {
                    "TYPE": "TiledShapeStMan",
                    "NAME": group,
                    "SPEC": {
                        "DEFAULTTILESHAPE": np.array(
                            [n_pols, self.chunk_chans, tile_rows], dtype=np.int32
                        )
                    },
                },
            )
            # A chunk writes along the rows of its tiles: a few tiles at a time suffice.
            self._table.setmaxcachesize(name, self.buffer_bytes)

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
        unique_jd, time_index = np.unique(uvd.time_array, return_inverse=True)
        time_mjd_s = (Time(unique_jd, format="jd", scale="utc").mjd * 86400.0)[time_index]
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
                    "INTERVAL": uvd.integration_time[blts],
                    "EXPOSURE": uvd.integration_time[blts],
                    "DATA_DESC_ID": np.full(n_rows, window_index),
                    "SCAN_NUMBER": uvd.scan_number_array[blts],
                    "TIME": time_mjd_s[blts],
                    "TIME_CENTROID": time_mjd_s[blts],
                    "UVW": -uvd.uvw_array[blts],  # flip_conj negates uvw too
                    "FIELD_ID": np.zeros(n_rows, dtype=int),  # the one phase centre
                }
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
        ms_utils.write_ms_pointing(filepath, uvobj=uvd)
        ms_utils.write_ms_polarization(filepath, pol_order=self.pol_order, uvobj=uvd)
        ms_utils.write_ms_source(filepath, uvobj=uvd)
        ms_utils.write_ms_spectral_window(filepath, uvobj=uvd)
