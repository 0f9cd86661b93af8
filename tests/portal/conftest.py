"""Fixtures of the portal tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from observatory.core.config import Settings


@pytest.fixture
def settings(tmp_path: Path, migrated_db_url: str) -> Settings:
    """Settings for a fresh installation whose data directory is there, as an installed
    one's is: the signing key of every sign-in is kept in it, and never made with it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return Settings(data_dir=data_dir, database_url=migrated_db_url)
