"""A measurement set writer that streams integrations to disk, so the output need not fit in memory.

pyuvdata writes a measurement set only from a complete ``UVData`` object in
memory: for an unaveraged observation, several times the raw data. This writer
lays the set out exactly as pyuvdata's ``write_ms`` does (a test compares every
table and column), using pyuvdata's own pieces: its skeleton (``init_ms_file``),
its subtable writers, fed a metadata-only ``UVData`` (every baseline-time's
coordinates, no visibilities), and the main table's rows in the same order with
the same values. Only the visibilities, weights and flags come a block of
integrations at a time, each block in buffers of (time, baseline) groups.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.time import Time
from numpy.typing import NDArray

from observatory.core.storage import atomic_output
from observatory.preprocess.uvfits import DEFAULT_BUFFER_BYTES, AtomicStream, GroupSource
from observatory.preprocess.writer import OutputDescription, spectral_window_ids, to_uvdata

#: Rows of the per-row columns written at a time when the set is finished.
_ROWS_PER_PUT = 1 << 20
#: Bytes per visibility sample held while a buffer is written (complex64 data and its
#: conjugate, float32 weight, bool flag).
_BYTES_PER_SAMPLE = 8 + 8 + 4 + 1


class MeasurementSetStream(AtomicStream):
    """Writes one measurement set, a block of integrations at a time, atomically.

    Use as a context manager; call :meth:`write` with consecutive blocks of
    integrations until all of the description's integrations have been written.
    The set appears at ``path`` only when complete.
    """

    def __init__(self, path: str | os.PathLike[str], description: OutputDescription) -> None:
        self.path = Path(path)
        self.uvd = to_uvdata(description)  # metadata only
        self.n_baselines = description.meta.n_baselines
        self.n_times = len(description.time_centres_gps_s)
        self.n_blts = self.n_times * self.n_baselines
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
        self.times_written = 0
        self._context = atomic_output(self.path)
        self._temporary: Path | None = None
        self._table: Any = None

    def __enter__(self) -> MeasurementSetStream:
        from pyuvdata.utils.io import ms as ms_utils

        self._temporary = self._context.__enter__()
        self._table = ms_utils.init_ms_file(str(self._temporary))
        self._table.addrows(self.n_blts * len(self.windows))
        return self

    def _close(self) -> None:
        if self._table is not None:
            self._table.close()

    def write(
        self,
        times_jd: NDArray[np.float64],
        parts: Sequence[GroupSource],
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        """Append a block of integrations, given as consecutive channel ranges in frequency order.

        As :meth:`observatory.preprocess.uvfits.UvfitsStream.write`: the block's groups
        are read from the parts ``buffer_bytes`` at a time.
        """
        n_groups = len(times_jd) * self.n_baselines
        first_blt = self.times_written * self.n_baselines
        n_chans = sum(part.n_chans for part in parts)
        step = max(1, buffer_bytes // (n_chans * 4 * _BYTES_PER_SAMPLE))
        for start in range(0, n_groups, step):
            stop = min(start + step, n_groups)
            vis_parts, weight_parts, flag_parts = zip(
                *(part.groups(start, stop) for part in parts), strict=True
            )
            # CASA's convention is the conjugate of pyuvdata's (write_ms's flip_conj).
            data = np.conjugate(np.concatenate(vis_parts, axis=1)[..., self.pol_order])
            weights = np.concatenate(weight_parts, axis=1)[..., self.pol_order]
            flags = np.concatenate(flag_parts, axis=1)[..., self.pol_order]
            for window_index, window in enumerate(self.windows):
                row = window_index * self.n_blts + first_blt + start
                n_rows = stop - start
                self._table.putcol("DATA", data[:, window], row, n_rows)
                self._table.putcol("WEIGHT_SPECTRUM", weights[:, window], row, n_rows)
                self._table.putcol("FLAG", flags[:, window], row, n_rows)
                row_weights = np.median(weights[:, window], axis=1).astype(self._row_weight_dtype)
                sigma = np.zeros_like(row_weights)
                np.power(row_weights, -0.5, where=row_weights != 0, out=sigma)
                self._table.putcol("WEIGHT", row_weights, row, n_rows)
                self._table.putcol("SIGMA", sigma, row, n_rows)
        self.times_written += len(times_jd)

    def _finish(self) -> None:
        """The main table's per-row columns and keywords, then the subtables (as write_ms)."""
        from pyuvdata.utils.io import ms as ms_utils

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
