"""One small ASVO-style conversion process, with numba's compilation cache and without.

Every ASVO conversion runs ``python -m observatory preprocess`` in a process of its own.
pyuvdata declares its baseline-number functions without numba's ``cache=True``, so each
process compiled them again; ``prepare_pyuvdata()`` now turns the cache on. This times the
whole command on a small simulated observation (8 tiles, 2 coarse channels, to ``.ms``,
one worker), alternating:

* anchor: a cold cache (``NUMBA_CACHE_DIR`` a new empty directory each run), what every
  conversion paid before;
* ours: the cache warmed once, as every conversion after the first on an installation.

Run: .venv/bin/python benchmarks/conversion_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from observatory.telescope.simulator import simulate_observation

OBSID = 1300000000


def convert_s(observation: Path, out: Path, cache_dir: Path) -> float:
    """Wall time of one conversion process with ``cache_dir`` as numba's cache."""
    files = sorted(str(path) for path in observation.glob(f"{OBSID}_*_ch*.fits"))
    command = [sys.executable, "-m", "observatory", "preprocess", "--metafits",
               str(observation / f"{OBSID}.metafits"), "--out", str(out), "--workers", "1", *files]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True,
                   env={**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)})  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        simulate_observation(root / "obs", OBSID, n_tiles=8, coarse_chans=(133, 134))
        warm = root / "warm-cache"
        convert_s(root / "obs", root / "first.ms", warm)  # fills the cache
        cold_s, warm_s = [], []
        for run in range(args.repeats):
            cold_s.append(
                convert_s(root / "obs", root / f"cold{run}.ms", root / f"cold-cache{run}")
            )
            warm_s.append(convert_s(root / "obs", root / f"warm{run}.ms", warm))
    anchor, ours = statistics.median(cold_s), statistics.median(warm_s)
    print(f"cold cache (anchor): {', '.join(f'{s:.2f}' for s in cold_s)} s, median {anchor:.2f} s")
    print(f"warm cache (ours):   {', '.join(f'{s:.2f}' for s in warm_s)} s, median {ours:.2f} s")
    print(f"saved per conversion: {anchor - ours:.2f} s; ours / anchor = {ours / anchor:.2f}")


if __name__ == "__main__":
    main()
