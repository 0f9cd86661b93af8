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

import fnmatch
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

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
)
CHECKLIST_PATTERNS = ("*checklist", "*checklist.txt", "*Checklist", "*Checklist.txt")
#: The member directory's sub-directories, in the README's order.
SECTIONS = ("raw", "calibrated", "calibration", "script", "qa", "log", "product")
_UID = re.compile(r"^(uid___[A-Za-z0-9]+_X[0-9a-f]+_X[0-9a-f]+)")


class PackagingError(ValueError):
    """A packaging request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class Step:
    """One entry of the plan: copy ``source`` (a file or a directory) to ``destination``."""

    source: Path
    destination: Path  # relative to the member directory
    is_directory: bool


@dataclass
class Plan:
    """What a packaging run does."""

    member: Path  # relative to packpath
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # text for the PI found in the reduction

    def add(self, source: Path, *destination: str) -> None:
        self.steps.append(Step(source, Path(*destination), source.is_dir()))


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def eb_uid(directory: Path) -> str | None:
    """The ASDM uid of an execution-block directory (from its ``uid___...ms*`` entries)."""
    for entry in sorted(directory.iterdir()):
        match = _UID.match(entry.name)
        if match and ".ms" in entry.name:
            return match.group(1)
    return None


def unique_name(name: str, uid: str) -> str:
    """Names that do not start with the uid (or ``X...``) get ``<uid>__`` in front."""
    return name if name.startswith(("uid___", "X")) else f"{uid}__{name}"


def _classify_eb(plan: Plan, directory: Path, uid: str) -> None:
    """An execution block's entries (and its ``qa2`` directory) into the plan."""
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if entry.is_dir() and name == "qa2":
            for item in sorted(entry.iterdir()):
                if item.is_file():
                    plan.add(item, "qa", unique_name(item.name, uid))
        elif name == f"{uid}.ms.split":
            plan.add(entry, "raw", name)
        elif name == f"{uid}.ms.split.cal":
            plan.add(entry, "calibrated", name)
        elif name in (f"{uid}.ms", f"{uid}.ms.flagversions"):
            continue  # the raw measurement set is not delivered
        elif name.endswith(".py"):
            plan.add(entry, "script", name)
        elif _matches(name, CHECKLIST_PATTERNS):
            plan.add(entry, "qa", f"{directory.name}.checklist.txt")
        elif _matches(name, QA2_PATTERNS):
            plan.add(entry, "qa", unique_name(name, uid))
        elif name.endswith(".log"):
            plan.add(entry, "log", unique_name(name, uid))
        elif name.startswith(uid) and name.endswith(".plots"):
            plan.add(entry, "calibration", f"{uid}.calibration.plots", name)
        elif name.startswith(uid):
            plan.add(entry, "calibration", f"{uid}.calibration", name)
        else:
            plan.notes.append(f"not packaged: {entry}")


def _classify_sb_file(plan: Plan, entry: Path) -> None:
    name = entry.name
    if name == "calibrated.ms" or name.endswith(".ms"):
        return  # the combined measurement set is not packaged
    if entry.is_dir():
        for item in sorted(entry.rglob("*")):  # products kept beside the EB directories
            if item.is_file() and not any(
                p.endswith(".ms") for p in item.relative_to(entry).parts[:-1]
            ):
                _classify_sb_file(plan, item)
        return
    if name.endswith(".fits"):
        plan.add(entry, "product", name)
    elif name.endswith(".py"):
        plan.add(entry, "script", name)
    elif name.endswith(".log"):
        plan.add(entry, "log", name)
    elif _matches(name, QA2_PATTERNS):
        plan.add(entry, "qa", name)
    elif name.endswith(".txt"):
        plan.notes.append(entry.read_text(errors="replace"))  # notes for the PI: into the README
    else:
        plan.notes.append(f"not packaged: {entry}")


def plan_package(origpath: Path, member: Path) -> Plan:
    """The plan for one reduction directory (a scheduling block, or a project of EB directories)."""
    plan = Plan(member=member)
    own_uid = eb_uid(origpath)
    if own_uid is not None:  # a single execution block given directly
        _classify_eb(plan, origpath, own_uid)
        return plan
    for entry in sorted(origpath.iterdir()):
        uid = eb_uid(entry) if entry.is_dir() else None
        if uid is not None:
            _classify_eb(plan, entry, uid)
        else:
            _classify_sb_file(plan, entry)
    if not any(step.destination.parts[0] == "raw" for step in plan.steps):
        raise PackagingError(f"{origpath} holds no execution block (no uid___*.ms.split found)")
    destinations = [step.destination for step in plan.steps]
    clashes = {str(d) for d in destinations if destinations.count(d) > 1}
    if clashes:
        raise PackagingError(f"two files would be packaged as {', '.join(sorted(clashes))}")
    return plan


