"""MWA instrument facts, checked against the real metafits and mwalib where possible."""

from __future__ import annotations

from pathlib import Path

import mwalib
import numpy as np
import pytest
from astropy.io import fits

from observatory.telescope import instrument
from observatory.telescope.instrument import (
    COARSE_CHAN_WIDTH_HZ,
    MWAX_FINE_CHAN_WIDTHS_HZ,
    MWAX_INT_TIMES_MS,
    array_tiles,
    beamformer_delays,
    coarse_channel,
    contiguous_coarse_chans,
    fine_chan_freqs_hz,
    parse_electrical_length_m,
    tile_layout,
    validate_coarse_chans,
    validate_fine_chan_width_hz,
    validate_int_time_ms,
    vcs_order,
)
from shared_data import MWA_DATA

REAL_METAFITS = MWA_DATA / "1320409688.metafits"


@pytest.fixture(scope="module")
def real_metafits() -> Path:
    if not REAL_METAFITS.exists():
        pytest.skip(f"real MWA data not available at {REAL_METAFITS}")
    return REAL_METAFITS


def test_layout_is_128_tiles_in_antenna_order() -> None:
    tiles = tile_layout()
    assert len(tiles) == 128
    assert [t.antenna for t in tiles] == list(range(128))
    # Antenna is the rank by tile id, as in real metafits.
    assert [t.tile_id for t in tiles] == sorted(t.tile_id for t in tiles)
    inputs = sorted([t.input_y for t in tiles] + [t.input_x for t in tiles])
    assert inputs == list(range(256))
    assert all(t.input_y % 2 == 0 and t.input_x == t.input_y + 1 for t in tiles)
    assert len({(t.rx, t.slot) for t in tiles}) == 128


def test_layout_matches_real_metafits(real_metafits: Path) -> None:
    with fits.open(real_metafits) as hdus:
        table = hdus["TILEDATA"].data
    by_input = {int(row["Input"]): row for row in table}
    for tile in tile_layout():
        y, x = by_input[tile.input_y], by_input[tile.input_x]
        assert (y["Pol"], x["Pol"]) == ("Y", "X")
        for row in (y, x):
            assert row["Tile"] == tile.tile_id
            assert row["Antenna"] == tile.antenna
            assert row["TileName"] == tile.tile_name
            assert (row["Rx"], row["Slot"]) == (tile.rx, tile.slot)
            assert row["Length"] == tile.cable_length_label
            assert np.float32(row["North"]) == np.float32(tile.north_m)
            assert np.float32(row["East"]) == np.float32(tile.east_m)
            assert np.float32(row["Height"]) == np.float32(tile.height_m)
            assert row["VCSOrder"] == vcs_order(int(row["Input"]))


def test_layout_agrees_with_mwalib(real_metafits: Path) -> None:
    context = mwalib.MetafitsContext(str(real_metafits))
    tiles = tile_layout()
    for antenna in context.antennas:
        tile = tiles[antenna.ant]
        assert antenna.tile_id == tile.tile_id
        assert antenna.electrical_length_m == pytest.approx(tile.cable_length_m)
        assert antenna.rfinput_x.input == tile.input_x
        assert antenna.rfinput_y.input == tile.input_y


def test_array_tiles_renumbers_a_subset() -> None:
    tiles = array_tiles(8)
    assert [t.antenna for t in tiles] == list(range(8))
    assert [t.tile_id for t in tiles] == [t.tile_id for t in tile_layout()[:8]]
    assert sorted(i for t in tiles for i in (t.input_y, t.input_x)) == list(range(16))
    chosen = array_tiles(tile_ids=[1061, 11, 36])
    assert [t.tile_id for t in chosen] == [11, 36, 1061]
    assert [t.antenna for t in chosen] == [0, 1, 2]
    assert len(array_tiles()) == 128


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"n_tiles": 0}, "n_tiles"),
        ({"n_tiles": 129}, "n_tiles"),
        ({"n_tiles": 2.5}, "n_tiles"),
        ({"tile_ids": [11, 11]}, "tile_ids"),
        ({"tile_ids": [4242]}, "tile_ids"),
        ({"n_tiles": 2, "tile_ids": [11]}, "tile_ids"),
    ],
)
def test_array_tiles_rejects(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        array_tiles(**kwargs)


def test_coarse_channels() -> None:
    assert contiguous_coarse_chans(143) == tuple(range(131, 155))  # as in 1320409688
    assert contiguous_coarse_chans(100, 3) == (99, 100, 101)
    chan = coarse_channel(117)
    assert chan.centre_hz == 149_760_000
    assert (chan.start_hz, chan.end_hz, chan.width_hz) == (149_120_000, 150_400_000, 1_280_000)
    assert validate_coarse_chans([138, 137]) == (137, 138)


@pytest.mark.parametrize(
    "bad", [[], [0], [256], [137, 137], list(range(100, 125)), [137.0], ["137"], 137]
)
def test_validate_coarse_chans_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="coarse_chans"):
        validate_coarse_chans(bad)  # type: ignore[arg-type]


