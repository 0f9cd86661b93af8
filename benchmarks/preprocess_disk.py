"""Disk a conversion needs: peak space beside the output against the output's own size.

Simulates an observation (64 tiles, 8 coarse channels of 10 kHz channels, 16 integrations
of 2 s by default: 1.1 GB of correlator files), converts it with RFI flagging on, in
processes from the main thread as ``observatory preprocess`` does, and polls the output's
directory every 20 ms for the blocks allocated there (temporaries and scratch included).
Anchor: the finished output's size (a ratio of 1.00 means nothing beyond the output).
Also reports the wall time and the peak RSS of this process and of the largest worker.

Run: .venv/bin/python benchmarks/preprocess_disk.py [--output uvfits|ms|both] [--tiles 64]
     [--coarse-chans 8] [--timesteps 16] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

OBSID = 1320409688


def allocated_bytes(directory: Path) -> int:
    """Bytes allocated on disk by the files under ``directory`` (``st_blocks``)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # removed while walking
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", choices=["uvfits", "ms", "both"], default="uvfits")
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--coarse-chans", type=int, default=8)
    parser.add_argument("--timesteps", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from observatory.preprocess.engine import preprocess
    from observatory.preprocess.options import ConversionOptions
    from observatory.telescope.instrument import contiguous_coarse_chans
    from observatory.telescope.simulator import PointSource, simulate_observation
    from observatory.telescope.site import ensure_astropy_offline

    ensure_astropy_offline()
    work = Path(tempfile.mkdtemp(prefix="preprocess-disk-", dir="/tmp"))
    try:
        sim = simulate_observation(
            work / "sim", OBSID, n_tiles=args.tiles,
            coarse_chans=contiguous_coarse_chans(137, args.coarse_chans), fine_chan_khz=10,
            int_time_s=2.0, n_timesteps=args.timesteps,
            sources=[PointSource(333.6069, -17.0288, 60.0, -0.8, "3C444")],
        )  # fmt: skip
        out_dir = work / "out"
        out_dir.mkdir()
        peak_bytes = 0
        stop = threading.Event()

        def poll() -> None:
            nonlocal peak_bytes
            while not stop.is_set():
                peak_bytes = max(peak_bytes, allocated_bytes(out_dir))
                time.sleep(0.02)

        poller = threading.Thread(target=poll)
        options = ConversionOptions.from_params({"output": args.output})
        started = time.perf_counter()
        poller.start()
        try:
            preprocess(sim.metafits_path, sim.vis_paths, options, out_dir / "o",
                       workers=args.workers)  # fmt: skip
        finally:
            stop.set()
            poller.join()
        elapsed_s = time.perf_counter() - started
        output_bytes = allocated_bytes(out_dir)
        self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        workers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3
        print(f"{args.output}: {elapsed_s:.1f} s, output {output_bytes / 1e6:.0f} MB, peak disk "
              f"{peak_bytes / 1e6:.0f} MB = {peak_bytes / output_bytes:.2f} x the output; "
              f"peak RSS {self_mb:.0f} MB here, {workers_mb:.0f} MB in the largest worker")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
