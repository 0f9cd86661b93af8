"""From solutions to per-tile cable-length residuals and gains, as the MWA's calvin pipeline does.

specs/calib.md sections 3.3 (phase line: FFT coarse estimate on a 0.01 m delay
grid, wrapped-phase least squares, clipping) and 3.4 (gains: per coarse channel,
inverted amplitudes, weighted mean and a weighted straight line). Solutions finer
than calvin's 40 kHz chanblocks are averaged to them before the phase line is
fitted, as Birli averages calvin's data (specs/calib.md 3.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize

from observatory.telescope.instrument import SPEED_OF_LIGHT_M_S

#: Delay resolution of the FFT coarse estimate (metres of cable).
DELAY_GRID_M = 0.01
#: The widest chanblock the phase line is fitted on: calvin's (Birli's ``freq_res_khz=40``,
#: specs/calib.md 3.1). Finer solutions are averaged to chanblocks at most this wide.
PHASE_FIT_CHANBLOCK_HZ = 40_000.0


@dataclass(frozen=True)
class PhaseFit:
    """A phase-versus-frequency line: ``phase = 2 pi nu length / c + intercept``."""

    length_m: float
    intercept: float
    sigma_resid: float
    chi2dof: float
    quality: float


@dataclass(frozen=True)
class GainFit:
    """Per coarse channel: mean inverted amplitude, line (per Hz, at 0 Hz), residual spread; overall quality."""

    gains: NDArray[np.float64]
    pol1: NDArray[np.float64]
    pol0: NDArray[np.float64]
    sigma_resid: NDArray[np.float64]
    quality: float


def wrap(phase: NDArray[np.float64]) -> NDArray[np.float64]:
    """Phases into [-pi, pi)."""
    return (phase + np.pi) % (2.0 * np.pi) - np.pi


def chanblock_factor(fine_chan_hz: float) -> int:
    """How many channels ``fine_chan_hz`` apart the phase fit averages into one chanblock.

    The most that keeps a chanblock no wider than :data:`PHASE_FIT_CHANBLOCK_HZ`
    (40 kHz): 40 at 1 kHz, 4 at 10 kHz, 1 (no averaging) at 40 kHz and coarser.
    """
    if not fine_chan_hz > 0:
        raise ValueError(f"a channel width must be positive, not {fine_chan_hz} Hz")
    return max(1, math.floor(PHASE_FIT_CHANBLOCK_HZ / fine_chan_hz))


def delay_fft_length(chanblock_hz: float) -> int:
    """Length of the FFT whose peak is the phase fit's coarse delay estimate.

    A grid of :data:`DELAY_GRID_M` (0.01 m) in delay, spanning the delays that
    chanblocks ``chanblock_hz`` apart tell apart (+-3750 m at 40 kHz): 750,000 points
    at 40 kHz, inversely proportional to the chanblock width. The fit passes the width
    of its (averaged) chanblocks, so at most 1,500,000 whatever the channels' width.
    """
    nu_max_hz = 0.5 / (DELAY_GRID_M / SPEED_OF_LIGHT_M_S)
    return 2 * round(nu_max_hz / chanblock_hz)


def _chanblocks(
    freqs_hz: NDArray[np.float64],
    values: NDArray[np.complex128],
    weights: NDArray[np.float64],
    fine_chan_hz: float,
) -> tuple[NDArray[np.float64], NDArray[np.complex128], NDArray[np.float64], float]:
    """Average sorted solutions finer than 40 kHz into chanblocks, as calvin fits them.

    Each run of :func:`chanblock_factor` channels (counted on the grid ``fine_chan_hz``
    from the lowest frequency) becomes one chanblock: its value the weighted mean of
    its usable (finite, positively weighted) channels' unit phasors, at their weighted
    mean frequency, with the mean weight of all its channels (a flagged one counts 0).
    A chanblock with no usable channel is NaN with weight 0: it still counts in the
    fit's quality, as a flagged chanblock of calvin's does.

    Returns
    -------
    freqs_hz, values, weights, chanblock_hz
        Unchanged (and ``fine_chan_hz``) at 40 kHz and coarser: the fit there is calvin's.
    """
    factor = chanblock_factor(fine_chan_hz)
    if factor == 1:
        return freqs_hz, values, weights, fine_chan_hz
    # On the channel grid first (exact for regular channels), then whole runs of it.
    grid = np.round((freqs_hz - freqs_hz[0]) / fine_chan_hz)
    _, block = np.unique(np.floor(grid / factor), return_inverse=True)
    n_blocks = int(block.max()) + 1
    members = np.bincount(block, minlength=n_blocks).astype(np.float64)
    magnitude = np.abs(values)
    # A solution of exactly 0 has no phase: flagged, like a NaN.
    usable = np.isfinite(values) & (weights > 0) & (magnitude > 0)
    w_usable = np.where(usable, weights, 0.0)
    weighted = w_usable * np.where(usable, values / np.where(usable, magnitude, 1.0), 0.0)
    w_sum = np.bincount(block, w_usable, n_blocks)
    safe_sum = np.where(w_sum > 0, w_sum, 1.0)
    mean = (
        np.bincount(block, weighted.real, n_blocks)
        + 1j * np.bincount(block, weighted.imag, n_blocks)
    ) / safe_sum
    # Phasors that cancel exactly leave no phase either.
    good = (w_sum > 0) & (np.abs(mean) > 0)
    # A chanblock's frequency: where its usable channels are (its middle without any).
    centroid = np.bincount(block, w_usable * freqs_hz, n_blocks) / safe_sum
    middle = np.bincount(block, freqs_hz, n_blocks) / members
    return (
        np.where(good, centroid, middle),
        np.where(good, mean, np.nan + 0j),
        np.where(good, w_sum / members, 0.0),
        factor * fine_chan_hz,
    )


#: The coarse delay spectrum of :func:`delay_spectrum_peak` has at least this many points
#: per chanblock of the band's span: its main lobe (n_fft / span points of the fine grid
#: wide) is then sampled 8 times, so the sample nearest the true peak is within 0.6 % of
#: it and lies on the lobe that holds the fine grid's maximum.
_COARSE_POINTS_PER_CHANBLOCK = 8


def delay_spectrum_peak(
    bins: NDArray[np.int64], samples: NDArray[np.complex128], n_fft: int
) -> int:
    """Where ``|sum_k samples_k exp(2 pi i bins_k n / n_fft)|`` peaks over the integers ``n``
    in ``[-n_fft/2, n_fft/2)``: the peak of the fftshifted ``n_fft``-point inverse FFT of
    ``samples`` placed at ``bins``, the first of equal peaks.

    That FFT (750,000 points at 40 kHz, a quarter of a second per tile and polarisation)
    is found in two steps: an FFT just long enough to sample the spectrum's lobes
    (:data:`_COARSE_POINTS_PER_CHANBLOCK` points per chanblock of the span), then the
    sums themselves at every fine point within two coarse steps of its peak.
    """
    span = int(bins.max() - bins.min()) + 1
    n_coarse = 1 << max(int(np.ceil(np.log2(_COARSE_POINTS_PER_CHANBLOCK * span))), 4)
    if n_coarse >= n_fft:
        spectrum = np.zeros(n_fft, dtype=np.complex128)
        np.add.at(spectrum, bins % n_fft, samples)
        return int(np.argmax(np.abs(np.fft.fftshift(np.fft.ifft(spectrum))))) - n_fft // 2
    coarse = np.zeros(n_coarse, dtype=np.complex128)
    np.add.at(coarse, bins % n_coarse, samples)
    # Centred as the fine grid is, so that a peak at its edge is found on both sides.
    coarse_peak = int(np.argmax(np.abs(np.fft.fftshift(np.fft.ifft(coarse))))) - n_coarse // 2
    step = n_fft / n_coarse
    centre = round(coarse_peak * step)
    reach = int(np.ceil(2 * step))
    candidates = np.arange(centre - reach, centre + reach + 1)
    # Folded into [-n_fft/2, n_fft/2) and sorted, so that ties go to the lowest, as there.
    candidates = np.unique((candidates + n_fft // 2) % n_fft - n_fft // 2)
    phases = np.exp(2j * np.pi * np.outer(candidates, bins) / n_fft)
    return int(candidates[int(np.argmax(np.abs(phases @ samples)))])


def fit_phase_line(
    freqs_hz: NDArray[np.float64],
    solution: NDArray[np.complex128],
    weights: NDArray[np.float64],
    niter: int = 3,
) -> PhaseFit:
    """Fit ``exp(i(m nu + b))`` to the phases of one tile's referenced solutions.

    Channels finer than 40 kHz are first averaged to chanblocks of at most 40 kHz
    (:func:`_chanblocks`), the resolution calvin fits at. The FFT of the coarse estimate
    then has ``delay_fft_length(chanblock width)`` points, at most 1,500,000 (750,000
    for 1 kHz channels, where it had 30 million, 4 GB, fitting on the channels
    themselves), and ``sigma_resid`` and ``quality`` are those of ~40 kHz chanblocks,
    which the pipeline's thresholds are set for. At 40 kHz and coarser nothing is
    averaged.

    Parameters
    ----------
    freqs_hz
        Channel centre frequencies (Hz), any order.
    solution
        The referenced solutions at ``freqs_hz``; NaN where flagged.
    weights
        Per channel; 0 leaves a channel out.
    niter
        Rounds of fitting and 2-sigma clipping.

    Raises
    ------
    ValueError
        With fewer than two usable (finite, positively weighted) chanblocks.
    """
    order = np.argsort(freqs_hz)
    freqs, values, w = freqs_hz[order], solution[order], weights[order]
    steps = np.diff(freqs)
    d_nu = float(steps[steps > 0].min()) if np.any(steps > 0) else 1.0
    freqs, values, w, d_nu = _chanblocks(freqs, values, w, d_nu)
    total = len(freqs)
    usable = np.isfinite(values) & (w > 0)
    if usable.sum() < 2:
        raise ValueError("fewer than 2 usable chanblocks")
    freqs, values, w = freqs[usable], values[usable], w[usable]
    samples = values / np.abs(values) * w

    # Coarse estimate: the peak of the delay spectrum on a 0.01 m grid.
    n_fft = delay_fft_length(d_nu)
    bins = np.round(freqs / d_nu).astype(np.int64)
    bins -= bins[len(bins) // 2]
    peak = delay_spectrum_peak(bins, samples, n_fft)
    # The delay at index ``peak`` of fftshift(c * -fftfreq(n_fft, d_nu)) (n_fft even),
    # computed as numpy does, without an array of all n_fft delays.
    delay_m = SPEED_OF_LIGHT_M_S * -(peak * (1.0 / (n_fft * d_nu)))
    slope = 2.0 * np.pi * delay_m / SPEED_OF_LIGHT_M_S
    intercept = float(np.angle(np.mean(samples / np.exp(1j * slope * freqs))))

    # Refinement on the wrapped phases. Parameterised about the band centre: slope and
    # intercept at 0 Hz are almost degenerate over an MWA band, which stalls the optimiser.
    centre = float(np.mean(freqs))
    span = max(float(freqs.max() - freqs.min()), d_nu)
    angles = np.angle(samples)

    def line(params: NDArray[np.float64], nu: NDArray[np.float64]) -> NDArray[np.float64]:
        return params[0] * (nu - centre) / span + params[1]

    def cost(
        params: NDArray[np.float64], nu: NDArray[np.float64], phase: NDArray[np.float64]
    ) -> float:
        return float(np.sum(wrap(phase - line(params, nu)) ** 2))

    keep = np.ones(len(freqs), dtype=bool)
    params = np.array([slope * span, intercept + slope * centre])
    chi2dof = sigma = math.nan
    for _ in range(niter):
        params = minimize(cost, params, args=(freqs[keep], angles[keep])).x
        residuals = wrap(angles[keep] - line(params, freqs[keep]))
        n = int(keep.sum())
        chi2dof = float(np.sum(residuals**2) / max(n - 2, 1))
        sigma = float(np.std(residuals))
        # calvin clips at twice its "stderr", which on these fits is the residuals' spread.
        clipped = keep & (np.abs(wrap(angles - line(params, freqs))) < 2.0 * max(sigma, 1e-12))
        if clipped.sum() < 2:
            break
        keep = clipped
    slope = params[0] / span
    intercept_at_zero = params[1] - slope * centre
    return PhaseFit(
        length_m=float(SPEED_OF_LIGHT_M_S * slope / (2.0 * np.pi)),
        intercept=float(wrap(np.array(intercept_at_zero))),
        sigma_resid=sigma,
        chi2dof=chi2dof,
        quality=float(keep.sum()) / total,
    )


def fit_gain(
    freqs_hz: NDArray[np.float64],
    solution: NDArray[np.complex128],
    weights: NDArray[np.float64],
    chanblocks_per_coarse: int,
) -> GainFit:
    """Per coarse channel, fit the inverted amplitude ``1/|J|`` of raw solutions (XX or YY).

    A coarse channel with fewer than two usable chanblocks stays NaN.
    """
    n_coarse = len(freqs_hz) // chanblocks_per_coarse
    shape = (n_coarse, chanblocks_per_coarse)
    nu = freqs_hz[: n_coarse * chanblocks_per_coarse].reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        inverted = (1.0 / np.abs(solution[: n_coarse * chanblocks_per_coarse])).reshape(shape)
    w = np.where(
        np.isfinite(inverted), weights[: n_coarse * chanblocks_per_coarse].reshape(shape), 0.0
    )
    gains, pol1, pol0, sigma = (np.full(n_coarse, np.nan) for _ in range(4))
    good_points = 0
    for k in range(n_coarse):
        use = w[k] > 0
        if use.sum() < 2:
            continue
        x, y, wk = nu[k][use], inverted[k][use], w[k][use]
        gains[k] = float(np.sum(y * wk) / np.sum(wk))
        pol1[k], pol0[k] = np.polyfit(x, y, deg=1, w=wk)
        residuals = y - (pol1[k] * x + pol0[k])
        sigma[k] = float(np.std(residuals))
        good_points += (
            int(use.sum()) if sigma[k] < 1e-10 else int(np.sum(np.abs(residuals) < 2 * sigma[k]))
        )
    return GainFit(gains, pol1, pol0, sigma, good_points / max(len(freqs_hz), 1))
