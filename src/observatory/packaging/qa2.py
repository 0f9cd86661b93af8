"""The QA2 packager: a reduction directory of one scheduling block becomes a delivery package.

The rules are those of the ALMA early-science packaging script
(../shared/sources/qa2-packaging-script.txt): its parameters, modes, append modes,
naming and example output tree. A reduction directory holds one directory per
execution block (named after the end of its ASDM uid, e.g. ``X8c`` or
``Calibration_Xab1``) with ``uid___<EB>.ms.split``, ``.ms.split.cal``, calibration
tables, the calibration script, a checklist and a ``qa2`` directory; beside them,
the scheduling block's scripts, FITS products, logs and the combined
``calibrated.ms`` (never packaged). The package is::

    <project code>/sg_ouss_id/group_ouss_id/member_ouss_id/
        README  raw/  calibrated/  calibration/  script/  qa/  log/  product/

The plan (every source -> destination) is made first; the modes then carry it out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import functools
import io
import json
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from observatory.packaging.manifest import (
    THREADED_HASH_BYTES,
    bag_info_path,
    copy_and_hash,
    file_sha256,
    link_and_hash,
    manifest_path,
    not_a_file,
    sync_directory,
    sync_file,
    verify_against_sources,
    write_manifest,
)

#: A project code, e.g. ``2011.0.00229.S``.
PROJECT_CODE = re.compile(r"^\d{4}\.[0-9A-Z]\.\d{5}\.[A-Z]+$")
MODES = ("fake", "copy", "hard", "move", "ticket")
APPENDS = ("", "group", "member")
QA2_PATTERNS = (
    "*.jpg",
    "*qa2.txt",
    "*qa2-summ.txt",
    "*.qa2.pdf",
    "*textfile.txt",
    "*qa2_part?.png",
    # The document's pattern takes parts 1 to 9; a report of ten parts or more loses none.
    "*qa2_part[0-9][0-9].png",
)
CHECKLIST_PATTERNS = ("*checklist", "*checklist.txt", "*Checklist", "*Checklist.txt")
#: The member directory's sub-directories, in the README's order.
SECTIONS = ("raw", "calibrated", "calibration", "script", "qa", "log", "product")
_UID = re.compile(r"^(uid___[A-Za-z0-9]+_X[0-9a-f]+_X[0-9a-f]+)")


class PackagingError(ValueError):
    """A packaging request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class Step:
    """One entry of the plan: copy ``source`` (a file or a directory) to ``destination``.

    ``uid`` is the execution block of a file kept under its own name in its block's
    directory (a script or FITS file): given the uid prefix if another file would be
    packaged under the same name (the document: names that are not unique get the uid).
    """

    source: Path
    destination: Path  # relative to the member directory
    is_directory: bool
    uid: str | None = None


@dataclass
class Plan:
    """What a packaging run does."""

    member: Path  # relative to packpath
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # text for the PI found in the reduction
    #: What the run undid first: a run on this package that did not finish (see Journal).
    undone: list[str] = field(default_factory=list)
    #: The execution blocks found: uid -> their directory.
    execution_blocks: dict[str, Path] = field(default_factory=dict)
    #: Bytes of the package with real files (README included), whatever the mode.
    expected_size_bytes: int = 0
    #: What the run does (or, in a dry run, would do), in order.
    actions: list[Action] = field(default_factory=list)

    def add(self, source: Path, *destination: str, uid: str | None = None) -> None:
        self.steps.append(Step(source, Path(*destination), source.is_dir(), uid))


#: Suffixes of the names a move makes for an instant (left behind only by a crash).
TEMPORARY_SUFFIXES = (".qa-packager-link", ".qa-packager-partial")


def _entries(directory: Path, plan: Plan, *, recursive: bool = False) -> list[Path]:
    """A directory's entries, sorted, without the packager's own temporary names and
    without hidden ones (``.ipynb_checkpoints/``, an editor's ``.textfile.txt.swp``: names
    starting with ``.``), which go to the plan's notes as not packaged (a hidden
    directory's contents are left out with it)."""
    found = sorted(directory.rglob("*") if recursive else directory.iterdir())
    kept = []
    for path in found:
        if path.name.endswith(TEMPORARY_SUFFIXES):
            continue
        parts = path.relative_to(directory).parts
        if any(part.startswith(".") for part in parts[:-1]):
            continue  # inside a hidden directory, which is reported itself
        if path.name.startswith("."):
            plan.notes.append(f"not packaged: {path} (hidden)")
            continue
        kept.append(path)
    return kept


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


#: An execution block's own entries, after its uid: a directory holding one is an execution
#: block's. Not any ``uid___...ms*`` name: images made from its data (``<uid>.ms.split.cal.cont.image``,
#: their FITS) are kept in products directories too.
EB_SUFFIXES = (".ms", ".ms.split", ".ms.split.cal", ".ms.scriptForCalibration.py")


def eb_uid(directory: Path) -> str | None:
    """The ASDM uid of an execution-block directory (from its ``<uid>`` + ``EB_SUFFIXES`` entries)."""
    for entry in sorted(directory.iterdir()):
        match = _UID.match(entry.name)
        if match and entry.name[match.end() :] in EB_SUFFIXES:
            return match.group(1)
    return None


def table_type(directory: Path) -> str | None:
    """The casacore table type of ``directory`` (``Image``, ``Measurement Set``,
    ``Calibration``...: its ``table.info`` first line), ``""`` for a table without one,
    None when it is no table."""
    if not (directory / "table.dat").is_file():
        return None
    try:
        with (directory / "table.info").open(encoding="utf-8", errors="replace") as info:
            first = info.readline()
    except OSError:
        return ""
    name, separator, value = first.partition("=")
    return value.strip() if separator and name.strip() == "Type" else ""


def _raw_or_image(entry: Path) -> str | None:
    """Why a directory of a reduction is not packaged although its name starts with the uid:
    the raw ASDM (``importasdm``'s input, in the archive already) or a CASA image (its
    FITS export is the product); None for anything else."""
    if not entry.is_dir():
        return None
    if (entry / "ASDM.xml").is_file():
        return "the raw ASDM"
    if table_type(entry) == "Image":
        return "a CASA image: its FITS export is the product"
    return None


def unique_name(name: str, uid: str) -> str:
    """Names that do not start with the uid (or ``X...``) get ``<uid>__`` in front."""
    return name if name.startswith(("uid___", "X")) else f"{uid}__{name}"


def checklist_name(name: str, directory: Path) -> str:
    """A checklist's name in ``qa/``: ``<directory>.checklist.txt``, unless its name is
    unique already (starts with the uid or ``X...``): "'X8c.checklist.txt' will not be
    renamed" (the source document). The directory's own name, however it was given
    (``--origpath .`` has no name of its own)."""
    if name.startswith(("uid___", "X")):
        return name
    return f"{os.path.basename(os.path.abspath(directory))}.checklist.txt"


def _classify_eb(plan: Plan, directory: Path, uid: str) -> None:
    """An execution block's entries (and its ``qa2`` directory, at any depth) into the plan."""
    plan.execution_blocks[uid] = directory
    for entry in _entries(directory, plan):
        name = entry.name
        if entry.is_dir() and name == "qa2":
            for item in _entries(entry, plan, recursive=True):
                if not item.is_dir():
                    if _matches(item.name, QA2_PATTERNS + CHECKLIST_PATTERNS):
                        plan.add(item, "qa", unique_name(item.name, uid))
                    else:  # the document: QA2 files "should match one of" its patterns
                        plan.notes.append(
                            f"not packaged: {item} (in qa2/, but no QA2 file: its name matches "
                            f"none of {', '.join(QA2_PATTERNS + CHECKLIST_PATTERNS)})"
                        )
                elif item.is_symlink():  # not followed (as everywhere below the SB's level)
                    plan.notes.append(
                        f"not packaged: {item} (a symlinked directory inside {entry})"
                    )
        elif name == f"{uid}.ms.split":
            plan.add(entry, "raw", name)
        elif name == f"{uid}.ms.split.cal":
            plan.add(entry, "calibrated", name)
        elif name in (f"{uid}.ms", f"{uid}.ms.flagversions"):
            continue  # the raw measurement set is not delivered
        elif (reason := _raw_or_image(entry)) is not None:
            plan.notes.append(f"not packaged: {entry} ({reason})")
        elif name.endswith(".py"):
            plan.add(entry, "script", name, uid=uid)
        elif name.endswith(".fits"):  # a single-asdm SB keeps its images with the EB
            plan.add(entry, "product", name, uid=uid)
        elif _matches(name, CHECKLIST_PATTERNS):
            plan.add(entry, "qa", checklist_name(name, directory))
        elif _matches(name, QA2_PATTERNS):
            plan.add(entry, "qa", unique_name(name, uid))
        elif name.endswith(".log"):
            plan.add(entry, "log", unique_name(name, uid))
        elif name.startswith(uid) and name.endswith(".plots"):
            plan.add(entry, "calibration", f"{uid}.calibration.plots", name)
        elif name.startswith(uid):
            plan.add(entry, "calibration", f"{uid}.calibration", name)
        elif entry.is_dir() and table_type(entry) == "Calibration":
            # "all calibration tables" belong to the block, whatever the reducer named
            # them (``bandpass.bcal``); their names are made unique as any other's.
            plan.add(entry, "calibration", f"{uid}.calibration", unique_name(name, uid))
        else:
            plan.notes.append(f"not packaged: {entry}")


def _classify_sb_file(
    plan: Plan, entry: Path, sb: Path, header: Path | None, *, nested: bool = False
) -> None:
    """A scheduling block's file (or a directory of its products) into the plan.

    A checklist becomes ``qa/<SB dir>.checklist.txt`` (as an execution block's is named
    after its directory) unless its name is unique already; the SB's other text files are
    notes for the PI, put in the README; the README header itself, kept in the reduction,
    is not packaged (it heads the README). In its products directories (``nested``) only
    FITS files are packaged, as the document finds "data products in those directories"
    (scripts, logs, QA2 files and notes there, such as an old try's script, are not).
    """
    name = entry.name
    if name == "calibrated.ms" or name.endswith(".ms"):
        return  # the combined measurement set is not packaged
    if entry.is_dir():  # products kept beside the EB directories, at any depth
        if table_type(entry) is not None or (entry / "ASDM.xml").is_file():
            # CASA images and other tables are not delivered as such (FITS exports are):
            # each of their files would be a stray "not packaged" line.
            plan.notes.append(f"not packaged: {entry} ({_raw_or_image(entry) or 'a CASA table'})")
            return
        for item in _entries(entry, plan):
            if item.is_dir() and item.is_symlink():  # followed only at the SB's level
                plan.notes.append(f"not packaged: {item} (a symlinked directory inside {entry})")
            else:
                _classify_sb_file(plan, item, sb, header, nested=True)
        return
    if header is not None and _same_file(entry, header):
        plan.notes.append(f"not packaged: {entry} (the README header)")
    elif name.endswith(".fits"):
        plan.add(entry, "product", name)
    elif nested:
        # The document finds data products in directories beside the execution blocks;
        # scripts, logs and QA2 files at the SB level and in the blocks' directories (an
        # old try's ``old_try/scriptForImaging_v1.py`` is not the script that was run).
        plan.notes.append(
            f"not packaged: {entry} (in a products directory, where only FITS products are "
            "looked for)"
        )
    elif name.endswith(".py"):
        plan.add(entry, "script", name)
    elif name.endswith(".log"):
        plan.add(entry, "log", name)
    elif _matches(name, CHECKLIST_PATTERNS):
        plan.add(entry, "qa", checklist_name(name, sb))
    elif _matches(name, QA2_PATTERNS):
        plan.add(entry, "qa", name)
    elif name.endswith(".txt"):
        plan.notes.append(_read_text(entry, "notes file"))  # notes for the PI: into the README
    else:
        plan.notes.append(f"not packaged: {entry}")


def _same_file(path: Path, other: Path) -> bool:
    try:
        return os.path.samefile(path, other)
    except OSError:
        return False


