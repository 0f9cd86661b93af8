from datetime import UTC, datetime

import pytest
from astropy.time import Time

from observatory.core.gpstime import (
    gps_to_unix,
    gps_to_utc,
    gps_to_utc_iso,
    now_gps,
    parse_obsid,
    unix_to_gps,
    utc_to_gps,
)


@pytest.mark.parametrize(
    ("obsid", "date_obs"),
    [
        # DATE-OBS of the real metafits in shared/data/mwa: independent of astropy.
        (1061315448, "2013-08-23T17:50:32"),
        (1131733552, "2015-11-16T18:25:35"),
        (1320409688, "2021-11-08T12:27:50"),
    ],
)
def test_obsids_match_real_metafits_dates(obsid: int, date_obs: str) -> None:
    assert gps_to_utc(obsid).replace(tzinfo=None) == datetime.fromisoformat(date_obs)
    assert utc_to_gps(date_obs) == obsid


@pytest.mark.parametrize(
    ("before", "after", "offset_before", "offset_after"),
    [
        ("2015-06-30T23:59:59", "2015-07-01T00:00:00", 16, 17),
        ("2016-12-31T23:59:59", "2017-01-01T00:00:00", 17, 18),
    ],
)
def test_leap_seconds(before: str, after: str, offset_before: int, offset_after: int) -> None:
    # A leap second sits between the two UTC seconds: two GPS seconds pass.
    assert utc_to_gps(after) - utc_to_gps(before) == 2
    unix_before = datetime.fromisoformat(before).replace(tzinfo=UTC).timestamp()
    gps_epoch_unix = 315964800
    assert utc_to_gps(before) - (unix_before - gps_epoch_unix) == offset_before
    unix_after = datetime.fromisoformat(after).replace(tzinfo=UTC).timestamp()
    assert utc_to_gps(after) - (unix_after - gps_epoch_unix) == offset_after


@pytest.mark.parametrize(
    "gps", [1119744015, 1119744016, 1119744017, 1167264017, 1167264018, 1400000000]
)
def test_round_trips_agree_with_astropy(gps: int) -> None:
    expected = Time(gps, format="gps").utc.to_datetime(timezone=UTC, leap_second_strict="silent")
    assert gps_to_utc(gps) == expected
    assert unix_to_gps(gps_to_unix(gps)) == pytest.approx(gps, abs=1e-6)


def test_timezone_aware_input() -> None:
    aware = datetime(2021, 11, 8, 20, 27, 50, tzinfo=datetime.now().astimezone().tzinfo)
    assert utc_to_gps(aware) == utc_to_gps(aware.astimezone(UTC).replace(tzinfo=None))


def test_now_gps_is_recent() -> None:
    assert now_gps() > 1_400_000_000


@pytest.mark.parametrize("bad", ["", "abc", "-5", "12.5", "0", "99999999999", "1e9", None])
def test_parse_obsid_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="obsid"):
        parse_obsid(bad)


def test_parse_obsid_accepts() -> None:
    assert parse_obsid(" 1131733552 ") == 1131733552
    assert parse_obsid(1131733552) == 1131733552


def test_leap_second_itself_is_visible_in_iso() -> None:
    assert gps_to_utc_iso(1119744016) == "2015-06-30T23:59:60.000"
    assert gps_to_utc_iso(1167264017) == "2016-12-31T23:59:60.000"
    assert gps_to_utc(1119744016) == datetime(2015, 7, 1, tzinfo=UTC)
