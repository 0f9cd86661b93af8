"""What several benchmarks share: loopback ports, waiting for a server, curl, product files."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import blake3
import httpx

from observatory.asvo.models import Job
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory, utcnow

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, timeout_s: float = 30) -> None:
    """Until ``url`` answers (any status below 500)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def curl_mb_s(url: str, output: str = "/dev/null") -> float:
    """Download ``url`` with curl (a C client, so the client is not the bottleneck); MB/s."""
    result = subprocess.run(
        ["curl", "-s", "-o", output, "-w", "%{speed_download} %{http_code}", url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    speed, code = result.stdout.split()
    if code != "200":
        raise RuntimeError(f"{url} answered {code}")
    return float(speed) / 1e6


def add_completed_product(
    settings: Settings, user_id: int, obsid: int, megabytes: int, blake3_published: bool = True
) -> Job:
    """A completed acacia job whose product is ``megabytes`` MiB of random bytes.

    Its real sha1 is published, and its blake3 unless ``blake3_published`` is false (as
    the MWA's servers do, so that clients verify sha1).
    """
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            job = Job(user_id=user_id, job_type=1, obs_id=obsid, state="completed", params={},
                      request_key=f"bench-{obsid}-{time.monotonic_ns()}", delivery="acacia",
                      priority=1, cancel_requested=False, deleted=False, completed=utcnow(),
                      product={"files": []})  # fmt: skip
            session.add(job)
            session.flush()
            name = f"{obsid}_{job.id}_vis.tar"
            path = settings.products_dir / str(job.id) / name
            path.parent.mkdir(parents=True)
            sha1, blake3_digest = hashlib.sha1(), blake3.blake3()
            with open(path, "wb") as handle:
                for _ in range(megabytes):
                    block = os.urandom(1 << 20)
                    sha1.update(block)
                    blake3_digest.update(block)
                    handle.write(block)
            # Both checksums, as the pipeline publishes them (mwa_client verifies BLAKE3).
            file = {"type": "acacia", "name": name, "size": path.stat().st_size,
                    "sha1": sha1.hexdigest()}  # fmt: skip
            if blake3_published:
                file["blake3"] = blake3_digest.hexdigest()
            job.product = {"files": [file]}
            session.commit()
            session.refresh(job)
            session.expunge(job)
            return job
    finally:
        engine.dispose()


def observatory_serve(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """``observatory serve`` on loopback, quiet."""
    return subprocess.Popen(
        [str(BIN / "observatory"), "--data-dir", str(data_dir), "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
