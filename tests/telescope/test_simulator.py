"""Simulated observations: read back by mwalib and pyuvdata, compared with the injected truth."""

from __future__ import annotations

import json
import math
import threading
import warnings
from pathlib import Path

import mwalib
import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time

from observatory.telescope import simulator
from observatory.telescope.instrument import VCS_BLOCKS_PER_SUBOBS
from observatory.telescope.simulator import (
    PointSource,
    SimulatedObservation,
    SimulationCancelled,
    load_truth,
    predict_visibilities,
    simulate_observation,
)
from observatory.telescope.site import mwa_location
from shared_data import CALIB_DATA, MWA_DATA

OBSID = 1320409688  # a real MWAX obsid (2021-11-08): IERS data cover it
C_M_S = 299_792_458.0
SOURCES = (
    PointSource(333.6069, -17.0288, 60.0, -0.8, "3C444"),
    PointSource(336.0, -21.0, 12.0, -0.6, "B"),
)
# pyuvdata orders pols XX, YY, XY, YX; MWAX (and predict_visibilities) XX, XY, YX, YY.
UVDATA_POLS_IN_MWAX_ORDER = [0, 3, 1, 2]
CORRECTIONS_OFF = {
    "remove_dig_gains": False,
    "remove_coarse_band": False,
    "correct_cable_len": False,
    "correct_van_vleck": False,
    "flag_init": False,
    "remove_flagged_ants": False,
    "data_array_dtype": np.complex64,
}