def _read_text(path: Path, what: str) -> str:
    """A text file the README includes; a clear error when it is not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PackagingError(
            f"{what} {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}): save it as UTF-8 (or ASCII)"
        ) from exc
    except OSError as exc:
        raise PackagingError(f"cannot read {what} {path}: {exc.strerror}") from exc


def plan_package(origpath: Path, member: Path, header: Path | None = None) -> Plan:
    """The plan for one reduction directory (a scheduling block, or a project of EB directories).

    ``header`` is the README header file, not packaged when it lies in the reduction.
    """
    plan = Plan(member=member)
    entries = _entries(origpath, plan)
    execution_blocks = {
        entry: uid for entry in entries if entry.is_dir() and (uid := eb_uid(entry)) is not None
    }
    # A directory of execution blocks is a scheduling block even when a stray uid-named file
    # lies beside them; only one without any is an execution block given directly.
    own_uid = None if execution_blocks else eb_uid(origpath)
    for directory in [*execution_blocks, *([origpath] if own_uid is not None else [])]:
        _refuse_two_execution_blocks(directory)
    if own_uid is not None:
        _classify_eb(plan, origpath, own_uid)
    else:
        for entry in entries:
            if entry in execution_blocks:
                _classify_eb(plan, entry, execution_blocks[entry])
            else:
                _classify_sb_file(plan, entry, origpath, header)
    _check_execution_blocks(plan, origpath)
    _prefix_clashing_names(plan)
    # An execution block given as origpath is listed twice (as the reduction, then as its
    # block): each entry left out is said once.
    plan.notes = list(dict.fromkeys(plan.notes))
    return plan


def _refuse_two_execution_blocks(directory: Path) -> None:
    """An execution block's directory holds one execution block: the document asks for a
    directory per ASDM, and the files of a second would be packaged as the first's (or not
    at all)."""
    defining = sorted(
        {
            match.group(1)
            for entry in directory.iterdir()
            if (match := _UID.match(entry.name))
            and entry.name.endswith((".ms.split", ".ms.scriptForCalibration.py"))
        }
    )
    if len(defining) > 1:
        raise PackagingError(
            f"{directory} holds the files of {len(defining)} execution blocks "
            f"({', '.join(defining)}): put each in a directory of its own (as the document's "
            "X8c and X528)"
        )


def _prefix_clashing_names(plan: Plan) -> None:
    """Files of execution blocks kept under their own names get their uid when two would clash.

    Raises
    ------
    PackagingError
        When files would still be packaged under one name, naming them.
    """
    count = Counter(step.destination for step in plan.steps)
    plan.steps = [
        dataclasses.replace(
            step,
            destination=step.destination.with_name(unique_name(step.destination.name, step.uid)),
        )
        if step.uid is not None and count[step.destination] > 1
        else step
        for step in plan.steps
    ]
    by_destination: dict[Path, list[str]] = {}
    for step in plan.steps:
        by_destination.setdefault(step.destination, []).append(str(step.source))
    clashes = [
        f"{destination} ({' and '.join(sources)})"
        for destination, sources in sorted(by_destination.items())
        if len(sources) > 1
    ]
    if clashes:
        raise PackagingError(f"two files would be packaged as {'; '.join(clashes)}: rename one")


def _check_execution_blocks(plan: Plan, origpath: Path) -> None:
    """Every execution block found has its raw data and its calibration script.

    The later ALMA packager fails when the execution blocks in ``script/`` and ``raw/``
    differ: a package without one of them cannot be recalibrated by the PI. An execution
    block's directory without either (its raw ``.ms`` and tables only) would be packaged
    half-way, so it is refused too.
    """
    raw = {
        _UID.match(step.destination.name).group(1)  # type: ignore[union-attr]
        for step in plan.steps
        if step.destination.parts[0] == "raw"
    }
    if not raw and not plan.execution_blocks:
        found_sets = sorted(origpath.rglob("*.ms.split"))
        # Well named but too deep: origpath is a project, above its scheduling blocks.
        scheduling_blocks = sorted(
            {path.parent.parent for path in found_sets if _UID.match(path.name)} - {origpath}
        )
        if scheduling_blocks:
            raise PackagingError(
                f"{origpath} holds no execution block of its own: its measurement sets are "
                "further down, in the scheduling blocks "
                + ", ".join(str(sb) for sb in scheduling_blocks[:3])
                + ("..." if len(scheduling_blocks) > 3 else "")
                + "; origpath is one scheduling block's reduction directory (the directory "
                "of its execution blocks): package each of them, the next ones with "
                "append='member'"
            )
        # The document's prose says uid___xxx.split and uid___xxx.split.cal; its example
        # trees (input and package) name them <uid>.ms.split and <uid>.ms.split.cal.
        misnamed = sorted(
            {
                str(path.relative_to(origpath))
                for pattern in ("*.split", "*.split.cal")
                for path in origpath.rglob(pattern)
            }
        )
        raise PackagingError(
            f"{origpath} holds no execution block: none of its measurement sets is named "
            "<uid>.ms.split with a full ALMA uid (as uid___A002_X3c9295_X8c.ms.split)"
            + (
                f"; found {_some(misnamed)} (name them <uid>.ms.split and <uid>.ms.split.cal, "
                "as the document's example trees do)"
                if misnamed
                else ""
            )
        )
    scripted = {
        step.destination.name.removesuffix(".ms.scriptForCalibration.py")
        for step in plan.steps
        if step.destination.parts[0] == "script"
        and step.destination.name.endswith(".ms.scriptForCalibration.py")
    }
    found = set(plan.execution_blocks)
    missing = [f"{uid}.ms.scriptForCalibration.py" for uid in sorted((raw | found) - scripted)]
    missing += [
        f"{uid}.ms.split"
        + (
            f" (found {uid}.split: name it {uid}.ms.split, as the document's example trees do)"
            if uid in plan.execution_blocks
            and (plan.execution_blocks[uid] / f"{uid}.split").exists()
            else ""
        )
        for uid in sorted((scripted | found) - raw)
    ]
    if missing:
        raise PackagingError(
            f"{origpath}: each execution block needs its .ms.split and its calibration script; "
            f"missing: {', '.join(missing)}"
        )


def _check_paths(origpath: Path, packpath: Path) -> None:
    """Refuse a packpath that is not named after a project code, or that holds what a run
    must not clear or write into: ``/``, the home directory or one of its ancestors, the
    current directory or one of its ancestors, the reduction directory or an ancestor."""
    if not PROJECT_CODE.match(packpath.name):
        named = f"not {packpath.name!r}" if packpath.name else f"not {os.fspath(packpath)!r}"
        raise PackagingError(
            f"packpath must be named after the project code (e.g. 2011.0.00229.S), {named}"
        )
    resolved, origin = packpath.resolve(), origpath.resolve()
    held = {"the home directory": Path.home().resolve(), "the reduction directory": origin}
    with contextlib.suppress(FileNotFoundError):  # a current directory deleted meanwhile
        held["the current directory"] = Path.cwd().resolve()
    for what, directory in held.items():
        if directory.is_relative_to(resolved):
            raise PackagingError(
                f"packpath {packpath} would contain {what} ({directory}) or be it: clearing "
                "or writing the package there could lose data; refused"
            )
    if resolved.is_relative_to(origin):
        raise PackagingError(
            f"packpath {packpath} is inside the reduction directory {origpath}: the package "
            "would be packaged into itself by the next run; refused"
        )
    if not origpath.is_dir():
        raise PackagingError(f"origpath {origpath} is not a directory")
    if packpath.is_symlink():
        raise PackagingError(f"packpath {packpath} is a symlink: give the directory it names")
    if packpath.exists() and not packpath.is_dir():
        raise PackagingError(f"packpath {packpath} exists and is not a directory")


def _next_member(packpath: Path, append: str, ignored: Path | None = None) -> Path:
    """The member directory this run writes (legacy layout), per the append mode.

    ``ignored``: a directory an unfinished run made (absolute), which its undo will remove.
    """

    def present(paths: Iterator[Path]) -> list[Path]:
        return sorted((p for p in paths if ignored is None or not p.absolute().is_relative_to(ignored)),
                      key=_index)  # fmt: skip

    sg = Path("sg_ouss_id")
    groups = present((packpath / sg).glob("group_ouss_id*")) if (packpath / sg).is_dir() else []
    if append == "group" and groups:
        return sg / f"group_ouss_id{_index(groups[-1]) + 1}" / "member_ouss_id"
    if append == "member" and groups:
        members = present(groups[-1].glob("member_ouss_id*"))
        number = _index(members[-1]) + 1 if members else 1
        return (
            sg / groups[-1].name / ("member_ouss_id" if number == 1 else f"member_ouss_id{number}")
        )
    return sg / "group_ouss_id" / "member_ouss_id"


#: An ALMA uid in either form, its separators not mixed: ``uid://A001/X1284/X1ef2`` or
#: ``uid___A001_X1284_X1ef2``.
_ANY_UID = re.compile(
    r"^uid(?:://([A-Za-z0-9]+)/X([0-9a-fA-F]+)/X([0-9a-fA-F]+)"
    r"|___([A-Za-z0-9]+)_X([0-9a-fA-F]+)_X([0-9a-fA-F]+))$"
)


def file_safe_uid(uid: str) -> str:
    """``uid://A002/X3c9295/X8c`` -> ``uid___A002_X3c9295_X8c``; the hexadecimal parts in
    lower case, as the archive writes them (``X1C`` is ``X1c``: one MOUS, one name)."""
    match = _ANY_UID.match(uid)
    if match is None:
        raise PackagingError(f"{uid!r} is not an ALMA uid (uid://A001/X1284/X1ef2)")
    archive, first, second = (part for part in match.groups() if part is not None)
    return f"uid___{archive}_X{first.lower()}_X{second.lower()}"


def _member_path(
    packpath: Path,
    append: str,
    style: str,
    uids: tuple[str, str, str] | None,
    *,
    ignored: Path | None = None,
) -> Path:
    """The member directory of this run, relative to packpath (``ignored``: see _next_member)."""
    if append and packpath.is_dir():
        other_layout = "science_goal.*" if style == "legacy" else "sg_ouss_id"
        if any(packpath.glob(other_layout)):
            raise PackagingError(
                f"{packpath} holds a package in the {'modern' if style == 'legacy' else 'legacy'} "
                f"layout: append to it with that style (a package has one layout)"
            )
    if style == "legacy":
        if uids is not None:
            raise PackagingError("uids are for style='modern'; the legacy layout uses placeholders")
        return _next_member(packpath, append, ignored)
    if style != "modern":
        raise PackagingError(f"style {style!r} is not 'legacy' or 'modern'")
    if uids is None:
        raise PackagingError("style='modern' needs the science goal, group and member uids")
    sg, group, member = (file_safe_uid(uid) for uid in uids)
    path = Path(f"science_goal.{sg}", f"group.{group}", f"member.{member}")
    if append and packpath.is_dir():
        _check_modern_append(packpath, append, path, ignored)
    return path


def _check_modern_append(packpath: Path, append: str, path: Path, ignored: Path | None) -> None:
    """An appended member's uids must say what ``append`` does: a member (MOUS) is in one
    group only (its tars are named after its uid), ``group`` adds a group the package does
    not hold, ``member`` a member to one it holds."""
    present = [
        found.relative_to(packpath)
        for found in packpath.glob("science_goal.*/group.*/member.*")
        if ignored is None or not found.absolute().is_relative_to(ignored)
    ]
    # Compared without case: a package made before uids were put in lower case.
    elsewhere = [
        found for found in present if found.name.lower() == path.name.lower() and found != path
    ]
    if elsewhere:
        raise PackagingError(
            f"{path.name.removeprefix('member.')} is already a member of {packpath}, in "
            f"{elsewhere[0].parent}: a member (MOUS) belongs to one group; give this one its "
            "own uid"
        )
    other_goal = [
        found.parent for found in present
        if found.parent.name.lower() == path.parent.name.lower() and found.parent != path.parent
    ]  # fmt: skip
    if other_goal:
        raise PackagingError(
            f"{path.parent.name.removeprefix('group.')} is already a group of {packpath}, in "
            f"{other_goal[0].parent}: a group (OUS) belongs to one science goal; check the "
            "science goal's uid"
        )
    group_present = any(found.parent == path.parent for found in present)
    if append == "group" and group_present:
        raise PackagingError(
            f"append='group' adds a group, but {path.parent} is already in {packpath}: "
            "append='member' adds a member to it"
        )
    if append == "member" and not group_present:
        raise PackagingError(
            f"append='member' adds a member to a group of the package, but {packpath} holds "
            f"no {path.parent}: append='group' adds a new group"
        )


#: The modes whose packages hold the data and a manifest, and those of dummies.
_REAL_MODES = ("copy", "hard", "move")
#: Where a package's member directories are, in the legacy and the modern layout.
_MEMBER_PATTERNS = ("sg_ouss_id/group_ouss_id*/member_ouss_id*", "science_goal.*/group.*/member.*")
#: The entries that say a member holds an execution block: section and suffix after the uid.
_EB_ENTRIES = (
    ("raw", ".ms.split"),
    ("calibrated", ".ms.split.cal"),
    ("script", ".ms.scriptForCalibration.py"),
)


def _members(found: Path, ignored: Path | None) -> list[Path]:
    """The member directories of the package ``found``, sorted, less those below
    ``ignored`` (what an unfinished run made, which its undo removes)."""
    return sorted(
        member
        for pattern in _MEMBER_PATTERNS
        for member in found.glob(pattern)
        if ignored is None or not member.absolute().is_relative_to(ignored)
    )


def _refuse_packaged_execution_blocks(
    plan: Plan, found: Path, pack: Path, ignored: Path | None
) -> None:
    """Refuse an append whose execution blocks a member of the package holds already.

    Appending the same reduction again (as another member, or in a new group) would put
    its measurement sets in the package twice: ``verify`` finds nothing wrong with that and
    ``tarsplit`` delivers every copy. An execution block is delivered once.

    Raises
    ------
    PackagingError
        Naming each execution block and the member that holds it; nothing is written.
    """
    wanted = {uid.lower(): uid for uid in plan.execution_blocks}
    held: dict[str, Path] = {}
    for member in _members(found, ignored):
        for section, suffix in _EB_ENTRIES:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for entry in os.scandir(member / section):
                    match = _UID.match(entry.name)
                    if match and entry.name[match.end() :] == suffix:
                        uid = match.group(1).lower()
                        if uid in wanted:
                            held.setdefault(wanted[uid], member.relative_to(found))
    if held:
        listed = "; ".join(f"{uid} (in {pack / member})" for uid, member in sorted(held.items()))
        raise PackagingError(
            f"the execution block{'s' * (len(held) > 1)} of this reduction "
            f"{'are' if len(held) > 1 else 'is'} already in the package: {listed}; an "
            "execution block is delivered once (appended again, it would be in the package "
            "twice and tarsplit would deliver both); nothing was written (to package it "
            "anew, start again with append='')"
        )


def _check_append_mode(
    found: Path, pack: Path, mode: str, pending: Journal | None, ignored: Path | None
) -> None:
    """Refuse an append that would mix real members with dummy ones (fake or ticket mode).

    A package is real when it has a manifest (copy, hard and move write one). A dummy
    member appended to it stays there, fails verification and stops tarsplit, and no run
    can take it out again without clearing the package; a real member appended to a
    package of dummies gets a manifest that does not cover them. ``found`` is the package
    as this run finds it, ``pending`` the journal of an unfinished run a dry run plans
    past (its undo puts back the manifest it set aside), ``ignored`` what that run made.

    Raises
    ------
    PackagingError
        Naming the package's kind and what to do instead.
    """
    if not _members(found, ignored):
        return
    manifest = manifest_path(pack)
    if pending is not None:  # as the manifest will be once the unfinished run is undone
        real = manifest.name in pending.existed and _set_aside(manifest).exists()
    else:
        real = manifest.exists()
    if real and mode not in _REAL_MODES:
        raise PackagingError(
            f"{pack} is a real package (it has a manifest): a {mode}-mode member appended to "
            "it would stay in it as dummy files and the package would no longer verify; "
            "preview the append with --dry-run, then append in copy, hard or move mode"
        )
    if not real and mode in _REAL_MODES:
        raise PackagingError(
            f"{pack} was made in fake or ticket mode (dummy files, no manifest): a real member "
            "appended to it would sit beside dummies its manifest does not cover; package the "
            "first reduction again for real (append ''), then append to that"
        )


def _moved_origins_path(packpath: Path) -> Path:
    """``<packpath>.moved-origins.json``: the reductions moved into the package (a list)."""
    return packpath.parent / f"{packpath.name}.moved-origins.json"


def _moved_origins(packpath: Path) -> list[str]:
    path = _moved_origins_path(packpath)
    if not path.exists():
        return []
    origins = _read_record(
        path,
        "the reductions whose files were moved into the package",
        "it must list them as a JSON list of paths; restore it, or write it anew naming every "
        "reduction moved into the package (a clearing run checks none still links into it)",
    )
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise PackagingError(f"{path} is not a JSON list of paths: restore it")
    return origins


def _refuse_if_linked_from(origins: list[Path], packpath: Path) -> None:
    """Clearing packpath must not strand the symlinks an earlier move left at an origin.

    ``origins`` are this run's reduction and every one an earlier run moved into the
    package (``<packpath>.moved-origins.json``): appending another SB after a move and
    then forgetting ``--append`` must not delete the only copy of the first.
    """
    path = _first_link_into(origins, packpath)
    if path is not None:
        raise PackagingError(
            f"{path} links into {packpath} (moved there by an earlier run): "
            "clearing the package would lose that data; refused (to add to the "
            "package, append a member or a group)"
        )


def _first_link_into(origins: list[Path], packpath: Path) -> Path | None:
    """A symlink below one of ``origins`` that names something in ``packpath``; None if none."""
    inside = packpath.resolve()
    for origin in origins:
        # Symlinked directories are followed: an earlier run may have moved files reached
        # through one (before such moves were refused), leaving its links outside the
        # reduction. Each real directory is read once (a link to an ancestor is no loop).
        seen: set[str] = set()
        for directory, dirnames, filenames in os.walk(origin, followlinks=True):
            try:
                real = os.path.realpath(directory)
            except OSError:  # below a link to where this user may not look (/proc/1/cwd)
                dirnames.clear()
                continue
            if real in seen:
                dirnames.clear()
                continue
            seen.add(real)
            for name in dirnames + filenames:
                path = Path(directory, name)
                try:
                    if path.is_symlink() and Path(os.path.realpath(path)).is_relative_to(inside):
                        return path
                except OSError:  # a link this user may not resolve (/proc's): not ours
                    continue
    return None


def _forget_moved_origin(packpath: Path, origin: Path) -> None:
    """Take ``origin`` off the moved-origins record once a move of it was undone.

    Left on it, a clearing run would be refused for good once the reduction is renamed
    (the package "may hold the only copy"). It stays while anything in the package is
    still linked from it (another run's files), or when it cannot be checked (gone).
    """
    origins = _moved_origins(packpath)
    absolute = os.path.realpath(origin)
    if absolute not in origins or not origin.is_dir():
        return
    if packpath.exists() and _first_link_into([origin], packpath) is not None:
        return
    rest = [o for o in origins if o != absolute]
    if rest:
        _replace_with(_moved_origins_path(packpath), json.dumps(rest).encode())
    else:
        _moved_origins_path(packpath).unlink()
        sync_directory(packpath.parent)


@dataclass
class Journal:
    """What a run records beside the package before it changes anything.

    ``<packpath>.qa-packager-journal.json``. Before a run changes the package it sets aside
    what it may replace: the files beside the package (manifest, ticket files) are
    hard-linked to hidden ``.<name>.qa-packager-previous`` names, and a package that
    ``append=''`` clears is renamed to one. A run that fails, or is killed, is undone by
    itself or by the next run: the directory it made is removed and what was set aside is
    put back. A run that finishes is committed: what was set aside is deleted. An
    interrupted move is not undone but finished, by running it again (or, when it cannot
    be finished, undone by :func:`undo_move`).
    """

    path: Path
    origpath: str
    member: str  # relative to packpath
    mode: str
    #: The directory this run made (removed by an undo); None when it cleared the package.
    made: str | None
    #: Names of the files beside the package that existed before the run.
    existed: list[str]
    cleared: bool
    committed: bool = False

    @classmethod
    def of(cls, packpath: Path) -> Journal | None:
        path = _journal_path(packpath)
        if not path.exists():
            return None
        fields = _read_record(
            path,
            "the journal of a run on the package",
            f"a run on {packpath} did not finish and its record cannot be read; check the "
            "package (and, after a move, that each file of the reduction is in place or a "
            "symlink into the package), then delete the journal to go on",
        )
        try:
            return cls(path=path, **fields)
        except TypeError as exc:
            raise PackagingError(f"{path} is not a journal the packager wrote ({exc})") from exc

    def made_path(self, packpath: Path) -> Path | None:
        """The directory the run made, checked to be ``packpath`` or inside it.

        Recorded absolute: a relative one would be taken from the directory the next run
        starts in, and an undo from elsewhere would remove a same-named directory there.

        Raises
        ------
        PackagingError
            When the journal names a directory outside the package: nothing is removed.
        """
        if not self.made:
            return None
        made, package = Path(self.made).absolute(), packpath.absolute()
        if made != package and not made.is_relative_to(package):
            raise PackagingError(
                f"{self.path} says its run made {made}, which is not in the package "
                f"{package}: nothing was removed; check the package, then delete the journal "
                "to go on"
            )
        return made

    def save(self) -> None:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "path"}
        _replace_with(self.path, json.dumps(fields).encode())


def unfinished_run(packpath: Path, *, locked: bool = False) -> str | None:
    """Why ``packpath`` cannot be read as a finished package now (for tarsplit and verify):
    a run writing it, or one that did not finish; None when neither. ``locked``: the
    caller holds the package for reading (:func:`reading_package`), so no run writes it."""
    # The lock first: a run in progress has a journal too, and is not to be run again.
    if not locked and _held_by_a_run(packpath):
        return f"a qa-packager run is writing {packpath} now: wait for it to finish"
    journal = Journal.of(packpath)
    if journal is not None and not journal.committed:
        return (
            f"a qa-packager {journal.mode} run on {packpath} did not finish ({journal.path}): "
            + ("run the same move again (or undo it: qa-packager undo-move)"
               if journal.mode == "move"
               else "run it again (any run on the package first undoes it)")
            + " before reading the package"
        )  # fmt: skip
    return None


def _replace_with(path: Path, content: bytes) -> None:
    """Write ``path`` anew (a new file through ``<path>.partial``, renamed over it): a kill
    leaves the old file whole, and the ``.partial`` that an undo removes. The new file, then
    its directory, reach the disk before this returns: the journal and the moved-origins
    record must outlive a power cut that the moves after them survive."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    sync_directory(path.parent)


def _read_record(path: Path, what: str, remedy: str) -> Any:
    """The JSON in ``path`` (a record of the packager's); a clear error when it is damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PackagingError(
            f"{path} ({what}) is damaged, not the JSON the packager wrote ({exc}): {remedy}"
        ) from exc


def _lock_path(packpath: Path) -> Path:
    """The hidden file whose ``flock`` a run holds (see :func:`_lock`)."""
    return packpath.parent / f".{packpath.name}.qa-packager-lock"


def _journal_path(packpath: Path) -> Path:
    return packpath.parent / f"{packpath.name}.qa-packager-journal.json"


def _beside(packpath: Path) -> list[Path]:
    """The files a run writes beside the package: manifest, bag-info and ticket files."""
    return [manifest_path(packpath), bag_info_path(packpath), *_ticket_paths(packpath)]


def _set_aside(path: Path) -> Path:
    """Where a run keeps ``path`` as it was until the run is committed or undone."""
    return path.with_name(f".{path.name}.qa-packager-previous")


def _begin(packpath: Path, origin: Path, member: Path, mode: str, *, clearing: bool) -> Journal:
    """Record the run, set aside what it may replace (and clear the package); the journal."""
    made = None
    if not clearing:
        made = next(
            (str(d.absolute()) for d in (packpath, *(packpath / p for p in reversed(member.parents[:-1])),
                                         packpath / member) if not d.exists()),
            None,
        )  # fmt: skip
    packpath.parent.mkdir(parents=True, exist_ok=True)
    journal = Journal(
        path=_journal_path(packpath), origpath=str(origin.absolute()), member=str(member),
        mode=mode, made=made, existed=[p.name for p in _beside(packpath) if p.exists()],
        cleared=clearing,
    )  # fmt: skip
    journal.save()
    for path in _beside(packpath):
        if path.name in journal.existed:
            _set_aside(path).unlink(missing_ok=True)
            os.link(path, _set_aside(path))
    if clearing:
        os.rename(packpath, _set_aside(packpath))
        for described in (manifest_path(packpath), bag_info_path(packpath)):
            described.unlink(missing_ok=True)  # they described what was cleared
    return journal


def _undo(packpath: Path, journal: Journal) -> str:
    """Put the package back as it was before ``journal``'s run; what was done, for the user.

    Safe to repeat, and to interrupt: each step checks what is there.
    """
    made = journal.made_path(packpath)
    removed = str(made) if made is not None and os.path.lexists(made) else None
    if removed:
        shutil.rmtree(removed)
    previous = _set_aside(packpath)
    if journal.cleared and previous.exists():
        if packpath.exists():
            shutil.rmtree(packpath)
        os.rename(previous, packpath)
        removed = str(packpath)
    for path in _beside(packpath):
        aside = _set_aside(path)
        if path.name in journal.existed:
            if aside.exists() and path.exists() and os.path.samefile(aside, path):
                aside.unlink()  # never replaced: rename(2) of a link onto its twin does nothing
            elif aside.exists():
                os.replace(aside, path)
        else:
            path.unlink(missing_ok=True)
    for path in (*_beside(packpath), _moved_origins_path(packpath), journal.path):
        path.with_name(path.name + ".partial").unlink(missing_ok=True)  # half-written by it
    journal.path.unlink(missing_ok=True)
    what = f"removed {removed}, " if removed and not journal.cleared else ""
    return (
        f"undid an unfinished {journal.mode} run of {journal.origpath}: {what}"
        f"{'restored the package it cleared' if journal.cleared else 'put back the files beside the package'}"
    )


def _commit(packpath: Path, journal: Journal) -> None:
    """The run is complete: delete what it set aside, then its journal.

    Raises
    ------
    PackagingError
        When the package set aside cannot be deleted: the journal stays (committed), so
        the next run tries again, and nothing ever puts that package back.
    """
    if not journal.committed:
        journal.committed = True
        journal.save()
    for path in _beside(packpath):
        _set_aside(path).unlink(missing_ok=True)
    previous = _set_aside(packpath)
    try:
        if os.path.lexists(previous):
            shutil.rmtree(previous)
    except OSError as exc:
        raise PackagingError(
            f"{packpath} is complete, but the package it replaced, set aside at {previous}, "
            f"could not be deleted ({exc.strerror or exc}: {exc.filename}); delete it "
            "yourself, or the next run tries again"
        ) from exc
    journal.path.unlink(missing_ok=True)


def _index(path: Path) -> int:
    """``group_ouss_id`` is 1, ``group_ouss_id2`` is 2, ..."""
    digits = re.search(r"(\d+)$", path.name)
    return int(digits.group(1)) if digits else 1


def _tree(root: Path) -> str:
    """The package as an indented listing (directories end in /), for the README."""
    lines = [f"|-- {root.name}/"]

    def walk(directory: Path, depth: int) -> None:
        for entry in sorted(directory.iterdir()):
            if depth > 1 and (entry.name == "README" or entry.name.endswith(".README.txt")):
                continue
            is_package_dir = entry.is_dir() and not entry.name.endswith(
                (".split", ".cal", ".calibration", ".plots")
            )
            lines.append(f"{'|   ' * depth}|-- {entry.name}{'/' if entry.is_dir() else ''}")
            if is_package_dir:
                walk(entry, depth + 1)

    walk(root, 1)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Action:
    """One filesystem operation of a run, as ``--dry-run`` prints it and the run performs it.

    ``kind`` is ``mkdir``, ``touch`` (a 0-byte stand-in), ``copy``, ``link`` (a hard link),
    ``split-ms`` (a measurement set rewritten with only its relevant data column) or ``move``
    (moved, then a symlink to the destination left at the origin); ``progress`` is also told
    of each file hashed for the manifest after them (``hash``). The paths are kept as
    text (``source``/``destination`` give them as Paths): a plan holds an action per file,
    and building two Paths each cost as much as linking a small file.
    """

    kind: str
    source_text: str | None
    destination_text: str  # relative to the member directory
    #: Bytes of the origin (a file, or a whole measurement set for ``split-ms``).
    size_bytes: int = 0
    #: The file system of the origin's file (``st_dev``; -1 when not a file).
    device: int = -1

    @property
    def source(self) -> Path | None:
        return None if self.source_text is None else Path(self.source_text)

    @property
    def destination(self) -> Path:
        return Path(self.destination_text)

    @property
    def section(self) -> str:
        """The package section (``raw``, ``calibrated``, ``qa``...) the action writes in."""
        return self.destination_text.partition("/")[0]

    def describe(self, member: Path) -> str:
        target = member / self.destination_text
        return (
            f"{self.kind:8} {self.source_text} -> {target}"
            if self.source_text
            else f"{self.kind:8} {target}"
        )


#: Sections whose files go into the ticket tar/zip (with the README and the size record).
TICKET_SECTIONS = ("qa", "script")
_FILE_ACTION = {"fake": "touch", "copy": "copy", "hard": "link", "move": "move"}


def _is_table(directory: Path) -> bool:
    return (directory / "table.dat").is_file()


def _walk(
    directory: str | os.PathLike[str], hidden: list[str] | None = None
) -> Iterator[tuple[str, bool, int, int]]:
    """``(relative path, is a directory, bytes, st_dev)`` below ``directory``, depth first, sorted.

    Symlinks are followed (a moved file is packaged as what it points at); the packager's
    own temporary names and hidden names (starting with ``.``: an editor's swap file, a
    notebook's checkpoints) are skipped, the hidden ones added to ``hidden`` (their paths).
    ``os.scandir`` and plain strings give the type and size without the per-path cost of
    pathlib, which matters with tens of thousands of files.

    Raises
    ------
    PackagingError
        At a symlink to nothing (what it named has gone: the package would miss it).
    """
    with os.scandir(directory) as scan:
        entries = sorted(
            (entry for entry in scan if not entry.name.endswith(TEMPORARY_SUFFIXES)),
            key=lambda entry: entry.name,
        )
    for entry in entries:
        if entry.name.startswith("."):
            if hidden is not None:
                hidden.append(entry.path)
        elif entry.is_dir():
            yield entry.name, True, 0, -1
            for relative, is_directory, size, device in _walk(entry.path, hidden):
                yield f"{entry.name}/{relative}", is_directory, size, device
        else:
            found = _stat(entry.path)
            yield entry.name, False, found.st_size, found.st_dev


def _stat(path: str | os.PathLike[str]) -> os.stat_result:
    """``os.stat`` of a file to package (symlinks followed).

    Raises
    ------
    PackagingError
        For a symlink whose file has gone, and for anything that is not a regular file (a
        named pipe, socket or device): reading a pipe would wait for a writer forever, part
        way through a copy or a move, and a package holds files and directories only.
    """
    try:
        found = os.stat(path)
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise PackagingError(
                f"{path} is a symlink to {os.readlink(path)}, which does not exist: restore "
                "the file or remove the link"
            ) from exc
        raise
    if not stat.S_ISREG(found.st_mode):
        raise PackagingError(
            f"{path} is {not_a_file(found.st_mode)}, which a package cannot hold (files and "
            "directories only): move it out of the reduction to package it; nothing was written"
        )
    return found


def plan_actions(plan: Plan, mode: str) -> list[Action]:
    """Every operation ``mode`` performs for ``plan``, in order (the same list a dry run prints)."""
    actions: list[Action] = []
    made: set[Path] = set()

    def mkdir(directory: Path) -> None:
        for parent in (*reversed(directory.parents[:-1]), directory):
            if parent not in made:
                made.add(parent)
                actions.append(Action("mkdir", None, str(parent)))

    for section in SECTIONS:
        if any(step.destination.parts[0] == section for step in plan.steps):
            mkdir(Path(section))
    hidden: list[str] = []  # inside the directories packaged: left out, as everywhere
    for step in plan.steps:
        section = step.destination.parts[0]
        if mode == "ticket":
            file_kind = "link" if section in TICKET_SECTIONS else "touch"
        else:
            file_kind = _FILE_ACTION[mode]
        mkdir(step.destination.parent)
        source, destination = str(step.source), str(step.destination)
        _refuse_line_breaks(source)
        if not step.is_directory:
            found = _stat(source)
            actions.append(Action(file_kind, source, destination, found.st_size, found.st_dev))
        elif mode == "hard" and section in ("raw", "calibrated") and _is_table(step.source):
            size = sum(size for _, _, size, _ in _walk(step.source, hidden))
            actions.append(Action("split-ms", source, destination, size))
        else:
            mkdir(step.destination)
            for relative, is_directory, size, device in _walk(step.source, hidden):
                _refuse_line_breaks(relative, step.source)
                if is_directory:
                    mkdir(step.destination / relative)
                else:
                    actions.append(
                        Action(
                            file_kind, f"{source}/{relative}", f"{destination}/{relative}", size,
                            device,
                        )
                    )  # fmt: skip
    plan.notes += [f"not packaged: {path} (hidden)" for path in hidden]
    return actions


def _refuse_line_breaks(name: str, directory: Path | None = None) -> None:
    """A name with a line break cannot be a line of the manifest (nor of ``sha256sum``'s);
    nor can one holding ``%0A`` or ``%0D``, which BagIt readers decode to line breaks."""
    where = name if directory is None else f"{directory}/{name}"
    if "\n" in name or "\r" in name:
        raise PackagingError(f"{where!r} has a line break in its name: rename it to package it")
    if _ENCODED_LINE_BREAK.search(name):
        raise PackagingError(
            f"{where!r} has %0A or %0D in its name, which BagIt readers of the manifest take "
            "for a line break: rename it to package it"
        )


_ENCODED_LINE_BREAK = re.compile("%0[ad]", re.IGNORECASE)


#: What a move adds to a name for an instant: ``<name>.qa-packager-partial`` in the package
#: (a copy across file systems), ``.<name>.qa-packager-link`` at the origin.
_PARTIAL_EXTRA_BYTES = len(TEMPORARY_SUFFIXES[1])
_LINK_EXTRA_BYTES = len(".") + len(TEMPORARY_SUFFIXES[0])


def _limit(path: Path, name: str, default: int) -> int:
    """``os.pathconf`` of the nearest existing directory of ``path`` (``default`` if unknown)."""
    existing = next((p for p in (path, *path.parents) if p.is_dir()), Path("/"))
    try:
        return os.pathconf(existing, name)
    except (OSError, ValueError):
        return default


def _shown(path: str) -> str:
    """A path as text that can always be printed (bytes that are not UTF-8 as ``\\xe9``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _too_long_message(
    member: Path, paths: list[str], extra: int = 0, where: str = "once packaged"
) -> str:
    """The refusal of names too long for the file system (see :func:`_check_names`)."""
    name_max = _limit(member, "PC_NAME_MAX", 255)
    path_max = _limit(member, "PC_PATH_MAX", 4096)
    return (
        f"names too long for the file system (at most {name_max} bytes a name"
        f"{f', {extra} of them for the temporary suffix a move adds' if extra else ''}, "
        f"{path_max} a path) {where}: {_some(paths)}; rename them (or use a shorter "
        "packpath); nothing was written"
    )


@contextlib.contextmanager
def _refusing_paths_too_long(member: Path) -> Iterator[None]:
    """Discovery of a reduction holding a path longer than ``PATH_MAX`` (which no system call
    takes: the file can be neither read nor packaged) fails as :func:`_check_names` refuses
    names too long, naming the path, instead of with the raw ``ENAMETOOLONG``.

    Raises
    ------
    PackagingError
        Naming the path too long.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        where = _shown(os.fspath(exc.filename)) if exc.filename is not None else "a path"
        raise PackagingError(
            _too_long_message(member, [where], where="in the reduction, which cannot be read")
        ) from exc


def _check_names(plan: Plan, member: Path, mode: str, origin: Path) -> None:
    """Refuse, before anything is written, a name the run could not write (in every mode).

    A name that is not UTF-8 (the README, manifest and ticket files are UTF-8 text) and a
    packaged name longer than the package's file system holds (the ``<uid>__`` prefix
    makes names longer; a move adds a temporary suffix for an instant) would fail part-way,
    after other files were written or moved.

    Raises
    ------
    PackagingError
        Naming the origin file of each such name.
    """
    name_max = _limit(member, "PC_NAME_MAX", 255)
    path_max = _limit(member, "PC_PATH_MAX", 4096)
    origin_name_max = _limit(origin, "PC_NAME_MAX", 255)
    extra = _PARTIAL_EXTRA_BYTES if mode == "move" else 0
    root = os.fsencode(member.absolute())
    not_utf8: list[str] = []
    too_long: list[str] = []
    for action in plan.actions:
        source = action.source_text
        packaged = action.destination_text
        # Most names are ASCII (one byte a character) and short: the first test passes them
        # without encoding or splitting (1.4 ms for 10,000 files, against 18 ms).
        if (
            packaged.isascii()
            and (source is None or source.isascii())
            and len(packaged) + extra <= name_max
            and len(root) + 1 + len(packaged) + extra < path_max
            and (source is None or len(source) < path_max)
            and (
                mode != "move"
                or source is None
                or len(source.rpartition("/")[2]) + _LINK_EXTRA_BYTES <= origin_name_max
            )
        ):
            continue
        # Only what is written (the packaged name) must be UTF-8: the reduction's own path,
        # above what is packaged, may hold any bytes.
        try:
            action.destination_text.encode("utf-8")
        except UnicodeEncodeError:
            not_utf8.append(_shown(source or action.destination_text))
        else:
            destination = os.fsencode(action.destination_text)
            longest = max(len(part) for part in destination.split(b"/")) + extra
            link_bytes = (
                len(os.fsencode(os.path.basename(source))) + _LINK_EXTRA_BYTES
                if mode == "move" and source is not None
                else 0
            )
            if (
                longest > name_max
                or len(root) + 1 + len(destination) + extra >= path_max
                or (source is not None and len(os.fsencode(source)) >= path_max)
                or link_bytes > origin_name_max
            ):
                too_long.append(
                    f"{source or action.destination_text} (as {action.destination_text})"
                )
    if not_utf8:
        raise PackagingError(
            f"file names that are not UTF-8 cannot be packaged (the README, manifest and ticket "
            f"files list them as UTF-8 text): {_some(not_utf8)}; rename them; nothing was written"
        )
    if too_long:
        raise PackagingError(_too_long_message(member, too_long, extra))


def relevant_data_column(source: Path, *, calibrated: bool) -> str:
    """The data column a packaged measurement set keeps (see :func:`split_measurement_set`)."""
    from casacore import tables

    try:
        table = tables.table(str(source), ack=False)
    except RuntimeError as exc:
        raise PackagingError(f"{source} cannot be read as a measurement set: {exc}") from exc
    with table:
        return _column_to_keep(source, table.colnames(), calibrated=calibrated)


def _column_to_keep(source: Path, names: list[str], *, calibrated: bool) -> str:
    keep = "CORRECTED_DATA" if calibrated and "CORRECTED_DATA" in names else "DATA"
    if keep not in names:
        raise PackagingError(f"{source} has no DATA column")
    return keep


def split_measurement_set(source: Path, destination: Path, *, calibrated: bool) -> None:
    """Write ``source`` to ``destination`` with only its relevant data column (python-casacore).

    A raw ``.ms.split`` keeps ``DATA``; a calibrated ``.ms.split.cal`` keeps ``CORRECTED_DATA``,
    renamed ``DATA`` as CASA's ``split(datacolumn='corrected')`` does (or its ``DATA`` when it has
    no corrected column). ``MODEL_DATA`` and the other data column are left out.

    The result is a new measurement set, independent of its origin as CASA's ``split`` makes
    one (CASA tasks that open it for update write its ``HISTORY``): the main table is
    written anew (its description, storage managers, rows, keywords and info, as casacore's
    deep copy writes them) and the subtables inside it are copied, made writable by their
    owner. casacore's own deep copy copies each subtable by running ``cp -r`` and
    ``chmod -Rf u+w`` through ``system()``: 24 process starts per measurement set, 0.09 s of
    the 0.1 s a small one took. A measurement set whose column keywords or nested keywords
    name tables (not seen in measurement sets) is deep-copied by casacore instead.
    """
    from casacore import tables

    try:
        with tables.table(str(source), ack=False) as table:
            names = table.colnames()
            keep = _column_to_keep(source, names, calibrated=calibrated)
            left_out = [
                name
                for name in ("DATA", "CORRECTED_DATA", "MODEL_DATA")
                if name != keep and name in names
            ]
            _write_without(table, source, destination, left_out)
        if keep != "DATA":
            with tables.table(str(destination), ack=False, readonly=False) as written:
                written.renamecol(keep, "DATA")
    except RuntimeError as exc:  # casacore's errors (an unreadable or damaged table file)
        raise PackagingError(f"{source} cannot be split (python-casacore): {exc}") from exc


def estimated_split_bytes(source: Path, *, calibrated: bool) -> int:
    """Bytes that hard mode's split of the measurement set ``source`` will take, estimated.

    The package that fake and ticket modes describe (their ``expected_size.txt``) is the one
    hard mode makes, as the document recommends the two for tickets and packages: its split
    measurement sets are their origins less the data columns the split leaves out
    (:func:`split_measurement_set`). A left-out column stored by a storage manager of its own
    (as CASA stores each data column) takes that manager's files with it; one sharing a
    storage manager, its cells' bytes (a column whose first cell was never written, none).
    The rewritten main table's own files differ by a few bytes to a few kB from the
    origin's (tests check within 1%). A set casacore cannot read, or without a ``DATA``
    column (which hard mode refuses to split), counts as its origin's size: fake and ticket
    modes package what they packaged before, and hard mode says what is wrong.
    """
    origin_bytes = sum(size for _, is_directory, size, _ in _walk(source) if not is_directory)
    return origin_bytes - _split_saving_bytes(source, calibrated=calibrated)


def _split_saving_bytes(source: Path, *, calibrated: bool) -> int:
    """Bytes of ``source`` that hard mode's split leaves out (see
    :func:`estimated_split_bytes`; 0 for a set that cannot be read or has no ``DATA``)."""
    from casacore import tables

    try:
        # A storage manager's files (table.fN, table.fN_TSM0..., table.fNi) lie in the
        # table's own directory.
        with os.scandir(source) as scan:
            root_files = [(e.name, e.stat().st_size) for e in scan if e.is_file()]
        with tables.table(str(source), ack=False) as table:
            names = table.colnames()
            keep = _column_to_keep(source, names, calibrated=calibrated)
            left_out = {"DATA", "CORRECTED_DATA", "MODEL_DATA"} & set(names) - {keep}
            n_rows = table.nrows()
            saved = 0
            for manager in table.getdminfo().values():
                dropped = [name for name in manager["COLUMNS"] if name in left_out]
                if dropped and len(dropped) == len(manager["COLUMNS"]):
                    own = f"table.f{manager['SEQNR']}"
                    saved += sum(
                        size
                        for name, size in root_files
                        if name == own or name.startswith((f"{own}_", f"{own}i"))
                    )
                elif dropped and n_rows:
                    saved += sum(_cell_bytes(table, name) * n_rows for name in dropped)
    except (PackagingError, RuntimeError, UnicodeError, OSError):
        return 0
    return saved


def _cell_bytes(table: Any, column: str) -> int:
    """Bytes of the first cell of an array ``column`` (0 when it was never written)."""
    if not table.iscelldefined(column, 0):
        return 0
    return int(table.getcell(column, 0).nbytes)


def _split_bytes_saved(plan: Plan) -> int:
    """How many bytes fewer than their origins hard mode's split measurement sets take
    (estimated; negative), for the expected size of fake and ticket modes' packages."""
    return -sum(
        _split_saving_bytes(step.source, calibrated=section == "calibrated")
        for step in plan.steps
        if step.is_directory
        and (section := step.destination.parts[0]) in ("raw", "calibrated")
        and _is_table(step.source)
    )


def _write_without(table: Any, source: Path, destination: Path, left_out: list[str]) -> None:
    """Write the casacore ``table`` (at ``source``) without the columns ``left_out`` as a new
    table at ``destination``, its subtables copied (see :func:`split_measurement_set`).

    No TaQL column selection: TaQL refuses a column whose unit casacore does not know, and
    pyuvdata labels uncalibrated data ``uncalib``.
    """
    from casacore import tables

    description = table.getdesc()
    keywords = description["_keywords_"]
    subtables = {
        name: Path(value.removeprefix("Table: "))
        for name, value in keywords.items()
        if isinstance(value, str) and value.startswith("Table: ")
    }
    if _names_tables({**description, "_keywords_": {}}) or any(
        _names_tables(value) for name, value in keywords.items() if name not in subtables
    ):
        table.copy(str(destination), deep=True, valuecopy=True).close()
        with tables.table(str(destination), ack=False, readonly=False) as written:
            written.removecols(left_out)
        return
    for name in left_out:
        del description[name]
    hypercolumns = description.get("_define_hypercolumn_", {})
    for name, hypercolumn in list(hypercolumns.items()):
        hypercolumn["HCdatanames"] = [
            column for column in hypercolumn.get("HCdatanames", []) if column not in left_out
        ]
        if not hypercolumn["HCdatanames"]:
            del hypercolumns[name]
    # A subtable is inside when the measurement set holds it, as a directory or as a symlink
    # to one elsewhere (copied, as the table it names: kept as a reference, the packaged set
    # would name the origin's).
    inside = {
        name: path
        for name, path in subtables.items()
        if path.resolve().parent == source.resolve()
        or Path(os.path.abspath(path)).parent == Path(os.path.abspath(source))
    }
    for name in inside:
        del keywords[name]  # made again below, naming the copies
    storage = {
        key: {**manager, "COLUMNS": kept}
        for key, manager in table.getdminfo().items()
        if (kept := [name for name in manager["COLUMNS"] if name not in left_out])
    }
    with tables.table(
        str(destination), tabledesc=description, dminfo=storage, nrow=0, ack=False
    ) as written:
        table.copyrows(written)
        info = table.info()  # casacore adds a newline to the readme it is given
        written.putinfo({**info, "readme": info["readme"].removesuffix("\n")})
        for name, path in inside.items():
            shutil.copytree(
                path,
                destination / name,
                copy_function=_copy_writable,
                ignore=shutil.ignore_patterns(
                    ".*", *(f"*{suffix}" for suffix in TEMPORARY_SUFFIXES)
                ),  # hidden names are not packaged (see _walk)
            )
            _make_directories_writable(destination / name)
            written.putkeyword(name, f"Table: {destination.absolute() / name}")


def _names_tables(value: object) -> bool:
    """Whether a casacore keyword value (or a record of them) refers to a table."""
    if isinstance(value, dict):
        return any(_names_tables(item) for item in value.values())
    return isinstance(value, str) and value.startswith("Table: ")


def _copy_writable(source: str, destination: str) -> None:
    """``shutil.copy2``, then writable by its owner, as casacore's table copies are."""
    shutil.copy2(source, destination)
    os.chmod(destination, os.stat(destination).st_mode | stat.S_IWUSR)


def _make_directories_writable(root: Path) -> None:
    """``chmod -R u+w`` for directories: ``copytree`` gives copies their origin's modes, and a
    read-only directory in the package could not be cleared by the next run."""
    for directory, _, _ in os.walk(root):
        mode = os.stat(directory).st_mode
        if not mode & stat.S_IWUSR:
            os.chmod(directory, mode | stat.S_IWUSR)


def _check_hard_mode(plan: Plan, origin: Path, packpath: Path) -> None:
    """Refuse before writing anything what hard mode would fail on half-way: a file on
    another file system than the package (a symlink may name one), a measurement set that
    cannot be opened or has a file that cannot be read."""
    existing = next(p for p in (packpath, *packpath.parents) if p.exists())
    package_device = os.stat(existing).st_dev
    if os.stat(origin).st_dev != package_device:
        raise PackagingError(
            f"hard mode cannot link {origin} into {packpath}: they are on different file "
            "systems (use copy mode)"
        )
    elsewhere = [
        action.source_text
        for action in plan.actions
        if action.kind == "link"
        and action.source_text
        and action.device not in (-1, package_device)
    ]
    if elsewhere:
        raise PackagingError(
            f"hard mode cannot link {_some(elsewhere)} into {packpath}: on another file system "
            "than the package (a symlink in the reduction names them; use copy mode)"
        )
    for action in plan.actions:
        if action.kind == "split-ms" and action.source is not None:
            unreadable = [
                f"{action.source_text}/{relative}"
                for relative, is_directory, _, _ in _walk(action.source)
                if not is_directory and not os.access(f"{action.source_text}/{relative}", os.R_OK)
            ]
            if unreadable:
                raise PackagingError(f"cannot read {_some(unreadable)}: nothing was written")
            relevant_data_column(action.source, calibrated=action.section == "calibrated")


def _some(paths: list[str]) -> str:
    """The first five of ``paths`` and how many more, for a message."""
    more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
    return ", ".join(paths[:5]) + more


def _check_movable(plan: Plan, origin: Path) -> None:
    """Refuse before moving anything a file move mode could not leave a symlink for.

    A symlink at the origin is either a file moved by an earlier run (into this package or
    another) or a link to something outside the reduction: moving it would move or strand
    what it points at. So is a file reached through a symlinked directory (an execution
    block's, a products directory, a subtable): its symlink would be left outside the
    reduction, where clearing the package cannot see it. Checked before the journal is
    written, so a refused run leaves nothing to finish.
    """
    moved = [a.source_text for a in plan.actions if a.kind == "move" and a.source_text]
    linked = [source for source in moved if os.path.islink(source)]
    if linked:
        raise PackagingError(
            f"move mode cannot move symlinks (moved by an earlier run, or links to files "
            f"elsewhere): {_some(linked)}; package them in copy mode, or move the files "
            "they name"
        )
    through = _through_symlinked_directories(moved, origin)
    if through:
        directories = sorted({directory for _, directory in through})
        raise PackagingError(
            f"move mode cannot move files reached through a symlinked directory "
            f"({_some(directories)}): {_some([source for source, _ in through])}; moving them "
            "would move or strand what the link points at; nothing was moved (package them "
            "in copy mode, or put the directory itself in the reduction)"
        )
    # Each origin file is replaced by a symlink made beside it: its directory must be writable.
    directories = sorted(
        {
            os.path.dirname(a.source_text) or "."
            for a in plan.actions
            if a.kind == "move" and a.source_text
        }
    )
    fixed = [d for d in directories if not os.access(d, os.W_OK | os.X_OK)]
    if fixed:
        raise PackagingError(
            f"move mode must replace each moved file by a symlink, and cannot write in "
            f"{_some(fixed)}: nothing was moved (make them writable, or use copy mode)"
        )


def _through_symlinked_directories(sources: list[str], origin: Path) -> list[tuple[str, str]]:
    """``(source, the symlinked directory it is reached through)`` for each of ``sources``
    (paths below ``origin``) that some directory between ``origin`` and it is a symlink for."""
    linked: dict[str, str | None] = {}

    def symlinked(relative: str) -> str | None:
        """The symlink among ``relative`` (a directory below origin) and its parents."""
        if relative in ("", "."):
            return None
        if relative not in linked:
            path = os.path.join(origin, relative)
            linked[relative] = (
                path if os.path.islink(path) else symlinked(os.path.dirname(relative))
            )
        return linked[relative]

    found = []
    for source in sources:
        directory = symlinked(os.path.relpath(os.path.dirname(source) or ".", origin))
        if directory is not None:
            found.append((source, directory))
    return found


def _check_readable(plan: Plan, mode: str) -> None:
    """Refuse before writing anything when a file the run must read cannot be read, or
    (hard mode) one the kernel will not let this user link.

    Linux's ``fs.protected_hardlinks`` (on by default) refuses a hard link to another
    user's file unless the linker may read and write it: in a reduction shared by a team,
    hard mode would stop part-way at the first such file.
    """
    reads = ("link",) if mode == "ticket" else ("copy", "link", "move")
    sources = [
        action.source_text for action in plan.actions if action.kind in reads and action.source_text
    ]
    if mode != "hard":
        unreadable = [source for source in sources if not os.access(source, os.R_OK)]
    else:  # one access() per file, as for the other modes, when the files may be written
        doubtful = [source for source in sources if not os.access(source, os.R_OK | os.W_OK)]
        unreadable = [source for source in doubtful if not os.access(source, os.R_OK)]
        euid = os.geteuid()
        protected = [
            source
            for source in doubtful
            if source not in unreadable and os.stat(source).st_uid != euid
        ]
        if protected and _protected_hardlinks():
            raise PackagingError(
                f"hard mode cannot link {_some(protected)}: they belong to another user and "
                "you may not write them, so the kernel refuses to hard-link them "
                "(fs.protected_hardlinks); nothing was written (use copy mode, or ask their "
                "owner to package them)"
            )
    if unreadable:
        raise PackagingError(f"cannot read {_some(unreadable)}: nothing was written")


def _protected_hardlinks() -> bool:
    """Whether the kernel restricts hard links to files of other users (unknown: it does)."""
    try:
        return Path("/proc/sys/fs/protected_hardlinks").read_text().strip() != "0"
    except OSError:
        return True


def _hard_link(
    source: str | os.PathLike[str], destination: str | os.PathLike[str], *, cwd_fd: int
) -> None:
    """Hard-link ``source`` (a symlink: the file it names) at ``destination``.

    ``os.link`` on Linux links a symlink itself, and a symlink in the package would be
    dangling (relative) or outside it (absolute); ``linkat`` with ``AT_SYMLINK_FOLLOW``, which
    Python uses only when given a directory descriptor, links the file.
    """
    try:
        os.link(source, destination, src_dir_fd=cwd_fd, follow_symlinks=True)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise PackagingError(
                f"hard mode cannot link {source} into {os.path.dirname(destination)}: they are on "
                "different file systems (use copy mode)"
            ) from exc
        if exc.errno == errno.EPERM:  # changed since _check_readable, or another rule
            raise PackagingError(
                f"hard mode cannot link {source}: the kernel refuses (owned by another user, "
                "or immutable); use copy mode"
            ) from exc
        raise


def _execute(action: Action, member: Path, mode: str) -> None:
    """Perform one action other than ``copy`` and hard-mode ``link`` (``_copy_or_link_all``)."""
    target = member / action.destination_text
    source = action.source
    if action.kind == "mkdir":
        target.mkdir(parents=True, exist_ok=True)
    elif action.kind == "touch":
        target.touch()
    elif source is None:
        raise AssertionError(f"{action.kind} needs a source")
    elif action.kind == "link" and mode == "ticket":
        # As in hard mode, a symlink in the reduction is packaged as the file it names.
        cwd_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            _hard_link(source, target, cwd_fd=cwd_fd)
        except (OSError, PackagingError):  # e.g. another file system: the ticket's files
            shutil.copy2(source, target)  # are small, a copy (of what a symlink names) does
            sync_file(target)  # on disk before the run is committed (see _carry_out)
        finally:
            os.close(cwd_fd)
    elif action.kind == "split-ms":
        split_measurement_set(source, target, calibrated=action.section == "calibrated")
    elif action.kind == "move":
        move_with_symlink(source, target)
    else:
        raise AssertionError(f"unknown action {action.kind}")


#: Files a worker thread takes at a time (fewer when they add up to ``_CHUNK_BYTES``): handing
#: a task to a thread costs about as much as linking a small file.
_CHUNK_FILES = 64
_CHUNK_BYTES = 32 << 20


def _chunks(actions: list[Action]) -> Iterator[list[Action]]:
    """``actions`` in order, in runs of up to ``_CHUNK_FILES`` files and ``_CHUNK_BYTES``."""
    chunk: list[Action] = []
    size = 0
    for action in actions:
        if chunk and (len(chunk) == _CHUNK_FILES or size + action.size_bytes > _CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(action)
        size += action.size_bytes
    if chunk:
        yield chunk


def _copy_or_link_chunk(
    chunk: list[Action],
    member: Path,
    verify: bool,
    progress: Callable[[Action], None] | None,
    cwd_fd: int,
) -> tuple[dict[str, str], list[str]]:
    """Copy or hard-link each file of ``chunk``, hashing it; ``({path: sha256}, problems)``."""
    known: dict[str, str] = {}
    problems: list[str] = []
    member_path = os.fspath(member)
    make_link = functools.partial(_hard_link, cwd_fd=cwd_fd)
    for action in chunk:
        source = action.source_text
        assert source is not None
        # Strings, not Paths: pathlib's joins cost as much as linking a small file.
        target = f"{member_path}/{action.destination_text}"
        try:
            if action.kind == "copy":
                # Synced here, in the worker, so that the syncs overlap the other copies.
                digest = copy_and_hash(source, target, verify=verify, durable=True)
            else:
                digest = link_and_hash(source, target, make_link=make_link)
            known[target] = digest
        except PackagingError:
            raise
        except ValueError as exc:
            problems.append(str(exc))
        if progress is not None:
            progress(action)
    return known, problems


def _copy_or_link_all(
    actions: list[Action],
    member: Path,
    *,
    workers: int,
    verify: bool,
    progress: Callable[[Action], None] | None,
) -> dict[str, str]:
    """Run the ``copy`` and hard-mode ``link`` actions in ``workers`` threads; ``{path: sha256}``.

    Each file is copied, compared with its origin and hashed block by block
    (``copy_and_hash``), or linked, checked to be the origin's inode and hashed
    (``link_and_hash``), so the manifest needs no second pass. They run in the plan's order,
    which mixes small files with big ones: creating a file costs the kernel 0.1-0.7 ms here
    whatever its size, and those creations overlap the big files' copying and hashing;
    largest first left the small files for the end, contending for their directories' locks
    (1.36-1.45 s against 1.23-1.27 s for 2 GB in 807 files). Their directories exist already.

    Raises
    ------
    PackagingError
        Naming every file that does not hold its origin's bytes (after all have run), or
        at the first link that cannot be made across file systems.
    OSError
        At the first file that fails (the chunks not yet started are not run).
    """
    # Links of small files are made and hashed in this thread: each is a few short system
    # calls, and two threads handing the GIL to each other after every call took 0.80 s for
    # 10,000 small files against 0.57 s for one. Big files go to the threads (their hashing
    # releases the GIL for each block), started first so they overlap the small ones.
    inline = [
        action
        for action in actions
        if action.kind == "link" and action.size_bytes < THREADED_HASH_BYTES
    ]
    threaded = [
        action
        for action in actions
        if action.kind != "link" or action.size_bytes >= THREADED_HASH_BYTES
    ]
    cwd_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)  # relative sources for ``linkat``
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        try:
            futures = [
                pool.submit(_copy_or_link_chunk, chunk, member, verify, progress, cwd_fd)
                for chunk in _chunks(threaded)
            ]
            known, problems = _copy_or_link_chunk(inline, member, verify, progress, cwd_fd)
            for future in futures:
                chunk_known, chunk_problems = future.result()
                known.update(chunk_known)
                problems += chunk_problems
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            os.close(cwd_fd)
    if problems:
        raise PackagingError("the package does not match its origin: " + "; ".join(problems))
    return known


def move_with_symlink(source: Path, destination: Path) -> None:
    """Move one file and leave a symlink to it at the origin; safe to repeat after a crash.

    The origin path always exists: first the destination is made (a hard link on the same
    file system, else, or for another user's file the kernel will not link, a verified copy
    under a temporary name), then a symlink made under a
    temporary name atomically replaces the origin file. Whatever point a crash interrupts,
    running this again finishes the move.
    """
    # The link names the destination by its real path: one spelled through the origin
    # (``--origpath . --packpath ../P``) would break when the reduction is renamed.
    destination = Path(os.path.realpath(destination.parent), destination.name)
    if source.is_symlink():
        if os.path.realpath(source) == str(destination) and destination.is_file():
            return  # moved by an earlier run
        raise PackagingError(f"{source} is a symlink already (not to {destination}): refused")
    # A file already at the destination that is not this one is never a partial copy (copies
    # are made under a temporary name): after an interrupted run whose origin has changed since,
    # it can be the only copy of another file moved there. Refused, so nothing is lost.
    if (
        destination.exists()
        and not os.path.samefile(source, destination)
        and file_sha256(destination) != file_sha256(source)
    ):
        raise PackagingError(
            f"{destination} holds another file than {source} (an earlier, interrupted move "
            "may have put it there, and it may be its only copy): nothing was moved over it. "
            "Put the reduction back as it was and run the move again, or undo it "
            "(qa-packager undo-move)"
        )
    if not destination.exists():
        try:
            os.link(source, destination)
        except OSError as exc:
            # EPERM: another user's file the kernel will not link (fs.protected_hardlinks).
            if exc.errno not in (errno.EXDEV, errno.EPERM):
                raise
            partial = destination.with_name(destination.name + ".qa-packager-partial")
            # On disk before the origin becomes a symlink to it: after a power cut the copy
            # may be the only one.
            _synced_verified_copy(source, partial, "not moved", exc)
            os.replace(partial, destination)
            sync_directory(destination.parent)
    link = source.with_name(f".{source.name}.qa-packager-link")
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(destination, link)
    os.replace(link, source)


def _ticket_paths(packpath: Path) -> tuple[Path, Path]:
    """``<packpath>.ticket.tar`` and ``<packpath>.ticket.zip``."""
    return (
        packpath.parent / f"{packpath.name}.ticket.tar",
        packpath.parent / f"{packpath.name}.ticket.zip",
    )


def _keeps_real_tickets(packpath: Path, appending: bool, pending: Journal | None = None) -> bool:
    """Whether a fake run leaves the ticket files as they are (see :func:`write_tickets`);
    with the ``pending`` journal of an unfinished run, as they will be once it is undone (a
    dry run): the ones it set aside, put back, and no others."""
    tickets: tuple[Path, ...] = _ticket_paths(packpath)
    if pending is not None:
        tickets = tuple(_set_aside(p) for p in tickets if p.name in pending.existed)
    return appending and any(p.is_file() and p.stat().st_size for p in tickets)


def write_tickets(
    plan: Plan, packpath: Path, member: Path, *, real: bool, appending: bool = False
) -> tuple[Path, Path]:
    """``<packpath>.ticket.tar`` and ``.ticket.zip``: README, QA files, scripts, expected size.

    In fake mode (``real=False``) both are 0-byte dummies, as the source document says;
    a fake run ``appending`` a member or group to a package leaves real ticket files of
    an earlier run as they are (a dummy would lose them: only a run on the reduction
    makes them again).
    """
    tar_path, zip_path = _ticket_paths(packpath)
    if not real:
        if _keeps_real_tickets(packpath, appending):
            return tar_path, zip_path
        for path in (tar_path, zip_path):
            # A new file, not the old one emptied: a run sets the old one aside as a hard link.
            _replace_with(path, b"")
        return tar_path, zip_path
    prefix = Path(packpath.name) / plan.member
    entries: list[tuple[str, bytes]] = [
        (str(prefix / _readme_name(plan.member)), (member / _readme_name(plan.member)).read_bytes())
    ]
    for step in plan.steps:
        if step.destination.parts[0] in TICKET_SECTIONS and not step.is_directory:
            entries.append(
                (str(prefix / step.destination), (member / step.destination).read_bytes())
            )
    entries.append((f"{packpath.name}/expected_size.txt", f"{plan.expected_size_bytes}\n".encode()))
    for path, archived in ((tar_path, _tar_bytes), (zip_path, _zip_bytes)):
        # On disk before the run is committed: no later run rewrites them (a move's
        # reduction is links by then), so a power cut must not leave them short.
        _replace_with(path, archived(entries))
    return tar_path, zip_path


def _tar_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    """A PAX tar of ``entries`` (name, content), in memory (they are small: see write_tickets)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), int(time.time()), 0o644
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _zip_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    """A deflated zip of ``entries`` (name, content), in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries:
            archive.writestr(name, content)
    return buffer.getvalue()


def _readme_name(member: Path) -> str:
    """``README`` in the legacy layout, ``member.<uid>.README.txt`` in the modern one."""
    return f"{member.name}.README.txt" if member.name.startswith("member.") else "README"


def package(
    origpath: str | os.PathLike[str],
    readme: str | os.PathLike[str],
    packpath: str | os.PathLike[str],
    *,
    append: str = "",
    mode: str = "fake",
    dry_run: bool = False,
    style: str = "legacy",
    uids: tuple[str, str, str] | None = None,
    progress: Callable[[Action], None] | None = None,
    hash_workers: int = 2,
    verify: bool = True,
) -> Plan:
    """Package one reduction directory (see the module docstring); returns what was done.

    Parameters
    ----------
    origpath, readme, packpath, append, mode
        As the source document's ``QA_Packager``.
    dry_run
        Plan only: ``Plan.actions`` lists what the run would do; nothing is written.
    style, uids
        ``legacy`` (``sg_ouss_id/group_ouss_id/member_ouss_id``) or ``modern``
        (``science_goal.<uid>/group.<uid>/member.<uid>`` from ``uids`` = (science goal, group,
        member) uids, ``uid://A001/X1/X2`` or ``uid___A001_X1_X2``).
    progress
        Called after each action (the command line draws a progress bar with it).
    hash_workers
        Threads copying and hashing files (copy mode) and hashing the files not hashed as
        they were made (hard links are made and hashed in the calling thread).
    verify
        After copy and move, check the package against its origin (copies compared byte
        for byte, symlinks checked). ``False`` skips that check (the manifest is written all
        the same). Hard links are always checked to be their origin's inode: it costs
        nothing, as the hash for the manifest reads the file through the link.

    Raises
    ------
    PackagingError
        For a bad path, mode or append mode, or a reduction directory that cannot be packaged.
    """
    if mode not in MODES:
        raise PackagingError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if append not in APPENDS:
        raise PackagingError(f"append {append!r} is not one of '', 'group', 'member'")
    for name, given in (("origpath", origpath), ("packpath", packpath)):
        text = os.fspath(given)
        if text.endswith("/") and text != "/":  # the document's rule (Path() would hide it)
            raise PackagingError(f"{name} must not end in /")
    origin, pack, header = Path(origpath), Path(packpath), Path(readme)
    _check_paths(origin, pack)
    if append == "" and os.path.ismount(pack):
        # A run starting again sets the package aside by renaming it, which a mount point
        # refuses (EBUSY) after the run has begun: refused first, naming what to do.
        raise PackagingError(
            f"packpath {pack} is a mount point: a new package (append '') replaces packpath "
            f"as a whole; give a directory inside it, e.g. {pack / pack.name}"
        )
    if not header.is_file():
        raise PackagingError(f"readme {header} is not a file")
    header_text = _read_text(header, "readme")  # now: it may lie inside packpath, cleared below
    # A run holds the package's lock from its first look at the package to its last write:
    # what it checks (another run's journal, what clearing would strand, the next member's
    # number) cannot change under it. A dry run only reads.
    if dry_run:
        _refuse_while_locked(pack)
    with contextlib.nullcontext() if dry_run else _lock(pack):
        journal = Journal.of(pack)
        undone: list[str] = []
        if journal is not None and journal.committed and not dry_run:
            _commit(pack, journal)  # a finished run killed while deleting what it set aside
            journal = None
        if journal is None and not dry_run:
            _refuse_a_stale_set_aside(pack)
        resumed = None
        if journal is not None and journal.mode == "move" and not journal.committed:
            if mode != "move" or os.path.realpath(journal.origpath) != os.path.realpath(origin):
                raise PackagingError(
                    f"an interrupted move of {journal.origpath} into this package is recorded in "
                    f"{journal.path}: run the same move again to finish it first (or undo it: "
                    f"qa-packager undo-move {pack})"
                )
            resumed = Path(journal.member)
        elif journal is not None and not journal.committed:
            if dry_run:  # planned as the package will be once the unfinished run is undone
                undone.append(os.path.abspath(journal.path))
            else:
                undone.append(_undo(pack, journal))
                journal = None
        pending = journal if undone and dry_run else None
        ignored = pending.made_path(pack) if pending is not None else None
        pack_exists = (
            _set_aside(pack).exists() or (pack.exists() and ignored != pack.absolute())
            if pending is not None and pending.cleared
            else pack.exists() and ignored != pack.absolute()
        )
        # The package as this run will find it: for a dry run after a run that cleared it
        # and did not finish, the package that run set aside (its undo puts it back).
        found = _set_aside(pack) if pending is not None and pending.cleared else pack
        if resumed is not None:
            member_relative = resumed
        else:
            member_relative = _member_path(found, append, style, uids, ignored=ignored)
        if resumed is None and append != "":
            _check_append_mode(found, pack, mode, pending, ignored)
        member = pack / member_relative
        with _refusing_paths_too_long(member):
            plan = plan_package(origin, member_relative, header)
            plan.actions = plan_actions(plan, mode)
        plan.undone = [] if dry_run else undone
        plan.expected_size_bytes = sum(action.size_bytes for action in plan.actions)
        if mode in ("fake", "ticket"):
            plan.expected_size_bytes += _split_bytes_saved(plan)
        _check_names(plan, member, mode, origin)
        clearing = resumed is None and append == "" and pack_exists
        if clearing:
            _refuse_to_clear_moved_data(pack, origin)
        elif (
            resumed is None
            and (found / member_relative).exists()
            and not (ignored and member.absolute().is_relative_to(ignored))
        ):
            raise PackagingError(f"{member} exists already: nothing is changed")
        if resumed is None and append != "":
            _refuse_packaged_execution_blocks(plan, found, pack, ignored)
        if mode == "hard":
            _check_hard_mode(plan, origin, pack)
        if mode == "move" and resumed is None:
            _check_movable(plan, origin)
        if mode != "fake":
            _check_readable(plan, mode)
        plan.actions = [
            *(Action("undo", None, path) for path in (undone if dry_run else [])),
            *([Action("remove", None, os.path.abspath(pack))] if clearing else []),
            *plan.actions,
            *(
                Action("write", None, os.path.abspath(path))
                for path in _written(plan, pack, mode, appending=append != "", pending=pending)
            ),
        ]
        if dry_run:
            return plan
        if mode == "move":  # first: a move killed at any later point is still recorded
            _record_moved_origin(pack, origin, reset=clearing)
        elif clearing:
            _moved_origins_path(pack).unlink(missing_ok=True)  # none links in: checked
        try:
            if resumed is None:
                journal = _begin(pack, origin, member_relative, mode, clearing=clearing)
            assert journal is not None
            if journal.cleared and not _set_aside(pack).exists() and pack.exists():
                # A move that clears, killed between its journal and setting the old package
                # aside (nothing has moved yet): set it aside now.
                os.rename(pack, _set_aside(pack))
            _carry_out(
                plan, pack, member, header_text, mode, progress, hash_workers, verify,
                appending=append != "",
            )  # fmt: skip
        except BaseException as exc:
            # A run that cannot finish is undone: the package is as it was, and the next
            # ``append`` gets the same number. An interrupted move is finished by running it
            # again instead (its journal); one that failed says so.
            unfinished = journal if journal is not None else Journal.of(pack)
            if mode != "move" and unfinished is not None:
                _undo(pack, unfinished)
                if isinstance(exc, KeyboardInterrupt):
                    exc.add_note(f"the run was undone: {pack} is as it was before it")
            elif mode == "move" and isinstance(exc, Exception | KeyboardInterrupt):
                exc.add_note(
                    f"the move into {member} stopped part-way; nothing is lost: each file of "
                    f"{origin} is still in place or a symlink to its copy in the package. The "
                    f"run is recorded in {_journal_path(pack)} and other runs on the package "
                    "are refused until it is finished: remove the cause, then run the same "
                    f"move again; or put every file back with 'qa-packager undo-move {pack}'"
                )
            raise
        _commit(pack, journal)
        return plan


def undo_move(packpath: str | os.PathLike[str]) -> str:
    """Undo the unfinished move recorded for ``packpath``: put every moved file back.

    For a move that cannot be finished (a file that fails the same way every time). First
    every file in the run's member (the README aside) is matched to its origin: the origin
    symlink naming it, an origin file that is it (a hard link) or, at the path the plan
    moves it from, one with the same bytes (a copy across file systems). When one is not
    found (the reduction renamed or moved, an origin symlink deleted or replaced) the
    package holds its only copy: nothing is changed and the error names them. Otherwise
    each origin symlink into the member is replaced, atomically, by the file itself (a hard
    link of the package's file, or across file systems a verified, synced copy made under
    the move's temporary name), so at every instant each origin path is the file or a
    symlink to it; then the run is undone as any other (its member removed, the files
    beside the package put back) and its reduction is taken off the moved-origins record
    when nothing in the package links back to it. Safe to interrupt and to repeat.

    Returns
    -------
    str
        What was done, for the user.

    Raises
    ------
    PackagingError
        When no unfinished move is recorded, when a packaged file's origin cannot be
        found (the error names them: the package holds their only copy), or when a file
        cannot be put back.
    """
    pack = Path(packpath)
    with _lock(pack):
        journal = Journal.of(pack)
        if journal is None or journal.committed or journal.mode != "move":
            raise PackagingError(f"no unfinished move into {pack} is recorded: nothing to undo")
        member = Path(os.path.realpath(pack / journal.member))
        origin = Path(journal.origpath)
        packaged = _packaged_files(member, Path(journal.member))
        if packaged and not origin.is_dir():
            raise PackagingError(
                f"{origin}, the reduction moved into {member}, no longer exists (renamed or "
                f"moved after the move?): the package holds the only copy of "
                f"{_some(sorted(packaged))}; nothing was changed (put the reduction back at "
                f"{origin}, then undo the move again)"
            )
        found = _find_origins(packaged, origin, member, Path(journal.member))
        missing = sorted(f for f in packaged if f not in found.origins)
        if missing or found.differing:
            problems = [
                *(f"{moved} (its origin {source} has other bytes now: written after the move?)"
                  for moved, source in found.differing),
                *(f"{path} (no file of {origin} is it or a symlink to it any more: an origin "
                  "symlink deleted or replaced?)" for path in missing),
            ]  # fmt: skip
            raise PackagingError(
                f"cannot undo the move into {member}: the package holds the only copy of "
                f"{_some(problems)}; nothing was changed (put those files back at their "
                f"origin in {origin}, or finish the move: run it again)"
            )
        for link in found.temporary:  # links the move had not yet put in place
            link.unlink()
        restored = 0
        for link, moved in found.links:
            _put_back(moved, link)
            restored += 1
        # Removed only once every packaged file is its origin file again (a symlink put back
        # by a copy was verified by _put_back; the others were checked above).
        left = [
            path
            for path in found.origins.values()
            if os.path.islink(path) or not os.path.isfile(path)
        ]
        if left:
            raise PackagingError(f"could not put back {_some(sorted(left))}: the package is kept")
        note = _undo(pack, journal)
        _forget_moved_origin(pack, origin)
        return f"{note}; put back {restored} moved files"


def _packaged_files(member: Path, member_relative: Path) -> set[str]:
    """The files in ``member`` (a real path) that a move put there: every file but the
    README the run writes and the packager's temporary names."""
    readme = os.path.join(member, _readme_name(member_relative))
    written = {readme, f"{readme}.partial"}  # the README, and its new text a kill left
    return {
        path
        for directory, _, filenames in os.walk(member)
        for name in filenames
        if not name.endswith(TEMPORARY_SUFFIXES)
        and (path := os.path.join(directory, name)) not in written
    }


@dataclass
class _Origins:
    """Where the files a move put in the package are at its origin (see _find_origins)."""

    #: packaged file -> the origin path that is it, or a symlink to it.
    origins: dict[str, str] = field(default_factory=dict)
    #: (origin symlink, packaged file it names): to be put back.
    links: list[tuple[Path, Path]] = field(default_factory=list)
    #: The move's temporary links into the package (never put in place).
    temporary: list[Path] = field(default_factory=list)
    #: (packaged file, the origin path the plan moves it from) where that path holds other
    #: bytes now.
    differing: list[tuple[str, str]] = field(default_factory=list)


def _find_origins(
    packaged: set[str], origin: Path, member: Path, member_relative: Path
) -> _Origins:
    """Match each of ``packaged`` (real paths in ``member``) to its origin path in ``origin``.

    An origin symlink naming it, or an origin file that is it (a hard link: a move stopped
    before its symlink, or an undo interrupted) match it. The files left (a copy across
    file systems, whose origin is a file of its own) match the origin the plan moves them
    from when it holds the same bytes: the plan is made again from the reduction, as a
    resumed move makes it.
    """
    found = _Origins()
    if not origin.is_dir():
        return found
    inodes: dict[tuple[int, int], str] = {}
    for path in packaged:
        status = os.lstat(path)
        inodes[(status.st_dev, status.st_ino)] = path
    for directory, dirnames, filenames in os.walk(origin):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(directory, d))]
        for name in filenames:
            path = os.path.join(directory, name)
            status = os.lstat(path)
            if name.endswith(TEMPORARY_SUFFIXES):
                # Never an origin: a link a move had not yet put in place (removed), or one
                # an interrupted _put_back made (it replaces that itself).
                if stat.S_ISLNK(status.st_mode) and Path(os.path.realpath(path)).is_relative_to(
                    member
                ):
                    found.temporary.append(Path(path))
            elif stat.S_ISLNK(status.st_mode):
                target = os.path.realpath(path)
                if target in packaged:
                    found.links.append((Path(path), Path(target)))
                    found.origins.setdefault(target, path)
            elif (moved := inodes.get((status.st_dev, status.st_ino))) is not None:
                found.origins.setdefault(moved, path)
    unmatched = packaged - found.origins.keys()
    if not unmatched:
        return found
    try:
        actions = plan_actions(plan_package(origin, member_relative), "move")
    except (PackagingError, OSError):
        return found  # the reduction changed: the files left are reported as not found
    for action in actions:
        moved = os.path.join(member, action.destination_text)
        source = action.source_text
        if action.kind != "move" or source is None or moved not in unmatched:
            continue
        if os.path.islink(source) or not os.path.isfile(source):
            continue  # a symlink elsewhere, or not a file: not the moved file
        if file_sha256(source) == file_sha256(moved):
            found.origins[moved] = source
        else:
            found.differing.append((moved, source))
    return found


