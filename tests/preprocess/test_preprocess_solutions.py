"""Calibration solutions against the data: channels by frequency or count, timeblocks by time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pyuvdata import UVData

from observatory.calib.formats import CalSolutions, write_aocal, write_hyperdrive
from observatory.preprocess.engine import preprocess
from observatory.preprocess.options import ConversionOptions
from observatory.preprocess.reader import ReadError
from observatory.telescope.instrument import fine_chan_freqs_hz
from observatory.telescope.simulator import PointSource, SimulatedObservation, simulate_observation

OBSID = 1320409688
N_TILES = 4
CHANS = (137, 138)
N_TIMES = 4
INT_TIME_S = 2.0
#: Everything off but the solutions: the output is the raw data times J_p J_q^*.
RAW = {
    "no_rfi": "true",
    "no_geometric_delay": "true",
    "no_cable_delay": "true",
    "no_digital_gains": "true",
    "no_passband_gains": "true",
    "flag_edge_width": "0",
}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedObservation:
    """4 tiles, 2 coarse channels of 32 x 40 kHz, 4 integrations of 2 s."""
    return simulate_observation(
        tmp_path_factory.mktemp("sim"), OBSID, n_tiles=N_TILES, coarse_chans=CHANS,
        n_timesteps=N_TIMES, int_time_s=INT_TIME_S, sources=[PointSource(333.6, -17.0, 60.0)],
    )  # fmt: skip


@pytest.fixture(scope="module")
def raw(sim: SimulatedObservation, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The uncalibrated XX data, (blts, channels)."""
    out = tmp_path_factory.mktemp("raw") / "raw.uvfits"
    preprocess(sim.metafits_path, sim.vis_paths, ConversionOptions.from_params(RAW), out)
    return xx(out)


def xx(path: Path) -> np.ndarray:
    uvd = UVData.from_file(str(path))
    return np.asarray(uvd.data_array[:, :, list(uvd.polarization_array).index(-5)])


def calibrate(
    sim: SimulatedObservation, solutions: Path, out: Path, files: list[Path] | None = None
) -> np.ndarray:
    options = ConversionOptions.from_params({**RAW, "allow_missing": str(files is not None)})
    preprocess(sim.metafits_path, files or sim.vis_paths, options, out, solutions=solutions)
    return xx(out)


def scalar_jones(values: np.ndarray) -> np.ndarray:
    """Solutions (timeblocks, antennas, chanblocks, 4) equal to ``values[t, c]`` on XX and YY."""
    jones = np.zeros((values.shape[0], N_TILES, values.shape[1], 4), np.complex128)
    jones[..., 0] = jones[..., 3] = values[:, None, :]
    return jones


def band_freqs_hz(chans: tuple[int, ...], width_hz: float = 40e3) -> np.ndarray:
    return np.concatenate([fine_chan_freqs_hz(c, round(width_hz)) for c in chans])


def test_ao_cal_of_coarser_channels_covers_blocks_of_the_data_channels(
    sim: SimulatedObservation, tmp_path: Path, raw: np.ndarray
) -> None:
    """Birli's channel ratio: 32 solutions (a calibration averaged to 80 kHz) for the data's
    64 channels each cover two consecutive ones (they were refused); a count that does not
    divide the band's is still refused, and nothing is written."""
    values = 1.0 + np.arange(32)[None, :] / 32
    write_aocal(tmp_path / "cal32.bin", CalSolutions(jones=scalar_jones(values)))
    data = calibrate(sim, tmp_path / "cal32.bin", tmp_path / "c32.uvfits")
    np.testing.assert_allclose(data, raw * np.repeat(values[0], 2) ** 2, rtol=1e-5)
    write_aocal(tmp_path / "cal24.bin", CalSolutions(jones=scalar_jones(np.ones((1, 24)))))
    message = "the calibration solution has 24 channels, but the data has 64 channels"
    with pytest.raises(ReadError, match=message):
        calibrate(sim, tmp_path / "cal24.bin", tmp_path / "x.uvfits")
    assert not (tmp_path / "x.uvfits").exists()


def test_ao_cal_with_one_channel_per_data_channel_applies_in_order(
    sim: SimulatedObservation, tmp_path: Path, raw: np.ndarray
) -> None:
    values = 1.0 + np.arange(64)[None, :] / 64
    write_aocal(tmp_path / "cal.bin", CalSolutions(jones=scalar_jones(values)))
    data = calibrate(sim, tmp_path / "cal.bin", tmp_path / "c.uvfits")
    np.testing.assert_allclose(data, raw * values[0] ** 2, rtol=1e-5)
    # The channels of the files given, when coarse channels are missing (Birli's count).
    only_138 = [p for p in sim.vis_paths if "_ch138_" in p.name]
    write_aocal(tmp_path / "cal138.bin", CalSolutions(jones=scalar_jones(values[:, 32:])))
    data = calibrate(sim, tmp_path / "cal138.bin", tmp_path / "c138.uvfits", only_138)
    np.testing.assert_allclose(data, raw[:, 32:] * values[0, 32:] ** 2, rtol=1e-5)


