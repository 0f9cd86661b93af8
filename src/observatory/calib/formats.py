"""Calibration solution files: AO-cal binary (``.bin``) and hyperdrive FITS.

Both hold direction-independent Jones matrices per timeblock, antenna and
chanblock, in pol order XX, XY, YX, YY, NaN meaning flagged. They are applied
multiplicatively, ``V_cal = J_p V_pq J_q^H`` (so they are the inverse of the
instrument's gains). Layouts: ../shared/specs/calib.md sections 1 and 2.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from observatory.core.storage import atomic_output
from observatory.core.text import is_ascii_digits

AOCAL_MAGIC = b"MWAOCAL\x00"
AOCAL_HEADER = struct.Struct("<8s6I2d")  # intro, fileType, structureType, I, A, C, P, start, end
N_POLS = 4


class CalFormatError(ValueError):
    """A solutions file that is malformed; the message names the file and the problem."""


@dataclass
class CalSolutions:
    """Direction-independent calibration solutions.

    Attributes
    ----------
    jones
        complex128, shape (timeblocks, antennas, chanblocks, 4): XX, XY, YX, YY.
        NaN marks a flagged solution.
    start_gps, end_gps
        Centroid times of the first timeblock's start and the last timeblock's
        end (GPS seconds); None when unknown.
    timeblocks_gps
        Per timeblock (start, end, average), GPS seconds, when known.
    tile_names, tile_flags
        Per antenna (metafits Antenna order), when known.
    dipole_gains, dipole_delays
        Per antenna, when known (hyperdrive's TILES columns): the beam's dipole gains,
        shape (antennas, 32), 16 X then 16 Y, 0 for a dead dipole; its dipole delays,
        shape (antennas, 16).
    chanblock_freqs_hz, chanblock_flags
        Per chanblock, when known.
    results
        Convergence precision per (timeblock, chanblock), NaN where it failed.
    baseline_weights
        One weight per cross-correlation baseline over all tiles.
    obsid
        The calibrator observation.
    header
        Other primary-header keys (SOFTWARE, CMDLINE, ...).
    """

    jones: np.ndarray
    start_gps: float | None = None
    end_gps: float | None = None
    timeblocks_gps: np.ndarray | None = None
    tile_names: list[str] | None = None
    tile_flags: np.ndarray | None = None
    dipole_gains: np.ndarray | None = None
    dipole_delays: np.ndarray | None = None
    chanblock_freqs_hz: np.ndarray | None = None
    chanblock_flags: np.ndarray | None = None
    results: np.ndarray | None = None
    baseline_weights: np.ndarray | None = None
    obsid: int | None = None
    header: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.jones.ndim != 4 or self.jones.shape[3] != N_POLS:
            raise ValueError(f"jones must have shape (T, A, C, 4), not {self.jones.shape}")

    @property
    def n_timeblocks(self) -> int:
        return int(self.jones.shape[0])

    @property
    def n_antennas(self) -> int:
        return int(self.jones.shape[1])

    @property
    def n_chanblocks(self) -> int:
        return int(self.jones.shape[2])

    def flagged_antennas(self) -> np.ndarray:
        """Indices of antennas whose every solution has a NaN (hyperdrive's rule)."""
        nan_per_jones = np.isnan(self.jones).any(axis=3)  # (T, A, C)
        return np.flatnonzero(nan_per_jones.all(axis=(0, 2)))

    def flagged_chanblocks(self) -> np.ndarray:
        """Indices of chanblocks whose every solution has a NaN."""
        nan_per_jones = np.isnan(self.jones).any(axis=3)
        return np.flatnonzero(nan_per_jones.all(axis=(0, 1)))

    def jones_matrices(self) -> np.ndarray:
        """The solutions as 2x2 matrices, shape (T, A, C, 2, 2)."""
        return self.jones.reshape(*self.jones.shape[:3], 2, 2)


def _time_or_none(value: float) -> float | None:
    # hyperdrive writes 0 for an absent time, and reads |t| < epsilon as absent.
    return None if abs(value) < 1e-9 else float(value)


def read_aocal(path: str | Path) -> CalSolutions:
    """Read an AO-cal binary solutions file (little-endian, ``MWAOCAL``).

    Raises
    ------
    CalFormatError
        For a wrong magic, non-zero file/structure type, a polarisation count
        other than 4, or a size that does not match the header.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < AOCAL_HEADER.size:
        raise CalFormatError(f"{path}: {len(data)} bytes is shorter than the 48-byte AO-cal header")
    intro, file_type, structure_type, n_int, n_ant, n_chan, n_pol, start, end = (
        AOCAL_HEADER.unpack_from(data)
    )
    if intro[:7] != AOCAL_MAGIC[:7]:
        raise CalFormatError(f"{path}: does not start with MWAOCAL (found {intro[:7]!r})")
    if intro[7] != 0 or file_type != 0 or structure_type != 0:
        raise CalFormatError(
            f"{path}: unsupported AO-cal variant (fileType {file_type}, structureType {structure_type})"
        )
    if n_pol != N_POLS:
        raise CalFormatError(f"{path}: polarizationCount is {n_pol}, only 4 is supported")
    expected = AOCAL_HEADER.size + 16 * n_int * n_ant * n_chan * n_pol
    if len(data) != expected:
        raise CalFormatError(
            f"{path}: size {len(data)} bytes does not match the header "
            f"({n_int} intervals x {n_ant} antennas x {n_chan} channels -> {expected} bytes)"
        )
    values = np.frombuffer(data, dtype="<c16", offset=AOCAL_HEADER.size)
    jones = values.reshape(n_int, n_ant, n_chan, n_pol).astype(np.complex128)
    return CalSolutions(jones=jones, start_gps=_time_or_none(start), end_gps=_time_or_none(end))


def _flagged_as_nan(jones: np.ndarray) -> np.ndarray:
    """``jones`` with each flagged element NaN in both parts (NaN+NaNj, as hyperdrive writes
    them; spec 1.2 "NaN in its doubles"), not only the real part (NaN+0j, numpy's NaN)."""
    return np.where(np.isnan(jones.real) | np.isnan(jones.imag), complex(np.nan, np.nan), jones)


def write_aocal(path: str | Path, solutions: CalSolutions) -> None:
    """Write ``solutions`` as an AO-cal binary file (atomically, little-endian; flagged
    elements NaN+NaNj)."""
    header = AOCAL_HEADER.pack(
        AOCAL_MAGIC,
        0,
        0,
        solutions.n_timeblocks,
        solutions.n_antennas,
        solutions.n_chanblocks,
        N_POLS,
        solutions.start_gps or 0.0,
        solutions.end_gps or 0.0,
    )
    with atomic_output(path) as temporary, open(temporary, "wb") as handle:
        handle.write(header)
        handle.write(np.ascontiguousarray(_flagged_as_nan(solutions.jones), dtype="<c16").tobytes())


def read_hyperdrive(path: str | Path) -> CalSolutions:
    """Read a hyperdrive solutions FITS file.

    Raises
    ------
    CalFormatError
        If the file is not FITS, lacks the SOLUTIONS HDU, or its tables
        disagree with the solutions' shape.
    """
    path = Path(path)
    try:
        hdus = fits.open(path, memmap=False)
    except (OSError, ValueError) as exc:
        raise CalFormatError(f"{path}: not a readable FITS file ({exc})") from exc
    with hdus:
        names = [hdu.name for hdu in hdus]
        if "SOLUTIONS" not in names:
            raise CalFormatError(f"{path}: no SOLUTIONS HDU (HDUs: {', '.join(names)})")
        raw = np.asarray(hdus["SOLUTIONS"].data, dtype=np.float64)
        if raw.ndim != 4 or raw.shape[3] != 2 * N_POLS:
            raise CalFormatError(f"{path}: SOLUTIONS has shape {raw.shape}, expected (T, A, C, 8)")
        jones = raw[..., 0::2] + 1j * raw[..., 1::2]
        n_time, n_ant, n_chan = jones.shape[:3]
        primary = hdus[0].header
        obsid_text = str(primary.get("OBSID", "")).strip()
        solutions = CalSolutions(
            jones=jones,
            obsid=int(obsid_text) if is_ascii_digits(obsid_text) else None,
            header={
                key: primary[key]
                for key in ("SOFTWARE", "CMDLINE", "MAXITER", "S_THRESH", "M_THRESH", "UVW_MIN", "UVW_MAX",
                            "BEAMFILE", "MODELLER", "PFB", "D_GAINS", "CABLELEN", "GEOMETRY")
                if key in primary
            },
        )  # fmt: skip
        if "TIMEBLOCKS" in names:
            table = hdus["TIMEBLOCKS"].data
            _check_rows(path, "TIMEBLOCKS", len(table), n_time)
            times = np.column_stack([table["Start"], table["End"], table["Average"]]).astype(
                np.float64
            )
            if np.any(np.abs(times) > 1e-9):
                solutions.timeblocks_gps = times
                solutions.start_gps = _time_or_none(times[0, 0])
                solutions.end_gps = _time_or_none(times[-1, 1])
        if "TILES" in names:
            table = hdus["TILES"].data
            _check_rows(path, "TILES", len(table), n_ant)
            solutions.tile_flags = np.asarray(table["Flag"], dtype=bool)
            columns = table.columns.names
            if "TileName" in columns:
                solutions.tile_names = [str(name).strip() for name in table["TileName"]]
            if "DipoleGains" in columns:
                solutions.dipole_gains = np.asarray(table["DipoleGains"], dtype=np.float64)
            if "DipoleDelays" in columns:
                solutions.dipole_delays = np.asarray(table["DipoleDelays"], dtype=np.int32)
        if "CHANBLOCKS" in names:
            table = hdus["CHANBLOCKS"].data
            _check_rows(path, "CHANBLOCKS", len(table), n_chan)
            solutions.chanblock_flags = np.asarray(table["Flag"], dtype=bool)
            freqs = np.asarray(table["Freq"], dtype=np.float64)
            solutions.chanblock_freqs_hz = None if np.all(np.isnan(freqs)) else freqs
        if "RESULTS" in names:
            solutions.results = np.asarray(hdus["RESULTS"].data, dtype=np.float64)
        if "BASELINES" in names:
            solutions.baseline_weights = np.asarray(hdus["BASELINES"].data, dtype=np.float64)
    return solutions


def _check_rows(path: Path, table: str, rows: int, expected: int) -> None:
    if rows != expected:
        raise CalFormatError(f"{path}: {table} has {rows} rows but SOLUTIONS has {expected}")


def write_hyperdrive(path: str | Path, solutions: CalSolutions) -> None:
    """Write ``solutions`` in hyperdrive's FITS layout (atomically).

    Tables whose information is unknown are written as hyperdrive does (zero
    times, NaN frequencies); TILES always has Antenna and Flag, and TileName, DipoleGains
    and DipoleDelays when known. Flagged elements are
    NaN in both parts, and a chanblock whose every solution is flagged has ``Flag`` 1.
    """
    n_time, n_ant, n_chan = solutions.jones.shape[:3]
    primary = fits.PrimaryHDU()
    if solutions.obsid is not None:
        primary.header["OBSID"] = (str(solutions.obsid), "The MWA observation ID")
    for key, value in solutions.header.items():
        primary.header[key] = value
    raw = np.empty((n_time, n_ant, n_chan, 2 * N_POLS), dtype=np.float64)
    jones = _flagged_as_nan(solutions.jones)
    raw[..., 0::2] = jones.real
    raw[..., 1::2] = jones.imag
    hdus: list[Any] = [primary, fits.ImageHDU(raw, name="SOLUTIONS")]
    times = solutions.timeblocks_gps
    if times is None:
        times = np.zeros((n_time, 3))
        if solutions.start_gps is not None and solutions.end_gps is not None and n_time == 1:
            times[0] = [
                solutions.start_gps,
                solutions.end_gps,
                (solutions.start_gps + solutions.end_gps) / 2,
            ]
    hdus.append(
        fits.BinTableHDU.from_columns(
            [
                fits.Column("Start", "1D", array=times[:, 0]),
                fits.Column("End", "1D", array=times[:, 1]),
                fits.Column("Average", "1D", array=times[:, 2]),
            ],
            name="TIMEBLOCKS",
        )
    )
    tile_flags = solutions.tile_flags if solutions.tile_flags is not None else np.zeros(n_ant, bool)
    tile_columns = [
        fits.Column("Antenna", "1J", array=np.arange(n_ant, dtype=np.int32)),
        fits.Column("Flag", "1I", array=tile_flags.astype(np.int16)),
    ]
    if solutions.tile_names is not None:
        tile_columns.append(fits.Column("TileName", "8A", array=np.array(solutions.tile_names)))
    if solutions.dipole_gains is not None:
        tile_columns.append(fits.Column("DipoleGains", "32D", array=solutions.dipole_gains))
    if solutions.dipole_delays is not None:
        tile_columns.append(fits.Column("DipoleDelays", "16J", array=solutions.dipole_delays))
    hdus.append(fits.BinTableHDU.from_columns(tile_columns, name="TILES"))
    chan_flags = (
        solutions.chanblock_flags.copy()
        if solutions.chanblock_flags is not None
        else np.zeros(n_chan, bool)
    )
    chan_flags[solutions.flagged_chanblocks()] = True
    freqs = (
        solutions.chanblock_freqs_hz
        if solutions.chanblock_freqs_hz is not None
        else np.full(n_chan, np.nan)
    )
    hdus.append(
        fits.BinTableHDU.from_columns(
            [
                fits.Column("Index", "1J", array=np.arange(n_chan, dtype=np.int32)),
                fits.Column("Flag", "1B", array=chan_flags.astype(np.uint8)),
                fits.Column("Freq", "1D", array=freqs),
            ],
            name="CHANBLOCKS",
        )
    )
    if solutions.results is not None:
        hdus.append(fits.ImageHDU(solutions.results, name="RESULTS"))
    if solutions.baseline_weights is not None:
        hdus.append(fits.ImageHDU(solutions.baseline_weights, name="BASELINES"))
    with atomic_output(path) as temporary:
        fits.HDUList(hdus).writeto(temporary)


def read_solutions(path: str | Path) -> CalSolutions:
    """Read either format, recognised by its first bytes (``MWAOCAL`` or ``SIMPLE``).

    Raises
    ------
    CalFormatError
        If the file is neither.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            start = handle.read(8)
    except OSError as exc:
        raise CalFormatError(f"{path}: cannot be read ({exc.strerror})") from exc
    if start[:7] == AOCAL_MAGIC[:7]:
        return read_aocal(path)
    if start.startswith(b"SIMPLE"):
        return read_hyperdrive(path)
    raise CalFormatError(f"{path}: neither an AO-cal .bin (MWAOCAL) nor a FITS file")
