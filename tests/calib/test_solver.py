"""StEFCal gains and calvin's delay and gain fits, on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from observatory.calib.fitting import fit_gain, fit_phase_line, wrap
from observatory.calib.solver import normal_matrices, stefcal
from observatory.telescope.instrument import SPEED_OF_LIGHT_M_S, fine_chan_freqs_hz

C = SPEED_OF_LIGHT_M_S


def simulate(n_ant: int = 16, chans: tuple[int, ...] = (120, 121), n_time: int = 3, noise: float = 0.01,
             flagged: tuple[int, ...] = (), seed: int = 1) -> dict[str, np.ndarray]:  # fmt: skip
    rng = np.random.default_rng(seed)
    freqs = np.concatenate([fine_chan_freqs_hz(c, 40_000) for c in chans])
    ant1, ant2 = np.triu_indices(n_ant, k=1)
    amplitudes = rng.uniform(0.7, 1.3, size=(n_ant, 2))
    lengths = rng.uniform(-4.0, 4.0, size=(n_ant, 2))
    offsets = rng.uniform(-np.pi, np.pi, size=(n_ant, 2))
    gains = amplitudes[None] * np.exp(
        1j * (2 * np.pi * freqs[:, None, None] * lengths[None] / C + offsets[None])
    )
    shape = (n_time, len(ant1), len(freqs), 2)
    model = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) + 3.0
    data = (
        gains[None, :, ant1].transpose(0, 2, 1, 3)
        * model
        * np.conj(gains[None, :, ant2]).transpose(0, 2, 1, 3)
    )
    data = data + noise * (rng.normal(size=shape) + 1j * rng.normal(size=shape))
    weights = np.ones(shape)
    for antenna in flagged:
        weights[:, (ant1 == antenna) | (ant2 == antenna)] = 0.0
    return {"freqs": freqs, "ant1": ant1, "ant2": ant2, "gains": gains, "model": model, "data": data,
            "weights": weights, "amplitudes": amplitudes, "lengths": lengths}  # fmt: skip


def test_stefcal_recovers_gains_to_a_phase_reference() -> None:
    sim = simulate(flagged=(5,))
    big_a, big_b = normal_matrices(
        sim["data"], sim["model"], sim["ant1"], sim["ant2"], 16, sim["weights"]
    )
    solution = stefcal(big_a, big_b, tolerance=1e-9)
    assert solution.converged.all()
    assert solution.iterations.max() < 200
    ref = solution.reference_antenna
    assert ref == 0
    truth = (
        sim["gains"]
        * np.conj(sim["gains"][:, ref : ref + 1])
        / np.abs(sim["gains"][:, ref : ref + 1])
    )
    good = [a for a in range(16) if a != 5]
    assert np.allclose(solution.gains[:, good], truth[:, good], rtol=2e-3, atol=2e-3)
    assert np.isnan(solution.gains[:, 5]).all()
    assert np.isnan(solution.jones()[:, 5]).all()


def test_a_channel_without_the_reference_antenna_is_solved_for_the_others() -> None:
    """The reference antenna with no data in one channel (its packets lost, its baselines
    flagged there) made every antenna's solution in that channel NaN."""
    sim = simulate(n_ant=6)
    weights = sim["weights"].copy()
    weights[:, (sim["ant1"] == 0) | (sim["ant2"] == 0), 7] = 0.0  # antenna 0, channel 7
    big_a, big_b = normal_matrices(sim["data"], sim["model"], sim["ant1"], sim["ant2"], 6, weights)
    solution = stefcal(big_a, big_b, tolerance=1e-9)
    assert solution.reference_antenna == 0
    assert np.isnan(solution.gains[7, 0]).all() and np.isfinite(solution.gains[7, 1:]).all()
    # Right to a common phase, as every channel is: ratios between antennas are the truth's.
    ratios = solution.gains[7, 2:] / solution.gains[7, 1:2]
    truth = sim["gains"][7, 2:] / sim["gains"][7, 1:2]
    assert np.allclose(ratios, truth, rtol=2e-3, atol=2e-3)
    assert np.isfinite(solution.gains[[6, 8], :]).all()


