"""mwa_client download throughput: four products in parallel against one curl of one product.

Registers four completed jobs whose products are ``--megabytes`` MiB each (random
bytes, real sha1 and blake3), starts ``observatory serve`` on loopback, and times
``mwa_client -w all`` (four parallel downloads written to disk and checksum-verified)
against ``curl`` fetching one of the products from the same server (one stream,
written to the same disk; to /dev/null too, the loopback limit). Runs interleaved.

curl's figure is its own ``speed_download``: bytes over the transfer, from connecting
to the last byte. Ours is measured the same way, from the client's first
"Downloading:" line to its exit (the last file verified and renamed), and also for
the whole command (Python's start, login and listing included). Goal: the client's
aggregate throughput >= 0.8x the single curl.

Run: .venv/bin/python benchmarks/mwa_client_download.py [--megabytes 256] [--repeats 9] [--sha1-only]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import (
    BIN,
    add_completed_product,
    curl_mb_s,
    free_port,
    observatory_serve,
    wait_for,
)

from observatory.core.accounts import create_user
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from observatory.core.migrate import upgrade

API_KEY = "benchmark-client-key"


def curl_tee_sha1sum_s(urls: list[str], out_dir: Path) -> float:
    """Seconds for the same work done by C programs: per product ``curl | tee | sha1sum``."""
    shutil.rmtree(out_dir)
    out_dir.mkdir()
    os.sync()
    started = time.perf_counter()
    pipelines = [
        subprocess.Popen(f"curl -s '{url}' | tee {out_dir}/c{i} | sha1sum > /dev/null", shell=True)
        for i, url in enumerate(urls)
    ]
    if any(pipeline.wait() for pipeline in pipelines):
        raise RuntimeError("a curl | tee | sha1sum pipeline failed")
    return time.perf_counter() - started


def mwa_client_download_s(env: dict[str, str], out_dir: Path) -> tuple[float, float]:
    """Seconds of ``mwa_client -w all``: the whole command, and its downloads alone.

    The downloads start at the first "Downloading:" line (printed, and flushed, as the
    first request is sent) and end when the client exits, every file verified.
    """
    started = time.perf_counter()
    client = subprocess.Popen(
        [str(BIN / "mwa_client"), "-w", "all", "-d", str(out_dir)],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdout is not None
    first_download = None
    for line in client.stdout:
        if first_download is None and line.startswith("Downloading:"):
            first_download = time.perf_counter()
    if client.wait():
        raise RuntimeError(f"mwa_client exited with {client.returncode}")
    ended = time.perf_counter()
    if first_download is None:
        raise RuntimeError("mwa_client downloaded nothing")
    return ended - started, ended - first_download


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--sha1-only", action="store_true",
        help="publish only sha1, as the MWA's servers do: the client verifies sha1",
    )  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clientbench-") as tmp:
        root = Path(tmp)
        settings = Settings(data_dir=root / "data")
        upgrade(settings.resolved_database_url)
        engine = make_engine(settings.resolved_database_url)
        with make_session_factory(engine)() as session:
            user, _ = create_user(session, "bench", API_KEY)
            session.commit()
            user_id = user.id
        engine.dispose()
        jobs = [
            add_completed_product(
                settings, user_id, 1320409688 + 8 * i, args.megabytes, not args.sha1_only
            )
            for i in range(4)
        ]
        total_bytes = sum(job.product["files"][0]["size"] for job in jobs)
        port = free_port()
        server = observatory_serve(settings.data_dir, port)
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "MWA_ASVO_API_KEY": API_KEY, "MWA_ASVO_HOST": "127.0.0.1",
               "MWA_ASVO_PORT": str(port), "MWA_ASVO_HTTPS": "0"}  # fmt: skip
        out_dir = root / "out"
        try:
            wait_for(f"{base}/healthz")
            client = httpx.Client(base_url=base)
            client.post("/api/api_login", auth=("mantaray-clientv2.0", API_KEY)).raise_for_status()
            urls = [
                e["row"]["product"]["files"][0]["url"] for e in client.get("/api/get_jobs").json()
            ]
            one_url = urls[0]
            curl_mb_s(one_url)  # warm the page cache and the server
            single, single_null, parallel, whole, c_pipeline = [], [], [], [], []
            for _ in range(args.repeats):
                shutil.rmtree(out_dir, ignore_errors=True)
                out_dir.mkdir()
                # Each timing starts with no dirty pages: the disk's writeback of an
                # earlier run would otherwise slow down whichever run came next.
                os.sync()
                single_null.append(curl_mb_s(one_url))
                single.append(curl_mb_s(one_url, str(out_dir / "curl.tar")))
                (out_dir / "curl.tar").unlink()
                os.sync()
                command_s, downloads_s = mwa_client_download_s(env, out_dir)
                whole.append(total_bytes / command_s / 1e6)
                parallel.append(total_bytes / downloads_s / 1e6)
                assert sum(p.stat().st_size for p in out_dir.iterdir()) == total_bytes
                c_pipeline.append(total_bytes / curl_tee_sha1sum_s(urls, out_dir) / 1e6)
        finally:
            server.terminate()
            server.wait(timeout=30)
    single_mb_s, parallel_mb_s = statistics.median(single), statistics.median(parallel)
    ratio = parallel_mb_s / single_mb_s
    print(
        f"4 products of {args.megabytes} MiB, {args.repeats} runs, loopback, {os.cpu_count()} CPUs"
    )
    null_mb_s, whole_mb_s = statistics.median(single_null), statistics.median(whole)
    print(f"mwa_client_download: mwa_client -w all, 4 parallel downloads written and "
          f"{'sha1' if args.sha1_only else 'blake3'}-verified, {parallel_mb_s:.0f} MB/s vs one curl writing the product to the "
          f"same disk {single_mb_s:.0f} MB/s, ratio {ratio:.2f} "
          f"({'meets' if ratio >= 0.8 else 'MISSES'} goal >= 0.8); the whole command (start, "
          f"login, listing) {whole_mb_s:.0f} MB/s, ratio {whole_mb_s / single_mb_s:.2f}; vs one "
          f"curl to /dev/null (the loopback limit) {null_mb_s:.0f} MB/s, ratio "
          f"{parallel_mb_s / null_mb_s:.2f}; the same work in C, 4 x (curl | tee | sha1sum), "
          f"{statistics.median(c_pipeline):.0f} MB/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