def _put_back(moved: Path, link: Path) -> None:
    """Replace ``link`` (an origin symlink) by the file ``moved`` it names, atomically."""
    temporary = link.with_name(f".{link.name}{TEMPORARY_SUFFIXES[0]}")
    if os.path.lexists(temporary):
        temporary.unlink()
    try:
        os.link(moved, temporary)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _synced_verified_copy(moved, temporary, "not put back", exc)
    os.replace(temporary, link)
    sync_directory(link.parent)


def _synced_verified_copy(source: Path, copy: Path, outcome: str, cause: OSError) -> None:
    """Copy ``source`` to ``copy`` where it cannot be linked (``cause``: the refused link:
    another file system, or another user's file),
    check its sha256 and sync it; a copy that differs is removed, and ``outcome`` said."""
    shutil.copy2(source, copy)
    if file_sha256(copy) != file_sha256(source):
        copy.unlink()
        raise PackagingError(f"copy of {source} does not match it: {outcome}") from cause
    sync_file(copy)


def _refuse_a_stale_set_aside(packpath: Path) -> None:
    """Refuse to start while an earlier package set aside is still there without a journal.

    A run that finished but could not delete the package it set aside (a file it may not
    remove) leaves it; a run may only ever find the set-aside name holding what it put
    there itself, so that undoing a run can never put such a remnant in place of a package.
    """
    previous = _set_aside(packpath)
    if os.path.lexists(previous):
        raise PackagingError(
            f"{previous} holds a package an earlier run replaced but could not delete: delete "
            "it (after checking nothing in it is needed) to go on"
        )


