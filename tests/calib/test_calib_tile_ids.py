"""Which tiles, not only how many: a fit (or calibrator) of the target's number of tiles but
other tiles is refused whenever the tile ids of both are known.

AO-cal solutions are indexed by metafits antenna index, so the solutions of a calibrator
observed with a tile swapped for maintenance (or in the other 128-tile configuration) would
otherwise be applied, silently, to the wrong tiles.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits as pyfits
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.archive.models import FileKind, Observation, ObservationFile
from observatory.archive.service import ingest_directory
from observatory.calib import requests, service
from observatory.calib.formats import CalSolutions
from observatory.calib.models import CalibrationRequest
from observatory.core.config import Settings
from observatory.core.errors import BadRequest, NotFound
from observatory.core.storage import Storage
from observatory.telescope.instrument import tile_layout
from observatory.telescope.simulator import simulate_observation

TARGET = 1_400_000_000
CHAN = 109
LAYOUT = [t.tile_id for t in tile_layout()]
#: The target's 8 tiles, in antenna order (a metafits numbers antennas by tile id).
TILES = sorted(LAYOUT[:8])
#: As many tiles, one swapped for another (maintenance): the same count, other tiles.
SWAPPED = sorted([*LAYOUT[:7], LAYOUT[8]])
#: A calibrator 300 s before the target with SWAPPED tiles, one 900 s after with TILES.
NEAR, FAR = TARGET - 300, TARGET + 900
#: A calibrator 200 s before, only in the schedule (no metafits), whose fit has the
#: target's tiles in another antenna order (a re-cabled array).
PERMUTED = TARGET - 200


def archive(
    session: Session,
    settings: Settings,
    tmp_path: Path,
    obsid: int,
    tiles: Sequence[int],
    *,
    calibrator: str | None = "HydA",
) -> None:
    """Simulate an observation of ``tiles`` (metafits and one data file) and ingest it."""
    out = tmp_path / f"sim_{obsid}"
    simulate_observation(out, obsid, tile_ids=tiles, coarse_chans=(CHAN,), n_timesteps=1,
                         calibrator=calibrator)  # fmt: skip
    ingest_directory(session, Storage(settings.archive_dir), out)
    session.flush()


def schedule(session: Session, obsid: int, *, calibration: bool, n_tiles: int = 8) -> None:
    """An observation only in the schedule (no metafits archived: its tile ids are unknown)."""
    session.add(Observation(obsid=obsid, stoptime=obsid + 120, mode="MWAX_CORRELATOR",
                            coarse_chans=[CHAN], n_tiles=n_tiles, atten_db=1.0,
                            calibration=calibration,
                            calibrator_source="HydA" if calibration else None))  # fmt: skip
    session.flush()


def add_fit(session: Session, settings: Settings, calid: int, tiles: Sequence[int]) -> int:
    """A fit of ``calid`` with a calibrated row per tile, ``tiles`` in antenna order."""
    jones = np.ones((1, len(tiles), 8, 4), dtype=np.complex128)
    rows = [{"tileid": tile, "antenna": antenna, "x_delay_m": 0.1, "y_delay_m": -0.1}
            for antenna, tile in enumerate(tiles)]  # fmt: skip
    solutions = CalSolutions(jones=jones, obsid=calid)
    return service.store_fit(session, settings, calid, solutions, rows).fitid


@pytest.fixture
def fits(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> dict[str, int]:
    """The archived target, its calibrators and their fits (see NEAR, FAR, PERMUTED)."""
    assert len(SWAPPED) == len(TILES) and SWAPPED != TILES
    with session_factory() as session:
        archive(session, settings, tmp_path, TARGET, TILES, calibrator=None)
        archive(session, settings, tmp_path, NEAR, SWAPPED)
        archive(session, settings, tmp_path, FAR, TILES)
        schedule(session, PERMUTED, calibration=True)
        ids = {
            "near": add_fit(session, settings, NEAR, SWAPPED),
            "far": add_fit(session, settings, FAR, TILES),
            "permuted": add_fit(session, settings, PERMUTED, TILES[::-1]),
        }
        session.commit()
    return ids


def test_a_fit_of_other_tiles_is_refused(
    settings: Settings, session_factory: sessionmaker[Session], fits: dict[str, int]
) -> None:
    """Same number of tiles, other tiles (or other antenna order): never the choice."""
    with session_factory() as session:
        target = session.get(Observation, TARGET)
        assert target is not None and target.n_tiles == 8
        _, fit = service.best_fit(session, TARGET, settings=settings)
        assert fit.fitid == fits["far"]  # the same tile ids: accepted, though farthest
        chosen = service.candidate_fits(session, target, settings=settings)
        assert [c.fitid for c in chosen] == [fits["far"]]
        with pytest.raises(NotFound, match=r"; 2 within range passed over: 2 for other tiles$"):
            service.best_fit(session, TARGET, max_time_separation_s=600, settings=settings)
        # Named by the user: a 400 listing both arrays' tile ids in antenna order.
        with pytest.raises(BadRequest, match="applied to other tiles") as refused:
            service.best_fit(session, TARGET, prefer_fitid=fits["near"], settings=settings)
        assert refused.value.extra == {"obs_id_tile_ids": TILES, "fit_tile_ids": SWAPPED}
        assert (
            f"antenna 7 is tile {SWAPPED[7]} in the fit, tile {TILES[7]} in"
            in refused.value.message
        )
        with pytest.raises(BadRequest, match="8 of 8 antenna indices differ"):
            service.best_fit(session, TARGET, prefer_fitid=fits["permuted"], settings=settings)
        _, preferred = service.best_fit(
            session, TARGET, prefer_fitid=fits["far"], max_time_separation_s=0, settings=settings
        )
        assert preferred.fitid == fits["far"]


def test_a_calibrator_of_other_tiles_is_not_requested(
    settings: Settings, session_factory: sessionmaker[Session], fits: dict[str, int]
) -> None:
    """A fit request takes the calibrator whose metafits has the target's tiles."""
    with session_factory() as session:
        target = session.get(Observation, TARGET)
        assert target is not None
        calibrator = requests.best_calibrator(session, target, 86_400, settings=settings)
        assert calibrator.obsid == FAR
        with pytest.raises(NotFound, match=r"; 1 within range passed over: 1 for other tiles$"):
            requests.best_calibrator(session, target, 600, settings=settings)
        request = requests.add_cal_request(session, settings, TARGET)
        assert request.cal_id == FAR


