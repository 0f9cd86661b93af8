"""Headless Chromium for page tests (Debian's chromium, driven by Playwright without downloads)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from servers import required_executable


def chromium_path() -> str:
    """The Chromium executable; skips the test when there is none (fails when CI requires it)."""
    return required_executable(
        ("chromium", "chromium-browser"), "OBSERVATORY_REQUIRE_CHROMIUM", "apt-get install chromium"
    )


@contextmanager
def browser_page() -> Iterator[Any]:
    """A page of a fresh headless Chromium."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser.new_page(viewport={"width": 1366, "height": 900})
        finally:
            browser.close()


def screenshot(page: Any, name: str, tmp_path: Path) -> Path:
    """Save a screenshot as a test artifact (in OBSERVATORY_TEST_ARTIFACTS when set)."""
    directory = Path(os.environ.get("OBSERVATORY_TEST_ARTIFACTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
