"""The QA2 packager against the source document's example input and output trees."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from observatory.packaging.manifest import manifest_path, read_manifest, validate_manifest
from observatory.packaging.qa2 import (
    Action,
    PackagingError,
    QA_Packager,
    estimated_split_bytes,
    package,
    split_measurement_set,
)
from sb_copies import copy_with_execution_block

X8C = "uid___A002_X3c9295_X8c"
X528 = "uid___A002_X3dc0e7_X528"

#: The document's example output tree for IRC10216_setup3_b6_run_x2 (mode='fake').
EXPECTED = {
    "raw": {f"{X528}.ms.split/", f"{X8C}.ms.split/"},
    "qa": {"X528.checklist.txt", f"{X528}__qa2_part1.png", f"{X528}__textfile.txt", f"{X8C}__qa2_part1.png",
           "X8c.checklist.txt", f"{X528}__qa2_part3.png", f"{X528}__qa2_part2.png", f"{X8C}__qa2_part2.png",
           f"{X8C}__qa2_part3.png", f"{X8C}__textfile.txt"},
    "script": {"scriptForImaging.py", f"{X528}.ms.scriptForCalibration.py", f"{X8C}.ms.scriptForCalibration.py",
               "scriptForCalibration.py", "scriptForAprioriCalibration.py", "scriptForFluxCalibration.py"},
    "log": {"ipython.log", "casapy-2012-05-03T115433.log", f"{X8C}__casapy-20120502-102144.log",
            f"{X8C}__ipython.log", f"{X528}__ipython-20120430-142604.log", f"{X8C}__ipython-20120502-102151.log"},
    "product": {"calibrated_all_setup3_b6.clean.fits"},
    "calibrated": {f"{X528}.ms.split.cal/", f"{X8C}.ms.split.cal/"},
    "calibration": {f"{X8C}.calibration.plots/", f"{X8C}.calibration/", f"{X528}.calibration/",
                    f"{X528}.calibration.plots/"},
}  # fmt: skip


def measurement_set(path: Path, *, tiled: bool = False) -> None:
    """A small real measurement set (python-casacore) with DATA=1, CORRECTED_DATA=2, MODEL_DATA=3,
    in the main table's storage manager or (``tiled``) each in its own tiled storage manager
    and hypercolumn, as CASA writes them."""
    import numpy as np
    from casacore import tables

    columns = [
        tables.makearrcoldesc(
            name, 0j, ndim=2, shape=[4, 2], valuetype="complex",
            **({"datamanagertype": "TiledColumnStMan", "datamanagergroup": f"Tiled{name}"} if tiled else {}),
        )
        for name in ("DATA", "CORRECTED_DATA", "MODEL_DATA")
    ]  # fmt: skip
    description = tables.maketabdesc(columns)
    if tiled:
        for name in ("DATA", "CORRECTED_DATA", "MODEL_DATA"):
            tables.tabledefinehypercolumn(description, f"Tiled{name}", 3, [name])
    path.parent.mkdir(parents=True, exist_ok=True)
    with tables.default_ms(str(path), description) as ms:
        ms.addrows(6)
        for value, name in enumerate(("DATA", "CORRECTED_DATA", "MODEL_DATA"), start=1):
            ms.putcol(name, np.full((6, 4, 2), value, dtype=complex))


@pytest.fixture(scope="session")
def example_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """project229 with both SBs, built once (casacore writes are the slow part)."""
    root = tmp_path_factory.mktemp("example")
    _write_sb(root)
    second = root / "project229" / "IRC10216_setup4_b6_run_x2" / "X3c9295_X1e0"
    uid = "uid___A002_X3c9295_X1e0"
    measurement_set(second / f"{uid}.ms.split")
    measurement_set(second / f"{uid}.ms.split.cal")
    (second / f"{uid}.ms.scriptForCalibration.py").write_text("# calibration\n")
    return root / "project229"


@pytest.fixture
def build_sb(example_project: Path) -> Callable[[Path], Path]:
    """Copies the example project under a directory; returns its IRC10216_setup3_b6_run_x2."""

    def build(root: Path) -> Path:
        shutil.copytree(example_project, root / "project229", symlinks=True)
        return root / "project229" / "IRC10216_setup3_b6_run_x2"

    return build


def _write_sb(root: Path) -> Path:
    """The document's example reduction directory for IRC10216_setup3_b6_run_x2."""
    sb = root / "project229" / "IRC10216_setup3_b6_run_x2"
    logs = {X8C: ["casapy-20120502-102144.log", "ipython.log", "ipython-20120502-102151.log"],
            X528: ["ipython-20120430-142604.log"]}  # fmt: skip
    for eb_dir, uid in (("X8c", X8C), ("X528", X528)):
        eb = sb / eb_dir
        measurement_set(eb / f"{uid}.ms")
        measurement_set(eb / f"{uid}.ms.split")
        measurement_set(eb / f"{uid}.ms.split.cal")
        measurement_set(eb / f"{uid}.ms.split.ap_pre_bandpass")
        measurement_set(eb / f"{uid}.ms.split.bandpass")
        (eb / f"{uid}.ms.antpos").write_text("antenna positions")
        (eb / f"{uid}.ms.split.ap_pre_bandpass.plots").mkdir()
        (eb / f"{uid}.ms.split.ap_pre_bandpass.plots" / "amp.png").write_bytes(b"png")
        (eb / f"{uid}.ms.scriptForCalibration.py").write_text("# calibration\n")
        (eb / "checklist.txt").write_text("all checked\n")
        (eb / "qa2").mkdir()
        for name in ("qa2_part1.png", "qa2_part2.png", "qa2_part3.png", "textfile.txt"):
            (eb / "qa2" / name).write_bytes(b"qa2")
        for name in logs[uid]:
            (eb / name).write_text("log\n")
    measurement_set(sb / "calibrated.ms")
    (sb / "IRC10216_setup3_b6_runx2.imaging.txt").write_text("Imaging notes for the PI.\n")
    (sb / "calibrated_all_setup3_b6.clean.fits").write_bytes(b"SIMPLE  =                    T")
    for name in ("scriptForFluxCalibration.py", "scriptForImaging.py", "scriptForCalibration.py",
                 "scriptForAprioriCalibration.py"):  # fmt: skip
        (sb / name).write_text("# script\n")
    for name in ("ipython.log", "casapy-2012-05-03T115433.log"):
        (sb / name).write_text("log\n")
    return sb


def another_sb(project: Path, name: str, uid: str) -> Path:
    """A copy of the second scheduling block (``IRC10216_setup4_b6_run_x2``) named ``name``,
    its execution block renamed ``uid``: the same execution block is never appended twice."""
    return copy_with_execution_block(
        project / "IRC10216_setup4_b6_run_x2", project / name, "uid___A002_X3c9295_X1e0", uid
    )


def listing(member: Path) -> dict[str, set[str]]:
    return {section.name: {e.name + ("/" if e.is_dir() else "") for e in section.iterdir()}
            for section in member.iterdir() if section.is_dir()}  # fmt: skip


@pytest.fixture
def readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.header.txt"
    path.write_text("ALMA Cycle 0 data package\n")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def origin_digests(sb: Path) -> dict[Path, str]:
    """Every file of the reduction directory (symlinks followed) and its hash.

    ``table.lock`` files are left out: every casacore reader, CASA included, rewrites them.
    """
    return {p: sha256(p) for p in sb.rglob("*") if p.is_file() and p.name != "table.lock"}


def data_columns(path: Path) -> dict[str, complex]:
    from casacore import tables

    with tables.table(str(path), ack=False) as ms:
        return {
            name: complex(ms.getcol(name)[0, 0, 0])
            for name in ms.colnames()
            if name.endswith("DATA")
        }


MODES = ["fake", "copy", "hard", "move", "ticket"]


