"""deploy/nginx.conf run by a real nginx (Debian's) in front of the app, on loopback ports.

The shipped file with only its placeholders replaced: the upstream (one worker here), the
listening ports, the certificate (self-signed) and the log path.
"""

from __future__ import annotations

import re
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from websockets.sync.client import connect

from backends import sqlite_only
from observatory.app import create_app
from observatory.core.accounts import create_user
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from servers import free_port, required_executable, threaded_app_server, wait_until

DEPLOYED = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"
API_KEY = "key-of-alice-behind-nginx"


def deployed_config(app_port: int, http_port: int, https_port: int, directory: Path) -> str:
    """deploy/nginx.conf with its placeholders replaced by this test's ports and files."""
    text = DEPLOYED.read_text()
    text = re.sub(
        r"(\n\s*server 127\.0\.0\.1:800[1-4][^\n]*)+", f"\n    server 127.0.0.1:{app_port};", text
    )
    text = re.sub(r"\n\s*listen \[::\]:[^\n]*", "", text)
    text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    text = text.replace("listen 443 ", f"listen 127.0.0.1:{https_port} ")
    text = text.replace("/etc/ssl/observatory/", f"{directory}/")
    text = text.replace("/var/log/nginx/", f"{directory}/")
    assert f"127.0.0.1:{app_port}" in text and f"127.0.0.1:{https_port}" in text
    return text


@contextmanager
def nginx_in_front(app_base: str, directory: Path) -> Iterator[str]:
    """nginx with the deployed configuration in front of ``app_base``; yields its https URL."""
    executable = required_executable(
        ("nginx",), "OBSERVATORY_REQUIRE_NGINX", "apt-get install nginx-light"
    )
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=observatory.example.org", "-keyout", str(directory / "privkey.pem"),
         "-out", str(directory / "fullchain.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    https_port = free_port()
    site = deployed_config(int(app_base.rsplit(":", 1)[1]), free_port(), https_port, directory)
    (directory / "observatory.conf").write_text(site)
    temporary = {name: directory / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    (directory / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {directory}/nginx.pid;\n"
        f"error_log {directory}/error.log;\nevents {{}}\nhttp {{\n"
        + "".join(
            f"  {name}_temp_path {path};\n"
            for name, path in (
                ("client_body", temporary["body"]),
                ("proxy", temporary["proxy"]),
                ("fastcgi", temporary["fastcgi"]),
                ("uwsgi", temporary["uwsgi"]),
                ("scgi", temporary["scgi"]),
            )
        )
        + f"  include {directory}/observatory.conf;\n}}\n"
    )
    main = ["-p", str(directory), "-c", str(directory / "nginx.conf")]
    checked = subprocess.run([executable, "-t", *main], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr  # the shipped file passes nginx -t
    process = subprocess.Popen([executable, *main], stderr=subprocess.PIPE)
    base = f"https://127.0.0.1:{https_port}"
    try:

        def answering() -> bool:
            try:
                return httpx.get(f"{base}/healthz", verify=False).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answering, 30, "nginx to answer")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


@sqlite_only
def test_the_deployed_nginx_config_passes_the_websocket_and_keeps_keys_out_of_its_log(
    settings: Settings, tmp_path: Path
) -> None:
    """Behind the shipped config the jobs websocket was refused (403): its location set
    headers of its own, so nginx passed on neither Host nor the scheme, and the app took the
    page's Origin for another site's. nginx 1.22 (Debian 12) refused the file (``http2 on``),
    and its access log held trigger calls' secure keys."""
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        create_user(session, "alice", API_KEY)
        session.commit()
    engine.dispose()
    directory = tmp_path / "nginx"
    directory.mkdir()
    with (
        threaded_app_server(create_app(settings)) as app_base,
        nginx_in_front(app_base, directory) as base,
    ):
        with httpx.Client(base_url=base, verify=False) as client:
            login = client.post("/api/api_login", auth=("mantaray-clientv2.0", API_KEY))
            assert login.status_code == 200, login.text
            cookie = client.cookies["MWA_JOB_COOKIE"]
            assert "Secure" in login.headers["set-cookie"]  # the scheme reached the app
            client.get(
                "/trigger/busy", params={"project_id": "G0001", "secure_key": "TOP-SECRET-KEY"}
            )
        unverified = ssl.create_default_context()
        unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
        with connect(
            f"wss://127.0.0.1:{base.rsplit(':', 1)[1]}/api/job_results", ssl=unverified,
            origin=base, additional_headers={"Cookie": f"MWA_JOB_COOKIE={cookie}"},  # type: ignore[arg-type]
            open_timeout=30,
        ) as socket:  # fmt: skip
            assert socket.response.status_code == 101
    access_log = (directory / "observatory.access.log").read_text()
    assert "GET /trigger/busy HTTP" in access_log and "TOP-SECRET-KEY" not in access_log
    assert 'GET /api/job_results HTTP/1.1" 101' in access_log
