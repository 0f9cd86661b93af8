"""The delay fit's cost does not grow with the calibrator's fine-channel resolution.

calvin fits 40 kHz chanblocks (Birli averages its data first, specs/calib.md 3.1), so its
FFT of the coarse delay estimate always has ~750,000 points. Fitted on 1 kHz channels
themselves that FFT had 30 million points (4.4 GB for one call, in the Dask worker);
the fit now averages finer channels to <= 40 kHz chanblocks first.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from observatory.calib.fitting import fit_phase_line, wrap
from observatory.telescope.instrument import SPEED_OF_LIGHT_M_S, fine_chan_freqs_hz

LENGTH_M, INTERCEPT_RAD = 12.34, 0.7
#: Phase noise of a 40 kHz chanblock (radians): a bright calibrator's.
CHANBLOCK_NOISE_RAD = 0.05


def band(fine_chan_hz: int, seed: int = 0) -> tuple[NDArray[np.float64], NDArray[np.complex128]]:
    """A 24-channel band's referenced solutions of cable length ``LENGTH_M``.

    Each channel's phase noise is a 40 kHz chanblock's times sqrt(40 kHz / width), as
    for solutions of the same data at finer resolution; the 80 kHz coarse-channel edges
    are flagged (NaN), as the pipeline's are.
    """
    rng = np.random.default_rng(seed)
    per_coarse = [fine_chan_freqs_hz(c, fine_chan_hz) for c in range(109, 133)]
    freqs_hz = np.concatenate(per_coarse)
    noise_rad = CHANBLOCK_NOISE_RAD * np.sqrt(40_000 / fine_chan_hz)
    phase = 2 * np.pi * freqs_hz * LENGTH_M / SPEED_OF_LIGHT_M_S + INTERCEPT_RAD
    solution = 2.0 * np.exp(1j * (phase + rng.normal(0.0, noise_rad, len(freqs_hz))))
    n_edge = int(np.ceil(80_000 / fine_chan_hz))
    edges = np.zeros(len(per_coarse[0]), dtype=bool)
    edges[:n_edge] = edges[-n_edge:] = True
    solution[np.tile(edges, len(per_coarse))] = np.nan
    return freqs_hz, solution


def test_the_fft_grid_is_calvin_s_40_khz_one_whatever_the_channel_width() -> None:
    from observatory.calib.fitting import chanblock_factor, delay_fft_length

    calvin_s = delay_fft_length(40_000)
    assert calvin_s == pytest.approx(750_000, rel=1e-3)  # a 0.01 m grid over +-3750 m
    assert [chanblock_factor(hz) for hz in (200, 1_000, 10_000, 40_000, 320_000)] == [
        200, 40, 4, 1, 1,
    ]  # fmt: skip
    for fine_chan_hz in (200, 1_000, 10_000, 40_000):
        assert delay_fft_length(fine_chan_hz * chanblock_factor(fine_chan_hz)) == calvin_s
    # Coarser channels are not averaged: their grid is shorter still.
    assert delay_fft_length(320_000 * chanblock_factor(320_000)) == pytest.approx(
        calvin_s / 8, abs=1
    )


def test_a_1_khz_band_is_fitted_in_bounded_memory() -> None:
    """Fitted on the 1 kHz channels themselves, one call's FFT held 30 million complex
    points (480 MB each array, 4.4 GB at peak); on 40 kHz chanblocks, 750,000 (12 MB)."""
    freqs_hz, solution = band(1_000)
    tracemalloc.start()
    try:
        fit = fit_phase_line(freqs_hz, solution, np.ones(len(freqs_hz)))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 100e6, f"{peak_bytes / 1e6:.0f} MB"
    assert fit.length_m == pytest.approx(LENGTH_M, abs=0.02)


@pytest.mark.parametrize("fine_chan_hz", [10_000, 1_000, 200])
def test_the_fitted_delay_is_the_truth_at_every_resolution(fine_chan_hz: int) -> None:
    """Data at a finer resolution fit as at 40 kHz: the true delay, and the residual
    spread and quality of 40 kHz chanblocks (which the pipeline's thresholds are set
    for), not those of the noisier fine channels."""
    coarse_hz, coarse_solution = band(40_000)
    at_40_khz = fit_phase_line(coarse_hz, coarse_solution, np.ones(len(coarse_hz)))
    freqs_hz, solution = band(fine_chan_hz)
    fit = fit_phase_line(freqs_hz, solution, np.ones(len(freqs_hz)))
    for each in (at_40_khz, fit):
        assert each.length_m == pytest.approx(LENGTH_M, abs=0.02)
        assert float(wrap(np.array(each.intercept - INTERCEPT_RAD))) == pytest.approx(0, abs=0.05)
    assert fit.sigma_resid == pytest.approx(at_40_khz.sigma_resid, rel=0.25)
    # Of the chanblocks, the flagged edges included, as calvin counts.
    assert fit.quality == pytest.approx(at_40_khz.quality, abs=0.05)


def test_flagged_fine_channels_are_left_out_of_their_chanblock() -> None:
    """A flagged channel (NaN, or weight 0) does not spoil its chanblock's phase; a
    chanblock with no usable channel is a flagged chanblock, counted in the quality."""
    freqs_hz, solution = band(1_000, seed=1)
    weights = np.ones(len(freqs_hz))
    weights[3000:3040] = 0.0  # one whole chanblock
    solution[5000:5400:3] *= np.exp(2.5j)  # a third of the channels of ten chanblocks...
    weights[5000:5400:3] = 0.0  # ... weighted out
    solution[7000:7100:2] = np.nan + 0j
    clean = fit_phase_line(freqs_hz, band(1_000, seed=1)[1], np.ones(len(freqs_hz)))
    fit = fit_phase_line(freqs_hz, solution, weights)
    assert fit.length_m == pytest.approx(LENGTH_M, abs=0.02)
    assert fit.sigma_resid == pytest.approx(clean.sigma_resid, rel=0.2)
    assert fit.quality <= clean.quality


def test_a_1_khz_calibrator_s_tiles_fit_their_injected_delays(tmp_path: Path) -> None:
    """The pipeline's fits of a 1 kHz calibrator (what a trigger with ``freqres=1`` and
    ``calibrator=true`` schedules): every tile's delay, each fit's memory bounded."""
    from observatory.archive.simulated import catalogue_point_source
    from observatory.calib.pipeline import tile_fits
    from observatory.calib.solving import solve_observation
    from observatory.telescope.simulator import simulate_observation
    from observatory.trigger import pointing

    cal_obs = 1_450_324_816  # 2025-12-21 04:00 UTC: 3C353 is 60 deg up
    best = pointing.best_calibrator(cal_obs + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    chans = (109, 121, 132)  # a picket fence over the band: delays need its span
    sim = simulate_observation(tmp_path, cal_obs, n_tiles=8, coarse_chans=chans, n_timesteps=2,
                               fine_chan_khz=1.0, sources=[catalogue_point_source(best[0].name)],
                               calibrator=best[0].name, gain_amplitude_scatter=0.1,
                               delay_error_scatter_ns=2.0, noise_sigma_jy=1.0)  # fmt: skip
    solved = solve_observation(sim.metafits_path, sim.vis_paths, best[0].name)
    assert solved.meta.fine_chan_width_hz == 1_000
    tracemalloc.start()
    try:
        rows = tile_fits(solved, len(chans)).rows
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 200e6, f"{peak_bytes / 1e6:.0f} MB"
    truth = sim.truth
    tile_ids = [t.tile_id for t in truth.tiles]
    reference = int(np.argmin(tile_ids))
    for antenna, row in enumerate(rows):
        for pol, name in ((0, "x"), (1, "y")):
            injected_m = -(
                (truth.delay_errors_ns[antenna, pol] - truth.delay_errors_ns[reference, pol])
                * 1e-9
                * SPEED_OF_LIGHT_M_S
            )
            assert row[f"{name}_delay_m"] == pytest.approx(injected_m, abs=0.02), (antenna, name)


def test_the_delay_spectrum_peak_is_the_full_fft_s() -> None:
    """The coarse delay is found without the 750,000-point FFT (a quarter of a second per
    tile and polarisation): the same peak, on bands with gaps, noise, picket fences and
    delays at the grid's edges."""
    from observatory.calib.fitting import delay_fft_length, delay_spectrum_peak

    def full_fft_peak(bins: np.ndarray, samples: np.ndarray, n_fft: int) -> int:
        spectrum = np.zeros(n_fft, dtype=np.complex128)
        np.add.at(spectrum, bins % n_fft, samples)
        return int(np.argmax(np.abs(np.fft.fftshift(np.fft.ifft(spectrum))))) - n_fft // 2

    rng = np.random.default_rng(7)
    n_fft = delay_fft_length(40_000)
    cases = 0
    for delay_index in (0, 1, -1, 123_456, -374_990, 374_999, -375_000, 250_001):
        for layout in ("contiguous", "gaps", "picket fence"):
            if layout == "contiguous":
                bins = np.arange(768)
            elif layout == "gaps":
                bins = np.sort(rng.choice(768, size=600, replace=False))
            else:  # 24 coarse channels of 32 chanblocks spread over 150 MHz
                starts = np.sort(rng.choice(150_000_000 // 40_000 // 32, 24, replace=False))
                bins = (starts[:, None] * 32 + np.arange(32)).ravel()
            bins = bins - bins[len(bins) // 2]
            noise = 0.3 * (rng.normal(size=len(bins)) + 1j * rng.normal(size=len(bins)))
            samples = np.exp(-2j * np.pi * bins * delay_index / n_fft) + noise
            samples /= np.abs(samples)
            expected = full_fft_peak(bins, samples, n_fft)
            assert delay_spectrum_peak(bins, samples, n_fft) == expected, (delay_index, layout)
            cases += 1
    assert cases == 24