def read_uvdata(sim: SimulatedObservation, **kwargs: object):
    from pyuvdata import UVData

    files = [str(sim.metafits_path), *map(str, sim.vis_paths)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyuvdata's notes on DERIPPLE, missing channels...
        return UVData.from_file(files, file_type="mwa_corr_fits", **kwargs)


def correlator_context(sim: SimulatedObservation) -> mwalib.CorrelatorContext:
    return mwalib.CorrelatorContext(str(sim.metafits_path), [str(p) for p in sim.vis_paths])


def complex_mwalib(context: mwalib.CorrelatorContext, t: int, cc: int) -> np.ndarray:
    data = context.read_by_baseline(t, cc).reshape(context.metafits_context.num_baselines, -1, 4, 2)
    return data[..., 0] + 1j * data[..., 1]


@pytest.fixture(scope="module")
def sim8(tmp_path_factory: pytest.TempPathFactory) -> SimulatedObservation:
    """8 tiles x 2 coarse channels x 3 integrations, gains, delays and a flagged tile."""
    rng = np.random.default_rng(7)
    return simulate_observation(
        tmp_path_factory.mktemp("sim8"),
        OBSID,
        n_tiles=8,
        coarse_chans=[137, 138],
        fine_chan_khz=160,
        int_time_s=2.0,
        n_timesteps=3,
        sources=SOURCES,
        gain_amplitudes=rng.uniform(0.5, 1.5, (8, 2, 2)),
        delay_errors_ns=rng.normal(0.0, 5.0, (8, 2)),
        flagged_antennas=[3],
        calibrator="3C444",
        seed=11,
    )


@pytest.fixture(scope="module")
def sim2(tmp_path_factory: pytest.TempPathFactory) -> SimulatedObservation:
    """The smallest correlator observation: 2 tiles, 1 coarse channel, 1 integration."""
    return simulate_observation(
        tmp_path_factory.mktemp("sim2"),
        OBSID,
        n_tiles=2,
        coarse_chans=[121],
        fine_chan_khz=640,
        int_time_s=0.5,
        n_timesteps=1,
        sources=SOURCES[:1],
        noise_sigma_jy=0.5,
    )


# --------------------------------------------------------------------------------------------
# mwalib


@pytest.mark.parametrize("name", ["sim2", "sim8"])
def test_mwalib_opens_simulated_files(name: str, request: pytest.FixtureRequest) -> None:
    sim: SimulatedObservation = request.getfixturevalue(name)
    truth = sim.truth
    meta = mwalib.MetafitsContext(str(sim.metafits_path))
    assert meta.obs_id == OBSID
    assert meta.num_ants == truth.n_tiles
    assert meta.num_baselines == truth.n_tiles * (truth.n_tiles + 1) // 2
    assert [c.rec_chan_number for c in meta.metafits_coarse_chans] == list(truth.coarse_chans)
    assert meta.corr_fine_chan_width_hz == truth.fine_chan_width_hz
    assert meta.corr_int_time_ms == round(truth.int_time_s * 1000)
    assert [a.tile_id for a in meta.antennas] == [t.tile_id for t in truth.tiles]

    context = correlator_context(sim)
    assert context.mwa_version == mwalib.MWAVersion.CorrMWAXv2
    assert [c.rec_chan_number for c in context.coarse_chans] == list(truth.coarse_chans)
    assert context.provided_coarse_chan_indices == list(range(len(truth.coarse_chans)))
    expected_ms = [
        OBSID * 1000 + round(t * truth.int_time_s * 1000) for t in range(truth.n_timesteps)
    ]
    assert [
        context.timesteps[i].gps_time_ms for i in context.common_timestep_indices
    ] == expected_ms
    assert context.common_good_timestep_indices == context.common_timestep_indices
    for cc, chan in enumerate(truth.coarse_chans):
        np.testing.assert_array_equal(
            context.get_fine_chan_freqs_hz_array([cc]), truth.fine_chan_freqs_hz(chan)
        )


def test_mwalib_data_equal_prediction(sim8: SimulatedObservation) -> None:
    context = correlator_context(sim8)
    gps_ms = [step.gps_time_ms for step in context.timesteps]
    for t in range(sim8.truth.n_timesteps):
        index = gps_ms.index(OBSID * 1000 + 2000 * t)
        for cc, chan in enumerate(sim8.truth.coarse_chans):
            data = complex_mwalib(context, index, cc)
            np.testing.assert_array_equal(data, predict_visibilities(sim8.truth, t, chan))


def independent_visibility(
    meta: mwalib.MetafitsContext,
    sim: SimulatedObservation,
    p: int,
    q: int,
    timestep: int,
    coarse_index: int,
    freqs_hz: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """XX and YY of baseline (p, q) from the documented convention, by astropy alone."""
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord
    from astropy.time import Time

    truth = sim.truth
    site = mwa_location()
    centre = Time(OBSID + (timestep + 0.5) * truth.int_time_s, format="gps")
    ant_p, ant_q = meta.antennas[p], meta.antennas[q]
    baseline_m = np.array(
        [
            ant_p.east_m - ant_q.east_m,
            ant_p.north_m - ant_q.north_m,
            ant_p.height_m - ant_q.height_m,
        ]
    )
    model = np.zeros(len(freqs_hz), dtype=complex)
    for source in truth.sources:
        altaz = SkyCoord(source.ra_deg * u.deg, source.dec_deg * u.deg).transform_to(
            AltAz(obstime=centre, location=site)
        )
        alt, az = altaz.alt.rad, altaz.az.rad
        towards = np.array([np.cos(alt) * np.sin(az), np.cos(alt) * np.cos(az), np.sin(alt)])
        # tau_p - tau_q = -(x_p - x_q) . s / c
        geometric_s = -(baseline_m @ towards) / C_M_S
        model += source.flux_jy(freqs_hz) * np.exp(-2j * np.pi * freqs_hz * geometric_s)
    cable_s = (ant_p.electrical_length_m - ant_q.electrical_length_m) / C_M_S
    model *= np.exp(-2j * np.pi * freqs_hz * cable_s)
    result = []
    for pol in (0, 1):
        amplitude = truth.gain_amplitudes[[p, q], pol, coarse_index]
        delay_s = (truth.delay_errors_ns[p, pol] - truth.delay_errors_ns[q, pol]) * 1e-9
        result.append(amplitude.prod() * np.exp(-2j * np.pi * freqs_hz * delay_s) * model)
    return result[0], result[1]


@pytest.mark.parametrize(("p", "q", "timestep", "coarse_index"), [(0, 5, 1, 0), (2, 7, 2, 1)])
def test_mwalib_data_match_independent_model(
    sim8: SimulatedObservation, p: int, q: int, timestep: int, coarse_index: int
) -> None:
    context = correlator_context(sim8)
    meta = context.metafits_context
    row = [(b.ant1_index, b.ant2_index) for b in meta.baselines].index((p, q))
    freqs_hz = np.asarray(context.get_fine_chan_freqs_hz_array([coarse_index]))
    expected_xx, expected_yy = independent_visibility(
        meta, sim8, p, q, timestep, coarse_index, freqs_hz
    )
    data = complex_mwalib(context, timestep, coarse_index)[row]
    scale = np.abs(expected_xx).max()
    np.testing.assert_allclose(data[:, 0], expected_xx, rtol=0, atol=2e-5 * scale)
    np.testing.assert_allclose(data[:, 3], expected_yy, rtol=0, atol=2e-5 * scale)
    np.testing.assert_array_equal(data[:, 1:3], 0)  # unpolarised, no noise


def test_autocorrelations_are_hermitian(sim2: SimulatedObservation) -> None:
    context = correlator_context(sim2)
    data = complex_mwalib(context, 0, 0)
    autos = data[[0, 2]]  # baselines (0,0) and (1,1)
    assert np.all(autos[:, :, [0, 3]].imag == 0)
    np.testing.assert_array_equal(autos[:, :, 2], np.conj(autos[:, :, 1]))


# --------------------------------------------------------------------------------------------
# pyuvdata


def test_pyuvdata_reads_simulated_files_with_corrections_off(sim8: SimulatedObservation) -> None:
    truth = sim8.truth
    uvd = read_uvdata(sim8, **CORRECTIONS_OFF)
    assert uvd.Ntimes == truth.n_timesteps
    assert uvd.Nbls == 36
    assert list(uvd.telescope.antenna_numbers) == [t.tile_id for t in truth.tiles]
    np.testing.assert_allclose(
        uvd.freq_array, np.concatenate([truth.fine_chan_freqs_hz(c) for c in truth.coarse_chans])
    )
    data = uvd.data_array.reshape(truth.n_timesteps, uvd.Nbls, uvd.Nfreqs, 4)
    for t in range(truth.n_timesteps):
        expected = np.concatenate(
            [predict_visibilities(truth, t, c, domain="uvdata") for c in truth.coarse_chans],
            axis=1,
        )[:, :, UVDATA_POLS_IN_MWAX_ORDER]
        # Both are the stored float32 values (conjugated): equal, not just close.
        np.testing.assert_array_equal(data[t], expected)


def test_pyuvdata_cable_correction_removes_cable_phase(sim8: SimulatedObservation) -> None:
    truth = sim8.truth
    uvd = read_uvdata(sim8, **{**CORRECTIONS_OFF, "correct_cable_len": True})
    data = uvd.data_array.reshape(truth.n_timesteps, uvd.Nbls, uvd.Nfreqs, 4)
    expected = predict_visibilities(truth, 1, 137, domain="uvdata", include_cable=False)
    expected = expected[:, :, UVDATA_POLS_IN_MWAX_ORDER]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(data[1, :, :8], expected, rtol=0, atol=1e-6 * scale)
    # ... and the cable phase was there to remove.
    with_cable = predict_visibilities(truth, 1, 137, domain="uvdata")[:, :, 0]
    assert np.abs(with_cable - expected[:, :, 0]).max() > 0.1 * scale


def test_phasing_to_the_source_with_pyuvdata_gives_real_visibilities(tmp_path: Path) -> None:
    """Physics check: pyuvdata's own geometry must see the source where we put it."""
    sim = simulate_observation(
        tmp_path,
        OBSID,
        n_tiles=16,
        coarse_chans=[137],
        fine_chan_khz=40,
        n_timesteps=1,
        sources=SOURCES[:1],
    )
    uvd = read_uvdata(sim)  # pyuvdata's defaults, cable correction included
    flipped = uvd.copy()
    flipped.data_array = np.conj(flipped.data_array)  # the opposite sign convention
    cross = uvd.ant_1_array != uvd.ant_2_array
    for data in (uvd, flipped):
        data.phase(
            lon=np.radians(333.6069), lat=np.radians(-17.0288), cat_name="3C444", phase_frame="icrs"
        )
    xx_yy = uvd.data_array[cross][:, :, :2]
    assert np.abs(np.angle(xx_yy)).max() < 2e-3  # radians
    np.testing.assert_allclose(
        np.abs(xx_yy[:, :, 0]),
        np.broadcast_to(SOURCES[0].flux_jy(uvd.freq_array), xx_yy.shape[:2]),
        rtol=1e-5,
    )
    # The opposite convention would leave the fringes in.
    assert np.abs(np.angle(flipped.data_array[cross][:, :, :2])).max() > 1.0


def test_tiny_observation_reads_in_pyuvdata(sim2: SimulatedObservation) -> None:
    uvd = read_uvdata(sim2, **CORRECTIONS_OFF)
    assert (uvd.Nbls, uvd.Ntimes, uvd.Nfreqs, uvd.telescope.Nants) == (3, 1, 2, 2)
    expected = predict_visibilities(sim2.truth, 0, 121, domain="uvdata", include_noise=True)
    np.testing.assert_array_equal(uvd.data_array, expected[:, :, UVDATA_POLS_IN_MWAX_ORDER])


# --------------------------------------------------------------------------------------------
# Flags, noise, truth


def test_flagged_tile_is_flagged_in_both_readers(sim8: SimulatedObservation) -> None:
    flagged_tile = sim8.truth.tiles[3]
    meta = mwalib.MetafitsContext(str(sim8.metafits_path))
    assert {r.ant for r in meta.rf_inputs if r.flagged} == {3}
    context = correlator_context(sim8)
    baselines = [(b.ant1_index, b.ant2_index) for b in meta.baselines]
    with_3 = np.array([3 in b for b in baselines])
    # As in real MWAX files (1320409688 flags tile 49 in its metafits): the correlator's
    # weights do not know the metafits' flags.
    weights = context.read_weights_by_baseline(0, 0).reshape(len(baselines), 4)
    assert np.all(weights == 1)
    # A dead tile: without noise (sim8 has none) its baselines hold nothing of the sky.
    data = complex_mwalib(context, 0, 0)
    assert np.all(data[with_3] == 0) and np.all(np.abs(data[~with_3][:, :, [0, 3]]) > 0)

    uvd = read_uvdata(sim8, **CORRECTIONS_OFF)
    involved = (uvd.ant_1_array == flagged_tile.tile_id) | (uvd.ant_2_array == flagged_tile.tile_id)
    assert uvd.flag_array[involved].all() and not uvd.flag_array[~involved].any()


def test_a_dead_tile_picks_up_no_interference(tmp_path: Path) -> None:
    """The RFI of every baseline reached the dead (flagged) tile's at full amplitude."""
    burst = simulator.RfiBurst(coarse_chan=140, fine_chans=(2, 4), timesteps=(0, 1),
                               amplitude_jy=100.0)  # fmt: skip
    sim = simulate_observation(tmp_path, OBSID, n_tiles=4, coarse_chans=[140], fine_chan_khz=160,
                               n_timesteps=1, flagged_antennas=[2], rfi=[burst])  # fmt: skip
    vis = predict_visibilities(sim.truth, 0, 140)
    p, q = np.triu_indices(4)
    dead = (p == 2) | (q == 2)
    assert np.all(vis[dead] == 0)
    assert np.allclose(np.abs(vis[~dead & (p != q)][:, 2:4, 0]), 100.0)


def test_noise_has_the_requested_sigma_and_is_reproducible(tmp_path: Path) -> None:
    kwargs = {"n_tiles": 16, "coarse_chans": [140], "fine_chan_khz": 40, "n_timesteps": 1}
    sim = simulate_observation(tmp_path / "a", OBSID, noise_sigma_jy=2.0, seed=5, **kwargs)
    context = correlator_context(sim)
    data = complex_mwalib(context, 0, 0)
    clean = predict_visibilities(sim.truth, 0, 140)
    cross = np.array([b.ant1_index != b.ant2_index for b in context.metafits_context.baselines])
    residual = (data - clean)[cross]
    assert np.std(residual.real) == pytest.approx(2.0, rel=0.05)
    assert np.std(residual.imag) == pytest.approx(2.0, rel=0.05)
    assert abs(np.mean(residual)) < 0.05
    np.testing.assert_array_equal(data, predict_visibilities(sim.truth, 0, 140, include_noise=True))
    same = simulate_observation(tmp_path / "b", OBSID, noise_sigma_jy=2.0, seed=5, **kwargs)
    other = simulate_observation(tmp_path / "c", OBSID, noise_sigma_jy=2.0, seed=6, **kwargs)
    assert same.vis_paths[0].read_bytes() == sim.vis_paths[0].read_bytes()
    assert other.vis_paths[0].read_bytes() != sim.vis_paths[0].read_bytes()


def test_autocorrelations_hold_the_noise_power_as_the_radiometer_equation_says(
    tmp_path: Path,
) -> None:
    """Real MWAX autocorrelations are positive (system temperature); ours were noise about 0."""
    amplitudes = np.linspace(0.5, 1.5, 8 * 2).reshape(8, 2, 1)
    sim = simulate_observation(tmp_path, OBSID, n_tiles=8, coarse_chans=[140], fine_chan_khz=40,
                               int_time_s=2.0, n_timesteps=1, noise_sigma_jy=2.0, seed=3,
                               sources=SOURCES, gain_amplitudes=amplitudes,
                               flagged_antennas=[6])  # fmt: skip
    sefd_jy = 2.0 * math.sqrt(2 * 40e3 * 2.0)  # sigma sqrt(2 bandwidth t): 800 Jy
    assert sim.truth.system_sefd_jy == pytest.approx(sefd_jy)
    context = correlator_context(sim)
    data = complex_mwalib(context, 0, 0)
    clean = predict_visibilities(sim.truth, 0, 140)
    autos = [
        i for i, b in enumerate(context.metafits_context.baselines) if b.ant1_index == b.ant2_index
    ]
    excess = (data - clean)[autos][:, :, [0, 3]]  # (antenna, fine channel, XX/YY)
    assert np.all(excess.imag == 0)
    expected_power = amplitudes[:, :, 0] ** 2 * sefd_jy  # the dead tile 6 too: its receiver
    np.testing.assert_allclose(excess.real.mean(axis=1), expected_power, atol=4 * 2.0)
    # The noise is the receivers', before the gains: an autocorrelation's is sqrt(2) times a
    # baseline's, both scaled by the tiles' gains as the sky is (it was the same everywhere).
    residual = (excess.real - expected_power[:, None, :]) / amplitudes[:, None, :, 0] ** 2
    assert np.std(residual) == pytest.approx(2.0 * math.sqrt(2), rel=0.15)
    p, q = np.triu_indices(8)
    cross = (data - clean)[p != q][:, :, [0, 3]] / (
        amplitudes[p[p != q], None, :, 0] * amplitudes[q[p != q], None, :, 0]
    )
    assert np.std(cross.real) == pytest.approx(2.0, rel=0.1)
    gain_products = amplitudes[p[p != q], 0, 0] * amplitudes[q[p != q], 0, 0]
    spread = np.std((data - clean)[p != q][:, :, 0].real, axis=1)
    assert np.corrcoef(gain_products, spread)[0, 1] > 0.9
    assert np.all(data[autos][:, :, [0, 3]].real > 0)
    np.testing.assert_array_equal(data, predict_visibilities(sim.truth, 0, 140, include_noise=True))


def test_a_full_band_metafits_is_written_without_warnings(tmp_path: Path) -> None:
    """CHANSEL of 24 channels cuts its comment as the MWA's own metafits do ("/ Indi"): astropy
    warned of it at each observation the telescope recorded, in the server's log."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sim = simulate_observation(tmp_path, OBSID, n_tiles=4, coarse_chans=list(range(109, 133)),
                                   fine_chan_khz=640, n_timesteps=1)  # fmt: skip
    card = str(fits.getheader(sim.metafits_path).cards["CHANSEL"])
    assert card.startswith("CHANSEL = '0,1,2,") and card.endswith("/ Indi")


def test_truth_json_round_trip(sim8: SimulatedObservation) -> None:
    loaded = load_truth(sim8.truth_path)
    assert loaded.to_json_dict() == sim8.truth.to_json_dict()
    np.testing.assert_array_equal(loaded.gain_amplitudes, sim8.truth.gain_amplitudes)
    np.testing.assert_array_equal(loaded.delay_errors_ns, sim8.truth.delay_errors_ns)
    assert loaded.tiles == sim8.truth.tiles and loaded.sources == sim8.truth.sources
    raw = json.loads(sim8.truth_path.read_text())
    assert raw["flagged_antennas"] == [3]
    assert [t["flagged"] for t in raw["tiles"]] == [i == 3 for i in range(8)]
    assert np.asarray(raw["gains"]["amplitude"]).shape == (8, 2, 2)
    # The predicted data do not depend on whether the truth came from memory or disk.
    np.testing.assert_array_equal(
        predict_visibilities(loaded, 2, 138), predict_visibilities(sim8.truth, 2, 138)
    )
    gains = loaded.complex_gains(138)
    assert gains.shape == (8, 2, 8)
    np.testing.assert_allclose(
        np.abs(gains), np.broadcast_to(loaded.gain_amplitudes[:, :, 1, None], gains.shape)
    )
    np.testing.assert_allclose(loaded.complex_gains(138, domain="uvdata"), np.conj(gains))
    with pytest.raises(ValueError, match="format"):
        simulator.SimulationTruth.from_json_dict({"format": "other"})
    with pytest.raises(ValueError, match="malformed"):
        simulator.SimulationTruth.from_json_dict({"format": simulator.TRUTH_FORMAT})


# --------------------------------------------------------------------------------------------
# Files: names, headers, batches, atomicity


def test_written_files_are_listed(sim8: SimulatedObservation) -> None:
    kinds = [(f.kind, f.coarse_chan, f.batch) for f in sim8.files]
    assert kinds == [
        ("metafits", None, None),
        ("mwax_vis", 137, 0),
        ("mwax_vis", 138, 0),
        ("truth", None, None),
    ]
    names = sorted(p.name for p in sim8.out_dir.iterdir())
    assert names == [
        f"{OBSID}.metafits",
        f"{OBSID}_20211108122750_ch137_000.fits",
        f"{OBSID}_20211108122750_ch138_000.fits",
        f"{OBSID}_truth.json",
    ]
    for item in sim8.files:
        assert item.size_bytes == item.path.stat().st_size
        if item.kind in ("metafits", "mwax_vis"):
            assert item.size_bytes % 2880 == 0


def test_metafits_has_real_structure(sim8: SimulatedObservation) -> None:
    real_path = MWA_DATA / "1320409688.metafits"
    if not real_path.exists():
        pytest.skip("real MWA data not available")
    with fits.open(sim8.metafits_path) as ours, fits.open(real_path) as real:
        missing = set(real[0].header) - set(ours[0].header) - {"COMMENT", "HISTORY", "DATE"}
        assert not missing
        assert ours[1].name == "TILEDATA"
        assert [(c.name, c.format, c.unit) for c in ours[1].columns] == [
            (c.name, c.format, c.unit) for c in real[1].columns
        ]
        table = ours[1].data
        assert list(table["Input"]) == list(range(16))
        assert list(table["Pol"]) == ["Y", "X"] * 8
        assert (table["Tile"][0::2] == table["Tile"][1::2]).all()
        header = ours[0].header
        assert header["CHANNELS"] == "137,138" and header["CENTCHAN"] == 138
        assert header["NCHANS"] == 16 and header["BANDWDTH"] == pytest.approx(2.56)
        assert header["DELAYMOD"] == "NODELAYS" and header["CABLEDEL"] == 0
        # LST at the midpoint, as in real MWAX metafits (3 integrations of 2 s).
        midpoint = Time(OBSID + 3.0, format="gps", location=mwa_location())
        assert header["LST"] == pytest.approx(midpoint.sidereal_time("apparent").deg, abs=1e-6)
        assert header["CALIBSRC"] == "3C444" and header["CALIBRAT"]
        # HA with the real files' sign, RA - LST (real 1320409688: LST - RA = +15.1 deg,
        # HA = -00:58:07.98).
        east_of_meridian = (header["RA"] - header["LST"] + 180) % 360 - 180
        assert header["HA"].startswith("-") == (east_of_meridian < 0)
        assert real[0].header["HA"].startswith("-")
        hours, minutes, seconds = (abs(float(part)) for part in header["HA"].split(":"))
        # (the HA is of the apparent place, RA of J2000: 0.3 deg of precession apart)
        assert 15 * (hours + minutes / 60 + seconds / 3600) == pytest.approx(
            abs(east_of_meridian), abs=0.5
        )


def test_a_tiles_polarisations_share_its_digital_gains(tmp_path: Path) -> None:
    """As in every real metafits: pyuvdata divides both polarisations by the X row's gains,
    and read YY wrong by up to 80% when the simulation drew one gain per polarisation."""
    sim = simulate_observation(
        tmp_path, OBSID, n_tiles=4, coarse_chans=[137, 138], n_timesteps=1,
        digital_gain_scatter=0.2, seed=5,
    )  # fmt: skip
    with fits.open(sim.metafits_path) as ours:
        gains = ours[1].data["Gains"]
    assert (gains[0::2] == gains[1::2]).all() and len(np.unique(gains)) > 2
    for real_path in sorted(MWA_DATA.glob("*.metafits")):
        with fits.open(real_path) as real:
            real_gains = real[1].data["Gains"]
        assert (real_gains[0::2] == real_gains[1::2]).all(), real_path.name


def test_vis_file_headers_have_real_keys(sim8: SimulatedObservation) -> None:
    real_path = MWA_DATA / "1320409688_20211108122750_mini_ch137_000.fits"
    if not real_path.exists():
        pytest.skip("real MWA data not available")
    with fits.open(sim8.vis_paths[0]) as ours, fits.open(real_path) as real:
        assert set(real[0].header) <= set(ours[0].header)
        assert ours[0].header["OBSID"] == OBSID and ours[0].header["CORR_VER"] == 2
        assert len(ours) == 1 + 2 * 3
        for index in (1, 3, 5):
            assert set(ours[index].header) == set(real[1].header)
            assert ours[index].data.shape == (36, 8 * 8)
            assert ours[index + 1].data.shape == (36, 4)
        assert [ours[i].header["TIME"] for i in (1, 3, 5)] == [1636374470, 1636374472, 1636374474]


def test_batches_split_at_subobservation_boundaries(tmp_path: Path) -> None:
    sim = simulate_observation(
        tmp_path,
        OBSID,
        n_tiles=3,
        coarse_chans=[100, 101],
        fine_chan_khz=640,
        int_time_s=4.0,
        n_timesteps=5,
        sources=SOURCES[:1],
        pointing_radec_deg=(333.6, -17.0),
        file_size_limit_bytes=1,
    )
    assert [(f.coarse_chan, f.batch) for f in sim.files if f.kind == "mwax_vis"] == [
        (100, 0), (101, 0), (100, 1), (101, 1), (100, 2), (101, 2)
    ]  # fmt: skip
    context = correlator_context(sim)
    assert len(context.gpubox_batches) == 3
    assert context.num_common_timesteps == 5
    with fits.open(sim.vis_paths[2]) as batch1:
        assert batch1[0].header["TIME"] == 1636374470 + 8
        assert len(batch1) == 1 + 2 * 2
    uvd = read_uvdata(sim, **CORRECTIONS_OFF)
    assert uvd.Ntimes == 5
    expected = predict_visibilities(sim.truth, 4, 101, domain="uvdata")
    data = uvd.data_array.reshape(5, 6, 4, 4)[4, :, 2:]
    np.testing.assert_array_equal(data, expected[:, :, UVDATA_POLS_IN_MWAX_ORDER])


def test_failed_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def explode(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(*args, **kwargs)

    original = simulator._write_vis_file
    monkeypatch.setattr(simulator, "_write_vis_file", explode)
    with pytest.raises(OSError, match="disk full"):
        simulate_observation(tmp_path, OBSID, n_tiles=2, coarse_chans=[100, 101])
    assert list(tmp_path.iterdir()) == []


def test_a_cancelled_run_stops_between_integrations_and_leaves_nothing(tmp_path: Path) -> None:
    """A simulation could not be stopped: a server told to stop while the telescope was
    recording waited for the whole observation, then exited by its deadline with a hidden
    ``.part`` file left behind."""
    asked: list[int] = []

    def cancel_at_the_third_integration() -> bool:
        asked.append(1)
        return len(asked) >= 3

    with pytest.raises(SimulationCancelled, match=str(OBSID)):
        simulate_observation(
            tmp_path, OBSID, n_tiles=2, n_timesteps=50, cancel=cancel_at_the_third_integration
        )
    assert len(asked) == 3  # stopped the first time it was told to
    assert list(tmp_path.iterdir()) == []  # the metafits, the open file: nothing is left


def test_a_simulation_is_cancelled_by_an_event_of_its_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through code that passes no ``cancel`` (as the archive's ``observe_scheduled``), with
    files written in parallel, one per coarse channel."""
    cancel = threading.Event()
    original = simulator._VisibilityEngine.visibilities
    computed: list[int] = []

    def visibilities(self: object, timestep: int, *args: object, **kwargs: object) -> object:
        computed.append(timestep)
        if len(computed) == 4:
            cancel.set()
        return original(self, timestep, *args, **kwargs)

    monkeypatch.setattr(simulator._VisibilityEngine, "visibilities", visibilities)
    with simulator.cancelled_by(cancel), pytest.raises(SimulationCancelled):
        simulate_observation(tmp_path, OBSID, n_tiles=2, coarse_chans=[100, 101], n_timesteps=50)
    assert len(computed) < 20  # each file's thread stopped at its next integration
    assert list(tmp_path.iterdir()) == []
    # Outside the block, and with the event clear, it runs to the end.
    cancel.clear()
    simulate_observation(tmp_path, OBSID, n_tiles=2, n_timesteps=2, cancel=cancel)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_a_cancelled_voltage_capture_leaves_nothing(tmp_path: Path) -> None:
    cancel = threading.Event()
    written: list[int] = []

    def stop_in_the_second_subfile() -> bool:
        written.append(1)  # asked per 50 ms block of each sub-file
        if len(written) > VCS_BLOCKS_PER_SUBOBS + 10:
            cancel.set()
        return cancel.is_set()

    with pytest.raises(SimulationCancelled):
        simulate_observation(
            tmp_path, OBSID, n_tiles=1, mode="MWAX_VCS", n_timesteps=3,
            cancel=stop_in_the_second_subfile,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"obsid": 12345}, "obsid"),
        ({"obsid": 12345678901}, "obsid"),
        ({"n_tiles": 0}, "n_tiles"),
        ({"n_tiles": 129}, "n_tiles"),
        ({"tile_ids": [4242]}, "tile_ids"),
        ({"coarse_chans": []}, "coarse_chans"),
        ({"coarse_chans": [0]}, "coarse_chans"),
        ({"coarse_chans": [137, 137]}, "coarse_chans"),
        ({"fine_chan_khz": 30}, "fine_chan_khz"),
        ({"fine_chan_khz": -40}, "fine_chan_khz"),
        ({"int_time_s": 0.3}, "int_time_s"),
        ({"n_timesteps": 0}, "n_timesteps"),
        ({"mode": "HW_LFILES"}, "mode"),
        ({"noise_sigma_jy": -1.0}, "noise_sigma_jy"),
        ({"noise_sigma_jy": float("nan")}, "noise_sigma_jy"),
        ({"gain_amplitudes": np.ones((3, 3))}, "gain_amplitudes"),
        ({"gain_amplitudes": -1.0}, "gain_amplitudes"),
        ({"delay_errors_ns": np.ones(5)}, "delay_errors_ns"),
        ({"flagged_antennas": [2]}, "flagged_antennas"),
        ({"flagged_antennas": [0, 0]}, "flagged_antennas"),
        ({"sources": [(10.0, 100.0, 1.0)]}, "sources"),
        ({"sources": [(10.0, -20.0, -1.0)]}, "sources"),
        ({"sources": ["3C444"]}, "sources"),
        ({"seed": -1}, "seed"),
        ({"pointing_radec_deg": (10.0, 80.0)}, "pointing_radec_deg"),
        ({"pointing_radec_deg": "zenith"}, "pointing_radec_deg"),
        ({"file_size_limit_bytes": 0}, "file_size_limit_bytes"),
        ({"project_id": ""}, "project_id"),
        ({"obs_name": "caf\u00e9"}, "obs_name .* metafits header cannot hold"),
        ({"obs_name": "x" * 61}, "obs_name 61 characters"),
        ({"voltage_subobs_gps": [OBSID]}, "voltage_subobs_gps"),  # not MWAX_VCS
        ({"mode": "MWAX_VCS", "voltage_subobs_gps": [OBSID + 4]}, "voltage_subobs_gps"),
        ({"mode": "MWAX_VCS", "voltage_subobs_gps": [OBSID + 16]}, "voltage_subobs_gps"),
        ({"beamformer_delays": [0] * 15}, "beamformer_delays"),
        ({"beamformer_delays": [33] * 16}, "beamformer_delays"),
        ({"atten_db": -1.0}, "atten_db"),
    ],
)
def test_bad_parameters_raise_and_write_nothing(tmp_path: Path, kwargs: dict, named: str) -> None:
    arguments = {"obsid": OBSID, "n_tiles": 2, "coarse_chans": [137], **kwargs}
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=named):
        simulate_observation(out_dir, **arguments)
    assert not out_dir.exists()


