"""``observatory preprocess``: files or an archived obsid in, uvfits / MS out, errors with exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyuvdata import UVData

from observatory.cli import main
from observatory.telescope.simulator import PointSource, SimulatedObservation, simulate_observation
from shared_data import CALIB_DATA, MWA_DATA

OBSID = 1320409688
SOURCE_ARG = "333.6069,-17.0288,60"


@pytest.fixture
def sim(tmp_path: Path) -> SimulatedObservation:
    return simulate_observation(
        tmp_path / "sim", OBSID, n_tiles=4, coarse_chans=[137], n_timesteps=4,
        sources=[PointSource(333.6069, -17.0288, 60.0)],
    )  # fmt: skip


def run(tmp_path: Path, *args: str) -> int:
    return main(["--data-dir", str(tmp_path / "data"), "preprocess", *args])


def test_files_to_uvfits_with_averaging(
    sim: SimulatedObservation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.uvfits"
    files = [str(p) for p in sim.vis_paths]
    code = run(tmp_path, "--metafits", str(sim.metafits_path), *files, "--out", str(out),
               "--avg-time-res", "4", "--avg-freq-res", "160", "--no-rfi")  # fmt: skip
    assert code == 0
    assert f"wrote {out}" in capsys.readouterr().out
    uvd = UVData.from_file(str(out))
    assert (uvd.Ntimes, uvd.Nfreqs) == (2, 8)


def test_an_output_named_fits_is_written_as_uvfits_under_that_name(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    out = tmp_path / "out.fits"
    files = [str(p) for p in sim.vis_paths]
    assert run(tmp_path, "--metafits", str(sim.metafits_path), *files, "--out", str(out),
               "--no-rfi") == 0  # fmt: skip
    assert not (tmp_path / "out.fits.uvfits").exists()
    assert UVData.from_file(str(out), file_type="uvfits").Ntimes == 4


def test_an_output_that_is_an_input_file_is_refused(
    sim: SimulatedObservation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out`` naming a correlator file (they end in .fits, as UVFITS outputs may) was
    written over it."""
    files = [str(p) for p in sim.vis_paths]
    before = sim.vis_paths[0].read_bytes()
    assert run(tmp_path, "--metafits", str(sim.metafits_path), *files, "--out", files[0],
               "--no-rfi") == 2  # fmt: skip
    assert f"cannot write {files[0]}: it is one of the input files" in capsys.readouterr().err
    assert sim.vis_paths[0].read_bytes() == before


def test_legacy_csv_keys_through_option(sim: SimulatedObservation, tmp_path: Path) -> None:
    out = tmp_path / "legacy"
    files = [str(p) for p in sim.vis_paths]
    code = run(tmp_path, "--metafits", str(sim.metafits_path), *files, "--out", str(out),
               "--option", "timeres=8", "--option", "conversion=ms", "--option", "norfi=true")  # fmt: skip
    assert code == 0
    uvd = UVData.from_file(str(tmp_path / "legacy.ms"))
    assert uvd.Ntimes == 1


