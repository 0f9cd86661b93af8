"""Real servers for tests: the observatory web server, a Dask scheduler and workers, on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A command in its own process group, killed (the whole group) on stop."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )  # fmt: skip

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 30) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=timeout_s)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it takes longer than 20 s."""
        try:
            self.kill(signal.SIGTERM, timeout_s=20)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for(url: str, timeout_s: float = 60, verify: bool | str = True) -> None:
    """Until ``url`` answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def observatory_server(
    data_dir: Path, port: int, env: dict[str, str] | None = None, *extra: str
) -> Process:
    """``observatory serve`` on 127.0.0.1:port (TLS when ``extra`` names a certificate)."""
    args = [
        str(BIN / "observatory"),
        "--data-dir",
        str(data_dir),
        "serve",
        "--port",
        str(port),
        *extra,
    ]
    return Process(args, data_dir.parent / f"server-{port}.log", env)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 (openssl), as (certificate, key)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
