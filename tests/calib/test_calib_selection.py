"""Choosing the best calibration fit for an observation, and the zip get_cal_solution answers."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.calib import service
from observatory.calib.formats import CalSolutions, read_aocal, read_hyperdrive
from observatory.core.config import Settings
from observatory.telescope.instrument import SPEED_OF_LIGHT_M_S, fine_chan_freqs_hz, tile_layout
from servers import threaded_app_server

TARGET = 1_400_000_000
CHANS = list(range(109, 133))
OTHER_CHANS = list(range(133, 157))
TILES = [t.tile_id for t in tile_layout()[:4]]


def add_obs(session: Session, obsid: int, *, calibration: bool = True, chans: list[int] = CHANS,
            atten: float | None = 1.0) -> None:  # fmt: skip
    session.add(Observation(obsid=obsid, stoptime=obsid + 120, mode="MWAX_CORRELATOR", obsname=f"obs {obsid}",
                            coarse_chans=chans, atten_db=atten, calibration=calibration,
                            calibrator_source="HydA" if calibration else None))  # fmt: skip


def tile_rows(delays_m: list[float], flagged: set[int] = frozenset()) -> list[dict[str, Any]]:  # type: ignore[assignment]
    rows = []
    for antenna, (tileid, delay) in enumerate(zip(TILES, delays_m, strict=True)):
        bad = tileid in flagged
        value = float("nan") if bad else delay
        rows.append({
            "tileid": tileid, "antenna": antenna,
            "x_delay_m": value, "x_intercept": float("nan") if bad else 0.3,
            "y_delay_m": value, "y_intercept": float("nan") if bad else -0.2,
            "x_gains": [float("nan") if bad else 0.5] * 24, "y_gains": [float("nan") if bad else 0.25] * 24,
            "x_gains_pol0": [float("nan") if bad else 0.5] * 24, "x_gains_pol1": [0.0] * 24,
            "y_gains_pol0": [float("nan") if bad else 0.25] * 24, "y_gains_pol1": [0.0] * 24,
        })  # fmt: skip
    return rows


def add_fit(
    session: Session, settings: Settings, calid: int, flagged: set[int] = frozenset()
) -> int:  # type: ignore[assignment]
    jones = np.ones((1, len(TILES), 8, 4), dtype=np.complex128)
    jones[:, :, :, 1:3] = 0
    for tile in flagged:
        jones[:, TILES.index(tile)] = np.nan
    fit = service.store_fit(session, settings, calid, CalSolutions(jones=jones, obsid=calid),
                            tile_rows([0.1, -0.2, 0.3, 0.0], flagged), code_version="test")  # fmt: skip
    return fit.fitid


@pytest.fixture
def fits(settings: Settings, session_factory: sessionmaker[Session]) -> dict[str, int]:
    """A target and calibrators around it, with fits."""
    with session_factory() as session:
        add_obs(session, TARGET, calibration=False)
        layout = {
            "before": TARGET - 3600,
            "after": TARGET + 1800,
            "other_chans": TARGET - 600,
            "other_atten": TARGET - 300,
            "far": TARGET - 100_000,
            "not_a_calibrator": TARGET - 60,
        }
        for name, obsid in layout.items():
            add_obs(session, obsid, calibration=name != "not_a_calibrator",
                    chans=OTHER_CHANS if name == "other_chans" else CHANS,
                    atten=2.0 if name == "other_atten" else 1.0)  # fmt: skip
        session.flush()
        ids = {
            name: add_fit(session, settings, obsid, flagged={TILES[1]})
            for name, obsid in layout.items()
        }
        ids["before_newer"] = add_fit(session, settings, layout["before"])
        session.commit()
    return ids


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, "after"),  # the nearest, after the target allowed (the default)
        ({"allow_after": False}, "before_newer"),  # before it: the newest of two fits
        ({"max_time_separation_s": 1000}, None),  # nothing that near with the same settings
        ({"max_time_separation_s": 200_000, "allow_after": False}, "before_newer"),
    ],
)
def test_selection_rule(
    fits: dict[str, int],
    session_factory: sessionmaker[Session],
    params: dict[str, Any],
    expected: str | None,
) -> None:
    with session_factory() as session:
        if expected is None:
            with pytest.raises(service.NotFound, match="no calibration fit"):
                service.best_fit(session, TARGET, **params)
            return
        _, fit = service.best_fit(session, TARGET, **params)
        assert fit.fitid == fits[expected]


def test_what_is_never_chosen(fits: dict[str, int], session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        target = session.get(Observation, TARGET)
        assert target is not None
        chosen = {
            c.fitid for c in service.candidate_fits(session, target, max_time_separation_s=10**6)
        }
        assert fits["other_chans"] not in chosen and fits["other_atten"] not in chosen
        assert fits["not_a_calibrator"] not in chosen and fits["far"] in chosen
        target.atten_db = None  # unknown attenuation: not a criterion
        chosen = {c.fitid for c in service.candidate_fits(session, target)}
        assert fits["other_atten"] in chosen
        # A calibrator asking for its own fit: its start time and no separation.
        _, own = service.best_fit(session, TARGET - 3600, max_time_separation_s=0)
        assert own.fitid == fits["before_newer"]
        _, preferred = service.best_fit(session, TARGET, prefer_fitid=fits["far"])
        assert preferred.fitid == fits["far"]
        with pytest.raises(service.NotFound, match="prefer_fitid"):
            service.best_fit(session, TARGET, prefer_fitid=12345)
        with pytest.raises(service.BadRequest, match="does not exist"):
            service.best_fit(session, 1_399_999_992)


@pytest.fixture
def client(settings: Settings, fits: dict[str, int]) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_get_cal_solution_zip(client: TestClient, fits: dict[str, int], tmp_path: Path) -> None:
    reply = client.get("/calib/get_cal_solution", params={"obs_id": TARGET})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/zip"
    calid = TARGET + 1800
    with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
        assert sorted(archive.namelist()) == sorted(
            [f"{calid}.bin", f"{TARGET}_flagged_tiles.txt", f"{TARGET}_flags.py"]
        )
        assert archive.read(f"{TARGET}_flagged_tiles.txt").decode() == f"{TILES[1]}\n"
        (tmp_path / "sol.bin").write_bytes(archive.read(f"{calid}.bin"))
        script = archive.read(f"{TARGET}_flags.py").decode()
    assert read_aocal(tmp_path / "sol.bin").n_antennas == len(TILES)
    # The flag script runs: CASA's flagdata gets the failed tile's name.
    calls: list[dict[str, Any]] = []
    namespace = {"__name__": "__main__", "flagdata": lambda **kw: calls.append(kw)}
    import sys

    argv, sys.argv = sys.argv, ["flags.py", "target.ms"]
    try:
        exec(compile(script, "flags.py", "exec"), namespace)
    finally:
        sys.argv = argv
    name = next(t.tile_name for t in tile_layout() if t.tile_id == TILES[1])
    assert calls == [{"vis": "target.ms", "mode": "manual", "antenna": name, "flagbackup": True}]

    assert (
        client.get("/calib/get_cal_solution", params={"obs_id": 1_399_999_992}).status_code == 400
    )
    assert client.get("/calib/get_cal_solution", params={"obs_id": "abc"}).status_code == 400
    far = client.get(
        "/calib/get_cal_solution", params={"obs_id": TARGET, "max_time_separation": 100}
    )
    assert far.status_code == 404 and "no calibration fit" in far.json()["error"]
    assert (
        client.get(
            "/calib/get_cal_solution", params={"obs_id": TARGET, "allow_after": "yes"}
        ).status_code
        == 400
    )
    assert (
        client.get(
            "/calib/get_cal_solution", params={"obs_id": TARGET, "output_format": "csv"}
        ).status_code
        == 400
    )
    before = client.get("/calib/get_cal_solution", params={"obs_id": TARGET, "allow_after": 0})
    assert before.headers["x-calibration-fit-id"] == str(fits["before_newer"])
    # A form's blanks are the defaults, output_format's as the others'.
    blanks = {name: "" for name in ("prefer_fitid", "max_time_separation", "allow_after",
                                    "nocache", "output_format")}  # fmt: skip
    blank = client.get("/calib/get_cal_solution", params={"obs_id": TARGET, **blanks})
    default = client.get("/calib/get_cal_solution", params={"obs_id": TARGET})
    assert blank.status_code == 200, blank.text
    assert blank.content == default.content


def test_head_is_answered_as_the_get_without_its_body(
    settings: Settings, fits: dict[str, int]
) -> None:
    """Served by uvicorn: HEAD was a 405 wherever a route declares only GET (RFC 9110 asks
    every general-purpose server to answer it); routes that declare HEAD keep theirs."""
    with threaded_app_server(create_app(settings)) as base, httpx.Client(base_url=base) as http:
        url = f"/calib/get_cal_solution?obs_id={TARGET}"
        got, head = http.get(url), http.head(url)
        assert got.status_code == head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(got.content))
        for name in ("content-type", "content-disposition", "x-calibration-fit-id"):
            assert head.headers[name] == got.headers[name]
        bad = http.head("/calib/get_cal_solution?obs_id=abc")
        assert bad.status_code == 400 and bad.content == b""
        assert http.head("/healthz").status_code == 200
        assert http.head("/api/api_login").status_code == 405  # POST only: no GET to answer
        assert http.head("/no/such/page").status_code == 404
        # The ASVO download declares HEAD itself: a forged link is refused there, not as a GET.
        assert http.head("/api/download/1/x.tar?token=x").status_code == 403


def test_nocache_rebuilds_the_solutions_from_the_fits(client: TestClient, tmp_path: Path) -> None:
    reply = client.get("/calib/get_cal_solution", params={"obs_id": TARGET, "nocache": 1})
    calid = TARGET + 1800
    with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
        (tmp_path / "rebuilt.bin").write_bytes(archive.read(f"{calid}.bin"))
    rebuilt = read_aocal(tmp_path / "rebuilt.bin")
    freqs = np.concatenate([fine_chan_freqs_hz(c, 40_000) for c in CHANS])
    assert rebuilt.n_chanblocks == len(freqs) == 24 * 32
    jones = rebuilt.jones[0]
    assert np.isnan(jones[1]).all()  # the tile that failed
    # Tile 0: delay_m 0.1 (length -0.1 m), intercept 0.3, gain line 0.5 -> |J| = 2.
    expected_phase = 2 * np.pi * freqs * (-0.1) / SPEED_OF_LIGHT_M_S + 0.3
    assert np.allclose(np.abs(jones[0, :, 0]), 2.0) and np.allclose(np.abs(jones[0, :, 3]), 4.0)
    assert np.allclose(np.angle(jones[0, :, 0] * np.exp(-1j * expected_phase)), 0.0, atol=1e-9)
    assert np.all(jones[0, :, 1:3] == 0)
    hyperdrive = client.get(
        "/calib/get_cal_solution", params={"obs_id": TARGET, "output_format": "hyperdrive"}
    )
    with zipfile.ZipFile(io.BytesIO(hyperdrive.content)) as archive:
        (tmp_path / "h.fits").write_bytes(archive.read(f"{calid}_solutions.fits"))
    assert read_hyperdrive(tmp_path / "h.fits").n_antennas == len(TILES)


def test_nocache_refuses_a_fit_with_delays_but_no_gains(
    client: TestClient, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """One chanblock per coarse channel: calvin fits delays but no gains, and the rebuilt
    solutions were NaN for every tile said calibrated (a whole target flagged)."""
    with session_factory() as session:
        jones = np.ones((1, len(TILES), 8, 4), dtype=np.complex128)
        rows = tile_rows([0.1, -0.2, 0.3, 0.0])
        for row in rows:
            for key in [k for k in row if "gains" in k]:
                row[key] = [float("nan")] * 24
        fitid = service.store_fit(session, settings, TARGET + 1800,
                                  CalSolutions(jones=jones, obsid=TARGET + 1800), rows,
                                  code_version="test").fitid  # fmt: skip
        session.commit()
    params = {"obs_id": TARGET, "prefer_fitid": fitid}
    refused = client.get("/calib/get_cal_solution", params={**params, "nocache": 1})
    assert refused.status_code == 400
    assert f"fit {fitid} has delays but no gains" in refused.json()["error"]
    assert client.get("/calib/get_cal_solution", params=params).status_code == 200  # cached


def test_get_cal_fits(client: TestClient, fits: dict[str, int]) -> None:
    reply = client.get("/calib/get_cal_fits", params={"obs_id": TARGET})
    assert reply.status_code == 200
    body = reply.json()
    assert next(iter(body)) == str(fits["after"])
    assert body[str(fits["before_newer"])] == [
        TARGET - 3600,
        3600,
        f"{fits['before_newer']}/{TARGET - 3600}_solutions.fits",
    ]
    assert str(fits["other_chans"]) not in body
    assert (
        client.get(
            "/calib/get_cal_fits", params={"obs_id": TARGET, "max_time_separation": 10}
        ).status_code
        == 404
    )


def test_get_cal_json_is_the_best_fit_and_its_tiles(
    client: TestClient, fits: dict[str, int]
) -> None:
    """The MWA's service answers get_cal_json with a fit, or 404 "no fit found" (specs/calib.md
    4): ours 404'd for every obsid."""
    reply = client.get("/calib/get_cal_json", params={"obs_id": TARGET})
    assert reply.status_code == 200, reply.text
    fit = reply.json()
    assert fit["fitid"] == fits["after"] and fit["cal_obs_id"] == TARGET + 1800
    assert fit["obs_id"] == TARGET and fit["time_separation_s"] == 1800
    assert fit["creator"] == "calvin" and fit["code_version"] == "test"
    assert fit["coarse_chans"] == CHANS and fit["flagged_tiles"] == [TILES[1]]
    names = {tile.tile_id: tile.tile_name for tile in tile_layout()}
    assert [(t["tileid"], t["tile_name"], t["antenna"]) for t in fit["solutions"]] == [
        (tile, names[tile], antenna) for antenna, tile in enumerate(TILES)
    ]
    first, flagged = fit["solutions"][0], fit["solutions"][1]
    assert first["x_delay_m"] == 0.1 and first["y_intercept"] == -0.2
    assert first["x_gains"] == [0.5] * 24 and first["y_gains_pol0"] == [0.25] * 24
    assert flagged["x_delay_m"] is None and flagged["x_gains"] == [None] * 24  # NaN: null
    # A calibrator's own fit; a preferred one; parameters as get_cal_solution's.
    own = client.get(
        "/calib/get_cal_json", params={"obs_id": TARGET - 3600, "max_time_separation": 0}
    )
    assert own.json()["fitid"] == fits["before_newer"] and own.json()["time_separation_s"] == 0
    preferred = client.get(
        "/calib/get_cal_json", params={"obs_id": TARGET, "prefer_fitid": fits["far"]}
    )
    assert preferred.json()["fitid"] == fits["far"]
    none_near = client.get(
        "/calib/get_cal_json", params={"obs_id": TARGET, "max_time_separation": 10}
    )
    assert none_near.status_code == 404 and "no calibration fit" in none_near.json()["error"]
    for bad in ({"obs_id": "x"}, {"obs_id": TARGET, "allow_after": "maybe"}):
        assert client.get("/calib/get_cal_json", params=bad).status_code == 400
    assert client.get("/calib/get_cal_json", params={"obs_id": 1_399_999_992}).status_code == 400