def _check_paths(origpath: Path, packpath: Path) -> None:
    if not PROJECT_CODE.match(packpath.name):
        raise PackagingError(
            f"packpath must be named after the project code (e.g. 2011.0.00229.S), not {packpath.name!r}"
        )
    resolved, origin = packpath.resolve(), origpath.resolve()
    if resolved in (Path("/"), Path.home().resolve()) or origin.is_relative_to(resolved):
        raise PackagingError(
            f"packpath {packpath} would contain the reduction directory or more: refused"
        )
    if not origpath.is_dir():
        raise PackagingError(f"origpath {origpath} is not a directory")


def _next_member(packpath: Path, append: str) -> Path:
    """The member directory this run writes (legacy layout), per the append mode."""
    sg = Path("sg_ouss_id")
    groups = (
        sorted((packpath / sg).glob("group_ouss_id*"), key=_index)
        if (packpath / sg).is_dir()
        else []
    )
    if append == "group" and groups:
        return sg / f"group_ouss_id{_index(groups[-1]) + 1}" / "member_ouss_id"
    if append == "member" and groups:
        members = sorted(groups[-1].glob("member_ouss_id*"), key=_index)
        number = _index(members[-1]) + 1 if members else 1
        return (
            sg / groups[-1].name / ("member_ouss_id" if number == 1 else f"member_ouss_id{number}")
        )
    return sg / "group_ouss_id" / "member_ouss_id"


def _index(path: Path) -> int:
    """``group_ouss_id`` is 1, ``group_ouss_id2`` is 2, ..."""
    digits = re.search(r"(\d+)$", path.name)
    return int(digits.group(1)) if digits else 1


def _tree(root: Path) -> str:
    """The package as an indented listing (directories end in /), for the README."""
    lines = [f"|-- {root.name}/"]

    def walk(directory: Path, depth: int) -> None:
        for entry in sorted(directory.iterdir()):
            if entry.name == "README" and depth > 1:
                continue
            is_package_dir = entry.is_dir() and not entry.name.endswith(
                (".split", ".cal", ".calibration", ".plots")
            )
            lines.append(f"{'|   ' * depth}|-- {entry.name}{'/' if entry.is_dir() else ''}")
            if is_package_dir:
                walk(entry, depth + 1)

    walk(root, 1)
    return "\n".join(lines) + "\n"


def _fake(step: Step, target: Path) -> None:
    """A 0-byte stand-in (a directory gets the same tree of 0-byte files)."""
    if not step.is_directory:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
        return
    for item in sorted(step.source.rglob("*")):
        destination = target / item.relative_to(step.source)
        if item.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.touch()
    target.mkdir(parents=True, exist_ok=True)


def _copy(step: Step, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if step.is_directory:
        shutil.copytree(step.source, target, symlinks=False)
    else:
        shutil.copy2(step.source, target)


def package(
    origpath: str | os.PathLike[str],
    readme: str | os.PathLike[str],
    packpath: str | os.PathLike[str],
    *,
    append: str = "",
    mode: str = "fake",
) -> Plan:
    """Package one reduction directory (see the module docstring); returns what was done.

    Raises
    ------
    PackagingError
        For a bad path, mode or append mode, or a reduction directory that cannot be packaged.
    """
    if mode not in ("fake", "copy"):
        known = ", ".join(MODES)
        raise PackagingError(
            f"mode {mode!r} is not available here (modes: {known}; implemented: fake, copy)"
        )
    if append not in APPENDS:
        raise PackagingError(f"append {append!r} is not one of '', 'group', 'member'")
    for name, given in (("origpath", origpath), ("packpath", packpath)):
        text = os.fspath(given)
        if text.endswith("/") and text != "/":  # the document's rule (Path() would hide it)
            raise PackagingError(f"{name} must not end in /")
    origin, pack, header = Path(origpath), Path(packpath), Path(readme)
    _check_paths(origin, pack)
    if not header.is_file():
        raise PackagingError(f"readme {header} is not a file")
    if append == "" and pack.exists():
        shutil.rmtree(pack)  # only inside packpath, checked above
    member_relative = _next_member(pack, append)
    plan = plan_package(origin, member_relative)
    member = pack / member_relative
    if member.exists():
        raise PackagingError(f"{member} exists already: nothing is changed")
    member.mkdir(parents=True)
    for section in SECTIONS:
        if any(step.destination.parts[0] == section for step in plan.steps):
            (member / section).mkdir()
    for step in plan.steps:
        (_fake if mode == "fake" else _copy)(step, member / step.destination)
    notes = "".join(f"\n{note}" for note in plan.notes if not note.startswith("not packaged:"))
    (member / "README").write_text(
        header.read_text() + notes + "\n\nPackage contents:\n" + _tree(pack)
    )
    return plan


def QA_Packager(  # noqa: N802 (the source document's name)
    origpath: str, readme: str, packpath: str, append: str = "", mode: str = "fake"
) -> Plan:
    """The source document's call: ``QA_Packager(origpath, readme, packpath, append='', mode='fake')``."""
    return package(origpath, readme, packpath, append=append, mode=mode)