def test_the_services_refuse_other_tiles(
    settings: Settings, session_factory: sessionmaker[Session], fits: dict[str, int]
) -> None:
    """get_cal_solution, get_cal_fits, get_calfile_for_obsid and add_cal_request."""
    with TestClient(create_app(settings)) as client:
        reply = client.get("/calib/get_cal_solution", params={"obs_id": TARGET})
        assert reply.status_code == 200
        assert reply.headers["x-calibration-fit-id"] == str(fits["far"])
        near = client.get(
            "/calib/get_cal_solution", params={"obs_id": TARGET, "max_time_separation": 600}
        )
        assert near.status_code == 404
        assert near.json()["error"].endswith("; 2 within range passed over: 2 for other tiles")
        listed = client.get("/calib/get_cal_fits", params={"obs_id": TARGET})
        assert list(listed.json()) == [str(fits["far"])]
        preferred = client.get(
            "/calib/get_cal_solution", params={"obs_id": TARGET, "prefer_fitid": fits["near"]}
        )
        assert preferred.status_code == 400
        body = preferred.json()
        assert "other tiles" in body["error"]
        assert body["obs_id_tile_ids"] == TILES and body["fit_tile_ids"] == SWAPPED
        deprecated = client.get("/calib/get_calfile_for_obsid", params={"obs_id": TARGET})
        assert deprecated.status_code == 200
        with zipfile.ZipFile(io.BytesIO(deprecated.content)) as archived:
            metafits = archived.read(f"{TARGET}.metafits")
        with pyfits.open(io.BytesIO(metafits)) as hdus:
            assert hdus["CALIBDATA"].header["CALFITUS"] == fits["far"]
        assert client.get("/calib/add_cal_request", params={"obs_id": TARGET}).status_code == 200
    with session_factory() as session:
        filed = session.scalars(select(CalibrationRequest)).all()
        assert [r.cal_id for r in filed] == [FAR]