@pytest.mark.parametrize("mode", MODES)
def test_the_documents_example_file_for_file(
    tmp_path: Path, readme: Path, mode: str, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    before = origin_digests(sb)
    packpath = tmp_path / "2011.0.00229.S"
    QA_Packager(origpath=str(sb), readme=str(readme), packpath=str(packpath), append="", mode=mode)
    member = packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id"
    assert listing(member) == EXPECTED
    assert sorted(p.name for p in member.iterdir() if p.is_file()) == ["README"]
    readme_text = (member / "README").read_text()
    assert (
        readme_text.startswith("ALMA Cycle 0 data package\n")
        and "Imaging notes for the PI." in readme_text
    )
    assert "|-- 2011.0.00229.S/" in readme_text and f"|-- {X8C}.ms.split/" in readme_text
    tables = member / "calibration" / f"{X8C}.calibration"
    assert sorted(p.name for p in tables.iterdir()) == [f"{X8C}.ms.antpos", f"{X8C}.ms.split.ap_pre_bandpass",
                                                        f"{X8C}.ms.split.bandpass"]  # fmt: skip
    assert not any(p.name == "calibrated.ms" or p.name == f"{X8C}.ms" for p in member.rglob("*"))
    split = member / "raw" / f"{X8C}.ms.split"
    script = member / "script" / "scriptForImaging.py"
    origin_split = sb / "X8c" / f"{X8C}.ms.split"
    if mode in ("fake", "ticket"):
        assert (split / "table.dat").stat().st_size == 0 and (
            split / "ANTENNA" / "table.dat"
        ).exists()
        for path in member.rglob("*"):
            if path.is_file() and path.name != "README":
                linked = mode == "ticket" and path.relative_to(member).parts[0] in ("qa", "script")
                assert (path.stat().st_size > 0) == linked, path
        assert not manifest_path(packpath).exists()
    else:
        assert not validate_manifest(packpath)
        listed = manifest_path(packpath).read_text()
        assert "  2011.0.00229.S/sg_ouss_id/group_ouss_id/member_ouss_id/README\n" in listed
        checked = subprocess.run(["sha256sum", "--quiet", "-c", manifest_path(packpath).name],
                                 cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr
    if mode == "copy":
        assert (split / "table.dat").read_bytes() == (origin_split / "table.dat").read_bytes()
        assert (split / "table.dat").stat().st_ino != (origin_split / "table.dat").stat().st_ino
        assert data_columns(split) == {"DATA": 1, "CORRECTED_DATA": 2, "MODEL_DATA": 3}
    if mode in ("hard", "ticket"):
        assert os.path.samefile(script, sb / "scriptForImaging.py")
    if mode == "hard":
        antpos = tables / f"{X8C}.ms.antpos"
        assert os.path.samefile(antpos, sb / "X8c" / f"{X8C}.ms.antpos")
        assert antpos.stat().st_nlink == 2
        assert data_columns(split) == {"DATA": 1}
        assert data_columns(member / "calibrated" / f"{X8C}.ms.split.cal") == {"DATA": 2}
        assert (split / "ANTENNA" / "table.dat").is_file()  # subtables come along
    if mode == "move":
        moved = [p for p in before if p.is_symlink()]
        assert moved and all(sha256(p) == before[p] for p in moved)
        assert all(Path(os.readlink(p)).is_relative_to(member) for p in moved)
        assert not any(p.is_symlink() for p in sb.rglob("*") if p.is_dir())  # never a folder
        assert not (sb / "X8c" / f"{X8C}.ms").is_symlink()  # not packaged, not moved
        assert (sb / "calibrated.ms" / "table.dat").is_file() and not (
            sb / "calibrated.ms" / "table.dat"
        ).is_symlink()
        assert not (tmp_path / "2011.0.00229.S.qa-packager-journal.json").exists()
    if mode != "move":
        assert origin_digests(sb) == before  # the origin is untouched


def test_dry_run_prints_what_the_run_does(
    tmp_path: Path,
    readme: Path,
    capsys: pytest.CaptureFixture[str],
    build_sb: Callable[[Path], Path],
) -> None:
    from observatory.packaging.cli import main

    sb = build_sb(tmp_path)
    (sb / "X8c" / "cont.dat").write_text("0 1\n")  # left out: said by the dry run too
    packpath = tmp_path / "2011.0.00229.S"
    arguments = ["--origpath", str(sb), "--readme", str(readme), "--packpath", str(packpath)]
    for mode in MODES:
        assert main([*arguments, "--mode", mode, "--dry-run"]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert not packpath.exists() and not list(tmp_path.glob("2011.0.00229.S.*"))
        done = package(sb, readme, packpath, mode=mode)
        member = packpath / done.member
        summary = next(i for i, line in enumerate(printed) if " actions; package size " in line)
        assert printed[:summary] == [action.describe(member) for action in done.actions]
        left_out = [note for note in done.notes if note.startswith("not packaged:")]
        assert printed[summary + 1 :] == left_out
        assert f"not packaged: {sb / 'X8c' / 'cont.dat'}" in left_out
        if mode == "move":
            break  # the origin is now links; the other modes ran on the original
        shutil.rmtree(packpath)
        for leftover in tmp_path.glob("2011.0.00229.S.*"):
            leftover.unlink()
    assert any(line.startswith("move ") for line in printed)
    hard = package(sb, readme, tmp_path / "x" / "2011.0.00229.S", mode="hard", dry_run=True)
    assert {a.kind for a in hard.actions} == {"mkdir", "link", "split-ms", "write"}


def test_dry_run_shows_the_package_it_would_clear_and_the_files_it_writes(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    first = package(sb, readme, packpath, mode="copy")
    written = [Path(a.destination_text) for a in first.actions if a.kind == "write"]
    assert written == [
        packpath / first.member / "README",
        tmp_path / "2011.0.00229.S.ticket.tar",
        tmp_path / "2011.0.00229.S.ticket.zip",
        tmp_path / "2011.0.00229.S.manifest-sha256.txt",
        tmp_path / "2011.0.00229.S.bag-info.txt",
    ]
    assert all(path.is_file() for path in written)
    assert first.actions[0].kind == "mkdir"  # nothing to clear the first time
    again = package(sb, readme, packpath, mode="copy", dry_run=True)  # append='': start again
    assert again.actions[0] == Action("remove", None, str(packpath))
    assert again.actions[0].describe(packpath / again.member) == f"remove   {packpath}"
    fake = package(sb, readme, packpath, mode="fake", dry_run=True)
    assert [Path(a.destination_text).name for a in fake.actions if a.kind == "write"] == [
        "README", "2011.0.00229.S.ticket.tar", "2011.0.00229.S.ticket.zip",
    ]  # fmt: skip


class Crash(BaseException):
    """Stands for a kill: nothing after it runs, no cleanup."""


@pytest.mark.parametrize("seed", range(24))
def test_move_interrupted_anywhere_is_finished_by_a_rerun(
    tmp_path: Path, readme: Path, seed: int, monkeypatch: pytest.MonkeyPatch,
    build_sb: Callable[[Path], Path],
) -> None:  # fmt: skip
    import random

    sb = build_sb(tmp_path)
    before = origin_digests(sb)
    packpath = tmp_path / "2011.0.00229.S"
    calls = {"n": 0}
    crash_at = random.Random(seed).randrange(1, 1500)  # a run makes ~1,600 such calls
    for name in ("link", "symlink", "replace", "unlink", "mkdir"):
        real = getattr(os, name)

        def failing(*args: object, _real: Callable[..., object] = real, **kwargs: object) -> object:
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise Crash
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, failing)
    with pytest.raises(Crash):
        package(sb, readme, packpath, mode="move")
    monkeypatch.undo()
    for path, digest in before.items():  # at every point: the file, or a link to its copy
        assert path.exists() and sha256(path) == digest, path
    with pytest.raises(PackagingError, match="interrupted move"):
        package(sb, readme, packpath, mode="copy")  # must not clear the half-moved package
    package(sb, readme, packpath, mode="move")
    member = packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id"
    assert listing(member) == EXPECTED
    moved = [p for p in before if p.is_symlink()]
    assert len(moved) > 40 and all(sha256(p) == before[p] for p in moved)
    assert not validate_manifest(packpath)
    with pytest.raises(PackagingError, match="links into"):
        package(sb, readme, packpath, mode="copy")  # clearing would strand the links


@pytest.mark.parametrize("seed", range(3))
def test_move_killed_for_real_is_finished_by_a_rerun(
    tmp_path: Path, readme: Path, seed: int, build_sb: Callable[[Path], Path]
) -> None:
    import random
    import signal
    import time

    sb = build_sb(tmp_path)
    before = origin_digests(sb)
    packpath = tmp_path / "2011.0.00229.S"
    code = (
        "import sys, time\n"
        "from observatory.packaging.qa2 import package\n"
        "print('ready', flush=True)\n"
        "package(sys.argv[1], sys.argv[2], sys.argv[3], mode='move',"
        " progress=lambda action: time.sleep(0.002))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(sb), str(readme), str(packpath)],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    time.sleep(random.Random(seed).uniform(0.02, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait()
    for path, digest in before.items():
        assert path.exists() and sha256(path) == digest, path
    package(sb, readme, packpath, mode="move")
    assert all(p.is_symlink() and sha256(p) == before[p] for p in before if p.name == "table.dat"
               and "calibrated.ms" not in str(p) and f"{X8C}.ms/" not in str(p) and f"{X528}.ms/" not in str(p))  # fmt: skip
    assert not validate_manifest(packpath)


def test_manifest_catches_a_changed_byte(
    tmp_path: Path,
    readme: Path,
    build_sb: Callable[[Path], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from observatory.packaging.cli import main

    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy")
    assert main(["verify", str(packpath)]) == 0
    target = packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id" / "product"
    fits = target / "calibrated_all_setup3_b6.clean.fits"
    content = bytearray(fits.read_bytes())
    content[3] ^= 1  # same size, one bit
    fits.write_bytes(bytes(content))
    (target / "extra.fits").write_bytes(b"x")
    problems = validate_manifest(packpath)
    assert len(problems) == 2 and problems[0].startswith("changed: 2011.0.00229.S/")
    assert "not in the manifest" in problems[1]
    assert main(["verify", str(packpath)]) == 1
    printed = capsys.readouterr()
    assert "changed:" in printed.err and printed.out.endswith(": 2 problems\n")
    (target / "extra.fits").unlink()
    assert main(["verify", str(packpath)]) == 1
    assert capsys.readouterr().out.endswith(": 1 problem\n")


def test_modern_layout(tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]) -> None:
    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    uids = ("uid://A001/X1284/X1ef0", "uid___A001_X1284_X1ef1", "uid://A001/X1284/X1ef2")
    plan = package(sb, readme, packpath, mode="copy", style="modern", uids=uids)
    assert plan.member == Path("science_goal.uid___A001_X1284_X1ef0/group.uid___A001_X1284_X1ef1/"
                               "member.uid___A001_X1284_X1ef2")  # fmt: skip
    member = packpath / plan.member
    assert listing(member) == EXPECTED
    assert sorted(p.name for p in member.iterdir() if p.is_file()) == [
        "member.uid___A001_X1284_X1ef2.README.txt"
    ]
    assert not validate_manifest(packpath)
    with pytest.raises(PackagingError, match="not an ALMA uid"):
        package(sb, readme, packpath, style="modern", uids=("uid://A001/X1", *uids[1:]))
    with pytest.raises(PackagingError, match="needs the science goal"):
        package(sb, readme, packpath, style="modern")


def test_append_member_and_group_never_touch_what_exists(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    second = tmp_path / "project229" / "IRC10216_setup4_b6_run_x2"
    uid = "uid___A002_X3c9295_X1f0"  # the third SB's
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy")
    first = packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id"
    before = {str(p): p.stat().st_mtime_ns for p in first.rglob("*")}
    package(second, readme, packpath, append="member", mode="copy")
    assert sorted(p.name for p in (packpath / "sg_ouss_id" / "group_ouss_id").iterdir()) == [
        "member_ouss_id", "member_ouss_id2"]  # fmt: skip
    assert {str(p): p.stat().st_mtime_ns for p in first.rglob("*")} == before
    assert not validate_manifest(packpath)  # the manifest covers both members
    manifest = manifest_path(packpath).read_text()
    assert "/member_ouss_id/README" in manifest and "/member_ouss_id2/README" in manifest
    # A fake (or ticket) member would stay in the real package as dummies, failing its
    # verification: refused, dry run included; the real mode's dry run is the preview.
    for mode, dry_run in (("fake", True), ("fake", False), ("ticket", False)):
        with pytest.raises(PackagingError, match=r"is a real package .*--dry-run"):
            package(second, readme, packpath, append="group", mode=mode, dry_run=dry_run)
    assert [p.name for p in (packpath / "sg_ouss_id").iterdir()] == ["group_ouss_id"]
    third = another_sb(sb.parent, "IRC10216_setup5_b6_run_x2", "uid___A002_X3c9295_X1f0")
    preview = package(third, readme, packpath, append="group", mode="copy", dry_run=True)
    assert package(third, readme, packpath, append="group", mode="copy").member == preview.member
    assert sorted(p.name for p in (packpath / "sg_ouss_id").iterdir()) == [
        "group_ouss_id",
        "group_ouss_id2",
    ]
    assert not validate_manifest(packpath)
    assert (
        packpath / "sg_ouss_id" / "group_ouss_id2" / "member_ouss_id" / "raw" / f"{uid}.ms.split"
    ).is_dir()
    package(sb, readme, packpath, append="", mode="fake")  # '' starts again
    assert sorted(p.name for p in (packpath / "sg_ouss_id").iterdir()) == ["group_ouss_id"]


def test_a_project_directory_given_as_origpath_is_refused_naming_its_scheduling_blocks(
    tmp_path: Path, readme: Path, example_project: Path
) -> None:
    """The message blamed the measurement sets' names, then listed well-named ones."""
    with pytest.raises(PackagingError) as refused:
        package(example_project, readme, tmp_path / "2011.0.00229.S", mode="fake", dry_run=True)
    message = str(refused.value)
    assert "no execution block of its own" in message and "append='member'" in message
    assert str(example_project / "IRC10216_setup3_b6_run_x2") in message
    assert str(example_project / "IRC10216_setup4_b6_run_x2") in message
    assert "named <uid>.ms.split" not in message


def test_refusals(tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]) -> None:
    sb = build_sb(tmp_path)
    before = origin_digests(sb)
    packpath = tmp_path / "2011.0.00229.S"
    with pytest.raises(PackagingError, match="project code"):
        package(sb, readme, tmp_path / "my_package")
    with pytest.raises(PackagingError, match="must not end in /"):
        QA_Packager(str(sb) + "/", str(readme), str(packpath))
    with pytest.raises(PackagingError, match="must not end in /"):
        QA_Packager(str(sb), str(readme), str(packpath) + "/")
    with pytest.raises(PackagingError, match=r"readme .* is not a file"):
        package(sb, tmp_path / "no-readme.txt", packpath)
    with pytest.raises(PackagingError, match="mode 'shred' is not one of"):
        package(sb, readme, packpath, mode="shred")
    with pytest.raises(PackagingError, match="append"):
        package(sb, readme, packpath, append="everything")
    empty = tmp_path / "empty_sb"
    empty.mkdir()
    with pytest.raises(PackagingError, match="no execution block") as refused:
        package(empty, readme, packpath)
    assert "found" not in str(refused.value)
    (empty / "X8c").mkdir()
    (empty / "X8c" / "X8c.ms.split").mkdir()  # named after the directory, not the uid
    with pytest.raises(
        PackagingError, match=r"full ALMA uid .*; found X8c/X8c\.ms\.split \(name them"
    ):
        package(empty, readme, packpath)
    broken = tmp_path / "broken"
    shutil.copytree(sb, broken / "IRC10216_setup3_b6_run_x2")
    (broken / "IRC10216_setup3_b6_run_x2" / "X8c" / f"{X8C}.ms.split" / "table.dat").write_bytes(
        b"?"
    )
    with pytest.raises(PackagingError, match="cannot be read as a measurement set"):
        package(broken / "IRC10216_setup3_b6_run_x2", readme, packpath, mode="hard")
    assert not packpath.exists() and not list(tmp_path.glob("2011.0.00229.S.*"))  # nothing written
    inside = packpath / "reduction"
    shutil.copytree(sb, inside / "IRC10216_setup3_b6_run_x2")
    with pytest.raises(PackagingError, match="would contain the reduction directory"):
        package(inside / "IRC10216_setup3_b6_run_x2", readme, packpath)
    assert (inside / "IRC10216_setup3_b6_run_x2").is_dir()  # nothing was removed
    assert origin_digests(sb) == before


def test_hard_mode_across_file_systems_fails_before_writing(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system here")
    sb = build_sb(tmp_path)
    other = Path(__import__("tempfile").mkdtemp(dir=shm))
    try:
        with pytest.raises(PackagingError, match="different file systems"):
            package(sb, readme, other / "2011.0.00229.S", mode="hard")
        assert not list(other.iterdir())
    finally:
        shutil.rmtree(other)


def test_command_line(
    tmp_path: Path,
    readme: Path,
    capsys: pytest.CaptureFixture[str],
    build_sb: Callable[[Path], Path],
) -> None:
    from observatory.packaging.cli import main

    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    arguments = ["--origpath", str(sb), "--readme", str(readme), "--packpath", str(packpath)]
    assert main([*arguments, "--mode", "copy"]) == 0
    assert "member_ouss_id (copy mode)" in capsys.readouterr().out
    assert (packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id" / "product").is_dir()
    assert main([*arguments[:-1], str(tmp_path / "nope")]) == 1
    assert "project code" in capsys.readouterr().err
    modern = [*arguments, "--style", "modern", "--sg-uid", "uid://A001/X1/X2"]
    with pytest.raises(SystemExit):
        main(modern)
    assert "needs --sg-uid, --group-uid and --member-uid" in capsys.readouterr().err


def test_an_execution_block_already_in_the_package_is_not_appended_again(
    tmp_path: Path, readme: Path, capsys: pytest.CaptureFixture[str],
    build_sb: Callable[[Path], Path],
) -> None:  # fmt: skip
    """The same SB appended again (as a member, or in a new group) was accepted silently:
    its measurement sets were in three members, verify said valid, tarsplit delivered all."""
    from observatory.packaging.cli import main

    sb = build_sb(tmp_path)
    second = sb.parent / "IRC10216_setup4_b6_run_x2"
    packpath = tmp_path / "2011.0.00229.S"

    def run(origin: Path, *options: str) -> int:
        return main(["--origpath", str(origin), "--readme", str(readme), "--packpath",
                     str(packpath), *options])  # fmt: skip

    assert run(sb, "--mode", "copy") == 0
    assert run(second, "--append", "member", "--mode", "copy") == 0
    before = package_state(tmp_path, packpath)
    capsys.readouterr()
    for origin, held, options in (
        (second, "uid___A002_X3c9295_X1e0", ("--append", "group", "--mode", "hard")),
        (second, "uid___A002_X3c9295_X1e0", ("--append", "member", "--mode", "copy")),
        (second, "uid___A002_X3c9295_X1e0", ("--append", "member", "--mode", "copy", "--dry-run")),
        (sb, X8C, ("--append", "group", "--mode", "move")),
    ):
        assert run(origin, *options) == 1, options
        err = capsys.readouterr().err
        member = "member_ouss_id2" if origin == second else "member_ouss_id"
        assert f"{held} (in {packpath}/sg_ouss_id/group_ouss_id/{member})" in err, err
        assert "nothing was written" in err
    assert package_state(tmp_path, packpath) == before
    assert len(list(packpath.rglob("uid___A002_X3c9295_X1e0.ms.split"))) == 1
    assert not (packpath / "sg_ouss_id" / "group_ouss_id2").exists()
    # A dummy package too (the document's fake appends), and the modern layout under a new
    # member uid.
    fake = tmp_path / "fake" / "2011.0.00229.S"
    package(second, readme, fake, mode="fake")
    with pytest.raises(PackagingError, match=r"uid___A002_X3c9295_X1e0 \(in .*/member_ouss_id\)"):
        package(second, readme, fake, mode="fake", append="member")
    modern = tmp_path / "modern" / "2011.0.00229.S"
    package(second, readme, modern, style="modern", uids=("uid://A001/X1/X2", "uid://A001/X1/X3",
                                                          "uid://A001/X1/X4"))  # fmt: skip
    with pytest.raises(PackagingError, match="already in the package"):
        package(second, readme, modern, append="member", style="modern",
                uids=("uid://A001/X1/X2", "uid://A001/X1/X3", "uid://A001/X1/X5"))  # fmt: skip


def test_ticket_files(tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]) -> None:
    import tarfile
    import zipfile

    sb = build_sb(tmp_path)
    copied = package(sb, readme, tmp_path / "copy" / "2011.0.00229.S", mode="copy")
    member = tmp_path / "copy" / "2011.0.00229.S" / copied.member
    real_size = sum(p.stat().st_size for p in member.rglob("*") if p.is_file())
    assert copied.expected_size_bytes == real_size

    # Fake and ticket modes describe the package the document pairs them with, hard mode's,
    # whose measurement sets are split (smaller): they said the copy's size, 2.7 times a real
    # hard-mode package of data, model and corrected columns.
    hard = package(sb, readme, tmp_path / "hard" / "2011.0.00229.S", mode="hard")
    hard_member = tmp_path / "hard" / "2011.0.00229.S" / hard.member
    hard_size = sum(p.stat().st_size for p in hard_member.rglob("*") if p.is_file())
    assert hard.expected_size_bytes == hard_size < real_size
    faked = package(sb, readme, tmp_path / "fake" / "2011.0.00229.S", mode="fake")
    assert faked.expected_size_bytes == pytest.approx(hard_size, rel=0.01)
    assert (tmp_path / "fake" / "2011.0.00229.S.ticket.tar").stat().st_size == 0  # dummies
    assert (tmp_path / "fake" / "2011.0.00229.S.ticket.zip").stat().st_size == 0

    ticket = package(sb, readme, tmp_path / "ticket" / "2011.0.00229.S", mode="ticket")
    assert ticket.expected_size_bytes == faked.expected_size_bytes  # the same record
    with tarfile.open(tmp_path / "ticket" / "2011.0.00229.S.ticket.tar") as archive:
        names = set(archive.getnames())
        size_record = archive.extractfile("2011.0.00229.S/expected_size.txt").read()  # type: ignore[union-attr]
        qa_file = archive.extractfile(f"2011.0.00229.S/{ticket.member}/qa/X8c.checklist.txt").read()  # type: ignore[union-attr]
    prefix = f"2011.0.00229.S/{ticket.member}"
    expected = {f"{prefix}/README", "2011.0.00229.S/expected_size.txt"}
    expected |= {f"{prefix}/qa/{name}" for name in EXPECTED["qa"]}
    expected |= {f"{prefix}/script/{name}" for name in EXPECTED["script"]}
    assert names == expected  # nothing from raw/, calibrated/ or product/
    assert int(size_record) == ticket.expected_size_bytes and qa_file == b"all checked\n"
    with zipfile.ZipFile(tmp_path / "ticket" / "2011.0.00229.S.ticket.zip") as archive:
        assert set(archive.namelist()) == expected
        assert (
            archive.read(f"{prefix}/README")
            == (tmp_path / "ticket" / "2011.0.00229.S" / ticket.member / "README").read_bytes()
        )
    # The document's own append example is a fake run: the real tickets are kept.
    tickets = {p: p.read_bytes() for p in (tmp_path / "ticket").glob("*.ticket.*")}
    second = sb.parent / "IRC10216_setup4_b6_run_x2"
    dry = package(second, readme, tmp_path / "ticket" / "2011.0.00229.S", mode="fake",
                  append="member", dry_run=True)  # fmt: skip
    assert not [a for a in dry.actions if a.kind == "write" and ".ticket." in str(a.destination)]
    package(second, readme, tmp_path / "ticket" / "2011.0.00229.S", mode="fake", append="member")
    assert {p: p.read_bytes() for p in tickets} == tickets
    package(sb, readme, tmp_path / "ticket" / "2011.0.00229.S", mode="fake")  # cleared: dummies
    assert all(p.stat().st_size == 0 for p in tickets)


def test_other_layouts_of_the_document(tmp_path: Path, readme: Path, example_project: Path) -> None:
    """A single-asdm SB (images kept with the EB) and a project of EB directories."""
    single = tmp_path / "project123" / "SB1" / "Xab1"
    shutil.copytree(example_project / "IRC10216_setup3_b6_run_x2" / "X8c", single)
    (single / "scriptForImaging.py").write_text("# imaging\n")
    (single / "target.clean.fits").write_bytes(b"SIMPLE")
    plan = package(single.parent, readme, tmp_path / "a" / "2011.0.00123.S", mode="fake")
    member = tmp_path / "a" / "2011.0.00123.S" / plan.member
    assert listing(member)["product"] == {"target.clean.fits"}
    assert "scriptForImaging.py" in listing(member)["script"]
    assert listing(member)["raw"] == {f"{X8C}.ms.split/"}
    project = tmp_path / "project229-ebs"
    for eb in ("X8c", "X528"):
        shutil.copytree(example_project / "IRC10216_setup3_b6_run_x2" / eb, project / eb)
    plan = package(project, readme, tmp_path / "b" / "2011.0.00229.S", mode="fake")
    member = tmp_path / "b" / "2011.0.00229.S" / plan.member
    assert listing(member)["raw"] == EXPECTED["raw"]
    assert listing(member)["calibration"] == EXPECTED["calibration"]


def test_copy_without_verification_still_writes_the_manifest(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy", verify=False)
    assert not validate_manifest(packpath)


def test_copies_keep_mode_and_times_and_report_progress(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    """As shutil.copy2 (and the document's copy mode) would; progress for every action."""
    from observatory.packaging import manifest

    sb = build_sb(tmp_path)
    script = next(sb.rglob("*.scriptForCalibration.py"))
    script.chmod(0o750)
    os.utime(script, ns=(1_300_000_000_123_456_789, 1_300_000_000_987_654_321))
    big = next(p for p in sb.rglob("*") if p.is_file() and p.stat().st_size > 0)
    big.write_bytes(os.urandom(3 * manifest.COPY_BLOCK_BYTES + 17))  # blocks and a remainder
    done = []
    packpath = tmp_path / "2011.0.00229.S"
    plan = package(sb, readme, packpath, mode="copy", progress=done.append)
    planned = [a for a in plan.actions if a.kind != "write"]  # the README etc. are not progress
    assert sorted(str(a) for a in done if a.kind != "hash") == sorted(map(str, planned))
    # Copies are hashed as they are made: only the README is hashed after them.
    assert [(a.destination_text, a.source_text) for a in done if a.kind == "hash"] == [
        ("README", None)
    ]
    copies = {a.source: packpath / plan.member / a.destination for a in plan.actions if a.source}
    for source in (script, big):
        copy, origin = copies[source].stat(), source.stat()
        assert copy.st_mode == origin.st_mode and copy.st_mtime_ns == origin.st_mtime_ns
        assert copies[source].read_bytes() == source.read_bytes()
    assert not validate_manifest(packpath)


def test_a_move_reports_the_hashing_after_its_files(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    """A move hashes the whole package once its files are moved: minutes, for a big one,
    which the progress bar showed as a silent pause."""
    sb = build_sb(tmp_path)
    done: list[Action] = []
    packpath = tmp_path / "2011.0.00229.S"
    plan = package(sb, readme, packpath, mode="move", progress=done.append)
    member = packpath / plan.member
    hashed = {a.destination_text: a.size_bytes for a in done if a.kind == "hash"}
    assert done[-len(hashed) :] == [a for a in done if a.kind == "hash"]  # after the moves
    files = [p for p in member.rglob("*") if p.is_file()]
    assert hashed == {str(p.relative_to(member)): p.stat().st_size for p in files}


def test_a_bad_copy_is_caught(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from observatory.packaging import manifest

    sb = build_sb(tmp_path)
    real_copy_block = manifest._copy_block

    def flaky_copy_block(source_fd: int, copy_fd: int, offset: int, count: int) -> int:
        copied = real_copy_block(source_fd, copy_fd, offset, count)
        if copied and os.readlink(f"/proc/self/fd/{copy_fd}").endswith(
            "calibrated_all_setup3_b6.clean.fits"
        ):  # one byte flipped on the way to the disk
            (byte,) = os.pread(copy_fd, 1, offset)
            os.pwrite(copy_fd, bytes([byte ^ 1]), offset)
        return copied

    monkeypatch.setattr(manifest, "_copy_block", flaky_copy_block)
    with pytest.raises(PackagingError, match=r"calibrated_all_setup3_b6.clean.fits differs from"):
        package(sb, readme, tmp_path / "2011.0.00229.S", mode="copy")
    assert not manifest_path(tmp_path / "2011.0.00229.S").exists()  # no manifest vouches for it


def test_a_link_that_is_not_the_origins_inode_is_caught(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hard link is checked through the descriptor its hash reads (here the file system
    is made to give a copy of one file instead of a link)."""
    from observatory.packaging import qa2

    sb = build_sb(tmp_path)
    real_hard_link = qa2._hard_link

    def copying_hard_link(
        source: str | os.PathLike[str], destination: str | os.PathLike[str], *, cwd_fd: int
    ) -> None:
        if os.fspath(destination).endswith("scriptForImaging.py"):
            shutil.copy2(source, destination)
        else:
            real_hard_link(source, destination, cwd_fd=cwd_fd)

    monkeypatch.setattr(qa2, "_hard_link", copying_hard_link)
    with pytest.raises(
        PackagingError,
        match=r"script/scriptForImaging.py is not a hard link of .*scriptForImaging.py",
    ):
        package(sb, readme, tmp_path / "2011.0.00229.S", mode="hard")
    assert not manifest_path(tmp_path / "2011.0.00229.S").exists()


def test_hard_mode_hashes_big_files_in_threads_beside_the_small_ones(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    """Files of a MiB or more are linked and hashed by the worker threads, the small ones by
    the calling thread: both end up linked, checked and in the manifest."""
    sb = build_sb(tmp_path)
    big = [sb / "calibrated_all_setup3_b6.clean.fits", sb / "X8c" / f"{X8C}.ms.antpos"]
    for number, path in enumerate(big):
        path.write_bytes(os.urandom((3 << 20) + number))
    packpath = tmp_path / "2011.0.00229.S"
    done = package(sb, readme, packpath, mode="hard")
    member = packpath / done.member
    linked = {
        action.source: member / action.destination
        for action in done.actions
        if action.kind == "link"
    }
    assert all(os.path.samefile(source, target) for source, target in linked.items())
    assert set(big) <= set(linked) and len(linked) > 20
    assert not validate_manifest(packpath)
    listed = manifest_path(packpath).read_text()
    assert all(f"{sha256(path)}  " in listed for path in big)


def test_hard_mode_syncs_its_split_measurement_sets_and_the_directories_before_the_commit(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """casacore does not sync the measurement sets it writes: after a power cut a committed
    hard-mode package could hold a split cut short. Every file of the splits is synced
    before the manifest is written, every directory of the member before the commit; the
    linked files' data is their origin's, which the run does not sync."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source: str | Path, destination: str | Path) -> None:
        events.append(("replace", os.path.realpath(destination)))
        real_replace(source, destination)

    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    plan = package(sb, readme, packpath, mode="hard")
    member = packpath / plan.member
    splits = [member / a.destination_text for a in plan.actions if a.kind == "split-ms"]
    split_files = [p for split in splits for p in split.rglob("*") if p.is_file()]
    linked = [member / a.destination_text for a in plan.actions if a.kind == "link"]
    assert len(splits) == 4 and len(split_files) > 40 and linked
    synced = {path: i for i, (call, path) in reversed(list(enumerate(events))) if call == "fsync"}
    manifest = events.index(("replace", os.path.realpath(manifest_path(packpath))))
    journal = os.path.realpath(packpath.parent / "2011.0.00229.S.qa-packager-journal.json")
    commit = max(i for i, event in enumerate(events) if event == ("fsync", f"{journal}.partial"))
    assert all(synced.get(os.path.realpath(p), manifest) < manifest for p in split_files)
    last_file = max(synced[os.path.realpath(p)] for p in split_files)
    directories = [os.path.realpath(d) for d, _, _ in os.walk(member)] + [
        os.path.realpath(d) for d in (*member.parents[:3], packpath.parent)
    ]
    for directory in directories:
        assert any(
            last_file < i < commit
            for i, event in enumerate(events)
            if event == ("fsync", directory)
        ), directory
    assert not {os.path.realpath(p) for p in linked} & set(synced)


def _table_contents(path: Path) -> dict[str, object]:
    """What a reader of a table sees: columns and their values, keywords, info, storage
    managers, and the same of its subtables (read through the keywords)."""
    import numpy as np
    from casacore import tables

    with tables.table(str(path), ack=False) as table:
        keywords = table.getkeywords()
        contents: dict[str, object] = {
            "info": table.info(),
            "hypercolumns": _plain(table.getdesc()["_define_hypercolumn_"]),
            "storage": sorted(
                (manager["TYPE"], tuple(manager["COLUMNS"]))
                for manager in table.getdminfo().values()
            ),
            "keywords": {
                name: value
                for name, value in keywords.items()
                if not str(value).startswith("Table: ")
            },
        }
        for name in table.colnames():
            cells = [
                np.asarray(table.getcell(name, row)).tolist()
                if table.iscelldefined(name, row)
                else None
                for row in range(table.nrows())
            ]
            contents[name] = (_plain(table.getcolkeywords(name)), cells)
        for name, value in keywords.items():
            if str(value).startswith("Table: "):
                contents[f"subtable {name}"] = _table_contents(Path(value.removeprefix("Table: ")))
    return contents


@pytest.mark.parametrize(("calibrated", "tiled"), [(False, False), (True, False), (True, True)])
def test_split_measurement_set_reads_as_casacores_deep_copy(
    tmp_path: Path, calibrated: bool, tiled: bool
) -> None:
    """The split writes the main table itself and copies the subtables; a reader sees what
    casacore's deep copy of the same columns gives, the origin is not written to, and the
    split is a measurement set of its own (writing to it leaves the origin as it was)."""
    from casacore import tables

    from observatory.packaging.qa2 import split_measurement_set

    origin = tmp_path / "origin.ms"
    measurement_set(origin, tiled=tiled)
    with tables.table(str(origin / "ANTENNA"), ack=False, readonly=False) as antennas:
        antennas.addrows(3)
        antennas.putcol("NAME", ["DV01", "DV02", "PM03"])
    for path in (origin / "ANTENNA").iterdir():  # an archived origin may be read-only
        path.chmod(0o444)
    (origin / "ANTENNA" / ".table.f0.qa-packager-partial").write_bytes(b"left by a crash")
    keep = "CORRECTED_DATA" if calibrated else "DATA"
    with tables.table(str(origin), ack=False) as table:
        columns = [c for c in table.colnames() if c not in ("DATA", "CORRECTED_DATA", "MODEL_DATA")]
        with table.query(columns=",".join([*columns, keep])) as selection:
            selection.copy(str(tmp_path / "deep.ms"), deep=True, valuecopy=True).close()
    if calibrated:
        with tables.table(str(tmp_path / "deep.ms"), ack=False, readonly=False) as deep:
            deep.renamecol(keep, "DATA")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in origin.rglob("*") if p.is_file()}

    split_measurement_set(origin, tmp_path / "split.ms", calibrated=calibrated)

    assert after_mtimes_and_bytes(origin) == before
    assert _table_contents(tmp_path / "split.ms") == _table_contents(tmp_path / "deep.ms")
    assert data_columns(tmp_path / "split.ms") == {"DATA": 2 if calibrated else 1}
    assert not (tmp_path / "split.ms" / "ANTENNA" / ".table.f0.qa-packager-partial").exists()
    (tmp_path / "split.ms").rename(tmp_path / "moved.ms")  # subtables are found where it is
    assert _table_contents(tmp_path / "moved.ms") == _table_contents(tmp_path / "deep.ms")
    with tables.table(str(tmp_path / "moved.ms" / "ANTENNA"), ack=False, readonly=False) as copy:
        copy.putcell("NAME", 0, "CM01")
    assert after_mtimes_and_bytes(origin) == before


def _plain(value: object) -> object:
    """Keyword values with numpy arrays as lists, so that they compare with ==."""
    import numpy as np

    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value.tolist() if isinstance(value, np.ndarray) else value


def after_mtimes_and_bytes(directory: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.rglob("*") if p.is_file()}


def test_split_of_a_table_whose_columns_name_tables_is_casacores_deep_copy(tmp_path: Path) -> None:
    from casacore import tables

    from observatory.packaging.qa2 import split_measurement_set

    origin = tmp_path / "origin.ms"
    measurement_set(origin)
    with tables.table(str(origin), ack=False, readonly=False) as table:
        table.putcolkeyword("DATA", "SOURCE_TABLE", f"Table: {origin / 'FIELD'}")
    split_measurement_set(origin, tmp_path / "split.ms", calibrated=False)
    with tables.table(str(tmp_path / "split.ms"), ack=False) as split:
        assert (
            split.getcolkeyword("DATA", "SOURCE_TABLE")
            == f"Table: {tmp_path / 'split.ms' / 'FIELD'}"
        )
    assert data_columns(tmp_path / "split.ms") == {"DATA": 1}
    assert not os.path.samefile(
        tmp_path / "split.ms" / "FIELD" / "table.dat", origin / "FIELD" / "table.dat"
    )


def test_a_symlinked_subtable_is_copied_into_the_split(tmp_path: Path) -> None:
    """A subtable that is a symlink to a table elsewhere: the split kept a keyword naming
    the origin's, and a delivered copy of it had no FIELD table."""
    from casacore import tables

    from observatory.packaging.qa2 import split_measurement_set

    origin = tmp_path / "origin.ms"
    measurement_set(origin)
    elsewhere = tmp_path / "elsewhere" / "FIELD"
    elsewhere.parent.mkdir()
    (origin / "FIELD").rename(elsewhere)
    (origin / "FIELD").symlink_to(elsewhere)
    split_measurement_set(origin, tmp_path / "split.ms", calibrated=False)
    field = tmp_path / "split.ms" / "FIELD"
    assert field.is_dir() and not field.is_symlink()
    (tmp_path / "split.ms").rename(tmp_path / "moved.ms")
    shutil.rmtree(tmp_path / "elsewhere")  # the delivered set needs nothing of the origin's
    with tables.table(str(tmp_path / "moved.ms"), ack=False) as moved:
        assert moved.getkeyword("FIELD") == f"Table: {tmp_path / 'moved.ms' / 'FIELD'}"
    with tables.table(str(tmp_path / "moved.ms" / "FIELD"), ack=False) as fields:
        assert fields.nrows() >= 0


@pytest.mark.parametrize("calibrated", [False, True])
def test_split_of_a_measurement_set_written_by_pyuvdata(tmp_path: Path, calibrated: bool) -> None:
    """Our own conversions write measurement sets with pyuvdata: 23 storage managers, tiled
    data columns, a SOURCE subtable, and units ``uncalib`` on DATA, which TaQL refuses."""
    import warnings

    import numpy as np
    from astropy import units
    from astropy.coordinates import EarthLocation
    from casacore import tables
    from pyuvdata import Telescope, UVData

    from observatory.packaging.qa2 import split_measurement_set

    origin = tmp_path / "origin.ms"
    with warnings.catch_warnings():  # pyuvdata's notes on what it fills in for the MWA
        warnings.simplefilter("ignore")
        mwa = Telescope.new(
            name="MWA",
            location=EarthLocation.from_geodetic(
                116.67 * units.deg, -26.70 * units.deg, 377.8 * units.m
            ),
            antenna_positions={index: [index * 10.0, 0.0, 0.0] for index in range(4)},
            instrument="MWA",
            mount_type="phased",
            antenna_diameters=np.full(4, 4.0),
        )
        uvd = UVData.new(
            freq_array=np.linspace(150e6, 151e6, 8),
            polarization_array=np.array([-5, -6, -7, -8]),
            telescope=mwa,
            times=2459000.5 + np.arange(3) / 86400,
            antpairs=[(0, 1), (0, 2), (1, 3)],
            channel_width=125e3,
            integration_time=1.0,
            do_blt_outer=True,
            empty=True,
        )
        uvd.data_array = np.random.default_rng(1).normal(size=uvd.data_array.shape).astype(complex)
        uvd.write_ms(str(origin), force_phase=True)
    with tables.table(str(origin), ack=False, readonly=False) as table:
        storage = table.getdminfo("DATA")
        table.addcols(
            tables.makecoldesc("CORRECTED_DATA", table.getcoldesc("DATA")),
            {**storage, "NAME": "TiledCorrected", "COLUMNS": ["CORRECTED_DATA"]},
        )
        table.putcol("CORRECTED_DATA", table.getcol("DATA") * 2)
        table.copy(str(tmp_path / "deep.ms"), deep=True, valuecopy=True).close()
    with tables.table(str(tmp_path / "deep.ms"), ack=False, readonly=False) as deep:
        deep.removecols(["DATA"] if calibrated else ["CORRECTED_DATA"])
        if calibrated:
            deep.renamecol("CORRECTED_DATA", "DATA")

    split_measurement_set(origin, tmp_path / "split.ms", calibrated=calibrated)

    assert _table_contents(tmp_path / "split.ms") == _table_contents(tmp_path / "deep.ms")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = UVData.from_file(str(tmp_path / "split.ms"))
    assert np.allclose(back.data_array, uvd.data_array * (2 if calibrated else 1))


# What a data reducer gets wrong (found by using the packager as one): each either packages
# what the reducer meant or is refused before anything is written, with a clear reason.


def member_files(member: Path) -> int:
    return sum(p.stat().st_size for p in member.rglob("*") if p.is_file())


def test_a_stray_uid_file_beside_the_execution_blocks_does_not_hide_them(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    (sb / f"{X8C}.ms.listobs.txt").write_text("listobs output\n")
    plan = package(sb, readme, tmp_path / "2011.0.00229.S", mode="fake")
    assert listing(tmp_path / "2011.0.00229.S" / plan.member)["raw"] == EXPECTED["raw"]


def casa_image(path: Path) -> None:
    """A small real CASA image (python-casacore): a table whose type is ``Image``."""
    import numpy as np
    from casacore import images

    path.parent.mkdir(parents=True, exist_ok=True)
    image = images.image(str(path), shape=(1, 1, 4, 4))
    image.putdata(np.ones((1, 1, 4, 4), dtype=np.float32))
    del image  # flushed and closed


def test_the_raw_asdm_and_casa_images_are_not_calibration_tables(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    """The ASDM ``importasdm`` reads sits in the EB directory, and images made from an EB's
    data are named after it: neither is a calibration table, nor makes a products directory
    an execution block (whose other files would be prefixed or left out)."""
    sb = build_sb(tmp_path)
    for asdm in (sb / "X8c" / X8C, sb / "X528" / f"{X528}.asdm.sdm"):
        (asdm / "ASDMBinary").mkdir(parents=True)
        (asdm / "ASDM.xml").write_text("<ASDM/>")
        (asdm / "ASDMBinary" / "uid___A002_X3c9295_X8d").write_bytes(b"raw visibilities")
    casa_image(sb / "X8c" / f"{X8C}.ms.split.cal.cont.image")  # a single-asdm habit
    images = sb / "images"
    casa_image(images / f"{X8C}.ms.split.cal.cont.image")
    casa_image(images / "cubes" / f"{X528}.ms.split.cal.line.image")
    (images / f"{X8C}.ms.split.cal.cont.fits").write_bytes(b"SIMPLE")
    (images / "cubes" / "uid___A002_X3c9295_X1e0.line.fits").write_bytes(b"SIMPLE")  # other SB
    (images / "casapy-imaging.log").write_text("log\n")
    (images / "listobs.txt").write_text("Observed from 01-May-2012\n")  # not a note for the PI
    plan = package(sb, readme, tmp_path / "2011.0.00229.S", mode="fake")
    member = tmp_path / "2011.0.00229.S" / plan.member
    found = listing(member)
    assert found["calibration"] == EXPECTED["calibration"]
    assert sorted(p.name for p in (member / "calibration" / f"{X8C}.calibration").iterdir()) == [
        f"{X8C}.ms.antpos", f"{X8C}.ms.split.ap_pre_bandpass", f"{X8C}.ms.split.bandpass"]  # fmt: skip
    assert found["product"] == EXPECTED["product"] | {
        f"{X8C}.ms.split.cal.cont.fits", "uid___A002_X3c9295_X1e0.line.fits"}  # fmt: skip
    assert found["log"] == EXPECTED["log"]  # products only are looked for in images/
    readme_text = (member / "README").read_text()
    assert "Imaging notes for the PI." in readme_text and "Observed from" not in readme_text
    assert not any("ASDM" in p.name or p.name.endswith(".image") for p in member.rglob("*"))
    notes = "\n".join(plan.notes)
    assert f"{sb / 'X8c' / X8C} (the raw ASDM)" in notes
    assert f"{images / X8C}.ms.split.cal.cont.image (a CASA image" in notes
    assert f"not packaged: {images / 'listobs.txt'}" in notes
    assert f"not packaged: {images / 'casapy-imaging.log'} (in a products directory" in notes


@pytest.mark.parametrize("mode", ["fake", "copy", "hard"])
def test_hidden_files_and_what_the_document_does_not_look_for_are_not_packaged(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], mode: str
) -> None:
    """A notebook's checkpoint went to script/, an editor's swap file to qa/; any file in
    qa2/ was a QA2 file, and a products directory's old scripts were the scripts."""
    sb = build_sb(tmp_path)
    checkpoints = sb / ".ipynb_checkpoints"
    checkpoints.mkdir()
    (checkpoints / "scriptForImaging-checkpoint.py").write_text("# an older imaging script\n")
    (sb / "X8c" / "qa2" / ".textfile.txt.swp").write_bytes(b"swap")
    (sb / "X8c" / "qa2" / "notes.docx").write_bytes(b"PK")
    (sb / ".hidden_qa2.txt").write_text("qa2")
    plots = sb / "X8c" / f"{X8C}.ms.split.ap_pre_bandpass.plots"
    (plots / ".DS_Store").write_bytes(b"finder")
    (sb / "X8c" / f"{X8C}.ms.split" / ".swp").write_bytes(b"in a measurement set")
    old_try = sb / "old_try"
    old_try.mkdir()
    (old_try / "scriptForImaging_v1.py").write_text("# an old try\n")
    (old_try / "ipython-old.log").write_text("log\n")
    (old_try / "cube.fits").write_bytes(b"SIMPLE")  # products in sibling directories are found
    packpath = tmp_path / "2011.0.00229.S"
    plan = package(sb, readme, packpath, mode=mode)
    member = packpath / plan.member
    found = listing(member)
    assert found["script"] == EXPECTED["script"] and found["qa"] == EXPECTED["qa"]
    assert found["log"] == EXPECTED["log"]
    assert found["product"] == EXPECTED["product"] | {"cube.fits"}
    assert not [p for p in member.rglob(".*")]
    if mode != "fake":
        assert not validate_manifest(packpath)
    notes = [note for note in plan.notes if note.startswith("not packaged:")]
    for path, reason in (
        (checkpoints, "hidden"), (sb / ".hidden_qa2.txt", "hidden"),
        (sb / "X8c" / "qa2" / ".textfile.txt.swp", "hidden"), (plots / ".DS_Store", "hidden"),
        (sb / "X8c" / f"{X8C}.ms.split" / ".swp", "hidden"),
        (sb / "X8c" / "qa2" / "notes.docx", "in qa2/, but no QA2 file"),
        (old_try / "scriptForImaging_v1.py", "in a products directory"),
        (old_try / "ipython-old.log", "in a products directory"),
    ):  # fmt: skip
        assert any(note.startswith(f"not packaged: {path} ({reason}") for note in notes), path
    assert not any("checkpoint.py" in note for note in notes)  # its directory is reported


def test_a_calibration_table_not_named_after_the_block_is_packaged_with_the_uid(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    """The document: the block's directory holds "all calibration tables", and names that do
    not start with the uid get it in front; other such files (CASA's ``.last``) stay out."""
    from casacore import tables

    sb = build_sb(tmp_path)
    description = tables.maketabdesc([tables.makearrcoldesc("CPARAM", 0j, ndim=2)])
    with tables.table(str(sb / "X8c" / "bandpass.bcal"), description, nrow=2, ack=False) as cal:
        cal.putinfo({"type": "Calibration", "subType": "B Jones", "readme": ""})
    (sb / "X8c" / "applycal.last").write_text("vis = 'x'\n")
    plan = package(sb, readme, tmp_path / "2011.0.00229.S", mode="copy")
    tables_dir = tmp_path / "2011.0.00229.S" / plan.member / "calibration" / f"{X8C}.calibration"
    assert sorted(p.name for p in tables_dir.iterdir()) == [
        f"{X8C}.ms.antpos", f"{X8C}.ms.split.ap_pre_bandpass", f"{X8C}.ms.split.bandpass",
        f"{X8C}__bandpass.bcal"]  # fmt: skip
    with tables.table(str(tables_dir / f"{X8C}__bandpass.bcal"), ack=False) as packaged:
        assert packaged.info()["type"] == "Calibration" and packaged.nrows() == 2
    assert f"not packaged: {sb / 'X8c' / 'applycal.last'}" in plan.notes
    assert not validate_manifest(tmp_path / "2011.0.00229.S")


def test_every_execution_block_needs_its_split_and_its_calibration_script(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    (sb / "X8c" / f"{X8C}.ms.scriptForCalibration.py").unlink()
    shutil.rmtree(sb / "X528" / f"{X528}.ms.split")
    with pytest.raises(PackagingError) as refused:
        package(sb, readme, tmp_path / "2011.0.00229.S", mode="copy")
    assert f"missing: {X8C}.ms.scriptForCalibration.py, {X528}.ms.split" in str(refused.value)
    assert not (tmp_path / "2011.0.00229.S").exists()


def test_hard_mode_links_the_file_a_symlink_names(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    images = sb.parent / "images"
    images.mkdir()
    (images / "cube.fits").write_bytes(b"SIMPLE  = T cube")
    (sb / "cube.fits").symlink_to("../images/cube.fits")  # relative: dangling if linked as is
    packpath = tmp_path / "2011.0.00229.S"
    plan = package(sb, readme, packpath, mode="hard")
    packaged = packpath / plan.member / "product" / "cube.fits"
    assert not packaged.is_symlink()
    assert os.stat(packaged).st_ino == os.stat(images / "cube.fits").st_ino
    assert not validate_manifest(packpath)


def test_the_manifest_of_a_package_in_the_current_directory(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The document's own call: ``packpath='./2011.0.00229.S'``."""
    sb = build_sb(tmp_path)
    monkeypatch.chdir(tmp_path)
    QA_Packager(str(sb), str(readme), "./2011.0.00229.S", mode="copy")
    names = read_manifest(tmp_path / "2011.0.00229.S.manifest-sha256.txt")
    assert all(name.startswith("2011.0.00229.S/sg_ouss_id/") for name in names)
    assert not validate_manifest(Path("2011.0.00229.S"))
    package(sb.parent / "IRC10216_setup4_b6_run_x2", readme, "2011.0.00229.S", append="member", mode="copy")  # fmt: skip
    assert not validate_manifest(Path("2011.0.00229.S"))
    assert len(read_manifest(tmp_path / "2011.0.00229.S.manifest-sha256.txt")) > len(names)


def test_move_refuses_symlinks_before_moving_anything(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    shared = tmp_path / "shared.py"
    shared.write_text("# shared\n")
    (sb / "scriptForImaging.py").unlink()
    (sb / "scriptForImaging.py").symlink_to(shared)
    before = origin_digests(sb)
    packpath = tmp_path / "2011.0.00229.S"
    with pytest.raises(PackagingError, match=r"cannot move symlinks .*scriptForImaging.py"):
        package(sb, readme, packpath, mode="move")
    assert origin_digests(sb) == before and not any(
        p.is_symlink() for p in sb.rglob("*") if p.name != "scriptForImaging.py"
    )
    assert not (tmp_path / "2011.0.00229.S.qa-packager-journal.json").exists()
    (sb / "scriptForImaging.py").unlink()
    (sb / "scriptForImaging.py").write_text("# imaging\n")
    package(sb, readme, packpath, mode="move")
    with pytest.raises(PackagingError, match="already in the package"):  # the same SB again
        package(sb, readme, packpath, append="member", mode="move")
    assert not (packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id2").exists()
    assert not (tmp_path / "2011.0.00229.S.qa-packager-journal.json").exists()
    assert not validate_manifest(packpath)


def test_an_interrupted_move_resumes_under_another_spelling_of_origpath(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from observatory.packaging import qa2

    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    real_move, moved = qa2.move_with_symlink, []

    def crash_after_three(source: Path, destination: Path) -> None:
        if len(moved) == 3:
            raise Crash
        real_move(source, destination)
        moved.append(source)

    monkeypatch.setattr(qa2, "move_with_symlink", crash_after_three)
    with pytest.raises(Crash):
        package(sb, readme, packpath, mode="move")
    monkeypatch.setattr(qa2, "move_with_symlink", real_move)
    package(sb.parent / ".." / sb.parent.name / sb.name, readme, packpath, mode="move")
    assert not validate_manifest(packpath)


def test_a_move_resumed_after_the_origin_changed_never_moves_over_a_moved_file(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    """An image moved into product/, then the run cut off; the reducer adds an image of the
    same name at the SB level, which the new plan sends to that path: the moved file (its
    only copy) was deleted as 'a partial copy'."""
    sb = build_sb(tmp_path)
    eb_image = sb / "X8c" / "Afoo.fits"
    eb_image.write_bytes(b"the EB's image: after the move, its only copy is in the package")
    packpath = tmp_path / "2011.0.00229.S"

    def crash_after_the_image(action: Any) -> None:
        if action.kind == "move" and action.destination_text.endswith("Afoo.fits"):
            raise Crash

    with pytest.raises(Crash):
        package(sb, readme, packpath, mode="move", progress=crash_after_the_image)
    assert eb_image.is_symlink()
    (sb / "Afoo.fits").write_bytes(b"an SB-level image of the same name")
    with pytest.raises(PackagingError, match=r"Afoo\.fits holds another file than"):
        package(sb, readme, packpath, mode="move")
    assert eb_image.read_bytes().startswith(b"the EB's image")  # through its symlink: kept
    (sb / "Afoo.fits").unlink()  # the reduction as it was: the move finishes
    package(sb, readme, packpath, mode="move")
    assert eb_image.read_bytes().startswith(b"the EB's image")
    assert not validate_manifest(packpath)


def test_a_readme_header_inside_the_package_is_read_before_it_is_cleared(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="fake")
    header = packpath / "README.header.txt"
    header.write_text("header kept in the package\n")
    plan = package(sb, header, packpath, mode="copy")
    assert (packpath / plan.member / "README").read_text().startswith("header kept in the package")
    assert not header.exists()  # cleared with the rest: append='' starts again


def test_packpath_refusals(tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]) -> None:
    sb = build_sb(tmp_path)
    with pytest.raises(PackagingError, match="inside the reduction directory"):
        package(sb, readme, sb / "2011.0.00229.S")
    assert not (sb / "2011.0.00229.S").exists()
    as_file = tmp_path / "a" / "2011.0.00229.S"
    as_file.parent.mkdir()
    as_file.write_text("not a package")
    with pytest.raises(PackagingError, match="exists and is not a directory"):
        package(sb, readme, as_file, dry_run=True)
    linked = tmp_path / "b" / "2011.0.00229.S"
    linked.parent.mkdir()
    (tmp_path / "real").mkdir()
    linked.symlink_to(tmp_path / "real")
    with pytest.raises(PackagingError, match="is a symlink"):
        package(sb, readme, linked)
    assert as_file.read_text() == "not a package" and linked.is_symlink()


def test_appending_in_the_other_layout_is_refused(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    uids = ("uid://A001/X1/X2", "uid://A001/X1/X3", "uid://A001/X1/X4")
    package(sb, readme, packpath, style="modern", uids=uids)
    second = sb.parent / "IRC10216_setup4_b6_run_x2"
    with pytest.raises(PackagingError, match="in the modern layout"):
        package(second, readme, packpath, append="member")
    assert not (packpath / "sg_ouss_id").exists()
    package(second, readme, packpath / ".." / "2012.1.00001.S")
    with pytest.raises(PackagingError, match="in the legacy layout"):
        package(sb, readme, tmp_path / "2012.1.00001.S", append="group", style="modern", uids=uids)


def test_a_failed_append_leaves_no_member_behind(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from observatory.packaging import qa2

    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy")
    second = sb.parent / "IRC10216_setup4_b6_run_x2"
    real_copy = qa2.copy_and_hash

    def failing_copy(origin: str, copy: str, **options: bool) -> str:
        if origin.endswith("scriptForCalibration.py"):
            raise OSError(5, "Input/output error", origin)
        return real_copy(origin, copy, **options)

    monkeypatch.setattr(qa2, "copy_and_hash", failing_copy)
    for append, made in (("member", "group_ouss_id/member_ouss_id2"), ("group", "group_ouss_id2")):
        with pytest.raises(OSError, match="Input/output error"):
            package(second, readme, packpath, append=append, mode="copy")
        assert not (packpath / "sg_ouss_id" / made).exists()
    monkeypatch.setattr(qa2, "copy_and_hash", real_copy)
    plan = package(second, readme, packpath, append="member", mode="copy")
    assert plan.member.name == "member_ouss_id2"
    assert not validate_manifest(packpath)


def test_an_unreadable_file_is_found_before_anything_is_written(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = build_sb(tmp_path)
    unreadable = str(next(sb.rglob("*.scriptForCalibration.py")))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != unreadable and real_access(path, mode))  # fmt: skip
    packpath = tmp_path / "2011.0.00229.S"
    for mode in ("copy", "hard", "move", "ticket"):
        with pytest.raises(PackagingError, match=f"cannot read {unreadable}"):
            package(sb, readme, packpath, mode=mode, dry_run=mode == "copy")
    assert not packpath.exists()
    package(sb, readme, packpath, mode="fake")  # fake mode reads nothing


def test_a_name_with_a_line_break_is_refused(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    (sb / "X8c" / "qa2" / "bad\nname_qa2.txt").write_text("qa2")
    with pytest.raises(PackagingError, match="has a line break in its name"):
        package(sb, readme, tmp_path / "2011.0.00229.S", mode="copy", dry_run=True)
    (sb / "X8c" / "qa2" / "bad\nname_qa2.txt").unlink()
    (sb / "X8c" / "qa2" / "50% done%0a_qa2.txt").write_text("qa2")  # bagit reads %0A as \n
    with pytest.raises(PackagingError, match="has %0A or %0D in its name"):
        package(sb, readme, tmp_path / "2011.0.00229.S", mode="copy", dry_run=True)
    (sb / "X8c" / "qa2" / "50% done%0a_qa2.txt").rename(sb / "X8c" / "qa2" / "50% done_qa2.txt")
    package(sb, readme, tmp_path / "2011.0.00229.S", mode="copy")  # a plain % is a name
    assert not validate_manifest(tmp_path / "2011.0.00229.S")


def test_the_size_record_is_the_size_of_the_package_made(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    """In hard mode too, where the split measurement sets are smaller than their origins."""
    sb = build_sb(tmp_path)
    for mode in ("copy", "hard"):
        packpath = tmp_path / mode / "2011.0.00229.S"
        plan = package(sb, readme, packpath, mode=mode)
        assert plan.expected_size_bytes == member_files(packpath / plan.member), mode


def test_a_split_keeps_no_read_only_directory(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    """A read-only subtable copied as it is could not be cleared by the next run (as a user)."""
    sb = build_sb(tmp_path)
    antenna = sb / "X8c" / f"{X8C}.ms.split" / "ANTENNA"
    antenna.chmod(0o555)
    packpath = tmp_path / "2011.0.00229.S"
    try:
        plan = package(sb, readme, packpath, mode="hard")
    finally:
        antenna.chmod(0o755)
    split_antenna = packpath / plan.member / "raw" / f"{X8C}.ms.split" / "ANTENNA"
    assert split_antenna.stat().st_mode & stat.S_IWUSR


def test_clearing_a_package_removes_its_manifest(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy")
    package(sb, readme, packpath, mode="fake")
    assert not manifest_path(packpath).exists()


def sb2_packaged(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> tuple[Path, Path, Path]:
    """The example under ``tmp_path``, its second SB packaged by copy: (SB1, SB2, packpath)."""
    sb = build_sb(tmp_path)
    second = sb.parent / "IRC10216_setup4_b6_run_x2"
    packpath = tmp_path / "2011.0.00229.S"
    package(second, readme, packpath, mode="copy")
    return sb, second, packpath


def package_state(tmp_path: Path, packpath: Path) -> dict[str, str]:
    """Every file of the package and beside it (manifest, tickets), hashed; symlinks by target."""
    files = [p for p in tmp_path.iterdir() if p.name.startswith(packpath.name) and p.is_file()]
    files += [p for p in packpath.rglob("*") if p.is_file()]
    return {str(p.relative_to(tmp_path)): sha256(p) for p in files}


def test_clearing_never_deletes_what_an_earlier_move_put_in_the_package(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    """SB1 moved in, then SB2 packaged without ``append``: the package holds SB1's only copy."""
    sb = build_sb(tmp_path)
    second = sb.parent / "IRC10216_setup4_b6_run_x2"
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="move")
    before = package_state(tmp_path, packpath)
    for mode, dry_run in (("copy", True), ("copy", False), ("fake", False), ("hard", False)):
        with pytest.raises(
            PackagingError, match=r"links into .* \(moved there by an earlier run\)"
        ):
            package(second, readme, packpath, mode=mode, dry_run=dry_run)
    assert package_state(tmp_path, packpath) == before
    assert all(p.exists() for p in sb.rglob("*"))  # no dangling link at SB1
    package(second, readme, packpath, append="member", mode="copy")  # what was meant
    assert not validate_manifest(packpath)
    # Once SB1's files are back at their origin, clearing is allowed again.
    for link in [p for p in sb.rglob("*") if p.is_symlink()]:
        target = link.resolve()
        link.unlink()
        shutil.copy2(target, link)
    package(second, readme, packpath, mode="copy")
    assert [p.name for p in (packpath / "sg_ouss_id" / "group_ouss_id").iterdir()] == [
        "member_ouss_id"
    ]


def test_a_run_that_fails_after_clearing_puts_the_package_back(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    """A damaged measurement set found only while splitting: the earlier package is intact."""
    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy")
    before = package_state(tmp_path, packpath)
    (sb / "X8c" / f"{X8C}.ms.split.cal" / "table.f0").write_bytes(b"garbage")
    with pytest.raises(PackagingError, match=rf"{X8C}.ms.split.cal cannot be split"):
        package(sb, readme, packpath, mode="hard")
    assert package_state(tmp_path, packpath) == before
    assert not validate_manifest(packpath)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("2011")) == [
        "2011.0.00229.S", "2011.0.00229.S.bag-info.txt", "2011.0.00229.S.manifest-sha256.txt",
        "2011.0.00229.S.ticket.tar", "2011.0.00229.S.ticket.zip",
    ]  # fmt: skip


def test_hard_mode_refuses_a_symlink_to_another_file_system_before_writing(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system here")
    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy")
    before = package_state(tmp_path, packpath)
    other = Path(__import__("tempfile").mkdtemp(dir=shm))
    try:
        (other / "remote.fits").write_bytes(b"SIMPLE")
        (sb / "remote.fits").symlink_to(other / "remote.fits")
        for dry_run in (True, False):
            with pytest.raises(
                PackagingError, match=r"cannot link .*remote.fits.* another file system"
            ):
                package(sb, readme, packpath, mode="hard", dry_run=dry_run)
    finally:
        shutil.rmtree(other)
    assert package_state(tmp_path, packpath) == before


def test_a_killed_run_is_undone_by_the_next(
    tmp_path: Path,
    readme: Path,
    build_sb: Callable[[Path], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A copy ``append`` killed part-way: the next run removes its member and numbers it again."""
    import signal
    import time

    sb, _second, packpath = sb2_packaged(tmp_path, readme, build_sb)
    before = package_state(tmp_path, packpath)
    code = (  # files are copied two at a time: the line is printed once, whole
        "import sys, threading, time\n"
        "from observatory.packaging.qa2 import package\n"
        "first = threading.Lock()\n"
        "def slow(action):\n"
        "    if action.kind == 'copy':\n"
        "        if first.acquire(blocking=False):\n"
        "            print('copying', flush=True)\n"
        "        time.sleep(60)\n"
        "package(sys.argv[1], sys.argv[2], sys.argv[3], mode='copy', append='member', progress=slow)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(sb), str(readme), str(packpath)],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout is not None and process.stdout.readline() == "copying\n"
    process.send_signal(signal.SIGKILL)
    process.wait()
    member2 = packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id2"
    assert member2.is_dir() and (tmp_path / "2011.0.00229.S.qa-packager-journal.json").exists()
    plan = package(sb, readme, packpath, mode="copy", append="member", dry_run=True)
    assert plan.member.name == "member_ouss_id2" and plan.actions[0].kind == "undo"
    journal = tmp_path / "2011.0.00229.S.qa-packager-journal.json"  # beside, not in the member
    monkeypatch.chdir(tmp_path)  # packpath as a user gives it: relative
    relative = package(sb, readme, packpath.name, mode="copy", append="member", dry_run=True)
    assert relative.actions[0].describe(packpath / plan.member) == f"undo     {journal}"
    monkeypatch.undo()
    time.sleep(0.01)
    plan = package(sb, readme, packpath, mode="copy", append="member")
    assert plan.member.name == "member_ouss_id2"
    assert plan.undone and "removed" in plan.undone[0]
    assert not validate_manifest(packpath)
    assert listing(member2) == EXPECTED
    after = package_state(tmp_path, packpath)
    assert {k: v for k, v in after.items() if "member_ouss_id2" not in k and "S." not in k} == {
        k: v for k, v in before.items() if "S." not in k
    }
    assert not list(tmp_path.glob(".*qa-packager-previous*"))


@pytest.mark.parametrize("crash_in", ["_carry_out", "_commit"])
def test_a_run_killed_after_clearing_is_undone_or_committed_by_the_next(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch,
    crash_in: str,
) -> None:  # fmt: skip
    """Killed (no clean-up ran) while copying over a cleared package, or while committing."""
    from observatory.packaging import qa2

    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="hard")
    before = package_state(tmp_path, packpath)
    real = getattr(qa2, crash_in)

    def killed(*args: object, **kwargs: object) -> None:
        if crash_in == "_commit":  # killed after marking the journal committed
            journal = args[1]
            assert isinstance(journal, qa2.Journal)
            journal.committed = True
            journal.save()
        raise Crash

    monkeypatch.setattr(qa2, crash_in, killed)
    monkeypatch.setattr(qa2, "_undo", lambda *args: "")  # a kill runs no clean-up
    with pytest.raises(Crash):
        package(sb, readme, packpath, mode="copy")
    monkeypatch.undo()
    assert real is getattr(qa2, crash_in)
    assert (tmp_path / ".2011.0.00229.S.qa-packager-previous").is_dir()
    second = sb.parent / "IRC10216_setup4_b6_run_x2"
    if crash_in == "_carry_out":
        plan = package(second, readme, packpath, mode="copy", append="member")
        assert plan.undone and "restored the package it cleared" in plan.undone[0]
        after = package_state(tmp_path, packpath)
        inside = f"{packpath.name}/"  # the package (its manifest and tickets now list member 2)
        assert {
            k: v for k, v in after.items() if k.startswith(inside) and "member_ouss_id2" not in k
        } == {k: v for k, v in before.items() if k.startswith(inside)}
        assert not validate_manifest(packpath)
    else:  # the copy finished: it stays, and what it set aside goes
        assert not validate_manifest(packpath)
        package(second, readme, packpath, mode="copy", append="member")
        assert not (tmp_path / "2011.0.00229.S.qa-packager-journal.json").exists()
    assert not list(tmp_path.glob(".*qa-packager-previous*"))


def test_one_run_at_a_time(tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]) -> None:
    import fcntl

    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="fake")
    with open(tmp_path / ".2011.0.00229.S.qa-packager-lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(PackagingError, match="another qa-packager run is writing"):
            package(sb, readme, packpath, mode="copy")
        # A dry run takes no lock, but would plan against a package being written (and
        # show the run's journal as one to undo): refused while a run holds it.
        with pytest.raises(PackagingError, match="another qa-packager run is writing"):
            package(sb, readme, packpath, mode="copy", dry_run=True)
    package(sb, readme, packpath, mode="copy", dry_run=True)
    package(sb, readme, packpath, mode="copy")


def test_classification_of_the_reviewers_trees(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    """qa2 subdirectories, EB files of one name, SB checklists, the header kept in the SB."""
    sb = build_sb(tmp_path)
    (sb / "X8c" / "qa2" / "plots").mkdir()
    (sb / "X8c" / "qa2" / "plots" / "qa2_part5.png").write_bytes(b"png")
    for eb in ("X8c", "X528"):
        (sb / eb / "scriptForPolCalibration.py").write_text(f"# {eb}\n")
    (sb / "IRC10216_setup3.checklist.txt").write_text("SB checked\n")
    header = sb / "README.header.txt"
    header.write_text("ALMA header in the SB\n")
    packpath = tmp_path / "2011.0.00229.S"
    plan = package(sb, header, packpath, mode="copy")
    member = packpath / plan.member
    found = listing(member)
    assert f"{X8C}__qa2_part5.png" in found["qa"]
    assert {f"{X8C}__scriptForPolCalibration.py", f"{X528}__scriptForPolCalibration.py"} <= found[
        "script"
    ]
    assert (member / "script" / f"{X528}__scriptForPolCalibration.py").read_text() == "# X528\n"
    assert (member / "qa" / "IRC10216_setup3_b6_run_x2.checklist.txt").read_text() == "SB checked\n"
    readme_text = (member / "README").read_text()
    assert readme_text.count("ALMA header in the SB") == 1 and "SB checked" not in readme_text
    assert any("README header" in note for note in plan.notes)
    # The same name twice at the SB level cannot be told apart by a uid: refused, naming both.
    (sb / "Combined").mkdir()
    (sb / "Combined" / "calibrated_all_setup3_b6.clean.fits").write_bytes(b"SIMPLE")
    with pytest.raises(
        PackagingError, match=r"two files would be packaged as product/calibrated_all.*Combined"
    ):
        package(sb, header, packpath, mode="fake", dry_run=True)


@pytest.mark.parametrize("level", ["SB", "EB"])
def test_checklists_are_named_after_the_directory_when_origpath_is_dot(
    tmp_path: Path,
    readme: Path,
    build_sb: Callable[[Path], Path],
    monkeypatch: pytest.MonkeyPatch,
    level: str,
) -> None:
    """``--origpath .`` has no name of its own: the checklist was packaged as the hidden
    ``qa/.checklist.txt``."""
    sb = build_sb(tmp_path)
    (sb / "checklist.txt").write_text("SB checked\n")
    origin = sb if level == "SB" else sb / "X8c"
    monkeypatch.chdir(origin)
    plan = package(".", readme, tmp_path / "2011.0.00229.S", mode="copy")
    qa = listing(tmp_path / "2011.0.00229.S" / plan.member)["qa"]
    assert f"{origin.name}.checklist.txt" in qa
    assert not any(name.startswith(".") for name in qa)


def test_an_execution_block_without_its_split_and_script_is_refused(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    uid = "uid___A002_X9aa_X1f"
    measurement_set(sb / "X1f" / f"{uid}.ms")
    (sb / "X1f" / f"{uid}.ms.bandpass").write_text("table")
    (sb / "X1f" / "checklist.txt").write_text("checked\n")
    with pytest.raises(
        PackagingError, match=rf"missing: {uid}.ms.scriptForCalibration.py, {uid}.ms.split"
    ):
        package(sb, readme, tmp_path / "2011.0.00229.S", mode="copy")
    assert not (tmp_path / "2011.0.00229.S").exists()


def test_move_refuses_an_origin_it_cannot_write_before_moving_anything(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = build_sb(tmp_path)
    fixed = str(sb / "X528" / "qa2")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not (str(path) == fixed and mode & os.W_OK)
                        and real_access(path, mode))  # fmt: skip
    before = origin_digests(sb)
    with pytest.raises(PackagingError, match=rf"cannot write in {fixed}: nothing was moved"):
        package(sb, readme, tmp_path / "2011.0.00229.S", mode="move")
    assert origin_digests(sb) == before and not any(p.is_symlink() for p in sb.rglob("*"))
    assert not (tmp_path / "2011.0.00229.S").exists()
    assert not (tmp_path / "2011.0.00229.S.qa-packager-journal.json").exists()


def test_moved_files_are_linked_by_their_real_path(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--origpath . --packpath ../P``: renaming the reduction afterwards breaks no link."""
    sb = build_sb(tmp_path)
    monkeypatch.chdir(sb)
    package(".", readme, "../2011.0.00229.S", mode="move")
    targets = [os.readlink(p) for p in sb.rglob("*") if p.is_symlink()]
    assert targets and all(t == os.path.realpath(t) and ".." not in t for t in targets)
    monkeypatch.chdir(tmp_path)
    renamed = sb.with_name("IRC10216_setup3_done")
    sb.rename(renamed)
    assert all(p.exists() for p in renamed.rglob("*"))


def test_clear_errors_for_a_dangling_symlink_and_a_readme_that_is_not_utf8(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Observación\n".encode("latin-1"))
    with pytest.raises(PackagingError, match=r"readme .*latin1.txt is not UTF-8 text \(byte 0xf3"):
        package(sb, latin1, tmp_path / "2011.0.00229.S", mode="fake")
    (sb / "X8c" / "gone.log").symlink_to(tmp_path / "nowhere.log")
    with pytest.raises(
        PackagingError, match=r"gone.log is a symlink to .*nowhere.log, which does not exist"
    ):
        package(sb, readme, tmp_path / "2011.0.00229.S", mode="fake")
    assert not (tmp_path / "2011.0.00229.S").exists()


def test_dry_run_refuses_what_the_run_refuses(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    uids = ("uid://A001/X1/X2", "uid://A001/X1/X3", "uid://A001/X1/X4")
    package(sb, readme, packpath, style="modern", uids=uids)
    for dry_run in (True, False):
        with pytest.raises(PackagingError, match="exists already"):
            package(
                sb, readme, packpath, append="member", style="modern", uids=uids, dry_run=dry_run
            )


def test_a_second_run_is_refused_even_into_a_directory_the_first_made(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    """The lock is taken before anything is planned, the parent made first if need be: a run
    started while another writes (or plans) is refused, whatever it would do."""
    sb = build_sb(tmp_path)
    second = sb.parent / "IRC10216_setup4_b6_run_x2"
    packpath = tmp_path / "deliveries" / "new" / "2011.0.00229.S"
    code = (
        "import sys, time\n"
        "from observatory.packaging.qa2 import package\n"
        "def slow(action):\n"
        "    print('working', flush=True); time.sleep(0.05)\n"
        "package(sys.argv[1], sys.argv[2], sys.argv[3], mode='copy', progress=slow)\n"
    )
    first = subprocess.Popen([sys.executable, "-c", code, str(second), str(readme), str(packpath)],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        # Two copy threads may print at once ("workingworking"): it has started all the same.
        assert first.stdout is not None and first.stdout.readline().startswith("working")
        for append in ("", "member"):
            with pytest.raises(PackagingError, match="another qa-packager run is writing"):
                package(sb, readme, packpath, mode="move", append=append)
    finally:
        first.communicate(timeout=120)
    assert first.returncode == 0
    assert all(not p.is_symlink() for p in sb.rglob("*"))  # nothing of SB1 moved
    assert not validate_manifest(packpath)
    assert not (packpath.parent / ".2011.0.00229.S.qa-packager-lock").exists()
    # A refused run into a new directory leaves no directory behind.
    elsewhere = tmp_path / "other" / "place" / "2011.0.00229.S"
    with pytest.raises(PackagingError):
        package(sb, tmp_path / "no-such-readme", elsewhere)
    (tmp_path / "bad").mkdir()
    (sb / "X8c" / "bad\nname.log").write_text("x")
    with pytest.raises(PackagingError, match="line break"):
        package(sb, readme, tmp_path / "bad" / "new" / "2011.0.00229.S")
    assert list((tmp_path / "bad").iterdir()) == []


def test_clearing_is_refused_when_a_moved_from_reduction_is_gone(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb = build_sb(tmp_path)
    second = sb.parent / "IRC10216_setup4_b6_run_x2"
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="move")
    done = sb.with_name("IRC10216_setup3_done")
    sb.rename(done)
    before = package_state(tmp_path, packpath)
    with pytest.raises(
        PackagingError, match=r"which no longer exists: the package may hold their only copy"
    ):
        package(second, readme, packpath, mode="copy")
    assert package_state(tmp_path, packpath) == before
    assert all(p.exists() for p in done.rglob("*"))


def test_a_move_killed_before_its_first_write_is_still_recorded(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from observatory.packaging import qa2

    sb, second, packpath = sb2_packaged(tmp_path, readme, build_sb)
    real_begin = qa2._begin

    def killed_after_begin(*args: Any, **kwargs: Any) -> qa2.Journal:
        real_begin(*args, **kwargs)
        raise Crash

    monkeypatch.setattr(qa2, "_begin", killed_after_begin)
    with pytest.raises(Crash):
        package(sb, readme, packpath, mode="move", append="member")
    monkeypatch.undo()
    package(sb, readme, packpath, mode="move", append="member")  # finishes it
    with pytest.raises(PackagingError, match="links into"):
        package(second, readme, packpath, mode="copy")


def test_a_move_that_clears_killed_before_setting_the_old_package_aside(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finished by running it again: the old package goes, not mixed with the new one."""
    sb, _second, packpath = sb2_packaged(tmp_path, readme, build_sb)
    real_rename = os.rename

    def killed(source: Any, destination: Any) -> None:
        if str(destination).endswith("qa-packager-previous"):
            raise Crash
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(Crash):
        package(sb, readme, packpath, mode="move")
    monkeypatch.undo()
    package(sb, readme, packpath, mode="move")
    member = packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id"
    assert listing(member) == EXPECTED  # SB1 only
    assert not validate_manifest(packpath)
    assert not list(tmp_path.glob(".*qa-packager*"))


def test_a_package_set_aside_that_cannot_be_deleted_is_never_put_back(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from observatory.packaging import qa2

    sb, second, packpath = sb2_packaged(tmp_path, readme, build_sb)
    real_rmtree = shutil.rmtree

    def refusing(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith("qa-packager-previous"):
            raise PermissionError(1, "Operation not permitted", str(path))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(qa2.shutil, "rmtree", refusing)
    with pytest.raises(PackagingError, match="is complete, but the package it replaced"):
        package(sb, readme, packpath, mode="copy")
    after = package_state(tmp_path, packpath)
    for append in ("group", ""):  # the next runs try again, and never undo the finished one
        with pytest.raises(PackagingError, match="could not be deleted"):
            package(second, readme, packpath, mode="copy", append=append)
        assert package_state(tmp_path, packpath) == after
    monkeypatch.undo()
    plan = package(second, readme, packpath, mode="copy", append="group")
    assert plan.member.parts[1] == "group_ouss_id2"
    assert listing(packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id") == EXPECTED
    assert not list(tmp_path.glob(".*qa-packager*"))


def test_undo_restores_real_tickets_after_a_fake_run(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from observatory.packaging import qa2

    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb.parent / "IRC10216_setup4_b6_run_x2", readme, packpath, mode="ticket")
    tickets = {p: p.read_bytes() for p in tmp_path.glob("2011.0.00229.S.ticket.*")}
    assert all(tickets.values())
    monkeypatch.setattr(qa2, "_commit", lambda *args: (_ for _ in ()).throw(Crash()))
    monkeypatch.setattr(qa2, "_undo", lambda *args: "")
    (tmp_path / "2011.0.00229.S.manifest-sha256.txt.partial").write_text("half")
    with pytest.raises(Crash):
        package(sb, readme, packpath, mode="fake", append="member")
    monkeypatch.undo()
    plan = package(sb, readme, packpath, mode="ticket", append="member", dry_run=True)
    assert plan.actions[0].kind == "undo"
    from observatory.packaging.cli import main as cli_main
    from observatory.packaging.tarsplit import write_pieces

    with pytest.raises(ValueError, match="did not finish"):
        write_pieces(packpath, "2012-06-20", None, 1 << 30)
    assert cli_main(["verify", str(packpath)]) == 1
    journal = qa2.Journal.of(packpath)
    assert journal is not None
    qa2._undo(packpath, journal)  # what the next run does first
    assert {p: p.read_bytes() for p in tickets} == tickets  # the real ones, not emptied
    assert not list(tmp_path.glob("*.partial"))


def test_an_append_keeps_reporting_what_went_missing_from_earlier_members(
    tmp_path: Path, readme: Path, build_sb: Callable[[Path], Path]
) -> None:
    sb, _second, packpath = sb2_packaged(tmp_path, readme, build_sb)
    gone = next((packpath / "sg_ouss_id").rglob("table.f0"))
    gone.unlink()
    package(sb, readme, packpath, mode="copy", append="member")
    problems = validate_manifest(packpath)
    assert problems == [f"missing: {gone.relative_to(tmp_path)}"]


@pytest.mark.parametrize("tiled", [False, True], ids=["shared-manager", "own-managers"])
@pytest.mark.parametrize("calibrated", [False, True], ids=["raw", "calibrated"])
def test_the_split_size_is_estimated_without_splitting(
    tmp_path: Path, tiled: bool, calibrated: bool
) -> None:
    """What fake and ticket modes record of a split measurement set, against the split."""
    origin = tmp_path / "uid___A002_X1.ms.split"
    measurement_set(origin, tiled=tiled)
    split_measurement_set(origin, tmp_path / "split.ms", calibrated=calibrated)
    written = sum(p.stat().st_size for p in (tmp_path / "split.ms").rglob("*") if p.is_file())
    origin_bytes = sum(p.stat().st_size for p in origin.rglob("*") if p.is_file())
    estimate = estimated_split_bytes(origin, calibrated=calibrated)
    assert estimate == pytest.approx(written, rel=0.01)
    assert estimate < origin_bytes


def test_the_size_estimate_never_stops_fake_mode_on_a_set_hard_mode_reads_or_refuses(
    tmp_path: Path,
) -> None:
    """A total-power set (FLOAT_DATA, no DATA) was refused by fake and ticket mode once they
    estimated the split, and a set whose MODEL_DATA was never written failed to be read."""
    import numpy as np
    from casacore import tables

    float_only = tmp_path / "uid___A002_X1_X2.ms.split"
    description = tables.maketabdesc(
        [tables.makearrcoldesc("FLOAT_DATA", 0.0, ndim=2, shape=[4, 2])]
    )
    with tables.default_ms(str(float_only), description) as ms:
        ms.addrows(3)
    origin_bytes = sum(p.stat().st_size for p in float_only.rglob("*") if p.is_file())
    assert estimated_split_bytes(float_only, calibrated=False) == origin_bytes

    unwritten = tmp_path / "uid___A002_X1_X3.ms.split"
    columns = [
        tables.makearrcoldesc(name, 0j, ndim=2, valuetype="complex")
        for name in ("DATA", "MODEL_DATA")
    ]
    with tables.default_ms(str(unwritten), tables.maketabdesc(columns)) as ms:
        ms.addrows(3)
        ms.putcol("DATA", np.ones((3, 4, 2), dtype=complex))
    origin_bytes = sum(p.stat().st_size for p in unwritten.rglob("*") if p.is_file())
    assert 0 < estimated_split_bytes(unwritten, calibrated=False) <= origin_bytes


def test_qa2_reports_of_ten_parts_or_more_and_the_left_out_are_said_by_the_documents_call(
    tmp_path: Path,
    readme: Path,
    build_sb: Callable[[Path], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Parts 10 and up of a QA2 report were left out (the document's pattern takes one
    character), and QA_Packager, the document's call, said nothing of what it left out."""
    sb = build_sb(tmp_path)
    qa2 = sb / "X8c" / "qa2"
    (qa2 / "qa2_part10.png").write_bytes(b"png")
    (qa2 / "notes.docx").write_bytes(b"doc")
    plan = QA_Packager(str(sb), str(readme), str(tmp_path / "fake" / "2011.0.00229.S"))
    member = tmp_path / "fake" / "2011.0.00229.S" / plan.member
    assert (member / "qa" / "uid___A002_X3c9295_X8c__qa2_part10.png").exists()
    printed = capsys.readouterr().out
    assert f"not packaged: {qa2 / 'notes.docx'} (in qa2/, but no QA2 file" in printed
    assert printed.count("notes.docx") == 1
    # An execution block given as origpath: each hidden entry said once (it was said twice).
    (sb / "X8c" / ".DS_Store").write_bytes(b"")
    capsys.readouterr()
    QA_Packager(str(sb / "X8c"), str(readme), str(tmp_path / "eb" / "2011.0.00229.S"))
    assert capsys.readouterr().out.count(".DS_Store (hidden)") == 1