def test_fine_channel_frequencies_match_mwalib(real_metafits: Path) -> None:
    context = mwalib.MetafitsContext(str(real_metafits))
    ours = np.concatenate(
        [
            fine_chan_freqs_hz(c.rec_chan_number, context.corr_fine_chan_width_hz)
            for c in context.metafits_coarse_chans
        ]
    )
    np.testing.assert_array_equal(ours, np.asarray(context.metafits_fine_chan_freqs_hz))
    # Odd counts are centre-symmetric too.
    freqs = fine_chan_freqs_hz(100, 256_000)
    assert len(freqs) == 5 and freqs[2] == 128_000_000


def test_fine_channel_widths() -> None:
    assert MWAX_FINE_CHAN_WIDTHS_HZ[0] == 200
    assert MWAX_FINE_CHAN_WIDTHS_HZ[-1] == COARSE_CHAN_WIDTH_HZ
    assert {10_000, 40_000, 640_000} <= set(MWAX_FINE_CHAN_WIDTHS_HZ)
    for width in MWAX_FINE_CHAN_WIDTHS_HZ:
        assert width % 200 == 0 and COARSE_CHAN_WIDTH_HZ % width == 0
    assert validate_fine_chan_width_hz(40_000.0) == 40_000
    for bad in (0, 300, 30_000, 2_560_000, 40_000.5, "x"):
        with pytest.raises(ValueError, match=f"fine channel width {bad!r}"):
            validate_fine_chan_width_hz(bad)  # type: ignore[arg-type]


def test_integration_times() -> None:
    assert MWAX_INT_TIMES_MS == (250, 500, 1000, 2000, 4000, 8000)
    assert validate_int_time_ms(2000.0) == 2000
    for bad in (0, 200, 750, 1500, 16_000):
        with pytest.raises(ValueError, match=f"integration time {bad!r}"):
            validate_int_time_ms(bad)


def test_beamformer_delays_match_real_metafits(real_metafits: Path) -> None:
    header = fits.getheader(real_metafits)
    expected = tuple(int(d) for d in header["DELAYS"].split(","))
    assert beamformer_delays(header["AZIMUTH"], header["ALTITUDE"]) == expected
    assert beamformer_delays(0.0, 90.0) == (0,) * 16
    # Pointing north: the northern row hears the source first and is delayed most.
    north = beamformer_delays(0.0, 60.0)
    assert north[:4] == (north[0],) * 4 and north[0] > north[12] == 0
    with pytest.raises(ValueError, match="horizon"):
        beamformer_delays(10.0, -5.0)
    with pytest.raises(ValueError, match="delay steps"):
        beamformer_delays(45.0, 1.0)


def test_electrical_lengths() -> None:
    assert parse_electrical_length_m("EL_-211.53") == -211.53
    assert parse_electrical_length_m("100") == pytest.approx(120.4)
    with pytest.raises(ValueError, match="'EL_x'"):
        parse_electrical_length_m("EL_x")


def test_site_is_reexported() -> None:
    assert pytest.approx(-26.7033, abs=1e-4) == instrument.MWA_LATITUDE_DEG
    assert instrument.mwa_location().lat.deg == pytest.approx(instrument.MWA_LATITUDE_DEG)