def test_unknown_tile_ids_fall_back_to_the_number_of_tiles(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """A target whose metafits is not archived: the count rule, as before (4 tiles refused)."""
    with session_factory() as session:
        schedule(session, TARGET, calibration=False)
        archive(session, settings, tmp_path, NEAR, SWAPPED)
        schedule(session, TARGET - 100, calibration=True, n_tiles=4)
        near = add_fit(session, settings, NEAR, SWAPPED)
        add_fit(session, settings, TARGET - 100, TILES[:4])
        session.commit()
        target = session.get(Observation, TARGET)
        assert target is not None
        _, fit = service.best_fit(session, TARGET, settings=settings)
        assert fit.fitid == near
        with pytest.raises(
            NotFound, match=r"; 1 within range passed over: 1 for another number of tiles$"
        ):
            service.best_fit(session, TARGET, max_time_separation_s=200, settings=settings)
        _, preferred = service.best_fit(session, TARGET, prefer_fitid=near, settings=settings)
        assert preferred.fitid == near
        assert requests.best_calibrator(session, target, 86_400, settings=settings).obsid == NEAR


def test_without_settings_the_number_of_tiles_is_the_rule(
    session_factory: sessionmaker[Session], fits: dict[str, int]
) -> None:
    """A caller with no archive at hand (no settings): tile ids unknown, counts compared."""
    with session_factory() as session:
        _, fit = service.best_fit(session, TARGET)
        assert fit.fitid == fits["permuted"]  # the nearest of 8 tiles
        target = session.get(Observation, TARGET)
        assert target is not None
        assert requests.best_calibrator(session, target, 86_400).obsid == NEAR


@pytest.fixture
def metafits_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], int]]:
    """How many metafits TILEDATA tables have been read since (the cache emptied first)."""
    read: list[object] = []
    original = service.metafits_inputs

    def counting(metafits: object) -> list[service.MetafitsInput]:
        read.append(metafits)
        return original(metafits)  # type: ignore[arg-type]

    monkeypatch.setattr(service, "metafits_inputs", counting)
    service._archived_tiles.cache_clear()
    yield lambda: len(read)
    service._archived_tiles.cache_clear()


def test_the_metafits_are_read_once_not_per_candidate(
    settings: Settings,
    session_factory: sessionmaker[Session],
    fits: dict[str, int],
    metafits_reads: Callable[[], int],
) -> None:
    """Many fits in range: the target's metafits is read once; a fit's tiles are its rows."""
    with session_factory() as session:
        for calid, tiles in ((NEAR, SWAPPED), (FAR, TILES), (PERMUTED, TILES[::-1])):
            for _ in range(3):
                add_fit(session, settings, calid, tiles)
        session.commit()
        target = session.get(Observation, TARGET)
        assert target is not None
        _, fit = service.best_fit(session, TARGET, settings=settings)
        assert fit.obsid == FAR and metafits_reads() == 1  # 12 fits, 1 read: the target's
        assert len(service.candidate_fits(session, target, settings=settings)) == 4
        assert metafits_reads() == 1  # cached while the file is unchanged
        # A fit request reads each calibrator's metafits (once), not a fit's.
        assert requests.best_calibrator(session, target, 86_400, settings=settings).obsid == FAR
        assert metafits_reads() == 3
        requests.best_calibrator(session, target, 86_400, settings=settings)
        assert metafits_reads() == 3


def test_a_recorded_calibrator_without_metafits_is_compared_by_count(
    settings: Settings, session_factory: sessionmaker[Session], fits: dict[str, int]
) -> None:
    """Correlator data but no metafits archived: its tile ids are unknown, so it may be taken."""
    with session_factory() as session:
        session.add(ObservationFile(obsid=PERMUTED, name=f"{PERMUTED}_ch{CHAN}_000.fits",
                                    kind=FileKind.MWAX_VIS, size_bytes=1, sha1="0" * 40,
                                    storage_key=f"{PERMUTED}/x.fits"))  # fmt: skip
        session.commit()
        target = session.get(Observation, TARGET)
        assert target is not None
        calibrator = requests.best_calibrator(session, target, 86_400, settings=settings)
        assert calibrator.obsid == PERMUTED
