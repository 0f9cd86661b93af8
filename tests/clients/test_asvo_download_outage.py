"""A download survives its server's restart: it waits as the job list waits, then resumes.

A server of its own (stopped and started again on the same port), so that no other
test meets it stopped.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from observatory.clients import asvo
from servers import free_port, observatory_server, seed, wait_for, wait_until

API_KEY = "outage-test-key"
OBSID = 1104585920


class _TimeWatchingSleeps:
    """``time`` for the asvo module: real, but says when the client starts waiting."""

    def __init__(self) -> None:
        self.waiting = threading.Event()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        self.waiting.set()
        time.sleep(seconds)


def test_a_download_waits_for_a_restarting_server_and_resumes_the_part_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It gave up within two seconds ("Connection refused" three times), so `-w all` and
    full mode ended with exit 4 while the server restarted."""
    data_dir = tmp_path / "data"
    seed(data_dir, None, [OBSID], api_key=API_KEY, timesteps=8)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = observatory_server(data_dir, port)
    try:
        wait_for(f"{base_url}/healthz")
        with asvo.Session.login(API_KEY, base_url=base_url) as session:
            job_id = session.submit_download_job(OBSID, download_type="vis")

            def finished() -> bool:
                job = session.get_job(job_id)
                return job is not None and job.state in asvo.TERMINAL_STATES

            wait_until(finished, 120, f"job {job_id}")
            job = session.get_job(job_id)
            assert job is not None and job.state == "completed", job
            (file,) = job.files
            # An earlier run's partial download: the attempts after the restart resume it.
            product = (data_dir / "products" / str(job_id) / file.name).read_bytes()
            out_dir = tmp_path / "out"
            out_dir.mkdir()
            have = len(product) // 3
            (out_dir / f"{file.name}.part").write_bytes(product[:have])

            server.stop()  # restarting: connections are refused
            clock = _TimeWatchingSleeps()
            monkeypatch.setattr(asvo, "time", clock)
            outcome: dict[str, Any] = {}

            def download() -> None:
                try:
                    (outcome["result"],) = session.download_product(
                        job, out_dir, outage_limit_s=300
                    )
                except BaseException as exc:  # reported below
                    outcome["error"] = exc

            thread = threading.Thread(target=download, daemon=True)
            thread.start()
            # The client met the refusal and waits: the server comes back.
            wait_until(lambda: clock.waiting.is_set() or not thread.is_alive(), 60, "a refusal")
            server = observatory_server(data_dir, port)
            thread.join(300)
            assert not thread.is_alive()
    finally:
        server.stop()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.outcome == "resumed"
    assert result.bytes_transferred == len(product) - have
    assert (out_dir / file.name).read_bytes() == product
    assert not (out_dir / f"{file.name}.part").exists()
