"""Fixtures shared by the whole suite.

Database tests run on both backends: SQLite always, and PostgreSQL when
``OBSERVATORY_TEST_POSTGRES_URL`` names a server (``.ci/run`` sets it, and sets
``OBSERVATORY_REQUIRE_POSTGRES=1`` so a missing server fails instead of skipping).
Each PostgreSQL test gets a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from observatory.core.migrate import upgrade
from observatory.telescope.site import ensure_astropy_offline

ensure_astropy_offline()


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


@pytest.fixture
def migrated_db_url(db_url: str) -> str:
    """A database URL, migrated to the newest revision."""
    upgrade(db_url)
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
    """Settings for a fresh installation in a temporary data directory."""
    return Settings(data_dir=tmp_path / "data", database_url=migrated_db_url)
