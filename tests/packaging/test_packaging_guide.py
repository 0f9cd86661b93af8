"""docs/packaging.md names every option of qa-packager, qa-packager verify and tarsplit."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from observatory.packaging import cli
from observatory.packaging.qa2 import package

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "packaging.md"


def long_options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text)) - {"--help"}


@pytest.mark.parametrize("command", [[], ["verify"], ["tarsplit"]])
def test_the_guide_names_every_option(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = cli.main([*command, "--help"])
    except SystemExit as exited:  # argparse's --help (tarsplit returns instead)
        code = int(exited.code or 0)
    assert code == 0
    options = long_options(capsys.readouterr().out)
    assert options, "no options found in --help"
    guide = GUIDE.read_text()
    prefix = " ".join(["qa-packager", *command])
    synopsis = [line for line in guide.splitlines() if line.lstrip().startswith(prefix)]
    assert synopsis, prefix
    missing = sorted(option for option in options if option not in guide)
    assert not missing, f"{prefix}: {missing} not in docs/packaging.md"


def test_the_guide_names_every_keyword_of_package() -> None:
    keywords = [
        name for name, parameter in inspect.signature(package).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]  # fmt: skip
    guide = GUIDE.read_text()
    assert not [k for k in keywords if f"`{k}`" not in guide], keywords


def test_the_guide_states_the_packpath_naming_rule() -> None:
    guide = " ".join(GUIDE.read_text().split())
    assert "`--packpath` must be named after the project code" in guide
