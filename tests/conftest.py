"""Fixtures shared by the whole suite.

Database tests run on both backends: SQLite always, and PostgreSQL when
``OBSERVATORY_TEST_POSTGRES_URL`` names a server (``.ci/run`` sets it, and sets
``OBSERVATORY_REQUIRE_POSTGRES=1`` so a missing server fails instead of skipping).
Each PostgreSQL test gets a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

import backends
from observatory.core import security
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from observatory.core.migrate import upgrade
from observatory.telescope.site import ensure_astropy_offline

ensure_astropy_offline()

#: scrypt's work factor for the hashes the suite makes (the users' and projects' keys of
#: every test): 2**10 instead of 2**14. A hash carries its own parameters and is checked
#: with them (a server started by a test checks these at their factor too), so the code
#: under test is the same; the production factor is what tests/core/test_security_storage.py
#: checks. It saves about a fifth of the suite's time (66 ms a hash, several a test).
security._SCRYPT_N = 2**10


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's configuration or writes into the checkout."""
    for name in (
        "OBSERVATORY_DATA_DIR",
        "OBSERVATORY_DATABASE_URL",
        "OBSERVATORY_CONFIG",
        "OBSERVATORY_DASK_SCHEDULER",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def _postgres_url() -> str | None:
    url = os.environ.get("OBSERVATORY_TEST_POSTGRES_URL")
    if not url and os.environ.get("OBSERVATORY_REQUIRE_POSTGRES") == "1":
        pytest.fail("OBSERVATORY_REQUIRE_POSTGRES=1 but OBSERVATORY_TEST_POSTGRES_URL is not set")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL, once per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.sqlite3'}"
        return
    base_url = _postgres_url()
    if not base_url:
        pytest.skip("PostgreSQL not configured (set OBSERVATORY_TEST_POSTGRES_URL)")
    schema = f"t_{secrets.token_hex(6)}"
    admin = create_engine(base_url)
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    separator = "&" if "?" in base_url else "?"
    yield f"{base_url}{separator}options={quote(f'-csearch_path={schema}')}"
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@cache
def _migrated_sqlite_template(directory: Path) -> Path:
    """A SQLite database migrated to the newest revision, made once per test process."""
    template = directory / "migrated-template.sqlite3"
    upgrade(f"sqlite:///{template}")
    # All of it in the one file (WAL mode keeps it so once the last connection closes).
    with contextlib.closing(sqlite3.connect(template)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert not template.with_name(f"{template.name}-wal").exists()
    return template


@pytest.fixture
def migrated_db_url(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database URL, migrated to the newest revision (a copy of a migrated SQLite file, or
    the migrations' SQL in one go for a PostgreSQL schema: the upgrade of every test made a
    tenth of the suite's time)."""
    if db_url.startswith("sqlite:///"):
        template = _migrated_sqlite_template(tmp_path_factory.getbasetemp())
        shutil.copyfile(template, db_url.removeprefix("sqlite:///"))
    else:
        backends.migrate_postgres_schema(db_url)
    return db_url


@pytest.fixture
def session_factory(migrated_db_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on a migrated database."""
    engine = make_engine(migrated_db_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """One session; the test commits what it wants kept."""
    with session_factory() as session:
        yield session


@pytest.fixture
def settings(tmp_path: Path, migrated_db_url: str) -> Settings:
    """Settings for a fresh installation in a temporary data directory, which is there as an
    installed one's is: the signing key of every sign-in is kept in it, and never made with it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return Settings(data_dir=data_dir, database_url=migrated_db_url)