def test_an_antenna_whose_data_are_all_zero_has_no_solution_and_is_not_the_reference() -> None:
    """Data written as zeros (a dead receiver, packets that never arrived) with weight 1: its
    gain converged to 0 and, as the default reference (the first antenna), made every
    antenna's solution NaN."""
    sim = simulate(n_ant=6)
    data = sim["data"].copy()
    data[:, (sim["ant1"] == 0) | (sim["ant2"] == 0)] = 0.0
    big_a, big_b = normal_matrices(data, sim["model"], sim["ant1"], sim["ant2"], 6, sim["weights"])
    solution = stefcal(big_a, big_b, tolerance=1e-9)
    assert np.isnan(solution.gains[:, 0]).all() and np.isfinite(solution.gains[:, 1:]).all()
    assert solution.reference_antenna == 1
    ratios = solution.gains[:, 2:] / solution.gains[:, 1:2]
    truth = sim["gains"][:, 2:] / sim["gains"][:, 1:2]
    assert np.allclose(ratios, truth, rtol=5e-3, atol=5e-3)


def test_calvin_fits_recover_delays_and_gains() -> None:
    # A full 24-channel band: over 30.72 MHz, 0.02 m of cable is 0.013 rad of phase change.
    sim = simulate(n_ant=12, chans=tuple(range(109, 133)), n_time=2, noise=0.05)
    big_a, big_b = normal_matrices(
        sim["data"], sim["model"], sim["ant1"], sim["ant2"], 12, sim["weights"]
    )
    solution = stefcal(big_a, big_b)
    jones = solution.jones()  # AO-cal: the inverse gains
    ref = solution.reference_antenna
    freqs, weights = sim["freqs"], np.ones(len(sim["freqs"]))
    for antenna in range(12):
        for pol, element in ((0, 0), (1, 3)):
            referenced = jones[:, antenna, element] / jones[:, ref, element]
            fit = fit_phase_line(freqs, referenced, weights)
            # The solutions invert the gains, so their slope is minus the cable-length difference.
            expected = -(sim["lengths"][antenna, pol] - sim["lengths"][ref, pol])
            assert fit.length_m == pytest.approx(expected, abs=0.02)
            assert fit.quality > 0.8 and fit.sigma_resid < 0.05
            gain = fit_gain(freqs, jones[:, antenna, element], weights, 32)
            assert np.allclose(gain.gains, sim["amplitudes"][antenna, pol], rtol=0.02)
            assert gain.quality > 0.8


def test_phase_line_with_wraps_and_outliers() -> None:
    rng = np.random.default_rng(3)
    freqs = np.concatenate([fine_chan_freqs_hz(c, 40_000) for c in range(109, 133)])
    length, intercept = 7.43, 1.1
    phase = 2 * np.pi * freqs * length / C + intercept + rng.normal(0, 0.02, len(freqs))
    solution = np.exp(1j * phase) * 3.0
    solution[::17] *= np.exp(1j * 2.5)  # outliers, clipped
    solution[5:9] = np.nan  # flagged chanblocks
    weights = np.ones(len(freqs))
    weights[20:25] = 0.0
    fit = fit_phase_line(freqs, solution, weights)
    assert fit.length_m == pytest.approx(length, abs=0.02)
    assert float(wrap(np.array(fit.intercept - intercept))) == pytest.approx(0.0, abs=0.2)
    assert 0.7 < fit.quality < 0.95
    with pytest.raises(ValueError, match="fewer than 2"):
        fit_phase_line(freqs[:3], np.full(3, np.nan + 0j), np.ones(3))


def test_gain_fit_of_a_sloped_amplitude() -> None:
    freqs = np.concatenate([fine_chan_freqs_hz(c, 40_000) for c in (100, 101)])
    inverted = 2.0 + 1e-8 * (freqs - freqs[0])
    solution = 1.0 / inverted * np.exp(1j * 0.3)
    solution[32:] = np.nan  # the second coarse channel did not solve
    fit = fit_gain(freqs, solution, np.ones(len(freqs)), 32)
    assert fit.pol1[0] == pytest.approx(1e-8, rel=1e-6) and np.isnan(fit.gains[1])
    assert fit.pol0[0] + fit.pol1[0] * freqs[0] == pytest.approx(2.0, rel=1e-9)
    assert fit.gains[0] == pytest.approx(np.mean(inverted[:32]))
