"""Calibration against real MWA files: a metafits (1369821496: 144 tiles, 18 receivers)
served with a fit in it, the tiles' names and receivers, the rules of a tile's phase fit,
and real MWAX data (1320409688) too thin to fit."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from sqlalchemy.orm import Session, sessionmaker

from backends import sqlite_only
from observatory.archive.models import Observation
from observatory.archive.service import ingest_directory
from observatory.calib import service
from observatory.calib.formats import CalSolutions
from observatory.calib.models import CalibrationFit
from observatory.core.config import Settings
from observatory.core.storage import Storage
from shared_data import CALIB_DATA

REAL_OBS = 1_369_821_496
REAL_METAFITS = CALIB_DATA / f"{REAL_OBS}_metafits.fits"


def real_tiles() -> list[tuple[int, int, str, int]]:
    """(Antenna, Tile, TileName, Rx) of each tile of the real metafits, by Antenna."""
    with fits.open(REAL_METAFITS) as hdus:
        rows = hdus["TILEDATA"].data
        x = rows[rows["Pol"] == "X"]
        found = {
            int(a): (int(a), int(t), str(n), int(r))
            for a, t, n, r in zip(x["Antenna"], x["Tile"], x["TileName"], x["Rx"], strict=True)
        }
    return [found[a] for a in sorted(found)]


def store_real_fit(session: Session, settings: Settings) -> CalibrationFit:
    """A fit of 1369821496 with a row per metafits tile: delay = Tile id / 10000 m."""
    tiles = real_tiles()
    rows: list[dict[str, Any]] = [
        {"tileid": tile, "antenna": antenna, "x_delay_m": tile / 10_000, "y_delay_m": -tile / 10_000,
         "x_intercept": 0.1, "y_intercept": -0.1, "x_gains": [1.0] * 24, "y_gains": [1.0] * 24,
         "x_phase_fit_quality": 0.9, "y_phase_fit_quality": 0.9,
         "x_gains_fit_quality": 0.7, "y_gains_fit_quality": 0.6}
        for antenna, tile, _, _ in tiles
    ]  # fmt: skip
    jones = np.ones((1, len(tiles), 2, 4), dtype=np.complex128)
    solutions = CalSolutions(jones=jones, obsid=REAL_OBS)
    return service.store_fit(session, settings, REAL_OBS, solutions, rows, code_version="test")


def ingest_real_metafits(session: Session, settings: Settings, tmp_path: Path) -> None:
    """Register the real metafits in the archive (a calibrator observation of HydA)."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    shutil.copy(REAL_METAFITS, incoming / REAL_METAFITS.name)
    ingest_directory(session, Storage(settings.archive_dir), incoming)
    session.flush()
    observation = session.get(Observation, REAL_OBS)
    assert observation is not None and observation.calibration


