"""Operations: Prometheus metrics, request ids, JSON logs, readiness.

Everything here is wired into an app by :func:`install_observability`:

- a pure ASGI middleware (:class:`RequestContextMiddleware`) that gives every HTTP
  request and websocket an id (the client's ``X-Request-ID`` when it is sane, else
  a new uuid4 hex), echoes it in the response, makes it visible to log records
  (a context variable read by :class:`RequestIdFilter`), times the request into a
  histogram labelled by the *route template* and writes one access line;
- ``GET /metrics``: the app's own :class:`~prometheus_client.CollectorRegistry`
  (never the global one, so several apps in one process do not clash), including
  gauges read from the database at scrape time (:class:`DatabaseCollector`);
- ``GET /readyz``: readiness (the database at the newest schema revision, the data
  directory, and the Dask scheduler when this app runs jobs), bounded in time.

The JSON log format (:class:`JsonFormatter`, :func:`json_log_config`) is chosen
with ``OBSERVATORY_LOG_FORMAT=json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Boolean, Engine, column, func, select, table
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from observatory.core.database import make_probe_engine
from observatory.core.migrate import current_revision_on, head_revision, shipped_revisions

log = logging.getLogger(__name__)
access_log = logging.getLogger("observatory.access")

#: The request id of the request being served (None outside requests).
request_id_var: ContextVar[str | None] = ContextVar("observatory_request_id", default=None)

#: A client's ``X-Request-ID`` is kept only if it looks like this.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_REQUEST_ID_HEADER = b"x-request-id"

#: Route label of requests that matched no route (404s, slash redirects): bounded cardinality.
UNMATCHED_ROUTE = "unmatched"
#: Method labels; any other method (clients may send anything) is labelled ``other``.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

#: Request latency buckets, seconds (Prometheus' defaults, plus long downloads).
HTTP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
#: Trigger service-time buckets, seconds.
TRIGGER_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Tables read at scrape time (lightweight constructs: ``core`` imports no domain models).
_JOBS = table("asvo_jobs", column("state"), column("deleted", Boolean))
_FITS = table("calibration_fits", column("fitid"))
#: Job states that count as waiting for the dispatcher.
QUEUE_STATES = ("queued", "waitcal")
_FITS_STORED_HELP = "Calibration requests this process's dispatcher saw finish with a stored fit"


def current_request_id() -> str | None:
    """The id of the request being served in this context, if any."""
    return request_id_var.get()


def sane_request_id(value: str | None) -> str:
    """``value`` if it is a sane request id (<= 128 of ``[A-Za-z0-9._-]``), else a new uuid4 hex."""
    if value and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


# ----------------------------------------------------------------------------------------------
# Metrics


class DatabaseCollector(Collector):
    """Gauges read from the database at scrape time, and the dispatcher's counts.

    Parameters
    ----------
    engine
        The app's database engine.
    job_states
        Every ASVO job state (states without jobs are reported as 0).
    dispatcher
        Returns the app's job dispatcher, or None when this app runs no jobs.
    """

    def __init__(
        self, engine: Engine, job_states: Sequence[str], dispatcher: Callable[[], Any]
    ) -> None:
        self.engine = engine
        self.job_states = tuple(job_states)
        self.dispatcher = dispatcher

    def describe(self) -> Iterable[Metric]:
        """The metric names (without querying anything), for the registry's clash check."""
        return [
            *self._families(),
            CounterMetricFamily("observatory_calibration_fits_stored", _FITS_STORED_HELP),
        ]

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "observatory_asvo_jobs",
                "ASVO jobs (not deleted) by state, counted in the database at scrape time",
                labels=["state"],
            ),
            GaugeMetricFamily(
                "observatory_asvo_queue_depth",
                "ASVO jobs waiting for the dispatcher (states queued and waitcal)",
            ),
            GaugeMetricFamily("observatory_calibration_fits", "Rows of calibration_fits"),
            GaugeMetricFamily(
                "observatory_database_up", "1 if the scrape-time database queries succeeded"
            ),
            GaugeMetricFamily(
                "observatory_dispatcher_tasks",
                "Tasks this process's dispatcher has submitted to Dask and not yet reaped",
                labels=["kind"],
            ),
        )

    def collect(self) -> Iterable[Metric]:
        """Two queries (jobs grouped by state; fits counted), and the dispatcher's numbers."""
        jobs, queue, fits, up, tasks = self._families()
        by_state: dict[str, int] = {}
        try:
            with self.engine.connect() as connection:
                by_state.update(
                    connection.execute(
                        select(_JOBS.c.state, func.count())
                        .where(_JOBS.c.deleted.is_(False))
                        .group_by(_JOBS.c.state)
                    ).all()
                )
                fit_count = connection.execute(select(func.count()).select_from(_FITS)).scalar()
        except Exception:  # a scrape must still answer (database_up says why not)
            log.warning("metrics: database query failed", exc_info=True)
            up.add_metric([], 0)
            yield up
        else:
            for state in (*self.job_states, *sorted(set(by_state) - set(self.job_states))):
                jobs.add_metric([state], by_state.get(state, 0))
            queue.add_metric([], sum(by_state.get(state, 0) for state in QUEUE_STATES))
            fits.add_metric([], fit_count or 0)
            up.add_metric([], 1)
            yield from (jobs, queue, fits, up)
        dispatcher = self.dispatcher()
        if dispatcher is not None:
            tasks.add_metric(["asvo_job"], len(dispatcher.futures))
            tasks.add_metric(["calibration_request"], len(dispatcher.calibration_futures))
            stored = CounterMetricFamily(
                "observatory_calibration_fits_stored",
                _FITS_STORED_HELP,
                value=getattr(dispatcher, "calibration_fits_stored", 0),
            )
            yield from (tasks, stored)


