"""Where the telescope is, and making astropy know it without going online."""

from __future__ import annotations

from functools import cache

import astropy.units as u
from astropy.coordinates import EarthLocation

from observatory.core.offline import configure_astropy_offline

#: MWA site, as mwalib's constants give it (geodetic, WGS84).
MWA_LATITUDE_DEG = -26.703319405555554
MWA_LONGITUDE_DEG = 116.67081523611111
MWA_HEIGHT_M = 377.827

_MWA_SITE_ENTRY = {
    "name": "Murchison Widefield Array",
    "aliases": ["MWA", "mwa"],
    "source": "mwalib constants (MWA_LATITUDE_RADIANS, MWA_LONGITUDE_RADIANS, MWA_ALTITUDE_METRES)",
    "latitude": MWA_LATITUDE_DEG,
    "latitude_unit": "degree",
    "longitude": MWA_LONGITUDE_DEG,
    "longitude_unit": "degree",
    "elevation": MWA_HEIGHT_M,
    "elevation_unit": "meter",
    "timezone": "Australia/Perth",
}


@cache
def ensure_astropy_offline() -> None:
    """Configure astropy for offline use and teach it the MWA site (runs once per process)."""
    configure_astropy_offline({"mwa": _MWA_SITE_ENTRY})


def mwa_location() -> EarthLocation:
    """The MWA site as an astropy EarthLocation."""
    return EarthLocation.from_geodetic(
        lon=MWA_LONGITUDE_DEG * u.deg, lat=MWA_LATITUDE_DEG * u.deg, height=MWA_HEIGHT_M * u.m
    )