def test_a_fit_in_which_no_tile_calibrated_is_never_chosen(
    settings: Settings, fits: dict[str, int], session_factory: sessionmaker[Session]
) -> None:
    """The newest fit of the nearest calibrator, but every tile failed: not a solution (404 otherwise)."""
    with session_factory() as session:
        failed = add_fit(session, settings, TARGET + 1800, flagged=set(TILES))
        session.commit()
        target = session.get(Observation, TARGET)
        assert target is not None
        assert failed not in {c.fitid for c in service.candidate_fits(session, target)}
        _, fit = service.best_fit(session, TARGET)
        assert fit.fitid == fits["after"]  # the older fit of the same calibrator, which calibrated
        with pytest.raises(service.NotFound, match="no tile of it calibrated"):
            service.best_fit(session, TARGET, prefer_fitid=failed)
        # A calibrator whose only fit failed has no solution.
        add_obs(session, TARGET + 7200)
        session.flush()
        add_fit(session, settings, TARGET + 7200, flagged=set(TILES))
        session.commit()
        with pytest.raises(service.NotFound, match="no calibration fit"):
            service.best_fit(session, TARGET + 7200, max_time_separation_s=0)
    with TestClient(create_app(settings)) as client:
        reply = client.get("/calib/get_cal_solution", params={"obs_id": TARGET})
        assert reply.headers["x-calibration-fit-id"] == str(fits["after"])
        assert (
            str(failed) not in client.get("/calib/get_cal_fits", params={"obs_id": TARGET}).json()
        )
        own = client.get(
            "/calib/get_cal_solution", params={"obs_id": TARGET + 7200, "max_time_separation": 0}
        )
        assert own.status_code == 404
        preferred = client.get(
            "/calib/get_cal_solution", params={"obs_id": TARGET, "prefer_fitid": failed}
        )
        assert (
            preferred.status_code == 404 and "no tile of it calibrated" in preferred.json()["error"]
        )
        by_calid = client.get("/calib/get_calfile_for_calid", params={"cal_id": TARGET + 1800})
        assert by_calid.status_code == 200
        with zipfile.ZipFile(io.BytesIO(by_calid.content)) as archive:
            assert f"fit {fits['after']} of" in archive.read(f"{TARGET + 1800}_flags.py").decode()


