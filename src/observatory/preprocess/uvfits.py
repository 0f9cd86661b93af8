"""A uvfits writer that takes each chunk of the data straight into its place in the file.

pyuvdata writes uvfits only from a complete ``UVData`` object in memory, which
for an unaveraged observation is as large as the raw data. This writer lays out
the file exactly as pyuvdata's ``write_uvfits`` does (random groups of float32
with the same parameters, conventions and AIPS AN / FQ / SU tables; the tests
compare the two), but takes the data a chunk at a time, in any order: a block of
integrations of a range of channels. The file is reserved on disk at the start
(its size is known: a full disk fails then, naming what it needs), the groups'
parameters are written first, and each chunk goes straight to its columns of its
groups: nothing waits for the rest of its integrations, in memory or on disk. The
geometry (apparent coordinates, LST, uvw) comes from pyuvdata's own phasing functions.
"""

from __future__ import annotations

import errno
import gc
import io
import os
import traceback
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from observatory.core.storage import atomic_output
from observatory.preprocess.writer import (
    OutputDescription,
    antenna_positions_ecef,
    spectral_window_ids,
)
from observatory.telescope.instrument import SPEED_OF_LIGHT_M_S

_BLOCK = 2880
#: Random-group parameters in pyuvdata's order (DATE, UU, VV, WW written twice: float32 pairs).
_PARAMETERS = [
    "UU", "VV", "WW", "DATE", "DATE", "UU", "VV", "WW",
    "BASELINE", "SOURCE", "ANTENNA1", "ANTENNA2", "SUBARRAY", "INTTIM", "LST", "LST",
]  # fmt: skip
#: Bytes of the file mapped (uvfits) or of samples built (measurement set) at a time.
DEFAULT_BUFFER_BYTES = 32 * 1024 * 1024
#: Storage order of pols in uvfits (increasing |AIPS code|: XX YY XY YX) from chunk order.
_POLS_FROM_CHUNK = [0, 3, 1, 2]


