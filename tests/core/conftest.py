"""Fixtures of the core tests."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from observatory.core.config import Settings
from observatory.core.observability import JsonFormatter, RequestIdFilter


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Everything logged (INFO and up) during the test, as the JSON formatter writes it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def settings(tmp_path: Path, migrated_db_url: str) -> Settings:
    """Settings for a fresh installation whose data directory is there, as an installed
    one's is: the signing key of every sign-in is kept in it, and never made with it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return Settings(data_dir=data_dir, database_url=migrated_db_url)