def test_predict_rejects_bad_requests(sim8: SimulatedObservation) -> None:
    with pytest.raises(ValueError, match="timestep"):
        predict_visibilities(sim8.truth, 3, 137)
    with pytest.raises(ValueError, match="coarse_chan"):
        predict_visibilities(sim8.truth, 0, 139)
    with pytest.raises(ValueError, match="domain"):
        predict_visibilities(sim8.truth, 0, 137, domain="casa")


# --------------------------------------------------------------------------------------------
# VCS


def test_vcs_subfiles_open_in_mwalib(tmp_path: Path) -> None:
    sim = simulate_observation(
        tmp_path,
        OBSID,
        n_tiles=1,
        coarse_chans=[137, 138],
        mode="MWAX_VCS",
        n_timesteps=2,
        sources=SOURCES[:1],
    )
    names = [(f.path.name, f.kind, f.coarse_chan, f.gps_time_s) for f in sim.files]
    assert names[1:5] == [
        (f"{OBSID}_{OBSID}_137.sub", "voltage", 137, OBSID),
        (f"{OBSID}_{OBSID}_138.sub", "voltage", 138, OBSID),
        (f"{OBSID}_{OBSID + 8}_137.sub", "voltage", 137, OBSID + 8),
        (f"{OBSID}_{OBSID + 8}_138.sub", "voltage", 138, OBSID + 8),
    ]
    context = mwalib.VoltageContext(str(sim.metafits_path), [str(p) for p in sim.voltage_paths])
    assert context.mwa_version == mwalib.MWAVersion.VCSMWAXv2
    assert context.metafits_context.mode == mwalib.MWAMode.Mwax_Vcs
    assert context.num_provided_timesteps == 2
    assert [c.rec_chan_number for c in context.coarse_chans] == [137, 138]
    assert context.expected_voltage_data_file_size_bytes == sim.voltage_paths[0].stat().st_size
    assert context.voltage_block_size_bytes == 2 * 64_000 * 2
    samples = np.asarray(context.read_file(context.provided_timestep_indices[1], 1))
    assert samples.dtype == np.int8 and samples.size == 160 * 2 * 64_000 * 2
    assert np.std(samples) == pytest.approx(simulator.VCS_RMS_COUNTS, rel=0.02)

    header = sim.voltage_paths[2].read_bytes()[:4096]
    assert header.rstrip(b"\0").endswith(b"\n") and len(header) == 4096
    keys = dict(line.split(" ", 1) for line in header.rstrip(b"\0").decode().splitlines())
    assert keys["HDR_SIZE"] == "4096" and keys["MODE"] == "MWAX_VCS"
    assert keys["OBS_ID"] == str(OBSID) and keys["SUBOBS_ID"] == str(OBSID + 8)
    assert keys["OBS_OFFSET"] == "8" and keys["NINPUTS"] == "2"
    assert keys["NTIMESAMPLES"] == "64000" and keys["COARSE_CHANNEL"] == "137"
    assert keys["UTC_START"] == "2021-11-08-12:27:50"


