"""The calibration summary pages and plots, over HTTP and in headless Chromium."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from backends import sqlite_only
from browser import browser_page, screenshot
from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.calib import plots, service
from observatory.calib.formats import CalSolutions
from observatory.calib.models import CalibrationFit
from observatory.cli import main
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory, utcnow
from observatory.core.gpstime import now_gps
from observatory.telescope.instrument import tile_layout
from servers import free_port, observatory_server, wait_for

TILES = tile_layout()[:16]


def seed_fits(
    settings: Settings, session_factory: sessionmaker[Session], days: int = 5
) -> list[int]:
    """One calibrator observation and fit a day, newest last; calvin and mwa creators."""
    rng = np.random.default_rng(4)
    now = (now_gps() // 8) * 8
    fitids = []
    with session_factory() as session:
        for day in range(days, 0, -1):
            obsid = now - day * 86400
            session.add(Observation(obsid=obsid, stoptime=obsid + 120, mode="MWAX_CORRELATOR", calibration=True,
                                    calibrator_source="HydA", obsname=f"HydA_day{day}",
                                    coarse_chans=list(range(109, 133))))  # fmt: skip
            session.flush()
            rows = [{"tileid": t.tile_id, "antenna": i, "x_delay_m": float(rng.normal(0, 0.2)),
                     "y_delay_m": float(rng.normal(0, 0.2)), "x_gains": list(rng.uniform(0.9, 1.1, 24)),
                     "y_gains": list(rng.uniform(0.9, 1.1, 24)), "x_phase_fit_quality": 0.8,
                     "y_phase_fit_quality": 0.7} for i, t in enumerate(TILES)]  # fmt: skip
            fit = service.store_fit(session, settings, obsid, CalSolutions(jones=np.ones((1, 16, 2, 4), complex)),
                                    rows, creator="calvin" if day % 2 else "mwa", code_version="1.7.30",
                                    fit_niter=3)  # fmt: skip
            fit.fit_time = utcnow() - timedelta(days=day)
            fitids.append(fit.fitid)
        session.commit()
    return fitids


def test_summary_fit_page_and_plots(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    fitids = seed_fits(settings, session_factory)
    with TestClient(create_app(settings)) as client:
        page = client.get("/calib/summary")
        assert page.status_code == 200
        for fitid in fitids:
            assert f"fit?fitid={fitid}" in page.text
        assert '=<a href="../metadata/obs_page?obs_id=' in page.text and "HydA_day1" in page.text
        assert "AWST" in page.text and "calvin" in page.text and "mwa" in page.text
        narrow = client.get("/calib/summary", params={"mintime": now_gps() - 2 * 86400 - 60})
        assert (
            f"fit?fitid={fitids[-1]}" in narrow.text and f"fit?fitid={fitids[0]}" not in narrow.text
        )
        assert client.get("/calib/summary", params={"mintime": "last tuesday"}).status_code == 400
        backwards = client.get(
            "/calib/summary", params={"mintime": 1480080000, "maxtime": 1480060000}
        )
        assert (
            backwards.status_code == 400
            and "mintime 1480080000 is after maxtime 1480060000" in backwards.text
        )
        # maxtime alone: the 7 days before it (a month ago is an empty week, not an error).
        week = client.get("/calib/summary", params={"maxtime": now_gps() - 3 * 86400 - 60})
        assert week.status_code == 200
        assert [f"fit?fitid={fitid}" in week.text for fitid in fitids] == [
            True,
            True,
            False,
            False,
            False,
        ]
        month_ago = client.get("/calib/summary", params={"maxtime": now_gps() - 30 * 86400})
        assert month_ago.status_code == 200 and "fit?fitid=" not in month_ago.text
        future = client.get("/calib/summary", params={"mintime": now_gps() + 3600})
        assert future.status_code == 400 and "is after maxtime now (" in future.text
        fit_page = client.get("/calib/fit", params={"fitid": fitids[-1]})
        assert (
            fit_page.status_code == 200
            and 'id="receivers"' in fit_page.text
            and 'id="tiles"' in fit_page.text
        )
        assert "rx01" in fit_page.text and TILES[0].tile_name in fit_page.text
        # Its download link gives this fit, not the calibrator's newest.
        with session_factory() as session:
            shown = session.get(CalibrationFit, fitids[-1])
            assert shown is not None
        link = f'get_cal_solution?obs_id={shown.obsid}&amp;prefer_fitid={shown.fitid}"'
        assert link in fit_page.text and "get_calfile_for_calid" not in fit_page.text
        for kind in plots.KINDS:
            image = client.get(f"/calib/plot/{kind}.png", params={"fitid": fitids[-1]})
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG"), kind
            with session_factory() as session:
                fit = session.get(CalibrationFit, fitids[-1])
                assert fit is not None
                cached = plots.cached_plot_path(session, settings, fit, kind)
            assert cached.read_bytes() == image.content  # drawn once, then read
        assert client.get("/calib/plot/pie.png", params={"fitid": fitids[-1]}).status_code == 400
        assert client.get("/calib/fit", params={"fitid": 123}).status_code == 404
    with session_factory() as session:
        fit = session.get(CalibrationFit, fitids[-1])
        assert fit is not None
        residuals, medians = service.fit_residuals(fit, {})  # no metafits: the layout's receivers
        on_rx1 = [r for r in residuals if r.receiver == 1]
        assert medians[1].x_delay_m == np.median([r.x_delay_m for r in on_rx1])
        assert medians[1].y_delay_m == np.median([r.y_delay_m for r in on_rx1])


def test_pages_in_chromium(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert main(["--data-dir", str(data_dir), "db", "upgrade"]) == 0
    settings = Settings(data_dir=data_dir)
    engine = make_engine(settings.resolved_database_url)
    fitids = seed_fits(settings, make_session_factory(engine), days=3)
    engine.dispose()
    port = free_port()
    server = observatory_server(data_dir, port, None, "--no-telescope")
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        with browser_page() as page:
            page.goto(f"http://127.0.0.1:{port}/calib/summary")
            assert page.title() == "Calibration fits"
            assert page.get_by_label("From (UTC, ISO time or GPS seconds)").count() == 1
            rows = page.locator("#fits tr")
            assert rows.count() == 1 + len(fitids)
            screenshot(page, "calib-summary", tmp_path)
            page.get_by_role("link", name=str(fitids[-1])).click()
            page.wait_for_selector("#tiles")
            images = page.locator("img")
            assert images.count() == len(plots.KINDS)
            page.wait_for_function(
                "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
            )
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            assert all(w > 300 for w in widths)
            assert page.locator("#receivers tr").count() >= 2
            assert screenshot(page, "calib-fit", tmp_path).stat().st_size > 10_000
    finally:
        server.stop()


def _store(
    session: Session, settings: Settings, obsid: int, delay: float, gains: list[float]
) -> CalibrationFit:
    rows = [{"tileid": t.tile_id, "antenna": a, "x_delay_m": delay, "y_delay_m": delay + 0.5,
             "x_intercept": 0.0, "y_intercept": 0.0, "x_gains": gains, "y_gains": [2 * g for g in gains]}
            for a, t in enumerate(TILES[:2])]  # fmt: skip
    jones = np.ones((1, 2, 8, 4), complex)
    return service.store_fit(session, settings, obsid, CalSolutions(jones=jones, obsid=obsid), rows)


def _add_calibrator(session: Session, obsid: int, chans: list[int]) -> None:
    session.add(Observation(obsid=obsid, stoptime=obsid + 120, mode="MWAX_CORRELATOR", calibration=True,
                            calibrator_source="HydA", obsname=f"c{obsid}", coarse_chans=chans))  # fmt: skip
    session.flush()


def test_history_plots_go_by_observation_time(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """timediff (7 days) and xydiff (30 days) show the other fits of this observation and of
    the observations before it, whenever those fits ran: a bulk refit of old observations joins
    their own history, and a new fit of an earlier observation is drawn into the later fits'
    cached history plots."""
    now = 1_450_000_000
    old, old_before, old_after = now - 90 * 86400, now - 90 * 86400 - 3600, now - 90 * 86400 + 3600
    month_before = old - 20 * 86400
    with session_factory() as session:
        for obsid in (now, old, old_before, old_after, month_before):
            _add_calibrator(session, obsid, [109, 110])
        recent = _store(session, settings, now, 1.0, [1.0, 1.0])  # fitted first
        plots.draw_all(session, settings, recent)
        later_obs = _store(session, settings, old_after, 0.5, [1.0, 1.0])
        plots.draw_all(session, settings, later_obs)
        drawn_before = plots.cached_plot_path(session, settings, later_obs, "timediff")
        assert drawn_before.is_file()
        # Bulk reprocessing, months later: fitted after ``recent``, observed long before.
        earlier_month = _store(session, settings, month_before, -2.0, [1.0, 1.0])
        earlier = _store(session, settings, old_before, -1.0, [1.0, 1.0])
        this = _store(session, settings, old, 0.0, [1.0, 1.0])
        plots.draw_all(session, settings, this)
        session.commit()
        assert [f.fitid for f in plots._history(session, this, 7)] == [earlier.fitid]
        assert [f.fitid for f in plots._history(session, this, 30)] == [
            earlier_month.fitid,
            earlier.fitid,
        ]
        assert plots._history(session, recent, 7) == []  # nothing observed in the week before
        assert [f.fitid for f in plots._history(session, later_obs, 7)] == [
            earlier.fitid,
            this.fitid,
        ]
        # The later observation's history plot is drawn again, with the new fits in it (the
        # one drawn before is no longer read, and is removed once the new one is drawn).
        to_draw = plots.cached_plot_path(session, settings, later_obs, "timediff")
        assert to_draw != drawn_before and not to_draw.exists()
        unversioned = to_draw.with_name("timediff.png")  # as the cache named it before versions
        unversioned.write_bytes(b"png of an older release")
        assert plots.plot_png(session, settings, later_obs, "timediff") == to_draw.read_bytes()
        assert not drawn_before.exists() and not unversioned.exists()
        assert plots.cached_plot_path(session, settings, later_obs, "tilediff").is_file()
        assert plots.cached_plot_path(session, settings, recent, "timediff").is_file()
        figure = plots.figure_of(session, this, "timediff")
        try:
            points = np.concatenate([c.get_offsets()[:, 1] for c in figure.axes[0].collections])
        finally:
            plt.close(figure)
        assert sorted(points.tolist()) == [-1.0, -1.0, -0.5, -0.5]  # the fit 1 h before, X and Y
        # Another fit of the same observation is in the history too (not the fit itself).
        refit = _store(session, settings, old, 0.25, [1.0, 1.0])
        session.commit()
        assert [f.fitid for f in plots._history(session, this, 7)] == [earlier.fitid, refit.fitid]
        assert [f.fitid for f in plots._history(session, refit, 7)] == [earlier.fitid, this.fitid]


def test_gaintimes_plots_each_channel_against_the_same_channel_before(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Per tile and coarse channel, matched by channel number with earlier fits (not a mean)."""
    now = 1_450_000_000
    with session_factory() as session:
        _add_calibrator(session, now - 3600, [110, 111, 112])  # shares channels 110 and 111
        _add_calibrator(session, now, [109, 110, 111])
        _store(session, settings, now - 3600, 0.0, [5.0, 6.0, 7.0])
        fit = _store(session, settings, now, 0.0, [0.5, 1.0, 3.0])
        session.commit()
        figure = plots.figure_of(session, fit, "gaintimes")
        try:
            axes = figure.axes[0]
            lines = {line.get_label(): line for line in axes.lines}
            this_x = lines["X (this fit)"]
            history = [c.get_offsets() for c in axes.collections]
        finally:
            plt.close(figure)
    assert list(this_x.get_ydata()) == [0.5, 1.0, 3.0, 0.5, 1.0, 3.0]  # tile 0's channels, tile 1's
    columns = np.asarray(this_x.get_xdata(), dtype=float)
    assert np.all(np.diff(columns) > 0) and np.all(np.diff(columns[:3]) < 0.5)
    x_points, y_points = history
    # The earlier fit's channel 110 (5.0) and 111 (6.0) sit at this fit's 110 and 111; 112 nowhere.
    assert sorted(map(tuple, x_points.tolist())) == sorted(
        [(columns[1], 5.0), (columns[2], 6.0), (columns[4], 5.0), (columns[5], 6.0)]
    )
    assert sorted(y_points[:, 1].tolist()) == [10.0, 10.0, 12.0, 12.0]


