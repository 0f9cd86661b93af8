"""A uvfits writer that streams integrations to disk, so the output need not fit in memory.

pyuvdata writes uvfits only from a complete ``UVData`` object in memory, which
for an unaveraged observation is as large as the raw data. This writer lays out
the file exactly as pyuvdata's ``write_uvfits`` does (random groups of float32
with the same parameters, conventions and AIPS AN / FQ / SU tables; the tests
compare the two), but takes the data a block of integrations at a time: the
primary header (whose group count is known in advance) first, then each
block's groups, then the padding and the tables. The geometry (apparent
coordinates, LST, uvw) comes from pyuvdata's own phasing functions.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol

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
#: Bytes of groups built in memory at a time by :meth:`UvfitsStream.write`.
DEFAULT_BUFFER_BYTES = 32 * 1024 * 1024
#: Storage order of pols in uvfits (increasing |AIPS code|: XX YY XY YX) from chunk order.
_POLS_FROM_CHUNK = [0, 3, 1, 2]


class GroupSource(Protocol):
    """A range of channels of a block of integrations, read a range of groups at a time.

    Groups are (time, baseline) pairs of the block, time slowest, as uvfits stores them.
    """

    @property
    def n_chans(self) -> int:
        """Channels in the range."""
        ...

    def groups(
        self, start: int, stop: int
    ) -> tuple[NDArray[np.complex64], NDArray[np.float32], NDArray[np.bool_]]:
        """(vis, weights, flags) of groups ``start`` to ``stop``: shape (groups, n_chans, 4),
        pols in chunk order (XX, XY, YX, YY)."""
        ...


class AtomicStream:
    """An output written a block of integrations at a time, through ``atomic_output``.

    Subclasses set ``n_times``, ``times_written`` and ``_context`` and define ``_finish``
    (what follows the last block) and ``_close``: the output appears only when every
    integration was written and finished; otherwise nothing is left.
    """

    n_times: int
    times_written: int
    _context: AbstractContextManager[Path]

    def _finish(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            try:
                if self.times_written != self.n_times:
                    raise RuntimeError(
                        f"{self.times_written} of {self.n_times} integrations were written"
                    )
                self._finish()
            except BaseException as failure:
                # A failed or interrupted finish (a full disk, a stop signal) must not
                # publish what it left half-written: the temporary goes, the error stays.
                self._close()
                self._context.__exit__(type(failure), failure, failure.__traceback__)
                raise
        self._close()
        self._context.__exit__(exc_type, exc, traceback)


class UvfitsStream(AtomicStream):
    """Writes one uvfits file, a block of integrations at a time, atomically.

    Use as a context manager; call :meth:`write` with consecutive blocks of
    integrations until all of the description's integrations have been written.
    """

    def __init__(self, path: str | os.PathLike[str], description: OutputDescription) -> None:
        from astropy.time import Time

        from observatory.telescope.site import mwa_location

        meta = description.meta
        self.path = Path(path)
        self.meta = meta
        self.n_times = len(description.time_centres_gps_s)
        self.freqs_hz = np.asarray(description.freqs_hz, dtype=np.float64)
        self.channel_width_hz = description.channel_width_hz
        self.int_time_s = description.int_time_s
        self.phase_centre = description.phase_centre
        self.history = description.history
        self.vis_units = "Jy" if description.calibrated else "uncalib"
        first_time_jd = float(Time(description.time_centres_gps_s[0], format="gps").utc.jd)
        self.location = mwa_location()
        self.jd_midnight = np.floor(first_time_jd - 0.5) + 0.5
        self.first_time_jd = first_time_jd
        self.n_spws = _n_spws(self.freqs_hz, self.channel_width_hz)
        self.p, self.q = meta.baseline_antennas()
        self.antenna_positions_m = antenna_positions_ecef(meta, self.location)
        self.times_written = 0
        self.app_radec_deg: list[tuple[float, float]] = []
        self._context = atomic_output(self.path)
        self._handle: BinaryIO | None = None
        self._bytes_written = 0

    def __enter__(self) -> UvfitsStream:
        temporary = self._context.__enter__()
        self._handle = open(temporary, "wb")
        header = self._primary_header()
        self._handle.write(header.tostring().encode("ascii"))
        return self

    def _finish(self) -> None:
        assert self._handle is not None
        self._handle.write(b"\0" * (-self._bytes_written % _BLOCK))
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

    def write(
        self,
        times_jd: NDArray[np.float64],
        parts: Sequence[GroupSource],
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        """Append a block of integrations, given as consecutive channel ranges in frequency order.

        The block's groups (one per time and baseline, time slowest) are built and
        written ``buffer_bytes`` at a time (at least one group), each part reading
        only the groups of that buffer: the block as a whole never sits in memory.
        """
        assert self._handle is not None
        n_times, n_bl = len(times_jd), len(self.p)
        n_chans = sum(part.n_chans for part in parts)
        lst, app_ra, app_dec, uvw_m = self._geometry(np.asarray(times_jd, dtype=np.float64))
        self.app_radec_deg.extend(zip(np.degrees(app_ra), np.degrees(app_dec), strict=True))
        n_params = len(_PARAMETERS)
        # uvfits' convention is the conjugate of pyuvdata's, with uvw negated (in seconds).
        uvw_s = (-uvw_m / SPEED_OF_LIGHT_M_S).reshape(n_times * n_bl, 3)
        date = np.asarray(times_jd) - self.jd_midnight
        lst_deg = np.degrees(lst)
        group_floats = n_params + n_chans * 4 * 3
        step = max(1, buffer_bytes // (group_floats * 4))
        for start in range(0, n_times * n_bl, step):
            stop = min(start + step, n_times * n_bl)
            time_index, baseline_index = np.divmod(np.arange(start, stop), n_bl)
            # Built in native float32, swapped to FITS's big-endian order in place at the end.
            record = np.empty((stop - start, group_floats), dtype=np.float32)
            record[:, 0:3], record[:, 5:8] = _float32_pair(uvw_s[start:stop])
            record[:, 3], record[:, 4] = _float32_pair(date[time_index])
            record[:, 8] = 256 * (self.p[baseline_index] + 1) + (self.q[baseline_index] + 1)
            record[:, 9] = 1  # SOURCE: the one phase centre
            record[:, 10] = self.p[baseline_index]
            record[:, 11] = self.q[baseline_index]
            record[:, 12] = 1
            record[:, 13] = self.int_time_s
            record[:, 14], record[:, 15] = _float32_pair(lst_deg[time_index])
            values = record[:, n_params:].reshape(stop - start, n_chans, 4, 3)
            first = 0
            for part in parts:
                vis, weights, flags = part.groups(start, stop)
                chans = slice(first, first + part.n_chans)
                first = chans.stop
                for out_pol, pol in enumerate(_POLS_FROM_CHUNK):
                    target = values[:, chans, out_pol]
                    target[..., 0] = vis[..., pol].real
                    np.negative(vis[..., pol].imag, out=target[..., 1])
                    np.copyto(target[..., 2], weights[..., pol])
                    target[..., 2][flags[..., pol]] *= -1.0
            record.byteswap(inplace=True)
            self._handle.write(record.data)
            self._bytes_written += record.nbytes
        self.times_written += n_times

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
                fits.Column(name="NOSTA", format="1J", array=np.arange(n)),  # as pyuvdata writes
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
        app = np.array(self.app_radec_deg)
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


def _float32_pair(values: NDArray[np.float64]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """``values`` as a float32 and the float32 of what it leaves (pyuvdata's double parameters)."""
    high = values.astype(np.float32)
    return high, (values - high.astype(np.float64)).astype(np.float32)


def _n_spws(freqs_hz: NDArray[np.float64], channel_width_hz: float) -> int:
    window_ids = spectral_window_ids(freqs_hz, channel_width_hz)
    return 1 if window_ids is None else len(np.unique(window_ids))