def test_sources_below_the_horizon_add_nothing(tmp_path: Path) -> None:
    kwargs = {
        "tile_ids": [11, 1061, 98],
        "coarse_chans": [69],
        "fine_chan_khz": 320,
        "n_timesteps": 1,
        "pointing_radec_deg": (333.6, -17.0),
    }
    one = simulate_observation(
        tmp_path / "one", OBSID, sources=[(333.6069, -17.0288, 60.0)], **kwargs
    )
    # Dec +80 never rises at the MWA (latitude -26.7).
    two = simulate_observation(
        tmp_path / "two",
        OBSID,
        sources=[(333.6069, -17.0288, 60.0), (10.0, 80.0, 1000.0)],
        **kwargs,
    )
    assert [t.tile_id for t in one.truth.tiles] == [11, 98, 1061]
    # A 1000 Jy source would dominate; only float32 rounding may differ.
    np.testing.assert_allclose(
        predict_visibilities(two.truth, 0, 69), predict_visibilities(one.truth, 0, 69), rtol=1e-6
    )


def test_the_metafits_pointing_and_centre_frequency_follow_the_real_files(tmp_path: Path) -> None:
    """As the MWA's current metafits (1369821496, 2023, a 120 s picket fence) give them:
    AZIMUTH, ALTITUDE, HA and LST at the middle, FREQCENT at CENTCHAN's lower edge. Ours
    put FREQCENT between the first and last channel: for a picket fence, in no observed
    channel (here 143.36 MHz, between channels 110 and 115)."""
    real = fits.getheader(CALIB_DATA / "1369821496_metafits.fits")
    sim = simulate_observation(
        tmp_path / "real-like", 1369821496, n_tiles=2,
        coarse_chans=[int(c) for c in real["CHANNELS"].split(",")],
        fine_chan_khz=40, int_time_s=8.0, n_timesteps=15,
        pointing_radec_deg=(real["RA"], real["DEC"]),
    )  # fmt: skip
    ours = fits.getheader(sim.metafits_path)
    assert ours["EXPOSURE"] == real["EXPOSURE"] == 120
    assert ours["CENTCHAN"] == real["CENTCHAN"] == 115
    assert ours["FREQCENT"] == real["FREQCENT"] == 146.56
    assert ours["AZIMUTH"] == pytest.approx(real["AZIMUTH"], abs=0.01)
    assert ours["ALTITUDE"] == pytest.approx(real["ALTITUDE"], abs=0.01)
    assert ours["LST"] == pytest.approx(real["LST"], abs=1e-3)

    def hour_angle_s(text: str) -> float:
        hours, minutes, seconds = (abs(float(part)) for part in text.split(":"))
        return (-1.0 if text.startswith("-") else 1.0) * (hours * 3600 + minutes * 60 + seconds)

    assert hour_angle_s(ours["HA"]) == pytest.approx(hour_angle_s(real["HA"]), abs=1.0)

    fence = simulate_observation(tmp_path / "fence", OBSID, n_tiles=2,
                                 coarse_chans=[62, 63, 69, 70, 140], fine_chan_khz=40,
                                 n_timesteps=1)  # fmt: skip
    header = fits.getheader(fence.metafits_path)
    assert header["CENTCHAN"] == 69 and header["FREQCENT"] == pytest.approx(87.68)
    # Pointed at the zenith (no source): the azimuth of the zenith is 0, as real files say.
    assert header["ALTITUDE"] == 90.0 and header["AZIMUTH"] == 0.0
