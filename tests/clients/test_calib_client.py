"""The calibration client against a real server (uvicorn on loopback) holding a real fit.

One small simulated calibrator observation (8 tiles, one flagged in its metafits, 2 coarse
channels, 2 x 2 s) is fitted by the pipeline; a target of the same array follows it.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.archive.simulated import catalogue_point_source, simulate_and_register
from observatory.calib.formats import read_solutions
from observatory.calib.models import CalibrationFit, CalibrationRequest
from observatory.calib.pipeline import fit_observation
from observatory.calib.requests import deliver_callbacks, finish_request
from observatory.calib.service import solution_path
from observatory.clients import calib
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from observatory.core.migrate import upgrade
from observatory.trigger import pointing
from servers import CallbackReceiver, free_port, handler_server, threaded_app_server

CAL_OBS = 1_450_324_816  # 2025-12-21 04:00 UTC: a bright calibrator is well up
TARGET = CAL_OBS + 304
#: An observation with the calibrator's channels but none within a day of it.
LONELY = CAL_OBS + 10 * 86400
#: Not in the schedule.
UNKNOWN = CAL_OBS + 8
FLAGGED_ANTENNA = 5


@dataclass
class Service:
    url: str
    fitid: int
    settings: Settings
    session_factory: sessionmaker[Session]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("calib-client")
    database_url = f"sqlite:///{root / 'calib.sqlite3'}"
    upgrade(database_url)
    settings = Settings(data_dir=root / "data", database_url=database_url)
    engine = make_engine(database_url)
    session_factory = make_session_factory(engine)
    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    source = catalogue_point_source(best[0].name)
    with session_factory() as session:
        simulate_and_register(session, settings, obsid=CAL_OBS, sources=[source], n_tiles=8,
                              coarse_chans=(109, 110), n_timesteps=2, calibrator=best[0].name,
                              flagged_antennas=(FLAGGED_ANTENNA,))  # fmt: skip
        simulate_and_register(session, settings, obsid=TARGET, sources=[source], n_tiles=8,
                              coarse_chans=(109, 110), n_timesteps=1)  # fmt: skip
        session.add(Observation(obsid=LONELY, stoptime=LONELY + 8, mode="MWAX_CORRELATOR",
                                coarse_chans=[109, 110], n_tiles=8))  # fmt: skip
        session.commit()
        fitid = fit_observation(session, settings, CAL_OBS).fitid
        session.commit()
    try:
        with threaded_app_server(create_app(settings)) as base:
            yield Service(f"{base}/calib/", fitid, settings, session_factory)
    finally:
        engine.dispose()


def test_get_cal_solution_saves_the_zip_and_reads_its_bin(service: Service, tmp_path: Path) -> None:
    solution = calib.get_cal_solution(TARGET, directory=tmp_path, base_url=service.url)
    assert (solution.obs_id, solution.fitid, solution.cal_obs_id) == (
        TARGET, service.fitid, CAL_OBS
    )  # fmt: skip
    assert solution.path == tmp_path / f"{TARGET}_calibration.zip"
    assert solution.path.read_bytes() == solution.content
    assert sorted(solution.names()) == sorted(
        [f"{CAL_OBS}.bin", f"{TARGET}_flagged_tiles.txt", f"{TARGET}_flags.py"]
    )
    with service.session_factory() as session:
        stored = solution_path(service.settings, session.get(CalibrationFit, service.fitid))
    assert stored is not None
    expected = read_solutions(stored)
    for read in (calib.read_cal_solution(solution), calib.read_cal_solution(solution.path)):
        assert read.obsid == CAL_OBS
        assert np.array_equal(read.jones, expected.jones, equal_nan=True)
        assert read.flagged_antennas().tolist() == [FLAGGED_ANTENNA]
    flagged = calib.get_cal_json(TARGET, base_url=service.url)["flagged_tiles"]
    assert solution.flagged_tiles() == flagged and len(flagged) == 1


def test_get_cal_solution_in_hyperdrive_format(service: Service) -> None:
    solution = calib.get_cal_solution(
        CAL_OBS, max_time_separation_s=0, output_format="hyperdrive", base_url=service.url
    )
    assert solution.path is None and f"{CAL_OBS}_solutions.fits" in solution.names()
    read = calib.read_cal_solution(solution)
    assert read.obsid == CAL_OBS and read.tile_names is not None and len(read.tile_names) == 8


def test_get_cal_json_gives_delays_and_gains_per_tile(service: Service) -> None:
    fit = calib.get_cal_json(TARGET, base_url=service.url)
    assert (fit["obs_id"], fit["fitid"], fit["cal_obs_id"]) == (TARGET, service.fitid, CAL_OBS)
    assert fit["time_separation_s"] == CAL_OBS - TARGET and fit["coarse_chans"] == [109, 110]
    tiles = fit["solutions"]
    assert [tile["antenna"] for tile in tiles] == list(range(8))
    flagged = tiles[FLAGGED_ANTENNA]
    assert flagged["tileid"] == fit["flagged_tiles"][0] and flagged["x_delay_m"] is None
    good = [tile for tile in tiles if tile["antenna"] != FLAGGED_ANTENNA]
    assert all(isinstance(tile["x_delay_m"], float) for tile in good)
    assert all(len(tile["y_gains"]) == 2 for tile in good)
    # Only calibrators before the target: the same one here.
    assert (
        calib.get_cal_json(TARGET, allow_after=False, base_url=service.url)["fitid"]
        == service.fitid
    )


def test_get_cal_fits_lists_the_candidates(service: Service) -> None:
    fits = calib.get_cal_fits(TARGET, base_url=service.url)
    assert fits == {
        service.fitid: calib.CandidateFit(CAL_OBS, 304, f"{service.fitid}/{CAL_OBS}_solutions.fits")
    }
    assert calib.has_cal_fit(TARGET, base_url=service.url)
    assert not calib.has_cal_fit(LONELY, base_url=service.url)
    assert not calib.has_cal_fit(TARGET, max_time_separation_s=10, base_url=service.url)


def test_a_fit_request_is_filed_and_its_callback_read(service: Service) -> None:
    receiver = CallbackReceiver(failures=0)
    try:
        calib.add_cal_request(TARGET, callback_url=receiver.url, base_url=service.url)
        with service.session_factory() as session:
            [request] = session.scalars(
                select(CalibrationRequest).where(CalibrationRequest.callback_url == receiver.url)
            ).all()
            assert (request.cal_id, request.target_obs_id) == (CAL_OBS, TARGET)
            finish_request(session, request, fit_id=service.fitid)  # what the fit's run does
            session.commit()
        assert deliver_callbacks(service.session_factory, service.settings) == 1
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
    callback = calib.parse_callback(receiver.bodies[0])
    assert (callback.cal_id, callback.target_obs_id) == (CAL_OBS, TARGET)
    assert callback.asvo_job_id is None
    assert callback.success and callback.finished is not None and callback.finished.tzinfo
    with pytest.raises(calib.CalibError, match="not a calibration callback"):
        calib.parse_callback(b'{"cal_id": 1}')


def test_no_fit_is_a_404_told_apart_from_a_faulty_request(service: Service) -> None:
    for call in (calib.get_cal_solution, calib.get_cal_json, calib.get_cal_fits):
        with pytest.raises(calib.NoSolutionFound) as no_fit:
            call(LONELY, base_url=service.url)
        assert no_fit.value.status_code == 404 and no_fit.value.error_code == 1
        assert (
            "no calibration fit" in no_fit.value.error and f"obs_id {LONELY}" in no_fit.value.error
        )
        assert "HTTP 404: no calibration solution" in str(no_fit.value)
    with pytest.raises(calib.NoCalibratorFound, match="no calibrator observation"):
        calib.add_cal_request(LONELY, base_url=service.url)
    # A fit named that is no fit: 404 too.
    with pytest.raises(calib.NoSolutionFound, match="prefer_fitid"):
        calib.get_cal_solution(TARGET, prefer_fitid=12345, base_url=service.url)


@pytest.mark.parametrize(
    ("obs_id", "message"),
    [
        (UNKNOWN, f"obs_id {UNKNOWN} does not exist in the schedule database"),
        ("abc", "'abc' is not a positive integer GPS second"),
    ],
)
def test_an_unknown_or_malformed_obsid_is_a_400_with_the_servers_text(
    service: Service, obs_id: int | str, message: str
) -> None:
    calls = (calib.get_cal_solution, calib.get_cal_json, calib.get_cal_fits, calib.add_cal_request,
             calib.has_cal_fit)  # fmt: skip
    for call in calls:
        with pytest.raises(calib.CalibHTTPError) as refused:
            call(obs_id, base_url=service.url)  # type: ignore[operator]
        assert not isinstance(refused.value, calib.NoSolutionFound | calib.NoCalibratorFound)
        assert refused.value.status_code == 400 and message in refused.value.error
        assert "HTTP 400" in str(refused.value) and message in str(refused.value)


def test_a_bad_parameter_or_callback_url_is_a_400_naming_it(service: Service) -> None:
    with pytest.raises(calib.CalibHTTPError, match="output_format"):
        calib.get_cal_solution(TARGET, output_format="casa", base_url=service.url)
    with pytest.raises(calib.CalibHTTPError, match="callback_url") as refused:
        calib.add_cal_request(TARGET, callback_url="ftp://127.0.0.1/x", base_url=service.url)
    assert refused.value.status_code == 400


def test_grafana_services(service: Service) -> None:
    metrics = calib.grafana_metrics(base_url=service.url)
    values = [metric["value"] for metric in metrics]
    assert "rec01" in values and values[-1] == "sources"
    styles = calib.grafana_metric_payload_options("rec01", "style", base_url=service.url)
    assert {"label": "Tile Mean", "value": "tilemean"} in styles
    [frame] = calib.grafana_query(
        "sources", "2025-12-21T00:00:00Z", "2025-12-22T00:00:00Z", base_url=service.url
    )
    times_ms, names = frame["data"]["values"]
    assert len(times_ms) == len(names) == 1 and names[0]
    frames = calib.grafana_query(
        "rec01", "2025-12-21T00:00:00Z", "2025-12-22T00:00:00Z", {"style": "tilemean"},
        base_url=service.url,
    )  # fmt: skip
    # One point per tile of receiver 1 from the one fit; none for the tile that did not calibrate.
    assert {len(f["data"]["values"][0]) for f in frames} <= {0, 1}
    assert any(f["data"]["values"][0] == times_ms for f in frames)
    with pytest.raises(calib.CalibHTTPError, match="recNN or sources"):
        calib.grafana_query("tiles", "2025-12-21T00:00:00Z", "2025-12-22T00:00:00Z",
                            base_url=service.url)  # fmt: skip


def test_the_url_comes_from_the_environment(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OBSERVATORY_CALIB_URL", service.url.rstrip("/"))
    assert calib.get_cal_fits(TARGET).keys() == {service.fitid}
    Settings()  # the variable is known: the settings do not refuse it as a misspelling
    monkeypatch.delenv("OBSERVATORY_CALIB_URL")
    assert calib.base_url_from_environment() == calib.DEFAULT_BASE_URL


def test_a_server_that_is_down_is_a_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/calib/"
    with pytest.raises(calib.CalibConnectionError, match="could not be reached") as down:
        calib.get_cal_solution(TARGET, base_url=url)
    assert down.value.url is not None and down.value.url.startswith(url)


class _Stub(BaseHTTPRequestHandler):
    """Answers /slow after 3 s, /proxy with a 502 page, anything else with a 200 that is no zip."""

    def do_GET(self) -> None:
        if self.path.startswith("/slow/"):
            time.sleep(3)
        status, body = (
            (502, b"<html>Bad Gateway</html>") if self.path.startswith("/proxy/") else (200, b"{}")
        )
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


def test_a_slow_or_wrong_reply_is_an_error_naming_it() -> None:
    with handler_server(_Stub) as port:
        base = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        with pytest.raises(calib.CalibConnectionError, match=r"did not answer within 0\.5 s"):
            calib.get_cal_json(TARGET, base_url=f"{base}/slow/", timeout_s=0.5)
        assert time.monotonic() - started < 2.5  # one attempt, no retry
        with pytest.raises(calib.CalibHTTPError, match="HTTP 502: <html>Bad Gateway") as proxy:
            calib.get_cal_solution(TARGET, base_url=f"{base}/proxy/")
        assert proxy.value.error_code is None
        with pytest.raises(calib.CalibError, match="not a zip file"):
            calib.get_cal_solution(TARGET, base_url=f"{base}/calib/")


def test_a_zip_without_a_solution_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{TARGET}_flagged_tiles.txt", "")
    with pytest.raises(calib.CalibError, match="holds 0 solution files"):
        calib.read_cal_solution(path)