def _refuse_to_clear_moved_data(packpath: Path, origin: Path) -> None:
    """Clearing must not delete data that a move put in the package (its only copy).

    Every reduction moved in is recorded (``<packpath>.moved-origins.json``). Clearing is
    refused while one still links into the package, and while one no longer exists (it
    was renamed or deleted after its move: the package may hold its only copy).
    """
    recorded = [Path(o) for o in _moved_origins(packpath)]
    gone = [str(o) for o in recorded if not o.is_dir()]
    if gone:
        raise PackagingError(
            f"files were moved into {packpath} from {', '.join(gone)}, which no longer "
            f"exist{'s' if len(gone) == 1 else ''}: the package may hold their only copy, and "
            "clearing it would lose them; refused (add to it as a member or a group; if "
            f"that data is safe elsewhere, delete {packpath} and {_moved_origins_path(packpath)} "
            "yourself)"
        )
    _refuse_if_linked_from([origin, *recorded], packpath)


def _record_moved_origin(packpath: Path, origin: Path, *, reset: bool = False) -> None:
    """Add ``origin`` to the reductions moved into the package (before anything moves).

    ``reset``: the package is being cleared (nothing moved in earlier still links in).
    """
    origins = [] if reset else _moved_origins(packpath)
    absolute = os.path.realpath(origin)
    if absolute not in origins or reset:
        packpath.parent.mkdir(parents=True, exist_ok=True)
        _replace_with(_moved_origins_path(packpath), json.dumps([*origins, absolute]).encode())


