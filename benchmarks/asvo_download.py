"""Product download throughput: our signed-URL endpoint against nginx serving the same file.

Writes a product file (512 MB by default), registers it as a completed job's
product, starts ``observatory serve`` and nginx (Debian package) on loopback,
and downloads the file from each with curl (a C client, so the client is not the
bottleneck), interleaved. Goal: ours >= 0.8x nginx.

Run: .venv/bin/python benchmarks/asvo_download.py [--megabytes 512]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench_common import add_completed_product, curl_mb_s, free_port, observatory_serve, wait_for

from observatory.core.accounts import create_user
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from observatory.core.migrate import upgrade
from observatory.core.security import sign_value

NGINX_CONF = """
{user}
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        print("nginx is not installed (apt-get install nginx): no anchor, no figure")
        return 1
    with tempfile.TemporaryDirectory(prefix="dlbench-") as tmp:
        root = Path(tmp)
        settings = Settings(data_dir=root / "data")
        upgrade(settings.resolved_database_url)
        engine = make_engine(settings.resolved_database_url)
        with make_session_factory(engine)() as session:
            user, _ = create_user(session, "bench", "bench-key")
            session.commit()
            user_id = user.id
        engine.dispose()
        job = add_completed_product(settings, user_id, 1320409688, args.megabytes)
        job_id, name = job.id, job.product["files"][0]["name"]
        product = settings.products_dir / str(job_id) / name
        token = sign_value(f"{job_id}/{name}", settings.secret_key_bytes())

        ours_port, nginx_port = free_port(), free_port()
        server = observatory_serve(settings.data_dir, ours_port)
        prefix = root / "nginx"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        # As root, nginx's workers would drop to an account that cannot read the temp dir.
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(
            NGINX_CONF.format(user=user, prefix=prefix, port=nginx_port, root=product.parent)
        )
        web = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(prefix)], stderr=subprocess.DEVNULL
        )
        try:
            ours_url = f"http://127.0.0.1:{ours_port}/api/download/{job_id}/{name}?token={token}"
            nginx_url = f"http://127.0.0.1:{nginx_port}/{name}"
            wait_for(f"http://127.0.0.1:{ours_port}/healthz")
            wait_for(nginx_url)
            curl_mb_s(ours_url), curl_mb_s(nginx_url)  # warm the page cache and both servers
            ours, anchor = [], []
            for _ in range(args.repeats):
                ours.append(curl_mb_s(ours_url))
                anchor.append(curl_mb_s(nginx_url))
        finally:
            server.terminate()
            web.terminate()
            server.wait(timeout=30)
            web.wait(timeout=30)
    ours_mb_s, nginx_mb_s = statistics.median(ours), statistics.median(anchor)
    ratio = ours_mb_s / nginx_mb_s
    print(f"{args.megabytes} MB product, {args.repeats} downloads each with curl on loopback")
    print(f"asvo_download: ours {ours_mb_s:.0f} MB/s vs nginx {nginx_mb_s:.0f} MB/s, ratio {ratio:.2f} "
          f"({'meets' if ratio >= 0.8 else 'MISSES'} goal >= 0.8)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
