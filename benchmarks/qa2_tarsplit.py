"""tarsplit throughput: ``write_pieces`` (split at 500M, md5 sidecars) against GNU ``tar -cf``.

Builds a delivery package of ``--size-gb`` GB (default 2) in a temporary directory
under /tmp, laid out as the packager makes it: measurement-set directories with a
few large table files (three quarters of the bytes) and many small ones (1 KiB to
256 KiB), plus qa, log and product files; random bytes throughout. Both tools then
archive the same tree from the page cache (it is read once first, and nothing is
dropped from the cache), alternating over ``--repeats`` runs; medians are compared.

* anchor: ``tar -cf <out>/anchor.tar <project>``, run in the package's parent
  directory (one archive, no checksum);
* ours: ``observatory.packaging.tarsplit.write_pieces`` with a 500 MiB limit, so
  it really splits, computing each piece's md5 and writing its ``.md5sum`` sidecar.

Outputs are deleted and ``sync`` is called before each timed run, so neither tool
inherits the other's dirty pages. Goal: anchor_time / our_time >= 0.8.

Run: .venv/bin/python benchmarks/qa2_tarsplit.py [--size-gb 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from observatory.packaging.tarsplit import write_pieces

PROJECT = "2011.0.00229.S"
GOAL_RATIO = 0.8
MAX_SIZE_BYTES = 500 * 1024**2
LARGE_FILE_BYTES = 300 * 10**6
CHUNK_BYTES = 4 << 20
SMALL_TABLES = ("ANTENNA", "DATA_DESCRIPTION", "FEED", "FIELD", "FLAG_CMD", "HISTORY",
                "OBSERVATION", "POINTING", "POLARIZATION", "PROCESSOR", "SOURCE",
                "SPECTRAL_WINDOW", "STATE", "SYSCAL", "WEATHER")  # fmt: skip


def write_random(path: Path, size_bytes: int) -> None:
    with open(path, "wb") as handle:
        for offset in range(0, size_bytes, CHUNK_BYTES):
            handle.write(os.urandom(min(CHUNK_BYTES, size_bytes - offset)))


def build_package(root: Path, total_bytes: int) -> tuple[Path, int, int]:
    """A package of about ``total_bytes``; (its path, number of files, bytes of data)."""
    rng = random.Random(2011)
    package = root / PROJECT
    member = package / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id"
    for section in ("raw", "calibrated", "calibration", "script", "qa", "log", "product"):
        (member / section).mkdir(parents=True)
    (member / "README").write_text("benchmark delivery\n")
    uids = [f"uid___A002_X3c9295_X{n:x}" for n in range(0x8C, 0x8C + 4)]
    sets = [member / "raw" / f"{u}.ms.split" for u in uids]
    sets += [member / "calibrated" / f"{u}.ms.split.cal" for u in uids]
    large_count = max(1, round(0.75 * total_bytes / LARGE_FILE_BYTES))
    large_bytes = int(0.75 * total_bytes) // large_count
    files, written = 0, 0
    for n in range(large_count):
        ms = sets[n % len(sets)]
        ms.mkdir(exist_ok=True)
        write_random(ms / f"table.f{20 + n}_TSM1", large_bytes)
        files, written = files + 1, written + large_bytes
    n = 0
    while written < total_bytes:
        ms = sets[n % len(sets)]
        table = ms / SMALL_TABLES[(n // len(sets)) % len(SMALL_TABLES)]
        table.mkdir(parents=True, exist_ok=True)
        size = min(rng.randrange(1024, 256 * 1024), total_bytes - written)
        write_random(table / f"table.f{n // (len(sets) * len(SMALL_TABLES))}", size)
        files, written, n = files + 1, written + size, n + 1
    for name in ("X8c__qa2_part1.png", "X8c__textfile.txt"):
        write_random(member / "qa" / name, 50_000)
    write_random(member / "log" / "ipython.log", 20_000)
    write_random(member / "product" / "calibrated_all_setup3_b6.clean.fits", 80_000)
    return package, files + 4, written + 200_000


def warm(package: Path) -> None:
    """Read every file once, so that both tools read from the page cache."""
    for path in package.rglob("*"):
        if path.is_file():
            with open(path, "rb", buffering=0) as handle:
                while handle.read(CHUNK_BYTES):
                    pass


def clear(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    os.sync()


def time_anchor(package: Path, out: Path) -> float:
    clear(out)
    start = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out / "anchor.tar"), package.name], cwd=package.parent,
                   check=True)  # fmt: skip
    return time.perf_counter() - start


def time_ours(package: Path, out: Path) -> tuple[float, int]:
    clear(out)
    start = time.perf_counter()
    tars = write_pieces(package, "2012-06-20", out, MAX_SIZE_BYTES)
    return time.perf_counter() - start, len(tars)


def md5_mb_s() -> float:
    """hashlib.md5 on one core over an in-memory buffer: the floor for one tar's digest."""
    block = memoryview(os.urandom(CHUNK_BYTES))
    digest = hashlib.md5()
    start = time.perf_counter()
    for _ in range(64):
        digest.update(block)
    return 64 * CHUNK_BYTES / 1e6 / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("tar") is None:
        raise SystemExit("GNU tar is needed for the anchor")

    root = Path(tempfile.mkdtemp(prefix="qa2-tarsplit-bench-", dir="/tmp"))
    try:
        package, n_files, data_bytes = build_package(root / "pkg", int(args.size_gb * 1e9))
        out = root / "out"
        warm(package)
        anchor, ours, pieces = [], [], 0
        for repeat in range(args.repeats):
            order = ("anchor", "ours") if repeat % 2 == 0 else ("ours", "anchor")
            for which in order:
                if which == "anchor":
                    anchor.append(time_anchor(package, out))
                else:
                    seconds, pieces = time_ours(package, out)
                    ours.append(seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    anchor_s, ours_s = statistics.median(anchor), statistics.median(ours)
    mb = data_bytes / 1e6
    ratio = anchor_s / ours_s
    cpus = len(os.sched_getaffinity(0))
    md5_rate = md5_mb_s()
    print(f"package: {mb:.0f} MB in {n_files} files; {args.repeats} runs each, {cpus} CPUs")
    print(
        f"md5 alone: {md5_rate:.0f} MB/s on one core, so hashing {mb:.0f} MB needs at least "
        f"{mb / md5_rate / min(cpus, pieces):.2f} s on {min(cpus, pieces)} cores"
    )
    print(f"GNU tar -cf (anchor): median {anchor_s:.2f} s ({mb / anchor_s:.0f} MB/s), "
          f"runs {', '.join(f'{s:.2f}' for s in anchor)}")  # fmt: skip
    print(f"write_pieces (500M pieces + md5): median {ours_s:.2f} s ({mb / ours_s:.0f} MB/s), "
          f"{pieces} tars, runs {', '.join(f'{s:.2f}' for s in ours)}")  # fmt: skip
    print(
        f"qa2_tarsplit: anchor/ours = {ratio:.2f} "
        f"({'meets' if ratio >= GOAL_RATIO else 'MISSES'} goal >= {GOAL_RATIO})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