@contextlib.contextmanager
def _lock(packpath: Path) -> Iterator[None]:
    """One run at a time on a package: ``flock`` of a hidden lock file beside it.

    The package's parent directory is made first if need be (a run into a new directory
    must be locked too); the directories made are removed again if the run leaves them
    empty (a refused run), and so is the lock file, by its holder: a run that opens the
    file just before it is removed finds, once it holds the lock, that the name no longer
    leads to it, and takes the new file's lock instead.

    Raises
    ------
    PackagingError
        When another run holds the package.
    """
    made: list[Path] = []
    for directory in reversed((packpath.parent, *packpath.parent.parents)):
        if not directory.exists():
            with contextlib.suppress(FileExistsError):
                directory.mkdir()
                made.append(directory)
    fd: int | None = None
    try:
        try:
            fd = take_lock_file(_lock_path(packpath), fcntl.LOCK_EX)
        except BlockingIOError as exc:
            raise PackagingError(
                f"another qa-packager run is writing {packpath}, or reading it (tarsplit, "
                "verify): wait for it to finish"
            ) from exc
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_lock_path(packpath))  # while holding it (see above)
            os.close(fd)
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty


def take_lock_file(path: Path, operation: int) -> int:
    """An open descriptor of the lock file ``path`` (made if need be) holding ``flock``
    ``operation`` (``LOCK_EX`` or ``LOCK_SH``), the file still at that name.

    Raises
    ------
    BlockingIOError
        When another process holds a lock that conflicts.
    """
    while True:
        candidate = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(candidate, operation | fcntl.LOCK_NB)
            current = os.stat(path).st_ino
        except (BlockingIOError, FileNotFoundError) as exc:
            os.close(candidate)
            if isinstance(exc, BlockingIOError):
                raise
            continue  # removed by the run that held it: take the new file's lock
        if os.fstat(candidate).st_ino == current:
            return candidate
        os.close(candidate)


