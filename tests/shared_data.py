"""Paths of the real MWA files in ../shared/data (read from there, never copied into the repo).

Where to look, in order: ``OBSERVATORY_SHARED_DATA``; ``shared/data`` beside this
checkout; for a clone of a local checkout (``git clone . /tmp/fresh``), beside the
checkout it was cloned from.
"""

import os
import subprocess
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def _origin_checkout() -> Path | None:
    try:
        url = subprocess.run(
            ["git", "-C", str(_CHECKOUT), "config", "--get", "remote.origin.url"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        return None
    return Path(url).resolve() if url and Path(url).is_dir() else None


def _shared_data() -> Path:
    if os.environ.get("OBSERVATORY_SHARED_DATA"):
        return Path(os.environ["OBSERVATORY_SHARED_DATA"]).resolve()
    candidates = [_CHECKOUT.parent / "shared" / "data"]
    origin = _origin_checkout()
    if origin is not None:
        candidates.append(origin.parent / "shared" / "data")
    for candidate in candidates:
        if (candidate / "mwa").is_dir():
            return candidate.resolve()
    raise RuntimeError(
        "the real MWA test files were not found in "
        + " or ".join(str(c) for c in candidates)
        + "; set OBSERVATORY_SHARED_DATA to the shared/data directory"
    )


SHARED_DATA = _shared_data()
MWA_DATA = SHARED_DATA / "mwa"
CALIB_DATA = SHARED_DATA / "calib"
TRIGGER_DATA = SHARED_DATA / "trigger"
