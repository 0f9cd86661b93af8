"""Conversion throughput and peak memory: our engine against the plain pyuvdata path.

Simulates an observation of realistic shape (128 tiles, 8 coarse channels of 32
fine channels, 16 integrations of 2 s by default: 1.1 GB), then converts it to uvfits,
averaging to 4 s and 80 kHz, in two fresh processes:

* ours: ``observatory.preprocess.preprocess`` (cable and digital-gain
  corrections, edge and quack flags, phasing to the phase centre; AOFlagger off
  because the pyuvdata path has no RFI flagging);
* anchor: what a user would script with pyuvdata:
  ``UVData.from_file(..., file_type="mwa_corr_fits", phase_to_pointing_center=True)``
  (its default corrections: cable lengths, digital gains, flagging of edges and
  quack time) -> ``frequency_average`` -> ``downsample_in_time`` -> ``write_uvfits``.

Each child reports its wall time and peak RSS (``ru_maxrss``). The input's
physical floor, reading the files raw (``cat > /dev/null``, from the page cache
as both conversions read them), is reported as well.
Goal: ours >= 3x faster than the anchor, peak RSS <= 0.5x.

``--output ms`` writes measurement sets on both sides (pyuvdata's ``write_ms``).
``--rfi`` turns AOFlagger on in ours (the anchor has no RFI flagging: then the
times are not comparable, the peak RSS is what to read), ``--in-thread`` runs ours
from a worker thread as the services do (chunks in threads rather than processes).

Run: .venv/bin/python benchmarks/preprocess_throughput.py [--tiles 128] [--coarse-chans 4]
     [--fine-chan-khz 10] [--output ms] [--rfi] [--in-thread]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

OBSID = 1320409688
GOAL_SPEEDUP = 3.0
GOAL_RSS_RATIO = 0.5


def simulate(out_dir: Path, args: argparse.Namespace) -> tuple[Path, list[Path]]:
    from observatory.telescope.instrument import contiguous_coarse_chans
    from observatory.telescope.simulator import PointSource, simulate_observation

    sim = simulate_observation(
        out_dir,
        OBSID,
        n_tiles=args.tiles,
        coarse_chans=contiguous_coarse_chans(137, args.coarse_chans),
        fine_chan_khz=args.fine_chan_khz,
        int_time_s=2.0,
        n_timesteps=args.timesteps,
        sources=[PointSource(333.6069, -17.0288, 60.0, -0.8, "3C444")],
        gain_amplitude_scatter=0.1,
        delay_error_scatter_ns=2.0,
        noise_sigma_jy=1.0,
        seed=1,
    )
    return sim.metafits_path, list(sim.vis_paths)


def run_ours(metafits: Path, files: list[Path], out: Path, rfi: bool, in_thread: bool) -> None:
    from observatory.preprocess.engine import preprocess
    from observatory.preprocess.options import ConversionOptions

    params = {"avg_time_res": "4", "avg_freq_res": "80", "output": out.suffix.lstrip(".")}
    if not rfi:
        params["no_rfi"] = "true"
    options = ConversionOptions.from_params(params)
    if not in_thread:
        preprocess(metafits, files, options, out)
        return
    failures: list[BaseException] = []

    def convert() -> None:
        try:
            preprocess(metafits, files, options, out)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    worker = threading.Thread(target=convert)
    worker.start()
    worker.join()
    if failures:
        raise failures[0]


def run_pyuvdata(metafits: Path, files: list[Path], out: Path, fine_chan_khz: float) -> None:
    from pyuvdata import UVData

    uvd = UVData.from_file(
        [str(metafits), *map(str, files)],
        file_type="mwa_corr_fits",
        phase_to_pointing_center=True,
    )
    uvd.frequency_average(n_chan_to_avg=round(80 / fine_chan_khz))  # to 80 kHz, as ours
    uvd.downsample_in_time(n_times_to_avg=2)
    if out.suffix == ".ms":
        uvd.write_ms(str(out))
    else:
        uvd.write_uvfits(str(out))


def child(
    which: str, metafits: Path, files: list[Path], out: Path, args: argparse.Namespace
) -> None:
    """Run one conversion in this process and print its time and peak RSS as JSON."""
    from observatory.telescope.site import ensure_astropy_offline

    ensure_astropy_offline()
    # Imports are not part of a conversion: load them before the clock starts.
    import pyuvdata  # noqa: F401

    import observatory.preprocess.engine  # noqa: F401

    start = time.perf_counter()
    if which == "ours":
        run_ours(metafits, files, out, args.rfi, args.in_thread)
    else:
        run_pyuvdata(metafits, files, out, args.fine_chan_khz)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def measure(
    which: str, metafits: Path, files: list[Path], out: Path, args: argparse.Namespace
) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--metafits",
        str(metafits),
        "--out",
        str(out),
        "--fine-chan-khz",
        str(args.fine_chan_khz),
        *(["--rfi"] if args.rfi else []),
        *(["--in-thread"] if args.in_thread else []),
    ]
    result = subprocess.run(
        [*command, *map(str, files)], capture_output=True, text=True, check=True
    )
    if out.is_dir():
        shutil.rmtree(out)
    out.unlink(missing_ok=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def raw_read_seconds(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=128)
    parser.add_argument("--coarse-chans", type=int, default=8)
    parser.add_argument("--timesteps", type=int, default=16)
    parser.add_argument("--fine-chan-khz", type=float, default=40.0, help="10, 20 or 40")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", choices=["uvfits", "ms"], default="uvfits")
    parser.add_argument("--rfi", action="store_true", help="AOFlagger on in ours")
    parser.add_argument("--in-thread", action="store_true", help="ours from a worker thread")
    parser.add_argument("--child", choices=["ours", "pyuvdata"])
    parser.add_argument("--metafits", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.metafits, args.files, args.out, args)
        return 0

    from observatory.telescope.site import ensure_astropy_offline

    ensure_astropy_offline()
    with tempfile.TemporaryDirectory(prefix="ppbench-") as tmp:
        root = Path(tmp)
        metafits, files = simulate(root / "obs", args)
        input_mb = sum(p.stat().st_size for p in files) / 1e6
        ours, anchor, raw = [], [], []
        for repeat in range(args.repeats):
            order = ("ours", "pyuvdata") if repeat % 2 == 0 else ("pyuvdata", "ours")
            for which in order:
                out = root / f"{which}.{args.output}"
                result = measure(which, metafits, files, out, args)
                (ours if which == "ours" else anchor).append(result)
            raw.append(raw_read_seconds(files))

    ours_s = statistics.median(r["seconds"] for r in ours)
    anchor_s = statistics.median(r["seconds"] for r in anchor)
    ours_rss = max(r["peak_rss_mb"] for r in ours)
    anchor_rss = max(r["peak_rss_mb"] for r in anchor)
    raw_s = statistics.median(raw)
    speedup = anchor_s / ours_s
    rss_ratio = ours_rss / anchor_rss
    print(
        f"observation: {args.tiles} tiles, {args.coarse_chans} coarse channels of "
        f"{args.fine_chan_khz:g} kHz channels, {args.timesteps} x 2 s, {input_mb:.0f} MB of "
        f"correlator files, to {args.output}; {args.repeats} runs each; ours with RFI flagging "
        f"{'on' if args.rfi else 'off'}, {'in a thread' if args.in_thread else 'from the main thread'}"
    )
    print(f"ours: median {ours_s:.2f} s ({input_mb / ours_s:.0f} MB/s), peak RSS {ours_rss:.0f} MB")
    print(
        f"pyuvdata path: median {anchor_s:.2f} s ({input_mb / anchor_s:.0f} MB/s), peak RSS {anchor_rss:.0f} MB"
    )
    print(f"raw read (cat > /dev/null): median {raw_s:.3f} s ({input_mb / raw_s:.0f} MB/s)")
    print(
        f"preprocess_throughput: {speedup:.2f}x faster than the pyuvdata path "
        f"({'meets' if speedup >= GOAL_SPEEDUP else 'MISSES'} goal >= {GOAL_SPEEDUP}x), "
        f"peak RSS ratio {rss_ratio:.2f} ({'meets' if rss_ratio <= GOAL_RSS_RATIO else 'MISSES'} "
        f"goal <= {GOAL_RSS_RATIO}); {raw_s / ours_s:.2f} of the raw-read rate"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