def test_the_summary_says_when_a_range_holds_more_fits_than_it_lists(
    settings: Settings, session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It listed the newest 1,000 and left the older ones out without a word."""
    fitids = seed_fits(settings, session_factory)
    monkeypatch.setattr(service, "SUMMARY_MAX_FITS", 3)
    with TestClient(create_app(settings)) as client:
        page = client.get("/calib/summary").text
        assert page.count("fit?fitid=") == 3 and 'id="more-fits"' in page
        assert all(f"fitid={fitid}" in page for fitid in fitids[-3:])  # the newest
        monkeypatch.setattr(service, "SUMMARY_MAX_FITS", 5)
        assert 'id="more-fits"' not in client.get("/calib/summary").text


def test_summary_obsid_link_downloads_that_rows_fit(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Two fits of one observation: each row's obsid downloads its own fit, not the newest."""
    import html
    import re

    obsid = int(now_gps()) - 3600
    with session_factory() as session:
        _add_calibrator(session, obsid, [109, 110])
        fitids = [_store(session, settings, obsid, d, [1.0, 1.0]).fitid for d in (0.1, 0.2)]
        session.commit()
    with TestClient(create_app(settings)) as client:
        page = client.get("/calib/summary").text
        for fitid in fitids:
            row = re.search(
                rf'fitid={fitid}">{fitid}</a>.*?<a href="([^"]*)"[^>]*>{obsid}</a>', page, re.S
            )
            assert row is not None, fitid
            reply = client.get("/calib/" + html.unescape(row.group(1)))
            assert reply.status_code == 200 and reply.headers["x-calibration-fit-id"] == str(fitid)
            assert reply.headers["content-type"] == "application/zip"


def test_the_gains_plot_is_against_the_receiver_channel_number(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Each tile's gains at the calibrator's coarse channels (picket fence: not contiguous)."""
    with session_factory() as session:
        _add_calibrator(session, 1_450_000_000, [140, 62, 100])
        fit = _store(session, settings, 1_450_000_000, 0.0, [1.0, 2.0, 3.0])
        figure = plots.figure_of(session, fit, "gains")
        try:
            axes = figure.axes[0]
            drawn = [line for line in axes.get_lines() if len(line.get_xdata())]
            assert "receiver channel number" in axes.get_xlabel()
        finally:
            plt.close(figure)
    assert len(drawn) == 4  # two tiles, X and Y
    for line in drawn:
        assert list(line.get_xdata()) == [62, 100, 140]
    assert sorted(list(line.get_ydata()) for line in drawn) == [[1, 2, 3]] * 2 + [[2, 4, 6]] * 2


def test_an_earlier_fit_of_noise_does_not_set_the_history_plots_axis(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """A stored fit of noise (delays of 3000 m) in the week before: the axis stays on the others."""
    now = 1_450_000_000
    with session_factory() as session:
        history = [0.1, 0.2, -0.1, 3000.0, 0.3]
        for hours, delay in enumerate(history, start=1):
            _add_calibrator(session, now - hours * 3600, [109, 110])
            _store(session, settings, now - hours * 3600, delay, [1.0, 1.0])
        _add_calibrator(session, now, [109, 110])
        this = _store(session, settings, now, 0.0, [1.0, 1.0])
        session.commit()
        for kind in ("timediff", "xydiff"):
            figure = plots.figure_of(session, this, kind)
            try:
                low, high = figure.axes[0].get_ylim()
                labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
            finally:
                plt.close(figure)
            assert -2.0 < low < high < 2.0, (kind, low, high)
            if kind == "timediff":  # the noise fit's X and Y of both tiles
                assert "4 earlier outliers off the axis" in labels


def test_earlier_values_on_the_drawn_axis_are_not_counted_as_off_it() -> None:
    """The reference tile's earlier Y-X values are 0, far from the others' common offset,
    but this fit's own 0 takes the axis out to them: they are drawn, not "off the axis"."""
    figure, axes = plt.subplots()
    try:
        earlier = np.array([0.0, -2.53, -2.17, -2.15, -2.16, 40.0])
        hidden = plots._robust_ylim(axes, np.array([0.0, -2.2]), earlier)
        low, high = axes.get_ylim()
    finally:
        plt.close(figure)
    assert low < -2.53 and 0.0 < high < 40.0
    assert hidden == 1  # only the 40 m value is off the axis


@sqlite_only
def test_plots_label_every_tile_explain_creators_and_revalidate_history(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """144 tiles: 144 tick labels. Earlier fits' colours are in the legend by creator.
    History plots carry an ETag and are revalidated (no-cache); a redraw changes the ETag."""
    from observatory.calib.formats import CalSolutions as Solutions

    now = 1_450_000_000
    ids = list(range(1, 145))
    with session_factory() as session:
        fits_ = []
        for obsid, creator in ((now - 3600, "mwa"), (now - 1800, "calvin"), (now, "calvin")):
            _add_calibrator(session, obsid, [109])
            rows = [
                {"tileid": t, "antenna": a, "x_delay_m": 0.1, "y_delay_m": 0.2}
                for a, t in enumerate(ids)
            ]
            fits_.append(service.store_fit(session, settings, obsid, Solutions(jones=np.ones((1, 144, 2, 4), complex)),
                                           rows, creator=creator))  # fmt: skip
        session.commit()
        this = fits_[-1]
        figure = plots.figure_of(session, this, "timediff")
        try:
            labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
            legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
        finally:
            plt.close(figure)
        assert labels == [str(t) for t in ids]
        assert {"other mwa fits, X", "other mwa fits, Y", "other calvin fits, X"} <= set(legend)
        fitid, earlier_obs = this.fitid, now - 600
    with TestClient(create_app(settings)) as client:
        first = client.get("/calib/plot/timediff.png", params={"fitid": fitid})
        assert first.headers["cache-control"] == "no-cache" and first.headers["etag"]
        again = client.get("/calib/plot/timediff.png", params={"fitid": fitid},
                           headers={"If-None-Match": first.headers["etag"]})  # fmt: skip
        assert again.status_code == 304 and again.content == b""
        any_tag = client.get("/calib/plot/timediff.png", params={"fitid": fitid},
                             headers={"If-None-Match": "*"})  # fmt: skip
        assert any_tag.status_code == 304
        still = client.get("/calib/plot/tilediff.png", params={"fitid": fitid})
        assert still.headers["cache-control"] == "max-age=86400" and still.headers["etag"]
        with session_factory() as session:  # a fit of an earlier observation joins the history
            _add_calibrator(session, earlier_obs, [109])
            _store(session, settings, earlier_obs, 3.0, [1.0])
            session.commit()
        redrawn = client.get("/calib/plot/timediff.png", params={"fitid": fitid},
                             headers={"If-None-Match": first.headers["etag"]})  # fmt: skip
        assert redrawn.status_code == 200 and redrawn.headers["etag"] != first.headers["etag"]


def test_plots_cached_before_the_upgrade_that_negated_old_delays_are_drawn_again(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Migration 0011 negated the delays of version 0.1.0's fits; their cached plots (and
    other fits' history plots) showed the old sign for good."""
    with session_factory() as session:
        _add_calibrator(session, 1_450_000_000, [109, 110])
        fit = _store(session, settings, 1_450_000_000, 1.0, [1.0, 1.0])
        session.commit()
        for kind in ("tilediff", "timediff"):
            stale = settings.calib_dir / str(fit.fitid) / "plots" / f"{kind}.png"
            stale.parent.mkdir(parents=True, exist_ok=True)
            stale.write_bytes(b"png drawn before the upgrade")
            drawn = plots.plot_png(session, settings, fit, kind)
            assert drawn.startswith(b"\x89PNG") and drawn == plots.draw(session, fit, kind)