class Metrics:
    """One app's metrics, in a registry of its own.

    Parameters
    ----------
    engine
        The database to count jobs and fits in at scrape time (None: no such gauges).
    job_states
        Every ASVO job state.
    dispatcher
        Returns the app's dispatcher (None when the app runs no jobs).
    """

    def __init__(
        self,
        engine: Engine | None = None,
        job_states: Sequence[str] = (),
        dispatcher: Callable[[], Any] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.http_request_duration = Histogram(
            "observatory_http_request_duration_seconds",
            "Time from request to the end of the response body, by route template",
            ["method", "route", "status_class"],
            buckets=HTTP_BUCKETS_S,
            registry=self.registry,
        )
        self.trigger_duration = Histogram(
            "observatory_trigger_duration_seconds",
            "Service time of trigger calls (triggerobs, triggervcs, triggerbuffer)",
            ["call"],
            buckets=TRIGGER_BUCKETS_S,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        if engine is not None:
            self.registry.register(DatabaseCollector(engine, job_states, dispatcher))

    def exposition(self) -> bytes:
        """The registry in the text exposition format."""
        return generate_latest(self.registry)


@contextmanager
def trigger_timer(request: Request, call: str) -> Iterator[None]:
    """Time a trigger call into ``observatory_trigger_duration_seconds`` (if the app has metrics)."""
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    start = time.perf_counter()
    try:
        yield
    finally:
        if metrics is not None:
            metrics.trigger_duration.labels(call).observe(time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# Middleware


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(template) if template else UNMATCHED_ROUTE


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class RequestContextMiddleware:
    """Request ids, latency histograms and access lines, as pure ASGI.

    Only the first message of a response is touched (its headers), so streamed
    bodies, ranged downloads and websockets pass through unchanged. The latency is
    measured to the end of the response body.

    Parameters
    ----------
    app
        The wrapped ASGI app.
    metrics
        Where request latencies go (None: not measured).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        request_id = sane_request_id(_header(scope, _REQUEST_ID_HEADER))
        header = (_REQUEST_ID_HEADER, request_id.encode("ascii"))
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 500  # if the app fails before answering, the server answers 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            message_type = message["type"]
            if message_type == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            elif message_type == "websocket.accept":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if kind == "http":
                self._record(scope, status, time.perf_counter() - start)
            request_id_var.reset(token)

    def _record(self, scope: Scope, status: int, duration_s: float) -> None:
        route = _route_template(scope)
        method = scope["method"]
        if self.metrics is not None:
            self.metrics.http_request_duration.labels(
                method if method in _METHODS else "other", route, f"{status // 100}xx"
            ).observe(duration_s)
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            access_log.info(
                "%s %s %d",
                method,
                scope["path"],
                status,
                extra={
                    "method": method,
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(duration_s * 1000.0, 3),
                    "client": client[0] if client else None,
                },
            )


# ----------------------------------------------------------------------------------------------
# Readiness


#: Seconds readiness waits for the database (a fresh connection, the schema revision).
DATABASE_CHECK_TIMEOUT_S = 5.0
#: Database checks still running, by engine: one at a time, so a database that hangs holds
#: one thread, not one per probe.
_RUNNING_CHECKS: weakref.WeakKeyDictionary[Engine, threading.Thread] = weakref.WeakKeyDictionary()
_RUNNING_CHECKS_LOCK = threading.Lock()
_PROBE_ENGINES: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def _probe_engine(engine: Engine, timeout_s: float) -> Engine:
    with _RUNNING_CHECKS_LOCK:
        probe = _PROBE_ENGINES.get(engine)
        if probe is None:
            probe = _PROBE_ENGINES[engine] = make_probe_engine(engine, timeout_s)
        return probe


def _database_state(engine: Engine, timeout_s: float) -> str:
    """``ok``, or why not: the database answers and its schema is at the newest revision.

    A fresh connection (never a pooled one, whose pre-ping of a hung server never returns),
    with PostgreSQL's ``statement_timeout`` on the queries (a migration holding a lock).
    """
    probe = _probe_engine(engine, timeout_s)
    with probe.connect() as connection:
        if probe.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}")
        revision = current_revision_on(connection)
        connection.rollback()
    head = head_revision()
    if revision is not None and revision not in shipped_revisions():
        return (
            f"migrated by a newer version (at revision {revision}, which this version does not "
            f"ship; its newest is {head}): run the newer version, or restore the database"
        )
    if revision != head:
        return (
            f"not migrated (at revision {revision or 'none: empty'}, this version needs "
            f"{head}: run observatory db upgrade)"
        )
    return "ok"


def _bounded_database_state(engine: Engine, timeout_s: float) -> str:
    """:func:`_database_state`, waited for at most ``timeout_s`` (in a daemon thread)."""
    result: list[str] = []

    def run() -> None:
        try:
            result.append(_database_state(engine, timeout_s))
        except Exception as exc:
            log.warning("readiness: database unreachable", exc_info=True)
            result.append(f"unreachable ({exc.__class__.__name__})")

    with _RUNNING_CHECKS_LOCK:
        running = _RUNNING_CHECKS.get(engine)
        if running is not None and running.is_alive():
            log.warning("readiness: the previous database check is still waiting for an answer")
            return f"unreachable (no answer within {timeout_s:g} s)"
        thread = threading.Thread(target=run, name="observatory-readiness-db", daemon=True)
        _RUNNING_CHECKS[engine] = thread
        thread.start()
    thread.join(timeout_s)
    if thread.is_alive() or not result:
        log.warning("readiness: the database did not answer within %g s", timeout_s)
        return f"unreachable (no answer within {timeout_s:g} s)"
    return result[0]


def data_dir_state(data_dir: Path) -> str:
    """``ok``, or why the data directory cannot be used (naming it)."""
    path = data_dir.absolute()
    if not path.is_dir():
        return f"missing: {path} (is the shared file system mounted?)"
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return f"not writable: {path}"
    return "ok"


def check_readiness(
    engine: Engine,
    dispatcher: Any,
    dask_timeout_s: float = 2.0,
    *,
    data_dir: Path | None = None,
    database_timeout_s: float = DATABASE_CHECK_TIMEOUT_S,
) -> tuple[bool, dict[str, str]]:
    """Whether the app can serve: its database answers with the newest schema, its data
    directory is there, and its Dask scheduler answers if it runs jobs.

    Blocking (a database round trip, a scheduler round trip), but bounded: the database
    check is given ``database_timeout_s``, the scheduler ``dask_timeout_s``. Call it off
    the event loop.

    Returns
    -------
    tuple
        ``(ready, body)``; ``body`` names each part ``ok``, ``not used`` or what failed.
    """
    body = {"status": "ready", "database": "ok", "dask": "not used"}
    body["database"] = _bounded_database_state(engine, database_timeout_s)
    if data_dir is not None:
        body["data_dir"] = data_dir_state(data_dir)
        if body["data_dir"] != "ok":
            log.warning("readiness: data directory %s", body["data_dir"])
    if dispatcher is not None:
        # Reachable is not enough: a scheduler without workers leaves every job queued.
        body["dask"] = dispatcher.dask_status(dask_timeout_s)
        if body["dask"] != "ok":
            log.warning("readiness: Dask %s", body["dask"])
    failing = [
        part
        for part in ("database", "data_dir", "dask")
        if body.get(part, "ok") not in ("ok", "not used")
    ]
    if failing:
        body["status"] = "not ready: " + ", ".join(failing)
    return not failing, body


# ----------------------------------------------------------------------------------------------
# Installation


def install_observability(app: FastAPI, job_states: Sequence[str] = ()) -> Metrics:
    """Give ``app`` metrics (``/metrics``), request ids and access lines, and ``/readyz``.

    ``app.state`` must hold ``engine``; ``app.state.dispatcher`` (set by the lifespan
    when the app runs jobs) is read when present.
    """
    app.state.dispatcher = getattr(app.state, "dispatcher", None)
    metrics = Metrics(app.state.engine, job_states, lambda: app.state.dispatcher)
    app.state.metrics = metrics
    app.add_middleware(RequestContextMiddleware, metrics=metrics)

    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    def metrics_endpoint() -> Response:
        """Prometheus metrics of this process (text exposition format)."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/readyz",
        tags=["operations"],
        responses={503: {"description": "not ready; the failing part is named"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: the database answers (within 5 s) at the schema revision this version
        needs, the data directory is there, and the Dask scheduler answers when this app
        runs jobs."""
        state = request.app.state
        settings = getattr(state, "settings", None)
        ready, body = await run_in_threadpool(
            check_readiness,
            state.engine,
            state.dispatcher,
            data_dir=settings.data_dir if settings is not None else None,
        )
        return JSONResponse(body, status_code=200 if ready else 503)

    return metrics


# ----------------------------------------------------------------------------------------------
# Logging

#: Attributes every LogRecord has; anything else on a record was passed as ``extra``.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__).union(
    ("message", "asctime", "color_message", "request_id", "taskName")
)


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record (``record.request_id``, None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, request_id.

    Fields passed with ``extra`` (the access line's method, path, route, status,
    duration_ms, client) follow; ``exc_info`` and ``stack_info`` are formatted text.
    """

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, tz=UTC)
        payload: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in payload:
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            payload["exc_info"] = record.exc_text
        if record.stack_info:
            payload["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


class WithoutQueryStrings(logging.Filter):
    """uvicorn's access lines (text logs) without the query string: a trigger call may carry
    its project's ``secure_key`` there, a download link its token."""

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record: (client, method, path with query, HTTP version, status)
        if isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args
            record.args = (client, method, str(path).split("?", 1)[0], version, status)
        return True


def json_log_config(level: str = "INFO") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for uvicorn: everything as JSON lines on stderr.

    uvicorn's own access log is meant to be off (``access_log=False``, or
    ``--no-access-log``): :class:`RequestContextMiddleware` writes a richer one
    (logger ``observatory.access``). ``deploy/log-config.json`` is this, for
    ``uvicorn --log-config``.
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["request_id"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        "root": {"handlers": ["default"], "level": level},
    }
