"""The reference tile of a fit: recorded, shown, left out of the receivers' medians, and the
history views (timediff, xydiff, Grafana) put every fit on one reference where they can.

A fit's delays are relative to its reference tile (0 m there). When that tile is flagged the
reference moves, and every residual moved by the old reference's offset, with nothing
saying so: a flagged tile looked like a change of the whole array.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.calib import plots, service
from observatory.calib.formats import CalSolutions
from observatory.calib.models import CalibrationFit
from observatory.core.config import Settings
from observatory.core.gpstime import gps_to_utc_iso
from observatory.telescope.instrument import tile_layout

A, B, C = sorted(t.tile_id for t in tile_layout() if t.rx == 1)[:3]
NAMES = {t.tile_id: t.tile_name for t in tile_layout()}
#: Each tile's (X, Y) cable error: what every fit measures, relative to its reference.
CABLE_M = {A: (0.5, 0.1), B: (-0.3, 0.4), C: (1.2, -0.6)}
FIRST = 1_400_000_000
#: (reference, tiles flagged) of each fit, an hour apart: the reference moves to B while A
#: is referenced elsewhere (fit 2, a pipeline that took B) or flagged (fit 3).
FITS = [(A, ()), (B, ()), (B, (A,)), (A, ()), (A, ())]


def _rows(reference: int, flagged: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for antenna, tile in enumerate((A, B, C)):
        if tile in flagged:
            x = y = None
        else:
            x = CABLE_M[tile][0] - CABLE_M[reference][0]
            y = CABLE_M[tile][1] - CABLE_M[reference][1]
        rows.append({"tileid": tile, "antenna": antenna, "x_delay_m": x, "y_delay_m": y,
                     "x_phase_fit_quality": 0.8, "y_phase_fit_quality": 0.8})  # fmt: skip
    return rows


@pytest.fixture
def fitids(settings: Settings, session_factory: sessionmaker[Session]) -> list[int]:
    found = []
    with session_factory() as session:
        for number, (reference, flagged) in enumerate(FITS):
            obsid = FIRST + 3600 * number
            session.add(Observation(obsid=obsid, stoptime=obsid + 120, mode="MWAX_CORRELATOR",
                                    calibration=True, calibrator_source="HydA",
                                    coarse_chans=list(range(109, 133))))  # fmt: skip
            session.flush()
            fit = service.store_fit(
                session, settings, obsid, CalSolutions(jones=np.ones((1, 3, 4, 4), complex)),
                _rows(reference, flagged), reference_tileid=reference,
            )  # fmt: skip
            found.append(fit.fitid)
        session.commit()
    return found


@pytest.fixture
def client(settings: Settings, fitids: list[int]) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_the_fit_json_and_page_name_the_reference_and_its_receiver_medians_leave_it_out(
    client: TestClient, fitids: list[int]
) -> None:
    last = FIRST + 3600 * (len(FITS) - 1)
    reply = client.get("/calib/get_cal_json", params={"obs_id": last, "max_time_separation": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["reference_tileid"] == A
    assert reply.json()["reference_tile_name"] == NAMES[A]
    page = client.get("/calib/fit", params={"fitid": fitids[-1]})
    assert page.status_code == 200
    assert f"Delays are referenced to tile {A} ({NAMES[A]}" in page.text
    assert f"{NAMES[A]} (reference)" in page.text
    # rx01's medians: of B and C only, X and Y apart (pooled with A's two zeros: +0.000).
    x_median = np.median([CABLE_M[t][0] - CABLE_M[A][0] for t in (B, C)])
    y_median = np.median([CABLE_M[t][1] - CABLE_M[A][1] for t in (B, C)])
    row = f'<tr><td>rx01</td><td class="num">{x_median:+.3f}</td><td class="num">{y_median:+.3f}</td><td class="num">2/2</td></tr>'
    assert row in page.text, page.text


def test_receiver_medians_without_a_recorded_reference_keep_every_tile(
    settings: Settings, session_factory: sessionmaker[Session], fitids: list[int]
) -> None:
    with session_factory() as session:
        fit = session.get(CalibrationFit, fitids[0])
        assert fit is not None
        fit.reference_tileid = None
        residuals, medians = service.fit_residuals(fit, {})
        assert not any(r.reference for r in residuals)
        assert (medians[1].n_x, medians[1].n_y) == (3, 3)


def test_rereference_moves_each_fit_by_its_delays_of_the_common_tile() -> None:
    fitids = np.array([1, 1, 1, 2, 2, 2, 3, 3])
    tiles = np.array([A, B, C, A, B, C, B, C])
    x = np.array([0.0, -0.8, 0.7, 0.8, 0.0, 1.5, 0.0, 1.5])
    y = np.array([0.0, 0.3, -0.7, -0.3, 0.0, -1.0, 0.0, -1.0])
    new_x, new_y, moved = plots.rereference(fitids, tiles, x, y, A)
    np.testing.assert_allclose(new_x[:6], [0.0, -0.8, 0.7, 0.0, -0.8, 0.7])
    np.testing.assert_allclose(new_y[:6], [0.0, 0.3, -0.7, 0.0, 0.3, -0.7])
    assert moved[:6].all() and not moved[6:].any()  # fit 3 has no A: as stored
    np.testing.assert_array_equal(new_x[6:], x[6:])
    unchanged = plots.rereference(fitids, tiles, x, y, None)
    assert not unchanged[2].any() and (unchanged[0] == x).all()


def test_the_history_plots_say_which_earlier_fits_were_re_referenced(
    session_factory: sessionmaker[Session], fitids: list[int]
) -> None:
    import matplotlib.pyplot as plt

    with session_factory() as session:
        fit = session.get(CalibrationFit, fitids[-1])
        assert fit is not None
        for kind in ("timediff", "xydiff"):
            figure = plots.figure_of(session, fit, kind)
            axes = figure.axes[0]
            labels = [t.get_text() for t in axes.get_legend().get_texts()]
            plt.close(figure)
            assert f"1 earlier fits re-referenced to tile {A}" in labels, labels
            assert f"1 earlier fits without tile {A}: as stored (another reference)" in labels
            assert f"relative to tile {A}" in axes.get_ylabel()
            assert f"reference tile {A}" in axes.get_title()


def _frames(client: TestClient, style: str) -> dict[str, dict[str, Any]]:
    span = {
        "from": gps_to_utc_iso(FIRST - 10) + "Z",
        "to": gps_to_utc_iso(FIRST + 3600 * len(FITS)) + "Z",
    }
    reply = client.post("/calib/grafana/query", json={
        "range": span, "targets": [{"target": "rec01", "refId": "A", "payload": {"style": style}}]})  # fmt: skip
    assert reply.status_code == 200, reply.text
    return {frame["schema"]["name"]: frame for frame in reply.json()}


def test_grafana_series_are_on_one_reference_and_the_others_are_apart(client: TestClient) -> None:
    """Tile C's X series was 0.7, 1.5, 1.5, 0.7, 0.7 m: a jump of the whole receiver when
    the reference moved. On A throughout it is flat; the fit without A is a series of its own."""
    frames = _frames(client, "full")
    c_x = frames[f"{NAMES[C]} X"]
    times, values = c_x["data"]["values"]
    assert len(times) == 4
    np.testing.assert_allclose(values, [CABLE_M[C][0] - CABLE_M[A][0]] * 4)
    assert c_x["schema"]["fields"][1]["labels"]["reference_tile"] == str(A)
    apart = frames[f"{NAMES[C]} X (ref tile {B})"]
    np.testing.assert_allclose(apart["data"]["values"][1], [CABLE_M[C][0] - CABLE_M[B][0]])
    assert apart["schema"]["fields"][1]["labels"]["reference_tile"] == str(B)
    assert f"{NAMES[A]} X (ref tile {B})" not in frames  # A flagged there: nothing to show
    means = _frames(client, "recmean")
    assert len(means["rec01 mean"]["data"]["values"][0]) == 4
    assert len(means[f"rec01 mean (ref tile {B})"]["data"]["values"][0]) == 1
    quality = _frames(client, "quality")
    assert all("(ref tile" not in name for name in quality)


def test_the_upgrade_records_the_reference_of_fits_already_stored(db_url: str) -> None:
    """Migration 0013: the reference of a stored fit is its lowest tile whose X and Y delays
    are both exactly 0; NULL when none is."""
    from observatory.core.database import make_engine
    from observatory.core.migrate import upgrade

    upgrade(db_url, "0012")
    engine = make_engine(db_url)
    solutions = {
        1: [(11, 0.3, 0.2), (12, 0.0, 0.0), (13, 0.0, 0.0)],
        2: [(11, 0.0, 0.1), (12, None, None)],
    }
    with engine.begin() as connection:
        for fitid, rows in solutions.items():
            connection.execute(text(
                "INSERT INTO calibration_fits (fitid, obsid, creator, code_version, fit_time, "
                "calibration_command) VALUES (:fitid, 1400000000, 'calvin', '1', CURRENT_TIMESTAMP, '')"
            ), {"fitid": fitid})  # fmt: skip
            for antenna, (tile, x, y) in enumerate(rows):
                connection.execute(text(
                    "INSERT INTO calibration_solutions (fitid, tileid, obsid, antenna, x_delay_m, "
                    "y_delay_m, x_gains, y_gains, x_gains_pol0, x_gains_pol1, y_gains_pol0, "
                    "y_gains_pol1, x_gains_sigma_resid, y_gains_sigma_resid) VALUES (:fitid, "
                    ":tile, 1400000000, :antenna, :x, :y, '[]', '[]', '[]', '[]', '[]', '[]', "
                    "'[]', '[]')"
                ), {"fitid": fitid, "tile": tile, "antenna": antenna, "x": x, "y": y})  # fmt: skip
    upgrade(db_url)
    with engine.connect() as connection:
        found = connection.execute(
            text("SELECT fitid, reference_tileid FROM calibration_fits ORDER BY fitid")
        ).all()
    engine.dispose()
    assert [tuple(row) for row in found] == [(1, 12), (2, None)]
