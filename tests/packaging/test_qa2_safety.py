"""The packager's refusals and records that keep data safe, on a tiny reduction directory.

No measurement sets here (no python-casacore writes): a directory named ``uid___<EB>.ms.split``
with a file in it is packaged the same way in every mode but hard (where it is linked as a
directory, not split), which keeps each test well under a second.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from observatory.packaging import cli, qa2
from observatory.packaging.manifest import manifest_path, read_manifest, validate_manifest
from observatory.packaging.qa2 import PackagingError, package
from sb_copies import copy_with_execution_block

UID = "uid___A002_X1_X1"
MEMBER = Path("sg_ouss_id", "group_ouss_id", "member_ouss_id")


def tiny_sb(root: Path, *, eb_elsewhere: Path | None = None) -> Path:
    """A scheduling block with one execution block ``X1`` (a symlink to ``eb_elsewhere``
    when given), its QA2 files and an imaging script."""
    sb = root / "project" / "SB"
    sb.mkdir(parents=True)
    eb = sb / "X1" if eb_elsewhere is None else eb_elsewhere
    (eb / f"{UID}.ms.split").mkdir(parents=True)
    (eb / f"{UID}.ms.split" / "table.f0").write_bytes(b"visibilities")
    (eb / f"{UID}.ms.scriptForCalibration.py").write_text("# calibration\n")
    (eb / "qa2").mkdir()
    (eb / "qa2" / "qa2_part1.png").write_bytes(b"png")
    if eb_elsewhere is not None:
        (sb / "X1").symlink_to(eb_elsewhere)
    (sb / "scriptForImaging.py").write_text("# imaging\n")
    return sb


def another_sb(sb: Path, number: int) -> Path:
    """A copy of ``sb`` beside it (``SB<number>``) whose execution block is another one,
    ``uid___A002_X1_X<number>``: the same execution block is never appended twice."""
    return copy_with_execution_block(
        sb, sb.with_name(f"{sb.name}{number}"), UID, f"uid___A002_X1_X{number}"
    )


@pytest.fixture
def readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.header.txt"
    path.write_text("ALMA Cycle 0 data package\n")
    return path


def files_and_links(root: Path) -> dict[str, str]:
    """Every path below ``root`` (symlinked directories followed): its bytes, or its link."""
    found = {}
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        for name in dirnames + filenames:
            path = Path(directory, name)
            if path.is_symlink():
                found[str(path)] = f"-> {os.readlink(path)}"
            elif path.is_file():
                found[str(path)] = path.read_bytes().hex()
    return found


# 1. move mode and symlinked directories


def test_move_refuses_files_reached_through_a_symlinked_execution_block(
    tmp_path: Path, readme: Path
) -> None:
    elsewhere = tmp_path / "elsewhere" / "X1"
    sb = tiny_sb(tmp_path, eb_elsewhere=elsewhere)
    before = files_and_links(tmp_path / "elsewhere") | files_and_links(sb)
    packpath = tmp_path / "2011.0.00229.S"
    with pytest.raises(PackagingError, match=r"through a symlinked directory .*X1.*qa2_part1"):
        package(sb, readme, packpath, mode="move")
    assert files_and_links(tmp_path / "elsewhere") | files_and_links(sb) == before
    assert (
        not packpath.exists()
        and not (tmp_path / f"{packpath.name}.qa-packager-journal.json").exists()
    )
    package(sb, readme, packpath, mode="copy")  # the other modes package it as before
    assert (packpath / MEMBER / "qa" / f"{UID}__qa2_part1.png").read_bytes() == b"png"


def test_move_refuses_a_symlinked_products_directory(tmp_path: Path, readme: Path) -> None:
    sb = tiny_sb(tmp_path)
    products = tmp_path / "products"
    products.mkdir()
    (products / "image.fits").write_bytes(b"SIMPLE")
    (sb / "Combined").symlink_to(products)
    with pytest.raises(PackagingError, match=r"symlinked directory .*Combined.*image.fits"):
        package(sb, readme, tmp_path / "2011.0.00229.S", mode="move")
    assert (products / "image.fits").read_bytes() == b"SIMPLE"
    assert not any(p.is_symlink() for p in sb.rglob("*") if p.name != "Combined")


def test_clearing_sees_links_left_inside_a_symlinked_directory(
    tmp_path: Path, readme: Path
) -> None:
    """A move by an earlier version left its symlinks in a directory the reduction links to."""
    elsewhere = tmp_path / "elsewhere" / "X1"
    sb = tiny_sb(tmp_path, eb_elsewhere=elsewhere)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy")
    moved = elsewhere / "qa2" / "qa2_part1.png"
    moved.unlink()
    moved.symlink_to(packpath / MEMBER / "qa" / f"{UID}__qa2_part1.png")
    with pytest.raises(PackagingError, match=r"qa2_part1.png links into"):
        package(sb, readme, packpath, mode="copy")
    assert moved.read_bytes() == b"png"


# 2. names that cannot work, refused before anything is written


@pytest.mark.parametrize("mode", ["fake", "copy", "move", "ticket"])
def test_a_packaged_name_too_long_for_the_file_system_is_refused_first(
    tmp_path: Path, readme: Path, mode: str
) -> None:
    sb = tiny_sb(tmp_path)
    long_name = "a" * 236 + "qa2.txt"  # 243 bytes; 261 with the "<uid>__" prefix
    (sb / "X1" / long_name).write_text("notes")
    before = files_and_links(sb)
    packpath = tmp_path / "2011.0.00229.S"
    for dry_run in (True, False):
        with pytest.raises(
            PackagingError, match=rf"names too long .*X1/{long_name} \(as qa/{UID}__"
        ):
            package(sb, readme, packpath, mode=mode, dry_run=dry_run)
    assert files_and_links(sb) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.header.txt", "project"]


def deep_file(directory: Path, name: str, *, depth: int = 20) -> None:
    """``name`` below ``depth`` directories of 250 bytes each: a path longer than PATH_MAX
    (4096), made through directory descriptors (no system call takes the whole path)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d" * 250, dir_fd=fd)
            inner = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["qa2", "measurement set"])
