"""The ASVO service as a real server: TLS, kill -9 and restart, and a real Dask cluster."""

from __future__ import annotations

import hashlib
import os
import signal
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from observatory.core.config import Settings
from servers import (
    Process,
    dask_scheduler,
    dask_worker,
    free_port,
    https_observatory_server,
    observatory_server,
    seed,
    wait_for,
    wait_until,
)

API_KEY = "server-test-key"
TERMINAL = {"completed", "error", "cancelled", "expired"}


def login(base: str, verify: bool | str = True) -> httpx.Client:
    client = httpx.Client(base_url=base, verify=verify, timeout=30)
    reply = client.post("/api/api_login", auth=("mantaray-clientv2.0", API_KEY))
    assert reply.status_code == 200, reply.text
    return client


def jobs(client: httpx.Client) -> dict[int, dict[str, Any]]:
    return {e["row"]["id"]: e["row"] for e in client.get("/api/get_jobs").json()}


def check_products(client: httpx.Client, data_dir: Path) -> None:
    """Every job completed with exactly one product file whose bytes match its sha1."""
    rows = jobs(client)
    assert all(row["job_state"] == "completed" for row in rows.values()), rows
    for job_id, row in rows.items():
        (file,) = row["product"]["files"]
        assert [p.name for p in (data_dir / "products" / str(job_id)).iterdir()] == [
            file["url"].split("?")[0].rsplit("/", 1)[1]
        ]
        body = httpx.get(file["url"], timeout=60).content
        assert hashlib.sha1(body).hexdigest() == file["sha1"] and len(body) == file["size"]


def test_https_login_sets_a_secure_cookie(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    seed(data_dir, None, [], api_key=API_KEY)
    with https_observatory_server(data_dir) as (_server, port, cert):
        with httpx.Client(
            base_url=f"https://127.0.0.1:{port}",
            verify=ssl.create_default_context(cafile=str(cert)),
        ) as client:
            reply = client.post("/api/api_login", auth=("giant-squidv2.5.1", API_KEY))
            assert reply.status_code == 200
            assert "secure" in reply.headers["set-cookie"].lower()
            assert client.get("/api/get_jobs").json() == []
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_an_idle_https_keep_alive_connection_does_not_hold_a_stop(tmp_path: Path) -> None:
    """asyncio's TLS shutdown waits up to 30 s for an idle client's close_notify: cut it."""
    import socket
    import subprocess

    data_dir = tmp_path / "data"
    seed(data_dir, None, [], api_key=API_KEY)
    with https_observatory_server(data_dir) as (server, port, cert):
        context = ssl.create_default_context(cafile=str(cert))
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as idle,
        ):
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert idle.recv(4096).startswith(b"HTTP/1.1 200")  # then left open, idle
            os.killpg(server.process.pid, signal.SIGTERM)
            try:
                server.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the stop waited for the idle client:\n{server.output()[-2000:]}")


def test_the_server_stops_on_sigterm_after_a_websocket_came_and_went(tmp_path: Path) -> None:
    import subprocess

    import websockets.sync.client

    data_dir = tmp_path / "data"
    seed(data_dir, None, [], api_key=API_KEY)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = observatory_server(data_dir, port)
    try:
        wait_for(f"{base}/healthz")
        cookie = login(base).cookies["MWA_JOB_COOKIE"]
        for _ in range(3):
            with (
                websockets.sync.client.connect(
                    f"ws://127.0.0.1:{port}/api/job_results",
                    additional_headers={"Cookie": f"MWA_JOB_COOKIE={cookie}"},
                ) as socket,
                pytest.raises(TimeoutError),
            ):
                socket.recv(timeout=0.5)  # no jobs: nothing is sent, the handler polls
        # Each handler must notice its client left: uvicorn waits for them before it exits.
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not stop on SIGTERM:\n{server.output()[-2000:]}")
        assert "Waiting for background tasks" not in server.output()
    finally:
        server.stop()


