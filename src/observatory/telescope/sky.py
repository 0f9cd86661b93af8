"""Directions on the sky at the MWA: sidereal time, apparent places, azimuth and elevation.

Vectorised over times and directions with ERFA (IAU 2006/2000A precession-nutation), offline:
UTC stands in for UT1. The trigger service points with these, and measurement sets record
where the tiles' fixed azimuth and elevation point at each integration.
"""

from __future__ import annotations

import math
from functools import lru_cache

import erfa
import numpy as np
from numpy.typing import NDArray

from observatory.core.gpstime import gps_to_unix
from observatory.telescope.site import MWA_LATITUDE_DEG, MWA_LONGITUDE_DEG

#: GPS time 0 (1980-01-06 00:00 UTC) as a Julian date, and TT - GPS (constant), seconds.
_GPS_EPOCH_JD = 2444244.5
_TT_MINUS_GPS_S = 51.184


def _julian_dates(
    gps_seconds: NDArray[np.float64] | list[float] | float,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(UTC, TT) Julian dates; UTC stands in for UT1 (offline: |UT1 - UTC| < 0.9 s)."""
    gps = np.atleast_1d(np.asarray(gps_seconds, dtype=np.float64))
    leap_s = _unix_minus_gps_s(int(gps[0] // 3600))  # constant within a trigger
    jd_utc = (gps + leap_s) / 86400.0 + 2440587.5
    jd_tt = _GPS_EPOCH_JD + (gps + _TT_MINUS_GPS_S) / 86400.0
    return jd_utc, jd_tt


#: Sidereal degrees per SI second (IAU 1982 ratio of sidereal to solar time).
_SIDEREAL_DEG_PER_S = 360.0 * 1.00273781191135448 / 86400.0


@lru_cache(maxsize=16)
def _unix_minus_gps_s(gps_hour: int) -> float:
    return gps_to_unix(gps_hour * 3600.0) - gps_hour * 3600.0


def local_apparent_sidereal_deg(
    gps_seconds: NDArray[np.float64] | list[float],
) -> NDArray[np.float64]:
    """Local apparent sidereal time at the MWA, degrees.

    IAU 2006/2000A (ERFA) at the first time; later times add the Earth's rotation,
    which within a trigger (hours) differs from the full model by far less than
    an arcsecond, at a hundredth of the cost.
    """
    gps = np.atleast_1d(np.asarray(gps_seconds, dtype=np.float64))
    jd_utc, jd_tt = _julian_dates(float(gps[0]))
    gast_deg = math.degrees(erfa.gst06a(jd_utc[0], 0.0, jd_tt[0], 0.0))
    return (gast_deg + MWA_LONGITUDE_DEG + (gps - gps[0]) * _SIDEREAL_DEG_PER_S) % 360.0


def apparent_radec(
    ra_deg: NDArray[np.float64], dec_deg: NDArray[np.float64], gps_seconds: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """RA and Dec on the true equator and equinox of date (precession-nutation, no aberration).

    Aberration (20 arcsec at most) is far below the grid spacing and the beam width.
    """
    _, jd_tt = _julian_dates(gps_seconds)
    matrix = erfa.pnm06a(jd_tt[0], 0.0)
    ra, dec = np.radians(np.atleast_1d(ra_deg)), np.radians(np.atleast_1d(dec_deg))
    vectors = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], -1)
    x, y, z = (vectors @ matrix.T).T
    return np.degrees(np.arctan2(y, x)) % 360.0, np.degrees(np.arcsin(np.clip(z, -1.0, 1.0)))


def hadec_to_azel(
    ha_deg: NDArray[np.float64], dec_deg: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Azimuth and elevation (degrees, no refraction) at the MWA's latitude."""
    ha, dec, lat = np.radians(ha_deg), np.radians(dec_deg), math.radians(MWA_LATITUDE_DEG)
    sin_el = np.sin(dec) * math.sin(lat) + np.cos(dec) * math.cos(lat) * np.cos(ha)
    el = np.arcsin(np.clip(sin_el, -1.0, 1.0))
    az = np.arctan2(
        -np.cos(dec) * np.sin(ha),
        np.sin(dec) * math.cos(lat) - np.cos(dec) * math.sin(lat) * np.cos(ha),
    )
    return np.degrees(az) % 360.0, np.degrees(el)


def azel_at(
    ra_deg: NDArray[np.float64], dec_deg: NDArray[np.float64], gps_seconds: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Azimuth and elevation of J2000 positions at times (arrays of one length, or broadcast).

    Precession-nutation at the first time, hour angles from each time's sidereal
    time: within a trigger (hours) the apparent place moves by far less than the
    grid spacing. Agrees with astropy's AltAz (no refraction) to about 1 arcsec.
    """
    times = np.atleast_1d(np.asarray(gps_seconds, dtype=np.float64))
    ra_app, dec_app = apparent_radec(ra_deg, dec_deg, float(times.min()))
    return hadec_to_azel(local_apparent_sidereal_deg(times) - ra_app, dec_app)


def radec_of_azel(
    az_deg: NDArray[np.float64], el_deg: NDArray[np.float64], gps_seconds: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """J2000 RA and Dec of directions at times (the inverse of ``azel_at``)."""
    lat = math.radians(MWA_LATITUDE_DEG)
    az, el = np.radians(np.atleast_1d(az_deg)), np.radians(np.atleast_1d(el_deg))
    times = np.atleast_1d(np.asarray(gps_seconds, dtype=np.float64))
    sin_dec = np.sin(el) * math.sin(lat) + np.cos(el) * math.cos(lat) * np.cos(az)
    dec = np.arcsin(np.clip(sin_dec, -1.0, 1.0))
    ha = np.arctan2(
        -np.sin(az) * np.cos(el),
        np.sin(el) * math.cos(lat) - np.cos(el) * math.sin(lat) * np.cos(az),
    )
    ra_app = np.radians(local_apparent_sidereal_deg(times)) - ha
    _, jd_tt = _julian_dates(float(times.min()))
    apparent = np.stack(
        [np.cos(dec) * np.cos(ra_app), np.cos(dec) * np.sin(ra_app), np.sin(dec)], -1
    )
    x, y, z = (apparent @ erfa.pnm06a(jd_tt[0], 0.0)).T
    return np.degrees(np.arctan2(y, x)) % 360.0, np.degrees(np.arcsin(np.clip(z, -1.0, 1.0)))