def test_hyperdrive_output_is_the_fits_the_fit_stored(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """output_format=hyperdrive serves the fit's own FITS: obsid, frequencies, tile names and flags."""
    calid = TARGET - 1200
    freqs = np.concatenate([fine_chan_freqs_hz(c, 40_000) for c in CHANS[:1]])
    jones = np.ones((1, len(TILES), len(freqs), 4), dtype=np.complex128)
    jones[:, 2] = np.nan
    names = [t.tile_name for t in tile_layout()[:4]]
    with session_factory() as session:
        add_obs(session, TARGET, calibration=False)
        add_obs(session, calid)
        session.flush()
        solutions = CalSolutions(jones=jones, obsid=calid, chanblock_freqs_hz=freqs, tile_names=names,
                                 tile_flags=np.array([False, False, True, False]),
                                 start_gps=calid + 1.0, end_gps=calid + 119.0)  # fmt: skip
        fit = service.store_fit(
            session, settings, calid, solutions, tile_rows([0.1, -0.2, 0.3, 0.0], {TILES[2]})
        )
        session.commit()
        cached = service.solution_path(settings, fit)
        assert cached is not None
        stored = cached.with_name(f"{calid}_solutions.fits")
    with TestClient(create_app(settings)) as client:
        reply = client.get(
            "/calib/get_cal_solution", params={"obs_id": TARGET, "output_format": "hyperdrive"}
        )
        assert reply.status_code == 200
        with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
            served = archive.read(f"{calid}_solutions.fits")
    assert served == stored.read_bytes()
    (tmp_path / "served.fits").write_bytes(served)
    got = read_hyperdrive(tmp_path / "served.fits")
    assert got.obsid == calid and got.tile_names == names
    assert got.tile_flags is not None and list(got.tile_flags) == [False, False, True, False]
    assert got.chanblock_freqs_hz is not None and np.allclose(got.chanblock_freqs_hz, freqs)


def test_prefer_fitid_must_have_the_targets_coarse_channels(
    settings: Settings, fits: dict[str, int], session_factory: sessionmaker[Session]
) -> None:
    """The preferred fit is used however far, but not for other frequencies (400 naming both)."""
    with session_factory() as session:
        # The user's choice wins over time and attenuation ...
        for name in ("far", "other_atten", "before"):
            _, preferred = service.best_fit(
                session, TARGET, prefer_fitid=fits[name], max_time_separation_s=0
            )
            assert preferred.fitid == fits[name]
        # ... and a fit of the target's own observation is always its own frequencies.
        own = add_fit(session, settings, TARGET)
        session.commit()
        _, preferred = service.best_fit(session, TARGET, prefer_fitid=own)
        assert preferred.fitid == own
        _, preferred = service.best_fit(session, TARGET - 600, prefer_fitid=fits["other_chans"])
        assert preferred.fitid == fits["other_chans"]
        with pytest.raises(service.BadRequest, match="coarse channels") as refused:
            service.best_fit(session, TARGET, prefer_fitid=fits["other_chans"])
        assert refused.value.extra == {
            "obs_id_coarse_chans": CHANS,
            "fit_coarse_chans": OTHER_CHANS,
        }
        # A superset is not the same frequency setup either: the default choice's rule.
        add_obs(session, TARGET - 900, chans=CHANS + OTHER_CHANS)
        session.flush()
        wider = add_fit(session, settings, TARGET - 900)
        # A fit whose calibrator is not in the archive: its channels cannot be checked.
        orphan = add_fit(session, settings, TARGET - 1500)
        session.commit()
        with pytest.raises(service.BadRequest, match="coarse channels"):
            service.best_fit(session, TARGET, prefer_fitid=wider)
        with pytest.raises(service.NotFound, match="not in the archive"):
            service.best_fit(session, TARGET, prefer_fitid=orphan)
    with TestClient(create_app(settings)) as client:
        reply = client.get(
            "/calib/get_cal_solution",
            params={"obs_id": TARGET, "prefer_fitid": fits["other_chans"]},
        )
        assert reply.status_code == 400
        body = reply.json()
        assert body["error_code"] == 1
        assert str(fits["other_chans"]) in body["error"] and str(TARGET) in body["error"]
        assert body["obs_id_coarse_chans"] == CHANS and body["fit_coarse_chans"] == OTHER_CHANS
        far = client.get(
            "/calib/get_cal_solution",
            params={"obs_id": TARGET, "prefer_fitid": fits["far"], "max_time_separation": 0},
        )
        assert far.status_code == 200 and far.headers["x-calibration-fit-id"] == str(fits["far"])
        with zipfile.ZipFile(io.BytesIO(far.content)) as archive:
            assert f"{TARGET - 100_000}.bin" in archive.namelist()
        orphaned = client.get(
            "/calib/get_cal_solution", params={"obs_id": TARGET, "prefer_fitid": orphan}
        )
        assert orphaned.status_code == 404 and "not in the archive" in orphaned.json()["error"]


@pytest.mark.parametrize(
    "path", ["/calib/get_cal_solution", "/calib/get_cal_fits", "/calib/add_cal_request"]
)
def test_max_time_separation_beyond_the_archive_is_a_400_naming_the_limit(
    client: TestClient, fits: dict[str, int], path: str
) -> None:
    """A separation past every GPS second (here 2**63 - 1) is a 400, not an SQL overflow."""
    for huge in (str(2**63 - 1), str(service.MAX_TIME_SEPARATION_S + 1)):
        reply = client.get(path, params={"obs_id": TARGET, "max_time_separation": huge})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert "max_time_separation" in error and str(service.MAX_TIME_SEPARATION_S) in error
    if path.endswith("get_cal_fits"):  # the limit itself spans the whole archive
        widest = client.get(
            path, params={"obs_id": TARGET, "max_time_separation": service.MAX_TIME_SEPARATION_S}
        )
        assert widest.status_code == 200 and str(fits["far"]) in widest.json()


def add_fit_of_tiles(
    session: Session, settings: Settings, calid: int, n_tiles: int, n_calibrated: int | None = None
) -> int:
    """A fit of the first ``n_tiles`` tiles of the layout, the first ``n_calibrated`` (all) calibrated."""
    tiles = [t.tile_id for t in tile_layout()[:n_tiles]]
    jones = np.ones((1, n_tiles, 8, 4), dtype=np.complex128)
    n_good = n_tiles if n_calibrated is None else n_calibrated
    rows = [{"tileid": tile, "antenna": antenna, "x_delay_m": 0.1 if antenna < n_good else None,
             "y_delay_m": 0.1 if antenna < n_good else None}
            for antenna, tile in enumerate(tiles)]  # fmt: skip
    return service.store_fit(
        session, settings, calid, CalSolutions(jones=jones, obsid=calid), rows
    ).fitid


def test_a_fit_for_another_number_of_tiles_is_never_chosen(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """A 4-tile calibrator cannot calibrate an 8-tile target (AO-cal: one solution per antenna)."""
    from observatory.archive.models import FileKind, ObservationFile
    from observatory.calib import requests

    target = TARGET + 500_000
    with session_factory() as session:
        add_obs(session, target, calibration=False)
        for obsid in (target - 100, target + 600):  # 4 tiles near, 8 tiles farther
            add_obs(session, obsid)
            session.add(ObservationFile(obsid=obsid, name=f"{obsid}_ch109_000.fits", kind=FileKind.MWAX_VIS,
                                        size_bytes=1, sha1="0" * 40, storage_key=f"{obsid}/x.fits"))  # fmt: skip
        add_obs(session, target - 50)  # its tile count unknown: its fit's rows count
        session.flush()
        for obsid, n in ((target - 100, 4), (target + 600, 8), (target - 50, 4)):
            observation = session.get(Observation, obsid)
            assert observation is not None
            observation.n_tiles = n if obsid != target - 50 else None
        target_obs = session.get(Observation, target)
        assert target_obs is not None
        target_obs.n_tiles = 8
        four = add_fit_of_tiles(session, settings, target - 100, 4)
        unknown = add_fit_of_tiles(session, settings, target - 50, 4)
        eight = add_fit_of_tiles(session, settings, target + 600, 8)
        session.commit()

        _, fit = service.best_fit(session, target)
        assert fit.fitid == eight
        assert [c.fitid for c in service.candidate_fits(session, target_obs)] == [eight]
        with pytest.raises(service.NotFound, match="2 for another number of tiles"):
            service.best_fit(session, target, max_time_separation_s=200)
        for other in (four, unknown):
            with pytest.raises(service.BadRequest, match="with 4 tiles") as refused:
                service.best_fit(session, target, prefer_fitid=other)
            assert refused.value.extra == {"obs_id_tiles": 8, "fit_tiles": 4}
        # A fit request picks the 8-tile calibrator, though the 4-tile one is nearer.
        assert requests.best_calibrator(session, target_obs, 86_400).obsid == target + 600
        with pytest.raises(service.NotFound, match="1 for another number of tiles"):
            requests.best_calibrator(session, target_obs, 200)


def test_a_fit_in_which_few_tiles_calibrated_loses_to_a_full_one_a_little_further(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """1 of 8 tiles calibrated 400 s away, all 8 500 s away: the second (at least half needed)."""
    target = TARGET + 700_000
    with session_factory() as session:
        add_obs(session, target, calibration=False)
        for obsid in (target - 400, target + 500, target + 450):
            add_obs(session, obsid)
        session.flush()
        one = add_fit_of_tiles(session, settings, target - 400, 8, n_calibrated=1)
        full = add_fit_of_tiles(session, settings, target + 500, 8)
        half = add_fit_of_tiles(session, settings, target + 450, 8, n_calibrated=4)
        session.commit()
        target_obs = session.get(Observation, target)
        assert target_obs is not None
        # Half of the tiles is enough: then the nearest in time.
        assert [c.fitid for c in service.candidate_fits(session, target_obs)] == [half, full]
        with pytest.raises(service.NotFound, match="1 with under half of their tiles calibrated"):
            service.best_fit(session, target, max_time_separation_s=420)
        # A fit named by the user is used as long as a tile of it calibrated.
        _, chosen = service.best_fit(session, target, prefer_fitid=one)
        assert chosen.fitid == one


def test_zip_members_are_readable_by_all(client: TestClient, fits: dict[str, int]) -> None:
    """rw-r--r--, cached solution files (written 0600) included."""
    for params in ({}, {"nocache": 1}, {"output_format": "hyperdrive"}):
        reply = client.get("/calib/get_cal_solution", params={"obs_id": TARGET, **params})
        with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
            modes = {
                info.filename: (info.external_attr >> 16) & 0o777 for info in archive.infolist()
            }
        assert set(modes.values()) == {0o644}, (params, modes)
