import shutil
from pathlib import Path

import pytest
from astropy.io import fits
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from observatory.archive.filenames import legacy_gpubox_channels, parse_file_name
from observatory.archive.models import FileKind, Observation, ObservationFile
from observatory.archive.service import IngestError, get_observation, ingest_directory
from observatory.core.storage import Storage, sha1_of_file
from shared_data import MWA_DATA


def _counts(session: Session) -> tuple[int, int]:
    return (
        session.scalar(select(func.count()).select_from(Observation)) or 0,
        session.scalar(select(func.count()).select_from(ObservationFile)) or 0,
    )


def test_ingest_real_mwa_files(session: Session, tmp_path: Path) -> None:
    storage = Storage(tmp_path / "archive")
    report = ingest_directory(session, storage, MWA_DATA)
    session.commit()
    assert sorted(report.observations_added) == [1061315448, 1131733552, 1320409688]
    assert len(report.files_added) == 10
    assert [Path(p).name for p, _ in report.skipped] == ["README.md"]
    # The _mini names are registered, with a note saying mwalib will refuse them.
    assert len(report.warnings) == 4
    assert all("mwalib" in note for _, note in report.warnings)

    mwax = get_observation(session, 1320409688)
    assert mwax.mode == "MWAX_CORRELATOR"
    assert mwax.stoptime == 1320409688 + 120
    assert mwax.calibration and mwax.calibrator_source == "3C444"
    assert mwax.coarse_chans == list(range(131, 155))
    assert mwax.n_tiles == 128
    assert mwax.freq_res_khz == 40 and mwax.int_time_s == 2.0
    assert mwax.delays[:4] == [9, 7, 5, 3]
    vis = next(f for f in mwax.files if f.kind == FileKind.MWAX_VIS)
    assert (vis.coarse_chan, vis.batch) == (137, 0)

    legacy = get_observation(session, 1131733552)
    kinds = sorted(f.kind for f in legacy.files)
    assert kinds == ["legacy_gpubox", "legacy_gpubox", "metafits", "mwaf", "mwaf", "ppds"]
    by_name = {f.name: f for f in legacy.files}
    # Legacy gpubox numbers map to receiver channels: above 128 in descending order.
    assert by_name["1131733552_20151116182537_mini_gpubox01_00.fits"].coarse_chan == 154
    assert by_name["1131733552_20151116182637_mini_gpubox06_01.fits"].coarse_chan == 149
    assert by_name["1131733552_20151116182637_mini_gpubox06_01.fits"].batch == 1
    assert by_name["1131733552_mini_06.mwaf"].coarse_chan == 149
    # Metadata comes from <obsid>.metafits, not the PPDS variant (whose RA differs slightly).
    assert legacy.ra_deg == pytest.approx(88.41623036197147)

    for f in legacy.files:
        source = MWA_DATA / f.name
        assert f.size_bytes == source.stat().st_size
        assert f.sha1 == sha1_of_file(source)
        assert storage.local_path(f.storage_key).read_bytes() == source.read_bytes()


def test_ingest_is_idempotent(session: Session, tmp_path: Path) -> None:
    storage = Storage(tmp_path / "archive")
    ingest_directory(session, storage, MWA_DATA)
    session.commit()
    before = _counts(session)
    report = ingest_directory(session, storage, MWA_DATA)
    session.commit()
    assert report.observations_added == [] and report.files_added == []
    assert len(report.files_unchanged) == 10
    assert _counts(session) == before


def _copy_obs(tmp_path: Path, obsid: str) -> Path:
    directory = tmp_path / "incoming"
    directory.mkdir()
    for path in MWA_DATA.glob(f"{obsid}*"):
        shutil.copy(path, directory / path.name)
    return directory


def test_metafits_missing_keys_names_file_and_keys(session: Session, tmp_path: Path) -> None:
    directory = _copy_obs(tmp_path, "1320409688")
    metafits = directory / "1320409688.metafits"
    with fits.open(metafits, mode="update") as hdus:
        del hdus[0].header["EXPOSURE"]
        del hdus[0].header["RA"]
    storage = Storage(tmp_path / "archive")
    with pytest.raises(IngestError) as caught:
        ingest_directory(session, storage, directory)
    message = str(caught.value)
    assert "1320409688.metafits" in message and "EXPOSURE" in message and "RA" in message
    session.rollback()
    assert _counts(session) == (0, 0)
    assert storage.list() == []