class AtomicStream:
    """An output written a chunk at a time, in any order, through ``atomic_output``.

    A chunk is a block of consecutive integrations of a range of consecutive channels.
    Subclasses set ``n_times``, ``n_chans`` and ``_context``, call ``_record`` for each
    chunk and define ``_finish`` (what follows the data) and ``_close``: the output
    appears only when every (integration, channel) was written once and the output
    finished; otherwise nothing is left.
    """

    #: The output's path (its target, not the hidden temporary).
    path: Path
    n_times: int
    n_chans: int
    _context: AbstractContextManager[Path]
    _written: NDArray[np.bool_] | None = None
    _finished = False

    def _record(self, first_time: int, first_chan: int, n_times: int, n_chans: int) -> None:
        """Check that a chunk of ``n_times`` integrations and ``n_chans`` channels fits and
        is new, and count it as written."""
        if self._written is None:
            self._written = np.zeros((self.n_times, self.n_chans), dtype=bool)
        cells = self._written[first_time : first_time + n_times, first_chan : first_chan + n_chans]
        if first_time < 0 or first_chan < 0 or cells.shape != (n_times, n_chans):
            raise ValueError(
                f"integrations {first_time}-{first_time + n_times - 1}, channels "
                f"{first_chan}-{first_chan + n_chans - 1} are outside the output's "
                f"{self.n_times} integrations and {self.n_chans} channels"
            )
        if cells.any():
            raise ValueError(
                f"integrations {first_time}-{first_time + n_times - 1}, channels "
                f"{first_chan}-{first_chan + n_chans - 1} were written already"
            )
        cells[...] = True

    def _finish(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Write what follows the data (tables, padding), once every cell was written.

        Called by ``__exit__`` when not called before. Several outputs of one conversion
        are all finished first and then published, so that a failure while finishing one
        publishes none (``__exit__`` with the exception).
        """
        if self._finished:
            return
        missing = (
            self.n_times * self.n_chans
            if self._written is None
            else int(np.count_nonzero(~self._written))
        )
        if missing:
            raise RuntimeError(
                f"{missing} of {self.n_times * self.n_chans} (integration, channel) "
                "cells were not written"
            )
        self._finish()
        self._finished = True

    def _abandon(self, failure: BaseException) -> None:
        """Close and remove the temporary output after ``failure``.

        The finished frames ``failure`` passed through are cleared first: a library that
        was writing (pyuvdata's measurement-set subtables, interrupted by a stop signal)
        may hold an open table in one of them, which casacore flushes when it is
        destroyed; destroyed after its directory is removed, it aborts the process.
        """
        self._close()
        traceback.clear_frames(failure.__traceback__)
        gc.collect()  # tables held in reference cycles too, while their files are there
        self._context.__exit__(type(failure), failure, failure.__traceback__)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            try:
                self.finish()
            except BaseException as failure:
                # A failed or interrupted finish (a full disk, a stop signal) must not
                # publish what it left half-written: the temporary goes, the error stays.
                self._abandon(failure)
                raise
            self._close()
            self._context.__exit__(None, None, None)
        else:
            self._abandon(exc)


@dataclass(frozen=True)
class UvfitsGroups:
    """Where a uvfits file's random groups are, to write chunks into them from any process.

    Picklable: a conversion's worker processes write their chunks' data themselves, and
    the process holding the :class:`UvfitsStream` counts them (``mark_written``).
    """

    path: Path
    data_offset: int
    n_chans: int
    n_baselines: int
    #: Bytes of the file mapped at a time.
    buffer_bytes: int = DEFAULT_BUFFER_BYTES

    @property
    def group_bytes(self) -> int:
        """Bytes of one group: its parameters, then (real, imag, weight) per channel and pol."""
        return (len(_PARAMETERS) + self.n_chans * 4 * 3) * 4

    def mapped(self, start: int, stop: int) -> np.memmap[Any, np.dtype[Any]]:
        """Groups ``start`` to ``stop`` of the file, mapped (big-endian float32)."""
        return np.memmap(
            self.path,
            dtype=">f4",
            mode="r+",
            offset=self.data_offset + start * self.group_bytes,
            shape=(stop - start, self.group_bytes // 4),
        )

    def write_data(
        self,
        first_time: int,
        first_chan: int,
        vis: NDArray[np.complex64],
        weights: NDArray[np.float32],
        flags: NDArray[np.bool_],
    ) -> None:
        """Write a chunk's data (as :meth:`UvfitsStream.write`) into its groups' columns,
        ``buffer_bytes`` of the file mapped at a time (the pages written stay few in the
        process's memory)."""
        n_times, n_bl, n_chans, _ = vis.shape
        vis = vis.reshape(n_times * n_bl, n_chans, 4)
        weights = weights.reshape(vis.shape)
        flags = flags.reshape(vis.shape)
        columns = slice(
            len(_PARAMETERS) + first_chan * 12, len(_PARAMETERS) + (first_chan + n_chans) * 12
        )
        first_group = first_time * self.n_baselines
        step = max(1, self.buffer_bytes // self.group_bytes)
        for start in range(first_group, first_group + len(vis), step):
            stop = min(start + step, first_group + len(vis))
            mapped = self.mapped(start, stop)
            values = mapped[:, columns].reshape(stop - start, n_chans, 4, 3)
            rows = slice(start - first_group, stop - first_group)
            for out_pol, pol in enumerate(_POLS_FROM_CHUNK):
                # Assigned to the mapped big-endian floats: numpy swaps the bytes.
                values[..., out_pol, 0] = vis[rows, :, pol].real
                values[..., out_pol, 1] = -vis[rows, :, pol].imag
                values[..., out_pol, 2] = np.where(
                    flags[rows, :, pol], -weights[rows, :, pol], weights[rows, :, pol]
                )
            del values, mapped  # unmapped: the pages go to the page cache


class UvfitsStream(AtomicStream):
    """Writes one uvfits file, a chunk at a time in any order, atomically.

    Use as a context manager; call :meth:`write` with chunks until every integration
    of every channel of the description has been written once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        description: OutputDescription,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        from astropy.time import Time

        from observatory.telescope.site import mwa_location

        meta = description.meta
        self.path = Path(path)
        self.meta = meta
        self.n_times = len(description.time_centres_gps_s)
        self.times_jd = np.asarray(
            Time(description.time_centres_gps_s, format="gps").utc.jd, dtype=np.float64
        )
        self.freqs_hz = np.asarray(description.freqs_hz, dtype=np.float64)
        self.n_chans = len(self.freqs_hz)
        self.channel_width_hz = description.channel_width_hz
        self.int_time_s = description.int_time_s
        self.phase_centre = description.phase_centre
        self.history = description.history
        self.vis_units = "Jy" if description.calibrated else "uncalib"
        self.buffer_bytes = buffer_bytes
        first_time_jd = float(self.times_jd[0])
        self.location = mwa_location()
        self.jd_midnight = np.floor(first_time_jd - 0.5) + 0.5
        self.first_time_jd = first_time_jd
        self.n_spws = _n_spws(self.freqs_hz, self.channel_width_hz)
        self.p, self.q = meta.baseline_antennas()
        self.baselines = uvfits_baselines(self.p, self.q)
        self.antenna_positions_m = antenna_positions_ecef(meta, self.location)
        #: Apparent (RA, Dec) of the phase centre at each integration, as its groups are made.
        self.app_radec_deg = np.full((self.n_times, 2), np.nan)
        self._parameters_written = np.zeros(self.n_times, dtype=bool)
        self._context = atomic_output(self.path)
        self._handle: BinaryIO | None = None
        #: Where the groups are in the file (set on entering).
        self.groups = UvfitsGroups(Path(), 0, self.n_chans, len(self.p), buffer_bytes)

    def __enter__(self) -> UvfitsStream:
        temporary = self._context.__enter__()
        try:
            self._handle = open(temporary, "w+b")
            header = self._primary_header().tostring().encode("ascii")
            self._handle.write(header)
            self._handle.flush()
            self.groups = UvfitsGroups(
                temporary, len(header), self.n_chans, len(self.p), self.buffer_bytes
            )
            data_bytes = self.n_times * len(self.p) * self.groups.group_bytes
            self._reserve(len(header) + data_bytes + (-data_bytes % _BLOCK))
        except BaseException as failure:
            self._abandon(failure)
            raise
        return self

    def _reserve(self, size_bytes: int) -> None:
        """Allocate the file's header and groups on disk now: a full disk fails here, before
        any work, and never while the groups are written through a memory map (where it
        could not be reported)."""
        assert self._handle is not None
        if not hasattr(os, "posix_fallocate"):  # macOS: sized, not reserved
            os.ftruncate(self._handle.fileno(), size_bytes)
            return
        try:
            os.posix_fallocate(self._handle.fileno(), 0, size_bytes)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise OSError(
                exc.errno,
                f"cannot write {self.path}: it needs {size_bytes / 1e9:.2f} GB "
                f"({exc.strerror or exc})",
            ) from exc

    def _finish(self) -> None:
        assert self._handle is not None
        data_bytes = self.n_times * len(self.p) * self.groups.group_bytes
        self._handle.seek(self.groups.data_offset + data_bytes)
        self._handle.write(b"\0" * (-data_bytes % _BLOCK))
        self._write_tables()

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    # -- geometry -------------------------------------------------------------------------

    def _geometry(
        self, times_jd: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """LST (rad), apparent RA and Dec (rad) per time, and uvw (m) per (time, baseline)."""
        from pyuvdata.utils import get_lst_for_time
        from pyuvdata.utils.phasing import calc_app_coords, calc_frame_pos_angle, calc_uvw

        _, ra_deg, dec_deg = self.phase_centre
        lst = get_lst_for_time(times_jd, telescope_loc=self.location)
        app_ra, app_dec = calc_app_coords(
            lon_coord=np.deg2rad(ra_deg),
            lat_coord=np.deg2rad(dec_deg),
            coord_frame="icrs",
            coord_epoch=2000.0,
            time_array=times_jd,
            lst_array=lst,
            telescope_loc=self.location,
            all_times_unique=True,
        )
        frame_pa = calc_frame_pos_angle(
            time_array=times_jd,
            app_ra=app_ra,
            app_dec=app_dec,
            telescope_loc=self.location,
            ref_frame="icrs",
            ref_epoch=2000.0,
        )
        n_bl = len(self.p)
        uvw = calc_uvw(
            app_ra=np.repeat(app_ra, n_bl),
            app_dec=np.repeat(app_dec, n_bl),
            frame_pa=np.repeat(frame_pa, n_bl),
            lst_array=np.repeat(lst, n_bl),
            use_ant_pos=True,
            antenna_positions=self.antenna_positions_m,
            antenna_numbers=np.arange(self.meta.n_ants),
            ant_1_array=np.tile(self.p, len(times_jd)),
            ant_2_array=np.tile(self.q, len(times_jd)),
            telescope_lat=self.location.lat.rad,
            telescope_lon=self.location.lon.rad,
        )
        return lst, app_ra, app_dec, uvw.reshape(len(times_jd), n_bl, 3)

    # -- data -------------------------------------------------------------------------------

    def _write_parameters(self, first_time: int, stop_time: int) -> None:
        """The random parameters (coordinates, baseline, time, LST) of the groups of
        integrations ``first_time`` to ``stop_time`` not written yet."""
        n_bl = len(self.p)
        n_params = len(_PARAMETERS)
        missing = first_time + np.flatnonzero(~self._parameters_written[first_time:stop_time])
        if len(missing) == 0:
            return
        times_per_step = max(1, self.buffer_bytes // (self.groups.group_bytes * n_bl))
        for step_times in np.array_split(missing, -(-len(missing) // times_per_step)):
            # Runs of consecutive integrations: their groups are consecutive in the file.
            for times in np.split(step_times, np.flatnonzero(np.diff(step_times) != 1) + 1):
                times_jd = self.times_jd[times]
                lst, app_ra, app_dec, uvw_m = self._geometry(times_jd)
                self.app_radec_deg[times] = np.degrees(np.stack([app_ra, app_dec], axis=1))
                # uvfits' convention is the conjugate of pyuvdata's, uvw negated (in seconds).
                uvw_s = (-uvw_m / SPEED_OF_LIGHT_M_S).reshape(len(times) * n_bl, 3)
                time_index, baseline_index = np.divmod(np.arange(len(times) * n_bl), n_bl)
                parameters = np.empty((len(times) * n_bl, n_params), dtype=np.float32)
                parameters[:, 0:3], parameters[:, 5:8] = _float32_pair(uvw_s)
                parameters[:, 3], parameters[:, 4] = _float32_pair(
                    (times_jd - self.jd_midnight)[time_index]
                )
                parameters[:, 8] = self.baselines[baseline_index]
                parameters[:, 9] = 1  # SOURCE: the one phase centre
                # Antenna numbers from 1, as BASELINE and NOSTA have them (Birli's).
                parameters[:, 10] = self.p[baseline_index] + 1
                parameters[:, 11] = self.q[baseline_index] + 1
                parameters[:, 12] = 1
                parameters[:, 13] = self.int_time_s
                parameters[:, 14], parameters[:, 15] = _float32_pair(np.degrees(lst)[time_index])
                first_group = int(times[0]) * n_bl
                step = max(1, self.buffer_bytes // self.groups.group_bytes)
                for start in range(0, len(parameters), step):
                    stop = min(start + step, len(parameters))
                    mapped = self.groups.mapped(first_group + start, first_group + stop)
                    mapped[:, :n_params] = parameters[start:stop]
                    del mapped  # unmapped: the pages go to the page cache
        self._parameters_written[first_time:stop_time] = True

    def write(
        self,
        first_time: int,
        first_chan: int,
        vis: NDArray[np.complex64],
        weights: NDArray[np.float32],
        flags: NDArray[np.bool_],
    ) -> None:
        """Write a chunk into its place: output integrations ``first_time`` on, channels
        ``first_chan`` on.

        ``vis``, ``weights`` and ``flags`` have shape (times, baselines, channels, 4), pols
        in chunk order (XX, XY, YX, YY); a flagged sample is stored with a negative weight.
        """
        n_times, _, n_chans, _ = vis.shape
        self.mark_written(first_time, first_chan, n_times, n_chans)
        self.groups.write_data(first_time, first_chan, vis, weights, flags)

    def mark_written(self, first_time: int, first_chan: int, n_times: int, n_chans: int) -> None:
        """Count a chunk written through :attr:`groups` in another process, and write its
        groups' parameters if it is their first."""
        self._record(first_time, first_chan, n_times, n_chans)
        # The geometry is computed here, while the conversion's workers make the next chunks.
        self._write_parameters(first_time, first_time + n_times)

    # -- headers ------------------------------------------------------------------------------

    def _primary_header(self) -> Any:
        from astropy.io import fits
        from astropy.time import Time

        n_chans = len(self.freqs_hz) // self.n_spws
        header = fits.Header()
        header["SIMPLE"] = True
        header["BITPIX"] = -32
        header["NAXIS"] = 7
        header["NAXIS1"] = 0
        for axis, length in enumerate((3, 4, n_chans, self.n_spws, 1, 1), start=2):
            header[f"NAXIS{axis}"] = length
        header["EXTEND"] = True
        header["GROUPS"] = True
        header["PCOUNT"] = len(_PARAMETERS)
        header["GCOUNT"] = self.n_times * len(self.p)
        for index, name in enumerate(_PARAMETERS, start=1):
            header[f"PTYPE{index}"] = name
        for index in range(1, len(_PARAMETERS) + 1):
            header[f"PSCAL{index}"] = 1.0
            header[f"PZERO{index}"] = self.jd_midnight if index == 4 else 0.0
        date_obs = Time(self.first_time_jd, format="jd", scale="utc").strftime("%Y-%m-%d")
        header["DATE-OBS"] = date_obs
        axes = [
            ("COMPLEX", 1.0, 1.0),
            ("STOKES", -5.0, -1.0),
            ("FREQ", float(self.freqs_hz[0]), float(self.channel_width_hz)),
            ("IF", 1.0, 1.0),
        ]
        for axis, (ctype, crval, cdelt) in enumerate(axes, start=2):
            header[f"CTYPE{axis}"] = ctype
            header[f"CRVAL{axis}"] = crval
            header[f"CRPIX{axis}"] = 1.0
            header[f"CDELT{axis}"] = cdelt
        name, ra_deg, dec_deg = self.phase_centre
        header["CTYPE6"] = "RA"
        header["CRVAL6"] = float(ra_deg)
        header["CTYPE7"] = "DEC"
        header["CRVAL7"] = float(dec_deg)
        header["BUNIT"] = self.vis_units
        header["BSCALE"] = 1.0
        header["BZERO"] = 0.0
        header["OBJECT"] = name
        header["TELESCOP"] = "MWA"
        header["LAT"] = float(self.location.lat.deg)
        header["LON"] = float(self.location.lon.deg)
        header["ALT"] = float(self.location.height.to_value("m"))
        header["INSTRUME"] = "MWA"
        header["EPOCH"] = 2000.0
        header["RADESYS"] = "icrs"
        header["OBSID"] = self.meta.obsid
        for line in self.history.splitlines():
            header.add_history(line)
        return header

    def _write_tables(self) -> None:
        from astropy.io import fits
        from astropy.time import Time

        assert self._handle is not None
        meta = self.meta
        date = Time(self.first_time_jd, format="jd", scale="utc")
        midnight = Time(date.strftime("%Y-%m-%d"), format="iso", scale="utc")
        longitude_rad = self.location.lon.rad
        # AIPS STABXYZ: ECEF offsets rotated to the array's meridian.
        cos, sin = np.cos(longitude_rad), np.sin(longitude_rad)
        x, y, z = self.antenna_positions_m.T
        rotated = np.stack([cos * x + sin * y, -sin * x + cos * y, z], axis=1)
        n = meta.n_ants
        antenna = fits.BinTableHDU.from_columns(
            [
                fits.Column(name="ANNAME", format="8A", array=list(meta.antenna_names)),
                fits.Column(name="STABXYZ", format="3D", array=rotated),
                # Numbered from 1 as BASELINE's antennas are: hyperdrive (and AIPS) look those
                # up in NOSTA, and from 0 every baseline went to the next tiles.
                fits.Column(name="NOSTA", format="1J", array=np.arange(1, n + 1)),
                fits.Column(name="MNTSTA", format="1J", array=np.full(n, 6)),  # phased array
                fits.Column(name="STAXOF", format="1E", array=np.zeros(n)),
                fits.Column(name="POLTYA", format="1A", array=["X"] * n),
                fits.Column(name="POLAA", format="1E", array=np.full(n, 90.0)),
                fits.Column(name="POLTYB", format="1A", array=["Y"] * n),
                fits.Column(name="POLAB", format="1E", array=np.zeros(n)),
                fits.Column(name="DIAMETER", format="1E", array=np.full(n, 4.0)),
            ]
        )
        header = antenna.header
        header["EXTNAME"] = "AIPS AN"
        header["EXTVER"] = 1
        geocentric = self.location.geocentric
        for axis, value in zip("XYZ", geocentric, strict=True):
            header[f"ARRAY{axis}"] = float(value.to_value("m"))
        header["FRAME"] = "ITRF"
        header["FREQ"] = float(self.freqs_hz[0])
        header["RDATE"] = date.strftime("%Y-%m-%d")
        header["GSTIA0"] = float(midnight.sidereal_time("apparent", "greenwich").deg)
        header["UT1UTC"] = float(midnight.delta_ut1_utc)
        header["TIMESYS"] = "UTC"
        header["ARRNAM"] = "MWA"
        header["NO_IF"] = self.n_spws
        header["DEGPDY"] = 360.9856438593
        header["IATUTC"] = 37.0
        header["NUMORB"] = 0
        header["NOPCAL"] = 0
        header["POLTYPE"] = "X-Y LIN"
        header["HASMNT"] = True
        header["HASFEED"] = True
        header["FREQID"] = 1
        header["POLARX"] = 0.0
        header["POLARY"] = 0.0
        header["DATUTC"] = 0
        header["XYZHAND"] = "RIGHT"
        tables = [antenna]
        spw_shape = (1, self.n_spws)
        if self.n_spws > 1:
            starts = self.freqs_hz.reshape(self.n_spws, -1)[:, 0]
            n_chans = len(self.freqs_hz) // self.n_spws
            frequencies = fits.BinTableHDU.from_columns(
                [
                    fits.Column(name="FRQSEL", format="1J", array=[1]),
                    fits.Column(name="IF FREQ", unit="HZ", format=f"{self.n_spws}D", array=(starts - starts[0]).reshape(spw_shape)),
                    fits.Column(name="CH WIDTH", unit="HZ", format=f"{self.n_spws}E", array=np.full(spw_shape, self.channel_width_hz)),
                    fits.Column(name="TOTAL BANDWIDTH", unit="HZ", format=f"{self.n_spws}E", array=np.full(spw_shape, n_chans * self.channel_width_hz)),
                    fits.Column(name="SIDEBAND", format=f"{self.n_spws}J", array=np.ones(spw_shape)),
                ]
            )  # fmt: skip
            frequencies.header["EXTNAME"] = "AIPS FQ"
            frequencies.header["NO_IF"] = self.n_spws
            tables.append(frequencies)
        name, ra_deg, dec_deg = self.phase_centre
        app = self.app_radec_deg
        zeros = np.zeros(spw_shape)
        source = fits.BinTableHDU.from_columns(
            [
                fits.Column(name="ID. NO.", format="1J", array=[1]),
                fits.Column(name="SOURCE", format="20A", array=[name]),
                fits.Column(name="QUAL", format="1J", array=[0]),
                fits.Column(name="CALCODE", format="4A", array=["    "]),
                *(fits.Column(name=f"{s}FLUX", format=f"{self.n_spws}E", unit="JY", array=zeros) for s in "IQUV"),
                fits.Column(name="FREQOFF", format=f"{self.n_spws}D", unit="HZ", array=zeros),
                fits.Column(name="BANDWIDTH", format="1D", unit="HZ", array=[0.0]),
                fits.Column(name="RAEPO", format="1D", unit="DEGREES", array=[ra_deg]),
                fits.Column(name="DECEPO", format="1D", unit="DEGREES", array=[dec_deg]),
                fits.Column(name="EPOCH", format="1D", unit="YEARS", array=[2000.0]),
                fits.Column(name="RAAPP", format="1D", unit="DEGREES", array=[np.median(app[:, 0])]),
                fits.Column(name="DECAPP", format="1D", unit="DEGREES", array=[np.median(app[:, 1])]),
                fits.Column(name="LSRVEL", format=f"{self.n_spws}D", unit="M/SEC", array=zeros),
                fits.Column(name="RESTFREQ", format=f"{self.n_spws}D", unit="HZ", array=np.full(spw_shape, self.freqs_hz.mean())),
                fits.Column(name="PMRA", format="1D", unit="DEG/DAY", array=[0.0]),
                fits.Column(name="PMDEC", format="1D", unit="DEG/DAY", array=[0.0]),
            ]
        )  # fmt: skip
        source.header["EXTNAME"] = "AIPS SU"
        source.header["NO_IF"] = self.n_spws
        source.header["FREQID"] = 1
        source.header["VELDEF"] = "RADIO"
        source.header["VELTYP"] = "LSR"
        tables.append(source)
        # astropy serialises the tables after an empty primary HDU (one block), which is dropped.
        buffer = io.BytesIO()
        fits.HDUList([fits.PrimaryHDU(), *tables]).writeto(buffer)
        self._handle.write(buffer.getbuffer()[_BLOCK:])


def uvfits_baselines(p: NDArray[np.integer], q: NDArray[np.integer]) -> NDArray[np.int64]:
    """The uvfits ``BASELINE`` of antenna indices ``p <= q`` (0-based), as Birli writes it.

    ``256 a1 + a2`` with the 1-based ``a1, a2``; when ``a2`` is over 255 (arrays of more
    than 255 antennas, the MWA's 256 tiles) MIRIAD's ``2048 a1 + a2 + 65536``, which 256
    alone would make ambiguous. Every value is exact in float32 (below 2^24).
    """
    first = np.asarray(p, dtype=np.int64) + 1
    second = np.asarray(q, dtype=np.int64) + 1
    return np.where(second > 255, 2048 * first + second + 65_536, 256 * first + second)


def _float32_pair(values: NDArray[np.float64]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """``values`` as a float32 and the float32 of what it leaves (pyuvdata's double parameters)."""
    high = values.astype(np.float32)
    return high, (values - high.astype(np.float64)).astype(np.float32)


def _n_spws(freqs_hz: NDArray[np.float64], channel_width_hz: float) -> int:
    window_ids = spectral_window_ids(freqs_hz, channel_width_hz)
    return 1 if window_ids is None else len(np.unique(window_ids))
