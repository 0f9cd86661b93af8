"""GPS time, the observatory's clock. An obsid is the GPS second an observation starts.

All conversions go through astropy, so leap seconds come from astropy's tables,
never from a hand-written list.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import lru_cache

from astropy.time import Time

from observatory.core.text import is_ascii_digits

#: Largest GPS second we accept as an obsid (year ~2079); smaller than 2**32.
MAX_GPS_SECONDS = 3_000_000_000


def gps_to_utc(gps_seconds: float) -> datetime:
    """UTC datetime (timezone-aware) of a GPS time in seconds.

    ``datetime`` has no 23:59:60: a GPS second inside a leap second maps to the
    following 00:00:00 (use :func:`gps_to_utc_iso` to see the leap second).
    """
    return Time(gps_seconds, format="gps").utc.to_datetime(
        timezone=UTC, leap_second_strict="silent"
    )


def gps_to_utc_iso(gps_seconds: float) -> str:
    """ISO UTC text of a GPS time (``2015-06-30T23:59:60.000`` inside a leap second)."""
    return str(Time(gps_seconds, format="gps").utc.isot)


def utc_to_gps(utc: datetime | str) -> float:
    """GPS seconds of a UTC time (a datetime, naive meaning UTC, or an ISO string)."""
    if isinstance(utc, datetime) and utc.tzinfo is not None:
        utc = utc.astimezone(UTC).replace(tzinfo=None)
    return float(Time(utc, scale="utc").gps)


def gps_to_unix(gps_seconds: float) -> float:
    """Unix seconds of a GPS time."""
    return float(Time(gps_seconds, format="gps").unix)


def unix_to_gps(unix_seconds: float) -> float:
    """GPS seconds of a Unix time."""
    return float(Time(unix_seconds, format="unix").gps)


def now_gps() -> int:
    """The current GPS second (floored)."""
    return int(now_gps_precise())


def now_gps_precise() -> float:
    """The current GPS time in seconds, with its fraction.

    Asked on every trigger and busy call: the system clock plus GPS - Unix for
    the current UTC day (leap seconds only ever come at the end of a day), which
    astropy works out once a day.
    """
    now = time.time()
    return now + _gps_minus_unix_s(int(now // 86400))


@lru_cache(maxsize=4)
def _gps_minus_unix_s(unix_day: int) -> float:
    start = unix_day * 86400.0
    return round(unix_to_gps(start) - start, 3)


def parse_obsid(value: object, name: str = "obsid") -> int:
    """Validate an obsid (a GPS start second) given as text or a number.

    Raises
    ------
    ValueError
        With a message naming the parameter (``name``) and the bad value, if it is not
        a positive integer of at most 10 digits.
    """
    text = str(value).strip()
    if not is_ascii_digits(text):
        raise ValueError(f"{name} {value!r} is not a positive integer GPS second")
    obsid = int(text)
    if obsid <= 0 or obsid >= MAX_GPS_SECONDS:
        raise ValueError(f"{name} {value!r} is out of range (1 .. {MAX_GPS_SECONDS - 1})")
    return obsid