def test_hyperdrive_chanblocks_of_another_coarse_channel_are_refused(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    solutions = CalSolutions(
        jones=scalar_jones(np.ones((1, 32))), chanblock_freqs_hz=band_freqs_hz((137,))
    )
    write_hyperdrive(tmp_path / "hyp137.fits", solutions)
    message = r"do not cover 32 of the data's 64 channels \(coarse channel\(s\) 138\)"
    with pytest.raises(ReadError, match=message):
        calibrate(sim, tmp_path / "hyp137.fits", tmp_path / "x.uvfits")


def test_hyperdrive_chanblocks_map_by_frequency(
    sim: SimulatedObservation, tmp_path: Path, raw: np.ndarray
) -> None:
    """80 kHz chanblocks over three coarse channels, in reverse order: each data channel
    takes the chanblock at its frequency."""
    # hyperdrive's chanblock frequency: the mean of its fine channels'.
    freqs = band_freqs_hz((136, 137, 138)).reshape(-1, 2).mean(axis=1)[::-1]
    values = 1.0 + (freqs - freqs.min()) / 1e7
    solutions = CalSolutions(jones=scalar_jones(values[None]), chanblock_freqs_hz=freqs)
    write_hyperdrive(tmp_path / "hyp.fits", solutions)
    data = calibrate(sim, tmp_path / "hyp.fits", tmp_path / "h.uvfits")
    data_freqs = band_freqs_hz(CHANS)
    expected = values[np.abs(data_freqs[:, None] - freqs[None]).argmin(axis=1)]
    np.testing.assert_allclose(data, raw * expected**2, rtol=1e-5)


def test_ao_cal_timeblocks_apply_to_the_integrations_they_cover(
    sim: SimulatedObservation, tmp_path: Path, raw: np.ndarray
) -> None:
    """Two timeblocks sharing the header's start and end: integrations 0-1 and 2-3."""
    values = np.ones((2, 64))
    values[1] = 3.0
    start = OBSID + INT_TIME_S / 2  # hyperdrive's AO-cal times: the first and last centroids
    end = OBSID + (N_TIMES - 0.5) * INT_TIME_S
    write_aocal(
        tmp_path / "cal2.bin",
        CalSolutions(jones=scalar_jones(values), start_gps=start, end_gps=end),
    )
    data = calibrate(sim, tmp_path / "cal2.bin", tmp_path / "t.uvfits")
    n_bl = len(raw) // N_TIMES
    gain = np.repeat([1.0, 1.0, 9.0, 9.0], n_bl)[:, None]
    np.testing.assert_allclose(data, raw * gain, rtol=1e-5)


def test_hyperdrive_timeblocks_by_their_table_and_nearest_outside(
    sim: SimulatedObservation, tmp_path: Path, raw: np.ndarray
) -> None:
    """TIMEBLOCKS rows (out of time order): integration 0 is covered by the second row,
    1-2 by the first; integration 3 is past both and takes the nearest (the first)."""
    centres = OBSID + (np.arange(N_TIMES) + 0.5) * INT_TIME_S
    values = np.ones((2, 64))
    values[0] = 2.0
    times = np.array(
        [[centres[1], centres[2], centres[1:3].mean()], [centres[0], centres[0], centres[0]]]
    )
    solutions = CalSolutions(
        jones=scalar_jones(values), timeblocks_gps=times, chanblock_freqs_hz=band_freqs_hz(CHANS)
    )
    write_hyperdrive(tmp_path / "hyp2.fits", solutions)
    data = calibrate(sim, tmp_path / "hyp2.fits", tmp_path / "t.uvfits")
    n_bl = len(raw) // N_TIMES
    gain = np.repeat([1.0, 4.0, 4.0, 4.0], n_bl)[:, None]
    np.testing.assert_allclose(data, raw * gain, rtol=1e-5)


def test_several_timeblocks_without_times_are_refused(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    write_aocal(tmp_path / "cal2.bin", CalSolutions(jones=scalar_jones(np.ones((2, 64)))))
    with pytest.raises(ReadError, match="it has 2 timeblocks but no start and end times"):
        calibrate(sim, tmp_path / "cal2.bin", tmp_path / "x.uvfits")
