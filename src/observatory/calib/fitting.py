"""From solutions to per-tile cable-length residuals and gains, as the MWA's calvin pipeline does.

specs/calib.md sections 3.3 (phase line: FFT coarse estimate on a 0.01 m delay
grid, wrapped-phase least squares, clipping) and 3.4 (gains: per coarse channel,
inverted amplitudes, weighted mean and a weighted straight line).
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


def fit_phase_line(
    freqs_hz: NDArray[np.float64],
    solution: NDArray[np.complex128],
    weights: NDArray[np.float64],
    niter: int = 3,
) -> PhaseFit:
    """Fit ``exp(i(m nu + b))`` to the phases of one tile's referenced solutions.

    Raises
    ------
    ValueError
        With fewer than two usable (finite, positively weighted) chanblocks.
    """
    order = np.argsort(freqs_hz)
    freqs, values, w = freqs_hz[order], solution[order], weights[order]
    total = len(freqs)
    steps = np.diff(freqs)
    d_nu = float(steps[steps > 0].min()) if np.any(steps > 0) else 1.0
    usable = np.isfinite(values) & (w > 0)
    if usable.sum() < 2:
        raise ValueError("fewer than 2 usable chanblocks")
    freqs, values, w = freqs[usable], values[usable], w[usable]
    samples = values / np.abs(values) * w

    # Coarse estimate: the peak of the delay spectrum on a 0.01 m grid.
    nu_max = 0.5 / (DELAY_GRID_M / SPEED_OF_LIGHT_M_S)
    n_fft = 2 * round(nu_max / d_nu)
    bins = np.round(freqs / d_nu).astype(np.int64)
    bins -= bins[len(bins) // 2]
    spectrum = np.zeros(n_fft, dtype=np.complex128)
    np.add.at(spectrum, bins % n_fft, samples)
    delays_m = np.fft.fftshift(SPEED_OF_LIGHT_M_S * -np.fft.fftfreq(n_fft, d_nu))
    peak = int(np.argmax(np.abs(np.fft.fftshift(np.fft.ifft(spectrum)))))
    slope = 2.0 * np.pi * delays_m[peak] / SPEED_OF_LIGHT_M_S
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
