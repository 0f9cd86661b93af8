"""``qa-packager``: package a reduction directory from the command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from observatory.core.text import size_text
from observatory.packaging.qa2 import (
    APPENDS,
    MODES,
    Action,
    package,
    print_left_out,
    printable,
)

#: The exit code of a run stopped by Ctrl-C (SIGINT), as shells report one: 128 + 2.
INTERRUPTED_EXIT_CODE = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the packager (or ``qa-packager tarsplit|verify|undo-move ...``); 0 on success, 1
    otherwise, 2 for bad arguments, 130 when interrupted (Ctrl-C), saying what it left."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt as exc:
        print("qa-packager: interrupted", file=sys.stderr)
        for note in getattr(exc, "__notes__", []):  # what the interrupted run left
            print(printable(f"qa-packager: {note}"), file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def _main(arguments: list[str]) -> int:
    if arguments[:1] == ["tarsplit"]:
        from observatory.packaging.tarsplit import main as tarsplit_main

        return tarsplit_main(arguments[1:])
    if arguments[:1] == ["verify"]:
        return _verify(arguments[1:])
    if arguments[:1] == ["undo-move"]:
        return _undo_move(arguments[1:])
    parser = argparse.ArgumentParser(
        prog="qa-packager",
        description="Turn a QA2 reduction directory into a delivery package. "
        "Also: 'qa-packager tarsplit -n NAME PACKAGE' (delivery tars), "
        "'qa-packager verify PACKAGE' (check the package against its manifest) and "
        "'qa-packager undo-move PACKAGE' (put back the files of an unfinished move).",
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
    parser.add_argument(
        "--dry-run", action="store_true", help="print what the run would do; change nothing"
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the checks against the origin: copies compared byte for byte (copy), "
        "origin symlinks checked (move); hard links are always checked and the sha256 "
        "manifest is still written",
    )
    parser.add_argument(
        "--style",
        default="legacy",
        choices=("legacy", "modern"),
        help="legacy: sg_ouss_id/group_ouss_id/member_ouss_id; "
        "modern: science_goal.<uid>/group.<uid>/member.<uid>",
    )
    parser.add_argument("--sg-uid", help="science goal OUS uid (modern style)")
    parser.add_argument("--group-uid", help="group OUS uid (modern style)")
    parser.add_argument("--member-uid", help="member OUS uid (modern style)")
    args = parser.parse_args(arguments)
    given = {"--sg-uid": args.sg_uid, "--group-uid": args.group_uid,
             "--member-uid": args.member_uid}  # fmt: skip
    missing = [option for option, uid in given.items() if not uid]
    if args.style == "modern" and missing:
        parser.error(f"--style modern needs --sg-uid, --group-uid and --member-uid (missing: "
                     f"{', '.join(missing)})")  # fmt: skip
    if missing and len(missing) < len(given):  # never silently ignored
        parser.error(f"{', '.join(o for o in given if o not in missing)} given without "
                     f"{', '.join(missing)}: the modern layout needs all three uids (with "
                     "--style modern)")  # fmt: skip
    uids = None if missing else (args.sg_uid, args.group_uid, args.member_uid)
    try:
        with _progress_bar(enabled=sys.stderr.isatty() and not args.dry_run) as progress:
            plan = package(
                args.origpath,
                args.readme,
                args.packpath,
                append=args.append,
                mode=args.mode,
                dry_run=args.dry_run,
                style=args.style,
                uids=uids,
                progress=progress,
                verify=not args.no_verify,
            )
    except (ValueError, OSError) as exc:  # PackagingError, or a malformed earlier manifest
        print(printable(f"qa-packager: {exc}"), file=sys.stderr)
        for note in getattr(exc, "__notes__", []):  # e.g. what a failed move leaves
            print(printable(f"qa-packager: {note}"), file=sys.stderr)
        return 1
    member = Path(args.packpath) / plan.member
    with reader_may_leave():  # ``qa-packager ... | head``: the reader has what it wanted
        for note in plan.undone:
            print(note)
        if args.dry_run:
            for action in plan.actions:
                print(action.describe(member))
            estimate = " before the README" + (
                " (measurement sets split in hard mode will be smaller)"
                if args.mode == "hard"
                else ""
            )
            print(
                f"{len(plan.actions)} actions; package size {plan.expected_size_bytes} bytes{estimate}"
            )
            print_left_out(plan)  # as the run says them: known before anything is written
            return 0
        print(f"packaged {len(plan.steps)} entries into {member} ({args.mode} mode)")
        print_left_out(plan)
    return 0


@contextmanager
def reader_may_leave() -> Iterator[None]:
    """Printing to a reader that stops reading (``| head``) ends quietly, the work done.

    The rest of the output goes nowhere: without a place to go, Python would report the
    broken pipe again when it flushes standard output at exit.
    """
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextmanager
def _progress_bar(*, enabled: bool) -> Iterator[Callable[[Action], None] | None]:
    """A rich progress bar over the run's actions when stderr is a terminal."""
    if not enabled:
        yield None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    # The number of actions is not known here (the plan is made inside the run): what has
    # been done is shown, files and bytes, and what is being done (a move's hashing, after
    # its files, included).
    columns = (SpinnerColumn(), TimeElapsedColumn(), TextColumn("{task.completed} done"),
               TextColumn("{task.fields[done_bytes]}"), TextColumn("{task.description}"))  # fmt: skip
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("packaging", total=None, done_bytes="")
        done_bytes = 0

        def advance(action: Action) -> None:
            nonlocal done_bytes
            done_bytes += action.size_bytes
            bar.update(task, advance=1, done_bytes=size_text(done_bytes),
                       description=f"{action.kind} {action.destination_text}")  # fmt: skip

        yield advance


