"""Fit requests: choosing the calibrator, refusing bad callbacks, and delivering callbacks once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.archive.models import FileKind, Observation, ObservationFile
from observatory.calib.models import CalibrationRequest
from observatory.calib.requests import deliver_callbacks, finish_request
from observatory.core.config import Settings
from servers import CallbackReceiver

TARGET = 1_400_000_000
CHANS = list(range(109, 133))


@pytest.fixture
def client(settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with session_factory() as session:
        # TARGET + 1000 is the nearest calibrator but has no visibilities archived, and
        # TARGET + 500 is of the Sun, which the fit has no model of: neither is ever chosen.
        for obsid, calibration, chans, archived, source in (
            (TARGET, False, CHANS, True, None), (TARGET - 7200, True, CHANS, True, "HydA"),
            (TARGET + 3000, True, CHANS, True, "HydA"), (TARGET - 100, True, [1, 2], True, "HydA"),
            (TARGET + 1000, True, CHANS, False, "HydA"), (TARGET + 500, True, CHANS, True, "Sun"),
        ):  # fmt: skip
            session.add(Observation(obsid=obsid, stoptime=obsid + 120, mode="MWAX_CORRELATOR",
                                    coarse_chans=chans, calibration=calibration, atten_db=1.0,
                                    calibrator_source=source))  # fmt: skip
            if archived:
                session.add(ObservationFile(obsid=obsid, name=f"{obsid}_ch{chans[0]}_000.fits",
                                            kind=FileKind.MWAX_VIS, size_bytes=1, sha1="0" * 40,
                                            storage_key=f"{obsid}/{obsid}_ch{chans[0]}_000.fits"))  # fmt: skip
        session.commit()
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def requests_in(session_factory: sessionmaker[Session]) -> list[CalibrationRequest]:
    with session_factory() as session:
        return list(session.scalars(select(CalibrationRequest).order_by(CalibrationRequest.id)))


def test_add_cal_request(
    client: TestClient, session_factory: sessionmaker[Session], asvo_job: Callable[[int], int]
) -> None:
    job_id = asvo_job(TARGET)
    reply = client.get("/calib/add_cal_request", params={"obs_id": TARGET, "asvo_job_id": job_id})
    assert reply.status_code == 200 and reply.content == b""
    reply = client.post(
        "/calib/add_cal_request", data={"obs_id": TARGET - 7200, "max_time_separation": 0}
    )
    assert reply.status_code == 200
    first, second = requests_in(session_factory)
    assert (first.cal_id, first.target_obs_id, first.asvo_job_id) == (TARGET + 3000, TARGET, job_id)
    assert second.cal_id == TARGET - 7200  # a calibrator asking for its own fit
    assert client.get("/calib/add_cal_request", params={"obs_id": 1_399_999_992}).status_code == 400
    none_near = client.get(
        "/calib/add_cal_request", params={"obs_id": TARGET, "max_time_separation": 60}
    )
    assert none_near.status_code == 404 and "no calibrator observation" in none_near.json()["error"]
    only_the_sun = client.get(
        "/calib/add_cal_request", params={"obs_id": TARGET, "max_time_separation": 600}
    )
    assert only_the_sun.status_code == 404
    assert "1 for a source the fit has no model of" in only_the_sun.json()["error"]
    for bad in (
        "ftp://127.0.0.1/x",
        "http://user:pw@127.0.0.1/x",
        "not a url",
        "http://169.254.1.1/x",
        "http://127.0.0.1:99999/x",
    ):
        reply = client.get("/calib/add_cal_request", params={"obs_id": TARGET, "callback_url": bad})
        assert reply.status_code == 400, bad
    assert (
        client.get(
            "/calib/add_cal_request", params={"obs_id": TARGET, "asvo_job_id": "x"}
        ).status_code
        == 400
    )
    assert len(requests_in(session_factory)) == 2
    # A calibrator without visibilities cannot be fitted: not even for its own fit.
    no_data = client.get(
        "/calib/add_cal_request", params={"obs_id": TARGET + 1000, "max_time_separation": 0}
    )
    assert no_data.status_code == 404 and "correlator data" in no_data.json()["error"]


def test_get_calfile_for_obsid_with_any_gain_requests_a_calibrator_of_another_attenuation(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    with session_factory() as session:
        for obsid in (TARGET - 7200, TARGET + 3000):
            calibrator = session.get(Observation, obsid)
            assert calibrator is not None
            calibrator.atten_db = 2.0
        session.commit()
    asked = {"obs_id": TARGET, "add_request": 1}
    refused = client.get("/calib/get_calfile_for_obsid", params=asked)
    assert refused.status_code == 400 and "for another attenuation" in refused.json()["error"]
    assert requests_in(session_factory) == []
    filed = client.get("/calib/get_calfile_for_obsid", params={**asked, "any_gain": 1})
    assert filed.status_code == 200 and filed.content == b""
    [request] = requests_in(session_factory)
    assert (request.cal_id, request.target_obs_id) == (TARGET + 3000, TARGET)


def test_callback_is_delivered_once_after_a_failing_receiver(
    client: TestClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    asvo_job: Callable[[int], int],
) -> None:
    job_id = asvo_job(TARGET)
    receiver = CallbackReceiver(failures=2)
    settings = settings.model_copy(
        update={"calib_callback_hosts": ["127.0.0.1"], "calib_callback_backoff_s": 10.0}
    )
    with session_factory() as session:
        from observatory.calib.requests import add_cal_request

        request = add_cal_request(
            session, settings, TARGET, asvo_job_id=job_id, callback_url=receiver.url
        )
        elsewhere = settings.model_copy(update={"calib_callback_hosts": ["example.org"]})
        with pytest.raises(Exception, match="not allowed"):
            add_cal_request(session, elsewhere, TARGET, callback_url=receiver.url)
        assert deliver_callbacks(session_factory, settings) == 0  # not finished yet: nothing sent
        assert receiver.bodies == []
        finish_request(
            session, session.get(CalibrationRequest, request.id), fit_id=1_700_000_000_000_000
        )  # type: ignore[arg-type]
        session.commit()
        with pytest.raises(ValueError, match="not both"):
            finish_request(session, request, fit_id=1, error="x")
    start = datetime.now(UTC)
    assert deliver_callbacks(session_factory, settings, now=start) == 0  # 500
    assert (
        deliver_callbacks(session_factory, settings, now=start + timedelta(seconds=5)) == 0
    )  # backing off
    assert len(receiver.bodies) == 1
    assert (
        deliver_callbacks(session_factory, settings, now=start + timedelta(seconds=11)) == 0
    )  # 500 again
    assert (
        deliver_callbacks(session_factory, settings, now=start + timedelta(seconds=25)) == 0
    )  # 20 s wait now
    assert deliver_callbacks(session_factory, settings, now=start + timedelta(seconds=32)) == 1
    assert (
        deliver_callbacks(session_factory, settings, now=start + timedelta(days=1)) == 0
    )  # never twice
    assert len(receiver.bodies) == 3
    body = receiver.bodies[-1]
    assert (
        body["cal_id"] == TARGET + 3000
        and body["target_obs_id"] == TARGET
        and body["asvo_job_id"] == job_id
    )
    assert body["success"] is True and "finished" in body["message"]
    assert datetime.fromisoformat(body["finished_datetime"]).tzinfo is not None
    (stored,) = requests_in(session_factory)
    assert stored.callback_attempts == 3 and stored.callback_delivered_datetime is not None
    receiver.server.shutdown()


def test_two_servers_on_one_database_send_each_callback_once(
    client: TestClient, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """A standby server delivers callbacks too: each attempt goes to one of them only."""
    import threading
    import time

    from observatory.calib.requests import add_cal_request

    receiver = CallbackReceiver(failures=0)
    slow_post = receiver.server.RequestHandlerClass.do_POST  # type: ignore[attr-defined]

    def answer_slowly(handler: object) -> None:
        time.sleep(0.5)  # the other server reads the pending request meanwhile
        slow_post(handler)

    receiver.server.RequestHandlerClass.do_POST = answer_slowly  # type: ignore[attr-defined]
    settings = settings.model_copy(update={"calib_callback_hosts": ["127.0.0.1"]})
    with session_factory() as session:
        for _ in range(3):
            request = add_cal_request(session, settings, TARGET, callback_url=receiver.url)
            finish_request(session, request, fit_id=1_700_000_000_000_000)
        session.commit()
    accepted: list[int] = []
    servers = [
        threading.Thread(
            target=lambda: accepted.append(deliver_callbacks(session_factory, settings))
        )
        for _ in range(2)
    ]
    for server in servers:
        server.start()
    for server in servers:
        server.join()
    assert len(receiver.bodies) == 3 and sum(accepted) == 3
    assert [r.callback_attempts for r in requests_in(session_factory)] == [1, 1, 1]
    receiver.server.shutdown()


def assert_refused(
    client: TestClient,
    session_factory: sessionmaker[Session],
    params: dict[str, object],
    named: str,
) -> str:
    """The request is a 400 whose message names ``named``, and nothing is stored."""
    reply = client.get("/calib/add_cal_request", params={"obs_id": TARGET, **params})
    assert reply.status_code == 400, reply.text
    message: str = reply.json()["error"]
    assert named in message, message
    assert requests_in(session_factory) == []
    return message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8862/\r\nX:y",  # would inject a header line; httpx refuses to send it
        "http://127.0.0.1:8862/a\tb",
        "http://127.0.0.1:8862/\x7f",
        "http://127.0.0.1:8862/\x85",  # a C1 control character
        "http://xn--/x",  # a host httpx cannot encode (IDNA error)
    ],
)
def test_a_callback_url_with_a_control_character_is_refused(
    client: TestClient, session_factory: sessionmaker[Session], url: str
) -> None:
    assert_refused(client, session_factory, {"callback_url": url}, "callback_url")


@pytest.mark.parametrize("url", ["http://[::1/", "http://[::1]x/", "http://[not-an-address]/"])
def test_a_malformed_ipv6_callback_url_is_a_400_naming_it(
    client: TestClient, session_factory: sessionmaker[Session], url: str
) -> None:
    assert_refused(client, session_factory, {"callback_url": url}, "callback_url")


@pytest.mark.parametrize("url", ["http://127.0.0.1:0/", "http://127.0.0.1:65536/"])
def test_a_callback_url_with_port_zero_or_out_of_range_is_refused(
    client: TestClient, session_factory: sessionmaker[Session], url: str
) -> None:
    message = assert_refused(client, session_factory, {"callback_url": url}, "callback_url")
    assert "port" in message


def test_a_callback_url_longer_than_its_column_is_a_400_not_a_database_error(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    url = "http://127.0.0.1:8862/" + "a" * 1979  # 2,001 characters: PostgreSQL refuses it
    message = assert_refused(client, session_factory, {"callback_url": url}, "callback_url")
    assert "2001 characters" in message and "at most 2000" in message


def test_an_asvo_job_id_of_no_asvo_job_is_refused(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    message = assert_refused(client, session_factory, {"asvo_job_id": 424242}, "asvo_job_id")
    assert "424242" in message


@pytest.mark.parametrize(
    ("params", "named"),
    [({"output_format": "xml"}, "output_format"), ({"nocache": "yes"}, "nocache")],
)
def test_get_cal_solution_checks_its_parameters_before_looking_for_a_fit(
    client: TestClient, params: dict[str, str], named: str
) -> None:
    # TARGET has no fit: a bad parameter is still a 400 naming it, not the 404 "no fit".
    reply = client.get(
        "/calib/get_cal_solution",
        params={"obs_id": TARGET, "max_time_separation": 0, **params},
    )
    assert reply.status_code == 400, reply.text
    assert named in reply.json()["error"]


def test_a_callback_that_cannot_be_sent_fails_alone_and_is_counted(
    settings: Settings,
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """URLs httpx cannot send (stored before they were checked), or any other failure to send,
    count as a failed attempt of that request only: the other requests are still called back."""
    import observatory.calib.requests as calib_requests

    receiver = CallbackReceiver(failures=0)
    broken = receiver.url + "/broken"  # stands in for any unforeseen failure to send
    real_post = calib_requests._post_callback

    def post(url: str, body: dict[str, object], pinned: str | None) -> object:
        if url == broken:
            raise RuntimeError("something unforeseen")
        return real_post(url, body, pinned)

    monkeypatch.setattr(calib_requests, "_post_callback", post)
    # A port out of range and an unclosed IPv6 bracket stopped the whole pass, unrecorded.
    bad_urls = [receiver.url + "/\r\nX:y", "http://xn--/x", broken, "http://127.0.0.1:99999/cb",
                "http://[::1/cb"]  # fmt: skip
    now = datetime.now(UTC)
    with session_factory() as session:
        for url in [*bad_urls, receiver.url]:  # the good one last: the bad ones come first
            session.add(CalibrationRequest(
                cal_id=TARGET + 3000, target_obs_id=TARGET, callback_url=url,
                calibration_completed_datetime=now, calibration_fit_id=1,
            ))  # fmt: skip
        session.commit()
    with caplog.at_level("WARNING", logger="observatory.calib.requests"):
        assert deliver_callbacks(session_factory, settings, now=now) == 1
    assert len(receiver.bodies) == 1
    *failed, delivered = requests_in(session_factory)
    assert delivered.callback_delivered_datetime is not None and delivered.callback_attempts == 1
    problems = ["InvalidURL", "IDNAError", "RuntimeError", "port 99999 is out of range",
                "InvalidURL"]  # fmt: skip
    for request, problem in zip(failed, problems, strict=True):
        assert request.callback_attempts == 1 and request.callback_delivered_datetime is None
        assert problem in (request.callback_error_message or "")
        assert f"calibration request {request.id} failed" in caplog.text
    # The next due pass tries the failed ones again (counted), and never the delivered one.
    later = now + timedelta(seconds=settings.calib_callback_backoff_s + 1)
    assert deliver_callbacks(session_factory, settings, now=later) == 0
    assert [r.callback_attempts for r in requests_in(session_factory)] == [2, 2, 2, 2, 2, 1]
    assert len(receiver.bodies) == 1
    receiver.server.shutdown()


def test_calibrator_observations_without_a_fit_are_requested_once_in_bulk(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """calvin's rule (spec 3.5): each archived calibrator observation with correlator data and
    no fit and no request gets one bulk request, filed by the dispatcher's pass, once."""
    from typing import Any

    from observatory.asvo.dispatcher import BULK_PRIORITY, Dispatcher
    from observatory.calib.models import CalibrationFit
    from observatory.calib.requests import request_unfitted_calibrators

    wanted, fitted, requested, sun, no_data, target, deleted = (TARGET + 8 * k for k in range(7))
    # The newest: calibrators the catalogue has no model of (the ad-hoc rule, fittable_source).
    uncatalogued, blank = TARGET + 8 * 7, TARGET + 8 * 8
    sources = {sun: "Sun", uncatalogued: "NotInTheCatalogue", blank: " "}
    with session_factory() as session:
        for obsid in (
            wanted,
            fitted,
            requested,
            sun,
            no_data,
            target,
            deleted,
            uncatalogued,
            blank,
        ):
            session.add(Observation(
                obsid=obsid, stoptime=obsid + 8, mode="MWAX_CORRELATOR", coarse_chans=CHANS,
                calibration=obsid != target, calibrator_source=sources.get(obsid, "HydA"),
                deleted=obsid == deleted,
            ))  # fmt: skip
            if obsid != no_data:
                session.add(ObservationFile(obsid=obsid, name=f"{obsid}_ch109_000.fits", kind=FileKind.MWAX_VIS,
                                            size_bytes=1, sha1="0" * 40, storage_key=f"{obsid}/x.fits"))  # fmt: skip
        session.add(CalibrationFit(fitid=1, obsid=fitted))
        session.add(CalibrationRequest(cal_id=requested, target_obs_id=target))
        session.commit()

        dispatcher = Dispatcher(settings, session_factory)
        submitted: list[tuple[int, int]] = []

        class Client:
            def submit(self, _task: object, _settings: object, request_id: int, **kw: Any) -> Any:
                submitted.append((request_id, kw["priority"]))
                return type("Future", (), {"done": lambda self: False})()

        dispatcher._client = Client()
        # The pass's limit counts requests filed: the newest, unfittable, take none of it.
        assert [r.cal_id for r in request_unfitted_calibrators(session, limit=1)] == [wanted]
        dispatcher._calibration_requests(session)
        (auto,) = session.scalars(
            select(CalibrationRequest).where(CalibrationRequest.cal_id == wanted)
        ).all()
        assert auto.bulk_request and not auto.realtime and auto.asvo_job_id is None
        manual = session.scalars(
            select(CalibrationRequest).where(CalibrationRequest.cal_id == requested)
        ).one()
        assert submitted == [(manual.id, 0)]  # the bulk request waits while another is in hand
        manual.calibration_error_datetime = datetime.now(UTC)
        session.commit()
        dispatcher.futures[99] = object()  # ... or while an ASVO job's task is
        dispatcher._calibration_requests(session)
        assert submitted == [(manual.id, 0)]
        del dispatcher.futures[99]
        dispatcher._calibration_requests(session)
        assert submitted == [(manual.id, 0), (auto.id, BULK_PRIORITY)]
        assert request_unfitted_calibrators(session) == []  # once
        auto.calibration_error_datetime = datetime.now(UTC)  # a failed request is not refiled
        session.commit()
        assert request_unfitted_calibrators(session) == []
        assert len(session.scalars(select(CalibrationRequest)).all()) == 2


