"""ASVO service figures: get_jobs with 10,000 jobs, websocket latency, download-job overhead.

Serves the real app (with its job dispatcher on the in-process Dask cluster) with
uvicorn on 127.0.0.1 and talks to it over real HTTP and websocket connections:

* ``get_jobs`` for a user with 10,000 jobs (mixed states, completed ones with
  products): median latency; goal <= 150 ms. Anchor: ``/healthz`` in the same run.
* websocket: a job's state is changed in the database, and the time until the
  frame carrying it arrives is measured; goal median <= 200 ms.
* overhead of a download job for a small observation: submit to ``completed``,
  minus the time to write the same tar (copy time); goal <= 2 s.

Run: .venv/bin/python benchmarks/asvo_api.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
import websockets
from bench_common import free_port
from sqlalchemy import insert, update

from observatory.app import create_app
from observatory.archive.service import ingest_directory
from observatory.asvo.models import Job
from observatory.asvo.service import row_members_json
from observatory.core.accounts import create_user
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory, utcnow
from observatory.core.migrate import upgrade
from observatory.core.storage import Storage

MWA_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mwa"
API_KEY = "benchmark-key"
OBS_ID = 1320409688


def fill_jobs(database_url: str, user_id: int, n_jobs: int) -> None:
    # Finished jobs only: queued ones would really run (on the same CPU) during the timing.
    states = ["completed", "expired", "error", "cancelled", "completed"]
    now = utcnow()
    rows = []
    for n in range(n_jobs):
        state = states[n % len(states)]
        rows.append(
            {
                "user_id": user_id, "job_type": 1, "obs_id": OBS_ID, "state": state,
                "params": {"delivery": "acacia", "job_type": "download", "priority": 1,
                           "download_type": "vis", "obs_id": str(OBS_ID)},
                "request_key": f"bench-{n}", "delivery": "acacia", "priority": 1,
                "error_code": 1 if state == "error" else None,
                "error_text": "failed" if state == "error" else None,
                "created": now, "started": now, "completed": now,
                "product": {"files": [{"type": "acacia", "name": f"{OBS_ID}_{n}_vis.tar",
                                       "size": 481280, "sha1": "0" * 40}]} if state == "completed" else None,
                "cancel_requested": False, "deleted": False, "updated": now,
            }
        )  # fmt: skip
    for row in rows:  # as the ORM would store them (bulk insert bypasses its events)
        row["row_json"] = row_members_json(Job(**row))
    engine = make_engine(database_url)
    with engine.begin() as connection:
        for start in range(0, len(rows), 5_000):
            connection.execute(insert(Job), rows[start : start + 5_000])
    engine.dispose()


def median_ms(client: httpx.Client, path: str, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        client.get(path).raise_for_status()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


async def websocket_latency_ms(
    url: str, cookie: str, database_url: str, job_id: int, repeats: int
) -> list[float]:
    engine = make_engine(database_url)
    samples = []
    async with websockets.connect(
        url, additional_headers={"Cookie": f"MWA_JOB_COOKIE={cookie}"}, max_size=None
    ) as socket:
        # The first frames are the current rows.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(socket.recv(), timeout=1.0)
            except TimeoutError:
                break
        for n in range(repeats):
            # Terminal states only, so that the dispatcher leaves the job alone.
            state = ("cancelled", "error", "expired")[n % 3]
            start = time.perf_counter()
            with engine.begin() as connection:
                connection.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(state=state, error_text=f"change {n}", updated=utcnow())
                )
            while True:
                frame = json.loads(await socket.recv())
                if frame["row"]["id"] == job_id and frame["row"]["job_state"] == state:
                    break
            samples.append((time.perf_counter() - start) * 1000)
            await asyncio.sleep(0.05)
    engine.dispose()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="asvobench-") as tmp:
        settings = Settings(data_dir=Path(tmp))
        upgrade(settings.resolved_database_url)
        engine = make_engine(settings.resolved_database_url)
        with make_session_factory(engine)() as session:
            ingest_directory(session, Storage(settings.archive_dir), MWA_DATA)
            create_user(session, "bench", API_KEY)
            busy, _ = create_user(session, "busy", "busy-key")
            busy_id = busy.id
            session.commit()
        engine.dispose()
        fill_jobs(settings.resolved_database_url, busy_id, args.jobs)

        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings, run_jobs=True),
                host="127.0.0.1",
                port=port,
                log_level="warning",
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        try:
            busy_client = httpx.Client(base_url=base, timeout=60)
            busy_client.post(
                "/api/api_login", auth=("mantaray-clientv2.0", "busy-key")
            ).raise_for_status()
            healthz_ms = median_ms(busy_client, "/healthz", args.repeats)
            get_jobs_ms = median_ms(busy_client, "/api/get_jobs", args.repeats)
            n_rows = len(busy_client.get("/api/get_jobs").json())

            client = httpx.Client(base_url=base, timeout=60)
            client.post("/api/api_login", auth=("mantaray-clientv2.0", API_KEY)).raise_for_status()
            # Download-job overhead: submit -> completed, minus writing the same tar.
            overheads = []
            for n in range(5):
                start = time.perf_counter()
                reply = client.post("/api/download_vis_job", data={"obs_id": str(OBS_ID), "download_type": "vis",
                                                                    "allow_resubmit": "true"})  # fmt: skip
                reply.raise_for_status()
                job_id = reply.json()["job_id"]
                while True:
                    rows = {e["row"]["id"]: e["row"] for e in client.get("/api/get_jobs").json()}
                    if rows[job_id]["job_state"] in ("completed", "error"):
                        break
                    time.sleep(0.02)
                total_s = time.perf_counter() - start
                assert rows[job_id]["job_state"] == "completed", rows[job_id]
                copy_start = time.perf_counter()
                with tarfile.open(Path(tmp) / f"copy{n}.tar", "w") as tar:
                    for path in sorted((settings.archive_dir / str(OBS_ID)).iterdir()):
                        tar.add(path, arcname=path.name)
                copy_s = time.perf_counter() - copy_start
                overheads.append(total_s - copy_s)
            cookie = client.cookies["MWA_JOB_COOKIE"]
            latencies = asyncio.run(
                websocket_latency_ms(f"ws://127.0.0.1:{port}/api/job_results", cookie,
                                     settings.resolved_database_url, job_id, args.repeats)
            )  # fmt: skip
        finally:
            server.should_exit = True
            thread.join(timeout=30)

    ws_ms = statistics.median(latencies)
    overhead_s = statistics.median(overheads)
    print(f"get_jobs with {n_rows} jobs: median {get_jobs_ms:.1f} ms ({get_jobs_ms / healthz_ms:.0f}x the "
          f"/healthz anchor {healthz_ms:.1f} ms); {get_jobs_ms / 150:.2f} of the 150 ms goal "
          f"({'meets' if get_jobs_ms <= 150 else 'MISSES'})")  # fmt: skip
    print(f"websocket state change -> frame: median {ws_ms:.0f} ms (max {max(latencies):.0f}); "
          f"{ws_ms / 200:.2f} of the 200 ms goal ({'meets' if ws_ms <= 200 else 'MISSES'})")  # fmt: skip
    print(f"download job overhead (submit -> completed, minus the tar copy): median {overhead_s:.2f} s; "
          f"{overhead_s / 2:.2f} of the 2 s goal ({'meets' if overhead_s <= 2 else 'MISSES'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
