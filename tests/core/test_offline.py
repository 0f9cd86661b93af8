"""astropy works offline on a machine it has never run on (no download cache yet)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
from observatory.telescope.site import ensure_astropy_offline
ensure_astropy_offline()
from astropy.coordinates import EarthLocation
print(round(EarthLocation.of_site("mwa").lat.deg, 3))
"""


def test_a_new_machine_finds_the_site_offline_without_a_warning(tmp_path: Path) -> None:
    """astropy 8 warned "CacheMissingWarning: .../download/url does not exist" when the
    offline set-up first looked in a cache not yet made."""
    environ = {**os.environ, "HOME": str(tmp_path)}
    environ.pop("XDG_CACHE_HOME", None)
    environ.pop("OBSERVATORY_ALLOW_INTERNET", None)
    done = subprocess.run(
        [sys.executable, "-W", "error::Warning:astropy.utils.data", "-c", SCRIPT],
        capture_output=True, text=True, env=environ, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "-26.703"
    assert "CacheMissingWarning" not in done.stderr
    assert any(tmp_path.rglob("contents"))  # the cache, seeded where there was none
