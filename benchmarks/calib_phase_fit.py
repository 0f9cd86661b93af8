"""Phase-line fits of a whole calibrator: 128 tiles x 2 polarisations x 768 chanblocks.

Times ``fit_phase_line`` (coarse delay from the delay spectrum, then the wrapped-phase
refinement) on noisy solutions with known delays, against the anchor of the same fits
whose coarse delay is the peak of the full 750,000-point inverse FFT, as the pipeline
found it until 2026-12-03. Both in one run; checks they find the same delays.

Run: .venv/bin/python benchmarks/calib_phase_fit.py [--tiles 128]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np

from observatory.calib import fitting
from observatory.telescope.instrument import SPEED_OF_LIGHT_M_S, fine_chan_freqs_hz


def _full_fft_peak(bins: np.ndarray, samples: np.ndarray, n_fft: int) -> int:
    spectrum = np.zeros(n_fft, dtype=np.complex128)
    np.add.at(spectrum, bins % n_fft, samples)
    return int(np.argmax(np.abs(np.fft.fftshift(np.fft.ifft(spectrum))))) - n_fft // 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    freqs_hz = np.concatenate([fine_chan_freqs_hz(c, 40_000) for c in range(109, 133)])
    lengths_m = rng.uniform(-40.0, 40.0, size=2 * args.tiles)
    solutions = [
        np.exp(2j * np.pi * length * freqs_hz / SPEED_OF_LIGHT_M_S + 1j * rng.uniform(-3, 3))
        * np.exp(1j * rng.normal(0, 0.2, size=len(freqs_hz)))
        for length in lengths_m
    ]
    weights = np.ones(len(freqs_hz))

    def fit_all() -> tuple[float, list[float]]:
        start = time.perf_counter()
        fitted = [fitting.fit_phase_line(freqs_hz, s, weights).length_m for s in solutions]
        return time.perf_counter() - start, fitted

    ours_s, ours = fit_all()
    with mock.patch.object(fitting, "delay_spectrum_peak", _full_fft_peak):
        anchor_s, anchor = fit_all()
    print(f"{len(solutions)} phase fits ({args.tiles} tiles x 2 polarisations, 768 chanblocks)")
    print(f"  full 750,000-point FFT (anchor): {anchor_s:.2f} s")
    print(f"  lobe FFT + fine sums (ours):     {ours_s:.3f} s")
    print(f"  ratio ours/anchor: {ours_s / anchor_s:.4f}")
    worst_m = float(np.max(np.abs(np.array(ours) - np.array(anchor))))
    print(f"  largest difference between the fitted lengths: {worst_m:.2e} m")
    print(
        f"  largest error against the injected lengths: {np.max(np.abs(np.array(ours) - lengths_m)):.3f} m"
    )
    return 0 if worst_m < 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
