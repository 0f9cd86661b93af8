"""MWA instrument facts: site, tile layout, coarse and fine channels, MWAX correlator settings.

Everything here is data or pure arithmetic; nothing reads observation files.

The 128-tile layout is extracted from the ``TILEDATA`` table of a real MWAX
metafits (obsid 1320409688, 2021-11-08, the Phase II compact configuration) and
shipped as ``data/mwa_tiles.csv``: tile ids and names, North/East/Height,
the ``Length`` text (``EL_`` = electrical length in metres), receiver and slot,
and the correlator input numbers.

Conventions copied from real metafits and from mwalib:

* ``TILEDATA`` has one row per RF input, sorted by ``Input``. A tile's two
  inputs are adjacent: ``Input`` 2k is pol **Y**, 2k+1 is pol **X**.
* ``Antenna`` (0..N-1) is the tile's rank by tile id; MWAX orders baselines by
  it: (0,0), (0,1) ... (0,N-1), (1,1) ...
* A receiver channel number n is the coarse channel centred on n x 1.28 MHz.
  MWAX fine channels are centre-symmetric: fine channel k of n_fine has its
  centre at ``centre + (k - n_fine // 2) * width``.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

import numpy as np
from numpy.typing import NDArray

from observatory.telescope.site import (
    MWA_HEIGHT_M,
    MWA_LATITUDE_DEG,
    MWA_LONGITUDE_DEG,
    ensure_astropy_offline,
    mwa_location,
)

__all__ = [
    "COARSE_CHAN_WIDTH_HZ",
    "DIPOLE_DELAY_STEP_S",
    "DIPOLE_SEPARATION_M",
    "MAX_COARSE_CHANS",
    "MAX_DIPOLE_DELAY_STEPS",
    "MAX_REC_CHAN",
    "MIN_REC_CHAN",
    "MWAX_FINE_CHAN_WIDTHS_HZ",
    "MWAX_INT_TIMES_MS",
    "MWAX_SUBOBS_S",
    "MWA_HEIGHT_M",
    "MWA_LATITUDE_DEG",
    "MWA_LONGITUDE_DEG",
    "N_TILES",
    "SPEED_OF_LIGHT_M_S",
    "ULTRAFINE_CHAN_WIDTH_HZ",
    "VCS_BLOCKS_PER_SUBOBS",
    "VCS_SAMPLES_PER_BLOCK",
    "VCS_SAMPLES_PER_BLOCK_OVERSAMPLED",
    "VCS_SUBFILE_HEADER_BYTES",
    "CoarseChannel",
    "Tile",
    "array_tiles",
    "beamformer_delays",
    "coarse_channel",
    "contiguous_coarse_chans",
    "ensure_astropy_offline",
    "fine_chan_freqs_hz",
    "mwa_location",
    "parse_electrical_length_m",
    "receivers_of",
    "tile_layout",
    "validate_coarse_chans",
    "validate_fine_chan_width_hz",
    "validate_int_time_ms",
    "vcs_order",
]

#: Speed of light in vacuum (exact, SI).
SPEED_OF_LIGHT_M_S = 299_792_458.0

#: Width of one coarse (receiver) channel.
COARSE_CHAN_WIDTH_HZ = 1_280_000
#: MWAX forms fine channels by summing 200 Hz "ultrafine" channels.
ULTRAFINE_CHAN_WIDTH_HZ = 200
#: A receiver digitises 0-327.68 MHz into 256 channels; channel 0 holds DC.
MIN_REC_CHAN = 1
MAX_REC_CHAN = 255
#: The receivers send at most 24 coarse channels to the correlator.
MAX_COARSE_CHANS = 24
#: A beamformer delay of 32 switches the dipole off.
DIPOLE_OFF_DELAY = 32

#: The longest observation name and project id the telescope records (metafits
#: ``FILENAME`` and ``PROJECT``).
MAX_METAFITS_NAME_CHARS = 60
#: What a FITS header value cannot hold: anything but printable ASCII.
_NOT_FITS_HEADER_TEXT = re.compile(r"[^\x20-\x7e]")


def metafits_text_problem(text: str, max_chars: int = MAX_METAFITS_NAME_CHARS) -> str | None:
    """Why a metafits header could not hold ``text`` (a name, a project id), if it could not.

    The telescope writes observation names and project ids into every metafits; one it
    cannot write would be scheduled but never recorded, so callers refuse it up front.

    Parameters
    ----------
    text
        The value.
    max_chars
        The most characters it may have.

    Returns
    -------
    str or None
        The problem, for a message after the value's name; None when the header can hold it.
    """
    bad = _NOT_FITS_HEADER_TEXT.search(text)
    if bad:
        return (
            f"{text!r} holds {bad.group()!r}, which a metafits header cannot hold "
            "(use printable ASCII: letters, digits, spaces and punctuation)"
        )
    if len(text) > max_chars:
        return f"{len(text)} characters; at most {max_chars} are allowed"
    return None


#: MWAX works in 8 s sub-observations; integrations must tile one exactly.
MWAX_SUBOBS_S = 8
#: Valid MWAX fine-channel widths: multiples of 200 Hz that divide 1.28 MHz
#: (``FSCRUNCH_FACTOR`` 1..6400 must give a whole number of fine channels).
MWAX_FINE_CHAN_WIDTHS_HZ: tuple[int, ...] = tuple(
    ULTRAFINE_CHAN_WIDTH_HZ * k
    for k in range(1, COARSE_CHAN_WIDTH_HZ // ULTRAFINE_CHAN_WIDTH_HZ + 1)
    if (COARSE_CHAN_WIDTH_HZ // ULTRAFINE_CHAN_WIDTH_HZ) % k == 0
)
#: Valid MWAX integration times: 250-8000 ms (``INT_TIME_MSEC``), multiples of
#: 250 ms that divide the 8 s sub-observation evenly.
MWAX_INT_TIMES_MS: tuple[int, ...] = tuple(
    t for t in range(250, 8001, 250) if (MWAX_SUBOBS_S * 1000) % t == 0
)

#: MWAX VCS sub-files: 160 blocks of 50 ms after a 4096-byte header and one
#: block-sized delay table.
VCS_SUBFILE_HEADER_BYTES = 4096
VCS_BLOCKS_PER_SUBOBS = 160
VCS_SAMPLES_PER_BLOCK = 64_000  # 1.28 Msample/s critically sampled, 50 ms
VCS_SAMPLES_PER_BLOCK_OVERSAMPLED = 81_920  # 1.6384 Msample/s (OVERSAMP=1)

#: The analogue beamformer: 4 x 4 dipoles 1.1 m apart, delays in 435 ps steps, 0..31.
DIPOLE_SEPARATION_M = 1.1
DIPOLE_DELAY_STEP_S = 435e-12
MAX_DIPOLE_DELAY_STEPS = 31

#: Number of tiles in the shipped layout.
N_TILES = 128

_LAYOUT_RESOURCE = "mwa_tiles.csv"


@dataclass(frozen=True)
class Tile:
    """One MWA tile (two RF inputs, pols X and Y).

    Attributes
    ----------
    antenna
        Index 0..N-1 in the array being described (metafits ``Antenna``).
    tile_id, tile_name
        metafits ``Tile`` and ``TileName``.
    rx, slot
        Receiver number and slot in it.
    input_y, input_x
        Correlator input numbers (``Input``): Y even, X = Y + 1.
    cable_length_label
        The metafits ``Length`` text, e.g. ``"EL_-211.53"``.
    cable_length_m
        Electrical length parsed from it (metres, as pyuvdata and mwalib read it).
    north_m, east_m, height_m
        Position (metafits North/East/Height, metres).
    flavor
        Cable flavour (metafits ``Flavors``).
    """

    antenna: int
    tile_id: int
    tile_name: str
    rx: int
    slot: int
    input_y: int
    input_x: int
    cable_length_label: str
    cable_length_m: float
    north_m: float
    east_m: float
    height_m: float
    flavor: str

    @property
    def enu_m(self) -> tuple[float, float, float]:
        """(East, North, Height) in metres."""
        return (self.east_m, self.north_m, self.height_m)


@dataclass(frozen=True)
class CoarseChannel:
    """A coarse channel of an observation.

    Attributes
    ----------
    rec_chan
        Receiver (sky) channel number; centre frequency = rec_chan x 1.28 MHz.
    corr_chan
        Index in the observation's ascending channel list (MWAX ``CORRCHAN``).
    """

    rec_chan: int
    corr_chan: int
    width_hz: int
    centre_hz: int
    start_hz: int
    end_hz: int


def parse_electrical_length_m(label: str, velocity_factor: float = 1.204) -> float:
    """Electrical length in metres of a metafits ``Length`` text.

    ``EL_<m>`` already is an electrical length; a bare number is a physical
    RG-6 length, scaled by the velocity factor mwalib and pyuvdata use.

    Raises
    ------
    ValueError
        If ``label`` is not a number with or without the ``EL_`` prefix.
    """
    text = label.strip()
    try:
        if text.startswith("EL_"):
            return float(text[3:])
        return float(text) * velocity_factor
    except ValueError:
        raise ValueError(f"cable length label {label!r} is not 'EL_<metres>' or a number") from None


def vcs_order(input_number: int) -> int:
    """Legacy PFB (VCS) order of a correlator input, as mwalib computes it (``VCSOrder``)."""
    if input_number < 256:
        return (input_number & 0xC0) | ((input_number & 0x30) >> 4) | ((input_number & 0x0F) << 2)
    return input_number


@cache
def tile_layout() -> tuple[Tile, ...]:
    """The full 128-tile layout in Antenna order (a real MWA configuration)."""
    text = resources.files("observatory.telescope").joinpath("data", _LAYOUT_RESOURCE).read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    tiles = tuple(
        Tile(
            antenna=int(row["antenna"]),
            tile_id=int(row["tile_id"]),
            tile_name=row["tile_name"],
            rx=int(row["rx"]),
            slot=int(row["slot"]),
            input_y=int(row["input_y"]),
            input_x=int(row["input_x"]),
            cable_length_label=row["length"],
            cable_length_m=parse_electrical_length_m(row["length"]),
            # metafits stores positions as float32; use exactly the values readers will see.
            north_m=float(np.float32(row["north_m"])),
            east_m=float(np.float32(row["east_m"])),
            height_m=float(np.float32(row["height_m"])),
            flavor=row["flavor"],
        )
        for row in rows
    )
    if len(tiles) != N_TILES or [t.antenna for t in tiles] != list(range(N_TILES)):
        raise RuntimeError(f"{_LAYOUT_RESOURCE} is damaged: expected antennas 0..{N_TILES - 1}")
    return tiles


def array_tiles(
    n_tiles: int | None = None, tile_ids: Iterable[int] | None = None
) -> tuple[Tile, ...]:
    """A sub-array of the layout, renumbered as a metafits for it would number it.

    Parameters
    ----------
    n_tiles
        Take the first ``n_tiles`` tiles in Antenna order (1..128).
    tile_ids
        Or name the tiles by tile id. Exactly one of the two may be given; with
        neither, all 128 tiles.

    Returns
    -------
    tuple of Tile
        Sorted by tile id; ``antenna`` renumbered 0..N-1 and inputs renumbered
        0..2N-1, keeping the receiver-order of the full array.

    Raises
    ------
    ValueError
        Naming ``n_tiles`` or ``tile_ids`` when out of range, unknown or duplicated.
    """
    layout = tile_layout()
    if n_tiles is not None and tile_ids is not None:
        raise ValueError("give n_tiles or tile_ids, not both")
    if tile_ids is not None:
        wanted = [int(t) for t in tile_ids]
        by_id = {t.tile_id: t for t in layout}
        unknown = [t for t in wanted if t not in by_id]
        if unknown:
            raise ValueError(f"tile_ids {unknown} are not in the MWA layout")
        if len(set(wanted)) != len(wanted) or not wanted:
            raise ValueError(f"tile_ids {wanted} must be non-empty and without duplicates")
        chosen = [by_id[t] for t in wanted]
    else:
        count = N_TILES if n_tiles is None else n_tiles
        if isinstance(count, bool) or not isinstance(count, int | np.integer):
            raise ValueError(f"n_tiles {n_tiles!r} must be an integer")
        if not 1 <= count <= N_TILES:
            raise ValueError(f"n_tiles {n_tiles} is out of range (1..{N_TILES})")
        chosen = list(layout[:count])
    chosen.sort(key=lambda t: t.tile_id)
    # Inputs keep the relative (receiver) order they have in the full array.
    input_rank = {t.tile_id: i for i, t in enumerate(sorted(chosen, key=lambda t: t.input_y))}
    return tuple(
        replace(
            t,
            antenna=i,
            input_y=2 * input_rank[t.tile_id],
            input_x=2 * input_rank[t.tile_id] + 1,
        )
        for i, t in enumerate(chosen)
    )


@cache
def subarray_tiles() -> dict[str, tuple[int, ...]]:
    """The antennas (tile_layout() indices) of each named subarray.

    Quarters: the northern and southern halves each split into its eastern and
    western halves, so every quarter has a quarter of the tiles (32 of 128), as the
    wiki says; two independent median splits would not (the array is not symmetric:
    north-east would hold 24). Halves: north and south by the median, east and west
    the union of the quarters on that side, so each quarter lies in both its halves
    (``all_ne`` is the north half's and the east half's share): a half and the
    opposite quarter (``all_west`` with ``all_ne``) share no tile.
    """
    tiles = tile_layout()
    north = np.array([t.north_m for t in tiles])
    east = np.array([t.east_m for t in tiles])

    def split(indices: NDArray[np.int64], key: NDArray[np.float64]) -> tuple[set[int], set[int]]:
        """(the upper half, the lower half) of ``indices`` by ``key`` (upper gets the odd one)."""
        ordered = indices[np.argsort(-key[indices], kind="stable")]
        upper = (len(ordered) + 1) // 2
        return {int(i) for i in ordered[:upper]}, {int(i) for i in ordered[upper:]}

    northern, southern = split(np.arange(len(tiles)), north)
    ne, nw = split(np.array(sorted(northern)), east)
    se, sw = split(np.array(sorted(southern)), east)
    eastern, western = ne | se, nw | sw
    members = {"all_north": northern, "all_south": southern, "all_east": eastern,
               "all_west": western, "all_ne": ne, "all_nw": nw, "all_se": se, "all_sw": sw}  # fmt: skip
    return {name: tuple(sorted(tiles_)) for name, tiles_ in members.items()}


def full_band_vcs_s(duration_s: float, n_coarse_chans: int) -> float:
    """A voltage capture's size in seconds of 24-channel capture, the unit of ``vcsfree``
    (no channels: the full band)."""
    return duration_s * (n_coarse_chans or MAX_COARSE_CHANS) / MAX_COARSE_CHANS


def validate_coarse_chans(coarse_chans: Iterable[int]) -> tuple[int, ...]:
    """Check receiver channel numbers; return them sorted ascending.

    Raises
    ------
    ValueError
        Naming the bad value: not an integer, outside 1..255, duplicated, none,
        or more than 24.
    """
    try:
        chans = list(coarse_chans)
    except TypeError:
        raise ValueError(
            f"coarse_chans {coarse_chans!r} is not a list of channel numbers"
        ) from None
    if not chans:
        raise ValueError("coarse_chans is empty")
    for chan in chans:
        if isinstance(chan, bool) or not isinstance(chan, int | np.integer):
            raise ValueError(f"coarse_chans value {chan!r} is not an integer channel number")
        if not MIN_REC_CHAN <= chan <= MAX_REC_CHAN:
            raise ValueError(
                f"coarse_chans value {chan} is outside the receiver channels "
                f"{MIN_REC_CHAN}..{MAX_REC_CHAN}"
            )
    if len(set(chans)) != len(chans):
        raise ValueError(f"coarse_chans {chans} has duplicates")
    if len(chans) > MAX_COARSE_CHANS:
        raise ValueError(f"coarse_chans has {len(chans)} channels; at most {MAX_COARSE_CHANS}")
    return tuple(sorted(int(c) for c in chans))


def contiguous_coarse_chans(centre_chan: int, n_chans: int = MAX_COARSE_CHANS) -> tuple[int, ...]:
    """The usual contiguous channel set around ``centre_chan`` (metafits ``CENTCHAN``).

    For 24 channels this is ``centre - 12 .. centre + 11``, as in real
    observations (CENTCHAN 143 -> channels 131..154).
    """
    if not 1 <= n_chans <= MAX_COARSE_CHANS:
        raise ValueError(f"n_chans {n_chans} is out of range (1..{MAX_COARSE_CHANS})")
    first = centre_chan - n_chans // 2
    return validate_coarse_chans(range(first, first + n_chans))


def coarse_channel(rec_chan: int, corr_chan: int = 0) -> CoarseChannel:
    """Frequencies of receiver channel ``rec_chan``."""
    (rec_chan,) = validate_coarse_chans([rec_chan])
    centre_hz = rec_chan * COARSE_CHAN_WIDTH_HZ
    half = COARSE_CHAN_WIDTH_HZ // 2
    return CoarseChannel(
        rec_chan=rec_chan,
        corr_chan=corr_chan,
        width_hz=COARSE_CHAN_WIDTH_HZ,
        centre_hz=centre_hz,
        start_hz=centre_hz - half,
        end_hz=centre_hz + half,
    )


def validate_fine_chan_width_hz(width_hz: float) -> int:
    """Check an MWAX fine-channel width; return it as integer Hz.

    Raises
    ------
    ValueError
        Naming the value if it is not a multiple of 200 Hz dividing 1.28 MHz.
    """
    try:
        rounded = round(float(width_hz))
    except (TypeError, ValueError):
        raise ValueError(f"fine channel width {width_hz!r} Hz is not a number") from None
    if not math.isclose(rounded, float(width_hz), abs_tol=1e-6) or (
        rounded not in MWAX_FINE_CHAN_WIDTHS_HZ
    ):
        raise ValueError(
            f"fine channel width {width_hz!r} Hz is not valid for MWAX: it must be a multiple of "
            f"{ULTRAFINE_CHAN_WIDTH_HZ} Hz that divides {COARSE_CHAN_WIDTH_HZ} Hz"
        )
    return int(rounded)


def validate_int_time_ms(int_time_ms: float) -> int:
    """Check an MWAX integration time; return it as integer milliseconds.

    Raises
    ------
    ValueError
        Naming the value unless it is one of :data:`MWAX_INT_TIMES_MS`.
    """
    try:
        rounded = round(float(int_time_ms))
    except (TypeError, ValueError):
        raise ValueError(f"integration time {int_time_ms!r} ms is not a number") from None
    if not math.isclose(rounded, float(int_time_ms), abs_tol=1e-6) or (
        rounded not in MWAX_INT_TIMES_MS
    ):
        raise ValueError(
            f"integration time {int_time_ms!r} ms is not valid for MWAX "
            f"(one of {', '.join(map(str, MWAX_INT_TIMES_MS))} ms)"
        )
    return int(rounded)


def fine_chan_freqs_hz(rec_chan: int, fine_chan_width_hz: int) -> np.ndarray:
    """Centre frequencies (Hz) of the MWAX fine channels of one coarse channel.

    Centre-symmetric: the centre fine channel (index n//2) is centred on the
    coarse channel centre; with an even count, channel 0 sits on the lower edge.
    """
    width_hz = validate_fine_chan_width_hz(fine_chan_width_hz)
    n_fine = COARSE_CHAN_WIDTH_HZ // width_hz
    centre_hz = coarse_channel(rec_chan).centre_hz
    return centre_hz + (np.arange(n_fine, dtype=np.float64) - n_fine // 2) * width_hz


def beamformer_delays(az_deg: float, alt_deg: float) -> tuple[int, ...]:
    """The 16 analogue beamformer delays (metafits ``DELAYS``) for a pointing.

    Dipole ``i = 4 * row + col`` with row 0 the northern row and col 0 the
    western column; delays are whole 435 ps steps, the smallest being 0. This
    reproduces real metafits values (az 296.565, alt 74.6271 ->
    9,7,5,3,8,6,4,2,7,5,3,1,6,4,2,0).

    Raises
    ------
    ValueError
        If the pointing is below the horizon or needs more than 31 delay steps.
    """
    if not 0.0 < alt_deg <= 90.0:
        raise ValueError(f"pointing altitude {alt_deg:.3f} deg is not above the horizon")
    az, alt = math.radians(az_deg), math.radians(alt_deg)
    col = np.tile(np.arange(4), 4)
    row = np.repeat(np.arange(4), 4)
    east_m = (col - 1.5) * DIPOLE_SEPARATION_M
    north_m = (1.5 - row) * DIPOLE_SEPARATION_M
    # A dipole nearer the source hears it first, so it must be delayed most.
    lead_s = (east_m * math.sin(az) + north_m * math.cos(az)) * math.cos(alt) / SPEED_OF_LIGHT_M_S
    steps = np.round((lead_s - lead_s.min()) / DIPOLE_DELAY_STEP_S).astype(int)
    if steps.max() > MAX_DIPOLE_DELAY_STEPS:
        raise ValueError(
            f"pointing az {az_deg:.3f} alt {alt_deg:.3f} deg needs {steps.max()} delay steps; "
            f"the beamformer has {MAX_DIPOLE_DELAY_STEPS}"
        )
    return tuple(int(s) for s in steps)


# -- the sweet-spot grid --------------------------------------------------------------------
# MWA beams point at "sweet spots": directions where whole 435 ps delay steps cancel the
# geometric path exactly. They are the integer delay gradients (dx, dy), in steps per dipole
# spacing east and south, with dx^2 + dy^2 <= 65 (elevation above about 17 deg) and
# |dx| + |dy| <= 10 (every delay within 0..30), numbered by elevation (descending) then
# azimuth: the 197 points of the MWA's ``sweet`` grid (specs/trigger.md section 3.1;
# checked against the real table in the tests). The scheduler points triggers at them, and
# metafits name them (``GRIDNAME``, ``GRIDNUM``).

#: sin(zenith angle) per delay step of gradient.
_STEP_SIN = DIPOLE_DELAY_STEP_S * SPEED_OF_LIGHT_M_S / DIPOLE_SEPARATION_M
_COL = np.tile(np.arange(4), 4)
_ROW = np.repeat(np.arange(4), 4)


@dataclass(frozen=True)
class Grid:
    """The sweet-spot pointings: ``number``, ``az_deg``, ``el_deg`` and ``delays`` (n x 16)."""

    number: NDArray[np.int64]
    az_deg: NDArray[np.float64]
    el_deg: NDArray[np.float64]
    delays: NDArray[np.int64]

    @property
    def unit_vectors(self) -> NDArray[np.float64]:
        """East, north, up unit vectors of the pointings (n x 3)."""
        return _grid_unit_vectors()


@cache
def sweet_grid() -> Grid:
    """The MWA's 197 ``sweet`` grid pointings, numbered as the MWA numbers them."""
    gradients = [
        (dx, dy)
        for dx in range(-10, 11)
        for dy in range(-10, 11)
        if dx * dx + dy * dy <= 65 and abs(dx) + abs(dy) <= 10
    ]
    dx, dy = np.array(gradients).T
    east, north = dx * _STEP_SIN, -dy * _STEP_SIN
    az_deg = np.degrees(np.arctan2(east, north)) % 360.0
    az_deg[(dx == 0) & (dy == 0)] = 0.0
    el_deg = np.degrees(np.arccos(np.hypot(east, north)))
    delays = dx[:, None] * _COL + dy[:, None] * _ROW
    delays -= delays.min(axis=1, keepdims=True)
    order = np.lexsort((np.round(az_deg, 6), -np.round(el_deg, 6)))
    return Grid(np.arange(len(order)), az_deg[order], el_deg[order], delays[order])


@cache
def _grid_unit_vectors() -> NDArray[np.float64]:
    grid = sweet_grid()
    vectors = azel_to_enu(grid.az_deg, grid.el_deg)
    vectors.setflags(write=False)
    return vectors


def azel_to_enu(
    az_deg: NDArray[np.float64] | float, el_deg: NDArray[np.float64] | float
) -> NDArray[np.float64]:
    """East-north-up unit vectors (... x 3) of directions (azimuth from north through east)."""
    az, el = np.radians(az_deg), np.radians(el_deg)
    return np.stack(
        [np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el) * np.ones_like(az)], axis=-1
    )


def sweet_grid_number(delays: Sequence[int]) -> int | None:
    """The ``sweet`` grid point whose 16 dipole delays these are; None for none."""
    grid = sweet_grid()
    found = np.flatnonzero((grid.delays == np.asarray(delays)).all(axis=1))
    return int(grid.number[found[0]]) if len(found) else None


def receivers_of(tiles: Sequence[Tile]) -> tuple[int, ...]:
    """Receiver numbers used by ``tiles`` (metafits ``RECVRS``), ascending."""
    return tuple(sorted({t.rx for t in tiles}))
