"""What AOFlagger adds to a calibrator's solve: the whole solve of a simulated observation.

Simulates a calibrator observation (``--tiles`` tiles, ``--chans`` coarse channels of
40 kHz fine channels, ``--timesteps`` 2-s integrations, noise and a narrow-band
transmitter) and times ``solve_observation`` (reading, corrections, normal matrices,
StEFCal) without and with RFI flagging, alternating three times; reports the medians
and their ratio. The anchor is the solve without flagging, which the earlier versions did.

Run: .venv/bin/python benchmarks/calib_observation.py [--tiles 32] [--chans 4] [--timesteps 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from observatory.archive.simulated import catalogue_point_source
from observatory.calib.pipeline import solve_observation
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
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(3):
            for flag_rfi in (False, True):
                started = time.perf_counter()
                solve_observation(sim.metafits_path, sim.vis_paths, source.name, flag_rfi=flag_rfi)
                times[flag_rfi].append(time.perf_counter() - started)
    plain, flagged = statistics.median(times[False]), statistics.median(times[True])
    print(f"solve of {args.tiles} tiles x {args.chans} coarse channels x {args.timesteps} "
          f"integrations: {plain:.2f} s without RFI flagging, {flagged:.2f} s with "
          f"({flagged / plain:.2f} x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
