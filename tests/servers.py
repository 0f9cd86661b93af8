"""Real servers for tests: the observatory web server, a Dask scheduler and workers, on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

BIN = Path(sys.executable).parent


def required_executable(names: tuple[str, ...], required_by: str, install_hint: str) -> str:
    """The first of ``names`` on PATH (or in /usr/sbin); skips the test when there is none,
    and fails it when the environment variable ``required_by`` is 1 (CI, which installs it)."""
    import shutil

    for name in names:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin")
        if path is not None:
            return path
    message = f"{names[0]} is not installed ({install_hint})"
    if os.environ.get(required_by) == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now.

    Taken below the kernel's ephemeral range (32768 up), so no outgoing connection is
    given it meanwhile; under pytest-xdist each worker draws from its own slice of
    20000-31999, so two workers never probe the same port.
    """
    worker_number = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    slice_size = 12000 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    first = 20000 + worker_number * slice_size
    while True:
        port = random.randrange(first, first + slice_size)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # taken: draw again
                continue
        return port


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


def dask_scheduler(port: int, log: Path) -> Process:
    """A real ``dask scheduler`` on 127.0.0.1:``port`` (no dashboard)."""
    return Process([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                    "--no-dashboard"], log)  # fmt: skip


def dask_worker(
    address: str, log: Path, env: dict[str, str] | None = None, name: str | None = None
) -> Process:
    """A real one-thread ``dask worker`` of the scheduler at ``address``."""
    named = ["--name", name] if name is not None else []
    return Process([str(BIN / "dask"), "worker", address, "--host", "127.0.0.1",
                    "--nthreads", "1", "--no-dashboard", *named], log, env)  # fmt: skip


@contextmanager
def threaded_app_server(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 in a thread of this process; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 60, "the server to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def wait_for(url: str, timeout_s: float = 60, verify: bool | str = True) -> None:
    """Until ``url`` answers 200."""
    deadline = time.monotonic() + timeout_s
    if isinstance(verify, str):
        verify = ssl.create_default_context(cafile=verify)
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
    """A certificate for localhost and 127.0.0.1 (openssl), as (certificate, key): not a CA's,
    as rustls (giant-squid) demands of a server's (docs/asvo.md)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:FALSE"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@contextmanager
def https_observatory_server(data_dir: Path) -> Iterator[tuple[Process, int, Path]]:
    """``observatory serve`` with TLS (a self-signed certificate beside ``data_dir``) on a
    free port, answering; yields (process, port, certificate) and stops it afterwards."""
    cert, key = self_signed_certificate(data_dir.parent)
    port = free_port()
    server = observatory_server(
        data_dir, port, None, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)
    )
    try:
        wait_for(f"https://127.0.0.1:{port}/healthz", verify=str(cert))
        yield server, port, cert
    finally:
        server.stop()


def seed(
    data_dir: Path,
    database_url: str | None,
    obsids: list[int],
    *,
    api_key: str,
    tiles: int = 16,
    timesteps: int = 16,
    user: str = "dave",
) -> None:
    """A user with ``api_key`` and simulated correlator observations, through the CLI."""
    from observatory.cli import main

    env_url = {"OBSERVATORY_DATABASE_URL": database_url} if database_url else {}
    old = {k: os.environ.get(k) for k in env_url}
    os.environ.update(env_url)
    try:
        created = main(["--data-dir", str(data_dir), "users", "create", user, "--api-key", api_key])
        assert created == 0
        for obsid in obsids:
            assert main(["--data-dir", str(data_dir), "simulate", "observation", "--obsid", str(obsid),
                         "--tiles", str(tiles), "--coarse-chans", "133,134,135,136",
                         "--timesteps", str(timesteps), "--source", "0,-27,20"]) == 0  # fmt: skip
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    """Until ``predicate()`` is true (AssertionError naming ``what`` after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int | None = None
) -> None:
    """Copy ``reader`` to ``writer``; after ``limit`` bytes hold the connection open, silent."""
    sent = 0
    try:
        while data := await reader.read(65536):
            if limit is not None:
                data = data[: max(0, limit - sent)]
                if not data:
                    await asyncio.sleep(3600)  # stalled
            writer.write(data)
            sent += len(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


class _LoopbackProxy:
    """A proxy on 127.0.0.1 in a thread of its own; ``_handle`` serves a connection."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the proxy (open connections are dropped)."""

        async def cancel_connections() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_connections(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class StallingProxy(_LoopbackProxy):
    """A TCP proxy to ``127.0.0.1:target_port`` that can freeze product downloads part-way.

    When ``stall_after_bytes`` is set, a connection whose first request is a product
    download (``GET /api/download/...``) passes that many response bytes and then
    nothing more, so a client can be killed in the middle of a file. The request
    heads of downloads are kept in ``download_requests``.
    """

    def __init__(self, target_port: int, stall_after_bytes: int | None = None) -> None:
        self.target_port = target_port
        self.stall_after_bytes = stall_after_bytes
        self.download_requests: list[str] = []
        super().__init__()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        first = await client_r.read(65536)
        is_download = first.startswith(b"GET /api/download/")
        if is_download:
            self.download_requests.append(first.split(b"\r\n\r\n")[0].decode("latin-1"))
        server_w.write(first)
        limit = self.stall_after_bytes if is_download else None
        await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w, limit))


class ForwardProxy(_LoopbackProxy):
    """An HTTP forward proxy (what ``http_proxy`` / ``https_proxy`` point to), loopback only.

    Plain requests arrive with an absolute URL and are forwarded (one request per
    connection: ``Connection: close`` is added); ``CONNECT host:port`` opens a tunnel.
    The request lines seen are kept in ``request_lines``. With ``credentials``
    (``user:password``) a request without them (Basic ``Proxy-Authorization``) gets 407.
    """

    def __init__(self, credentials: str | None = None) -> None:
        self.request_lines: list[str] = []
        self.credentials = credentials
        super().__init__()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        head = await client_r.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.request_lines.append(request_line)
        method, target, version = request_line.split(" ")
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
            given = [h.split(":", 1)[1].strip() for h in header_lines
                     if h.lower().startswith("proxy-authorization:")]  # fmt: skip
            if given != [expected]:
                client_w.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                               b"Proxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n")  # fmt: skip
                await client_w.drain()
                client_w.close()
                return
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            assert host in ("127.0.0.1", "localhost"), "loopback only"
            server_r, server_w = await asyncio.open_connection(host, int(port))
            client_w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await client_w.drain()
        else:
            url = urlsplit(target)
            assert url.hostname in ("127.0.0.1", "localhost"), "loopback only"
            server_r, server_w = await asyncio.open_connection(url.hostname, url.port or 80)
            path = url.path + (f"?{url.query}" if url.query else "")
            kept = [
                h for h in header_lines if h and not h.lower().startswith(("connection:", "proxy-"))
            ]
            forwarded = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close"])
            server_w.write(forwarded.encode("latin-1") + b"\r\n\r\n")
        await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))


@contextmanager
def handler_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """``handler`` answering on a loopback port, in a thread; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class CallbackReceiver:
    """A loopback HTTP receiver of JSON POSTs that answers 500 to its first ``failures`` calls."""

    def __init__(self, failures: int) -> None:
        self.bodies: list[dict[str, Any]] = []
        #: The Host header of each call.
        self.hosts: list[str | None] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.bodies.append(body)
                receiver.hosts.append(self.headers["Host"])
                status = 500 if len(receiver.bodies) <= receiver.failures else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/calibrated"
