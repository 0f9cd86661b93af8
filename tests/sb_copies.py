"""Copies of a scheduling block whose execution block is another one, for appends (the
packager refuses an execution block the package holds already)."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_with_execution_block(source: Path, destination: Path, old_uid: str, new_uid: str) -> Path:
    """``source`` copied to ``destination``, every name starting with ``old_uid`` renamed to
    start with ``new_uid`` (deepest first, so directories are renamed after their contents)."""
    shutil.copytree(source, destination, symlinks=True)
    for path in sorted(destination.rglob(f"{old_uid}*"), reverse=True):
        path.rename(path.with_name(path.name.replace(old_uid, new_uid)))
    return destination
