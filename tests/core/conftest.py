"""Fixtures of the core tests."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

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
