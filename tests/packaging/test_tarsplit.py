"""tarsplit: a delivery package becomes size-bounded tars that each extract alone."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from observatory.packaging import tarsplit
from observatory.packaging.manifest import write_manifest
from observatory.packaging.tarsplit import main, parse_size, plan_pieces, write_pieces

PROJECT = "2011.0.00229.S"
NAME = "2012-06-20"
MAX = "64K"
MAX_BYTES = 64 * 1024
BIG_FILE = "sg_ouss_id/group_ouss_id/member_ouss_id/product/cube.fits"  # larger than MAX
LONG_NAME = "calibrated_all_setup3_b6_" + "continuum_subtracted_" * 4 + "clean.image.pbcor.fits"
TAR_NAME = re.compile(rf"^{re.escape(PROJECT)}_{NAME}_(\d{{3}})_of_(\d{{3}})\.tar$")
WROTE = re.compile(r"^(\S+)  (\d+) members  (\d+) bytes")


def build_package(root: Path) -> Path:
    """A small legacy-layout package: MS-like directories, a long name, a hard link."""
    rng = random.Random(229)
    package = root / PROJECT
    member = package / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id"
    member.mkdir(parents=True)
    (member / "README").write_text("ALMA Cycle 0 delivery of 2011.0.00229.S\n")
    for section, suffix in (("raw", ".ms.split"), ("calibrated", ".ms.split.cal")):
        for uid in ("uid___A002_X3c9295_X8c", "uid___A002_X3dc0e7_X528"):
            ms = member / section / f"{uid}{suffix}"
            (ms / "ANTENNA").mkdir(parents=True)
            for table, size in (("table.dat", 700), ("table.f0", 30000), ("table.f1", 9000),
                                ("table.info", 0), ("table.lock", 325)):  # fmt: skip
                (ms / table).write_bytes(rng.randbytes(size + rng.randrange(512)))
            (ms / "ANTENNA" / "table.dat").write_bytes(rng.randbytes(1500))
            (ms / "ANTENNA" / "table.f0").write_bytes(rng.randbytes(20000))
    (member / "calibration" / "X8c.calibration.plots").mkdir(parents=True)  # stays empty
    (member / "script").mkdir()
    (member / "qa").mkdir()
    (member / "qa" / "X8c__qa2_part1.png").write_bytes(rng.randbytes(12345))
    (member / "log").mkdir()
    (member / "log" / "ipython.log").write_text("casa log\n" * 300)
    product = member / "product"
    product.mkdir()
    (product / LONG_NAME).write_bytes(rng.randbytes(5000))
    assert (
        len(f"{PROJECT}/{BIG_FILE}")
        < 100
        < len(f"{PROJECT}/{product.relative_to(package)}/{LONG_NAME}")
    )
    (package / BIG_FILE).write_bytes(rng.randbytes(100_000))
    # Hard mode: the package's file is a second name of one in the reduction directory.
    reduction = root / "reduction"
    reduction.mkdir()
    (reduction / "scriptForImaging.py").write_text("# imaging\n" * 200)
    os.link(reduction / "scriptForImaging.py", member / "script" / "scriptForImaging.py")
    write_manifest(package, member.relative_to(package))  # as the packager leaves it
    return package


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return build_package(tmp_path / "pkg")


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def package_paths(package: Path) -> dict[str, Path]:
    """Every path of the package (itself, directories, files) by tar member name."""
    paths = {PROJECT: package}
    for directory, dirnames, filenames in os.walk(package):
        for entry in dirnames + filenames:
            path = Path(directory) / entry
            paths[f"{PROJECT}/{path.relative_to(package).as_posix()}"] = path
    return paths


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def written_tars(capsys: pytest.CaptureFixture[str], package: Path, out_dir: Path) -> list[Path]:
    code, out, err = run(capsys, "-n", NAME, str(package), "--max-size", MAX,
                         "--output-dir", str(out_dir))  # fmt: skip
    assert code == 0, err
    tars = sorted(out_dir.glob("*.tar"))
    assert [Path(line.split()[0]) for line in out.splitlines()] == tars
    return tars


def test_plan_holds_every_path_and_every_file_once(package: Path) -> None:
    pieces = plan_pieces(package, MAX_BYTES)
    assert len(pieces) > 3
    names = [m.info.name for piece in pieces for m in piece.members]
    assert set(names) == set(package_paths(package))
    not_dirs = [m.info.name for piece in pieces for m in piece.members if not m.info.isdir()]
    assert len(not_dirs) == len(set(not_dirs))
    assert [m.info.name for p in plan_pieces(package, MAX_BYTES) for m in p.members] == names


def test_each_piece_has_the_directories_its_members_need(package: Path) -> None:
    for piece in plan_pieces(package, MAX_BYTES):
        seen: set[str] = set()
        for member in piece.members:
            parent = member.info.name.rpartition("/")[0]
            assert not parent or parent in seen, (piece.index, member.info.name)
            seen.add(member.info.name)


def test_each_piece_extracts_alone_to_identical_files(
    capsys: pytest.CaptureFixture[str], package: Path, out_dir: Path, tmp_path: Path
) -> None:
    sources = package_paths(package)
    extracted: set[str] = set()
    for number, tar in enumerate(written_tars(capsys, package, out_dir)):
        dest = tmp_path / f"x{number}"
        dest.mkdir()
        with tarfile.open(tar) as archive:
            names = archive.getnames()
            if hasattr(tarfile, "data_filter"):
                archive.extractall(dest, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                archive.extractall(dest)
        for name in names:
            source, copy = sources[name], dest / name
            if source.is_dir():
                assert copy.is_dir()
            else:
                assert copy.read_bytes() == source.read_bytes(), name
                extracted.add(name)
    files = {n for n, p in sources.items() if p.is_file()}
    assert extracted == files


def test_gnu_tar_extracts_each_piece_alone(
    capsys: pytest.CaptureFixture[str], package: Path, out_dir: Path, tmp_path: Path
) -> None:
    if shutil.which("tar") is None:
        pytest.skip("no tar")
    for number, tar in enumerate(written_tars(capsys, package, out_dir)):
        dest = tmp_path / f"g{number}"
        dest.mkdir()
        subprocess.run(["tar", "-xf", str(tar), "-C", str(dest)], check=True)
        for path in dest.rglob("*"):
            source = package.parent / path.relative_to(dest)
            if path.is_file():
                assert path.read_bytes() == source.read_bytes()


def test_pieces_respect_the_limit_but_a_bigger_file_gets_its_own(
    capsys: pytest.CaptureFixture[str], package: Path, out_dir: Path
) -> None:
    pieces = plan_pieces(package, MAX_BYTES)
    tars = written_tars(capsys, package, out_dir)
    assert len(tars) == len(pieces)
    oversized = []
    for piece, tar in zip(pieces, tars, strict=True):
        size = tar.stat().st_size
        assert size == piece.size_bytes
        assert size % tarfile.RECORDSIZE == 0
        if size > MAX_BYTES:
            oversized.append(tar)
            with tarfile.open(tar) as archive:
                files = [m.name for m in archive.getmembers() if not m.isdir()]
                dirs = {m.name for m in archive.getmembers() if m.isdir()}
            assert files == [f"{PROJECT}/{BIG_FILE}"]
            assert dirs == {str(p) for p in Path(files[0]).parents if str(p) != "."}
    assert len(oversized) == 1
    assert [p.oversized for p in pieces].count(True) == 1


def test_md5_sidecars_verify(
    capsys: pytest.CaptureFixture[str], package: Path, out_dir: Path
) -> None:
    tars = written_tars(capsys, package, out_dir)
    for tar in tars:
        sidecar = Path(f"{tar}.md5sum").read_text()
        assert sidecar == f"{hashlib.md5(tar.read_bytes()).hexdigest()}  {tar.name}\n"
    if shutil.which("md5sum"):
        result = subprocess.run(
            ["md5sum", "-c", *(f"{t.name}.md5sum" for t in tars)],
            cwd=out_dir, capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr


def test_names_follow_the_convention(
    capsys: pytest.CaptureFixture[str], package: Path, out_dir: Path
) -> None:
    tars = written_tars(capsys, package, out_dir)
    matches = [TAR_NAME.match(t.name) for t in tars]
    assert all(matches)
    numbers = [(int(m.group(1)), int(m.group(2))) for m in matches if m]
    assert numbers == [(n, len(tars)) for n in range(1, len(tars) + 1)]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [t.name for t in tars] + [f"{t.name}.md5sum" for t in tars]
    )


def test_no_hard_link_members_and_pax_long_names(
    capsys: pytest.CaptureFixture[str], package: Path, out_dir: Path
) -> None:
    members = []
    for tar in written_tars(capsys, package, out_dir):
        with tarfile.open(tar) as archive:
            members += archive.getmembers()
    assert not [m.name for m in members if m.type == tarfile.LNKTYPE]
    by_name = {m.name: m for m in members}
    script = by_name[
        f"{PROJECT}/sg_ouss_id/group_ouss_id/member_ouss_id/script/scriptForImaging.py"
    ]
    assert script.type == tarfile.REGTYPE and script.size == len("# imaging\n" * 200)
    long = [m for m in members if m.name.endswith(LONG_NAME)]
    assert len(long[0].name) > 100 and long[0].pax_headers["path"] == long[0].name
    # Paths over 100 bytes whose last part is shorter fit ustar's prefix field: no PAX.
    split = [m for m in members if len(m.name) > 100 and len(m.name.rsplit("/", 1)[-1]) < 90]
    assert split and not any(m.pax_headers for m in split)
    assert all(m.name == PROJECT or m.name.startswith(f"{PROJECT}/") for m in members)


def test_dry_run_writes_nothing_and_lists_what_a_run_writes(
    capsys: pytest.CaptureFixture[str], package: Path, out_dir: Path
) -> None:
    before = package_paths(package)
    code, out, err = run(capsys, "-n", NAME, str(package), "--max-size", MAX,
                         "--output-dir", str(out_dir), "--dry-run")  # fmt: skip
    assert code == 0, err
    assert list(out_dir.iterdir()) == []
    assert package_paths(package) == before
    lines = out.splitlines()
    assert lines[-1].startswith("dry run:")
    planned = [m.groups() for m in map(WROTE.match, lines[:-1]) if m]
    assert len(planned) == len(lines) - 1
    tars = written_tars(capsys, package, out_dir)
    actual = []
    for tar in tars:
        with tarfile.open(tar) as archive:
            actual.append((tar.name, str(len(archive.getmembers())), str(tar.stat().st_size)))
    assert planned == actual


def test_default_output_dir_is_the_package_parent(
    capsys: pytest.CaptureFixture[str], package: Path
) -> None:
    code, out, err = run(capsys, "-n", NAME, str(package), "--max-size", "1M")
    assert code == 0, err
    assert [p.name for p in sorted(package.parent.glob("*.tar"))] == [
        f"{PROJECT}_{NAME}_001_of_001.tar"
    ]
    assert len(out.splitlines()) == 1


def outputs(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs for p in d.rglob("*"))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("package-name", "not a project code"),
        ("no-package", "no such directory"),
        ("empty-name", "NAME ''"),
        ("bad-name", "NAME '2012/06/20'"),
        ("bad-size", "--max-size '20X'"),
        ("tiny-size", "at least 10240"),
        ("inside", "inside the package"),
        ("existing", "already holds tars"),
        ("missing-name", "required"),
    ],
)
def test_errors_write_nothing(
    capsys: pytest.CaptureFixture[str], package: Path, out_dir: Path, case: str, expected: str
) -> None:
    target, name, size, output = package, NAME, MAX, out_dir
    if case == "package-name":
        target = package.rename(package.parent / "project229")
    elif case == "no-package":
        target = package.parent / "2011.0.00230.S"
    elif case == "empty-name":
        name = ""
    elif case == "bad-name":
        name = "2012/06/20"
    elif case == "bad-size":
        size = "20X"
    elif case == "tiny-size":
        size = "1K"
    elif case == "inside":
        output = package / "sg_ouss_id"
    elif case == "existing":
        (out_dir / f"{PROJECT}_{NAME}_001_of_009.tar").write_bytes(b"old")
    before = outputs(package.parent, out_dir)
    args = [str(target), "--max-size", size, "--output-dir", str(output)]
    if case != "missing-name":
        args = ["-n", name, *args]
    code, out, err = run(capsys, *args)
    assert code == 1
    assert out == ""
    assert err.splitlines()[-1].startswith("qa-packager tarsplit: ")
    assert expected in err
    assert outputs(package.parent, out_dir) == before


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "--max-size" in out and "20G" in out


def test_a_bad_argument_exits_2_as_the_packagers_own(
    capsys: pytest.CaptureFixture[str], package: Path
) -> None:
    code, _, err = run(capsys, "-n", NAME, str(package), "--bogus")
    assert code == 2 and "unrecognized arguments: --bogus" in err


def test_parse_size() -> None:
    assert parse_size("500M") == 500 * 1024**2
    assert parse_size("20G") == 20 * 1024**3
    assert parse_size("1.5G") == 3 * 1024**3 // 2
    assert parse_size("123456") == 123456
    assert parse_size("2t") == 2 * 1024**4
    assert parse_size("64KiB") == 64 * 1024


def test_interrupted_write_leaves_no_tar_under_a_final_name(
    monkeypatch: pytest.MonkeyPatch, package: Path, out_dir: Path
) -> None:
    copy = tarsplit._copy_data
    calls = 0

    def failing(*args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 12:
            raise OSError(28, "No space left on device")
        copy(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(tarsplit, "_copy_data", failing)
    with pytest.raises(OSError, match="No space left"):
        write_pieces(package, NAME, out_dir, MAX_BYTES, workers=2)
    assert list(out_dir.iterdir()) == []


def test_failure_while_renaming_removes_what_was_placed(
    monkeypatch: pytest.MonkeyPatch, package: Path, out_dir: Path
) -> None:
    replace = os.replace
    calls = 0

    def failing(source: str | Path, destination: str | Path) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        replace(source, destination)

    monkeypatch.setattr(tarsplit.os, "replace", failing)
    with pytest.raises(KeyboardInterrupt):
        write_pieces(package, NAME, out_dir, MAX_BYTES)
    assert list(out_dir.iterdir()) == []


def test_each_tar_and_sidecar_is_on_disk_before_its_rename_and_the_names_after(
    monkeypatch: pytest.MonkeyPatch, package: Path, out_dir: Path
) -> None:
    """A power cut after a run that succeeded left empty or short tars under final names
    (renamed unsynced) and sidecars that lost their md5: every tar and sidecar is synced
    before its rename (the tars by their own threads), the output directory after the
    placing record is written, after the renames and after the record is removed."""
    import threading

    events: list[tuple[str, str, str]] = []  # (call, path, thread)
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", path, threading.current_thread().name))
        real_fsync(fd)

    def replace(source: str | Path, destination: str | Path) -> None:
        events.append(("replace", f"{source}", f"{destination}"))
        real_replace(source, destination)

    def unlink(path: str | Path, **kwargs: object) -> None:
        events.append(("unlink", f"{path}", ""))
        real_unlink(path, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        patch.setattr(os, "replace", replace)
        patch.setattr(os, "unlink", unlink)
        tars = write_pieces(package, NAME, out_dir, MAX_BYTES, workers=2)
    assert len(tars) > 3
    synced = [path for call, path, _ in events if call == "fsync"]

    def at(call: str, path: str) -> int:
        return next(i for i, (c, p, _) in enumerate(events) if c == call and p == path)

    renames = [
        (i, source, target) for i, (c, source, target) in enumerate(events) if c == "replace"
    ]
    assert {Path(target) for _, _, target in renames} == {
        *tars,
        *(Path(f"{tar}.md5sum") for tar in tars),
    }
    for index, source, _ in renames:  # the bytes on disk before the name
        assert at("fsync", source) < index, source
    tar_threads = {
        thread
        for call, path, thread in events
        if call == "fsync" and ".tar.partial-" in path and not path.endswith(".md5sum")
    }
    assert tar_threads and threading.main_thread().name not in tar_threads  # as written
    record = next(p for p in synced if ".tars.placing-" in p)
    directory = str(out_dir)
    first_rename, last_rename = renames[0][0], renames[-1][0]
    removed = at("unlink", record)
    directory_syncs = [i for i, (c, p, _) in enumerate(events) if c == "fsync" and p == directory]
    assert any(at("fsync", record) < i < first_rename for i in directory_syncs)
    assert any(last_rename < i < removed for i in directory_syncs)
    assert any(removed < i for i in directory_syncs)


def test_progress_reports_each_tar_in_order(package: Path, out_dir: Path) -> None:
    seen: list[tuple[Path, int, str]] = []
    tars = write_pieces(package, NAME, out_dir, MAX_BYTES,
                        progress=lambda path, piece, md5: seen.append((path, piece.index, md5)))  # fmt: skip
    assert [s[0] for s in seen] == tars
    assert [s[1] for s in seen] == list(range(1, len(tars) + 1))
    assert all(hashlib.md5(p.read_bytes()).hexdigest() == md5 for p, _, md5 in seen)


@pytest.mark.parametrize("change", ["grow", "shrink", "rewrite"])
def test_a_file_changed_while_being_copied_fails_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, package: Path, out_dir: Path, change: str
) -> None:
    # The change lands after the file is opened and checked, before its data is read.
    fadvise = os.posix_fadvise
    target = package / BIG_FILE

    def changing(fd: int, offset: int, length: int, advice: int) -> None:
        fadvise(fd, offset, length, advice)
        st = os.fstat(fd)
        if st.st_ino != target.stat().st_ino:
            return
        with open(target, "r+b") as handle:
            if change == "grow":
                handle.seek(0, os.SEEK_END)
                handle.write(b"more")
            elif change == "shrink":
                handle.truncate(10)
            else:  # same size, new bytes, a later mtime (as an editor's save)
                handle.write(bytes(st.st_size))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    monkeypatch.setattr(tarsplit.os, "posix_fadvise", changing)
    with pytest.raises(
        tarsplit.TarsplitError, match=r"cube\.fits: (changed|shrank) while being archived"
    ):
        write_pieces(package, NAME, out_dir, MAX_BYTES, workers=2)
    assert list(out_dir.iterdir()) == []


def test_no_piece_of_directories_only(tmp_path: Path) -> None:
    """A file larger than the limit after nothing but its directories: one piece, not a
    piece of those directories (repeated in the next) and then the file's."""
    package = tmp_path / PROJECT
    (package / BIG_FILE).parent.mkdir(parents=True)
    (package / BIG_FILE).write_bytes(bytes(200_000))
    pieces = plan_pieces(package, MAX_BYTES)
    assert len(pieces) == 1 and pieces[0].oversized
    assert [m.info.name for m in pieces[0].members if not m.info.isdir()] == [
        f"{PROJECT}/{BIG_FILE}"
    ]


