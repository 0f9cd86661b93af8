"""The conversion engine against the simulator's injected truth, and on the real MWA files."""

from __future__ import annotations

import itertools
import logging
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import angular_separation
from astropy.io import fits
from astropy.time import Time
from numpy.typing import NDArray
from pyuvdata import UVData

from correlator_phasing import KINDS, phased_by_the_correlator
from observatory.calib.formats import CalSolutions, write_aocal, write_hyperdrive
from observatory.preprocess.engine import output_paths, preprocess
from observatory.preprocess.options import ConversionOptions, OptionError, OutputFormat
from observatory.preprocess.reader import ReadError, open_reader, regular_time_grid
from observatory.telescope.simulator import (
    PointSource,
    RfiBurst,
    SimulatedObservation,
    predict_visibilities,
    simulate_observation,
)
from observatory.telescope.sky import azel_at
from shared_data import MWA_DATA

OBSID = 1320409688
SOURCE = PointSource(333.6069, -17.0288, 60.0, -0.8, "3C444")
N_TILES = 8
CHANS = (137, 138)
N_TIMES = 4
#: Everything off: the output must be the raw data, reordered.
RAW = {
    "no_rfi": "true",
    "no_geometric_delay": "true",
    "no_cable_delay": "true",
    "no_digital_gains": "true",
    "no_passband_gains": "true",
    "flag_edge_width": "0",
}
PYUVDATA_OFF = {
    "correct_cable_len": False,
    "correct_van_vleck": False,
    "remove_dig_gains": False,
    "remove_coarse_band": False,
    "remove_flagged_ants": False,
    "flag_init": False,
    "phase_to_pointing_center": False,
    "propagate_coarse_flags": False,
}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedObservation:
    """8 tiles, 2 coarse channels, 4 integrations; digital gains, quack time, no noise."""
    return simulate_observation(
        tmp_path_factory.mktemp("sim"),
        OBSID,
        n_tiles=N_TILES,
        coarse_chans=CHANS,
        n_timesteps=N_TIMES,
        sources=[SOURCE, PointSource(336.0, -21.0, 12.0, -0.6)],
        digital_gain_scatter=0.2,
        quack_time_s=2.0,
        flagged_antennas=[5],
    )


def convert(sim: SimulatedObservation, out: Path, **params: object) -> list[Path]:
    options = ConversionOptions.from_params({k: str(v) for k, v in params.items()})
    return preprocess(sim.metafits_path, sim.vis_paths, options, out)


def cube(path: Path, n_ants: int = N_TILES) -> tuple[np.ndarray, np.ndarray, UVData]:
    """Output as (times, baselines in chunk order, channels, XX XY YX YY) data and flags."""
    kwargs = {"ignore_single_chan": False} if path.suffix == ".ms" else {}
    uvd = UVData.from_file(str(path), **kwargs)
    pols = [list(uvd.polarization_array).index(code) for code in (-5, -7, -8, -6)]
    # Antenna numbers to metafits indices (uvfits numbers them from 1, a measurement set's
    # ANTENNA rows from 0), both in metafits order.
    index_of = {number: i for i, number in enumerate(uvd.telescope.antenna_numbers)}
    p = np.array([index_of[a] for a in uvd.ant_1_array])
    q = np.array([index_of[a] for a in uvd.ant_2_array])
    assert np.all(p <= q)
    baseline = p * n_ants - p * (p - 1) // 2 + (q - p)
    times = np.unique(uvd.time_array)
    rows = np.searchsorted(times, uvd.time_array)
    n_bl = n_ants * (n_ants + 1) // 2
    data = np.zeros((len(times), n_bl, uvd.Nfreqs, 4), np.complex64)
    flags = np.ones(data.shape, bool)
    data[rows, baseline] = uvd.data_array[:, :, pols]
    flags[rows, baseline] = uvd.flag_array[:, :, pols]
    return data, flags, uvd


def model(sim: SimulatedObservation, **kwargs: bool) -> np.ndarray:
    """The simulator's visibilities, (times, baselines, all channels, pols), pyuvdata convention."""
    return np.stack(
        [
            np.concatenate(
                [predict_visibilities(sim.truth, t, c, domain="uvdata", **kwargs) for c in CHANS],
                axis=1,
            )
            for t in range(N_TIMES)
        ]
    )


def unflagged_baselines() -> np.ndarray:
    p, q = np.triu_indices(N_TILES)
    return (p != 5) & (q != 5)


