"""Solve time: 128 tiles x 768 channels, one timeblock, from simulated visibilities.

Builds a random but full-rank model, applies known gains (amplitudes, cable
lengths and phase offsets per tile and polarisation), adds noise, and times
``normal_matrices`` + ``stefcal`` (tolerance 1e-10, at most 500 iterations).
Goal: <= 10 s on 2 cores; reports iterations, convergence and the error of the
recovered gains.

Run: .venv/bin/python benchmarks/calib_solve.py [--tiles 128] [--chans 768]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from observatory.calib.solver import normal_matrices, stefcal
from observatory.telescope.instrument import SPEED_OF_LIGHT_M_S, fine_chan_freqs_hz

GOAL_S = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=128)
    parser.add_argument("--chans", type=int, default=768)
    parser.add_argument("--timesteps", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n_coarse = max(1, args.chans // 32)
    freqs = np.concatenate([fine_chan_freqs_hz(c, 40_000) for c in range(109, 109 + n_coarse)])[
        : args.chans
    ]
    ant1, ant2 = np.triu_indices(args.tiles, k=1)
    amplitudes = rng.uniform(0.7, 1.3, size=(args.tiles, 2))
    lengths = rng.uniform(-4.0, 4.0, size=(args.tiles, 2))
    gains = amplitudes * np.exp(
        1j * 2 * np.pi * freqs[:, None, None] * lengths / SPEED_OF_LIGHT_M_S
    )
    shape = (args.timesteps, len(ant1), len(freqs), 2)
    model = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64) + 3.0
    g1 = gains[:, ant1].transpose(1, 0, 2)[None]
    g2 = gains[:, ant2].transpose(1, 0, 2)[None]
    data = (g1 * model * np.conj(g2)).astype(np.complex64)
    data += (0.05 * (rng.normal(size=shape) + 1j * rng.normal(size=shape))).astype(np.complex64)

    started = time.perf_counter()
    big_a, big_b = normal_matrices(data, model, ant1, ant2, args.tiles)
    built = time.perf_counter()
    solution = stefcal(big_a, big_b)
    elapsed = time.perf_counter() - started

    truth = gains * np.conj(gains[:, :1]) / np.abs(gains[:, :1])
    error = np.abs(solution.gains - truth) / np.abs(truth)
    print(f"{args.tiles} tiles x {len(freqs)} channels x 2 pols, {args.timesteps} timestep(s), "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(f"calib_solve: {elapsed:.2f} s (normal matrices {built - started:.2f} s, StEFCal "
          f"{elapsed - (built - started):.2f} s), {elapsed / GOAL_S:.2f} of the goal "
          f"({'meets' if elapsed <= GOAL_S else 'MISSES'} <= {GOAL_S:.0f} s); iterations median "
          f"{int(np.median(solution.iterations))}, max {solution.iterations.max()}; converged "
          f"{solution.converged.mean():.0%}; gain error median {np.median(error):.1e}, max {error.max():.1e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
