"""SQLAlchemy 2 engine, sessions and the declarative Base shared by every domain."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, MetaData, create_engine, event
from sqlalchemy.engine import URL, Connection, Dialect, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator

#: The largest integer an SQLite INTEGER or a PostgreSQL BIGINT holds: numbers from a request
#: above it must be refused before they reach a query (the drivers raise OverflowError).
MAX_SQL_INTEGER = 2**63 - 1
#: The largest id of a row whose id column is an INTEGER (PostgreSQL's 32-bit integer): jobs,
#: triggers, calibration requests. A larger id names no row.
MAX_SQL_ID = 2**31 - 1

# Stable constraint names, so Alembic migrations are the same on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every ORM table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    """Timezone-aware current UTC time (the default of every timestamp column)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` column that is an aware UTC datetime on every backend.

    The type of every timestamp column. PostgreSQL's ``timestamptz`` reads back aware (in the
    connection's zone); SQLite keeps text without an offset and reads back naive, which then
    cannot be compared with an aware ``utcnow()`` made in this process (a new calibration fit
    against earlier ones failed so), and drops the offset of a non-UTC value it is given (a
    search from ``12:00+08:00`` compared as 12:00 UTC). Written as UTC (naive taken as UTC),
    read as aware UTC. The database column is ``DateTime(timezone=True)``: no migration.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        # SQLite writes the wall time and drops the offset: make it the UTC wall time.
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the web server read while the dispatcher writes; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_savepoint_as_writer(connection: Connection, _name: str | None) -> None:
    """A savepoint that starts a SQLite transaction starts it as a writer (``BEGIN IMMEDIATE``).

    pysqlite begins a transaction at the first write, or at a savepoint. Begun at a
    savepoint, the transaction reads (a duplicate check, say) from a snapshot, and when it
    then writes after another connection has committed, SQLite answers "database is locked"
    at once (its snapshot is stale: the busy timeout cannot help). Taking the write lock
    first waits for the other writer instead. Found submitting jobs while the dispatcher
    wrote, on a loaded machine.
    """
    dbapi_connection = connection.connection.dbapi_connection
    if dbapi_connection is not None and not dbapi_connection.in_transaction:
        dbapi_connection.execute("BEGIN IMMEDIATE")


#: Database URLs this package works with (the dialects and drivers it ships).
SUPPORTED_URLS = "postgresql+psycopg://USER:PASSWORD@HOST:5432/DB or sqlite:///PATH"
#: Seconds a new PostgreSQL connection may take (libpq ``connect_timeout``) unless the URL
#: sets it: without one, a host that accepts and never answers hangs every request.
DEFAULT_CONNECT_TIMEOUT_S = 10
#: TCP keepalives and the TCP user timeout (libpq parameters) of PostgreSQL connections,
#: unless the URL sets them: a pooled connection to a host that went away is found dead
#: within about a minute instead of the kernel's two hours.
_POSTGRES_SOCKET_DEFAULTS = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


class DatabaseURLError(ValueError):
    """A database URL that names no usable backend (a typo, or a driver that is not installed)."""


def mask_url(database_url: str | URL) -> str:
    """The URL with its password replaced by ``***``: the only form a URL may be printed in."""
    try:
        url = make_url(database_url)  # a URL is returned as it is
    except ArgumentError:
        # Not a URL at all: print nothing after a scheme's credentials.
        text = str(database_url)
        scheme, sep, rest = text.partition("://")
        return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else text
    return url.render_as_string(hide_password=True)


def where(database_url: str | URL) -> str:
    """Where a database is, for messages: ``host:port/db``, or a SQLite file's path."""
    try:
        url = make_url(database_url)  # a URL is returned as it is
    except ArgumentError:
        return mask_url(database_url)
    if url.get_backend_name() == "sqlite":
        return f"SQLite file {url.database}" if url.database else "an in-memory SQLite database"
    if url.host and "@" in url.host:  # the rest of a password (see _parse_url)
        return "a host its URL does not name (more than one '@')"
    port = url.port or (5432 if url.get_backend_name() == "postgresql" else "(default port)")
    return f"{url.host or 'localhost'}:{port}/{url.database or ''}"


def _parse_url(database_url: str | URL) -> URL:
    try:
        url = make_url(database_url)  # a URL is returned as it is
        url.get_dialect()
    except NoSuchModuleError:  # (an ArgumentError too)
        raise DatabaseURLError(
            f"database URL {mask_url(database_url)}: SQLAlchemy has no backend "
            f"{make_url(database_url).drivername!r}; use {SUPPORTED_URLS}"
        ) from None
    except ArgumentError as exc:
        raise DatabaseURLError(
            f"database URL {mask_url(database_url)!r} is not a URL ({exc}); use {SUPPORTED_URLS}"
        ) from None
    if url.host and "@" in url.host:
        # The URL's first '@' ended the password: the rest of it was taken for the host,
        # and printed as such in every message.
        raise DatabaseURLError(
            "database URL: more than one '@' before the host; write an '@' in the user name "
            f"or password as %40; use {SUPPORTED_URLS}"
        )
    return url


def _postgres_connect_args(url: URL, connect_timeout_s: float | None = None) -> dict[str, Any]:
    """Timeouts of PostgreSQL connections that the URL does not set itself."""
    args: dict[str, Any] = {
        key: value for key, value in _POSTGRES_SOCKET_DEFAULTS.items() if key not in url.query
    }
    if connect_timeout_s is not None:  # a probe: its own bound, whatever the URL says
        args["connect_timeout"] = max(2, int(connect_timeout_s + 0.999))
    elif "connect_timeout" not in url.query:
        args["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT_S
    return args


def _create(url: URL, **kwargs: Any) -> Engine:
    try:
        return create_engine(url, **kwargs)
    except ImportError as exc:  # the dialect exists, its driver is not installed (mysql://)
        raise DatabaseURLError(
            f"database URL {mask_url(url)}: its driver is not installed ({exc}); "
            f"use {SUPPORTED_URLS}"
        ) from None


def make_engine(database_url: str) -> Engine:
    """Create an engine for ``database_url``; SQLite gets WAL mode and foreign keys.

    For a SQLite file URL the parent directory is created if needed. PostgreSQL
    connections get a connect timeout, TCP keepalives and a TCP user timeout unless the
    URL sets them.

    Raises
    ------
    DatabaseURLError
        When the URL names no backend that can be used here.
    """
    url = _parse_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = _create(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "savepoint", _sqlite_savepoint_as_writer)
        return engine
    # As many pooled connections as requests can run at once (Starlette's thread pool runs
    # 40): with SQLAlchemy's default 5, busy servers open and close a connection per
    # request, and PostgreSQL forks a backend for each.
    connect_args = _postgres_connect_args(url) if url.get_backend_name() == "postgresql" else {}
    return _create(
        url, pool_pre_ping=True, pool_size=20, max_overflow=20, connect_args=connect_args
    )


def make_probe_engine(engine: Engine, timeout_s: float) -> Engine:
    """An engine on ``engine``'s database for health checks: no pool, a bounded connect.

    A check must not take a pooled connection: the pool's pre-ping of a connection to a
    server that stopped answering waits forever. SQLite (a local file) uses ``engine``.
    """
    if engine.url.get_backend_name() == "sqlite":
        return engine
    connect_args = (
        _postgres_connect_args(engine.url, timeout_s)
        if engine.url.get_backend_name() == "postgresql"
        else {}
    )
    return _create(engine.url, poolclass=NullPool, connect_args=connect_args)


def describe_database_error(exc: BaseException, database_url: str | URL) -> str | None:
    """One line for an operator about a database failure (None if ``exc`` is not one).

    Names where the database is (``host:port/db``, never the password) and the driver's
    reason (connection refused, password authentication failed, database does not exist,
    integer out of range, ...).
    """
    if not isinstance(exc, SQLAlchemyError):
        return None
    original = exc.orig if isinstance(exc, DBAPIError) else exc
    lines = [line.strip() for line in str(original).strip().splitlines() if line.strip()]
    reason = lines[0] if lines else exc.__class__.__name__
    reason = reason.removeprefix("connection failed: ")
    if isinstance(exc, DataError):
        return f"the database at {where(database_url)} refused a value: {reason}"
    if isinstance(exc, IntegrityError):
        return f"the database at {where(database_url)} refused the change: {reason}"
    if isinstance(exc, OperationalError | InterfaceError):
        return f"database at {where(database_url)}: {reason}"
    return f"database at {where(database_url)}: {exc.__class__.__name__}: {reason}"


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine`` (objects stay usable after commit)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: commit on success, roll back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