def test_unreadable_data_file_rolls_back_everything(session: Session, tmp_path: Path) -> None:
    directory = _copy_obs(tmp_path, "1131733552")
    broken = directory / "1131733552_20151116182637_mini_gpubox06_01.fits"
    broken.write_bytes(b"this is not FITS")
    storage = Storage(tmp_path / "archive")
    with pytest.raises(IngestError) as caught:
        ingest_directory(session, storage, directory)
    assert broken.name in str(caught.value)
    assert "not a readable FITS file" in str(caught.value)
    session.rollback()
    assert _counts(session) == (0, 0)
    assert storage.list() == []


def test_data_without_metafits_is_refused(session: Session, tmp_path: Path) -> None:
    directory = tmp_path / "incoming"
    directory.mkdir()
    shutil.copy(MWA_DATA / "1061315448_20130823175130_mini_gpubox07_01.fits", directory)
    with pytest.raises(IngestError, match="no metafits for observation 1061315448"):
        ingest_directory(session, Storage(tmp_path / "archive"), directory)


def test_changed_contents_are_refused(session: Session, tmp_path: Path) -> None:
    storage = Storage(tmp_path / "archive")
    directory = _copy_obs(tmp_path, "1061315448")
    ingest_directory(session, storage, directory)
    session.commit()
    data = directory / "1061315448_20130823175130_mini_gpubox07_01.fits"
    with fits.open(data, mode="update") as hdus:
        hdus[0].header["MARKER"] = 99
    with pytest.raises(IngestError, match="different contents"):
        ingest_directory(session, storage, directory)


def test_an_mwax_flag_file_is_named_by_its_receiver_channel(
    session: Session, tmp_path: Path
) -> None:
    """Birli names an MWAX observation's .mwaf by receiver channel (<obsid>_137.mwaf): ingest
    read 137 as a gpubox number and refused the whole directory."""
    directory = _copy_obs(tmp_path, "1320409688")
    for channel in (137, 99):  # 99 is not one of the observation's channels
        flags = directory / f"1320409688_{channel}.mwaf"
        shutil.copy(MWA_DATA / "1131733552_mini_06.mwaf", flags)
        with fits.open(flags, mode="update") as hdus:
            for key in ("OBSID", "GPSTIME"):
                if key in hdus[0].header:
                    hdus[0].header[key] = 1320409688
    with pytest.raises(
        IngestError, match=r"receiver channel 99 is not one of observation 1320409688"
    ):
        ingest_directory(session, Storage(tmp_path / "archive"), directory)
    session.rollback()
    (directory / "1320409688_99.mwaf").unlink()
    ingest_directory(session, Storage(tmp_path / "archive"), directory)
    (flag_file,) = [
        f for f in get_observation(session, 1320409688).files if f.kind == FileKind.MWAF
    ]
    assert flag_file.coarse_chan == 137


def test_one_name_found_twice_is_archived_once_or_refused(session: Session, tmp_path: Path) -> None:
    """A second file of one name (another subdirectory) was dropped, counted as archived."""
    directory = _copy_obs(tmp_path, "1131733552")
    (directory / "b").mkdir()
    shutil.copy(directory / "1131733552_mini_01.mwaf", directory / "b" / "1131733552_mini_01.mwaf")
    report = ingest_directory(session, Storage(tmp_path / "archive"), directory)
    assert (str(directory / "b" / "1131733552_mini_01.mwaf"),
            f"the same file as {directory / '1131733552_mini_01.mwaf'}") in report.skipped  # fmt: skip
    session.rollback()
    other = directory / "b" / "1131733552_mini_01.mwaf"
    with fits.open(other, mode="update") as hdus:
        hdus[0].header["MARKER"] = 1
    with pytest.raises(IngestError, match="has this name with other contents"):
        ingest_directory(session, Storage(tmp_path / "archive2"), directory)
    assert _counts(session) == (0, 0)


def test_obsid_mismatch_is_refused(session: Session, tmp_path: Path) -> None:
    directory = tmp_path / "incoming"
    directory.mkdir()
    shutil.copy(MWA_DATA / "1061315448.metafits", directory / "1061315448.metafits")
    shutil.copy(
        MWA_DATA / "1131733552_20151116182537_mini_gpubox01_00.fits",
        directory / "1061315448_20151116182537_gpubox01_00.fits",
    )
    with pytest.raises(IngestError, match="header says obsid 1131733552"):
        ingest_directory(session, Storage(tmp_path / "archive"), directory)