def test_owner_names_longer_than_ustar_holds_are_kept_whole() -> None:
    info = tarfile.TarInfo(f"{PROJECT}/README")
    info.uname = "firstname.lastname.with.a.long.ldap.name"
    info.gname = "astronomers-of-the-long-group-names"
    with tarfile.open(fileobj=io.BytesIO(tarsplit._header(info) + bytes(1024))) as archive:
        member = archive.next()
    assert member is not None
    assert (member.uname, member.gname) == (info.uname, info.gname)


def test_a_reader_that_stops_reading_does_not_fail_the_run(package: Path, out_dir: Path) -> None:
    """``qa-packager tarsplit ... | head -1``: the tars are all in place, and it exits 0."""
    import sys

    for dry_run in (["--dry-run"], []):
        done = subprocess.run(
            f"{shlex.quote(str(Path(sys.executable).parent / 'qa-packager'))} tarsplit -n {NAME} "
            f"{shlex.quote(str(package))} --max-size 10K --output-dir {shlex.quote(str(out_dir))} "
            f"{' '.join(dry_run)} | head -1; exit ${{PIPESTATUS[0]}}",
            shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stderr == "" and len(done.stdout.splitlines()) == 1
    tars = sorted(out_dir.glob("*.tar"))
    assert len(tars) > 2 and len(list(out_dir.glob("*.tar.md5sum"))) == len(tars)


def test_one_run_at_a_time_writes_a_set(
    capsys: pytest.CaptureFixture[str], package: Path, out_dir: Path
) -> None:
    """Two runs of one package and tag at once both passed the check for existing tars and
    placed two sets (or one over the other): the second now waits for nothing, it is refused."""
    import fcntl

    from observatory.packaging.qa2 import take_lock_file

    lock = out_dir / f".{PROJECT}_{NAME}.tarsplit-lock"
    held = take_lock_file(lock, fcntl.LOCK_EX)
    try:
        code, _, err = run(capsys, "-n", NAME, str(package), "--output-dir", str(out_dir))
    finally:
        lock.unlink()
        os.close(held)
    assert code == 1 and "another qa-packager tarsplit is writing the tars of" in err
    assert not list(out_dir.iterdir())
    written_tars(capsys, package, out_dir)  # once the other run is gone
    assert not list(out_dir.glob(".*lock"))