@pytest.mark.parametrize("mode", ["fake", "copy", "hard"])
def test_a_path_longer_than_path_max_in_the_reduction_is_refused_first(
    tmp_path: Path, readme: Path, mode: str, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It failed with the raw "[Errno 36] File name too long", not the refusal of names too
    long that names the path."""
    sb = tiny_sb(tmp_path)
    deep_file(sb / "X1" / ("qa2" if where == "qa2" else f"{UID}.ms.split"), "qa2_part1.png")
    arguments = ["--origpath", str(sb), "--readme", str(readme), "--packpath",
                 str(tmp_path / "2011.0.00229.S"), "--mode", mode]  # fmt: skip
    for dry_run in ([], ["--dry-run"]):
        assert cli.main([*arguments, *dry_run]) == 1
        err = capsys.readouterr().err
        assert "names too long for the file system" in err and "4096 a path" in err, err
        assert f"in the reduction, which cannot be read: {sb}/X1/" in err and "Errno" not in err
        assert "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.header.txt", "project"]


def test_a_name_a_move_cannot_make_its_temporary_link_for_is_refused(
    tmp_path: Path, readme: Path
) -> None:
    sb = tiny_sb(tmp_path)
    name = "X" + "b" * 240 + ".log"  # fits the package, not ".<name>.qa-packager-link"
    (sb / "X1" / name).write_text("log")
    with pytest.raises(PackagingError, match="names too long"):
        package(sb, readme, tmp_path / "2011.0.00229.S", mode="move")
    assert not (sb / "X1" / name).is_symlink()


@pytest.mark.parametrize("mode", ["fake", "copy", "move"])
def test_a_name_that_is_not_utf8_is_refused_first(
    tmp_path: Path, readme: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sb = tiny_sb(tmp_path)
    (sb / os.fsdecode(b"donn\xe9es_qa2.txt")).write_text("qa2")
    before = files_and_links(sb)
    packpath = tmp_path / "2011.0.00229.S"
    with pytest.raises(PackagingError, match=r"not UTF-8 .*donn\\xe9es_qa2.txt"):
        package(sb, readme, packpath, mode=mode, dry_run=True)
    code = cli.main(["--origpath", str(sb), "--readme", str(readme), "--packpath", str(packpath),
                     "--mode", mode])  # fmt: skip
    assert code == 1 and "donn\\xe9es_qa2.txt" in capsys.readouterr().err
    assert files_and_links(sb) == before and not packpath.exists()


@pytest.mark.parametrize("mode", ["copy", "move"])
def test_a_reduction_under_a_directory_whose_name_is_not_utf8_is_packaged(
    tmp_path: Path, readme: Path, mode: str
) -> None:
    """Only the packaged names must be UTF-8: a parent's name (r\xe9duction) refused them all."""
    parent = tmp_path / os.fsdecode(b"r\xe9duction")
    sb = tiny_sb(parent)
    packpath = tmp_path / "2011.0.00229.S"
    plan = package(sb, readme, packpath, mode=mode)
    assert (packpath / plan.member / "qa" / f"{UID}__qa2_part1.png").read_bytes() == b"png"
    assert not validate_manifest(packpath)
    assert (sb / "X1" / "qa2" / "qa2_part1.png").is_symlink() == (mode == "move")


def test_a_symlinked_directory_inside_qa2_is_reported_not_packaged(
    tmp_path: Path, readme: Path
) -> None:
    """Its files were left out without a word (directories below the SB's level are not
    followed through symlinks; those beside the EBs were already reported)."""
    sb = tiny_sb(tmp_path)
    (tmp_path / "more_plots").mkdir()
    (tmp_path / "more_plots" / "qa2_part5.png").write_bytes(b"png")
    (sb / "X1" / "qa2" / "more").symlink_to(tmp_path / "more_plots")
    plan = package(sb, readme, tmp_path / "2011.0.00229.S", mode="fake", dry_run=True)
    assert (
        f"not packaged: {sb / 'X1' / 'qa2' / 'more'} (a symlinked directory inside "
        in "\n".join(plan.notes)
    )
    assert not any("qa2_part5" in action.destination_text for action in plan.actions)


@pytest.mark.parametrize("where", ["qa2", "measurement set"])
@pytest.mark.parametrize("mode", ["fake", "copy", "hard", "move", "ticket"])
def test_a_named_pipe_in_the_reduction_is_refused_before_anything_is_written(
    tmp_path: Path, readme: Path, mode: str, where: str
) -> None:
    """A copy or move opened it and waited for a writer forever; a move had by then turned
    the other origins into links, and its re-runs and undo-move stopped at the pipe."""
    sb = tiny_sb(tmp_path)
    directory = sb / "X1" / ("qa2" if where == "qa2" else f"{UID}.ms.split")
    os.mkfifo(directory / "stream_qa2_part9.png")  # a QA2 name
    before, entries = files_and_links(sb), sorted(tmp_path.iterdir())
    packpath = tmp_path / "2011.0.00229.S"
    for dry_run in (True, False):
        with pytest.raises(
            PackagingError, match=r"stream_qa2_part9\.png is a named pipe, which a package"
        ):
            package(sb, readme, packpath, mode=mode, dry_run=dry_run)
    assert sorted(tmp_path.iterdir()) == entries and files_and_links(sb) == before
    (directory / "stream_qa2_part9.png").unlink()
    package(sb, readme, packpath, mode=mode)  # the same reduction without it is packaged


@pytest.mark.parametrize("first", ["fake", "ticket"])
@pytest.mark.parametrize("append", ["member", "group"])
def test_a_real_member_is_not_appended_to_a_package_of_dummies(
    tmp_path: Path, readme: Path, first: str, append: str
) -> None:
    """Its manifest would not cover the dummies beside it: the package would never verify."""
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode=first)
    before = files_and_links(tmp_path)
    for mode in ("copy", "hard", "move"):
        for dry_run in (True, False):
            with pytest.raises(PackagingError, match=r"made in fake or ticket mode .*append ''"):
                package(sb, readme, packpath, mode=mode, append=append, dry_run=dry_run)
    assert files_and_links(tmp_path) == before
    package(another_sb(sb, 2), readme, packpath, mode="fake", append=append)  # dummies beside
    package(sb, readme, packpath, mode="copy")  # made again for real, as the message says
    package(another_sb(sb, 3), readme, packpath, mode="copy", append=append)
    assert not validate_manifest(packpath)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_a_packpath_that_is_a_mount_point_is_refused_before_anything_is_written(
    tmp_path: Path, readme: Path
) -> None:
    """Setting the package aside renames packpath, which a mount point refuses (EBUSY): a
    move run then left a journal whose 'run the same move again' failed the same way."""
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    packpath.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(packpath)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:  # a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        before = files_and_links(sb)
        for mode in ("fake", "copy", "move"):
            with pytest.raises(
                PackagingError, match=r"is a mount point: .*give a directory inside"
            ):
                package(sb, readme, packpath, mode=mode)
        assert files_and_links(sb) == before and list(packpath.iterdir()) == []
        assert not list(tmp_path.glob("*.qa-packager-journal.json"))
        inside = packpath / "2011.0.00229.S"  # what the message proposes works
        plan = package(sb, readme, inside, mode="copy")
        assert (inside / plan.member / "README").is_file()
    finally:
        subprocess.run(["umount", str(packpath)], check=True)


def _failing_after(count: int, function: Any, error: BaseException) -> Any:
    """``function``, raising ``error`` once it has run ``count`` times."""
    calls = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        if len(calls) == count:
            raise error
        calls.append(args)
        return function(*args, **kwargs)

    return failing


