"""SQLAlchemy 2 engine, sessions and the declarative Base shared by every domain."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, MetaData, create_engine, event
from sqlalchemy.engine import Connection, Dialect, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
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


def make_engine(database_url: str) -> Engine:
    """Create an engine for ``database_url``; SQLite gets WAL mode and foreign keys.

    For a SQLite file URL the parent directory is created if needed.
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "savepoint", _sqlite_savepoint_as_writer)
        return engine
    # As many pooled connections as requests can run at once (Starlette's thread pool runs
    # 40): with SQLAlchemy's default 5, busy servers open and close a connection per
    # request, and PostgreSQL forks a backend for each.
    return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20)


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
