"""Imports between the domains point the one way ARCHITECTURE.md draws.

``core`` <- ``telescope`` <- ``archive`` <- (``trigger``, ``calib``, ``asvo``) <- ``portal``/``app``;
``preprocess`` (the conversion engine) sits below ``calib`` and ``asvo``, which run it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import observatory

PACKAGE = Path(observatory.__file__).parent

#: For each domain, the domains its modules may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "telescope": {"core"},
    "archive": {"core", "telescope"},
    "preprocess": {"core", "telescope", "archive"},
    "trigger": {"core", "telescope", "archive"},
    "calib": {"core", "telescope", "archive", "preprocess"},
    "asvo": {"core", "telescope", "archive", "preprocess", "calib", "all_models"},
    "packaging": {"core"},
    "clients": set(),
    "demo": {"core", "telescope", "archive"},
    "portal": {"core", "telescope", "archive", "trigger", "calib", "asvo"},
}

#: Module-level exceptions, each with its reason.
EXCEPTIONS: dict[tuple[str, str], str] = {
    # Alembic compares the migrations with every table of every domain.
    ("core/migrations/env.py", "observatory.all_models"): "migrations know every table",
    # MWA's /metadata/fits?include_calib=1 adds the best fit from the calibration database.
    ("archive/router.py", "observatory.calib.service"): "metafits with CALIBDATA",
    # Applying solutions reads them in their file formats (AO-cal, hyperdrive): no database.
    ("preprocess/engine.py", "observatory.calib.formats"): "solution file formats",
    # The CSV of jobs takes the conversion keys the server takes: one list of them.
    ("clients/csvjobs.py", "observatory.preprocess.options"): "conversion keys",
    # The calibration client reads the .bin it downloads with the one reader of the format.
    ("clients/calib.py", "observatory.calib.formats"): "solution file formats",
}


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return {module for module in modules if module.startswith("observatory.")}


def test_domains_import_only_the_domains_below_them() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        domain = relative.parts[0]
        if domain not in ALLOWED:  # app.py, cli.py, all_models.py, __main__.py: the top
            continue
        for module in sorted(_imported_modules(path)):
            imported_domain = module.split(".")[1]
            if imported_domain == domain or imported_domain in ALLOWED[domain]:
                continue
            if (relative.as_posix(), module) not in EXCEPTIONS:
                wrong.append(f"{relative} imports {module}")
    assert wrong == []


def test_every_exception_is_still_needed() -> None:
    for file, module in EXCEPTIONS:
        assert module in _imported_modules(PACKAGE / file), (file, module)
