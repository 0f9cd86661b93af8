"""What an operator hits when the installation around the service is wrong.

An unmigrated database, a data directory that is not mounted, a database that hangs or
refuses, a wrong URL, a typo in a setting, a broken config file, an unhandled error:
each must be reported in one clear line (CLI) or a clear readiness answer (HTTP), never
a hang, a traceback or a password.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DataError

from observatory import cli
from observatory.app import create_app
from observatory.core import observability
from observatory.core.config import Settings
from observatory.core.database import make_engine
from observatory.core.observability import check_readiness
from observatory.core.storage import Storage
from servers import free_port

#: Long enough for anything bounded here; a hang is anything longer.
HANG_GUARD_S = 60


# ----------------------------------------------------------------------------------------------
# Helpers: a database server that never answers, a port nothing listens on


class SilentServer:
    """A TCP server on loopback that accepts connections and never sends a byte."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def postgres_url(port: int, password: str = "S3cretPW") -> str:
    return f"postgresql+psycopg://observatory:{password}@127.0.0.1:{port}/observatory"


def bounded(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``function`` in a thread; fail (instead of hanging the suite) if it takes too long."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), f"{function.__name__} hung for more than {HANG_GUARD_S} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def run_cli(*args: str) -> int:
    return int(cli.main(list(args)))


# ----------------------------------------------------------------------------------------------
# 1. Readiness means the service can work


def test_readyz_refuses_an_unmigrated_database(db_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with TestClient(create_app(Settings(data_dir=data, database_url=db_url))) as client:
        reply = client.get("/readyz")
    assert reply.status_code == 503, reply.text
    body = reply.json()
    assert body["status"] == "not ready: database"
    assert body["database"].startswith("not migrated")
    assert "observatory db upgrade" in body["database"]
    assert body["data_dir"] == "ok"


def test_readyz_names_a_database_migrated_by_a_newer_version(
    migrated_db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It advised `observatory db upgrade`, which then failed (a revision it does not ship);
    and every probe logged Alembic's two context lines without a request id."""
    from sqlalchemy import text

    engine = make_engine(migrated_db_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))
    engine.dispose()
    data = tmp_path / "data"
    data.mkdir()
    with (
        caplog.at_level(logging.INFO),
        TestClient(create_app(Settings(data_dir=data, database_url=migrated_db_url))) as client,
    ):
        reply = client.get("/readyz")
    assert reply.status_code == 503, reply.text
    state = reply.json()["database"]
    assert state.startswith("migrated by a newer version (at revision 0099_future")
    assert "db upgrade" not in state
    assert not [
        r for r in caplog.records if r.getMessage().startswith(("Context impl", "Will assume"))
    ]


def test_readyz_ready_when_migrated(migrated_db_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with TestClient(create_app(Settings(data_dir=data, database_url=migrated_db_url))) as client:
        reply = client.get("/readyz")
    assert reply.status_code == 200, reply.text
    assert reply.json() == {
        "status": "ready",
        "database": "ok",
        "dask": "not used",
        "data_dir": "ok",
    }


def test_readyz_names_a_missing_data_dir_and_serving_does_not_create_it(
    migrated_db_url: str, tmp_path: Path
) -> None:
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    data = mount_point / "observatory"  # the share is not mounted
    app = create_app(Settings(data_dir=data, database_url=migrated_db_url))
    with TestClient(app) as client:
        reply = client.get("/readyz")
        assert client.get("/metadata/fits", params={"obs_id": "1320409688"}).status_code >= 400
    assert reply.status_code == 503, reply.text
    body = reply.json()
    assert body["status"] == "not ready: data_dir"
    assert body["data_dir"].startswith(f"missing: {data}")
    assert not data.exists()  # nothing was made on the disk below the mount point


def test_a_page_needing_the_signing_key_answers_503_while_the_data_dir_is_missing(
    migrated_db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """GET /login made the missing data directory with a new random key; /readyz then said
    ready, and this worker signed with another key than the others."""
    (tmp_path / "mnt").mkdir()
    data = tmp_path / "mnt" / "observatory"  # the share is not mounted
    app = create_app(Settings(data_dir=data, database_url=migrated_db_url))
    with caplog.at_level(logging.INFO), TestClient(app) as client:
        page = client.get("/login", headers={"accept": "text/html"})
        api = client.get("/login")
        ready = client.get("/readyz")
    assert page.status_code == 503, page.text
    assert "storage is not available" in page.text and str(data) not in page.text
    assert page.headers["content-type"].startswith("text/html")
    assert api.status_code == 503
    # The path is for the operator (the log line), not for every visitor.
    assert api.json()["error"] == "service unavailable: its storage is not available"
    assert api.json()["error_code"] == 503
    assert api.headers["retry-after"]
    assert not data.exists()
    assert ready.status_code == 503 and ready.json()["status"] == "not ready: data_dir"
    warnings = [r for r in caplog.records if r.name == "observatory.core.errors"]
    assert warnings and all(r.levelno == logging.WARNING and not r.exc_info for r in warnings)
    assert f"data directory {data} does not exist" in warnings[0].getMessage()
    assert "is the shared file system mounted?" in warnings[0].getMessage()


def test_storage_makes_its_root_but_not_a_missing_parent(tmp_path: Path) -> None:
    Storage(tmp_path / "archive")
    assert (tmp_path / "archive").is_dir()
    storage = Storage(tmp_path / "unmounted" / "archive")
    assert not (tmp_path / "unmounted").exists()
    storage.write_bytes("1/x.bin", b"x")  # an explicit write makes what it needs
    assert storage.read_bytes("1/x.bin") == b"x"


def test_serve_warns_of_a_missing_data_dir_and_does_not_create_it(
    migrated_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import uvicorn

    def run(server: uvicorn.Server) -> None:
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", migrated_db_url)
    (tmp_path / "mnt").mkdir()
    data = tmp_path / "mnt" / "observatory"
    assert run_cli("--data-dir", str(data), "serve", "--port", "1", "--no-telescope") == 0
    err = capsys.readouterr().err
    assert f"data directory {data} does not exist" in err
    assert not data.exists()


# ----------------------------------------------------------------------------------------------
# 2. A hung database: bounded readiness, bounded connects, bounded shutdown


def test_readyz_does_not_hang_on_a_database_that_never_answers(
    silent_server: SilentServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    app = create_app(Settings(data_dir=data, database_url=postgres_url(silent_server.port)))
    with TestClient(app) as client:
        reply = bounded(client.get, "/readyz")
    assert reply.status_code == 503
    assert reply.json()["database"].startswith("unreachable")


def test_readyz_names_a_refused_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    app = create_app(Settings(data_dir=data, database_url=postgres_url(free_port())))
    with TestClient(app) as client:
        reply = bounded(client.get, "/readyz")
    assert reply.status_code == 503
    assert reply.json()["database"] == "unreachable (OperationalError)"
    assert reply.json()["status"] == "not ready: database"


def test_pages_and_api_answer_503_while_the_database_is_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopped database gave '500 internal server error' on every page and API call,
    each logged as an ERROR with a traceback."""
    data = tmp_path / "data"
    data.mkdir()
    app = create_app(Settings(data_dir=data, database_url=postgres_url(free_port())))
    with caplog.at_level(logging.INFO), TestClient(app) as client:
        api = bounded(client.get, "/metadata/obs", params={"obs_id": "1320409688"})
        page = bounded(client.get, "/observations", headers={"accept": "text/html"})
        ready = bounded(client.get, "/readyz")
        alive = client.get("/healthz")
    assert api.status_code == 503, api.text
    assert api.json() == {
        "error": "database unavailable: it cannot be reached (OperationalError); try again later",
        "error_code": 503,
    }
    assert api.headers["retry-after"]
    assert page.status_code == 503 and page.headers["content-type"].startswith("text/html")
    assert "database unavailable" in page.text
    assert ready.status_code == 503 and ready.json()["database"].startswith("unreachable")
    assert alive.status_code == 200
    logged = [r for r in caplog.records if r.name == "observatory.core.errors"]
    assert len(logged) == 2
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in logged)
    assert "S3cretPW" not in caplog.text


def test_an_unmigrated_database_is_answered_503_naming_the_upgrade(
    db_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with TestClient(create_app(Settings(data_dir=data, database_url=db_url))) as client:
        reply = client.get("/metadata/obs", params={"obs_id": "1320409688"})
    assert reply.status_code == 503, reply.text
    assert "schema is not migrated" in reply.json()["error"]
    assert "observatory db upgrade" in reply.json()["error"]


def test_a_missing_table_in_a_migrated_database_is_a_bug_not_an_upgrade_to_run(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """Any missing table was answered 503 'run observatory db upgrade', a database at the
    head revision too (a model without its migration), which db upgrade cannot mend."""
    from observatory.core.database import make_engine as engine_for

    data = tmp_path / "data"
    data.mkdir()
    engine = engine_for(migrated_db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE observations RENAME TO observations_gone"))
    finally:
        engine.dispose()
    app = create_app(Settings(data_dir=data, database_url=migrated_db_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        reply = client.get("/metadata/obs", params={"obs_id": "1320409688"})
    assert reply.status_code == 500, reply.text


def test_a_bad_query_is_not_taken_for_an_unavailable_database(tmp_path: Path) -> None:
    """Only connection-level errors and missing tables are outages: a bug stays a 500."""
    from sqlalchemy.exc import DBAPIError

    from observatory.core.errors import database_unavailable_reason

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    try:
        with engine.connect() as connection:
            connection.execute(text("CREATE TABLE t (a INTEGER)"))
            for bad in ("SELEC 1", "SELECT b FROM t"):
                with pytest.raises(DBAPIError) as caught:
                    connection.execute(text(bad))
                assert database_unavailable_reason(caught.value) is None, bad
            with pytest.raises(DBAPIError) as caught:
                connection.execute(text("SELECT a FROM missing"))
            assert database_unavailable_reason(caught.value) is not None
    finally:
        engine.dispose()


def test_a_database_check_is_waited_for_with_a_timeout_and_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    calls: list[int] = []

    def hang(_engine: object, _timeout_s: float) -> str:
        calls.append(1)
        release.wait(HANG_GUARD_S)
        return "ok"

    monkeypatch.setattr(observability, "_database_state", hang)
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    try:
        for _ in range(3):
            ready, body = bounded(
                check_readiness, engine, None, data_dir=tmp_path, database_timeout_s=0.2
            )
            assert not ready and body["database"] == "unreachable (no answer within 0.2 s)"
        assert len(calls) == 1  # later probes do not pile up threads behind the hung one
    finally:
        release.set()
        engine.dispose()


def test_postgres_connections_have_a_connect_timeout(silent_server: SilentServer) -> None:
    engine = make_engine(postgres_url(silent_server.port))
    try:
        with pytest.raises(Exception, match="timeout"):
            bounded(engine.connect)
    finally:
        engine.dispose()


def test_serve_shuts_down_within_a_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    seen: list[uvicorn.Server] = []

    def run(server: uvicorn.Server) -> None:
        seen.append(server)
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    assert run_cli("--data-dir", str(tmp_path / "d"), "serve", "--port", "1", "--no-telescope") == 0
    (server,) = seen
    # As the web unit's --timeout-graceful-shutdown 30: requests still running are cancelled.
    assert server.config.timeout_graceful_shutdown == 30

    # A handler stuck in a thread cannot be cancelled: after a deadline the process exits.
    exited = threading.Event()
    monkeypatch.setattr(cli, "GRACEFUL_SHUTDOWN_S", 0)
    monkeypatch.setattr(cli, "SHUTDOWN_MARGIN_S", 0.05)
    monkeypatch.setattr(os, "_exit", lambda status: exited.set())
    server.handle_exit(15, None)
    assert server.should_exit
    assert exited.wait(HANG_GUARD_S), "no exit after the shutdown deadline"


# ----------------------------------------------------------------------------------------------
# 3. Passwords are never printed


def test_mask_url() -> None:
    from observatory.core.database import mask_url

    assert (
        mask_url("postgresql+psycopg://observatory:S3cretPW@db:5432/obs?connect_timeout=5")
        == "postgresql+psycopg://observatory:***@db:5432/obs?connect_timeout=5"
    )
    assert mask_url("sqlite:////srv/x.sqlite3") == "sqlite:////srv/x.sqlite3"
    assert "S3cretPW" not in mask_url("not a url://u:S3cretPW@h")


def test_db_upgrade_prints_the_url_without_its_password(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    if db_url.startswith("sqlite"):  # no password to hide: give it one the URL ignores
        monkeypatch.setenv("OBSERVATORY_DATABASE_URL", db_url)
        assert run_cli("--data-dir", str(tmp_path), "db", "upgrade") == 0
        assert "up to date" in capsys.readouterr().out
        return
    from sqlalchemy.engine import make_url

    password = make_url(db_url).password
    assert password
    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", db_url)
    assert run_cli("--data-dir", str(tmp_path), "db", "upgrade") == 0
    out = capsys.readouterr().out
    assert "up to date" in out and ":***@" in out
    assert f":{password}@" not in out


# ----------------------------------------------------------------------------------------------
# 4. Database failures and bad numbers are one line and exit 2


def one_error_line(capsys: Any) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in captured.err and "S3cretPW" not in captured.err + captured.out
    return lines[0]


def test_refused_connection_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    port = free_port()
    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", postgres_url(port))
    assert bounded(run_cli, "--data-dir", str(tmp_path), "db", "upgrade") == 2
    line = one_error_line(capsys)
    assert f"127.0.0.1:{port}/observatory" in line and "Connection refused" in line


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgres://observatory:S3cretPW@127.0.0.1/obs", "no backend 'postgres'"),
        ("mysql://observatory:S3cretPW@127.0.0.1/obs", "driver is not installed"),
        ("nonsense", "is not a URL"),
        # an unescaped '@' in the password: its rest was printed as the host
        ("postgresql+psycopg://observatory:S3cret@S3cretPW@127.0.0.1/obs", "more than one '@'"),
    ],
)
def test_unsupported_urls_are_one_line(
    url: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", url)
    assert run_cli("--data-dir", str(tmp_path), "db", "upgrade") == 2
    line = one_error_line(capsys)
    assert says in line and "postgresql+psycopg://" in line
    from observatory.core.database import DatabaseURLError

    with pytest.raises(DatabaseURLError):
        make_engine(url)


def _real_postgres() -> str:
    url = os.environ.get("OBSERVATORY_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("PostgreSQL not configured (set OBSERVATORY_TEST_POSTGRES_URL)")
    return url


@pytest.mark.parametrize("wrong", ["password", "database"])
def test_wrong_password_or_database_is_one_line(
    wrong: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(_real_postgres())
    if wrong == "password":
        url = url.set(password="S3cretPW")
    else:
        url = url.set(database="no_such_database_here")
    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", url.render_as_string(hide_password=False))
    assert bounded(run_cli, "--data-dir", str(tmp_path), "db", "upgrade") == 2
    line = one_error_line(capsys)
    assert f"{url.host}:{url.port or 5432}/{url.database}" in line
    expected = "password authentication failed" if wrong == "password" else "does not exist"
    assert expected in line


def test_unknown_revision_is_one_line(
    migrated_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    engine = make_engine(migrated_db_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dfeedbeef'"))
    engine.dispose()
    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", migrated_db_url)
    assert run_cli("--data-dir", str(tmp_path), "db", "upgrade") == 2
    line = one_error_line(capsys)
    assert "f00dfeedbeef" in line and "newer version" in line


@pytest.mark.parametrize(
    "args",
    [
        ["projects", "create", "Y", "--priority", "99999999999"],
        ["simulate", "observation", "--obsid", "99999999999999999999"],
    ],
)
def test_out_of_range_numbers_exit_2(args: list[str], tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(SystemExit) as caught:
        run_cli("--data-dir", str(tmp_path / "d"), *args)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "out of range" in err and "Traceback" not in err


def test_a_value_the_database_refuses_is_described(migrated_db_url: str) -> None:
    from observatory.core.database import describe_database_error

    engine = make_engine(migrated_db_url)
    try:
        with engine.connect() as connection:
            try:
                # Beyond a PostgreSQL integer (SQLite stores it: then there is nothing to refuse).
                connection.execute(text("SELECT CAST(99999999999 AS INTEGER)")).scalar()
            except DataError as exc:
                message = describe_database_error(exc, migrated_db_url)
                assert message is not None and "out of range" in message
                assert "refused a value" in message
            else:
                assert engine.dialect.name == "sqlite"
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------------------------
# 5. Unhandled errors: JSON 500 and a log line with the request id


def test_an_unhandled_error_is_json_and_logged_with_the_request_id(
    settings: Settings, json_lines: io.StringIO
) -> None:
    app: FastAPI = create_app(settings)

    @app.get("/test-crash")
    def crash() -> None:
        raise RuntimeError("broken on purpose")

    with TestClient(app, raise_server_exceptions=False) as client:
        reply = client.get("/test-crash", headers={"X-Request-ID": "crash-1"})
        page = client.get("/test-crash", headers={"Accept": "text/html", "X-Request-ID": "c2"})
    assert reply.status_code == 500
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "error": "internal server error (request id crash-1)",
        "error_code": 500,
    }
    assert reply.headers["x-request-id"] == "crash-1"
    assert page.status_code == 500 and "request id c2" in page.text
    assert page.headers["content-type"].startswith("text/html")

    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    tracebacks = [
        line for line in lines if "RuntimeError: broken on purpose" in line.get("exc_info", "")
    ]
    assert tracebacks, lines
    assert all(line["request_id"] in ("crash-1", "c2") for line in tracebacks)
    assert any(line["request_id"] == "crash-1" and line["level"] == "ERROR" for line in tracebacks)
    # The message itself names it too: text logs (the default) have no request_id field.
    assert any("(request id crash-1)" in line["message"] for line in tracebacks)
    access = [line for line in lines if line["logger"] == "observatory.access"]
    assert any(line["request_id"] == "crash-1" and line["status"] == 500 for line in access)


def test_a_client_that_goes_away_is_no_server_error(
    settings: Settings, json_lines: io.StringIO
) -> None:
    """A client that closed its connection before its form was read was logged as an
    "unhandled error" with a traceback, and counted a 5xx."""
    from starlette.requests import ClientDisconnect

    app: FastAPI = create_app(settings)

    @app.post("/test-gone")
    def gone() -> None:
        raise ClientDisconnect  # what reading the form raises when the client has gone

    with TestClient(app, raise_server_exceptions=False) as client:
        client.post("/test-gone", headers={"X-Request-ID": "gone-1"})
        metrics = client.get("/metrics").text
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    assert not [line for line in lines if line["level"] == "ERROR"], lines
    access = [line for line in lines if line["logger"] == "observatory.access"]
    assert any(line["request_id"] == "gone-1" and line["status"] == 499 for line in access)
    assert 'route="/test-gone",status_class="4xx"' in metrics
    assert 'route="/test-gone",status_class="5xx"' not in metrics


# ----------------------------------------------------------------------------------------------
# 6, 7. Settings: a typo is refused, a broken file is named


@pytest.mark.parametrize("value", ["Full", "bogus", ""])
def test_an_unknown_outage_is_refused(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("OBSERVATORY_ASVO_OUTAGE", value)
    with pytest.raises(ValidationError, match="asvo_outage"):
        Settings()
    assert run_cli("--data-dir", str(tmp_path), "db", "upgrade") == 2
    line = one_error_line(capsys)
    assert "OBSERVATORY_ASVO_OUTAGE" in line and "'none', 'partial' or 'full'" in line
    assert repr(value) in line


def test_a_setting_written_in_json_that_is_not_json_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Every other setting named its variable; this one said 'error parsing value for field
    "asvo_min_client_versions" from source "EnvSettingsSource"'."""
    monkeypatch.setenv("OBSERVATORY_ASVO_MIN_CLIENT_VERSIONS", "notjson")
    assert run_cli("--data-dir", str(tmp_path), "db", "upgrade") == 2
    line = one_error_line(capsys)
    assert "OBSERVATORY_ASVO_MIN_CLIENT_VERSIONS" in line and "not valid JSON" in line


@pytest.mark.parametrize("value", ["none", "partial", "full"])
def test_the_documented_outages_are_accepted(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OBSERVATORY_ASVO_OUTAGE", value)
    assert Settings().asvo_outage == value


def test_a_toml_syntax_error_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    config = tmp_path / "observatory.toml"
    config.write_text('data_dir = "/srv/obs\n')
    monkeypatch.setenv("OBSERVATORY_CONFIG", str(config))
    from observatory.core.config import ConfigFileError

    with pytest.raises(ConfigFileError, match=str(config)):
        Settings()
    assert run_cli("db", "upgrade") == 2
    line = one_error_line(capsys)
    assert str(config) in line and "line 1" in line


def test_a_wrong_value_in_the_toml_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    config = tmp_path / "observatory.toml"
    config.write_text('asvo_outage = "Partial"\n')
    monkeypatch.setenv("OBSERVATORY_CONFIG", str(config))
    assert run_cli("db", "upgrade") == 2
    assert "asvo_outage" in one_error_line(capsys)


def test_readiness_asks_the_dispatcher_whether_jobs_can_run(migrated_db_url: str, tmp_path: Path) -> None:  # fmt: skip
    """A scheduler that answers but has no worker leaves every job queued: not ready."""
    from sqlalchemy import create_engine

    class Dispatcher:
        def __init__(self, status: str) -> None:
            self.status = status

        def dask_status(self, timeout_s: float) -> str:
            return self.status

    engine = create_engine(migrated_db_url)
    try:
        idle = Dispatcher("no workers (the scheduler has no Dask worker connected: jobs wait)")
        ready, body = check_readiness(engine, idle, data_dir=tmp_path)
        assert not ready and body["status"] == "not ready: dask"
        assert body["dask"].startswith("no workers")
        ready, body = check_readiness(engine, Dispatcher("ok"), data_dir=tmp_path)
        assert ready and body["dask"] == "ok"
    finally:
        engine.dispose()
