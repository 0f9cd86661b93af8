"""Inputs and outputs that do not fit: mismatched files, unwritable outputs, bad worker
counts, contradictory options, killed processes; each a one-line error (exit 2)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import psutil
import pytest
from astropy.io import fits

from observatory.cli import main
from observatory.preprocess import engine
from observatory.preprocess.engine import preprocess
from observatory.preprocess.options import ConversionOptions, OptionError
from observatory.preprocess.reader import ReadError, open_reader
from observatory.telescope.simulator import PointSource, SimulatedObservation, simulate_observation
from shared_data import MWA_DATA

OBSID = 1300000000
SOURCE = PointSource(30.0, -27.0, 50.0)


def simulate(path: Path, **kwargs: object) -> SimulatedObservation:
    settings: dict[str, object] = {
        "n_tiles": 4, "coarse_chans": (133, 134), "n_timesteps": 2, "sources": [SOURCE],
    }  # fmt: skip
    return simulate_observation(path, OBSID, **{**settings, **kwargs})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedObservation:
    """4 tiles, 2 coarse channels of 32 x 40 kHz, 2 integrations of 2 s."""
    return simulate(tmp_path_factory.mktemp("sim"))


def run(tmp_path: Path, *args: str) -> int:
    return main(["--data-dir", str(tmp_path / "data"), "preprocess", *args])


def cli_in_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in its own process: a crash inside mwalib aborts only that one."""
    command = [sys.executable, "-m", "observatory.cli", "preprocess", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def without_layout_keys(source: Path, target: Path) -> Path:
    """A copy of a data file without the primary header's NINPUTS, NFINECHS, FINECHAN and
    INTTIME: only the HDU shapes tell what it holds."""
    with fits.open(source) as hdus:
        for key in ("NINPUTS", "NFINECHS", "FINECHAN", "INTTIME"):
            del hdus[0].header[key]
        hdus.writeto(target)
    return target


def test_a_data_file_for_another_array_is_refused_before_mwalib(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    """mwalib panics (SIGABRT) on a file with more tiles than the metafits: the file's
    header, or else its HDU shapes, are checked first."""
    eight_tiles = simulate(tmp_path / "eight", n_tiles=8, coarse_chans=(133,))
    (by_header,) = eight_tiles.vis_paths
    by_shape = without_layout_keys(by_header, tmp_path / by_header.name)
    for data, message in (
        (by_header, "the file holds 8 tiles"),
        (by_shape, "its first data HDU is 256 x 36 values, 8 tiles (36 baselines)"),
    ):
        out = tmp_path / "x.uvfits"
        done = cli_in_subprocess("--metafits", str(sim.metafits_path), str(data), "--out",
                                 str(out), "--no-rfi", "--allow-missing")  # fmt: skip
        assert done.returncode == 2, done.stderr[-2000:]
        (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert f"{data}: {message}, which does not match the metafits" in line
        assert "(4 tiles" in line
        assert not out.exists()


def test_files_at_another_resolution_are_refused_naming_the_file(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    fine = simulate(tmp_path / "fine", int_time_s=1.0, fine_chan_khz=20.0)
    with pytest.raises(ReadError, match=r"_ch133_000\.fits: the file holds 1 s integrations, "
                       r"which does not match the metafits .*\(2 s integrations\)"):  # fmt: skip
        open_reader(sim.metafits_path, fine.vis_paths)
    bare = [without_layout_keys(p, tmp_path / p.name) for p in fine.vis_paths]
    with pytest.raises(ReadError, match="its first data HDU holds 64 fine channels, which does "
                       r"not match the metafits .*\(32 fine channels per coarse channel\)"):  # fmt: skip
        open_reader(sim.metafits_path, [sim.vis_paths[0], bare[1]])


def test_the_real_files_pass_the_layout_check() -> None:
    """Cut-down files hold fewer fine channels than their metafits: still read (pyuvdata)."""
    for metafits, data in (
        ("1320409688.metafits", ["1320409688_20211108122750_mini_ch137_000.fits"]),
        ("1131733552.metafits", ["1131733552_20151116182537_mini_gpubox01_00.fits"]),
    ):
        reader = open_reader(MWA_DATA / metafits, [MWA_DATA / name for name in data])
        assert len(reader.coarse_chans) == 1


def test_mwaf_flag_files_are_refused_saying_they_are_not_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [
        MWA_DATA / "1131733552_20151116182537_mini_gpubox01_00.fits",
        MWA_DATA / "1131733552_mini_01.mwaf",
        MWA_DATA / "1131733552_mini_06.mwaf",
    ]
    out = tmp_path / "l.uvfits"
    code = run(tmp_path, "--metafits", str(MWA_DATA / "1131733552.metafits"), *map(str, files),
               "--out", str(out), "--allow-missing", "--no-rfi")  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert f"{files[1]} (and 1 more): .mwaf flag files are not used" in error
    assert not out.exists()


def test_an_output_directory_that_does_not_exist_is_an_error_not_made(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    out = tmp_path / "typo" / "dir" / "o.uvfits"
    options = ConversionOptions.from_params({"no_rfi": "true"})
    message = f"cannot write {out}: the directory {out.parent} does not exist"
    with pytest.raises(engine.OutputError, match=message):
        preprocess(sim.metafits_path, sim.vis_paths, options, out)
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize(
    ("out", "reason"),
    [("/sys/x.ms", "Permission denied"), ("/proc/x.uvfits", "/proc does not take new files")],
)
def test_outputs_where_no_file_can_be_made_exit_2_naming_the_output(
    sim: SimulatedObservation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    out: str,
    reason: str,
) -> None:
    """Pseudo file systems refuse files even to root: the message names the output (not
    its hidden temporary) and the reason (not a full disk)."""
    code = run(tmp_path, "--metafits", str(sim.metafits_path), *map(str, sim.vis_paths),
               "--out", out, "--no-rfi")  # fmt: skip
    assert code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line == f"error: cannot write {out}: {reason}"


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("notes.ms", "directory", "it is a directory that holds no measurement set (no table.dat)"),
        ("file.ms", "file", "it is a file, not a measurement set (a directory)"),
        ("adir.uvfits", "directory", "it is a directory"),
        ("both", "directory", "it is a directory"),  # both.uvfits, beside both.ms
    ],
)
def test_an_output_of_another_kind_is_refused_before_any_work(
    sim: SimulatedObservation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    make: str,
    reason: str,
) -> None:
    """A directory at a .ms path was deleted whatever it held; a directory at a .uvfits
    path (or a file at a .ms path) failed with a traceback once the work was done, and with
    --output both left the other output published."""
    out = tmp_path / name
    existing = out.with_suffix(".uvfits") if name == "both" else out
    if make == "directory":
        (existing / "sub").mkdir(parents=True)
        (existing / "notes.txt").write_text("precious")
    else:
        existing.write_text("precious")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    output = ["--output", "both"] if name == "both" else []
    code = run(tmp_path, "--metafits", str(sim.metafits_path), *map(str, sim.vis_paths),
               "--out", str(out), "--no-rfi", *output)  # fmt: skip
    assert code == 2
    assert f"error: cannot write {existing}: {reason}" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert "precious" in (existing / "notes.txt" if make == "directory" else existing).read_text()


@pytest.mark.parametrize("workers", ["0", "-3"])
def test_workers_must_be_positive(
    sim: SimulatedObservation, tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    out = tmp_path / "w.uvfits"
    code = run(tmp_path, "--metafits", str(sim.metafits_path), *map(str, sim.vis_paths),
               "--out", str(out), "--no-rfi", "--workers", workers)  # fmt: skip
    assert code == 2
    assert f"workers={workers} is not valid: must be a positive whole number" in (
        capsys.readouterr().err
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "params",
    [
        {"flag_dc": "true", "no_flag_dc": "true"},
        {"flagdcchannels": "true", "no_flag_dc": "true"},
        {"flag_dc": "false", "flagdcchannels": "true"},
    ],
)
def test_contradictory_dc_options_are_refused(params: dict[str, str]) -> None:
    with pytest.raises(OptionError, match="contradicts the other DC-channel options"):
        ConversionOptions.from_params(params)


def test_dc_options_that_agree_are_accepted(
    sim: SimulatedObservation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        ConversionOptions.from_params({"flag_dc": "false", "no_flag_dc": "true"}).flag_dc is False
    )
    assert ConversionOptions.from_params({"flag_dc": "true", "no_flag_dc": "false"}).flag_dc is True
    code = run(tmp_path, "--metafits", str(sim.metafits_path), *map(str, sim.vis_paths),
               "--out", str(tmp_path / "d.uvfits"), "--flag-dc", "--no-flag-dc")  # fmt: skip
    assert code == 2 and "contradicts the other DC-channel options" in capsys.readouterr().err


def test_expected_pyuvdata_warnings_do_not_reach_the_user(tmp_path: Path) -> None:
    """Reading the real cut-down files one coarse channel at a time through pyuvdata."""
    files = [
        MWA_DATA / "1131733552_20151116182537_mini_gpubox01_00.fits",
        MWA_DATA / "1131733552_20151116182637_mini_gpubox06_01.fits",
    ]
    options = ConversionOptions.from_params({"no_rfi": "true", "allow_missing": "true"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preprocess(MWA_DATA / "1131733552.metafits", files, options, tmp_path / "l.uvfits")
        preprocess(
            MWA_DATA / "1320409688.metafits",
            [MWA_DATA / "1320409688_20211108122750_mini_ch137_000.fits"],
            options,
            tmp_path / "m.uvfits",
        )
    messages = [str(w.message) for w in caught]
    for expected in ("some coarse channel files", "Fixing auto-correlations", "No coarse band"):
        assert not [m for m in messages if expected in m], messages


#: ``observatory preprocess`` in a fresh interpreter (this one may keep other tests' threads,
#: beside which nothing is forked), its workers killing themselves on channel 134's chunk.
_KILLED_ON_134 = """
import os, signal, sys
from observatory import cli
from observatory.preprocess import engine
original = engine._process
def killed_on_134(chunk, *args):
    if getattr(chunk, "coarse_chan", None) == 134:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(chunk, *args)
engine._process = killed_on_134  # the forked workers inherit it
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_killed_worker_exits_2_with_one_line(tmp_path: Path) -> None:
    """A worker killed outright (the OOM killer's SIGKILL, here sent by the worker itself
    to itself on its chunk of channel 134) breaks the pool: one line, exit 2, no output."""
    obs = simulate(tmp_path / "obs", coarse_chans=(133, 134, 135, 136), n_timesteps=4)
    out = tmp_path / "out" / "o.uvfits"
    out.parent.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_ON_134, "--data-dir", str(tmp_path / "data"), "preprocess",
         "--metafits", str(obs.metafits_path), *map(str, obs.vis_paths), "--out", str(out),
         "--workers", "2"],  # RFI on: a process pool
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == ["error: a worker process was killed (out of memory?); nothing was written"]
    assert list(out.parent.iterdir()) == []


def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    """kill -9 of the converting process (the OOM killer's choice) takes its workers too."""
    obs = simulate(tmp_path / "obs", coarse_chans=(133, 134, 135, 136), n_timesteps=4)
    script = textwrap.dedent(
        f"""
        import time
        from observatory.preprocess.engine import preprocess
        from observatory.preprocess.options import ConversionOptions

        def progress(done, total, what):
            print("converting", flush=True)
            time.sleep(600)  # held here, its workers alive, until killed

        preprocess({str(obs.metafits_path)!r}, {[str(p) for p in obs.vis_paths]!r},
                   ConversionOptions(), {str(tmp_path / "o.uvfits")!r}, progress=progress,
                   workers=2)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers: list[psutil.Process] = []
    try:
        assert parent.stdout is not None and parent.stdout.readline() == "converting\n"
        workers = psutil.Process(parent.pid).children()
        assert len(workers) == 2
        parent.kill()
        parent.wait(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert alive == []
    finally:
        parent.kill()
        for worker in workers:  # on failure: nothing left running
            if worker.is_running():
                worker.kill()
    assert np.all([not w.is_running() for w in workers])


def test_conversions_in_threads_leak_none_of_the_expected_warnings(tmp_path: Path) -> None:
    """The filters are not swapped per read (catch_warnings), which threads undo for each other."""
    import threading
    import warnings

    from observatory.preprocess.engine import preprocess
    from observatory.preprocess.options import ConversionOptions

    obs = simulate_observation(tmp_path / "obs", 1320412440, n_tiles=8, coarse_chans=[133, 134],
                               n_timesteps=4, sources=[PointSource(30.0, -27.0, 50.0)])  # fmt: skip
    failures: list[BaseException] = []

    def convert(name: str) -> None:
        try:
            (tmp_path / name).mkdir()
            options = ConversionOptions.from_params({"no_rfi": "true", "output": "uvfits"})
            preprocess(obs.metafits_path, obs.vis_paths, options, tmp_path / name / "o.uvfits")
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=convert, args=(f"out{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, failures
    leaked = [str(w.message) for w in caught if "Recalculating uvw_array" in str(w.message)
              or "not submitted" in str(w.message) or "Fixing auto-correlations" in str(w.message)]  # fmt: skip
    assert not leaked


def full_legacy_file(directory: Path) -> Path:
    """The legacy test file at its metafits' 32 fine channels (the cut-down one tiled), which
    mwalib reads: the cut-down files go through pyuvdata, which hid what mwalib's path did."""
    mini = MWA_DATA / "1131733552_20151116182537_mini_gpubox01_00.fits"
    path = directory / "1131733552_20151116182537_gpubox01_00.fits"
    with fits.open(mini, do_not_scale_image_data=True) as hdus:
        image = hdus[1]
        tiled = fits.ImageHDU(np.tile(image.data, (32, 1)), header=image.header.copy(),
                              do_not_scale_image_data=True)  # fmt: skip
        fits.HDUList([hdus[0].copy(), tiled]).writeto(path)
    return path


def test_legacy_channels_read_by_mwalib_are_at_the_legacy_frequencies(tmp_path: Path) -> None:
    """A legacy 40 kHz channel averages four 10 kHz ones: its centre is 15 kHz above MWAX's
    rule (channel n/2 on the coarse centre), which mwalib's path used: cable and geometric
    phases were made at the wrong frequencies, and the output's frequency axis was off."""
    from pyuvdata import UVData

    from observatory.preprocess.reader import MwalibReader

    metafits, data = MWA_DATA / "1131733552.metafits", full_legacy_file(tmp_path)
    reader = open_reader(metafits, [data])
    assert isinstance(reader, MwalibReader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyuvdata's notes on the metafits
        expected = UVData.from_file([str(metafits), str(data)], correct_cable_len=False,
                                    correct_van_vleck=False, remove_dig_gains=False,
                                    remove_coarse_band=False, flag_init=False,
                                    phase_to_pointing_center=False,
                                    propagate_coarse_flags=False).freq_array.ravel()  # fmt: skip
    (coarse,) = reader.coarse_chans
    np.testing.assert_array_equal(reader.channel_freqs_hz(coarse), expected)
    out = tmp_path / "legacy.uvfits"
    options = ConversionOptions.from_params(
        {"no_rfi": "true", "avg_freq_res": "80", "allow_missing": "true"}
    )
    preprocess(metafits, [data], options, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = UVData.from_file(str(out)).freq_array.ravel()
    np.testing.assert_allclose(written, expected.reshape(-1, 2).mean(axis=1))


def test_a_truncated_cut_down_file_is_named_in_the_error(tmp_path: Path) -> None:
    """pyuvdata's error named neither the file nor what was wrong with it."""
    mini = MWA_DATA / "1320409688_20211108122750_mini_ch137_000.fits"
    truncated = tmp_path / mini.name
    truncated.write_bytes(mini.read_bytes()[:150_000])
    options = ConversionOptions.from_params({"no_rfi": "true", "allow_missing": "true"})
    with pytest.raises(ReadError, match=rf"cannot read {truncated} \(coarse channel 137; a "
                       r"truncated or damaged correlator file\?\)"):  # fmt: skip
        preprocess(MWA_DATA / "1320409688.metafits", [truncated], options, tmp_path / "o.uvfits")
    assert not (tmp_path / "o.uvfits").exists()


def test_the_ppds_metafits_of_a_metadata_download_is_refused_saying_which_to_give(
    tmp_path: Path,
) -> None:
    with pytest.raises(ReadError, match=r"_metafits_ppds.fits file lacks keys: give "
                       r"<obsid>.metafits"):  # fmt: skip
        open_reader(MWA_DATA / "1131733552_metafits_ppds.fits",
                    [MWA_DATA / "1131733552_20151116182537_mini_gpubox01_00.fits"])  # fmt: skip


def test_a_data_file_given_twice_is_refused(sim: SimulatedObservation, tmp_path: Path) -> None:
    """It was accepted silently (its data read twice)."""
    (first, *rest) = sim.vis_paths
    link = tmp_path / first.name
    link.symlink_to(first)
    for twice in ([first, first, *rest], [first, link, *rest]):
        with pytest.raises(ReadError, match=r": given twice.*; give each data file once"):
            open_reader(sim.metafits_path, twice)
