"""The sweet-spot grid, the tile beam's orientation, sky positions, Sun avoidance, calibrators."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import AltAz, SkyCoord, get_body
from astropy.io import fits
from astropy.time import Time

from observatory.core.gpstime import gps_to_unix
from observatory.telescope import sky
from observatory.telescope.instrument import beamformer_delays
from observatory.telescope.site import mwa_location
from observatory.trigger import pointing
from shared_data import TRIGGER_DATA

GPS = 1_400_000_000


@pytest.fixture(scope="module")
def real_grid() -> fits.FITS_rec:
    path = TRIGGER_DATA / "grid_points.fits"
    if not path.exists():
        pytest.skip(f"{path} is not available")
    with fits.open(path) as hdus:
        return hdus[1].data.copy()


def test_generated_grid_is_the_mwa_sweet_grid(real_grid: fits.FITS_rec) -> None:
    grid = pointing.sweet_grid()
    sweet = real_grid[real_grid["number"] < 1000]
    assert np.array_equal(grid.number, sweet["number"])
    assert np.array_equal(grid.delays, np.asarray(sweet["delays"]))
    assert np.allclose(grid.az_deg, sweet["azimuth"], atol=1e-3)
    assert np.allclose(grid.el_deg, sweet["elevation"], atol=0.01)  # the table used c = 2.998e8


def test_delays_cancel_the_geometric_path_of_every_real_row(real_grid: fits.FITS_rec) -> None:
    """specs/trigger.md 3.1: dipole 0 north-west, rows west to east then north to south."""
    col, row = np.tile(np.arange(4), 4), np.repeat(np.arange(4), 4)
    east, north = (col - 1.5) * 1.1, (1.5 - row) * 1.1
    enu = pointing.azel_to_enu(real_grid["azimuth"], real_grid["elevation"])
    path_m = enu[:, :1] * east + enu[:, 1:2] * north
    delay_m = np.asarray(real_grid["delays"]) * 435e-12 * 299_792_458.0
    residual = (path_m - path_m.min(axis=1, keepdims=True)) - delay_m
    assert np.abs(residual).max() < 2e-3
    for number in (1, 2, 5, 40, 120, 196):
        assert beamformer_delays(
            real_grid["azimuth"][number], real_grid["elevation"][number]
        ) == tuple(real_grid["delays"][number])


def test_hyperbeam_gets_every_sweet_spot_at_full_gain(real_grid: fits.FITS_rec) -> None:
    """Each grid pointing adds all 16 dipoles in phase towards its own direction."""
    for row in real_grid:
        own = pointing.beam_power(
            row["delays"], np.array([row["azimuth"]]), np.array([row["elevation"]]), 150e6
        )
        # The same direction with a zenith pointing only sees the element pattern's share.
        assert (
            own[0]
            >= pointing.beam_power(
                [0] * 16, np.array([row["azimuth"]]), np.array([row["elevation"]]), 150e6
            )[0]
            - 1e-9
        )
    east = [0, 1, 2, 3] * 4
    assert pointing.beam_power(east, np.array([90.0]), np.array([83.19]), 150e6)[0] > 0.95
    assert pointing.beam_power(east, np.array([270.0]), np.array([83.19]), 150e6)[0] < 0.5


def test_azel_agrees_with_astropy() -> None:
    ra, dec = np.array([10.0, 200.0, 83.6, 300.0]), np.array([-30.0, -45.0, 22.0, -80.0])
    az, el = sky.azel_at(ra, dec, np.full(4, GPS))
    frame = AltAz(obstime=Time(gps_to_unix(GPS), format="unix"), location=mwa_location())
    expected = SkyCoord(ra * u.deg, dec * u.deg).transform_to(frame)
    assert np.allclose(el, expected.alt.deg, atol=0.02)
    assert np.allclose(
        np.cos(np.radians(el)) * ((az - expected.az.deg + 180) % 360 - 180), 0, atol=0.02
    )
    back_ra, back_dec = sky.radec_of_azel(az, el, np.full(4, GPS))
    assert np.allclose(back_dec, dec, atol=1e-6) and np.allclose(
        ((back_ra - ra + 180) % 360) - 180, 0, atol=1e-6
    )


def test_avoid_sun_puts_the_sun_below_the_threshold() -> None:
    # A target 15 deg from the Sun, both high: the nearest grid point sees the Sun strongly.
    target_az, target_el, sun_az, sun_el = 30.0, 70.0, 80.0, 65.0
    (choice,) = pointing.avoid_sun_many(
        *np.array([[target_az], [target_el], [sun_az], [sun_el], [150e6]]), threshold=1e-3
    )
    assert choice.sun_power < 1e-3
    assert choice.sun_power < choice.nearest_sun_power
    assert choice.target_power > 0.3  # the target is still in the main lobe
    grid = pointing.sweet_grid()
    power_at_sun = pointing.beam_power(
        grid.delays[choice.grid_number], np.array([sun_az]), np.array([sun_el]), 150e6
    )
    assert power_at_sun[0] == pytest.approx(choice.sun_power)
    assert choice.sun_attenuation_db > 10


def test_avoid_sun_never_points_away_from_the_target() -> None:
    """The Sun as the target stayed in a null 35 deg away; a target 40 deg from the Sun
    lost 5.8 dB while the Sun stayed brighter than it. Now: at most 6 dB, else the nearest."""
    nearest = pointing.nearest_grid_points(np.array([26.6]), np.array([62.0]))[0]
    (on_sun,) = pointing.avoid_sun_many(
        *np.array([[26.6], [62.0], [26.6], [62.0], [150e6]]), threshold=1e-3
    )
    assert on_sun.grid_number == pointing.sweet_grid().number[nearest]
    assert on_sun.target_power == on_sun.nearest_target_power
    cases = np.array([[30.0, 200.0, 10.0, 100.0], [70.0, 50.0, 85.0, 45.0],
                      [80.0, 210.0, 300.0, 140.0], [65.0, 40.0, 60.0, 40.0]])  # fmt: skip
    for freq_hz in (70e6, 150e6, 200e6):
        for choice in pointing.avoid_sun_many(*cases, np.full(4, freq_hz), threshold=1e-3):
            assert choice.target_power >= 0.25 * choice.nearest_target_power


def test_best_calibrator_is_the_highest_one_up() -> None:
    cal = pointing.best_calibrator(GPS, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert cal is not None
    source, _, el = cal
    assert el >= 30.0 and source.is_calibrator
    assert pointing.best_calibrator(GPS, min_el_deg=89.9, sun_exclusion_deg=20.0) is None


def test_avoid_sun_many_matches_one_at_a_time() -> None:
    target_az, target_el = np.array([30.0, 200.0, 10.0]), np.array([70.0, 50.0, 85.0])
    sun_az, sun_el = np.array([80.0, 210.0, 300.0]), np.array([65.0, 40.0, 60.0])
    freqs = np.array([150e6, 120e6, 150e6])
    many = pointing.avoid_sun_many(target_az, target_el, sun_az, sun_el, freqs, threshold=1e-3)
    for i, choice in enumerate(many):
        grid = pointing.sweet_grid()
        power = pointing.beam_power(
            grid.delays[choice.grid_number], target_az[i : i + 1], target_el[i : i + 1], freqs[i]
        )
        assert power[0] == pytest.approx(choice.target_power)
        assert choice.sun_power < 1e-3 or choice.sun_power == pytest.approx(
            pointing.avoid_sun_many(target_az[i : i + 1], target_el[i : i + 1], sun_az[i : i + 1],
                                    sun_el[i : i + 1], freqs[i : i + 1], threshold=1e-3)[0].sun_power
        )  # fmt: skip


def test_bodies_radec_agrees_with_body_radec() -> None:
    times = np.array([GPS, GPS + 3600.0, GPS + 7200.0])
    ra, dec = pointing.bodies_radec("sun", times)
    for t, r, d in zip(times, ra, dec, strict=True):
        assert (r, d) == pytest.approx(pointing.body_radec("sun", float(t)))


#: The Moon rising at the MWA: 0.46 deg below the horizon seen from the site, 0.46 deg above it
#: seen from the Earth's centre (its parallax).
MOON_RISING_GPS = 1_450_482_616


def _moon_seen_from_the_mwa(gps: float) -> SkyCoord:
    when = Time(gps, format="gps")
    moon = get_body("moon", when, mwa_location())
    return moon.transform_to(AltAz(obstime=when, location=mwa_location()))


def test_the_moon_is_where_it_is_seen_from_the_mwa_at_each_time() -> None:
    """It was placed at the Earth's centre, and taken at the middle of ten minutes."""
    times = MOON_RISING_GPS + np.array([0.0, 299.0, 4 * 3600.0])
    ras, decs = pointing.bodies_radec("Moon", times)
    az, el = sky.azel_at(ras, decs, times)
    for gps, ra, dec, a, e in zip(times, ras, decs, az, el, strict=True):
        seen = _moon_seen_from_the_mwa(gps)
        assert e == pytest.approx(seen.alt.deg, abs=0.005)
        offset_deg = SkyCoord(a * u.deg, e * u.deg).separation(
            SkyCoord(seen.az.deg * u.deg, seen.alt.deg * u.deg)
        )
        assert offset_deg.deg < 0.005
        assert (ra, dec) == pytest.approx(pointing.body_radec("moon", float(gps)))
    assert el[0] < -0.4  # the case the service got wrong