def test_requests_for_one_calibrator_join_its_fit(
    client: TestClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """add_cal_request three times: one fit, and each request (and its callback) finished by it."""
    import numpy as np

    from observatory.calib import pipeline, service
    from observatory.calib.formats import CalSolutions
    from observatory.calib.requests import callback_body

    fitted: list[int] = []

    def fake_fit(session: Session, settings: Settings, obsid: int) -> object:
        fitted.append(obsid)
        rows = [{"tileid": 11, "antenna": 0, "x_delay_m": 0.1, "y_delay_m": 0.1}]
        solutions = CalSolutions(jones=np.ones((1, 1, 2, 4), complex), obsid=obsid)
        return service.store_fit(session, settings, obsid, solutions, rows)

    monkeypatch.setattr(pipeline, "fit_observation", fake_fit)
    for n in range(3):
        url = f"http://127.0.0.1:18150/done/{n}"
        assert (
            client.get(
                "/calib/add_cal_request", params={"obs_id": TARGET, "callback_url": url}
            ).status_code
            == 200
        )
    first, second, third = requests_in(session_factory)
    assert first.cal_id == second.cal_id == third.cal_id == TARGET + 3000
    # The dispatcher runs each; the first fits, the others find their request finished.
    results = [pipeline.run_request(settings.model_dump(), r.id) for r in (first, second, third)]
    assert results == ["completed"] * 3 and fitted == [TARGET + 3000]
    finished = requests_in(session_factory)
    assert len({r.calibration_fit_id for r in finished}) == 1 and finished[0].calibration_fit_id
    assert [r.callback_url for r in finished] == [
        f"http://127.0.0.1:18150/done/{n}" for n in range(3)
    ]
    assert all(callback_body(r)["success"] for r in finished)
    # Each was started by the one run of the fit they all joined (the joined ones had none).
    started = {r.calibration_started_datetime for r in finished}
    assert len(started) == 1 and None not in started
    assert all(r.assigned_datetime is not None for r in finished)
    # A request filed after the fit finished is a new fit (a refit).
    assert client.get("/calib/add_cal_request", params={"obs_id": TARGET}).status_code == 200
    assert (
        pipeline.run_request(settings.model_dump(), requests_in(session_factory)[-1].id)
        == "completed"
    )
    assert fitted == [TARGET + 3000] * 2


@pytest.mark.parametrize(
    "url",
    [
        "http://0xa9fea9fe/x",  # 169.254.169.254 in hexadecimal
        "http://2852039166/x",  # ... and in decimal
        "http://169.254.169.254./x",
        "http://[::ffff:169.254.169.254]/x",  # IPv4-mapped
        "http://[64:ff9b::a9fe:a9fe]/x",  # ... in NAT64's prefix
        "http://[2002:a9fe:a9fe::1]/x",  # ... in 6to4's
        "http://[fd00:ec2::254]/x",  # AWS's instance metadata over IPv6
        "http://0/x",  # 0.0.0.0
        "http://224.1/x",  # 224.0.0.1
    ],
)
def test_a_callback_to_an_unusable_address_is_refused_however_spelled(url: str) -> None:
    """Only the dotted and the standard IPv6 forms were recognised: any other spelling was
    taken for a host name, filed, and called at the address it spells."""
    from observatory.calib.requests import check_callback_url
    from observatory.core.errors import BadRequest

    with pytest.raises(BadRequest, match="not a usable address"):
        check_callback_url(url, Settings(data_dir="/nonexistent"))


def test_a_callback_goes_to_the_address_that_was_checked(
    client: TestClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DNS rebinding: a name answering a usable address to the check, then another one
    (here a loopback address nothing listens on; in an attack, a link-local one) to the
    HTTP client's own lookup. The call now goes to the address checked, named by its host."""
    import socket

    from observatory.calib.requests import add_cal_request

    receiver = CallbackReceiver(failures=0)
    port = receiver.server.server_address[1]
    answers = iter(["127.0.0.1", "127.0.0.2", "127.0.0.2"])
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> list[tuple]:
        if host == "rebinding.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    url = f"http://rebinding.example:{port}/calibrated"
    with session_factory() as session:
        request = add_cal_request(session, settings, TARGET, callback_url=url)
        finish_request(session, request, fit_id=1_700_000_000_000_000)
        session.commit()
    assert deliver_callbacks(session_factory, settings) == 1
    assert len(receiver.bodies) == 1 and receiver.hosts == [f"rebinding.example:{port}"]
    receiver.server.shutdown()


def test_a_callback_host_name_is_checked_by_what_it_resolves_to(
    client: TestClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    from observatory.calib.requests import CallbackRefused, callback_address, check_callback_url

    url = "http://metadata.example/x"
    assert check_callback_url(url, settings) == url  # a name: filed, checked when called
    resolved = {"metadata.example": "169.254.169.254", "receiver.example": "127.0.0.1",
                "127.0.0.1": "127.0.0.1"}  # fmt: skip

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (resolved[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(CallbackRefused, match=r"resolves to 169\.254\.169\.254"):
        callback_address(url)
    with session_factory() as session:
        from observatory.calib.requests import add_cal_request

        request = add_cal_request(session, settings, TARGET, callback_url=url)
        finish_request(session, request, fit_id=1_700_000_000_000_000)
        session.commit()
    assert deliver_callbacks(session_factory, settings) == 0  # not sent
    (stored,) = requests_in(session_factory)
    assert stored.callback_attempts == 1
    assert "resolves to 169.254.169.254" in (stored.callback_error_message or "")
    assert callback_address("http://receiver.example:8080/x") == "127.0.0.1"
    assert callback_address("http://127.0.0.1:8080/x") == "127.0.0.1"


def test_a_callback_host_that_does_not_resolve_is_not_called(
    client: TestClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Never sent unchecked: the HTTP client would look the name up again, and a resolver
    that failed the check's lookup may answer the second with an address refused here."""
    import socket

    from observatory.calib.requests import add_cal_request

    receiver = CallbackReceiver(failures=0)
    lookups: list[str] = []

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        lookups.append(host)
        if len(lookups) == 1:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    url = receiver.url.replace("127.0.0.1", "rebinding.example")
    with session_factory() as session:
        request = add_cal_request(session, settings, TARGET, callback_url=url)
        finish_request(session, request, fit_id=1_700_000_000_000_000)
        session.commit()
    assert deliver_callbacks(session_factory, settings) == 0
    assert lookups == ["rebinding.example"] and receiver.bodies == []
    (stored,) = requests_in(session_factory)
    assert stored.callback_attempts == 1
    assert "callback host rebinding.example does not resolve" in (
        stored.callback_error_message or ""
    )
    receiver.server.shutdown()


def test_a_callback_host_is_resolved_as_the_http_client_sends_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """IDNA 2008 (httpx) writes faß.de as xn--fa-hia.de, IDNA 2003 (Python's codec) as
    fass.de: another domain, whose address the call was pinned to."""
    import socket

    from observatory.calib.requests import callback_address

    looked_up: list[str] = []

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        looked_up.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert callback_address("https://fa\u00df.de/x") == "127.0.0.1"
    assert looked_up == ["xn--fa-hia.de"]


def test_an_attempt_in_flight_is_not_taken_again_by_another_server(
    client: TestClient, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """A claim was stamped with the pass's time: with the receiver slow to answer (up to
    CALLBACK_TIMEOUT_S) and the back-off no longer, a standby server on the same database
    claimed the retry while the first attempt was still in flight, and the receiver got
    the callback twice."""
    from observatory.calib import requests as calib_requests
    from observatory.calib.requests import add_cal_request

    settings = settings.model_copy(
        update={"calib_callback_hosts": ["127.0.0.1"], "calib_callback_backoff_s": 30.0}
    )
    with session_factory() as session:
        request = add_cal_request(session, settings, TARGET, callback_url="http://127.0.0.1:9/")
        finish_request(session, request, fit_id=1_700_000_000_000_000)
        session.commit()
        request_id = request.id
    start = datetime.now(UTC)
    with session_factory() as session:  # server A claims the first attempt
        claimed = calib_requests._claim_due_callbacks(session, settings, start)
        assert [r.id for r in claimed] == [request_id]
    for seconds in (31, calib_requests.CALLBACK_TIMEOUT_S + 1):  # A's attempt may be in flight
        with session_factory() as session:  # server B
            later = start + timedelta(seconds=seconds)
            assert calib_requests._claim_due_callbacks(session, settings, later) == []
    with session_factory() as session:  # A never finished it (it died): B takes it over
        later = start + timedelta(seconds=calib_requests.CALLBACK_CLAIM_LEASE_S + 31)
        assert [r.id for r in calib_requests._claim_due_callbacks(session, settings, later)] == [
            request_id
        ]
