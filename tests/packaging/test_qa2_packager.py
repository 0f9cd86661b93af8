"""The QA2 packager against the source document's example input and output trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from observatory.packaging.qa2 import PackagingError, QA_Packager, package

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


def measurement_set(path: Path) -> None:
    """A directory shaped like a CASA table (enough for fake and copy modes)."""
    path.mkdir(parents=True)
    for name in ("table.dat", "table.f0", "table.info"):
        (path / name).write_bytes(os.urandom(64))
    (path / "ANTENNA").mkdir()
    (path / "ANTENNA" / "table.dat").write_bytes(os.urandom(32))


def build_sb(root: Path) -> Path:
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


def listing(member: Path) -> dict[str, set[str]]:
    return {section.name: {e.name + ("/" if e.is_dir() else "") for e in section.iterdir()}
            for section in member.iterdir() if section.is_dir()}  # fmt: skip


@pytest.fixture
def readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.header.txt"
    path.write_text("ALMA Cycle 0 data package\n")
    return path


@pytest.mark.parametrize("mode", ["fake", "copy"])
def test_the_documents_example_file_for_file(tmp_path: Path, readme: Path, mode: str) -> None:
    sb = build_sb(tmp_path)
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
    split = member / "raw" / f"{X8C}.ms.split"
    if mode == "fake":
        assert (split / "table.dat").stat().st_size == 0 and (
            split / "ANTENNA" / "table.dat"
        ).exists()
        assert all(
            p.stat().st_size == 0 for p in member.rglob("*") if p.is_file() and p.name != "README"
        )
    else:
        original = sb / "X8c" / f"{X8C}.ms.split" / "table.dat"
        assert (split / "table.dat").read_bytes() == original.read_bytes()
        assert (split / "table.dat").stat().st_ino != original.stat().st_ino
    tables = member / "calibration" / f"{X8C}.calibration"
    assert sorted(p.name for p in tables.iterdir()) == [f"{X8C}.ms.antpos", f"{X8C}.ms.split.ap_pre_bandpass",
                                                        f"{X8C}.ms.split.bandpass"]  # fmt: skip
    assert not any(p.name == "calibrated.ms" or p.name == f"{X8C}.ms" for p in member.rglob("*"))


def test_append_member_and_group_never_touch_what_exists(tmp_path: Path, readme: Path) -> None:
    sb = build_sb(tmp_path)
    second = tmp_path / "project229" / "IRC10216_setup4_b6_run_x2"
    eb = second / "X3c9295_X1e0"
    uid = "uid___A002_X3c9295_X1e0"
    measurement_set(eb / f"{uid}.ms.split")
    (eb / f"{uid}.ms.scriptForCalibration.py").write_text("# calibration\n")
    packpath = tmp_path / "2011.0.00229.S"
    package(sb, readme, packpath, mode="fake")
    first = packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id"
    before = sorted(str(p) for p in first.rglob("*"))
    package(second, readme, packpath, append="member", mode="fake")
    assert sorted(p.name for p in (packpath / "sg_ouss_id" / "group_ouss_id").iterdir()) == [
        "member_ouss_id", "member_ouss_id2"]  # fmt: skip
    assert sorted(str(p) for p in first.rglob("*")) == before
    package(second, readme, packpath, append="group", mode="fake")
    assert sorted(p.name for p in (packpath / "sg_ouss_id").iterdir()) == [
        "group_ouss_id",
        "group_ouss_id2",
    ]
    assert (
        packpath / "sg_ouss_id" / "group_ouss_id2" / "member_ouss_id" / "raw" / f"{uid}.ms.split"
    ).is_dir()
    package(sb, readme, packpath, append="", mode="fake")  # '' starts again
    assert sorted(p.name for p in (packpath / "sg_ouss_id").iterdir()) == ["group_ouss_id"]


def test_refusals(tmp_path: Path, readme: Path) -> None:
    sb = build_sb(tmp_path)
    with pytest.raises(PackagingError, match="project code"):
        package(sb, readme, tmp_path / "my_package")
    with pytest.raises(PackagingError, match="must not end in /"):
        QA_Packager(str(sb) + "/", str(readme), str(tmp_path / "2011.0.00229.S"))
    inside = tmp_path / "2011.0.00229.S" / "reduction"
    build_sb(inside)
    with pytest.raises(PackagingError, match="would contain the reduction directory"):
        package(
            inside / "project229" / "IRC10216_setup3_b6_run_x2", readme, tmp_path / "2011.0.00229.S"
        )
    assert (inside / "project229").is_dir()  # nothing was removed
    with pytest.raises(PackagingError, match="mode 'hard' is not available here"):
        package(sb, readme, tmp_path / "2011.0.00229.S", mode="hard")
    with pytest.raises(PackagingError, match="append"):
        package(sb, readme, tmp_path / "2011.0.00229.S", append="everything")
    empty = tmp_path / "empty_sb"
    empty.mkdir()
    with pytest.raises(PackagingError, match="no execution block"):
        package(empty, readme, tmp_path / "2011.0.00229.S")
    assert sb.is_dir() and (sb / "X8c" / f"{X8C}.ms.split" / "table.dat").stat().st_size == 64


def test_command_line(tmp_path: Path, readme: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from observatory.packaging.cli import main

    sb = build_sb(tmp_path)
    packpath = tmp_path / "2011.0.00229.S"
    assert (
        main(
            [
                "--origpath",
                str(sb),
                "--readme",
                str(readme),
                "--packpath",
                str(packpath),
                "--mode",
                "copy",
            ]
        )
        == 0
    )
    assert "member_ouss_id (copy mode)" in capsys.readouterr().out
    assert (packpath / "sg_ouss_id" / "group_ouss_id" / "member_ouss_id" / "product").is_dir()
    assert (
        main(["--origpath", str(sb), "--readme", str(readme), "--packpath", str(tmp_path / "nope")])
        == 1
    )
    assert "project code" in capsys.readouterr().err