def test_the_metafits_with_a_fit_opens_in_mwalib_and_the_converter(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """CALFITID is the fit's Unix second (mwalib reads it as 32 bits); the full id is CALFITUS."""
    import mwalib

    from observatory.preprocess.reader import read_metadata

    with session_factory() as session:
        fit = store_real_fit(session, settings)
        session.commit()
        assert fit.fitid > 2**31  # Unix microseconds: 16 digits
        served = tmp_path / f"{REAL_OBS}_with_calib.metafits"
        served.write_bytes(service.metafits_with_calibdata(REAL_METAFITS, fit, REAL_OBS))
        fitid = fit.fitid
    with fits.open(served) as hdus:
        header = hdus["CALIBDATA"].header
        assert header["CALFITUS"] == fitid
        assert header["CALFITID"] == fitid // 1_000_000 == service.fitid_unix_s(fitid)
    context = mwalib.MetafitsContext(str(served), None)
    assert context.num_calibration_fits == 2 * len(real_tiles())
    for calibration in context.calibration_fits:
        sign = 1 if calibration.rf_input.pol == mwalib.Pol.X else -1
        assert calibration.delay_metres == pytest.approx(
            sign * calibration.rf_input.tile_id / 10_000, abs=1e-6
        )
        # mwalib reads "Intercept" and "gain_fit_quality" (it read 0 from the MWA's names).
        assert calibration.intercept_metres == pytest.approx(sign * 0.1)  # radians
        assert calibration.gain_fit_quality == pytest.approx(0.7 if sign == 1 else 0.6)
    meta = read_metadata(served)  # the converter's reader (observatory preprocess --metafits)
    assert meta.obsid == REAL_OBS and len(meta.antenna_names) == len(real_tiles())
    # A legacy fit id in seconds is written as it is.
    assert service.fitid_unix_s(1_664_491_391) == 1_664_491_391


def real_meta_subset() -> Any:
    """The real metafits' metadata for 10 of its tiles: 2 flagged, 7 not, and the one with
    the longest cable (1815.85 m, a long-baseline tile's fibre); phase fits of all 144
    would take a minute."""
    from dataclasses import replace

    from observatory.preprocess.reader import read_metadata

    meta = read_metadata(REAL_METAFITS)
    flagged = np.flatnonzero(meta.flagged_antennas)[:2]
    longest = int(np.argmax(np.abs(meta.cable_length_m).max(axis=1)))
    kept = np.flatnonzero(~meta.flagged_antennas)
    chosen = np.sort(np.unique([*flagged, longest, *kept[:7]]))
    return replace(
        meta, antenna_names=tuple(meta.antenna_names[a] for a in chosen),
        antenna_numbers=tuple(meta.antenna_numbers[a] for a in chosen), enu_m=meta.enu_m[chosen],
        cable_length_m=meta.cable_length_m[chosen], flagged_antennas=meta.flagged_antennas[chosen],
        digital_gains=meta.digital_gains[chosen],
    )  # fmt: skip


def solved_real(gains: np.ndarray, freqs_hz: np.ndarray) -> Any:
    """A SolvedObservation of ``real_meta_subset``'s tiles with the given gains (chan, antenna, 2)."""
    from observatory.calib.solver import Solution
    from observatory.calib.solving import SolvedObservation

    n_chan = len(freqs_hz)
    solution = Solution(gains=gains, iterations=np.zeros((n_chan, 2), np.int64),
                        converged=np.ones((n_chan, 2), bool), precision=np.zeros((n_chan, 2)),
                        reference_antenna=0)  # fmt: skip
    return SolvedObservation(real_meta_subset(), freqs_hz, solution, 32, coarse_chans=(55, 60))


def test_tiles_whose_solutions_are_noise_or_impossible_delays_do_not_calibrate() -> None:
    """Noise phases, or a clean line beyond twice the longest cable, are no delay measurement."""
    from observatory.calib import pipeline
    from observatory.telescope.instrument import SPEED_OF_LIGHT_M_S, fine_chan_freqs_hz

    freqs = np.concatenate([fine_chan_freqs_hz(c, 40_000) for c in (55, 60)])
    rng = np.random.default_rng(5)
    meta = real_meta_subset()
    n_ants = meta.n_ants
    limit_m = pipeline.delay_limit_m(meta)
    assert limit_m == pytest.approx(2 * 1815.85, abs=0.01)  # the longest cable: 1815.85 m
    delays_m = rng.uniform(-1.0, 1.0, (n_ants, 2))
    usable = np.flatnonzero(~meta.flagged_antennas)
    noise_tile, far_tile = usable[3], usable[4]
    delays_m[far_tile] = limit_m + 50.0
    phases = -2 * np.pi * freqs[:, None, None] * delays_m[None] / SPEED_OF_LIGHT_M_S
    phases += rng.normal(0.0, 0.05, phases.shape)
    phases[:, noise_tile] = rng.uniform(-np.pi, np.pi, (len(freqs), 2))
    fitted = pipeline.tile_fits(solved_real(np.exp(1j * phases), freqs), 24)
    by_antenna = {row["antenna"]: row for row in fitted.rows}
    for bad in (noise_tile, far_tile):
        assert all(np.isnan(by_antenna[bad][f"{p}_delay_m"]) for p in "xy")  # type: ignore[arg-type]
    assert fitted.failures["flagged in the metafits"] == 2
    assert sum(n for reason, n in fitted.failures.items() if "beyond" in reason) == 1
    assert sum(fitted.failures.values()) == 2 + 2
    good = [a for a in usable if a not in (noise_tile, far_tile)]
    assert all(np.isfinite(by_antenna[a]["x_delay_m"]) for a in good)  # type: ignore[arg-type]

    # All noise: at most the reference tile (0 m against itself) is left; it is no fit.
    noise = np.exp(1j * rng.uniform(-np.pi, np.pi, (len(freqs), n_ants, 2)))
    fitted = pipeline.tile_fits(solved_real(noise, freqs), 24)
    assert not any(np.isfinite(row["x_delay_m"]) for row in fitted.rows)  # type: ignore[arg-type]


def test_receivers_and_names_are_the_calibrators_metafits(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """144 tiles on 18 receivers: HexE17 is on receiver 2 (the built-in layout says 3), and
    the long-baseline tiles the layout does not have (LBF1 ...) are on their own receivers."""
    from fastapi.testclient import TestClient

    from observatory.app import create_app

    tiles = {tile: (name, rx) for _, tile, name, rx in real_tiles()}
    with session_factory() as session:
        ingest_real_metafits(session, settings, tmp_path)
        fit = store_real_fit(session, settings)
        session.commit()
        known = service.observation_tiles(session, settings, REAL_OBS)
        residuals, medians = service.fit_residuals(fit, known)
        assert {(r.tileid, r.name, r.receiver) for r in residuals} == {
            (tile, name, rx) for tile, (name, rx) in tiles.items()
        }
        assert list(medians) == list(range(1, 19))
        hex_e17 = next(r for r in residuals if r.name == "HexE17")
        assert (hex_e17.tileid, hex_e17.receiver) == (1017, 2)
        assert service.tile_names([2041, 1017], known) == ["LBF1", "HexE17"]
        fitid = fit.fitid
    with TestClient(create_app(settings)) as client:
        page = client.get("/calib/fit", params={"fitid": fitid})
        assert page.status_code == 200 and "LBF1" in page.text and "rx18" in page.text
        assert "rx00" not in page.text and "unknown" not in page.text
        metrics = client.post("/calib/grafana/metrics", json={}).json()
        assert [m["value"] for m in metrics] == [f"rec{rx:02d}" for rx in range(1, 19)] + [
            "sources"
        ]
        frames = client.post("/calib/grafana/query", json={
            "range": {"from": "2023-06-03T09:00:00Z", "to": "2023-06-03T11:00:00Z"},
            "targets": [{"target": "rec02", "refId": "A", "payload": {"style": "tilemean"}}],
        }).json()  # fmt: skip
        names = {frame["schema"]["name"] for frame in frames}
        assert names == {name for name, rx in tiles.values() if rx == 2} and "HexE17" in names


@sqlite_only
def test_real_mwax_data_with_too_few_chanblocks_fails_saying_so(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """1320409688's mini file holds a single fine channel: the fit fails for want of
    chanblocks, not (as it said) because tiles were flagged."""
    from observatory.calib.pipeline import CalibrationFailed, fit_observation
    from shared_data import MWA_DATA

    incoming = tmp_path / "mwa"
    incoming.mkdir()
    for name in ("1320409688.metafits", "1320409688_20211108122750_mini_ch137_000.fits"):
        shutil.copy(MWA_DATA / name, incoming / name)
    with session_factory() as session:
        ingest_directory(session, Storage(settings.archive_dir), incoming)
        session.commit()
        with pytest.raises(CalibrationFailed, match=r"has [01] usable chanblock") as failed:
            fit_observation(session, settings, 1_320_409_688)
    assert "a delay fit needs at least 2" in str(failed.value)
    assert "flagged in the metafits" not in str(failed.value)