def test_the_jobs_websocket_refuses_pages_of_other_origins(tmp_path: Path) -> None:
    """uvicorn answers a socket the handler refuses before accepting it with 403. Programs
    (no Origin, or websocket-client's: the origin of the address it connects to) and the
    portal's own page get in; over https behind a proxy the page's origin is https, as
    ``observatory serve`` believes X-Forwarded-Proto from 127.0.0.1 (docs/deploy.md)."""
    import websockets.exceptions
    import websockets.sync.client
    from websockets.typing import Origin

    data_dir = tmp_path / "data"
    seed(data_dir, None, [], api_key=API_KEY)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = observatory_server(data_dir, port, None, "--no-telescope")

    def opens(origin: str | None, **headers: str) -> bool:
        try:
            with websockets.sync.client.connect(
                f"ws://127.0.0.1:{port}/api/job_results",
                origin=None if origin is None else Origin(origin),
                additional_headers={"Cookie": f"MWA_JOB_COOKIE={cookie}", **headers},
            ) as socket:
                with pytest.raises(TimeoutError):
                    socket.recv(timeout=0.3)  # no jobs: open and quiet
                return True
        except websockets.exceptions.InvalidStatus as refused:
            assert refused.response.status_code == 403
            return False

    try:
        wait_for(f"{base}/healthz")
        cookie = login(base).cookies["MWA_JOB_COOKIE"]
        assert opens(None) and opens(base)
        assert not opens(f"http://127.0.0.1:{free_port()}")  # another port: the same site
        assert not opens("http://evil.example") and not opens(f"https://127.0.0.1:{port}")
        assert opens(f"https://127.0.0.1:{port}", **{"X-Forwarded-Proto": "https"})
        assert not opens(base, **{"X-Forwarded-Proto": "https"})
        assert "refused a job_results websocket from origin 'http://evil.example'" in (
            server.output()
        )
    finally:
        server.stop()


