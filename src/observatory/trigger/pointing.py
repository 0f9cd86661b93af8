"""Where triggered observations point: the sweet-spot grid, the tile beam, the Sun, calibrators.

MWA beams point at "sweet spots", the 197 points of the MWA's ``sweet`` grid
(:func:`observatory.telescope.instrument.sweet_grid`).

The beam is mwa-hyperbeam's analytic tile beam. Its dipole rows run south to
north, the reverse of the M&C order of metafits ``DELAYS`` (row 0 north), so
delays are flipped north-south before they go to it (verified with the grid:
flipped, every sweet spot's own direction gets the full 16-dipole gain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np
from astropy.coordinates import EarthLocation, get_body
from astropy.time import Time
from numpy.typing import NDArray

from observatory.telescope.catalogue import Source, calibrators
from observatory.telescope.instrument import azel_to_enu, sweet_grid
from observatory.telescope.site import MWA_LATITUDE_DEG, ensure_astropy_offline, mwa_location
from observatory.telescope.sky import azel_at

#: Solar-system bodies a ``source`` may name (positions from astropy's built-in ephemeris).
BODIES = ("sun", "moon", "mercury", "venus", "mars", "jupiter", "saturn", "uranus", "neptune")


def nearest_grid_point(az_deg: float, el_deg: float) -> int:
    """Index (in ``sweet_grid()``) of the pointing closest to a direction."""
    return int(nearest_grid_points(np.array([az_deg]), np.array([el_deg]))[0])


def nearest_grid_points(
    az_deg: NDArray[np.float64], el_deg: NDArray[np.float64]
) -> NDArray[np.int64]:
    """Indices (in ``sweet_grid()``) of the pointings closest to many directions."""
    return np.argmax(azel_to_enu(az_deg, el_deg) @ sweet_grid().unit_vectors.T, axis=1)


def beam_power(
    delays: NDArray[np.int64] | list[int],
    az_deg: NDArray[np.float64],
    el_deg: NDArray[np.float64],
    freq_hz: float,
) -> NDArray[np.float64]:
    """Zenith-normalised tile power, (XX + YY) / 2, of a pointing towards directions.

    Directions below the horizon get 0.
    """
    az = np.radians(np.atleast_1d(np.asarray(az_deg, dtype=np.float64)))
    el = np.atleast_1d(np.asarray(el_deg, dtype=np.float64))
    hyperbeam_delays = np.asarray(delays).reshape(4, 4)[::-1].ravel()
    jones = np.asarray(
        _analytic_beam().calc_jones_array(
            az, np.radians(90.0 - np.clip(el, 0.0, 90.0)), float(freq_hz),
            [int(d) for d in hyperbeam_delays], [1.0] * 16, math.radians(MWA_LATITUDE_DEG), True,
        )
    ).reshape(-1, 4)  # fmt: skip
    power = 0.5 * np.sum(np.abs(jones) ** 2, axis=1)
    power[el <= 0.0] = 0.0
    return power


@cache
def _analytic_beam() -> Any:
    import mwa_hyperbeam

    return mwa_hyperbeam.AnalyticBeam()


def body_radec(name: str, gps_seconds: float) -> tuple[float, float]:
    """RA and Dec (GCRS, J2000 axes) of a solar-system body as seen from the MWA at a time.

    Topocentric, from astropy's built-in ephemeris: the Moon seen from the site is up to
    1 deg from where it is seen from the Earth's centre (its parallax), enough to put a
    Moon just below the horizon above it. See :func:`bodies_radec` for when the position
    is worked out.
    """
    ra, dec = bodies_radec(name, [gps_seconds])
    return float(ra[0]), float(dec[0])


#: How long the position of a body other than the Moon is reused: the Sun and planets move
#: seconds of arc in ten minutes, and their parallax from the MWA is under one arcminute.
BODY_REUSE_S = 600


def bodies_radec(
    name: str, gps_seconds: NDArray[np.float64] | list[float]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``body_radec`` at many times: one astropy ephemeris call for all of them.

    The Moon is worked out at each time itself: it moves 0.5 deg an hour, and its
    parallax from the MWA changes as the Earth turns. Other bodies are taken at the
    middle of each time's ten minutes (``BODY_REUSE_S``), so that triggers made within
    them share one ephemeris call.
    """
    gps = np.atleast_1d(np.asarray(gps_seconds, dtype=np.float64))
    body = name.lower()
    if body != "moon":
        gps = (gps // BODY_REUSE_S) * BODY_REUSE_S + BODY_REUSE_S / 2
    unique, index = np.unique(gps, return_inverse=True)
    ra, dec = _bodies_radec(body, tuple(float(g) for g in unique))
    return ra[index.ravel()], dec[index.ravel()]


@lru_cache(maxsize=256)
def _bodies_radec(
    name: str, gps_seconds: tuple[float, ...]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    ensure_astropy_offline()
    when = Time(np.array(gps_seconds), format="gps")
    body = get_body(name, when, location=_mwa_site())
    ra = np.asarray(body.ra.deg, dtype=np.float64)
    dec = np.asarray(body.dec.deg, dtype=np.float64)
    # Shared by every caller through the cache: nobody may change them in place.
    ra.flags.writeable = dec.flags.writeable = False
    return ra, dec


@cache
def _mwa_site() -> EarthLocation:
    return mwa_location()


@dataclass(frozen=True)
class SunAvoidance:
    """The pointing chosen to put the Sun in a null, and what it achieves."""

    grid_number: int
    az_deg: float
    el_deg: float
    delays: tuple[int, ...]
    target_power: float
    sun_power: float
    nearest_grid_number: int
    nearest_sun_power: float
    nearest_target_power: float

    @property
    def sun_attenuation_db(self) -> float:
        """How much weaker the Sun is than with the nearest grid point (dB)."""
        if self.sun_power <= 0.0:
            return math.inf
        return 10.0 * math.log10(max(self.nearest_sun_power, 1e-300) / self.sun_power)


def avoid_sun_many(
    target_az_deg: NDArray[np.float64],
    target_el_deg: NDArray[np.float64],
    sun_az_deg: NDArray[np.float64],
    sun_el_deg: NDArray[np.float64],
    freq_hz: NDArray[np.float64],
    *,
    threshold: float,
    search_radius_deg: float = 30.0,
    min_el_deg: float = 20.0,
    min_target_power_fraction: float = 0.25,
) -> list[SunAvoidance]:
    """For each (target, Sun, frequency), the grid pointing whose beam best keeps the Sun out.

    Among grid points within ``search_radius_deg`` of the target and above
    ``min_el_deg`` that keep at least ``min_target_power_fraction`` of the nearest
    point's power towards the target (the target stays in the main lobe: 6 dB lost
    at most by default; a target 15 deg from the Sun costs some 4 dB at 150 MHz), keep those whose power towards the Sun is below
    ``threshold`` (zenith-normalised) and take the one with the most power towards
    the target. If none is below it, the nearest point: no pointing that keeps the
    target keeps the Sun out (a target on or beside the Sun), and giving up the target's
    gain for a slightly fainter Sun is not what was asked.

    Vectorised over the cases: the beam of each candidate grid point is worked
    out once per frequency, towards every target and Sun position at once.
    """
    grid = sweet_grid()
    target_az, target_el = np.atleast_1d(target_az_deg), np.atleast_1d(target_el_deg)
    sun_az, sun_el = np.atleast_1d(sun_az_deg), np.atleast_1d(sun_el_deg)
    freqs = np.broadcast_to(np.atleast_1d(np.asarray(freq_hz, dtype=np.float64)), target_az.shape)
    n = len(target_az)
    if n == 0:
        return []
    nearest = nearest_grid_points(target_az, target_el)
    cos_separation = azel_to_enu(target_az, target_el) @ grid.unit_vectors.T  # cases x grid
    candidate = (cos_separation >= math.cos(math.radians(search_radius_deg))) & (
        grid.el_deg >= min_el_deg
    )
    candidate[np.arange(n), nearest] = True
    target_power = np.zeros(candidate.shape)
    sun_power = np.zeros(candidate.shape)
    for freq in np.unique(freqs):
        cases = np.flatnonzero(freqs == freq)
        directions_az = np.concatenate([target_az[cases], sun_az[cases]])
        directions_el = np.concatenate([target_el[cases], sun_el[cases]])
        for point in np.flatnonzero(candidate[cases].any(axis=0)):
            power = beam_power(grid.delays[point], directions_az, directions_el, float(freq))
            target_power[cases, point] = power[: len(cases)]
            sun_power[cases, point] = power[len(cases) :]
    rows = np.arange(n)
    keeps_target = target_power >= min_target_power_fraction * target_power[rows, nearest][:, None]
    quiet = candidate & keeps_target & (sun_power < threshold)
    best = np.where(
        quiet.any(axis=1), np.argmax(np.where(quiet, target_power, -1.0), axis=1), nearest
    )
    return [
        SunAvoidance(
            grid_number=int(grid.number[chosen]),
            az_deg=float(grid.az_deg[chosen]),
            el_deg=float(grid.el_deg[chosen]),
            delays=tuple(int(d) for d in grid.delays[chosen]),
            target_power=float(tp),
            sun_power=float(sp),
            nearest_grid_number=int(grid.number[near]),
            nearest_sun_power=float(nsp),
            nearest_target_power=float(ntp),
        )
        for chosen, near, tp, sp, ntp, nsp in zip(
            best,
            nearest,
            target_power[rows, best],
            sun_power[rows, best],
            target_power[rows, nearest],
            sun_power[rows, nearest],
            strict=True,
        )
    ]


def best_calibrator(
    gps_seconds: float, *, min_el_deg: float, sun_exclusion_deg: float
) -> tuple[Source, float, float] | None:
    """The standard calibrator highest in the sky at a time, with its az and el.

    Calibrators below ``min_el_deg``, or within ``sun_exclusion_deg`` of the Sun
    while the Sun is up, are not chosen. None if no calibrator qualifies.
    """
    sources = calibrators()
    az, el = azel_at(
        np.array([s.ra_deg for s in sources]), np.array([s.dec_deg for s in sources]),
        np.full(len(sources), gps_seconds),
    )  # fmt: skip
    sun_ra, sun_dec = body_radec("sun", gps_seconds)
    sun_az, sun_el = azel_at(np.array([sun_ra]), np.array([sun_dec]), np.array([gps_seconds]))
    allowed = el >= min_el_deg
    if sun_el[0] > 0.0:
        cos_sep = azel_to_enu(az, el) @ azel_to_enu(sun_az[0], sun_el[0])
        allowed &= np.degrees(np.arccos(np.clip(cos_sep, -1.0, 1.0))) > sun_exclusion_deg
    if not allowed.any():
        return None
    best = int(np.argmax(np.where(allowed, el, -np.inf)))
    return sources[best], float(az[best]), float(el[best])
