"""Fit requests: choosing the calibrator, refusing bad callbacks, and delivering callbacks once."""

from __future__ import annotations

from collections.abc import Iterator
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
        # TARGET + 1000 is the nearest calibrator but has no visibilities archived: never chosen.
        for obsid, calibration, chans, archived in (
            (TARGET, False, CHANS, True), (TARGET - 7200, True, CHANS, True),
            (TARGET + 3000, True, CHANS, True), (TARGET - 100, True, [1, 2], True),
            (TARGET + 1000, True, CHANS, False),
        ):  # fmt: skip
            session.add(Observation(obsid=obsid, stoptime=obsid + 120, mode="MWAX_CORRELATOR",
                                    coarse_chans=chans, calibration=calibration, atten_db=1.0))  # fmt: skip
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


def test_add_cal_request(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    reply = client.get("/calib/add_cal_request", params={"obs_id": TARGET, "asvo_job_id": 42})
    assert reply.status_code == 200 and reply.content == b""
    reply = client.post(
        "/calib/add_cal_request", data={"obs_id": TARGET - 7200, "max_time_separation": 0}
    )
    assert reply.status_code == 200
    first, second = requests_in(session_factory)
    assert (first.cal_id, first.target_obs_id, first.asvo_job_id) == (TARGET + 3000, TARGET, 42)
    assert second.cal_id == TARGET - 7200  # a calibrator asking for its own fit
    assert client.get("/calib/add_cal_request", params={"obs_id": 1_399_999_992}).status_code == 400
    none_near = client.get(
        "/calib/add_cal_request", params={"obs_id": TARGET, "max_time_separation": 60}
    )
    assert none_near.status_code == 404 and "no calibrator observation" in none_near.json()["error"]
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


def test_callback_is_delivered_once_after_a_failing_receiver(
    client: TestClient, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    receiver = CallbackReceiver(failures=2)
    settings = settings.model_copy(
        update={"calib_callback_hosts": ["127.0.0.1"], "calib_callback_backoff_s": 10.0}
    )
    with session_factory() as session:
        from observatory.calib.requests import add_cal_request

        request = add_cal_request(
            session, settings, TARGET, asvo_job_id=7, callback_url=receiver.url
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
        and body["asvo_job_id"] == 7
    )
    assert body["success"] is True and "finished" in body["message"]
    assert datetime.fromisoformat(body["finished_datetime"]).tzinfo is not None
    (stored,) = requests_in(session_factory)
    assert stored.callback_attempts == 3 and stored.callback_delivered_datetime is not None
    receiver.server.shutdown()
