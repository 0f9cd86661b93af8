"""What AOFlagger adds to a calibrator's solve, and what worker processes win back.

Simulates a calibrator observation (``--tiles`` tiles, ``--chans`` coarse channels of
40 kHz fine channels, ``--timesteps`` 2-s integrations, noise and a narrow-band
transmitter) and times ``solve_observation`` (reading, corrections, normal matrices,
StEFCal) without RFI flagging (the anchor, as the earlier versions did), with it one
coarse channel at a time (``workers=1``, as inside a Dask worker's thread before), and
with it in the default worker processes (one per CPU, as ``observatory calib-solve``
runs it for a fit); alternating three times, medians and ratios.

Run: .venv/bin/python benchmarks/calib_observation.py [--tiles 32] [--chans 4] [--timesteps 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from observatory.archive.simulated import catalogue_point_source
from observatory.calib.solving import solve_observation
from observatory.telescope.simulator import RfiBurst, simulate_observation

OBSID = 1_450_324_816  # 3C353 60 degrees up


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--chans", type=int, default=4)
    parser.add_argument("--timesteps", type=int, default=16)
    args = parser.parse_args()
    source = catalogue_point_source("3C353")
    chans = tuple(range(109, 109 + args.chans))
    with tempfile.TemporaryDirectory(prefix="calib-obs-") as tmp:
        sim = simulate_observation(
            Path(tmp), OBSID, n_tiles=args.tiles, coarse_chans=chans,
            n_timesteps=args.timesteps, sources=[source], calibrator=source.name,
            gain_amplitude_scatter=0.1, delay_error_scatter_ns=2.0, noise_sigma_jy=2.0,
            rfi=[RfiBurst(chans[0], (12, 15), (args.timesteps // 4, args.timesteps // 2 + 1),
                          20_000.0)],
        )  # fmt: skip
        runs = {"plain": (False, None), "one": (True, 1), "processes": (True, None)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(3):
            for name, (flag_rfi, workers) in runs.items():
                started = time.perf_counter()
                solve_observation(sim.metafits_path, sim.vis_paths, source.name,
                                  flag_rfi=flag_rfi, workers=workers)  # fmt: skip
                times[name].append(time.perf_counter() - started)
    plain, one, processes = (statistics.median(times[name]) for name in runs)
    print(f"solve of {args.tiles} tiles x {args.chans} coarse channels x {args.timesteps} "
          f"integrations: {plain:.2f} s without RFI flagging; with it {one:.2f} s one channel "
          f"at a time ({one / plain:.2f} x), {processes:.2f} s in {os.cpu_count()} worker "
          f"processes ({processes / plain:.2f} x; {one / processes:.2f} x faster)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
