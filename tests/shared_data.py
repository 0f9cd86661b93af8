"""Paths of the real MWA files in ../shared/data (read from there, never copied into the repo)."""

from pathlib import Path

SHARED_DATA = (Path(__file__).resolve().parents[2] / "shared" / "data").resolve()
MWA_DATA = SHARED_DATA / "mwa"
CALIB_DATA = SHARED_DATA / "calib"
TRIGGER_DATA = SHARED_DATA / "trigger"
