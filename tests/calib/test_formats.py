"""Calibration solution formats, on the real hyperdrive-written files in shared/data/calib."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from observatory.calib.formats import (
    CalFormatError,
    CalSolutions,
    read_aocal,
    read_hyperdrive,
    read_solutions,
    write_aocal,
    write_hyperdrive,
)
from shared_data import CALIB_DATA

AOCAL_FILE = CALIB_DATA / "1450212840_ch101_solutions.bin"
HYPERDRIVE_FILE = CALIB_DATA / "hyp_soln_1369821496_ch100_solutions.fits"


def test_read_real_aocal() -> None:
    solutions = read_aocal(AOCAL_FILE)
    assert solutions.jones.shape == (1, 256, 32, 4)
    assert solutions.start_gps == 1450212841.0
    assert solutions.end_gps == 1450213135.0
    flagged = solutions.flagged_antennas()
    assert {14, 24, 25, 26, 27, 28, 29, 31} <= set(flagged.tolist())
    # 28% of the doubles are NaN in this file (calib.md 1.2, verified there byte by byte).
    nan_fraction = np.isnan(solutions.jones.view(np.float64)).mean()
    assert nan_fraction == pytest.approx(0.28, abs=0.01)
    # An unflagged antenna has finite, non-zero diagonal terms.
    good = next(a for a in range(256) if a not in set(flagged.tolist()))
    diag = solutions.jones[0, good, :, [0, 3]]
    assert np.isfinite(diag).sum() > 0 and np.nanmin(np.abs(diag)) > 0


def test_aocal_offsets_match_spec() -> None:
    # The real part of (i, a, c, p) sits at 48 + 8*(2*(((i*A + a)*C + c)*4 + p)).
    raw = AOCAL_FILE.read_bytes()
    solutions = read_aocal(AOCAL_FILE)
    i, a, c, p = 0, 3, 17, 2
    offset = 48 + 8 * (2 * (((i * 256 + a) * 32 + c) * 4 + p))
    real, imag = struct.unpack_from("<2d", raw, offset)
    value = solutions.jones[i, a, c, p]
    assert (np.isnan(real) and np.isnan(value.real)) or value == complex(real, imag)


def test_aocal_round_trip_is_byte_identical(tmp_path: Path) -> None:
    out = tmp_path / "copy.bin"
    write_aocal(out, read_aocal(AOCAL_FILE))
    assert out.read_bytes() == AOCAL_FILE.read_bytes()


def test_read_real_hyperdrive() -> None:
    solutions = read_hyperdrive(HYPERDRIVE_FILE)
    assert solutions.jones.shape == (1, 144, 32, 4)
    assert solutions.obsid == 1369821496
    assert solutions.header["SOFTWARE"] == "Created by mwa_hyperdrive v0.2.1"
    assert solutions.tile_names is not None and len(solutions.tile_names) == 144
    assert solutions.chanblock_freqs_hz is not None
    assert np.allclose(np.diff(solutions.chanblock_freqs_hz), 40e3)
    assert solutions.results is not None and solutions.results.shape == (1, 32)
    assert solutions.baseline_weights is not None and solutions.baseline_weights.shape == (10296,)
    # Edge chanblocks are flagged (NaN).
    assert 0 in solutions.flagged_chanblocks()
    raw = fits.getdata(HYPERDRIVE_FILE, "SOLUTIONS")
    assert solutions.jones[0, 5, 10, 3] == complex(raw[0, 5, 10, 6], raw[0, 5, 10, 7]) or np.isnan(
        raw[0, 5, 10, 6]
    )


def test_hyperdrive_round_trip(tmp_path: Path) -> None:
    original = read_hyperdrive(HYPERDRIVE_FILE)
    out = tmp_path / "out_solutions.fits"
    write_hyperdrive(out, original)
    again = read_hyperdrive(out)
    np.testing.assert_array_equal(again.jones, original.jones)
    assert again.tile_names == original.tile_names
    np.testing.assert_array_equal(again.tile_flags, original.tile_flags)
    np.testing.assert_array_equal(again.chanblock_freqs_hz, original.chanblock_freqs_hz)
    np.testing.assert_array_equal(again.results, original.results)
    assert again.obsid == 1369821496
    # Every table column of hyperdrive's file comes back (the dipole columns were dropped).
    with fits.open(HYPERDRIVE_FILE) as before, fits.open(out) as after:
        for name in ("TIMEBLOCKS", "TILES", "CHANBLOCKS"):
            assert after[name].columns.names == before[name].columns.names, name
            for column in before[name].columns.names:
                expected = before[name].data[column]
                if (name, column) == ("CHANBLOCKS", "Flag"):  # ours also flags all-NaN ones
                    expected = expected | np.isin(np.arange(len(expected)),
                                                  original.flagged_chanblocks())  # fmt: skip
                np.testing.assert_array_equal(after[name].data[column], expected)
        for name in ("RESULTS", "BASELINES"):
            np.testing.assert_array_equal(after[name].data, before[name].data)
    assert original.dipole_gains is not None and original.dipole_gains.shape == (144, 32)
    assert original.dipole_delays is not None and original.dipole_delays.shape == (144, 16)
    assert fits.getheader(out)["OBSID"] == "1369821496"  # a string, as hyperdrive writes it


def test_conversion_between_formats(tmp_path: Path) -> None:
    hyperdrive = read_hyperdrive(HYPERDRIVE_FILE)
    write_aocal(tmp_path / "x.bin", hyperdrive)
    aocal = read_aocal(tmp_path / "x.bin")
    np.testing.assert_array_equal(aocal.jones, hyperdrive.jones)
    write_hyperdrive(tmp_path / "y.fits", read_aocal(AOCAL_FILE))
    back = read_hyperdrive(tmp_path / "y.fits")
    np.testing.assert_array_equal(back.jones, read_aocal(AOCAL_FILE).jones)
    assert back.start_gps == 1450212841.0 and back.end_gps == 1450213135.0


def test_read_solutions_dispatches(tmp_path: Path) -> None:
    assert read_solutions(AOCAL_FILE).n_antennas == 256
    assert read_solutions(HYPERDRIVE_FILE).n_antennas == 144
    other = tmp_path / "x.txt"
    other.write_text("hello")
    with pytest.raises(CalFormatError, match="neither"):
        read_solutions(other)
    with pytest.raises(CalFormatError, match="cannot be read"):
        read_solutions(tmp_path / "missing.bin")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:20], "shorter than the 48-byte"),
        (lambda b: b"XWAOCAL\x00" + b[8:], "does not start with MWAOCAL"),
        (lambda b: b[:8] + struct.pack("<I", 1) + b[12:], "unsupported AO-cal variant"),
        (lambda b: b[:28] + struct.pack("<I", 2) + b[32:], "polarizationCount is 2"),
        (lambda b: b[:-16], "does not match the header"),
    ],
)
def test_bad_aocal(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.bin"
    bad.write_bytes(mutate(AOCAL_FILE.read_bytes()))
    with pytest.raises(CalFormatError, match=message) as caught:
        read_aocal(bad)
    assert "bad.bin" in str(caught.value)


def test_bad_hyperdrive(tmp_path: Path) -> None:
    no_solutions = tmp_path / "nosol.fits"
    fits.HDUList([fits.PrimaryHDU()]).writeto(no_solutions)
    with pytest.raises(CalFormatError, match="no SOLUTIONS HDU"):
        read_hyperdrive(no_solutions)
    wrong_shape = tmp_path / "shape.fits"
    fits.HDUList(
        [fits.PrimaryHDU(), fits.ImageHDU(np.zeros((1, 2, 3, 6)), name="SOLUTIONS")]
    ).writeto(wrong_shape)
    with pytest.raises(CalFormatError, match=r"expected \(T, A, C, 8\)"):
        read_hyperdrive(wrong_shape)
    not_fits = tmp_path / "not.fits"
    not_fits.write_bytes(b"garbage" * 100)
    with pytest.raises(CalFormatError, match="not a readable FITS"):
        read_hyperdrive(not_fits)


def test_shape_is_validated() -> None:
    with pytest.raises(ValueError, match="shape"):
        CalSolutions(jones=np.zeros((1, 2, 3), complex))


def test_flagged_solutions_are_nan_in_both_doubles_and_flag_their_chanblock(tmp_path: Path) -> None:
    """numpy's complex NaN is NaN+0j; the files hold NaN in both doubles (hyperdrive's, spec 1.2),
    and a chanblock with no solution at all is flagged in CHANBLOCKS."""
    jones = np.ones((1, 3, 4, 4), dtype=np.complex128)
    jones[0, 1] = np.nan  # a flagged tile: NaN+0j
    jones[0, :, 2] = np.nan  # a flagged chanblock
    assert jones[0, 1, 0, 0].imag == 0.0
    solutions = CalSolutions(jones=jones, obsid=1_400_000_000)
    write_aocal(tmp_path / "s.bin", solutions)
    doubles = np.frombuffer((tmp_path / "s.bin").read_bytes()[48:], "<f8").reshape(1, 3, 4, 4, 2)
    assert np.isnan(doubles[0, 1]).all() and np.isnan(doubles[0, :, 2]).all()
    assert np.isfinite(doubles[0, 0, [0, 1, 3]]).all()
    write_hyperdrive(tmp_path / "s.fits", solutions)
    with fits.open(tmp_path / "s.fits") as hdus:
        raw = hdus["SOLUTIONS"].data
        assert np.isnan(raw[0, 1]).all() and np.isnan(raw[0, :, 2]).all()
        assert hdus["CHANBLOCKS"].data["Flag"].tolist() == [0, 0, 1, 0]
