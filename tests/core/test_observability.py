"""Operations: /metrics, request ids, JSON logs, /readyz (core/observability.py)."""

from __future__ import annotations

import base64
import importlib
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.asvo.models import Job
from observatory.calib.models import CalibrationFit
from observatory.core.accounts import create_user
from observatory.core.config import Settings
from observatory.core.observability import (
    JsonFormatter,
    json_log_config,
    request_id_var,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def scrape(client: TestClient) -> dict[str, Any]:
    """The samples of /metrics: {name: [(labels, value), ...]}."""
    reply = client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    (found,) = [v for got, v in samples[name] if all(got.get(k) == x for k, x in labels.items())]
    return float(found)


def add_job(session: Session, user_id: int, state: str, number: int, deleted: bool = False) -> None:
    session.add(
        Job(user_id=user_id, job_type=1, obs_id=1320409688, state=state, priority=1,
            params={"delivery": "acacia", "job_type": "download", "obs_id": "1320409688"},
            request_key=f"key-{number}", delivery="acacia", deleted=deleted)
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# /metrics


def test_a_head_request_is_recorded_with_its_route(
    client: TestClient, json_lines: io.StringIO
) -> None:
    """HEAD is answered as the GET, on a copy of the request's scope: the route was set on
    the copy, and metrics and access lines said "unmatched" for every HEAD."""
    assert client.head("/healthz", headers={"X-Request-ID": "head-1"}).status_code == 200
    samples = scrape(client)
    assert value(samples, "observatory_http_request_duration_seconds_count", route="/healthz",
                 method="HEAD", status_class="2xx") == 1  # fmt: skip
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    (access,) = [line for line in lines if line.get("request_id") == "head-1"]
    assert access["method"] == "HEAD" and access["route"] == "/healthz"


def test_metrics_label_routes_by_template_and_count_the_database(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    with session_factory() as session:
        user, _key = create_user(session, "alice", "test-key-of-alice")
        for number, state in enumerate(["queued", "queued", "waitcal", "completed", "error"]):
            add_job(session, user.id, state, number)
        add_job(session, user.id, "queued", 99, deleted=True)  # not counted
        session.add(CalibrationFit(fitid=1, obsid=1320409688))
        session.add(CalibrationFit(fitid=2, obsid=1320409696))
        session.commit()

    assert client.get("/api/download/12345/some_file.tar").status_code in (401, 403, 404)
    assert client.get("/api/download/777/other.tar").status_code in (401, 403, 404)
    assert client.get("/no/such/page/4711").status_code == 404
    assert client.get("/healthz").status_code == 200
    # A trigger call (a project without a key may not trigger: still 200, still timed).
    reply = client.post("/trigger/triggerobs", data={"project_id": "G0001", "pretend": "1"})
    assert reply.status_code == 200 and reply.json()["success"] is False

    samples = scrape(client)
    routes = {
        labels["route"] for labels, _ in samples["observatory_http_request_duration_seconds_count"]
    }
    assert "/api/download/{job_id}/{name}" in routes
    assert "unmatched" in routes and "/healthz" in routes and "/trigger/triggerobs" in routes
    assert not any(re.search(r"12345|777|4711|some_file", route) for route in routes)
    refused = client.request("BREW", "/healthz")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET"
    assert refused.json()["error"] == "Method Not Allowed"
    count = "observatory_http_request_duration_seconds_count"
    assert {labels["method"] for labels, _ in scrape(client)[count]} == {"GET", "POST", "other"}
    download = value(
        samples, "observatory_http_request_duration_seconds_count",
        route="/api/download/{job_id}/{name}", method="GET", status_class="4xx",
    )  # fmt: skip
    assert download == 2
    assert value(samples, "observatory_http_request_duration_seconds_count", route="/healthz",
                 status_class="2xx") == 1  # fmt: skip
    assert value(samples, "observatory_trigger_duration_seconds_count", call="triggerobs") == 1

    assert value(samples, "observatory_asvo_jobs", state="queued") == 2
    assert value(samples, "observatory_asvo_jobs", state="waitcal") == 1
    assert value(samples, "observatory_asvo_jobs", state="completed") == 1
    assert value(samples, "observatory_asvo_jobs", state="staging") == 0  # every state is there
    assert value(samples, "observatory_asvo_queue_depth") == 3
    assert value(samples, "observatory_calibration_fits") == 2
    assert value(samples, "observatory_database_up") == 1
    assert "observatory_dispatcher_tasks" not in samples  # this app runs no jobs

    with session_factory() as session:
        session.add(CalibrationFit(fitid=3, obsid=1320409704))
        session.commit()
    assert value(scrape(client), "observatory_calibration_fits") == 3  # read at scrape time


def test_two_apps_in_one_process_keep_their_own_metrics(settings: Settings) -> None:
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        first.get("/healthz")
        first.get("/healthz")
        second.get("/healthz")
        assert (
            value(
                scrape(first), "observatory_http_request_duration_seconds_count", route="/healthz"
            )
            == 2
        )
        assert value(scrape(second), "observatory_http_request_duration_seconds_count", route="/healthz") == 1  # fmt: skip


def test_metrics_still_answer_when_the_database_does_not(
    app: FastAPI, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("database host unreachable")

    monkeypatch.setattr(app.state.engine, "connect", refuse)
    samples = scrape(client)
    assert value(samples, "observatory_database_up") == 0
    assert "observatory_asvo_jobs" not in samples


# ----------------------------------------------------------------------------------------------
# Request ids and JSON logs


def test_request_ids_are_echoed_made_or_replaced(client: TestClient) -> None:
    assert (
        client.get("/healthz", headers={"X-Request-ID": "abc-123.X_y"}).headers["x-request-id"]
        == "abc-123.X_y"
    )
    made = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert client.get("/healthz").headers["x-request-id"] != made
    for insane in ("a b", "x" * 129, "<script>", "id;drop", ""):
        replaced = client.get("/healthz", headers={"X-Request-ID": insane}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", replaced), insane
    assert (
        client.get("/healthz", headers={"X-Request-ID": "y" * 128}).headers["x-request-id"]
        == "y" * 128
    )
    # Errors carry it too.
    assert (
        client.get("/nowhere", headers={"X-Request-ID": "r404"}).headers["x-request-id"] == "r404"
    )


def test_json_log_lines_carry_the_request_id(
    app: FastAPI, client: TestClient, json_lines: io.StringIO
) -> None:
    @app.get("/test-log")
    def test_log() -> dict[str, str]:
        logging.getLogger("observatory.test").info("inside %s", "the handler")
        try:
            raise ValueError("broken on purpose")
        except ValueError:
            logging.getLogger("observatory.test").exception("it failed")
        return {"ok": "yes"}

    assert client.get("/test-log", headers={"X-Request-ID": "req-42"}).status_code == 200
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    mine = [line for line in lines if line["request_id"] == "req-42"]
    inside, failed, access = (
        next(line for line in mine if line["message"] == "inside the handler"),
        next(line for line in mine if line["message"] == "it failed"),
        next(line for line in mine if line["logger"] == "observatory.access"),
    )
    assert inside["level"] == "INFO" and inside["logger"] == "observatory.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", inside["time"])
    assert failed["level"] == "ERROR"
    assert "ValueError: broken on purpose" in failed["exc_info"]
    assert access["method"] == "GET" and access["path"] == "/test-log"
    assert access["route"] == "/test-log" and access["status"] == 200
    assert isinstance(access["duration_ms"], float) and access["duration_ms"] >= 0
    assert request_id_var.get() is None  # nothing leaks out of the request


def test_json_formatter_outside_requests() -> None:
    record = logging.LogRecord("x.y", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    record.job_id = 7
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "a b" and line["level"] == "WARNING" and line["logger"] == "x.y"
    assert line["request_id"] is None and line["job_id"] == 7


def test_log_config_file_matches_the_code() -> None:
    """deploy/log-config.json (for ``uvicorn --log-config``) is json_log_config()."""
    config = json.loads((REPO / "deploy" / "log-config.json").read_text())
    assert config == json_log_config()
    for factory in (config["filters"]["request_id"]["()"], config["formatters"]["json"]["()"]):
        module, _, name = factory.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name))


def test_serve_uses_json_logs_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from observatory import cli

    seen: list[uvicorn.Config] = []

    def run(server: uvicorn.Server) -> None:
        seen.append(server.config)
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    serve = ["--data-dir", str(tmp_path / "d"), "serve", "--port", "1", "--no-telescope"]
    assert cli.main(serve) == 0
    assert seen[-1].log_config == uvicorn.config.LOGGING_CONFIG  # text: uvicorn's own
    assert seen[-1].access_log is True
    monkeypatch.setenv("OBSERVATORY_LOG_FORMAT", "json")
    assert cli.main(serve) == 0
    assert seen[-1].log_config == json_log_config() and seen[-1].access_log is False


# ----------------------------------------------------------------------------------------------
# /readyz


def test_readyz_without_jobs(client: TestClient) -> None:
    reply = client.get("/readyz")
    assert reply.status_code == 200
    assert reply.json() == {
        "status": "ready",
        "database": "ok",
        "dask": "not used",
        "data_dir": "ok",
    }


def test_healthz_stays_alive_while_the_database_is_away(
    app: FastAPI, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Liveness is the process's: restarting it would not bring the database back."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("database host unreachable")

    monkeypatch.setattr(app.state.engine, "connect", refuse)
    reply = client.get("/healthz")
    assert reply.status_code == 200 and reply.json()["status"] == "ok"


def test_readyz_names_an_unreachable_database(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from observatory.core import observability

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("database host unreachable")

    monkeypatch.setattr(observability, "_database_state", refuse)
    reply = client.get("/readyz")
    assert reply.status_code == 503
    body = reply.json()
    assert "database" in body["status"] and body["database"].startswith("unreachable")
    assert body["dask"] == "not used"


def test_readyz_names_an_unreachable_scheduler(app: FastAPI, client: TestClient) -> None:
    from observatory.asvo.dispatcher import Dispatcher

    # A job runner whose dispatcher has not (or no longer) a scheduler connection.
    app.state.dispatcher = Dispatcher(app.state.settings, app.state.session_factory)
    reply = client.get("/readyz")
    assert reply.status_code == 503
    assert reply.json()["dask"].startswith("unreachable") and reply.json()["database"] == "ok"
    assert reply.json()["status"] == "not ready: dask"


def test_readyz_and_metrics_with_the_dispatcher(settings: Settings) -> None:
    serving = settings.model_copy(update={"telescope_runner": False})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with TestClient(create_app(serving, run_jobs=True)) as client:
        reply = client.get("/readyz")
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"status": "ready", "database": "ok", "dask": "ok", "data_dir": "ok"}
        samples = scrape(client)
        assert value(samples, "observatory_dispatcher_tasks", kind="asvo_job") == 0
        assert value(samples, "observatory_calibration_fits_stored_total") == 0


def test_websockets_pass_through_with_a_request_id(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    with session_factory() as session:
        user, key = create_user(session, "alice", "test-key-of-alice")
        add_job(session, user.id, "queued", 1)
        session.commit()
    token = base64.b64encode(f"mantaray-clientv2.0:{key}".encode()).decode()
    assert (
        client.post("/api/api_login", headers={"Authorization": f"Basic {token}"}).status_code
        == 200
    )
    cookie = client.cookies["MWA_JOB_COOKIE"]
    with client.websocket_connect(
        "/api/job_results", headers={"cookie": f"MWA_JOB_COOKIE={cookie}", "X-Request-ID": "ws-1"}
    ) as socket:
        frame = json.loads(socket.receive_text())
        assert frame["row"]["job_state"] == "queued"
        assert (b"x-request-id", b"ws-1") in (socket.extra_headers or [])


def test_text_access_lines_leave_the_query_string_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's access lines (the default text logs) held trigger calls' ``secure_key``
    and download links' tokens; JSON logs left the query out already."""
    import argparse
    import logging

    from observatory import cli
    from observatory.core.observability import WithoutQueryStrings

    class StartedServer:
        started = True

        def run(self) -> None:
            pass

    monkeypatch.setattr(cli, "_server_with_exit_deadline", lambda config: StartedServer())
    access = logging.getLogger("uvicorn.access")
    monkeypatch.setattr(access, "filters", [])
    args = argparse.Namespace(host="127.0.0.1", port=8000, ssl_certfile=None, ssl_keyfile=None)
    cli._run_server(object(), args, log_format="text")
    (only,) = [f for f in access.filters if isinstance(f, WithoutQueryStrings)]
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/trigger/triggerobs?project_id=G0055&secure_key=s3cret", "1.1", 200),
        None,
    )  # fmt: skip
    assert only.filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /trigger/triggerobs HTTP/1.1" 200'