@contextlib.contextmanager
def reading_package(packpath: Path) -> Iterator[None]:
    """Hold a finished package for reading (tarsplit, verify): no run starts writing it
    until the reading is done (a shared ``flock`` of the lock file the runs take).

    Raises
    ------
    PackagingError
        When a run is writing it or did not finish (:func:`unfinished_run`'s reason), or
        its journal is damaged.
    """
    try:
        fd: int | None = take_lock_file(_lock_path(packpath), fcntl.LOCK_SH)
    except OSError:
        # A run writes it (BlockingIOError: unfinished_run says so), or no lock file can be
        # made here (a package this user may only read, or none at all): looked at once.
        fd = None
    try:
        if (reason := unfinished_run(packpath, locked=fd is not None)) is not None:
            raise PackagingError(reason)
        yield
    finally:
        if fd is not None:
            try:
                # The last reader removes the file, as a run does; not while others read.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_lock_path(packpath))
            os.close(fd)


def _refuse_while_locked(packpath: Path) -> None:
    """A dry run, which takes no lock (it writes nothing), refuses while a run holds the
    package: it would plan against a package being written, and show that run's journal
    as one to undo.

    Raises
    ------
    PackagingError
        When another run holds the package's lock.
    """
    if _held_by_a_run(packpath):
        raise PackagingError(
            f"another qa-packager run is writing {packpath}: wait for it to finish, then "
            "run the dry run again"
        )