def test_a_move_that_fails_says_what_state_the_reduction_is_in(
    tmp_path: Path,
    readme: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    failure = OSError(errno.EIO, "Input/output error", "qa2_part1.png")
    monkeypatch.setattr(qa2, "move_with_symlink", _failing_after(1, qa2.move_with_symlink, failure))
    code = cli.main(["--origpath", str(sb), "--readme", str(readme), "--packpath", str(packpath),
                     "--mode", "move"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "Input/output error" in err
    assert "stopped part-way; nothing is lost" in err and "run the same move again" in err
    monkeypatch.undo()
    package(sb, readme, packpath, mode="move")
    assert not validate_manifest(packpath)


# 3. ticket mode links the file a symlink names


@pytest.mark.parametrize("relative", [True, False])
def test_ticket_mode_links_the_file_a_symlink_names(
    tmp_path: Path, readme: Path, relative: bool
) -> None:
    sb = tiny_sb(tmp_path)
    shared = sb / "shared.png"
    shared.write_bytes(b"shared plot")
    link = sb / "X1" / "qa2" / "qa2_part2.png"
    link.symlink_to(os.path.relpath(shared, link.parent) if relative else shared)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="ticket")
    packaged = packpath / MEMBER / "qa" / f"{UID}__qa2_part2.png"
    assert not packaged.is_symlink() and packaged.read_bytes() == b"shared plot"
    assert packaged.stat().st_ino == shared.stat().st_ino


# 4. the modern layout's uids are all given or none


def test_some_but_not_all_uids_is_an_error_naming_the_missing(
    tmp_path: Path, readme: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    common = ["--origpath", str(sb), "--readme", str(readme), "--packpath", str(packpath)]
    for style in ("legacy", "modern"):
        with pytest.raises(SystemExit) as exited:
            cli.main([*common, "--style", style, "--member-uid", "uid://A001/X1/X2"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "--sg-uid, --group-uid" in err.split("missing")[-1]
    assert not packpath.exists()


# 5. what append='' must not clear


@pytest.mark.parametrize("inside", ["cwd", "cwd-below", "home-below"])
def test_packpath_holding_the_current_or_home_directory_is_refused(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch, inside: str
) -> None:
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy")
    held = packpath if inside == "cwd" else packpath / "work"
    held.mkdir(exist_ok=True)
    (held / "keep.txt").write_text("precious")
    if inside.startswith("cwd"):
        monkeypatch.chdir(held)
    else:
        monkeypatch.setenv("HOME", str(held))
    what = "home" if inside.startswith("home") else "current"
    for dry_run in (True, False):
        with pytest.raises(PackagingError, match=rf"would contain the {what} directory"):
            package(sb, readme, packpath, mode="copy", dry_run=dry_run)
    assert (held / "keep.txt").read_text() == "precious"


# 6. records that survive a power cut, and say so when they are damaged


@pytest.mark.parametrize("record", ["qa-packager-journal.json", "moved-origins.json"])
def test_a_damaged_record_is_an_error_naming_it(
    tmp_path: Path, readme: Path, record: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy")
    damaged = tmp_path / f"{packpath.name}.{record}"
    damaged.write_text("")
    code = cli.main(["--origpath", str(sb), "--readme", str(readme), "--packpath", str(packpath),
                     "--mode", "copy"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and f"{damaged} (" in err and "is damaged" in err
    assert (packpath / MEMBER / "script" / "scriptForImaging.py").exists()


def test_a_move_across_file_systems_syncs_each_copy_before_replacing_its_origin(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = tiny_sb(tmp_path)
    events: list[str] = []
    real_link, real_replace, real_fsync = os.link, os.replace, os.fsync

    def no_link(source: object, destination: object, **kwargs: object) -> None:
        if str(destination).startswith(str(tmp_path / "2011.0.00229.S")):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(source, destination, **kwargs)  # type: ignore[arg-type]

    def replace(source: str, destination: str) -> None:
        events.append(f"replace {Path(source).name} {Path(destination).name}")
        real_replace(source, destination)

    def fsync(fd: int) -> None:
        events.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).name}")
        real_fsync(fd)

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    package(sb, readme, tmp_path / "2011.0.00229.S", mode="move")
    name = "scriptForImaging.py"
    copy_synced = events.index(f"fsync {name}.qa-packager-partial")
    placed = events.index(f"replace {name}.qa-packager-partial {name}")
    directory_synced = events.index("fsync script", placed)
    origin_replaced = events.index(f"replace .{name}.qa-packager-link {name}")
    assert copy_synced < placed < directory_synced < origin_replaced
    journal = events.index("fsync 2011.0.00229.S.qa-packager-journal.json.partial")
    assert events[journal + 1].startswith("replace 2011.0.00229.S.qa-packager-journal.json.partial")
    assert json.loads((tmp_path / "2011.0.00229.S.moved-origins.json").read_text()) == [str(sb)]
    # After a move the manifest holds the only checksums of the moved data: synced too.
    assert any(e.startswith("fsync") and "manifest" in e for e in events), events


# 7, 8, 10. delivery tars of real packages


def modern_package(tmp_path: Path, readme: Path) -> tuple[Path, list[str]]:
    """A modern-layout package of two members (copy mode); the package and the members' uids."""
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    members = ["uid___A001_X1_X2", "uid___A001_X1_X3"]
    for append, member in zip(("", "member"), members, strict=True):
        sb = another_sb(sb, 2) if append else sb
        package(sb, readme, packpath, mode="copy", append=append, style="modern",
                uids=("uid://A001/X1/X0", "uid://A001/X1/X1", member))  # fmt: skip
    return packpath, members


def tar_names(tar: Path) -> list[str]:
    import tarfile

    with tarfile.open(tar) as archive:
        return archive.getnames()


def test_a_modern_package_is_cut_per_member_named_after_its_mous_uid(
    tmp_path: Path, readme: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    from observatory.packaging.tarsplit import main as tarsplit

    packpath, members = modern_package(tmp_path, readme)
    out = tmp_path / "out"
    out.mkdir()
    assert tarsplit([str(packpath), "--max-size", "10K", "--output-dir", str(out)]) == 0
    tars = sorted(out.glob("*.tar"))
    by_member = {
        uid: [t for t in tars if t.name.startswith(f"{packpath.name}_{uid}_")] for uid in members
    }
    assert sum(len(t) for t in by_member.values()) == len(tars) > 2
    union: set[str] = set()
    for uid, own in by_member.items():
        count = len(own)
        assert [t.name for t in own] == [
            f"{packpath.name}_{uid}_{n:03d}_of_{count:03d}.tar" for n in range(1, count + 1)
        ]
        for tar in own:
            names = tar_names(tar)
            assert all(n == packpath.name or n.startswith(f"{packpath.name}/") for n in names)
            assert not [n for n in names if "/member." in n and f"/member.{uid}" not in n]
            digest = hashlib.md5(tar.read_bytes()).hexdigest()
            assert Path(f"{tar}.md5sum").read_text() == f"{digest}  {tar.name}\n"
            union |= set(names)
    on_disk = {packpath.name} | {
        f"{packpath.name}/{p.relative_to(packpath)}" for p in packpath.rglob("*")
    }
    assert union == on_disk
    # -n: one member's uid cuts only its tars; a date names no member of a modern package.
    only = tmp_path / "only"
    only.mkdir()
    assert tarsplit(["-n", members[1], str(packpath), "--output-dir", str(only)]) == 0
    assert [t.name for t in only.glob("*.tar")] == [f"{packpath.name}_{members[1]}_001_of_001.tar"]
    capsys.readouterr()
    assert tarsplit(["-n", "2012-06-20", str(packpath), "--output-dir", str(only)]) == 1
    assert "modern layout" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("append", "group", "member", "refusal"),
    [
        ("member", "X1", "X3", "exists already"),  # the same member again
        ("group", "X9", "X3", "already a member of"),  # the same member in another group
        ("group", "X1", "X4", "append='group' adds a group"),
        ("member", "X9", "X4", "append='member' adds a member to a group of the package"),
    ],
)
def test_a_modern_append_must_say_what_it_does(
    tmp_path: Path, readme: Path, append: str, group: str, member: str, refusal: str
) -> None:
    """A member uid in two groups was accepted, and tarsplit then left one of them out of
    every tar; --append had no effect on where a member went."""
    packpath, _ = modern_package(tmp_path, readme)
    before = files_and_links(packpath)
    with pytest.raises(PackagingError, match=refusal):
        package(another_sb(tiny_sb(tmp_path / "other"), 4), readme, packpath, mode="copy", append=append,
                style="modern", uids=("uid://A001/X1/X0", f"uid://A001/X1/{group}",
                                      f"uid://A001/X1/{member}"))  # fmt: skip
    assert files_and_links(packpath) == before


def test_one_uid_written_in_another_case_or_under_another_science_goal_is_refused(
    tmp_path: Path, readme: Path
) -> None:
    """uid://A001/X1/X1c and .../X1C are one MOUS: the second was packaged as another
    member; and one group was accepted under a second (mistyped) science goal."""
    packpath, _ = modern_package(tmp_path, readme)
    other = another_sb(tiny_sb(tmp_path / "other"), 4)
    package(other, readme, packpath, mode="copy", append="member", style="modern",
            uids=("uid://A001/X1/X0", "uid://A001/X1/X1", "uid://A001/X1/X1c"))  # fmt: skip
    assert (packpath / "science_goal.uid___A001_X1_X0/group.uid___A001_X1_X1/"
            "member.uid___A001_X1_X1c").is_dir()  # fmt: skip
    before = files_and_links(packpath)
    for append, uids, refusal in (
        ("member", ("uid://A001/X1/X0", "uid://A001/X1/X1", "uid://A001/X1/X1C"), "exists already"),
        ("group", ("uid://A001/X1/X2A", "uid://A001/X1/X1", "uid://A001/X1/X9"),
         "already a group of .* belongs to one science goal"),
        ("member", ("uid://A001/X1/X0", "uid___A001_X1/X9", "uid://A001/X1/X9"), "not an ALMA uid"),
    ):  # fmt: skip
        with pytest.raises(PackagingError, match=refusal):
            package(other, readme, packpath, mode="copy", append=append, style="modern", uids=uids)
    assert files_and_links(packpath) == before
    assert qa2.file_safe_uid("uid://A001/X1284/X1EF2") == "uid___A001_X1284_X1ef2"


def test_tarsplit_refuses_a_member_uid_held_twice(
    tmp_path: Path, readme: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Made by hand (or by an older packager): one of the two was left out of every tar."""
    from observatory.packaging.tarsplit import main as tarsplit

    packpath, members = modern_package(tmp_path, readme)
    group = next(packpath.glob("science_goal.*/group.*"))
    shutil.copytree(group, group.with_name("group.uid___A001_X1_X9"))
    capsys.readouterr()
    assert tarsplit([str(packpath), "--output-dir", str(tmp_path)]) == 1
    assert f"holds member {members[0]} twice" in capsys.readouterr().err
    assert not list(tmp_path.glob("*_of_*.tar"))


def test_a_legacy_package_keeps_the_documents_name(
    tmp_path: Path, readme: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from observatory.packaging.tarsplit import main as tarsplit

    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy")
    assert tarsplit([str(packpath)]) == 1
    assert "-n/--name NAME is required" in capsys.readouterr().err
    assert tarsplit(["-n", "2012-06-20", str(packpath)]) == 0
    assert [t.name for t in tmp_path.glob("*_of_*.tar")] == [
        "2011.0.00229.S_2012-06-20_001_of_001.tar"
    ]


@pytest.mark.parametrize(
    "case", ["fake", "ticket", "unlisted", "missing", "file-linked", "linked-directory", "pipe"]
)
def test_tarsplit_refuses_a_package_its_manifest_does_not_cover(
    tmp_path: Path, readme: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    from observatory.packaging.tarsplit import main as tarsplit

    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode=case if case in ("fake", "ticket") else "copy")
    member = packpath / MEMBER
    script = member / "script" / "scriptForImaging.py"
    if case == "unlisted":
        (member / "product").mkdir()
        (member / "product" / "late.fits").write_bytes(b"SIMPLE")
    elif case == "missing":
        script.unlink()
    elif case == "file-linked":  # the tar would hold a link to a file it does not deliver
        script.rename(tmp_path / "elsewhere.py")
        script.symlink_to(tmp_path / "elsewhere.py")
    elif case == "linked-directory":
        (member / "etc").symlink_to("/etc")
    elif case == "pipe":
        os.mkfifo(member / "script" / "pipe")
    before = sorted(tmp_path.iterdir())
    for dry_run in ([], ["--dry-run"]):
        assert tarsplit(["-n", "2012-06-20", str(packpath), *dry_run]) == 1
        err = capsys.readouterr().err
        expected = {"fake": "has no manifest", "ticket": "has no manifest",
                    "unlisted": "not in the manifest: 2011.0.00229.S/sg_ouss_id/",
                    "missing": "missing: 2011.0.00229.S/",
                    "file-linked": f"not a file: 2011.0.00229.S/{MEMBER}/script/scriptForImaging.py (a symbolic link)",
                    "linked-directory": f"not a file: 2011.0.00229.S/{MEMBER}/etc (a symbolic link)",
                    "pipe": f"not a file: 2011.0.00229.S/{MEMBER}/script/pipe (a named pipe)"}[case]  # fmt: skip
        assert expected in err
    assert sorted(tmp_path.iterdir()) == before
    if case.startswith(("file", "linked", "pipe")):  # what verify says, tarsplit's advice
        problems = validate_manifest(packpath)
        assert [p for p in problems if p.startswith(expected.removesuffix(")"))] == problems


@pytest.mark.parametrize("owner", ["dead-pid", "other-host", "live-pid"])
def test_tarsplit_removes_the_leftovers_of_a_killed_run_whatever_its_host_or_pid(
    tmp_path: Path, readme: Path, owner: str
) -> None:
    """A run killed while renaming its pieces, on this host (its PID gone), on another host
    of a shared file system, or in a container (its PID now a live process's): its hidden
    pieces and placing record were taken for a live run's, and every later run refused
    ("already holds tars") for ever. The run holding the set's lock knows they are dead."""
    import socket
    import subprocess
    import sys

    from observatory.packaging.tarsplit import main as tarsplit

    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    host, pid = {
        "dead-pid": (socket.gethostname(), dead),
        "other-host": ("node-a.cluster", str(os.getpid())),  # alive here: not the point
        "live-pid": (socket.gethostname(), str(os.getppid())),  # a PID reused
    }[owner]
    mark = f"{host}-{pid}-0a1b2c3d"
    stem = ".2011.0.00229.S_2012-06-20_2.tar.partial"
    placed = ["2011.0.00229.S_2012-06-20_001_of_002.tar",
              "2011.0.00229.S_2012-06-20_001_of_002.tar.md5sum"]  # fmt: skip
    left = [
        tmp_path / f"{stem}-{mark}",
        tmp_path / f"{stem}-{mark}.md5sum",
        *(tmp_path / name for name in placed),
    ]
    for path in left:
        path.write_bytes(b"half a tar")
    record = tmp_path / f".2011.0.00229.S_2012-06-20.tars.placing-{mark}"
    record.write_text(json.dumps(placed))
    other_set = tmp_path / f".2011.0.00229.S_2012-06-21_1.tar.partial-{mark}"  # not this set
    other_set.write_bytes(b"another set's")
    assert tarsplit(["-n", "2012-06-20", str(packpath), "--dry-run"]) == 0
    assert tarsplit(["-n", "2012-06-20", str(packpath)]) == 0
    assert not any(p.exists() for p in (*left, record)) and other_set.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "2012-06-20" in p.name) == [
        "2011.0.00229.S_2012-06-20_001_of_001.tar",
        "2011.0.00229.S_2012-06-20_001_of_001.tar.md5sum",
    ]


def test_a_tarsplit_killed_while_renaming_its_pieces_is_undone_by_the_next_run(
    tmp_path: Path, readme: Path
) -> None:
    """Killed after renaming some pieces into place: they stayed under final names, and every
    later run refused the directory ("already holds tars ...")."""
    import subprocess
    import sys

    from observatory.packaging.tarsplit import main as tarsplit

    sb = tiny_sb(tmp_path)
    for index in range(4):
        (sb / f"image{index}.fits").write_bytes(os.urandom(30_000))
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="copy")
    out = tmp_path / "out"
    out.mkdir()
    killed_after_renames = (
        "import os, sys\n"
        "from observatory.packaging import tarsplit\n"
        "real, calls = os.replace, []\n"
        "def replace(source, target):\n"
        "    real(source, target)\n"
        "    calls.append(target)\n"
        "    if len(calls) == 3:\n"
        "        os._exit(9)  # as SIGKILL: nothing of the run cleans up\n"
        "tarsplit.os.replace = replace\n"
        f"sys.exit(tarsplit.main(['-n', 'd', {str(packpath)!r}, '--max-size', '40K', "
        f"'--output-dir', {str(out)!r}]))\n"
    )
    killed = subprocess.run([sys.executable, "-c", killed_after_renames], capture_output=True)
    assert killed.returncode == 9, killed.stderr
    assert list(out.glob("*_of_*.tar*"))  # part of the set under final names
    assert tarsplit(["-n", "d", str(packpath), "--max-size", "40K", "--output-dir", str(out),
                     "--dry-run"]) == 0  # fmt: skip
    assert tarsplit(["-n", "d", str(packpath), "--max-size", "40K", "--output-dir", str(out)]) == 0
    tars = sorted(out.glob("*_of_*.tar"))
    count = len(tars)
    assert count > 2 and [t.name for t in tars] == [
        f"2011.0.00229.S_d_{n:03d}_of_{count:03d}.tar" for n in range(1, count + 1)
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [t.name for t in tars] + [f"{t.name}.md5sum" for t in tars]
    )


# 12. verify and tarsplit of ".", "/" as packpath, a run in progress


def test_verify_of_the_current_directory_and_a_run_in_progress(
    tmp_path: Path,
    readme: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="move")
    monkeypatch.chdir(packpath)
    assert cli.main(["verify", "."]) == 0
    monkeypatch.chdir(tmp_path)
    with qa2._lock(packpath):  # a move under way: its journal is there, not committed
        qa2.Journal(path=qa2._journal_path(packpath), origpath=str(sb), member=str(MEMBER),
                    mode="move", made=None, existed=[], cleared=False).save()  # fmt: skip
        capsys.readouterr()
        assert cli.main(["verify", str(packpath)]) == 1
        err = capsys.readouterr().err
        assert "is writing" in err and "did not finish" not in err
        qa2._journal_path(packpath).unlink()
    with pytest.raises(PackagingError, match=r"named after the project code .*not '/'"):
        package(sb, readme, "/", mode="copy", dry_run=True)


def test_no_run_starts_on_a_package_while_tarsplit_or_verify_reads_it(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tarsplit looked at the lock once, at its start: a run appending a member meanwhile
    put part of its files into "successful" tars, which verify then found valid."""
    from observatory.packaging import tarsplit

    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(another_sb(sb, 2), readme, packpath, mode="copy")  # another SB first
    refusals: list[str] = []
    copy_data = tarsplit._copy_data

    def copy_while_a_run_tries_to_start(*args: Any, **kwargs: Any) -> None:
        try:
            package(sb, readme, packpath, append="member", mode="copy")
        except PackagingError as exc:
            refusals.append(str(exc))
        copy_data(*args, **kwargs)

    monkeypatch.setattr(tarsplit, "_copy_data", copy_while_a_run_tries_to_start)
    out = tmp_path / "tars"
    out.mkdir()
    tars = tarsplit.write_pieces(packpath, "2012-06-20", out, 1 << 30, workers=1)
    assert tars and refusals and all("or reading it (tarsplit, verify)" in r for r in refusals)
    assert not (packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id2").exists()
    with qa2.reading_package(packpath), qa2.reading_package(packpath):  # readers share it
        assert not validate_manifest(packpath)
        with pytest.raises(PackagingError, match="or reading it"):
            package(sb, readme, packpath, append="member", mode="copy")
    # The last reader removed the lock file; a run starts once the reading is done.
    assert not qa2._lock_path(packpath).exists()
    package(sb, readme, packpath, append="member", mode="copy")
    assert (packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id2").is_dir()


# 9. an undone run leaves nothing set aside


def test_an_undone_run_leaves_no_set_aside_files(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(another_sb(sb, 2), readme, packpath, mode="copy")  # another SB first
    beside = {p.name: p.read_bytes() for p in tmp_path.glob("2011.0.00229.S.*")}

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qa2, "write_tickets", full)
    with pytest.raises(OSError, match="No space"):
        package(sb, readme, packpath, mode="copy", append="member")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("2011.0.00229.S.*")} == beside
    assert not list(tmp_path.glob(".*qa-packager-previous"))


# 11. two execution blocks in one directory


def test_two_execution_blocks_in_one_directory_are_named(tmp_path: Path, readme: Path) -> None:
    sb = tiny_sb(tmp_path)
    other = "uid___A002_X2_X2"
    (sb / "X1" / f"{other}.ms.split").mkdir()
    (sb / "X1" / f"{other}.ms.scriptForCalibration.py").write_text("# calibration\n")
    with pytest.raises(
        PackagingError, match=rf"X1 holds the files of 2 execution blocks \({UID}, {other}\)"
    ):
        package(sb, readme, tmp_path / "2011.0.00229.S", dry_run=True)


@pytest.mark.parametrize("cross_device", [False, True])
def test_a_move_that_cannot_finish_is_undone_by_undo_move(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch, cross_device: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    sb = tiny_sb(tmp_path)
    before = files_and_links(sb)
    packpath = tmp_path / "2011.0.00229.S"
    real_move = qa2.move_with_symlink
    calls = []

    def failing(source: Path, destination: Path) -> None:
        calls.append(source)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error", str(source))
        real_move(source, destination)

    def no_link(source: object, destination: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(qa2, "move_with_symlink", failing)
    if cross_device:
        monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(OSError, match="Input/output"):
        package(sb, readme, packpath, mode="move")
    assert sum(p.is_symlink() for p in sb.rglob("*")) == 2
    assert cli.main(["undo-move", str(packpath)]) == 0
    assert "put back 2 moved files" in capsys.readouterr().out
    monkeypatch.undo()
    assert files_and_links(sb) == before
    assert (
        not packpath.exists()
        and not (tmp_path / f"{packpath.name}.qa-packager-journal.json").exists()
    )
    assert cli.main(["undo-move", str(packpath)]) == 1  # nothing left to undo
    assert "no unfinished move" in capsys.readouterr().err
    package(sb, readme, packpath, mode="copy")  # the package takes other runs again
    assert not validate_manifest(packpath)


def fail_a_move(
    sb: Path, readme: Path, packpath: Path, monkeypatch: pytest.MonkeyPatch, *, append: str = ""
) -> None:
    """A move of ``sb`` into ``packpath`` that stops at its third file (2 files moved)."""
    real_move = qa2.move_with_symlink
    calls = []

    def failing(source: Path, destination: Path) -> None:
        calls.append(source)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error", str(source))
        real_move(source, destination)

    with monkeypatch.context() as patched:
        patched.setattr(qa2, "move_with_symlink", failing)
        with pytest.raises(OSError, match="Input/output"):
            package(sb, readme, packpath, mode="move", append=append)


def test_undo_move_refuses_when_the_reduction_was_renamed(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    sb = tiny_sb(tmp_path)
    before = files_and_links(sb)
    packpath = tmp_path / "2011.0.00229.S"
    fail_a_move(sb, readme, packpath, monkeypatch)
    packaged = files_and_links(packpath)
    renamed = sb.with_name("SB-renamed")
    sb.rename(renamed)
    origin_links = files_and_links(renamed)
    with pytest.raises(PackagingError, match=r"SB, the reduction .* no longer exists .*only copy"):
        qa2.undo_move(packpath)
    assert cli.main(["undo-move", str(packpath)]) == 1
    assert "only copy" in capsys.readouterr().err
    assert files_and_links(packpath) == packaged and files_and_links(renamed) == origin_links
    assert qa2._journal_path(packpath).exists()
    renamed.rename(sb)  # put back under its name, the move is undone
    assert "put back 2 moved files" in qa2.undo_move(packpath)
    assert files_and_links(sb) == before and not packpath.exists()


@pytest.mark.parametrize("change", ["deleted", "replaced-by-a-file", "replaced-by-a-link"])
def test_undo_move_refuses_when_an_origin_symlink_is_not_the_moved_file(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    sb = tiny_sb(tmp_path)
    before = files_and_links(sb)
    packpath = tmp_path / "2011.0.00229.S"
    fail_a_move(sb, readme, packpath, monkeypatch)
    link = next(p for p in sorted(sb.rglob("*")) if p.is_symlink())
    moved = Path(os.path.realpath(link))
    link.unlink()
    if change == "replaced-by-a-file":
        link.write_bytes(b"edited")
    elif change == "replaced-by-a-link":
        (tmp_path / "elsewhere").write_bytes(b"other")
        link.symlink_to(tmp_path / "elsewhere")
    packaged = files_and_links(packpath)
    origin = files_and_links(sb)
    named = str(link) if change == "replaced-by-a-file" else str(moved)
    with pytest.raises(PackagingError, match=r"holds the only copy of .*") as refused:
        qa2.undo_move(packpath)
    assert named in str(refused.value) and "nothing was changed" in str(refused.value)
    if change == "replaced-by-a-file":  # the package's file, and the origin that differs
        assert f"{moved} (its origin {link} has other bytes now" in str(refused.value)
    assert files_and_links(packpath) == packaged and files_and_links(sb) == origin
    assert moved.exists() and qa2._journal_path(packpath).exists()
    link.unlink(missing_ok=True)
    link.symlink_to(moved)  # the symlink put back, the move is undone
    qa2.undo_move(packpath)
    assert files_and_links(sb) == before and not packpath.exists()


def test_undo_move_interrupted_across_file_systems_is_finished_by_running_it_again(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first undo puts one file back as a copy (an inode of its own), then stops: the
    second recognises that copy by its bytes, puts back the other and removes the package."""
    sb = tiny_sb(tmp_path)
    before = files_and_links(sb)
    packpath = tmp_path / "2011.0.00229.S"

    def no_link(source: object, destination: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    fail_a_move(sb, readme, packpath, monkeypatch)
    real_put_back = qa2._put_back
    calls = []

    def interrupted(moved: Path, link: Path) -> None:
        calls.append(link)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_put_back(moved, link)

    with monkeypatch.context() as patched:
        patched.setattr(qa2, "_put_back", interrupted)
        with pytest.raises(KeyboardInterrupt):
            qa2.undo_move(packpath)
    assert sum(p.is_symlink() for p in sb.rglob("*")) == 1
    assert "put back 1 moved files" in qa2.undo_move(packpath)
    assert files_and_links(sb) == before and not packpath.exists()


def test_an_undone_move_is_taken_off_the_moved_origins_record(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    record = tmp_path / f"{packpath.name}.moved-origins.json"
    package(another_sb(sb, 2), readme, packpath, mode="copy")  # another SB first
    fail_a_move(sb, readme, packpath, monkeypatch, append="member")
    assert json.loads(record.read_text()) == [str(sb)]
    qa2.undo_move(packpath)
    assert not record.exists() and not (packpath / MEMBER.with_name("member_ouss_id2")).exists()
    sb.rename(sb.with_name("SB-renamed"))  # no longer refuses clearing the package
    package(sb.with_name("SB-renamed"), readme, packpath, mode="copy")
    assert not validate_manifest(packpath)


def test_undo_move_keeps_on_the_record_an_origin_still_linked_into_the_package(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    record = tmp_path / f"{packpath.name}.moved-origins.json"
    first = another_sb(tiny_sb(tmp_path / "first"), 2)
    package(first, readme, packpath, mode="move")  # another reduction, moved in whole
    fail_a_move(sb, readme, packpath, monkeypatch, append="member")
    # A file of sb an earlier run moved into the first member (it links there still).
    kept = packpath / MEMBER / "qa" / "earlier_qa2.txt"
    kept.write_text("qa2")
    (sb / "earlier_qa2.txt").symlink_to(kept)
    qa2.undo_move(packpath)
    assert json.loads(record.read_text()) == [str(first), str(sb)]
    (sb / "earlier_qa2.txt").unlink()
    fail_a_move(sb, readme, packpath, monkeypatch, append="member")
    qa2.undo_move(packpath)
    assert json.loads(record.read_text()) == [str(first)]


def test_undo_move_interrupted_before_a_put_back_link_is_in_place_is_finished_again(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hard link left under the temporary name (``.<name>.qa-packager-link``) is not taken
    for the moved file's origin: the symlink beside it is, and is put back."""
    sb = tiny_sb(tmp_path)
    before = files_and_links(sb)
    packpath = tmp_path / "2011.0.00229.S"
    fail_a_move(sb, readme, packpath, monkeypatch)
    real_replace = os.replace

    def killed(source: str, destination: str) -> None:
        if str(source).endswith(qa2.TEMPORARY_SUFFIXES[0]):
            raise KeyboardInterrupt
        real_replace(source, destination)

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            qa2.undo_move(packpath)
    assert len(list(sb.rglob(f"*{qa2.TEMPORARY_SUFFIXES[0]}"))) == 1
    assert "put back 2 moved files" in qa2.undo_move(packpath)
    assert files_and_links(sb) == before and not packpath.exists()


# Another user's files (fs.protected_hardlinks)

NOBODY = 65534


def _as_nobody(*arguments: str, cwd: Path = Path("/")) -> subprocess.CompletedProcess[str]:
    """``qa-packager`` run as the user nobody (without root's right to link any file), in
    ``cwd`` (the tests' own directories are root's alone)."""
    code = "import sys; from observatory.packaging.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", code, *arguments],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )  # fmt: skip


@pytest.fixture
def shared_reduction() -> Iterator[Path]:
    """A reduction owned by root (files readable, not writable, by others) in a directory
    everyone may write in: a team's shared reduction as another member sees it."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    if _as_nobody("--help").returncode != 0:
        pytest.skip("this Python cannot be run as the user nobody")
    if Path("/proc/sys/fs/protected_hardlinks").read_text().strip() != "1":
        pytest.skip("fs.protected_hardlinks is off: any user may link any file")
    root = Path(tempfile.mkdtemp(prefix="qa2-shared-", dir="/tmp"))
    try:
        tiny_sb(root)
        (root / "README.header.txt").write_text("ALMA Cycle 0 data package\n")
        for directory, _, names in os.walk(root):
            os.chmod(directory, 0o777)
            for name in names:
                os.chmod(os.path.join(directory, name), 0o644)
        yield root
    finally:
        shutil.rmtree(root)


def test_hard_mode_refuses_another_users_files_before_writing(shared_reduction: Path) -> None:
    sb, packpath = shared_reduction / "project" / "SB", shared_reduction / "2011.0.00229.S"
    run = _as_nobody("--origpath", str(sb), "--readme", str(shared_reduction / "README.header.txt"),
                     "--packpath", str(packpath), "--mode", "hard", cwd=shared_reduction)  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "belong to another user" in run.stderr and "fs.protected_hardlinks" in run.stderr
    assert "use copy mode" in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in shared_reduction.iterdir()) == ["README.header.txt", "project"]


def test_move_mode_copies_another_users_files_it_may_not_link(shared_reduction: Path) -> None:
    sb, packpath = shared_reduction / "project" / "SB", shared_reduction / "2011.0.00229.S"
    before = files_and_links(sb)
    run = _as_nobody("--origpath", str(sb), "--readme", str(shared_reduction / "README.header.txt"),
                     "--packpath", str(packpath), "--mode", "move", cwd=shared_reduction)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert not validate_manifest(packpath)
    for path, content in before.items():
        assert Path(path).is_symlink() and Path(path).read_bytes().hex() == content, path


def test_clearing_passes_links_this_user_may_not_resolve(shared_reduction: Path) -> None:
    """Looking for links into the package, clearing follows symlinked directories: one to
    where links cannot be read (/proc/1/cwd, as a user) failed every clearing run."""
    sb, packpath = shared_reduction / "project" / "SB", shared_reduction / "2011.0.00229.S"
    arguments = ("--origpath", str(sb), "--readme", str(shared_reduction / "README.header.txt"),
                 "--packpath", str(packpath), "--mode", "copy")  # fmt: skip
    assert _as_nobody(*arguments, cwd=shared_reduction).returncode == 0
    (sb / "X1" / "init").symlink_to("/proc/1")
    again = _as_nobody(*arguments, cwd=shared_reduction)
    assert again.returncode == 0, again.stderr
    assert not validate_manifest(packpath)


# Ctrl-C


@pytest.mark.parametrize("mode", ["copy", "move"])
def test_ctrl_c_says_what_the_run_left_and_exits_130(
    tmp_path: Path,
    readme: Path,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    if mode == "copy":
        monkeypatch.setattr(
            qa2, "copy_and_hash", _failing_after(1, qa2.copy_and_hash, KeyboardInterrupt())
        )
    else:
        monkeypatch.setattr(
            qa2, "move_with_symlink", _failing_after(1, qa2.move_with_symlink, KeyboardInterrupt())
        )
    arguments = ["--origpath", str(sb), "--readme", str(readme), "--packpath", str(packpath)]
    assert cli.main([*arguments, "--mode", mode]) == 130
    err = capsys.readouterr().err
    assert err.startswith("qa-packager: interrupted\n") and "Traceback" not in err
    if mode == "copy":
        assert f"the run was undone: {packpath} is as it was before it" in err
        assert not packpath.exists()
    else:
        assert "stopped part-way; nothing is lost" in err and "undo-move" in err
        monkeypatch.undo()
        assert cli.main([*arguments, "--mode", mode]) == 0  # the same move finishes it
        assert not validate_manifest(packpath)


def test_undo_move_of_the_current_directory(
    tmp_path: Path,
    readme: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``verify .`` inside an unfinished package says to run ``undo-move``: it must work there."""
    sb = tiny_sb(tmp_path)
    before = files_and_links(sb)
    packpath = tmp_path / "2011.0.00229.S"
    monkeypatch.setattr(
        qa2, "move_with_symlink", _failing_after(1, qa2.move_with_symlink, KeyboardInterrupt())
    )
    arguments = ["--origpath", str(sb), "--readme", str(readme), "--packpath", str(packpath)]
    assert cli.main([*arguments, "--mode", "move"]) == 130
    monkeypatch.chdir(packpath)
    assert cli.main(["verify", "."]) == 1
    assert "undo-move" in capsys.readouterr().err
    assert cli.main(["undo-move", "."]) == 0, capsys.readouterr().err
    assert files_and_links(sb) == before


# 12. the journal's record of what a run made


def _killed_run(monkeypatch: pytest.MonkeyPatch, sb: Path, readme: Path, packpath: Path) -> None:
    """A copy run into ``packpath`` killed part-way: nothing undone, its journal left."""

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(qa2, "write_tickets", killed)  # after the files are copied
        patch.setattr(qa2, "_undo", lambda *args: "")  # SIGKILL: no undo runs
        with pytest.raises(KeyboardInterrupt):
            package(sb, readme, packpath, mode="copy")


def test_undoing_a_killed_run_from_another_directory_removes_only_what_it_made(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run given a relative packpath recorded the directory it made as typed; the next
    run, started elsewhere, removed the same-named directory where it started."""
    sb = tiny_sb(tmp_path)
    first, elsewhere = tmp_path / "c", tmp_path / "d"
    first.mkdir()
    (elsewhere / "2011.0.00229.S").mkdir(parents=True)
    (elsewhere / "2011.0.00229.S" / "delivered-data.txt").write_text("the only copy\n")
    monkeypatch.chdir(first)
    _killed_run(monkeypatch, sb, readme, Path("2011.0.00229.S"))
    assert (first / "2011.0.00229.S").is_dir()
    monkeypatch.chdir(elsewhere)
    plan = package(sb, readme, first / "2011.0.00229.S", mode="fake")
    assert any("undid an unfinished copy run" in line for line in plan.undone)
    assert (elsewhere / "2011.0.00229.S" / "delivered-data.txt").read_text() == "the only copy\n"
    assert (first / "2011.0.00229.S" / MEMBER).is_dir()  # made anew by the fake run


def test_a_dry_run_after_a_killed_run_plans_as_the_run_will(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a killed run that cleared the package, the dry run read the half-written new
    package: it planned another member number than the run then took."""
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(another_sb(sb, 2), readme, packpath, mode="copy")  # another SB first
    package(another_sb(sb, 3), readme, packpath, append="member", mode="copy")  # member 2
    _killed_run(monkeypatch, sb, readme, packpath)  # append '': the package set aside
    dry = package(sb, readme, packpath, append="member", mode="copy", dry_run=True)
    real = package(sb, readme, packpath, append="member", mode="copy")
    assert dry.member == real.member == MEMBER.with_name("member_ouss_id3")


def test_a_dry_run_after_a_killed_run_lists_the_ticket_writes_the_run_makes(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a killed run that wrote real ticket files, the dry run took them for the ones
    its undo puts back (0-byte ones): it listed no ticket writes; the run wrote both."""
    sb = tiny_sb(tmp_path)
    fake_pack = tmp_path / "fake" / "2011.0.00229.S"
    package(another_sb(sb, 2), readme, fake_pack, mode="fake")  # 0-byte ticket files

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # a ticket run killed after writing real tickets
        patch.setattr(qa2, "_commit", killed)
        with pytest.raises(KeyboardInterrupt):
            package(sb, readme, fake_pack, append="member", mode="ticket")
    assert all(path.stat().st_size for path in qa2._ticket_paths(fake_pack))
    dry = package(sb, readme, fake_pack, append="member", mode="fake", dry_run=True)
    writes = {a.destination_text for a in dry.actions if a.kind == "write"}
    assert {str(path) for path in qa2._ticket_paths(fake_pack)} <= writes
    real = package(sb, readme, fake_pack, append="member", mode="fake")
    assert [a for a in real.actions if a.kind == "write"] == [
        a for a in dry.actions if a.kind == "write"
    ]


def test_a_journal_naming_a_directory_outside_the_package_removes_nothing(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    _killed_run(monkeypatch, sb, readme, packpath)
    outside = tmp_path / "other"
    (outside / "keep.txt").parent.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    journal = qa2.Journal.of(packpath)
    assert journal is not None and journal.made == str(packpath)
    journal.made = str(outside)
    journal.save()
    with pytest.raises(PackagingError, match="not in the package"):
        package(sb, readme, packpath, mode="fake")
    assert (outside / "keep.txt").read_text() == "keep\n"


def test_names_holding_other_line_separators_keep_the_manifest_readable(
    tmp_path: Path, readme: Path
) -> None:
    """Form feed, NEL and U+2028 are not line breaks in a file name, but the manifest was
    read with splitlines(): the package verified, split and appended to never again."""
    sb = tiny_sb(tmp_path)
    names = ["p\x0cq_qa2_part1.png", "a\x85b_qa2_part1.png", "c\u2028d_qa2_part1.png"]
    for name in names:
        (sb / "X1" / "qa2" / name).write_bytes(b"png")
    packpath = tmp_path / "2011.0.00229.S"
    package(another_sb(sb, 2), readme, packpath, mode="copy")  # another SB first
    assert not validate_manifest(packpath)
    plan = package(sb, readme, packpath, mode="copy", append="member")
    assert plan.member.name == "member_ouss_id2"
    assert not validate_manifest(packpath)
    listed = read_manifest(manifest_path(packpath))
    assert sum(any(name in path for name in names) for path in listed) == 2 * len(names)


@pytest.mark.parametrize(
    ("checklist", "packaged_as"),
    [
        ("checklist.txt", "Calibration_X1.checklist.txt"),
        ("X1.checklist.txt", "X1.checklist.txt"),
        (f"{UID}.Checklist", f"{UID}.Checklist"),
    ],
)
def test_a_checklist_named_uniquely_keeps_its_name(
    tmp_path: Path, readme: Path, checklist: str, packaged_as: str
) -> None:
    """ "'X8c.checklist.txt' will not be renamed" (the source document); it was renamed
    after an execution block's directory called Calibration_X8c."""
    sb = tiny_sb(tmp_path)
    eb = sb / "Calibration_X1"
    (sb / "X1").rename(eb)
    (eb / checklist).write_text("checked\n")
    packpath = tmp_path / "2011.0.00229.S"
    plan = package(sb, readme, packpath, mode="copy")
    assert (packpath / plan.member / "qa" / packaged_as).read_text() == "checked\n"


# 13. a run that finished survives a power cut: what it wrote is on disk before its commit


def trace_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Record ``os.fsync`` (the real path synced, the thread) and ``os.replace`` (source,
    destination) calls, in order."""
    import threading

    events: list[tuple[str, str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", path, threading.current_thread().name))
        real_fsync(fd)

    def replace(source: str | Path, destination: str | Path, **kwargs: Any) -> None:
        events.append(("replace", os.path.realpath(source), os.path.realpath(destination)))
        real_replace(source, destination, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def commit_index(events: list[tuple[str, str, str]], packpath: Path) -> int:
    """Where the run's journal was last synced: its commit."""
    journal = os.path.realpath(qa2._journal_path(packpath)) + ".partial"
    return max(i for i, (call, path, _) in enumerate(events) if call == "fsync" and path == journal)


def synced_at(events: list[tuple[str, str, str]], path: Path | str) -> list[int]:
    real = os.path.realpath(path)
    return [i for i, (call, synced, _) in enumerate(events) if call == "fsync" and synced == real]


@pytest.mark.parametrize("append", ["", "member"])
def test_copies_and_the_package_directories_are_on_disk_before_the_commit(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch, append: str
) -> None:
    """No package file was synced in copy mode, yet an append synced the manifest and the
    journal committed the run: after a power cut the package looked complete and held a
    truncated file. Each copy is synced by the thread that made it, then the directories
    holding the new names, before the manifest is written and the run committed."""
    import threading

    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    if append:
        package(another_sb(sb, 2), readme, packpath, mode="copy")  # another SB first
    events = trace_syncs(monkeypatch)
    plan = package(sb, readme, packpath, mode="copy", append=append)
    member = packpath / plan.member
    copies = [member / action.destination_text for action in plan.actions if action.kind == "copy"]
    assert len(copies) >= 4
    manifest = os.path.realpath(manifest_path(packpath))
    manifest_written = next(
        i for i, (call, _, target) in enumerate(events) if call == "replace" and target == manifest
    )
    commit = commit_index(events, packpath)
    last_copy_synced = 0
    for copy in copies:
        synced = synced_at(events, copy)
        assert synced and synced[0] < manifest_written, copy
        assert events[synced[0]][2] != threading.main_thread().name  # overlapping the copies
        last_copy_synced = max(last_copy_synced, synced[0])
    directories = [Path(d) for d, _, _ in os.walk(member)]
    directories += [*member.parents[: len(plan.member.parts)], packpath.parent]
    for directory in directories:  # the new names, once all are made
        assert any(last_copy_synced < i < commit for i in synced_at(events, directory)), directory


@pytest.mark.parametrize("mode", ["fake", "copy", "hard", "move", "ticket"])
def test_the_readme_and_ticket_files_are_on_disk_before_the_commit(
    tmp_path: Path, readme: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The README and ticket files were written unsynced before the commit, and no later
    run rewrites them (after a move the reduction is links): a power cut after the run
    left them empty. Each is synced, renamed into place and its directory synced first."""
    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    events = trace_syncs(monkeypatch)
    plan = package(sb, readme, packpath, mode=mode)
    commit = commit_index(events, packpath)
    written = [packpath / plan.member / "README", *qa2._ticket_paths(packpath)]
    for path in written:
        partial = os.path.realpath(path.with_name(path.name + ".partial"))
        placed = events.index(("replace", partial, os.path.realpath(path)))
        assert any(i < placed for i in synced_at(events, partial)), path
        assert any(placed < i < commit for i in synced_at(events, path.parent)), path


def test_tarsplit_refuses_a_package_whose_files_are_not_the_size_packaged(
    tmp_path: Path, readme: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file of an appended member a power cut left short (its data never reached the
    disk), under a manifest that was synced: tarsplit delivered it with md5s of the short
    file. The bag-info's Payload-Oxum (BagIt's total bytes and file count) is checked
    against the sizes, without hashing again."""
    from observatory.packaging.manifest import bag_info_path
    from observatory.packaging.tarsplit import main as tarsplit

    sb = tiny_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    package(another_sb(sb, 2), readme, packpath, mode="copy")  # another SB first
    plan = package(sb, readme, packpath, mode="copy", append="member")
    files = [p for p in packpath.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert bag_info_path(packpath).read_text() == f"Payload-Oxum: {total}.{len(files)}\n"
    short = packpath / plan.member / "raw" / f"{UID}.ms.split" / "table.f0"
    with open(short, "r+b") as file:
        file.truncate(4)
    before = sorted(tmp_path.iterdir())
    for dry_run in ([], ["--dry-run"]):
        assert tarsplit(["-n", "2012-06-20", str(packpath), *dry_run]) == 1
        err = capsys.readouterr().err
        assert f"says {total} bytes in {len(files)} files (Payload-Oxum" in err, err
        assert f"add up to {total - len('visibilities') + 4} bytes in {len(files)} files" in err
    assert sorted(tmp_path.iterdir()) == before
    assert any(p.startswith(f"changed: 2011.0.00229.S/{plan.member}/raw/") for p in
               validate_manifest(packpath))  # fmt: skip


@pytest.mark.parametrize("workers", ["0", "-3"])
def test_verify_refuses_workers_below_one(
    tmp_path: Path, readme: Path, workers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--workers 0`` and ``-3`` were accepted silently."""
    packpath = tmp_path / "2011.0.00229.S"
    package(tiny_sb(tmp_path), readme, packpath, mode="copy")
    with pytest.raises(SystemExit) as exited:
        cli.main(["verify", str(packpath), "--workers", workers])
    assert exited.value.code == 2
    assert f"--workers must be 1 or more (hashing threads), not {workers}" in (
        capsys.readouterr().err
    )
    assert cli.main(["verify", str(packpath), "--workers", "1"]) == 0


def test_verify_of_no_package_directory_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``verify nope`` reported "1 problem ... nope.manifest-sha256.txt does not exist"."""
    (tmp_path / "afile").write_text("x")
    for name, what in (("nope", "does not exist"), ("afile", "is not a directory")):
        assert cli.main(["verify", str(tmp_path / name)]) == 1
        captured = capsys.readouterr()
        assert captured.err == (
            f"qa-packager verify: no package directory {tmp_path / name}: it {what}\n"
        )
        assert "manifest" not in captured.out + captured.err


@pytest.mark.parametrize("with_script", [False, True])
def test_sets_named_as_the_documents_prose_spells_them_get_a_hint(
    tmp_path: Path, readme: Path, with_script: bool
) -> None:
    """``uid___xxx.split`` (the prose's spelling) was refused with no hint of what was found;
    the document's example trees name them ``<uid>.ms.split``."""
    sb = tiny_sb(tmp_path)
    eb = sb / "X1"
    (eb / f"{UID}.ms.split").rename(eb / f"{UID}.split")
    (eb / f"{UID}.split.cal").mkdir()
    if not with_script:
        (eb / f"{UID}.ms.scriptForCalibration.py").unlink()
        match = rf"found X1/{UID}\.split, X1/{UID}\.split\.cal \(name them <uid>\.ms\.split"
    else:
        match = rf"missing: {UID}\.ms\.split \(found {UID}\.split: name it {UID}\.ms\.split"
    with pytest.raises(PackagingError, match=match):
        package(sb, readme, tmp_path / "2011.0.00229.S")
