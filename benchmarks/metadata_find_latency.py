"""/metadata/find over 100,000 observations: median latency of real HTTP requests.

Fills a fresh SQLite database (or OBSERVATORY_DATABASE_URL) with 100,000
observations, serves the app with uvicorn on 127.0.0.1 and times typical
queries (time window, project, mode, paging) with httpx. The anchor is the
same server's /healthz round trip measured in the same run; the goal is a
median of at most 20 ms.

Run: .venv/bin/python benchmarks/metadata_find_latency.py [--observations N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from bench_common import free_port
from sqlalchemy import insert

from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.core.config import Settings
from observatory.core.database import make_engine, utcnow
from observatory.core.migrate import upgrade

GOAL_MS = 20.0
PROJECTS = ["G0008", "G0009", "D0005", "C001", "G0055"]
MODES = ["MWAX_CORRELATOR", "MWAX_VCS", "HW_LFILES"]


def fill(database_url: str, n_observations: int) -> tuple[int, int]:
    """Insert ``n_observations`` back-to-back 120 s observations; return (first, last) obsid."""
    engine = make_engine(database_url)
    rng = np.random.default_rng(1)
    first = 1_300_000_000
    obsids = first + 128 * np.arange(n_observations)
    now = utcnow()
    rows = [
        {
            "obsid": int(obsid),
            "stoptime": int(obsid) + 120,
            "obsname": f"bench_{i}",
            "creator": "bench",
            "project_id": PROJECTS[i % len(PROJECTS)],
            "mode": MODES[i % len(MODES)],
            "ra_deg": float(rng.uniform(0, 360)),
            "dec_deg": float(rng.uniform(-90, 30)),
            "delays": [0] * 16,
            "coarse_chans": list(range(133, 157)),
            "calibration": i % 20 == 0,
            "deleted": False,
            "created_by": "bench",
            "created_at": now,
        }
        for i, obsid in enumerate(obsids)
    ]
    with engine.begin() as connection:
        for start in range(0, len(rows), 10_000):
            connection.execute(insert(Observation), rows[start : start + 10_000])
    engine.dispose()
    return int(obsids[0]), int(obsids[-1])


def timed_ms(
    client: httpx.Client, path: str, params: dict[str, object], repeats: int
) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        reply = client.get(path, params=params)
        samples.append((time.perf_counter() - start) * 1000)
        reply.raise_for_status()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--observations", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        upgrade(settings.resolved_database_url)
        fill_start = time.perf_counter()
        first, last = fill(settings.resolved_database_url, args.observations)
        fill_s = time.perf_counter() - fill_start
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        middle = (first + last) // 2
        queries = {
            "newest page": {},
            "one day window": {"mintime": middle, "maxtime": middle + 86_400},
            "project + mode": {"projectid": "G0009", "mode": "MWAX_CORRELATOR"},
            "deep page (before=obsid)": {"before": middle, "pagesize": 100},
            "deep page (page=500)": {"page": 500, "pagesize": 100},
            "calibrators in a week": {
                "mintime": middle,
                "maxtime": middle + 7 * 86_400,
                "calibration": "true",
            },
        }
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            timed_ms(client, "/healthz", {}, 5)  # warm up
            anchor_ms = statistics.median(timed_ms(client, "/healthz", {}, args.repeats))
            medians = {}
            for name, params in queries.items():
                timed_ms(client, "/metadata/find", params, 3)
                medians[name] = statistics.median(
                    timed_ms(client, "/metadata/find", params, args.repeats)
                )
        server.should_exit = True
        thread.join(timeout=10)
    overall = statistics.median(medians.values())
    print(f"filled {args.observations} observations in {fill_s:.1f} s")
    for name, value in medians.items():
        print(f"  {name:26s} median {value:7.2f} ms")
    print(f"/healthz anchor median {anchor_ms:.2f} ms")
    print(
        f"RESULT metadata_find: median {overall:.2f} ms over {args.observations} observations; "
        f"ratio to /healthz {overall / anchor_ms:.2f}; ratio to 20 ms goal {overall / GOAL_MS:.2f} "
        f"({sum(v <= GOAL_MS for v in medians.values())} of {len(medians)} queries within the goal)"
    )


if __name__ == "__main__":
    main()