def test_not_a_directory(session: Session, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="is not a directory"):
        ingest_directory(session, Storage(tmp_path / "archive"), tmp_path / "missing")


@pytest.mark.parametrize(
    ("name", "kind", "chan", "batch"),
    [
        ("1320409688_20211108122750_ch137_000.fits", FileKind.MWAX_VIS, 137, 0),
        ("1101503312_20141201210818_gpubox01_00.fits", FileKind.LEGACY_GPUBOX, None, 0),
        ("1101503312_20141201210818_gpubox01.fits", FileKind.LEGACY_GPUBOX, None, 0),
        ("1320409688.metafits", FileKind.METAFITS, None, None),
        ("1320409688_metafits.fits", FileKind.METAFITS, None, None),
        ("1131733552_metafits_ppds.fits", FileKind.PPDS, None, None),
        ("1320409688_1320409696_137.sub", FileKind.VOLTAGE, 137, None),
        ("1101503312_1101503312_ch123.dat", FileKind.VOLTAGE, 123, None),
        ("1320409688_truth.json", FileKind.SIM_TRUTH, None, None),
    ],
)
def test_file_names(name: str, kind: FileKind, chan: int | None, batch: int | None) -> None:
    parsed = parse_file_name(name)
    assert parsed is not None
    assert (parsed.kind, parsed.coarse_chan, parsed.batch) == (kind, chan, batch)
    assert parsed.note is None


@pytest.mark.parametrize(
    "name", ["README.md", "1320409688.fits", "132040968_x.metafits", "abc.sub"]
)
def test_not_mwa_names(name: str) -> None:
    assert parse_file_name(name) is None


def test_legacy_channel_order() -> None:
    assert legacy_gpubox_channels([127, 128, 129, 130]) == [127, 128, 130, 129]


def test_files_of_channels_the_metafits_does_not_list_are_skipped(
    session: Session, tmp_path: Path
) -> None:
    """One obsid simulated twice into a directory (channels 133 and 134, then 140): the
    metafits was written again, the old files stayed and were registered, and mwalib then
    panicked (aborting the process) on opening them. The same for a voltage sub-file of a
    channel the metafits does not list and a legacy gpubox number beyond the channel count."""
    from observatory.telescope.simulator import simulate_observation

    obsid = 1480000032
    directory = _copy_obs(tmp_path, "1131733552")  # 24 coarse channels: gpubox01..24
    simulate_observation(directory, obsid, n_tiles=4, coarse_chans=(133, 134), n_timesteps=1)
    again = simulate_observation(directory, obsid, n_tiles=4, coarse_chans=(140,), n_timesteps=1)
    stale = sorted(p for p in directory.glob(f"{obsid}_*_ch13[34]_000.fits"))
    assert len(stale) == 2
    subfile = directory / f"{obsid}_{obsid}_133.sub"
    subfile.write_bytes(b"\0" * 4096)
    gpubox25 = directory / "1131733552_20151116182537_mini_gpubox25_00.fits"
    shutil.copy(directory / "1131733552_20151116182537_mini_gpubox01_00.fits", gpubox25)
    storage = Storage(tmp_path / "archive")

    for _ in range(2):  # and again: still skipped, nothing refused
        report = ingest_directory(session, storage, directory)
        session.commit()
        reasons = dict(report.skipped)
        for path, channel in [(stale[0], 133), (stale[1], 134), (subfile, 133)]:
            assert reasons[str(path)].startswith(
                f"receiver channel {channel} is not one of observation {obsid}'s channels (140)"
            )
        assert reasons[str(gpubox25)].startswith(
            "gpubox number 25 is not in 1..24 (observation 1131733552 has 24 coarse channels)"
        )
        assert all("not registered" in reasons[str(p)] for p in [*stale, subfile, gpubox25])

    names = sorted(f.name for f in get_observation(session, obsid).files)
    assert names == sorted(f.path.name for f in again.files)
    legacy = {f.name for f in get_observation(session, 1131733552).files}
    assert gpubox25.name not in legacy and len(legacy) == 6
    assert not any(key.endswith((".sub", "_ch133_000.fits", "_ch134_000.fits"))
                   for key in storage.list())  # fmt: skip