def test_with_everything_off_the_output_is_the_raw_data(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    (out,) = convert(sim, tmp_path / "raw.uvfits", **RAW)
    data, flags, uvd = cube(out)
    np.testing.assert_array_equal(data, model(sim))
    assert uvd.Ntimes == N_TIMES and uvd.Nfreqs == 64
    # Quack time (2 s) flags the first integration; tile 5 is flagged in the metafits.
    assert flags[0].all()
    good = unflagged_baselines()
    assert not flags[1:, good].any() and flags[:, ~good].all()


def test_cable_and_digital_gain_corrections_undo_the_injected_values(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    corrected = {**RAW, "no_cable_delay": "false", "no_digital_gains": "false"}
    (out,) = convert(sim, tmp_path / "corrected.uvfits", **corrected)
    data, _, _ = cube(out)
    expected = model(sim, include_cable=False, include_digital_gains=False)
    good = unflagged_baselines()
    scale = np.abs(expected[:, good]).max()
    np.testing.assert_allclose(data[:, good], expected[:, good], atol=2e-6 * scale)
    # The injected gains are far from unity, so skipping the correction is visibly wrong.
    (raw,) = convert(sim, tmp_path / "raw.uvfits", **RAW)
    uncorrected, _, _ = cube(raw)
    assert np.abs(uncorrected[:, good] - expected[:, good]).max() > 0.1 * scale


def test_an_input_with_a_digital_gain_of_zero_has_its_baselines_flagged(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    """Nothing can be divided out of a zero gain: the zeros were written unflagged, with
    the full weight, as data."""
    metafits = tmp_path / sim.metafits_path.name
    shutil.copy(sim.metafits_path, metafits)
    with fits.open(metafits, mode="update") as hdus:
        tiles = hdus["TILEDATA"].data
        row = np.flatnonzero((tiles["Antenna"] == 2) & (tiles["Pol"] == "X"))[0]
        tiles["Gains"][row, 0] = 0  # the first of CHANNELS: coarse channel 137
    options = ConversionOptions.from_params({**RAW, "no_digital_gains": "false"})
    (out,) = preprocess(metafits, sim.vis_paths, options, tmp_path / "zero_gain.uvfits")
    _, flags, _ = cube(out)
    p, q = np.triu_indices(N_TILES)
    with_zero = (p == 2) | (q == 2)
    assert flags[:, with_zero, :32].all()  # every sample of 137 on antenna 2's baselines
    others = unflagged_baselines() & ~with_zero
    assert (
        not flags[1:, others].any() and not flags[1:, with_zero & unflagged_baselines(), 32:].any()
    )


def test_phasing_to_a_source_leaves_its_flux_with_zero_phase(tmp_path: Path) -> None:
    single = simulate_observation(
        tmp_path / "sim", OBSID, n_tiles=N_TILES, coarse_chans=CHANS, n_timesteps=N_TIMES,
        sources=[SOURCE],
    )  # fmt: skip
    params = {
        **RAW, "no_cable_delay": "false", "no_geometric_delay": "false",
        "centre": "custom", "phase_centre_ra": SOURCE.ra_deg, "phase_centre_dec": SOURCE.dec_deg,
    }  # fmt: skip
    (out,) = convert(single, tmp_path / "phased.uvfits", **params)
    data, _, uvd = cube(out)
    p, q = np.triu_indices(N_TILES)
    xx = data[:, p != q, :, 0]
    assert np.abs(np.angle(xx)).max() < 1e-5
    np.testing.assert_allclose(
        np.abs(xx), np.broadcast_to(SOURCE.flux_jy(uvd.freq_array), xx.shape), rtol=1e-5
    )
    centre = uvd.phase_center_catalog[uvd.phase_center_id_array[0]]
    assert np.degrees(centre["cat_lon"]) == pytest.approx(SOURCE.ra_deg)
    assert np.degrees(centre["cat_lat"]) == pytest.approx(SOURCE.dec_deg)


def test_averaging_is_the_weighted_mean_of_the_model(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    (out,) = convert(sim, tmp_path / "avg.uvfits", **RAW, avg_time_res=4, avg_freq_res=160)
    data, flags, uvd = cube(out)
    assert (uvd.Ntimes, uvd.Nfreqs) == (2, 16)
    full = model(sim)
    good = unflagged_baselines()
    # The first integration is quacked, so the first output is the second integration's
    # channel average alone; the second output averages integrations 2 and 3.
    first = full[1].reshape(-1, 16, 4, 4).mean(axis=2)
    second = full[2:].reshape(2, -1, 16, 4, 4).mean(axis=(0, 3))
    np.testing.assert_allclose(data[0, good], first[good], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(data[1, good], second[good], rtol=1e-5, atol=1e-4)
    assert not flags[:, good].any() and flags[:, ~good].all()
    assert uvd.integration_time == pytest.approx(4.0)
    assert uvd.channel_width == pytest.approx(160e3)
    assert np.all(uvd.nsample_array[uvd.ant_1_array == 1][0] > 0)  # uvfits: from 1


@pytest.mark.parametrize(("int_time_s", "quack_time_s", "flagged"), [(8.0, 2.0, 1), (2.0, 0.5, 1),
                                                                      (2.0, 2.0, 1), (2.0, 4.0, 2)])  # fmt: skip
def test_an_integration_holding_any_of_the_quack_time_is_flagged(
    tmp_path: Path, int_time_s: float, quack_time_s: float, flagged: int
) -> None:
    """Birli flags every integration that starts before the end of the quack time; one
    whose centre was past it (2 s of settling in an 8 s integration) was kept."""
    sim = simulate_observation(tmp_path / "sim", OBSID, n_tiles=3, n_timesteps=3, sources=[SOURCE],
                               int_time_s=int_time_s, quack_time_s=quack_time_s)  # fmt: skip
    (out,) = convert(sim, tmp_path / "q.uvfits", **RAW)
    _, flags, _ = cube(out, n_ants=3)
    per_time = flags.all(axis=(1, 2, 3))
    assert per_time.tolist() == [True] * flagged + [False] * (3 - flagged)


def test_edge_and_dc_flags_fall_exactly_where_the_rules_say(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    params = {k: v for k, v in RAW.items() if k != "flag_edge_width"}
    (out,) = convert(sim, tmp_path / "edges.uvfits", **params)  # default: 80 kHz = 2 channels
    _, flags, _ = cube(out)
    good = unflagged_baselines()
    per_chan = flags[1:, good].all(axis=(0, 1, 3))
    expected = np.zeros(64, bool)
    for start in (0, 32):
        expected[start : start + 2] = expected[start + 30 : start + 32] = True
    np.testing.assert_array_equal(per_chan, expected)
    assert not flags[1:, good][:, :, ~expected].any()

    (out,) = convert(
        sim, tmp_path / "dc.uvfits", **{**RAW, "flag_edge_width": 120, "flagdcchannels": "true"}
    )
    _, flags, _ = cube(out)
    per_chan = flags[1:, good].all(axis=(0, 1, 3))
    expected = np.zeros(64, bool)
    for start in (0, 32):
        expected[start : start + 3] = expected[start + 29 : start + 32] = True
        expected[start + 16] = True  # the DC channel (MWAX data: only when asked)
    np.testing.assert_array_equal(per_chan, expected)


def test_true_gains_as_ao_cal_solutions_give_the_gain_free_sky(tmp_path: Path) -> None:
    noise_jy = 0.05
    gained = simulate_observation(
        tmp_path / "sim", OBSID, n_tiles=N_TILES, coarse_chans=CHANS, n_timesteps=N_TIMES,
        sources=[SOURCE], gain_amplitude_scatter=0.2, delay_error_scatter_ns=3.0,
        noise_sigma_jy=noise_jy, seed=3,
    )  # fmt: skip
    truth = gained.truth
    # Solutions as hyperdrive makes them: the inverse of the gains of the raw data (not of
    # pyuvdata's conjugated ones), one chanblock per channel.
    gains = np.concatenate([truth.complex_gains(c, "mwax") for c in CHANS], axis=2)  # (A, 2, C)
    jones = np.zeros((1, N_TILES, 64, 4), np.complex128)
    jones[0, :, :, 0] = 1 / gains[:, 0]
    jones[0, :, :, 3] = 1 / gains[:, 1]
    jones[0, 2, 10, :] = np.nan  # one unsolved channel of tile 2
    solutions_path = tmp_path / "solutions.bin"
    write_aocal(solutions_path, CalSolutions(jones=jones))

    options = ConversionOptions.from_params(
        {**RAW, "no_cable_delay": "false", "apply_di_cal": "true"}
    )
    (out,) = preprocess(
        gained.metafits_path,
        gained.vis_paths,
        options,
        tmp_path / "cal.uvfits",
        solutions=solutions_path,
    )
    data, flags, _ = cube(out)
    expected = model(gained, include_cable=False, include_gains=False)
    p, q = np.triu_indices(N_TILES)
    with_tile_2 = (p == 2) | (q == 2)
    assert flags[:, with_tile_2, 10].all()
    ok = ~flags
    # The autocorrelations also hold the noise's power, the system's SEFD, times the tile's
    # gain squared, which the solutions take out.
    for pol in (0, 3):
        expected[:, p == q, :, pol] += truth.system_sefd_jy
    residual = (data - expected)[ok]
    worst_scale = 1 / np.abs(gains).min() ** 2
    assert np.abs(residual).max() < 6 * math.sqrt(2) * noise_jy * worst_scale
    assert np.std(residual.real) < 2 * noise_jy * worst_scale
    # Without the solutions the gains stay in.
    (raw,) = convert(gained, tmp_path / "uncal.uvfits", **{**RAW, "no_cable_delay": "false"})
    uncal, _, _ = cube(raw)
    assert np.abs((uncal - expected)[ok]).max() > 20 * noise_jy * worst_scale


def test_hyperdrive_solutions_apply_like_ao_cal(tmp_path: Path, sim: SimulatedObservation) -> None:
    """As Birli applies them, ``J_p V J_q^H`` on the raw data: on pyuvdata's conjugated
    data that is ``conj(J_p) V J_q^T``."""
    phases = np.linspace(0.0, 2.0, N_TILES)  # per tile, so the convention shows
    jones = np.zeros((1, N_TILES, 64, 4), np.complex128)  # one chanblock per channel
    jones[..., 0] = 2.0 * np.exp(1j * phases)[None, :, None]
    jones[..., 3] = 0.5j
    write_hyperdrive(tmp_path / "hyp.fits", CalSolutions(jones=jones))
    options = ConversionOptions.from_params(RAW)
    (out,) = preprocess(
        sim.metafits_path,
        sim.vis_paths,
        options,
        tmp_path / "h.uvfits",
        solutions=tmp_path / "hyp.fits",
    )
    data, _, _ = cube(out)
    raw = model(sim)
    p, q = np.triu_indices(N_TILES)
    turn = np.exp(-1j * (phases[p] - phases[q]))[None, :, None]  # conj(e^i(phi_p)) e^i(phi_q)
    assert np.abs(turn - 1).max() > 1  # the test tells the conventions apart
    np.testing.assert_allclose(data[..., 0], 4 * turn * raw[..., 0], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(data[..., 3], 0.25 * raw[..., 3], rtol=1e-5, atol=1e-3)


def test_rfi_in_the_last_integrations_is_flagged_when_the_observation_is_cut_in_blocks(
    tmp_path: Path,
) -> None:
    """16 integrations in blocks of at most 5 were cut 5 + 5 + 5 + 1: AOFlagger, given one
    integration, flagged nothing of a burst in it. Now 4 x 4."""
    from observatory.preprocess.engine import RFI_CHUNK_FACTOR, _plan, _time_blocks

    burst = RfiBurst(coarse_chan=137, fine_chans=(12, 14), timesteps=(15, 16), amplitude_jy=300.0)
    noisy = simulate_observation(
        tmp_path / "sim", OBSID, n_tiles=16, coarse_chans=[137], n_timesteps=16,
        sources=[SOURCE], noise_sigma_jy=2.0, rfi=[burst], seed=4,
    )  # fmt: skip
    options = ConversionOptions.from_params({k: v for k, v in RAW.items() if k != "no_rfi"})
    five_integrations = 5 * 136 * 32 * 4 * 8 // RFI_CHUNK_FACTOR
    reader = open_reader(noisy.metafits_path, noisy.vis_paths)
    plan = _plan(reader, options, None, five_integrations, report=False)
    assert [len(block) for block in _time_blocks(plan)] == [4, 4, 4, 4]
    (out,) = preprocess(noisy.metafits_path, noisy.vis_paths, options, tmp_path / "rfi.uvfits",
                        workers=1, chunk_bytes=five_integrations)  # fmt: skip
    _, flags, _ = cube(out, 16)
    p, q = np.triu_indices(16)
    assert flags[15, p != q][:, 12:14].mean() > 0.95


def test_aoflagger_flags_an_rfi_burst_and_little_else(tmp_path: Path) -> None:
    burst = RfiBurst(coarse_chan=137, fine_chans=(12, 14), timesteps=(6, 9), amplitude_jy=300.0)
    noisy = simulate_observation(
        tmp_path / "sim", OBSID, n_tiles=16, coarse_chans=[137], n_timesteps=16,
        sources=[SOURCE], noise_sigma_jy=2.0, rfi=[burst], seed=4,
    )  # fmt: skip
    params = {k: v for k, v in RAW.items() if k != "no_rfi"}
    options = ConversionOptions.from_params(params)
    (out,) = preprocess(
        noisy.metafits_path, noisy.vis_paths, options, tmp_path / "rfi.uvfits", workers=1
    )
    _, flags, _ = cube(out, 16)
    p, q = np.triu_indices(16)
    cross = flags[:, p != q]
    in_burst = np.zeros(cross.shape, bool)
    in_burst[6:9, :, 12:14] = True
    burst_fraction = cross[in_burst].mean()
    clean_fraction = cross[~in_burst].mean()
    print(
        f"AOFlagger: {burst_fraction:.1%} of the burst flagged, {clean_fraction:.1%} of clean data"
    )
    assert burst_fraction > 0.95
    assert clean_fraction < 0.05
    # Flagging runs in a process pool when there are several workers: the same flags.
    eight_integrations = 136 * 32 * 4 * 8  # baselines x channels x pols x bytes: 8 per RFI chunk
    halves = [
        preprocess(noisy.metafits_path, noisy.vis_paths, options, tmp_path / f"rfi{n}.uvfits",
                   workers=n, chunk_bytes=eight_integrations)[0]
        for n in (1, 2)
    ]  # fmt: skip
    np.testing.assert_array_equal(cube(halves[0], 16)[1], cube(halves[1], 16)[1])
    # The worker processes write their chunks into the uvfits themselves; with a measurement
    # set beside it they send them to this process, which writes both: the same data.
    assert halves[0].read_bytes() == halves[1].read_bytes()
    both = preprocess(noisy.metafits_path, noisy.vis_paths,
                      ConversionOptions.from_params({**params, "output": "both"}),
                      tmp_path / "both", workers=2, chunk_bytes=eight_integrations)  # fmt: skip
    for ours, reference in zip(cube(both[0], 16), cube(halves[0], 16)[:2], strict=False):
        np.testing.assert_array_equal(ours, reference)
    # Without AOFlagger nothing is flagged.
    (out,) = convert(noisy, tmp_path / "norfi.uvfits", **RAW)
    assert not cube(out, 16)[1][:, p != q].any()


def test_measurement_set_is_consistent_in_casacore_and_pyuvdata(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    from casacore.tables import table

    uvfits_path, ms_path = convert(sim, tmp_path / "both", **RAW, output="both")
    assert (uvfits_path.name, ms_path.name) == ("both.uvfits", "both.ms")
    from_ms, ms_flags, _ = cube(ms_path)
    from_uvfits, uvfits_flags, _ = cube(uvfits_path)
    np.testing.assert_array_equal(from_ms, from_uvfits)
    np.testing.assert_array_equal(ms_flags, uvfits_flags)
    with table(str(ms_path / "ANTENNA"), ack=False) as antennas:
        assert antennas.nrows() == N_TILES
        assert list(antennas.getcol("NAME")) == [t.tile_name for t in sim.truth.tiles]
    with table(str(ms_path / "SPECTRAL_WINDOW"), ack=False) as windows:
        assert windows.nrows() == 1
        assert windows.getcol("NUM_CHAN")[0] == 64
        freqs = windows.getcol("CHAN_FREQ")[0]
        assert freqs[0] == pytest.approx(sim.truth.fine_chan_freqs_hz(137)[0])
    with table(str(ms_path / "FIELD"), ack=False) as fields:
        assert fields.nrows() == 1
        ra, dec = fields.getcol("PHASE_DIR")[0, 0]
        assert np.degrees(ra) % 360 == pytest.approx(SOURCE.ra_deg, abs=1e-6)
        assert np.degrees(dec) == pytest.approx(SOURCE.dec_deg, abs=1e-6)
    # The observation's span and project, which listobs shows (pyuvdata left [0, 0] and "").
    with table(str(ms_path / "OBSERVATION"), ack=False) as observation:
        start_gps = sim.truth.obsid
        end_gps = start_gps + sim.truth.n_timesteps * sim.truth.timestep_duration_s
        expected = Time([start_gps, end_gps], format="gps").utc.mjd * 86400.0
        np.testing.assert_allclose(observation.getcell("TIME_RANGE", 0), expected, atol=1e-3)
        assert observation.getcell("PROJECT", 0) == fits.getheader(sim.metafits_path)["PROJECT"]
    # The streamed uvfits carries the metadata pyuvdata itself would write for the same data.
    reference_path = tmp_path / "reference.uvfits"
    UVData.from_file(str(ms_path)).write_uvfits(str(reference_path))
    ours, reference = UVData.from_file(str(uvfits_path)), UVData.from_file(str(reference_path))
    for uvd in (ours, reference):
        uvd.reorder_blts("time", minor_order="baseline")
    np.testing.assert_allclose(ours.uvw_array, reference.uvw_array, atol=1e-6)
    np.testing.assert_allclose(ours.time_array, reference.time_array, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.lst_array, reference.lst_array, atol=1e-9)
    np.testing.assert_allclose(ours.phase_center_app_ra, reference.phase_center_app_ra, atol=1e-9)
    np.testing.assert_allclose(
        ours.phase_center_frame_pa, reference.phase_center_frame_pa, atol=1e-9
    )
    np.testing.assert_allclose(
        ours.telescope.antenna_positions, reference.telescope.antenna_positions, atol=1e-6
    )
    assert list(ours.telescope.antenna_names) == list(reference.telescope.antenna_names)
    # Birli's numbers, from 1; pyuvdata numbers a measurement set's antennas by row, from 0.
    np.testing.assert_array_equal(
        ours.telescope.antenna_numbers, reference.telescope.antenna_numbers + 1
    )
    np.testing.assert_allclose(ours.freq_array, reference.freq_array)
    np.testing.assert_allclose(ours.channel_width, reference.channel_width)
    np.testing.assert_allclose(ours.integration_time, reference.integration_time)
    np.testing.assert_array_equal(ours.data_array, reference.data_array)
    np.testing.assert_array_equal(ours.flag_array, reference.flag_array)
    np.testing.assert_array_equal(ours.nsample_array, reference.nsample_array)
    assert ours.phase_center_catalog == reference.phase_center_catalog
    assert ours.telescope.mount_type == reference.telescope.mount_type
    np.testing.assert_allclose(ours.telescope.feed_angle, reference.telescope.feed_angle)
    with table(str(ms_path), ack=False) as main:
        assert main.nrows() == N_TIMES * N_TILES * (N_TILES + 1) // 2
        assert main.getcol("DATA").shape[1:] == (64, 4)
        assert main.getcol("ANTENNA1").max() < N_TILES


def test_small_chunks_give_the_same_result(sim: SimulatedObservation, tmp_path: Path) -> None:
    options = ConversionOptions.from_params({**RAW, "no_cable_delay": "false", "avg_time_res": 4})
    calls: list[tuple[int, int]] = []
    (whole,) = preprocess(sim.metafits_path, sim.vis_paths, options, tmp_path / "a.uvfits")
    (chunked,) = preprocess(
        sim.metafits_path, sim.vis_paths, options, tmp_path / "b.uvfits",
        chunk_bytes=1, workers=2, progress=lambda done, total, _: calls.append((done, total)),
    )  # fmt: skip
    np.testing.assert_array_equal(cube(whole)[0], cube(chunked)[0])
    # One chunk per coarse channel and pair of integrations.
    assert calls == [(n, 4) for n in range(1, 5)]


def test_progress_names_the_integrations_of_the_files(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    """Averaging 3 of the 4 integrations pads the last block to 6: the report said 0-5."""
    options = ConversionOptions.from_params({**RAW, "avg_time_res": 3 * sim.truth.int_time_s})
    reports: list[str] = []
    preprocess(sim.metafits_path, sim.vis_paths, options, tmp_path / "a.uvfits",
               progress=lambda _done, _total, what: reports.append(what))  # fmt: skip
    assert sorted(reports) == [f"coarse channel {c}, integrations 0-{N_TIMES - 1}" for c in CHANS]


@pytest.mark.parametrize(
    ("metafits", "files", "n_chans"),
    [
        ("1320409688.metafits", ["1320409688_20211108122750_mini_ch137_000.fits"], 1),
        (
            "1131733552.metafits",
            [
                "1131733552_20151116182537_mini_gpubox01_00.fits",
                "1131733552_20151116182637_mini_gpubox06_01.fits",
            ],
            6,  # coarse channels 149 and 154, and the four between them, flagged (Birli's rule)
        ),
        ("1061315448.metafits", ["1061315448_20130823175130_mini_gpubox07_01.fits"], 1),
    ],
)
def test_real_observations_convert_to_uvfits_and_ms(
    tmp_path: Path, metafits: str, files: list[str], n_chans: int
) -> None:
    paths = [MWA_DATA / f for f in files]
    options = ConversionOptions.from_params({**RAW, "output": "both", "allow_missing": "true"})
    outputs = preprocess(MWA_DATA / metafits, paths, options, tmp_path / "real")
    from casacore.tables import table

    direct = UVData.from_file(
        [str(MWA_DATA / metafits), *map(str, paths)], file_type="mwa_corr_fits", **PYUVDATA_OFF
    )
    for path in outputs:
        # The first cross-correlation (the first two antennas in metafits order), XX. Read
        # for that baseline alone: the whole of the gap-filled real data (a million rows)
        # took pyuvdata 20 s; how both formats read as a whole is checked on simulated data.
        if path.suffix == ".uvfits":
            uvd = UVData.from_file(str(path), read_data=False)
            n_freqs, n_bls, first_two = uvd.Nfreqs, uvd.Nbls, uvd.telescope.antenna_names[:2]
            numbers = uvd.telescope.antenna_numbers[:2]
            ours = UVData.from_file(str(path), bls=[tuple(numbers)]).get_data(*numbers, "xx")
        else:
            with table(str(path), ack=False) as ms:
                pairs = ms.getcol("ANTENNA1").astype(np.int64) * 1000 + ms.getcol("ANTENNA2")
                n_bls = np.unique(pairs).size
                # Antennas 0 and 1, XX, each row one integration of one spectral window (one
                # per coarse channel); conjugated, as pyuvdata reads a measurement set.
                rows = np.flatnonzero(pairs == 1)
                ours = np.conj(np.concatenate([ms.getcell("DATA", int(row))[:, 0] for row in rows]))
            with table(f"{path}::SPECTRAL_WINDOW", ack=False) as window:
                n_freqs = int(window.getcol("NUM_CHAN").sum())
            with table(f"{path}::ANTENNA", ack=False) as antennas:
                first_two = antennas.getcol("NAME")[:2]
        assert n_freqs == n_chans and n_bls == 8256
        # Same visibilities as pyuvdata's own reading of the files (it orders
        # antennas by tile number; compare one cross-correlation by tile name).
        names = list(direct.telescope.antenna_names)
        ant1, ant2 = (direct.telescope.antenna_numbers[names.index(name)] for name in first_two)
        theirs = direct.get_data(ant1, ant2, "xx")
        assert np.any(ours)
        np.testing.assert_allclose(
            np.sort_complex(ours[ours != 0]), np.sort_complex(theirs[theirs != 0]), rtol=1e-6
        )
    # The POINTING table: the metafits RA/DEC (the pointing at the scheduled start) as TARGET,
    # the sky the tiles point to at each integration as DIRECTION, which the Earth's rotation
    # has carried from there by at most 15 degrees an hour.
    header = fits.getheader(MWA_DATA / metafits)
    with table(f"{outputs[-1]}::POINTING", ack=False) as pointing:
        first_time_s, direction, target = (
            pointing.getcell(c, 0) for c in ("TIME", "DIRECTION", "TARGET")
        )
    np.testing.assert_allclose(np.degrees(target[0]), [header["RA"], header["DEC"]])
    since_start_s = first_time_s - Time(header["GPSTIME"], format="gps").utc.mjd * 86400.0
    drift_deg = np.degrees(angular_separation(*direction[0], *target[0]))
    assert since_start_s > 0 and drift_deg < 15 / 3600 * since_start_s + 0.01, (
        since_start_s,
        drift_deg,
    )


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("params", "key", "fragment"),
    [
        ({"avg_time_res": 3}, "avg_time_res", "whole multiple of the integration time 2 s"),
        ({"avg_freq_res": 50}, "avg_freq_res", "whole multiple of the fine channel width 40 kHz"),
        ({"avg_freq_res": 120}, "avg_freq_res", "divide the 32 fine channels"),
        ({"flag_edge_width": 60}, "flag_edge_width", "whole multiple of the fine channel width"),
        ({"flag_edge_width": 640}, "flag_edge_width", "fewer than half"),
        ({"apply_di_cal": "true"}, "apply_di_cal", "needs a solutions file"),
    ],
)
def test_options_that_do_not_fit_the_observation(
    sim: SimulatedObservation, tmp_path: Path, params: dict[str, object], key: str, fragment: str
) -> None:
    with pytest.raises(OptionError) as error:
        convert(sim, tmp_path / "x.uvfits", **params)
    assert error.value.key == key and fragment in str(error.value)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_missing_coarse_channels_need_allow_missing(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    only_137 = [p for p in sim.vis_paths if "_ch137_" in p.name]
    options = ConversionOptions.from_params(RAW)
    with pytest.raises(ReadError, match="no files for coarse channels 138"):
        preprocess(sim.metafits_path, only_137, options, tmp_path / "x.uvfits")
    options = ConversionOptions.from_params({**RAW, "allow_missing": "true"})
    (out,) = preprocess(sim.metafits_path, only_137, options, tmp_path / "x.uvfits")
    assert cube(out)[2].Nfreqs == 32


def test_missing_coarse_channels_are_warned_of_once(
    sim: SimulatedObservation,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Each (forked) worker process planned again and logged the warning again, into the
    handlers it inherited: a job's log said it once per worker more."""
    only_137 = [p for p in sim.vis_paths if "_ch137_" in p.name]
    flagging = {key: value for key, value in RAW.items() if key != "no_rfi"}  # in processes
    options = ConversionOptions.from_params({**flagging, "allow_missing": "true"})
    to_stderr = logging.StreamHandler(sys.stderr)  # as the CLI's: the workers inherit it
    logger = logging.getLogger("observatory")
    logger.addHandler(to_stderr)
    try:
        preprocess(sim.metafits_path, only_137, options, tmp_path / "x.uvfits",
                   workers=2, chunk_bytes=1)  # fmt: skip
    finally:
        logger.removeHandler(to_stderr)
    assert capfd.readouterr().err.count("no files for coarse channels 138") == 1


@pytest.mark.parametrize("output", ["uvfits", "ms"])
def test_a_coarse_channel_missing_inside_the_band_is_written_flagged(
    tmp_path: Path, output: str
) -> None:
    """Birli's rule: from the lowest to the highest channel with files, one contiguous band
    with the channels without files flagged; channels without files beyond the ends are
    left out. (Missing channels had been dropped, splitting the band in two windows.)"""
    three = simulate_observation(
        tmp_path / "sim", OBSID, n_tiles=3, coarse_chans=[136, 137, 138], n_timesteps=2,
        sources=[SOURCE],
    )  # fmt: skip
    options = ConversionOptions.from_params({**RAW, "allow_missing": "true", "output": output})
    edges = [p for p in three.vis_paths if "_ch137_" not in p.name]
    (out,) = preprocess(three.metafits_path, edges, options, tmp_path / f"gap.{output}")
    data, flags, uvd = cube(out, n_ants=3)
    assert (uvd.Nspws, uvd.Nfreqs) == (1, 96)
    np.testing.assert_allclose(np.diff(uvd.freq_array.ravel()), 40e3)
    assert uvd.freq_array.ravel()[0] == 136 * 1.28e6 - 16 * 40e3
    assert flags[:, :, 32:64].all() and not np.any(data[:, :, 32:64])
    assert not flags[:, :, :32].all() and not flags[:, :, 64:].all()
    (whole,) = preprocess(
        three.metafits_path, three.vis_paths, options, tmp_path / f"whole.{output}"
    )
    kept = np.r_[0:32, 64:96]
    np.testing.assert_array_equal(data[:, :, kept], cube(whole, n_ants=3)[0][:, :, kept])
    lower = [p for p in three.vis_paths if "_ch138_" not in p.name]
    (out,) = preprocess(three.metafits_path, lower, options, tmp_path / f"lower.{output}")
    assert cube(out, n_ants=3)[2].Nfreqs == 64


def test_solutions_for_another_array_are_refused(sim: SimulatedObservation, tmp_path: Path) -> None:
    write_aocal(tmp_path / "s.bin", CalSolutions(jones=np.ones((1, 3, 64, 4), np.complex128)))
    options = ConversionOptions.from_params(RAW)
    # The message names the solutions file and the mismatch, not an option the user never set.
    message = rf"solutions file {tmp_path / 's.bin'}: the solutions are for 3 antennas, but obsid {OBSID} has 8"
    with pytest.raises(ReadError, match=message):
        preprocess(
            sim.metafits_path,
            sim.vis_paths,
            options,
            tmp_path / "x.uvfits",
            solutions=tmp_path / "s.bin",
        )


@pytest.mark.parametrize(("shape", "said"), [((1, 8, 0, 4), "no channels"),
                                             ((0, 8, 64, 4), "no timeblocks")])  # fmt: skip
def test_solutions_holding_nothing_are_refused(
    sim: SimulatedObservation, tmp_path: Path, shape: tuple[int, ...], said: str
) -> None:
    """0 chanblocks was a ZeroDivisionError, a traceback from the command."""
    write_aocal(tmp_path / "s.bin", CalSolutions(jones=np.ones(shape, np.complex128)))
    with pytest.raises(ReadError, match=rf"{tmp_path / 's.bin'}: the solutions hold {said}"):
        preprocess(sim.metafits_path, sim.vis_paths, ConversionOptions.from_params(RAW),
                   tmp_path / "x.uvfits", solutions=tmp_path / "s.bin")  # fmt: skip


def test_data_files_of_another_observation_are_refused(tmp_path: Path) -> None:
    legacy = [MWA_DATA / f for f in LEGACY_FILES]
    other = MWA_DATA / "1320409688.metafits"
    options = ConversionOptions.from_params({**RAW, "allow_missing": "true"})
    message = (
        r"1131733552_20151116182537_mini_gpubox01_00\.fits \(and 1 more file\(s\)\): the data "
        r"files are from obsid 1131733552, which does not match the metafits "
        r"1320409688\.metafits \(obsid 1320409688\)"
    )
    with pytest.raises(ReadError, match=message):
        preprocess(other, legacy, options, tmp_path / "x.uvfits")
    assert not list(tmp_path.iterdir())
    # Renamed to the metafits' obsid, the file's header still says where it is from.
    renamed = tmp_path / "1320409688_20151116182537_mini_gpubox01_00.fits"
    renamed.symlink_to(legacy[0])
    with pytest.raises(ReadError, match="from obsid 1131733552, which does not match"):
        open_reader(other, [renamed])


def test_unreadable_inputs_name_the_file(sim: SimulatedObservation, tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="no correlator data files"):
        open_reader(sim.metafits_path, [])
    with pytest.raises(ReadError, match=r"nothing\.fits: no such file"):
        open_reader(sim.metafits_path, [tmp_path / "nothing.fits"])
    garbage = tmp_path / f"{OBSID}.metafits"
    garbage.write_bytes(b"not fits")
    with pytest.raises(ReadError, match="not a readable metafits"):
        open_reader(garbage, sim.vis_paths)


def test_output_paths_follow_the_format() -> None:
    assert output_paths("x/obs.uvfits", OutputFormat.UVFITS) == [Path("x/obs.uvfits")]
    assert output_paths("x/obs", OutputFormat.MS) == [Path("x/obs.ms")]
    assert output_paths("x/obs.ms", OutputFormat.BOTH) == [Path("x/obs.uvfits"), Path("x/obs.ms")]
    # UVFITS files are often named .fits or .uvf: written under that name, not x.fits.uvfits.
    assert output_paths("x/obs.fits", OutputFormat.UVFITS) == [Path("x/obs.fits")]
    assert output_paths("x/obs.UVF", OutputFormat.UVFITS) == [Path("x/obs.UVF")]
    assert output_paths("x/obs.fits", OutputFormat.BOTH) == [Path("x/obs.uvfits"), Path("x/obs.ms")]
    with pytest.raises(OptionError, match=r"ends in \.fits"):
        output_paths("x/obs.fits", OutputFormat.MS)
    with pytest.raises(OptionError, match=r"ends in \.ms"):
        output_paths("x/obs.ms", OutputFormat.UVFITS)


# ----------------------------------------------------------------------------------------------
# Passband and DC channel on real data


def _real_inputs(obsid: str) -> tuple[Path, list[Path]]:
    names = {
        "1320409688": ["1320409688_20211108122750_mini_ch137_000.fits"],
        "1131733552": [
            "1131733552_20151116182537_mini_gpubox01_00.fits",
            "1131733552_20151116182637_mini_gpubox06_01.fits",
        ],
    }[obsid]
    return MWA_DATA / f"{obsid}.metafits", [MWA_DATA / n for n in names]


@pytest.mark.parametrize(
    ("obsid", "shape_file", "per_channel"),
    [("1320409688", "mwax_pfb_bandpass_40kHz", 1), ("1131733552", "MWA_rev_cb_10khz_doubles", 4)],
)
def test_passband_is_divided_out_of_real_data(
    tmp_path: Path, obsid: str, shape_file: str, per_channel: int
) -> None:
    import h5py
    from pyuvdata.data import DATA_PATH

    metafits, files = _real_inputs(obsid)
    common = {**RAW, "allow_missing": "true", "no_flag_dc": "true"}
    outputs = {}
    for passband in ("true", "false"):
        options = ConversionOptions.from_params({**common, "no_passband_gains": passband})
        (out,) = preprocess(metafits, files, options, tmp_path / f"pb_{passband}.uvfits")
        outputs[passband] = cube(out, 128)[0]
    with h5py.File(f"{DATA_PATH}/mwa_config_data/{shape_file}.h5", "r") as handle:
        shape = handle["coarse_band"][:]
    # The files hold the first fine channel of each coarse channel: the band edge.
    edge_gain = shape[:per_channel].mean()
    assert 0.4 < edge_gain < 0.6
    present = np.abs(outputs["true"]) > 0
    np.testing.assert_allclose(
        outputs["false"][present], outputs["true"][present] / edge_gain, rtol=1e-5
    )


def test_the_mwax_passband_of_wider_channels_is_centred_on_them() -> None:
    """MWAX's middle channel sits on the coarse-channel centre: 80 kHz channels averaged from
    pairs of 40 kHz ones were half a channel off, up to 9 % wrong inside the kept band."""
    import dataclasses

    import h5py
    from pyuvdata.data import DATA_PATH

    from observatory.preprocess.corrections import passband_gains
    from observatory.preprocess.reader import read_metadata

    meta = read_metadata(MWA_DATA / "1320409688.metafits")
    assert meta.mwax and meta.fine_chan_width_hz == 40e3

    def gains(width_khz: int) -> NDArray[np.float64]:
        n_chans = 1280 // width_khz
        wider = dataclasses.replace(meta, fine_chan_width_hz=width_khz * 1e3,
                                    fine_chans_per_coarse=n_chans)  # fmt: skip
        return passband_gains(wider, np.arange(n_chans))

    with h5py.File(f"{DATA_PATH}/mwa_config_data/mwax_pfb_bandpass_80kHz.h5", "r") as handle:
        pyuvdata_80 = handle["coarse_band"][:]
    np.testing.assert_array_equal(gains(80), pyuvdata_80)  # pyuvdata's own, at its width
    for width_khz in (160, 320, 640):
        shape = gains(width_khz)
        middle = len(shape) // 2
        # Symmetric about the middle channel, as the filter is about the coarse centre ...
        np.testing.assert_allclose(shape[middle + 1 :], shape[middle - 1 : 0 : -1], rtol=1e-12)
        # ... and each channel the mean of the 80 kHz response over its band.
        per = width_khz // 80
        inner = pyuvdata_80[(middle * per - per // 2) : (middle * per + per // 2 + 1)]
        weights = np.r_[0.5, np.ones(per - 1), 0.5] / per
        assert shape[middle] == pytest.approx(np.dot(weights, inner), rel=1e-12)


def test_simulated_data_say_their_passband_is_flat(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    # DERIPPLE = 1 in the simulator's metafits: dividing a PFB shape out would be wrong.
    (with_default,) = convert(
        sim, tmp_path / "a.uvfits", **{k: v for k, v in RAW.items() if k != "no_passband_gains"}
    )
    (without,) = convert(sim, tmp_path / "b.uvfits", **RAW)
    np.testing.assert_array_equal(cube(with_default)[0], cube(without)[0])


def test_dc_channel_flagging_defaults_to_legacy_data_only(
    tmp_path: Path, sim: SimulatedObservation
) -> None:
    from observatory.preprocess.engine import _plan

    options = ConversionOptions.from_params({"allow_missing": "true"})
    legacy = _plan(open_reader(*_real_inputs("1131733552")), options, None, 1 << 20)
    mwax = _plan(open_reader(*_real_inputs("1320409688")), options, None, 1 << 20)
    simulated = _plan(open_reader(sim.metafits_path, sim.vis_paths), options, None, 1 << 20)
    assert (legacy.flag_dc, mwax.flag_dc, simulated.flag_dc) == (True, False, False)
    no_dc = ConversionOptions.from_params({"allow_missing": "true", "no_flag_dc": "true"})
    assert _plan(open_reader(*_real_inputs("1131733552")), no_dc, None, 1 << 20).flag_dc is False
    # MWAX files under a metafits whose MODE still says legacy (early MWAX observations):
    # the files decide, as in Birli (the DC channel was flagged, the legacy passband used).
    legacy_mode = tmp_path / "legacy_mode.metafits"
    with fits.open(sim.metafits_path) as hdus:
        hdus[0].header["MODE"] = "HW_LFILES"
        hdus.writeto(legacy_mode)
    reader = open_reader(legacy_mode, sim.vis_paths)
    assert reader.meta.mwax is True
    assert _plan(reader, options, None, 1 << 20).flag_dc is False


# ----------------------------------------------------------------------------------------------
# Files that start at different times: every integration keeps its own time


LEGACY_FILES = [
    "1131733552_20151116182537_mini_gpubox01_00.fits",  # coarse channel 153, 18:25:37
    "1131733552_20151116182637_mini_gpubox06_01.fits",  # coarse channel 149, 18:26:37
]


def _as_cube(uvd: UVData, antenna_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """pyuvdata's reading as (times, baselines in chunk order, channels, pols): data, nsamples.

    pyuvdata numbers antennas by tile; the chunk order is the metafits order (``antenna_names``).
    """
    index_of = {name: i for i, name in enumerate(antenna_names)}
    names = list(uvd.telescope.antenna_names)
    ours = {number: index_of[names[i]] for i, number in enumerate(uvd.telescope.antenna_numbers)}
    p = np.array([ours[a] for a in uvd.ant_1_array])
    q = np.array([ours[a] for a in uvd.ant_2_array])
    pols = [list(uvd.polarization_array).index(code) for code in (-5, -7, -8, -6)]
    data = uvd.data_array[:, :, pols]
    nsamples = uvd.nsample_array[:, :, pols]
    swapped = p > q
    data[swapped] = np.conj(data[swapped][:, :, [0, 2, 1, 3]])
    nsamples[swapped] = nsamples[swapped][:, :, [0, 2, 1, 3]]
    p, q = np.minimum(p, q), np.maximum(p, q)
    n = len(antenna_names)
    baseline = p * n - p * (p - 1) // 2 + (q - p)
    times = np.unique(uvd.time_array)
    rows = np.searchsorted(times, uvd.time_array)
    out = np.zeros((len(times), n * (n + 1) // 2, uvd.Nfreqs, 4), np.complex128)
    weights = np.zeros(out.shape, np.float64)
    out[rows, baseline] = data
    weights[rows, baseline] = nsamples
    return out, weights


def test_files_starting_at_different_times_keep_their_times_as_pyuvdata_reads_them(
    tmp_path: Path,
) -> None:
    """The legacy files start a minute apart: each channel's data stay at their own time.

    pyuvdata (as Birli) puts the integrations on a regular grid from the first to the
    last, the slots a file does not cover empty and flagged; the conversion, phased to
    the pointing centre, must give the same times and (phased the same way) the same
    visibilities.
    """
    metafits = MWA_DATA / "1131733552.metafits"
    paths = [MWA_DATA / f for f in LEGACY_FILES]
    params = {k: v for k, v in RAW.items() if k != "no_geometric_delay"}
    options = ConversionOptions.from_params(
        {**params, "allow_missing": "true", "no_flag_dc": "true", "centre": "pointing"}
    )
    outputs = preprocess(metafits, paths, options, tmp_path / "legacy.uvfits")
    direct = UVData.from_file(
        [str(metafits), *map(str, paths)], file_type="mwa_corr_fits", **PYUVDATA_OFF
    )
    reader = open_reader(metafits, paths)
    assert reader.meta.pointing_radec_deg is not None
    ra_deg, dec_deg = reader.meta.pointing_radec_deg
    direct.phase(lon=np.radians(ra_deg), lat=np.radians(dec_deg), epoch="J2000", cat_name="p")
    names = list(reader.meta.antenna_names)
    theirs, their_weights = _as_cube(direct, names)
    for path in outputs:
        data, flags, uvd = cube(path, 128)
        # Channels 150-153, between the two with files, are there, empty and flagged.
        assert flags[:, :, 1:-1].all() and not np.any(data[:, :, 1:-1])
        data, flags = data[:, :, [0, -1]], flags[:, :, [0, -1]]
        # The same times: 121 integrations of 0.5 s from 18:25:37.25 to 18:26:37.25.
        np.testing.assert_allclose(
            np.unique(uvd.time_array), np.unique(direct.time_array), rtol=0, atol=1e-3 / 86400
        )
        assert data.shape == theirs.shape
        # Each channel has data at the times pyuvdata has them (channel 149, from the _01
        # file, only in the last integration; channel 153 only in the first) ...
        present = np.abs(data) > 0
        np.testing.assert_array_equal(present, np.abs(theirs) > 0)
        by_channel = present.any(axis=(1, 3))
        np.testing.assert_array_equal(np.flatnonzero(by_channel[:, 0]), [120])
        np.testing.assert_array_equal(np.flatnonzero(by_channel[:, 1]), [0])
        # ... and is flagged where the files hold none.
        assert flags[their_weights == 0].all()
        # Phased for their own time, the visibilities are pyuvdata's.
        np.testing.assert_allclose(data[present], theirs[present], rtol=1e-5)


def test_time_averaging_never_merges_integrations_a_minute_apart(tmp_path: Path) -> None:
    metafits = MWA_DATA / "1131733552.metafits"
    paths = [MWA_DATA / f for f in LEGACY_FILES]
    common = {**RAW, "allow_missing": "true", "no_flag_dc": "true"}
    (native,) = preprocess(
        metafits, paths, ConversionOptions.from_params(common), tmp_path / "n.uvfits"
    )
    (averaged,) = preprocess(
        metafits,
        paths,
        ConversionOptions.from_params({**common, "avg_time_res": 1}),
        tmp_path / "a.uvfits",
    )
    full, full_flags, full_uvd = cube(native, 128)
    data, flags, uvd = cube(averaged, 128)
    # The two channels with files (149 and 154; those between them are empty and flagged).
    full, full_flags = full[:, :, [0, -1]], full_flags[:, :, [0, -1]]
    data, flags = data[:, :, [0, -1]], flags[:, :, [0, -1]]
    # Pairs of 0.5 s integrations on the grid from the first: 121 padded to 122, 61 outputs,
    # each centred on its pair.
    times = np.unique(full_uvd.time_array)
    pairs = np.concatenate([times, [2 * times[-1] - times[-2]]]).reshape(61, 2).mean(axis=1)
    np.testing.assert_allclose(np.unique(uvd.time_array), pairs, rtol=0, atol=1e-3 / 86400)
    # Each channel's one integration is averaged with empty slots only: it comes out unchanged.
    present = np.abs(data) > 0
    np.testing.assert_array_equal(np.flatnonzero(present.any(axis=(1, 2, 3))), [0, 60])
    # (Samples flagged anyway, such as flagged tiles', keep the plain mean of their inputs.)
    first, last = ~full_flags[0, :, 1], ~full_flags[120, :, 0]
    assert first.any() and last.any()
    np.testing.assert_allclose(data[0, :, 1][first], full[0, :, 1][first], rtol=1e-6)
    np.testing.assert_allclose(data[60, :, 0][last], full[120, :, 0][last], rtol=1e-6)
    assert not flags[0, :, 1][first].any() and not flags[60, :, 0][last].any()
    assert flags[1:60].all() and flags[0, :, 0].all() and flags[60, :, 1].all()


def _keep_timesteps(path: Path, steps: list[int]) -> None:
    """Rewrite an MWAX file with only the given timesteps (a data and a weights HDU each)."""
    with fits.open(path) as hdus:
        kept = [hdus[0].copy()] + [h.copy() for i in steps for h in hdus[1 + 2 * i : 3 + 2 * i]]
    fits.HDUList(kept).writeto(path, overwrite=True)


def test_a_gap_in_the_data_is_flagged_and_the_rest_keeps_its_time(tmp_path: Path) -> None:
    """mwalib reads files that hold integrations 0 (channel 137) and 3 (channel 138) only."""
    single = simulate_observation(
        tmp_path / "sim", OBSID, n_tiles=N_TILES, coarse_chans=CHANS, n_timesteps=N_TIMES,
        sources=[SOURCE],
    )  # fmt: skip
    expected = np.stack(
        [
            np.concatenate(
                [predict_visibilities(single.truth, t, c, domain="uvdata") for c in CHANS],
                axis=1,
            )
            for t in range(N_TIMES)
        ]
    )
    _keep_timesteps(single.vis_paths[0], [0])
    _keep_timesteps(single.vis_paths[1], [3])
    (raw,) = convert(single, tmp_path / "raw.uvfits", **RAW)
    data, flags, uvd = cube(raw)
    assert uvd.Ntimes == N_TIMES
    np.testing.assert_allclose(
        np.unique(uvd.time_array),
        Time(single.truth.timestep_centres_gps(), format="gps").utc.jd,
        rtol=0,
        atol=1e-3 / 86400,
    )
    np.testing.assert_array_equal(data[0, :, :32], expected[0, :, :32])
    np.testing.assert_array_equal(data[3, :, 32:], expected[3, :, 32:])
    assert flags[1:3].all() and flags[0, :, 32:].all() and flags[3, :, :32].all()
    # Phased for the right times, the source sits at zero phase in both integrations.
    params = {
        **RAW, "no_cable_delay": "false", "no_geometric_delay": "false",
        "centre": "custom", "phase_centre_ra": SOURCE.ra_deg, "phase_centre_dec": SOURCE.dec_deg,
    }  # fmt: skip
    (phased,) = convert(single, tmp_path / "phased.uvfits", **params)
    data, _, _ = cube(phased)
    p, q = np.triu_indices(N_TILES)
    assert np.abs(np.angle(data[0, p != q, :32, 0])).max() < 1e-5
    assert np.abs(np.angle(data[3, p != q, 32:, 0])).max() < 1e-5


def test_time_grid_fills_gaps_and_refuses_times_off_the_grid() -> None:
    grid = regular_time_grid(np.array([100.0, 103.0, 101.0, 103.0]), 1.0)
    np.testing.assert_array_equal(grid, [100.0, 101.0, 102.0, 103.0])
    with pytest.raises(ReadError, match="not a whole number of 2 s integrations apart"):
        regular_time_grid(np.array([100.0, 103.0]), 2.0)


def test_memory_follows_the_chunk_size_not_the_band(tmp_path: Path) -> None:
    """Each finished chunk goes straight into its place in the outputs.

    Before, a block's coarse channels were all held in memory (later: on disk), the uvfits
    record of the whole band built at once, and a measurement set written from the whole
    output: the peak grew with the number of coarse channels (and the observation's length).
    """
    import tracemalloc

    n_tiles, n_chans, n_times = 16, 64, 8
    four_integrations = (n_tiles * (n_tiles + 1) // 2) * n_chans * 4 * 8 * 4
    options = ConversionOptions.from_params({**RAW, "output": "both"})
    peaks = {}
    for n_coarse in (2, 16):
        obs = simulate_observation(
            tmp_path / f"band{n_coarse}",
            OBSID,
            n_tiles=n_tiles,
            coarse_chans=tuple(range(131, 131 + n_coarse)),
            fine_chan_khz=1280 / n_chans,
            n_timesteps=n_times,
            sources=[SOURCE],
        )

        def convert_once(name: str, obs: SimulatedObservation = obs) -> Path:
            return preprocess(
                obs.metafits_path,
                obs.vis_paths,
                options,
                tmp_path / name,
                workers=1,
                chunk_bytes=four_integrations,
            )[0]  # fmt: skip (the uvfits; the measurement set is written beside it)

        first = convert_once(f"warm{n_coarse}")  # libraries load their tables once
        tracemalloc.start()
        try:
            second = convert_once(f"measured{n_coarse}")
            peaks[n_coarse] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert first.read_bytes() == second.read_bytes()
    band_block_bytes = 16 * four_integrations
    print({n: f"{peak / 2**20:.1f} MiB" for n, peak in peaks.items()})
    assert peaks[16] < 1.5 * peaks[2]
    assert peaks[16] < band_block_bytes


def chunks_out_of_order(n_times: int, n_chans: int) -> list[tuple[slice, slice]]:
    """Uneven chunks covering (n_times, n_chans) once, in a scrambled order (for the streams)."""
    time_edges = [0, 1, n_times - 2, n_times]
    chan_edges = [0, n_chans // 2 - 1, n_chans // 2 + 1, n_chans]
    chunks = [
        (slice(t0, t1), slice(c0, c1))
        for t0, t1 in itertools.pairwise(time_edges)
        for c0, c1 in itertools.pairwise(chan_edges)
    ]
    order = np.random.default_rng(3).permutation(len(chunks))
    return [chunks[i] for i in order]


def table_contents(path: Path) -> dict[str, dict[str, list[object]]]:
    """Every table of a measurement set: its keywords and every column's cells."""
    from casacore.tables import table

    contents = {}
    with table(str(path), ack=False) as main:
        names = ["", *(k for k, v in main.getkeywords().items() if str(v).startswith("Table: "))]
    for name in names:
        with table(str(path / name) if name else str(path), ack=False) as tab:
            keywords = {  # subtables are named by path: keep only their names
                key: value.replace(str(path), "") if isinstance(value, str) else value
                for key, value in tab.getkeywords().items()
            }
            columns: dict[str, list[object]] = {"keywords": [keywords]}
            for column in tab.colnames():
                columns[column] = [
                    tab.getcell(column, row) if tab.iscelldefined(column, row) else None
                    for row in range(tab.nrows())
                ]
            contents[name or "MAIN"] = columns
    return contents


@pytest.mark.parametrize(
    ("coarse_chans", "chans_per_window"),
    [((137, 138), (4, 4)), ((137, 140), (4, 4)), ((137, 140), (4, 3))],
    ids=["contiguous", "picket", "uneven-windows"],
)
def test_the_streamed_measurement_set_is_what_pyuvdata_writes(
    tmp_path: Path,
    coarse_chans: tuple[int, int],
    chans_per_window: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every table and column as pyuvdata's write_ms of the whole output, written in pieces.

    Windows as wide as each other (always so in the engine's outputs) make fixed-shape array
    columns; windows of different widths, arrays shaped row by row: the same contents."""
    from observatory.preprocess import measurement_set

    monkeypatch.setattr(measurement_set, "_ROWS_PER_PUT", 7)  # per-row columns in pieces too
    from observatory.preprocess.corrections import make_autos_hermitian
    from observatory.preprocess.measurement_set import MeasurementSetStream
    from observatory.preprocess.reader import read_metadata
    from observatory.preprocess.writer import OutputDescription, to_uvdata
    from observatory.telescope.instrument import fine_chan_freqs_hz

    obs = simulate_observation(tmp_path / "obs", OBSID, n_tiles=4, coarse_chans=coarse_chans,
                               fine_chan_khz=320, n_timesteps=2, sources=[SOURCE])  # fmt: skip
    meta = read_metadata(obs.metafits_path)
    n_times, n_bl, n_chans = 6, meta.n_baselines, sum(chans_per_window)
    freqs = np.concatenate([fine_chan_freqs_hz(c, 320_000)[:n]
                            for c, n in zip(coarse_chans, chans_per_window, strict=True)])  # fmt: skip
    description = OutputDescription(
        meta=meta, time_centres_gps_s=OBSID + 1.0 + 2.0 * np.arange(n_times), freqs_hz=freqs,
        channel_width_hz=320e3, int_time_s=2.0, phase_centre=("3C444", SOURCE.ra_deg, SOURCE.dec_deg),
        history="a history line", native_times=6, calibrated=False,
    )  # fmt: skip
    rng = np.random.default_rng(5)
    shape = (n_times, n_bl, n_chans, 4)
    vis = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    make_autos_hermitian(vis, meta)  # as the engine leaves them: pyuvdata checks
    weights = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
    flags = rng.uniform(size=shape) < 0.2
    weights[1, 2] = 0.0  # a baseline-time with no weight: SIGMA is 0 there (see below)
    flags[2, 3] = True  # a baseline-time all flagged: FLAG_ROW (below)
    reference_path = tmp_path / "reference.ms"
    to_uvdata(description, vis, weights, flags).write_ms(str(reference_path))
    streamed_path = tmp_path / "streamed.ms"
    # Chunks in an order of their own, each written in buffers of 5 rows.
    with MeasurementSetStream(
        streamed_path, description, buffer_bytes=5 * 4 * 4 * 21, chunk_chans=3
    ) as stream:  # tiles of 3 channels, not the chunks' widths: any tiling holds the same data
        for times, chans in chunks_out_of_order(n_times, n_chans):  # across both windows
            stream.write(times.start, chans.start, vis[times, :, chans], weights[times, :, chans],
                         flags[times, :, chans])  # fmt: skip
    ours, theirs = table_contents(streamed_path), table_contents(reference_path)
    # Birli's MWA tables and columns (cotter's), which write_ms does not write.
    pointing = ours.pop("MWA_TILE_POINTING")
    assert [d.tolist() for d in pointing["DELAYS"]] == [list(meta.beamformer_delays)]
    np.testing.assert_allclose(
        pointing["DIRECTION"][0], np.radians([SOURCE.ra_deg, SOURCE.dec_deg])
    )
    assert ours.pop("MWA_SUBBAND")["NUMBER"] == [0, 1]  # the output's coarse channels
    mwa_columns = {
        name: {c: ours[name].pop(c) for c in list(ours[name]) if c.startswith("MWA_")}
        for name in ("ANTENNA", "FIELD", "OBSERVATION", "SPECTRAL_WINDOW")
    }
    assert mwa_columns["ANTENNA"]["MWA_TILE_NR"] == list(meta.antenna_numbers)
    assert mwa_columns["OBSERVATION"]["MWA_GPS_TIME"] == [float(OBSID)]
    assert set(mwa_columns["SPECTRAL_WINDOW"]["MWA_CENTRE_SUBBAND_NR"]) == {coarse_chans[1]}
    for name in ("MWA_TILE_POINTING", "MWA_SUBBAND"):
        assert ours["MAIN"]["keywords"][0].pop(name) == f"Table: /{name}"
    assert ours.keys() == theirs.keys()
    # Times from the GPS seconds: integrations exactly 2 s apart, where write_ms's, from
    # float64 Julian dates, are up to 20 microseconds off.
    exact_s = Time(description.time_centres_gps_s, format="gps").utc
    exact_s = (exact_s.jd1 - 2400000.5) * 86400.0 + exact_s.jd2 * 86400.0
    for table_name, columns in (("MAIN", ("TIME", "TIME_CENTROID")),
                                ("POINTING", ("TIME", "TIME_ORIGIN"))):  # fmt: skip
        for column in columns:
            mine, reference = ours[table_name].pop(column), theirs[table_name].pop(column)
            np.testing.assert_allclose(mine, reference, rtol=0, atol=5e-5)
            assert set(mine) == set(exact_s), (table_name, column)
    # Each window's reference frequency is its centre, as Birli writes it; write_ms puts the
    # band's first channel in every window's row.
    windows = ours["SPECTRAL_WINDOW"]
    np.testing.assert_allclose(
        windows.pop("REF_FREQUENCY"), [np.median(chans) for chans in windows["CHAN_FREQ"]]
    )
    assert set(theirs["SPECTRAL_WINDOW"].pop("REF_FREQUENCY")) == {freqs[0]}
    # POINTING: where the tiles' fixed azimuth and elevation point at each integration (the
    # sky drifts by); write_ms writes the celestial pole, named ZENITH, everywhere.
    their_pointing = theirs["POINTING"]
    assert {tuple(d.ravel()) for d in their_pointing.pop("DIRECTION")} == {(0.0, np.pi / 2)}
    del their_pointing["TARGET"], their_pointing["NAME"]
    pointing_rows = ours["POINTING"]
    n_rows = len(pointing_rows["ANTENNA_ID"])
    assert pointing_rows.pop("NAME") == [meta.obs_name] * n_rows
    np.testing.assert_allclose(
        np.array(pointing_rows.pop("TARGET"))[:, 0, :],
        np.tile(np.radians(meta.pointing_radec_deg), (n_rows, 1)),
    )
    directions = np.array(pointing_rows.pop("DIRECTION"))
    # Cells shaped as FIELD's PHASE_DIR (polynomial term, RA/Dec): casacore's [2, NUM_POLY + 1].
    assert directions.shape[1:] == ours["FIELD"]["PHASE_DIR"][0].shape == (1, 2)
    directions_deg = np.degrees(directions[:, 0, :])
    row_times = np.repeat(description.time_centres_gps_s, n_rows // n_times)
    assert len(np.unique(directions_deg[:, 0])) == n_times  # the RA drifts
    az_deg, el_deg = azel_at(directions_deg[:, 0], directions_deg[:, 1], row_times)
    assert np.degrees(
        angular_separation(np.radians(az_deg), np.radians(el_deg),
                           *np.radians(meta.pointing_azel_deg))
    ).max() < 1 / 3600  # fmt: skip
    # FLAG_ROW where every sample of the row is flagged; write_ms leaves it false.
    all_flagged = [bool(np.all(cell)) for cell in ours["MAIN"]["FLAG"]]
    assert ours["MAIN"].pop("FLAG_ROW") == all_flagged and any(all_flagged)
    assert not any(theirs["MAIN"].pop("FLAG_ROW"))
    # The observation's span and project; write_ms leaves [0, 0] and "".
    observation = ours["OBSERVATION"]
    span = Time(OBSID + np.array([0.0, 2.0 * n_times]), format="gps").utc.mjd * 86400.0
    np.testing.assert_allclose(observation.pop("TIME_RANGE")[0], span, atol=1e-3)
    assert observation.pop("PROJECT") == [meta.project_id]
    assert theirs["OBSERVATION"].pop("PROJECT") == [""]
    assert not np.any(theirs["OBSERVATION"].pop("TIME_RANGE")[0])
    # Written at different moments; and pyuvdata leaves SIGMA uninitialised where WEIGHT is 0.
    for contents in (ours, theirs):
        contents["HISTORY"].pop("TIME")
        contents["HISTORY"]["MESSAGE"] = [
            re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+", "(written at)", str(message))
            for message in contents["HISTORY"]["MESSAGE"]
        ]
        main = contents["MAIN"]
        main["SIGMA"] = [
            np.where(w == 0, 0.0, s) for w, s in zip(main["WEIGHT"], main["SIGMA"], strict=True)
        ]
    for table_name, columns in theirs.items():
        assert ours[table_name].keys() == columns.keys(), table_name
        for column, cells in columns.items():
            assert len(ours[table_name][column]) == len(cells), (table_name, column)
            for row, (mine, reference) in enumerate(
                zip(ours[table_name][column], cells, strict=True)
            ):
                if isinstance(reference, np.ndarray):
                    np.testing.assert_array_equal(
                        mine, reference, err_msg=f"{table_name}.{column}[{row}]"
                    )
                else:
                    assert repr(mine) == repr(reference), (table_name, column, row)
    assert any((w == 0).all() for w in ours["MAIN"]["WEIGHT"])
    assert len(ours["SPECTRAL_WINDOW"]["NUM_CHAN"]) == (1 if coarse_chans == (137, 138) else 2)
    from casacore.tables import table

    with table(str(streamed_path), ack=False) as main:
        fixed = chans_per_window[0] == chans_per_window[1]
        for column in ("DATA", "FLAG", "WEIGHT_SPECTRUM", "WEIGHT", "SIGMA"):
            assert main.isvarcol(column) != fixed, column


def stream_description(tmp_path: Path) -> tuple[object, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A small output's description and its data (6 integrations, 8 channels)."""
    from observatory.preprocess.reader import read_metadata
    from observatory.preprocess.writer import OutputDescription
    from observatory.telescope.instrument import fine_chan_freqs_hz

    obs = simulate_observation(tmp_path / "obs", OBSID, n_tiles=4, coarse_chans=(137, 138),
                               fine_chan_khz=320, n_timesteps=2, sources=[SOURCE])  # fmt: skip
    meta = read_metadata(obs.metafits_path)
    freqs = np.concatenate([fine_chan_freqs_hz(c, 320_000) for c in (137, 138)])
    description = OutputDescription(
        meta=meta, time_centres_gps_s=OBSID + 1.0 + 2.0 * np.arange(6), freqs_hz=freqs,
        channel_width_hz=320e3, int_time_s=2.0, phase_centre=("3C444", SOURCE.ra_deg, SOURCE.dec_deg),
        history="a history line", native_times=6, calibrated=False,
    )  # fmt: skip
    rng = np.random.default_rng(6)
    shape = (6, meta.n_baselines, 8, 4)
    vis = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    weights = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
    return description, (vis, weights, rng.uniform(size=shape) < 0.2)


def test_the_uvfits_stream_takes_chunks_in_any_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks written in a scrambled order, into mappings of a few groups, give the bytes of
    the whole output written at once; pyuvdata reads the data back."""
    from observatory.preprocess.uvfits import UvfitsGroups, UvfitsStream

    description, (vis, weights, flags) = stream_description(tmp_path)
    with UvfitsStream(tmp_path / "whole.uvfits", description) as stream:
        stream.write(0, 0, vis, weights, flags)
    group_bytes = (16 + 8 * 4 * 3) * 4
    mapped_groups: list[int] = []
    original = UvfitsGroups.mapped

    def recording(self: UvfitsGroups, start: int, stop: int) -> object:
        mapped_groups.append(stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(UvfitsGroups, "mapped", recording)
    with UvfitsStream(
        tmp_path / "chunks.uvfits", description, buffer_bytes=5 * group_bytes
    ) as stream:
        for times, chans in chunks_out_of_order(6, 8):
            stream.write(times.start, chans.start, vis[times, :, chans], weights[times, :, chans],
                         flags[times, :, chans])  # fmt: skip
    # Parameters and data alike: no more of the file mapped at a time than buffer_bytes.
    assert mapped_groups and max(mapped_groups) == 5
    assert (tmp_path / "chunks.uvfits").read_bytes() == (tmp_path / "whole.uvfits").read_bytes()
    uvd = UVData.from_file(str(tmp_path / "chunks.uvfits"))
    assert uvd.Ntimes == 6 and uvd.Nfreqs == 8
    assert np.count_nonzero(uvd.flag_array) == np.count_nonzero(flags)


@pytest.mark.parametrize("stream_class", ["UvfitsStream", "MeasurementSetStream"])
def test_a_stream_refuses_a_chunk_twice_or_outside_and_publishes_nothing_incomplete(
    tmp_path: Path, stream_class: str
) -> None:
    from observatory.preprocess import measurement_set, uvfits

    stream_type = getattr(uvfits, stream_class, None) or getattr(measurement_set, stream_class)
    description, (vis, weights, flags) = stream_description(tmp_path)
    out = tmp_path / "out" / "o.data"
    twice = "integrations 0-1, channels 0-3 were written already"
    with pytest.raises(ValueError, match=twice), stream_type(out, description) as stream:
        stream.write(0, 0, vis[:2, :, :4], weights[:2, :, :4], flags[:2, :, :4])
        stream.write(0, 0, vis[:2, :, :4], weights[:2, :, :4], flags[:2, :, :4])
    outside = (
        "integrations 5-6, channels 0-7 are outside the output's 6 integrations and 8 channels"
    )
    with pytest.raises(ValueError, match=outside), stream_type(out, description) as stream:
        stream.write(5, 0, vis[:2], weights[:2], flags[:2])
    missing = re.escape("16 of 48 (integration, channel) cells were not written")
    with pytest.raises(RuntimeError, match=missing), stream_type(out, description) as stream:
        stream.write(0, 0, vis[:4], weights[:4], flags[:4])
    assert list(out.parent.iterdir()) == []


def test_a_failure_while_a_measurement_set_starts_leaves_nothing(
    sim: SimulatedObservation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adding a large set's rows takes a while (a stop signal may land there): its table
    is closed and its directory removed. Left open, casacore aborted the process later,
    when the table was destroyed after its files."""
    import gc

    from observatory.preprocess.measurement_set import MeasurementSetStream

    def interrupted(self: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(MeasurementSetStream, "_add_rows", interrupted)
    out_dir = tmp_path / "out"
    out_dir.mkdir()  # an output directory is not made
    with pytest.raises(KeyboardInterrupt):
        convert(sim, out_dir / "o.ms", **RAW, output="both")
    gc.collect()  # where the abort came (the process would end here)
    assert list(out_dir.iterdir()) == []


def test_a_measurement_set_the_disk_cannot_hold_is_refused_at_the_start(
    sim: SimulatedObservation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """casacore aborts the process on a full disk (a C++ terminate, nothing to catch): the
    free space is checked before the set is made."""
    import os
    from types import SimpleNamespace

    real_statvfs = os.statvfs
    free_bytes = 10 * real_statvfs(tmp_path).f_frsize
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(
        f_bavail=free_bytes // real_statvfs(path).f_frsize, f_frsize=real_statvfs(path).f_frsize))  # fmt: skip
    out_dir = tmp_path / "out"
    out_dir.mkdir()  # an output directory is not made
    with pytest.raises(OSError, match=r"cannot write .*o\.ms: it needs about 4\.\d MB and "
                       r"\d+\.\d kB are free \(No space left on device\)"):  # fmt: skip
        convert(sim, out_dir / "o.ms", **RAW, output="ms")
    assert list(out_dir.iterdir()) == []
    # Room for its rows but not its subtables and table files (1.2 MB more for a small
    # set): refused too; such a set was started, and casacore aborted the process.
    free_bytes = 2_000_000
    with pytest.raises(OSError, match="No space left on device"):
        convert(sim, out_dir / "o.ms", **RAW, output="ms")
    assert list(out_dir.iterdir()) == []


def test_a_full_disk_fails_at_the_start_naming_what_the_output_needs(
    sim: SimulatedObservation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The uvfits is reserved on disk before any work: no chunk is processed for nothing,
    and no write through the file's mapping can meet a full disk."""
    import errno
    import os

    from observatory.preprocess import engine

    def full_disk(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    processed: list[int] = []
    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    monkeypatch.setattr(engine, "_process", lambda *args: processed.append(1))
    out_dir = tmp_path / "out"
    out_dir.mkdir()  # an output directory is not made
    with pytest.raises(OSError, match=r"cannot write .*o\.uvfits: it needs 0\.\d\d GB "
                       r"\(No space left on device\)"):  # fmt: skip
        convert(sim, out_dir / "o.uvfits", **RAW)
    assert processed == [] and list(out_dir.iterdir()) == []


def test_default_workers_fit_a_dask_workers_memory(tmp_path: Path) -> None:
    """One per CPU, unless the memory (here a Dask worker's limit, shared by its 2 threads)
    holds fewer: the conversion that took a 4 GiB worker past its limit. A command the
    task starts (a conversion, a calibrator's solve) keeps to the task's share of memory
    and CPUs too: its memory is its own process's, which the worker neither counts nor
    limits, and each of a worker's tasks forked a worker per CPU of the node."""
    import os
    import sys

    from distributed import Client, LocalCluster

    from observatory.core.processes import cpu_share, memory_limit_bytes, run_command
    from observatory.preprocess.engine import PROCESS_BASE_BYTES, default_workers

    def command_share() -> list[int]:
        probe = (
            "from observatory.core.processes import cpu_share, memory_limit_bytes\n"
            "print(memory_limit_bytes(), cpu_share())"
        )
        printed = run_command([sys.executable, "-c", probe], cwd=tmp_path, what="probe")
        return [int(n) for n in printed.split()]

    rfi_chunk = 256 * 2**20
    cpus = cpu_share()  # outside Dask: the CPUs this process may run on
    assert cpus == len(os.sched_getaffinity(0))
    if memory_limit_bytes() > cpus * 2 * rfi_chunk + PROCESS_BASE_BYTES:
        assert default_workers(rfi_chunk) == cpus  # memory enough for one per CPU
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, memory_limit="2GiB",
            dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        ) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        share = client.submit(memory_limit_bytes, pure=False).result(timeout=30)
        inside = client.submit(default_workers, rfi_chunk, pure=False).result(timeout=30)
        cpus_inside = client.submit(cpu_share, pure=False).result(timeout=30)
        started = client.submit(command_share, pure=False).result(timeout=60)
    assert share == 2 * 2**30 // 2
    assert cpus_inside == max(1, cpus // 2)  # the worker's 2 threads share the CPUs
    assert started == [share, cpus_inside]
    assert inside == max(1, (share - PROCESS_BASE_BYTES) // (2 * rfi_chunk)) == 1


@pytest.mark.parametrize("output", ["uvfits", "ms", "both"])
def test_a_failure_while_finishing_publishes_nothing(
    sim: SimulatedObservation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    """The last tables written after the data (a full disk, a stop signal there) fail the run
    and leave no half-written output at the target."""
    from pyuvdata.utils.io import ms as ms_utils

    from observatory.preprocess.uvfits import UvfitsStream

    def full_disk(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    if output == "ms":
        monkeypatch.setattr(ms_utils, "write_ms_source", full_disk)
    else:
        monkeypatch.setattr(UvfitsStream, "_write_tables", full_disk)
    out_dir = tmp_path / "out"
    out_dir.mkdir()  # an output directory is not made
    with pytest.raises(OSError, match="No space left"):
        convert(sim, out_dir / f"o.{output}", **RAW, output=output)
    assert list(out_dir.iterdir()) == []


def test_converting_again_replaces_a_measurement_set(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    (first,) = convert(sim, tmp_path / "again.ms", **RAW, output="ms")
    (first / "stale-file").write_text("from an older run")
    (second,) = convert(sim, tmp_path / "again.ms", **RAW, avg_time_res=4, output="ms")
    assert second == first and not (second / "stale-file").exists()
    assert UVData.from_file(str(second), ignore_single_chan=False).Ntimes == N_TIMES // 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.ms"]


def test_leftovers_of_killed_runs_are_removed_and_nothing_else(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    """kill -9 leaves temporaries beside the output: the next run on this host removes those
    whose process is gone, never a live run's or another host's."""
    import os
    import socket
    import subprocess

    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped by Popen itself (its pid is then free, no process of ours)
    dead_pid = finished.pid
    host = socket.gethostname()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dead = [out_dir / f".o.uvfits.tmp-{host}-{dead_pid}-0badc0de",
            out_dir / f".o.uvfits.scratch-{host}-{dead_pid}-k3x_9zq1"]  # fmt: skip
    kept = [out_dir / f".o.uvfits.tmp-{host}-{os.getpid()}-11ve0000",
            out_dir / f".o.uvfits.tmp-another-node-{dead_pid}-0badc0de",
            out_dir / "notes.txt"]  # fmt: skip
    dead[0].write_bytes(b"half a uvfits")
    (dead[1] / "0-0").parent.mkdir()
    (dead[1] / "0-0").write_bytes(b"a chunk")
    for path in kept:
        path.write_bytes(b"keep")
    convert(sim, out_dir / "o.uvfits", **RAW)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["o.uvfits", *(p.name for p in kept)]
    )


@pytest.mark.parametrize("applied", KINDS)
def test_data_the_correlator_phased_are_phased_from_where_it_left_them(
    sim: SimulatedObservation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, applied: str
) -> None:
    """Metafits GEODEL: the correlator phased the data already. They were phased a second
    time; now they are phased from the correlator's direction to the phase centre, so the
    output is what the same data unphased give."""
    from observatory.preprocess import engine

    expected, _, _ = cube(convert(sim, tmp_path / "unphased.uvfits", no_rfi="true")[0])
    monkeypatch.setattr(
        engine, "open_reader", phased_by_the_correlator(engine.open_reader, applied)
    )
    got, _, _ = cube(convert(sim, tmp_path / "phased.uvfits", no_rfi="true")[0])
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=1e-5 * scale)


def test_uvfits_baseline_parameter_names_each_pair_as_birli_does(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    """``BASELINE`` is ``256 a1 + a2`` (1-based), and MIRIAD's ``2048 a1 + a2 + 65536`` once
    ``a2`` is over 255: the MWA's 256 tiles made ``256 a1 + 256`` the next tile's autocorrelation.
    Its antennas are looked up in the AN table's NOSTA (hyperdrive's reading): NOSTA from 0
    gave every baseline the next tiles (and the last tile none)."""
    from observatory.preprocess.uvfits import uvfits_baselines

    (out,) = convert(sim, tmp_path / "b.uvfits", **RAW)
    with fits.open(out) as hdus:
        groups, antennas = hdus[0].data, hdus["AIPS AN"].data
        row_of = {int(number): row for row, number in enumerate(antennas["NOSTA"])}
        baselines = np.asarray(groups.par("BASELINE"), np.int64)
        first, second = baselines // 256, baselines % 256  # fewer than 256 tiles here
        p, q = np.triu_indices(N_TILES)  # each integration's baselines, in this order
        n_times = len(baselines) // len(p)
        np.testing.assert_array_equal([row_of[a] for a in first], np.tile(p, n_times))
        np.testing.assert_array_equal([row_of[a] for a in second], np.tile(q, n_times))
        np.testing.assert_array_equal(groups.par("ANTENNA1"), first)  # the same numbers
        np.testing.assert_array_equal(groups.par("ANTENNA2"), second)
        assert list(antennas["ANNAME"]) == [tile.tile_name for tile in sim.truth.tiles]
    p, q = np.triu_indices(256)  # every pair of a 256-tile array
    encoded = uvfits_baselines(p, q)
    assert len(np.unique(encoded)) == len(encoded) and encoded.max() < 2**24
    small = q < 255
    np.testing.assert_array_equal(encoded[small], 256 * (p[small] + 1) + q[small] + 1)
    decoded_second = np.where(encoded > 65_535, (encoded - 65_536) % 2048, encoded % 256)
    decoded_first = np.where(encoded > 65_535, (encoded - 65_536) // 2048, encoded // 256)
    np.testing.assert_array_equal(decoded_first, p + 1)
    np.testing.assert_array_equal(decoded_second, q + 1)
