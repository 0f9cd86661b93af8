"""A correlator file of a coarse channel the metafits does not list is refused before mwalib
opens it: mwalib panics on one (``Option::unwrap()`` on a ``None``), aborting the whole
process, uncatchable, and with it an ASVO Dask worker.

Such files are left over from another recording of the obsid: simulated into a directory
with channels 133 and 134, then again with channel 140, the directory holds the second
metafits and the first recording's files beside the second's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from observatory.preprocess import reader
from observatory.preprocess.reader import ReadError, open_reader
from observatory.telescope.simulator import SimulatedObservation, simulate_observation
from shared_data import MWA_DATA

OBSID = 1480000032


@pytest.fixture(scope="module")
def simulated_twice(tmp_path_factory: pytest.TempPathFactory) -> SimulatedObservation:
    """The second of two simulations of ``OBSID`` into one directory (its metafits lists
    channel 140 only); the first one's ch133 and ch134 files are still there."""
    directory = tmp_path_factory.mktemp("twice")
    simulate_observation(directory, OBSID, n_tiles=4, coarse_chans=(133, 134), n_timesteps=1)
    return simulate_observation(directory, OBSID, n_tiles=4, coarse_chans=(140,), n_timesteps=1)


def stale_file(simulated: SimulatedObservation) -> Path:
    (path,) = simulated.out_dir.glob(f"{OBSID}_*_ch133_000.fits")
    return path


def test_the_conversion_of_a_file_of_another_channel_fails_without_aborting(
    simulated_twice: SimulatedObservation, tmp_path: Path
) -> None:
    """With the real mwalib, in a process of its own (the old code aborted it: SIGABRT)."""
    stale = stale_file(simulated_twice)
    (current,) = simulated_twice.vis_paths
    command = [sys.executable, "-m", "observatory.cli", "--data-dir", str(tmp_path / "data"),
               "preprocess", "--metafits", str(simulated_twice.metafits_path), str(stale),
               str(current), "--out", str(tmp_path / "x.uvfits"), "--no-rfi"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert f"{stale}: coarse channel 133 is not one of the metafits' channels (140)" in line


class _MwalibCalled(Exception):
    pass


@pytest.fixture
def mwalib_opened(monkeypatch: pytest.MonkeyPatch) -> list[list[Path]]:
    """The data files ``open_reader`` handed mwalib (its reader refuses them all, as
    mwalib would if it did not abort first)."""
    opened: list[list[Path]] = []

    def refuse(metafits: Path, paths: list[Path], meta: object) -> None:
        opened.append(list(paths))
        raise _MwalibCalled("mwalib was given the files")

    monkeypatch.setattr(reader, "MwalibReader", refuse)
    return opened


def test_an_mwax_file_of_a_channel_not_in_the_metafits_never_reaches_mwalib(
    simulated_twice: SimulatedObservation, mwalib_opened: list[list[Path]]
) -> None:
    stale = stale_file(simulated_twice)
    with pytest.raises(ReadError) as caught:
        open_reader(simulated_twice.metafits_path, [*simulated_twice.vis_paths, stale])
    assert str(caught.value) == (
        f"{stale}: coarse channel 133 is not one of the metafits' channels (140)"
    )
    assert mwalib_opened == []


def test_a_legacy_gpubox_number_beyond_the_channels_never_reaches_mwalib(
    tmp_path: Path, mwalib_opened: list[list[Path]]
) -> None:
    """The legacy observation has 24 coarse channels: gpubox01 to gpubox24."""
    gpubox25 = tmp_path / "1131733552_20151116182537_mini_gpubox25_00.fits"
    shutil.copy(MWA_DATA / "1131733552_20151116182537_mini_gpubox01_00.fits", gpubox25)
    with pytest.raises(ReadError) as caught:
        open_reader(MWA_DATA / "1131733552.metafits", [gpubox25])
    assert str(caught.value) == (
        f"{gpubox25}: gpubox 25 does not exist in an observation of 24 coarse channels "
        "(gpubox01 to 24)"
    )
    assert mwalib_opened == []


def test_files_of_listed_channels_still_reach_mwalib(
    simulated_twice: SimulatedObservation, mwalib_opened: list[list[Path]]
) -> None:
    """The check refuses only the unlisted channels (a real MWAX file's name has an extra
    part, ``_mini``: its channel is read all the same). Refused by the stand-in for mwalib,
    the files are read with pyuvdata."""
    open_reader(simulated_twice.metafits_path, simulated_twice.vis_paths)
    assert mwalib_opened == [simulated_twice.vis_paths]
    mwax_file = MWA_DATA / "1320409688_20211108122750_mini_ch137_000.fits"
    open_reader(MWA_DATA / "1320409688.metafits", [mwax_file])
    assert mwalib_opened[-1] == [mwax_file]