def _held_by_a_run(packpath: Path) -> bool:
    """Whether a run holds the package's lock now (a look, holding nothing)."""
    try:
        fd = os.open(_lock_path(packpath), os.O_RDONLY)
    except OSError:  # no lock file: no run (or one this user cannot see: it would say so)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _written(
    plan: Plan, pack: Path, mode: str, *, appending: bool, pending: Journal | None = None
) -> list[Path]:
    """The files a run writes besides the plan's (README, ticket files, manifest), in order
    (``pending``: see :func:`_keeps_real_tickets`)."""
    keeps_tickets = mode == "fake" and _keeps_real_tickets(pack, appending, pending)
    return [
        pack / plan.member / _readme_name(plan.member),
        *([] if keeps_tickets else _ticket_paths(pack)),
        *([manifest_path(pack), bag_info_path(pack)] if mode in ("copy", "hard", "move") else []),
    ]


def _carry_out(
    plan: Plan,
    pack: Path,
    member: Path,
    header_text: str,
    mode: str,
    progress: Callable[[Action], None] | None,
    hash_workers: int,
    verify: bool,
    *,
    appending: bool,
) -> None:
    """Do the plan's actions, then write the README, ticket files and manifest.

    Everything the run wrote is on disk before the manifest is written and the run
    committed (the journal says so): each copy (synced as it is made), each split
    measurement set, then the directories holding their names, the README and the ticket
    files. A power cut after a run that finished must not leave a package that looks
    complete but holds a short file (tarsplit would deliver it with correct-looking md5s).
    Hard links and moved files are their origin's data: only their names are new.
    """
    member.mkdir(parents=True, exist_ok=True)
    parallel = ("copy", "link") if mode == "hard" else ("copy",)
    # casacore does not sync the measurement sets it writes: they are synced in a thread
    # of their own, each while the next one is split and the files are linked.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qa-packager-sync") as syncer:
        synced = []
        for action in plan.actions:
            if action.kind in ("remove", "write", *parallel):
                continue  # removal done before, writes after; copies and links below, in threads
            _execute(action, member, mode)
            if action.kind == "split-ms":  # the package holds the split, smaller than its origin
                split = member / action.destination_text
                synced.append(syncer.submit(_sync_files, split))
                written = sum(size for _, _, size, _ in _walk(split))
                plan.expected_size_bytes += written - action.size_bytes
            if progress is not None:
                progress(action)
        known = _copy_or_link_all(
            [action for action in plan.actions if action.kind in parallel],
            member,
            workers=hash_workers,
            verify=verify,
            progress=progress,
        )
        for future in synced:
            future.result()
    _sync_directories(pack, member)
    notes = "".join(f"\n{note}" for note in plan.notes if not note.startswith("not packaged:"))
    readme_path = member / _readme_name(plan.member)
    # A kill's new README text, left beside it, is not listed in the tree (nor kept).
    readme_path.with_name(readme_path.name + ".partial").unlink(missing_ok=True)
    readme = (header_text + notes + "\n\nPackage contents:\n" + _tree(pack)).encode("utf-8")
    _replace_with(readme_path, readme)  # on disk, as the ticket files, before the commit
    plan.expected_size_bytes += len(readme)
    write_tickets(plan, pack, member, real=mode != "fake", appending=appending)
    if mode in ("copy", "hard", "move"):
        # Synced after a move (the only copy) or when earlier members' lines are in it.
        durable = mode == "move" or manifest_path(pack).exists()
        hashed = None
        if progress is not None:
            report = progress
            root = f"{member}/"

            def hashed(file: str, size_bytes: int) -> None:
                report(Action("hash", None, file.removeprefix(root), size_bytes))

        write_manifest(
            pack, plan.member, workers=hash_workers, known=known, durable=durable,
            on_hashed=hashed,
        )  # fmt: skip
        if verify:
            verify_against_sources(plan, pack)