def _verify(arguments: list[str]) -> int:
    from observatory.packaging.manifest import validate_manifest

    parser = argparse.ArgumentParser(
        prog="qa-packager verify",
        description="Re-hash a package against its manifest (<package>.manifest-sha256.txt).",
    )
    parser.add_argument("package", type=Path, help="the package directory (its project code)")
    parser.add_argument("--workers", type=int, default=2, help="hashing threads (default 2)")
    args = parser.parse_args(arguments)
    if args.workers < 1:
        parser.error(f"--workers must be 1 or more (hashing threads), not {args.workers}")
    from observatory.packaging.qa2 import reading_package

    # Absolute, as tarsplit takes it: the manifest of "." lies beside the directory "." names.
    package = Path(os.path.abspath(args.package))
    if not package.is_dir():
        what = "is not a directory" if os.path.lexists(package) else "does not exist"
        print(printable(f"qa-packager verify: no package directory {args.package}: it {what}"),
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        # Held for reading: a run starting to write it now would be found "damaged".
        with reading_package(package):
            problems = validate_manifest(package, workers=args.workers)
    except (ValueError, OSError) as exc:  # a run on it, an unreadable or malformed manifest
        print(f"qa-packager verify: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem, file=sys.stderr)
    verdict = "valid" if not problems else f"{len(problems)} problem{'s' * (len(problems) > 1)}"
    print(f"{args.package}: {verdict}")
    return 1 if problems else 0


def _undo_move(arguments: list[str]) -> int:
    from observatory.packaging.qa2 import undo_move

    parser = argparse.ArgumentParser(
        prog="qa-packager undo-move",
        description="Put back every file of an unfinished move into PACKAGE (one that cannot "
        "be finished) and undo the run.",
    )
    parser.add_argument("package", type=Path, help="the package directory (its project code)")
    args = parser.parse_args(arguments)
    try:
        # Absolute, as verify takes it: the journal of "." lies beside the directory "." names.
        print(printable(undo_move(os.path.abspath(args.package))))
    except (ValueError, OSError) as exc:
        print(printable(f"qa-packager undo-move: {exc}"), file=sys.stderr)
        return 1
    return 0


def console_main() -> None:
    """Console-script entry point."""
    sys.exit(main())