def test_archived_obsid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    assert main([*data, "simulate", "observation", "--obsid", str(OBSID), "--tiles", "4",
                 "--coarse-chans", "137,138", "--source", SOURCE_ARG]) == 0  # fmt: skip
    out = tmp_path / "archived.uvfits"
    assert run(tmp_path, "--obsid", str(OBSID), "--out", str(out), "--no-rfi") == 0
    assert UVData.from_file(str(out)).Nfreqs == 64
    assert run(tmp_path, "--obsid", "1320409696", "--out", str(out)) == 2
    assert "Observation 1320409696 does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--avg-time-res", "3"], "avg_time_res=3.0 is not valid: must be a whole multiple"),
        (["--centre", "custom"], "phase_centre_ra=None is not valid: required"),
        (
            ["--phase-centre-dec", "95", "--centre", "custom", "--phase-centre-ra", "1"],
            "phase_centre_dec",
        ),
        (["--option", "avg_freq_res"], "is not KEY=VALUE"),
        (["--output", "ms"], "ends in .uvfits"),
        # it silently won: --option output=ms wrote a measurement set
        (
            ["--output", "uvfits", "--option", "output=ms"],
            "contradicts the option giving output=uvfits",
        ),
    ],
)
def test_bad_options_exit_2_naming_the_key(
    sim: SimulatedObservation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    files = [str(p) for p in sim.vis_paths]
    out = tmp_path / "x.uvfits"
    assert (
        run(tmp_path, "--metafits", str(sim.metafits_path), *files, "--out", str(out), *args) == 2
    )
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_inputs_must_be_named(
    sim: SimulatedObservation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path, "--out", str(tmp_path / "x.uvfits")) == 2
    assert "give --metafits and the correlator data files, or --obsid" in capsys.readouterr().err
    assert (
        run(tmp_path, "--metafits", str(sim.metafits_path), "--out", str(tmp_path / "x.uvfits"))
        == 2
    )
    assert "no correlator data files given" in capsys.readouterr().err
    assert (
        run(tmp_path, "--metafits", str(sim.metafits_path), "--obsid", "1", "--out", "x.uvfits")
        == 2
    )
    assert "not both" in capsys.readouterr().err


def test_data_files_of_another_observation_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [
        str(MWA_DATA / "1131733552_20151116182537_mini_gpubox01_00.fits"),
        str(MWA_DATA / "1131733552_20151116182637_mini_gpubox06_01.fits"),
    ]
    out = tmp_path / "l.uvfits"
    code = run(tmp_path, "--metafits", str(MWA_DATA / "1320409688.metafits"), *files,
               "--out", str(out), "--option", "allow_missing=true")  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    (line,) = [line for line in error.splitlines() if "does not match" in line]
    assert "from obsid 1131733552, which does not match the metafits 1320409688.metafits" in line
    assert not out.exists()


def test_solutions_for_another_array_name_the_file(
    sim: SimulatedObservation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    solutions = CALIB_DATA / "1450212840_ch101_solutions.bin"  # 256 antennas
    out = tmp_path / "c.uvfits"
    code = run(tmp_path, "--metafits", str(sim.metafits_path), *map(str, sim.vis_paths),
               "--out", str(out), "--solutions", str(solutions), "--option", "apply_di_cal=true",
               "--no-rfi")  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert f"solutions file {solutions}: the solutions are for 256 antennas" in error
    assert f"obsid {OBSID} has 4" in error
    assert "apply_di_cal=" not in error and not out.exists()


def test_solutions_with_apply_di_cal_false_is_a_contradiction(
    sim: SimulatedObservation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--solutions silently won: the output was calibrated, its history saying true."""
    out = tmp_path / "c.uvfits"
    code = run(tmp_path, "--metafits", str(sim.metafits_path), *map(str, sim.vis_paths),
               "--out", str(out), "--solutions", str(tmp_path / "any.bin"),
               "--option", "apply_di_cal=false", "--no-rfi")  # fmt: skip
    assert code == 2 and not out.exists()
    assert "contradicts --option apply_di_cal=false" in capsys.readouterr().err


INTERRUPTED_WHILE_A_SUBTABLE_IS_OPEN = """
import sys
from casacore import tables
import pyuvdata.utils.io.ms as ms_utils

original = ms_utils.write_ms_field

def interrupted(filepath, **kwargs):
    original(filepath, **kwargs)
    field = tables.table(filepath + "/FIELD", readonly=False, ack=False)
    field.addrows(1)  # not flushed yet: its destructor writes it
    raise KeyboardInterrupt  # Ctrl-C while pyuvdata holds a subtable open

ms_utils.write_ms_field = interrupted
from observatory.cli import main
sys.exit(main(sys.argv[1:]))
"""

STOPPED_THEN_FAILING = """
import os, signal, sys
import pyuvdata.utils.io.ms as ms_utils

def stopped(filepath, **kwargs):
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises SystemExit here...
    except BaseException:
        pass  # ...which a callback from C drops
    raise RuntimeError(filepath + " not found or not recognized as an MS table")

ms_utils.write_ms_field = stopped
from observatory.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("script", "status"), [(INTERRUPTED_WHILE_A_SUBTABLE_IS_OPEN, 130), (STOPPED_THEN_FAILING, 143)]
)
def test_a_stop_while_the_measurement_sets_subtables_are_written_is_a_clean_stop(
    sim: SimulatedObservation, tmp_path: Path, script: str, status: int
) -> None:
    """casacore aborted the process (status 134, "table.dat_tmp does not exist and cannot
    be created"): the temporary set was removed while an interrupted pyuvdata writer still
    held a table of it open, which casacore flushed when it was destroyed, later. And a
    stop whose exception a library dropped, then failing on what it left, was reported as
    that failure (status 2), not as the stop."""
    import subprocess
    import sys

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    command = [sys.executable, "-c", script, "--data-dir",
               str(tmp_path / "data"), "preprocess", "--metafits", str(sim.metafits_path),
               *map(str, sim.vis_paths), "--out", str(out_dir / "o.ms"), "--no-rfi"]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == status, finished.stderr
    assert "AipsError" not in finished.stderr and "MS table" not in finished.stderr
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(("stop", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_signal_leaves_no_partial_output_or_scratch(
    tmp_path: Path, stop: str, status: int
) -> None:
    """SIGTERM (a batch system's time limit) ends the run through its cleanup, as Ctrl-C
    (SIGINT) does: one line, no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    obs = simulate_observation(
        tmp_path / "big", OBSID, n_tiles=32, coarse_chans=[137, 138, 139, 140], n_timesteps=16,
        fine_chan_khz=10, sources=[PointSource(333.6069, -17.0288, 60.0)],
    )  # fmt: skip
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    command = [sys.executable, "-m", "observatory.cli", "preprocess", "--metafits",
               str(obs.metafits_path), *map(str, obs.vis_paths), "--out", str(out_dir / "o.uvfits"),
               "--workers", "2"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(out_dir.iterdir()) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)  # the hidden temporaries appear when the conversion starts writing
    time.sleep(0.5)
    assert process.poll() is None, process.communicate()
    os.kill(process.pid, getattr(signal, stop))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert list(out_dir.iterdir()) == []  # no temporary output, no hidden scratch directory


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_swallowed_by_a_callback_from_c_still_stops_the_run(
    sim: SimulatedObservation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """The exception of a stop signal raised in a callback from C (numba's compiler) or a
    fork handler (logging's) is printed and dropped: the next progress report raises it
    again, and the run ends with 143 (SIGTERM) or 130 (SIGINT) and no output."""
    import contextlib
    import os
    import signal

    from observatory.preprocess import engine

    signum = getattr(signal, stop)
    original = engine._process
    calls: list[int] = []

    def signalled_during_a_callback(*args: object, **kwargs: object) -> object:
        if not calls:
            with contextlib.suppress(SystemExit, KeyboardInterrupt):  # as ctypes does
                os.kill(os.getpid(), signum)
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "_process", signalled_during_a_callback)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    arguments = ("--metafits", str(sim.metafits_path), *map(str, sim.vis_paths),
                 "--out", str(out_dir / "o.uvfits"), "--no-rfi", "--workers", "1")  # fmt: skip
    if signum == signal.SIGTERM:
        with pytest.raises(SystemExit) as stopped:
            run(tmp_path, *arguments)
        assert stopped.value.code == 128 + signal.SIGTERM
    else:
        assert run(tmp_path, *arguments) == 130
    assert len(calls) == 1 and list(out_dir.iterdir()) == []


@pytest.mark.parametrize("flagging", [["--no-rfi"], ["--workers", "2"]])
def test_a_truncated_data_file_is_refused_not_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flagging: list[str]
) -> None:
    """A damaged file is an error (exit 2) naming it; only missing integrations are flagged.
    With RFI flagging, in worker processes, mwalib's exception (which cannot be pickled)
    broke the pool, reported as "a worker process was killed (out of memory?)"."""
    # As in a process where a ReadError has passed through Dask's distributed (an earlier
    # job's): it installs tblib's pickling for it, which pickles the chain back to mwalib's.
    from tblib import pickling_support

    from observatory.preprocess.reader import ReadError

    pickling_support.install(ReadError)
    obs = simulate_observation(
        tmp_path / "obs", OBSID, n_tiles=4, coarse_chans=[137, 138], n_timesteps=8,
        sources=[PointSource(333.6069, -17.0288, 60.0)],
    )  # fmt: skip
    damaged = obs.vis_paths[-1]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size * 2 // 3])
    out = tmp_path / "out" / "o.uvfits"
    out.parent.mkdir()
    code = run(tmp_path, "--metafits", str(obs.metafits_path), *map(str, obs.vis_paths),
               "--out", str(out), *flagging)  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert "truncated or damaged correlator file" in error and damaged.name in error
    assert list(out.parent.iterdir()) == []