def test_jobs_finish_after_the_server_is_killed_and_restarted(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    obsids = [1320409688, 1320409720]  # 16 integrations of 2 s apart
    seed(data_dir, None, obsids, tiles=32, api_key=API_KEY)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = observatory_server(data_dir, port)
    try:
        wait_for(f"{base}/healthz")
        client = login(base)
        for obsid in obsids:
            client.post("/api/conversion_job", data={"obs_id": str(obsid)}).raise_for_status()
            client.post(
                "/api/download_vis_job", data={"obs_id": str(obsid), "download_type": "vis"}
            ).raise_for_status()
        wait_until(
            lambda: any(r["job_state"] in ("preprocessing", "completed") for r in jobs(client).values()),
            60, "a job to start",
        )  # fmt: skip
        server.kill(signal.SIGKILL)
        assert any(r["job_state"] not in TERMINAL for r in _rows_offline(data_dir).values())
        server = observatory_server(data_dir, port)
        wait_for(f"{base}/healthz")
        client = login(base)
        wait_until(
            lambda: all(r["job_state"] in TERMINAL for r in jobs(client).values()), 180, "all jobs"
        )
        check_products(client, data_dir)
    finally:
        server.stop()


def test_a_jobs_conversion_stops_when_its_server_is_killed(tmp_path: Path) -> None:
    """Killed outright (the OOM killer), the server takes its jobs' conversions with it: they
    would otherwise run on for jobs the restarted server runs again."""
    import psutil

    data_dir = tmp_path / "data"
    seed(data_dir, None, [1320409688], tiles=48, api_key=API_KEY)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = observatory_server(data_dir, port)
    try:
        wait_for(f"{base}/healthz")
        client = login(base)
        client.post("/api/conversion_job", data={"obs_id": "1320409688"}).raise_for_status()
        conversions: list[psutil.Process] = []

        def started() -> bool:
            conversions[:] = [
                child for child in psutil.Process(server.process.pid).children(recursive=True)
                if "preprocess" in " ".join(child.cmdline())
            ]  # fmt: skip
            return bool(conversions)

        wait_until(started, 60, "the conversion to start")
        os.kill(server.process.pid, signal.SIGKILL)  # the server alone, not its process group
        server.process.wait(timeout=30)
        _, alive = psutil.wait_procs(conversions, timeout=120)
        assert not alive
        # Stopped, not run to its end: it wrote no output (and removed its temporaries).
        assert not [p for p in (data_dir / "work").rglob("1320409688*")], "it ran on"
    finally:
        server.kill()


def _rows_offline(data_dir: Path) -> dict[int, dict[str, Any]]:
    from observatory.asvo.models import Job
    from observatory.core.database import make_engine, make_session_factory

    engine = make_engine(Settings(data_dir=data_dir).resolved_database_url)
    with make_session_factory(engine)() as session:
        rows = {job.id: {"job_state": job.state} for job in session.query(Job)}
    engine.dispose()
    return rows


@contextmanager
def seeded_cluster(tmp_path: Path, database_url: str) -> Iterator[tuple[Path, dict[str, str], Any]]:
    """A seeded data directory, a real scheduler with two workers, and a Dask client.

    Yields (data directory, environment for ``observatory serve``, client); the
    scheduler and workers are stopped at the end.
    """
    from distributed import Client

    data_dir = tmp_path / "data"
    seed(data_dir, database_url, [1320409688], tiles=48, api_key=API_KEY)
    scheduler_port = free_port()
    scheduler_address = f"tcp://127.0.0.1:{scheduler_port}"
    env = {
        "OBSERVATORY_DATABASE_URL": database_url,
        "OBSERVATORY_DASK_SCHEDULER": scheduler_address,
    }
    scheduler = dask_scheduler(scheduler_port, tmp_path / "scheduler.log")
    workers = [
        dask_worker(scheduler_address, tmp_path / f"worker{n}.log", env, name=f"w{n}")
        for n in range(2)
    ]
    try:
        with Client(scheduler_address, timeout=60) as dask_client:
            dask_client.wait_for_workers(2, timeout=60)
            yield data_dir, env, dask_client
    finally:
        for process in [*workers, scheduler]:
            process.stop()


def test_cluster_mode_survives_a_killed_worker(tmp_path: Path, migrated_db_url: str) -> None:
    if not migrated_db_url.startswith("postgresql"):
        pytest.skip(
            "cluster mode runs on PostgreSQL (the SQLite variant of this test is not meaningful)"
        )
    port = free_port()
    server = None
    with seeded_cluster(tmp_path, migrated_db_url) as (data_dir, env, dask_client):
        try:
            server = observatory_server(data_dir, port, env)
            base = f"http://127.0.0.1:{port}"
            wait_for(f"{base}/healthz")
            client = login(base)
            client.post("/api/conversion_job", data={"obs_id": "1320409688"}).raise_for_status()
            # Find the worker running the job and kill -9 it mid-way.
            busy: dict[str, Any] = {}
            wait_until(lambda: busy.update({w: k for w, k in dask_client.processing().items() if k}) or busy,
                       60, "the job to be running on a worker")  # fmt: skip
            wait_until(
                lambda: any(r["job_state"] == "preprocessing" for r in jobs(client).values()),
                60,
                "preprocessing",
            )
            (address,) = list(busy)
            pid = dask_client.run(os.getpid, workers=[address])[address]
            os.kill(pid, signal.SIGKILL)
            wait_until(
                lambda: all(r["job_state"] in TERMINAL for r in jobs(client).values()),
                240,
                "the job",
            )
            check_products(client, data_dir)
        finally:
            if server is not None:
                server.stop()


def test_cluster_mode_runs_a_job_once_across_a_second_runner_and_a_restart(
    tmp_path: Path, migrated_db_url: str
) -> None:
    # The operator's reproduction: a second `observatory serve` on the same database, then
    # SIGTERM of the first while its job preprocesses; its task keeps running on its Dask
    # worker. Before, both runners submitted the job (a key per submission, no lock) and
    # the two runs deleted each other's files: the job ended in error.
    if not migrated_db_url.startswith("postgresql"):
        pytest.skip("cluster mode runs on PostgreSQL")
    port, second_port = free_port(), free_port()
    servers: list[Process] = []
    with seeded_cluster(tmp_path, migrated_db_url) as (data_dir, env, _dask_client):
        try:
            first = observatory_server(data_dir, port, env)
            servers.append(first)
            wait_for(f"http://127.0.0.1:{port}/healthz")
            client = login(f"http://127.0.0.1:{port}")
            client.post("/api/conversion_job", data={"obs_id": "1320409688"}).raise_for_status()
            wait_until(
                lambda: any(r["job_state"] == "preprocessing" for r in jobs(client).values()),
                60,
                "preprocessing",
            )
            second = observatory_server(data_dir, second_port, env)
            servers.append(second)
            base = f"http://127.0.0.1:{second_port}"
            wait_for(f"{base}/healthz")
            wait_until(
                lambda: "another dispatcher holds" in second.output(), 60, "the standby line"
            )
            first.stop()  # SIGTERM mid-job: its task runs on
            wait_until(lambda: "dispatching" in second.output(), 60, "the second to take over")
            client = login(base)
            wait_until(
                lambda: all(r["job_state"] in TERMINAL for r in jobs(client).values()),
                240,
                "the job",
            )
            check_products(client, data_dir)
        finally:
            for process in servers:
                process.stop()
