"""Throughput of the telescope simulator against plain ``numpy.tofile``.

Simulates a full-array MWAX correlator observation (128 tiles by default) and
measures MB/s of everything written (metafits, FITS visibilities, truth JSON).
The anchor, measured in the same run and the same directory, writes the same
number of bytes of ready-made float32 data with ``numpy.ndarray.tofile``.

Both are timed until the bytes are durable (``os.sync`` inside the timing): a
write that has only reached the page cache is not written, and without the sync
the anchor swings between disk speed and memory-copy speed from run to run. The
goal is a ratio (simulator / anchor) of at least 0.5 on that comparison. The same
pair is also measured in memory (``/dev/shm``), which shows the simulator's
computing cost against a pure memory copy; that ratio is reported, not a goal.

Run: .venv/bin/python benchmarks/simulator_throughput.py [--tiles 128] [--coarse-chans 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from observatory.telescope.instrument import contiguous_coarse_chans
from observatory.telescope.simulator import PointSource, simulate_observation
from observatory.telescope.site import ensure_astropy_offline

GOAL_RATIO = 0.5
OBSID = 1320409688
SOURCES = (
    PointSource(333.6069, -17.0288, 60.0, -0.8, "3C444"),
    PointSource(336.0, -21.0, 12.0, -0.6),
    PointSource(330.5, -14.0, 8.0, -0.7),
)


def simulate(out_dir: Path, args: argparse.Namespace) -> tuple[int, float]:
    """Run the simulator once; return (bytes written, seconds until durable)."""
    os.sync()  # earlier runs' writeback must not count here
    start = time.perf_counter()
    sim = simulate_observation(
        out_dir,
        OBSID,
        n_tiles=args.tiles,
        coarse_chans=contiguous_coarse_chans(137, args.coarse_chans),
        fine_chan_khz=args.fine_chan_khz,
        int_time_s=args.int_time_s,
        n_timesteps=args.timesteps,
        sources=SOURCES,
        gain_amplitude_scatter=0.1,
        delay_error_scatter_ns=2.0,
        noise_sigma_jy=args.noise_sigma_jy,
        seed=1,
    )
    os.sync()
    seconds = time.perf_counter() - start
    return sim.total_bytes, seconds


def anchor(out_dir: Path, n_bytes: int) -> float:
    """Seconds until ``n_bytes`` of ready float32 data written with ``tofile`` are durable."""
    data = np.random.default_rng(0).standard_normal(n_bytes // 4, dtype=np.float32)
    path = out_dir / "anchor.bin"
    os.sync()
    start = time.perf_counter()
    data.tofile(path)
    os.sync()
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def compare(root: Path, args: argparse.Namespace) -> tuple[int, float, float]:
    """Median simulator and anchor MB/s over ``args.repeats`` interleaved runs in ``root``."""
    # Warm-up: imports, astropy's first coordinate transforms, the layout table.
    simulate_observation(root / "warmup", OBSID, n_tiles=2, sources=SOURCES[:1])
    # A first run gives the byte count for the anchor (the output is deterministic).
    n_bytes, _ = simulate(root / "probe", args)
    for path in (root / "probe").iterdir():
        path.unlink()
    sim_rates, anchor_rates = [], []
    for repeat in range(args.repeats):
        run_dir = root / f"run{repeat}"
        # Alternate which goes first so neither always meets a busier disk.
        if repeat % 2:
            n_bytes, seconds = simulate(run_dir, args)
            anchor_seconds = anchor(root, n_bytes)
        else:
            anchor_seconds = anchor(root, n_bytes)
            n_bytes, seconds = simulate(run_dir, args)
        sim_rates.append(n_bytes / seconds / 1e6)
        anchor_rates.append(n_bytes / anchor_seconds / 1e6)
        for path in run_dir.iterdir():
            path.unlink()
    return n_bytes, statistics.median(sim_rates), statistics.median(anchor_rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=128)
    parser.add_argument("--coarse-chans", type=int, default=4)
    parser.add_argument("--timesteps", type=int, default=16)
    parser.add_argument("--fine-chan-khz", type=float, default=40.0)
    parser.add_argument("--int-time-s", type=float, default=2.0)
    parser.add_argument("--noise-sigma-jy", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=None, help="disk directory to write in (default: a temp dir)"
    )
    args = parser.parse_args()

    ensure_astropy_offline()
    targets = [("disk, durable", args.dir)]
    if Path("/dev/shm").is_dir():
        targets.append(("memory (/dev/shm)", Path("/dev/shm")))
    print(
        f"observation: {args.tiles} tiles, {args.coarse_chans} coarse channels x "
        f"{1280 / args.fine_chan_khz:g} fine, {args.timesteps} x {args.int_time_s:g} s, "
        f"{args.repeats} runs per target"
    )
    for label, where in targets:
        with tempfile.TemporaryDirectory(dir=where, prefix="simbench-") as tmp:
            n_bytes, sim_mb_s, anchor_mb_s = compare(Path(tmp), args)
        ratio = sim_mb_s / anchor_mb_s
        verdict = ""
        if label.startswith("disk"):
            verdict = f" ({'meets' if ratio >= GOAL_RATIO else 'MISSES'} goal >= {GOAL_RATIO})"
        print(
            f"simulator_throughput [{label}]: {n_bytes / 1e6:.0f} MB, simulator "
            f"{sim_mb_s:.0f} MB/s vs numpy.tofile {anchor_mb_s:.0f} MB/s, ratio {ratio:.2f}{verdict}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