def _sync_files(root: Path) -> None:
    """``fsync`` every file below ``root`` (a measurement set the run wrote)."""
    for directory, _, filenames in os.walk(root):
        for name in filenames:
            sync_file(os.path.join(directory, name))


def _sync_directories(pack: Path, member: Path) -> None:
    """``fsync`` the directories a run added names to: every one of ``member``, those
    leading to it from ``pack`` (a new group or member) and the package's parent (a new
    package). The names must reach the disk before the commit, as the data they name."""
    for directory, _, _ in os.walk(member):
        sync_directory(directory)
    for leading in (*member.parents[: len(member.relative_to(pack).parts)], pack.parent):
        sync_directory(leading)


def QA_Packager(  # noqa: N802 (the source document's name)
    origpath: str, readme: str, packpath: str, append: str = "", mode: str = "fake"
) -> Plan:
    """The source document's call: ``QA_Packager(origpath, readme, packpath, append='', mode='fake')``.

    Run in a CASA session as the document shows, it prints what it left out of the package
    (``not packaged: ...``), as ``qa-packager`` does: nobody reads the returned plan there.
    """
    plan = package(origpath, readme, packpath, append=append, mode=mode)
    print_left_out(plan)
    return plan


def print_left_out(plan: Plan) -> None:
    """Print the reduction's entries the package leaves out (``not packaged: ...``)."""
    for note in plan.notes:
        if note.startswith("not packaged:"):
            print(printable(note))


def printable(text: str) -> str:
    """``text`` with the bytes of file names that are not UTF-8 shown as ``\\xe9``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
