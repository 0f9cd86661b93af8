"""``qa-packager``: package a reduction directory from the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from observatory.packaging.qa2 import APPENDS, MODES, PackagingError, package


def main(argv: Sequence[str] | None = None) -> int:
    """Run the packager; 0 on success, 1 with the reason otherwise."""
    parser = argparse.ArgumentParser(
        prog="qa-packager", description="Turn a QA2 reduction directory into a delivery package."
    )
    parser.add_argument(
        "--origpath", required=True, help="the reduction directory of one scheduling block"
    )
    parser.add_argument("--readme", required=True, help="the README header (a text file)")
    parser.add_argument(
        "--packpath", required=True, help="the package directory, named after the project code"
    )
    parser.add_argument(
        "--append", default="", choices=APPENDS, help="'' (start again), group or member"
    )
    parser.add_argument(
        "--mode", default="fake", choices=MODES, help="fake (default), copy, hard, move, ticket"
    )
    args = parser.parse_args(argv)
    try:
        plan = package(
            args.origpath, args.readme, args.packpath, append=args.append, mode=args.mode
        )
    except PackagingError as exc:
        print(f"qa-packager: {exc}", file=sys.stderr)
        return 1
    print(
        f"packaged {len(plan.steps)} entries into {args.packpath}/{plan.member} ({args.mode} mode)"
    )
    for note in plan.notes:
        if note.startswith("not packaged:"):
            print(note)
    return 0


def console_main() -> None:
    """Console-script entry point."""
    sys.exit(main())
