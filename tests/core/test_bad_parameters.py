"""Numbers no database column holds, not-a-numbers, digits int() refuses and NUL characters
(which PostgreSQL refuses in text): a clear 400 (or, for trigger calls, an error in the answer),
never a server error. Found by probing every endpoint's parameters with such values against a
running demo, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message

from observatory.app import create_app
from observatory.core.accounts import create_user
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory

HUGE = "99999999999999999999999"  # more than 2**63
FULL_WIDTH_12 = "\uff11\uff12"  # 12 in full-width digits


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        create_user(session, "alice", "key-of-alice")
        session.commit()
    engine.dispose()
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("path", "params", "named"),
    [
        ("/trigger/busy", {"project_id": "D0000", "obstime": "NaN"}, "obstime"),
        ("/trigger/busy", {"project_id": "D0000", "obstime": "1e300"}, "obstime"),
        ("/trigger/obslist", {"obstime": HUGE}, "obstime"),
        ("/trigger/show", {"trigger_id": "1e300"}, "trigger_id"),
        ("/trigger/find", {"page": "1e300"}, "page"),
        ("/trigger/find", {"trigger_id": "-1e300"}, "trigger_id"),
        ("/metadata/find", {"mintime": HUGE}, "mintime"),
        ("/metadata/find", {"before": HUGE}, "before"),
        ("/metadata/find", {"page": HUGE}, "page"),
        ("/calib/fit", {"fitid": HUGE}, "fitid"),
        ("/calib/fit", {"fitid": "\u00b9"}, "fitid"),  # superscript one: isdigit() but not int()
        ("/calib/plot/gains.png", {"fitid": HUGE}, "fitid"),
        ("/calib/get_cal_solution", {"obs_id": "1", "prefer_fitid": HUGE}, "prefer_fitid"),
        ("/calib/get_cal_solution", {"obs_id": "\u00b9"}, "obsid"),
        ("/calib/get_calfile_for_calid", {"cal_id": "abc"}, "cal_id"),
        ("/calib/get_calfile_for_calid", {"cal_id": HUGE}, "cal_id"),
        ("/calib/summary", {"mintime": HUGE}, "mintime"),
        # Past year 9999 no UTC date shows it: the summary page's dates were a server error.
        ("/calib/summary", {"maxtime": "99999999999999"}, "maxtime"),
        # Ids of INTEGER columns: PostgreSQL refuses to compare with more than 2**31 - 1.
        ("/trigger/find", {"trigger_id": "3000000000"}, "trigger_id"),
        ("/calib/add_cal_request", {"obs_id": "1", "asvo_job_id": "3000000000"}, "asvo_job_id"),
        # Anything but 1 used to mean "without the calibration", silently.
        ("/metadata/fits", {"obs_id": "1000000000", "include_calib": "true"}, "include_calib"),
        # Other scripts' digits: isdecimal() and int() read full-width ones as numbers.
        ("/calib/fit", {"fitid": FULL_WIDTH_12}, "fitid"),
        ("/calib/get_cal_solution", {"obs_id": "\uff11" * 10}, "obsid"),
        ("/metadata/find", {"mintime": FULL_WIDTH_12}, "mintime"),
        # More digits than int() reads (4,300): its ValueError was a server error.
        ("/metadata/find", {"page": "9" * 5000}, "page"),
        ("/calib/fit", {"fitid": "9" * 5000}, "fitid"),
    ],
)
def test_out_of_range_numbers_are_a_clear_400(
    client: TestClient, path: str, params: dict[str, str], named: str
) -> None:
    reply = client.get(path, params=params, headers={"Accept": "application/json"})
    assert reply.status_code == 400, reply.text
    assert named in reply.json()["error"]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"exptime": "NaN"}, "exptime"),
        ({"exptime": "Infinity"}, "exptime"),
        ({"ra": "NaN"}, "ra"),
        ({"nobs": "1e300"}, "nobs"),
        ({"freqspecs": "\u00b9,24"}, "freqspec"),
        # Planning three billion observations would take the server's memory and time.
        ({"nobs": "3000000000"}, "more than the 172800 s (2 days) one trigger may take"),
    ],
)
def test_trigger_calls_name_a_bad_number_in_their_answer(
    client: TestClient, params: dict[str, str], named: str
) -> None:
    """Trigger calls answer 200 with ``success`` and ``errors`` (their clients drop 4xx bodies)."""
    reply = client.post(
        "/trigger/triggerobs", data={"project_id": "D0000", "ra": "10", "dec": "-30", **params}
    )
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["success"] is False
    assert any(named in error for error in answer["errors"].values()), answer["errors"]


@pytest.mark.parametrize("job_id", [HUGE, "3000000000", FULL_WIDTH_12, "9" * 5000])
def test_cancelling_a_job_id_beyond_any_database_integer(client: TestClient, job_id: str) -> None:
    assert client.post("/api/api_login", auth=("mantaray-clientv2.0", "key-of-alice")).is_success
    reply = client.get("/api/cancel_job", params={"job_id": job_id})
    assert reply.status_code == 400 and "is not a job id" in reply.json()["error"]


def test_showing_a_trigger_id_no_row_can_have_is_not_found(client: TestClient) -> None:
    reply = client.get("/trigger/show", params={"trigger_id": "3000000000"})
    assert reply.status_code == 404 and "no trigger with trigger_id" in reply.json()["error"]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/metadata/find", {"obsname": "\x00"}),
        ("/metadata/find", {"projectid": "G\x000001"}),
        ("/trigger/find", {"project_id": "\x00"}),
        ("/calib/summary", {"mintime": "\x00"}),
    ],
)
def test_a_nul_character_in_the_query_is_a_clear_400(
    client: TestClient, path: str, params: dict[str, str]
) -> None:
    reply = client.get(path, params=params)
    assert reply.status_code == 400 and "NUL" in reply.json()["error"]


@pytest.mark.parametrize("field", ["obsname", "creator"])
def test_a_nul_character_in_a_trigger_body_is_a_clear_400(client: TestClient, field: str) -> None:
    data = {"project_id": "D0000", "ra": "10", "dec": "-30", field: "GRB\x00"}
    reply = client.post("/trigger/triggerobs", data=data)
    assert reply.status_code == 400 and "NUL" in reply.json()["error"]
    reply = client.post("/trigger/triggerobs", json=data)
    assert reply.status_code == 400 and "NUL" in reply.json()["error"]


def test_a_nul_character_in_a_form_is_a_clear_400_and_other_forms_pass(
    client: TestClient,
) -> None:
    """The sign-in form looked the name up in the database: PostgreSQL refused the NUL."""
    page = client.get("/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    refused = client.post("/login", data={"username": "\x00", "password": "x", "csrf_token": token})
    assert refused.status_code == 400 and "NUL" in refused.json()["error"]
    wrong = client.post("/login", data={"username": "alice", "password": "x", "csrf_token": token})
    assert wrong.status_code == 401  # the form still reaches the handler whole
    logged_in = client.post(
        "/api/api_login", auth=("mantaray-clientv2.0", "key-of-alice"), data={"note": "a b&c"}
    )
    assert logged_in.status_code == 200


def test_a_time_parameter_takes_gps_seconds_or_an_iso_time_in_any_zone() -> None:
    from observatory.core.errors import BadRequest
    from observatory.core.gpstime import utc_to_gps
    from observatory.core.web import gps_time_param

    noon_gps = utc_to_gps("2026-11-30T12:00:00")
    assert gps_time_param("mintime", None) is None
    assert gps_time_param("mintime", "  ") is None
    assert gps_time_param("mintime", "1448539218.5") == 1448539218.5
    assert gps_time_param("mintime", "2026-11-30T12:00") == noon_gps
    assert gps_time_param("mintime", "2026-11-30T12:00:00Z") == noon_gps
    assert gps_time_param("mintime", "2026-11-30T20:00:00+08:00") == noon_gps
    # The last two: a zone that moves the time past the calendar's ends (a 500 before).
    for bad in ("last tuesday", "1.2.3", HUGE, "-5", "9999-12-31T23:59:59-05:00",
                "0001-01-01T00:00+05:00"):  # fmt: skip
        with pytest.raises(BadRequest, match="mintime"):
            gps_time_param("mintime", bad)


NESTED_JSON = "[" * 100_000  # json.loads raises RecursionError, not ValueError, for this


@pytest.mark.parametrize(
    "path",
    ["/trigger/busy", "/trigger/triggerobs", "/calib/grafana/metrics", "/calib/grafana/query"],
)
def test_a_body_nested_too_deeply_is_a_clear_400(client: TestClient, path: str) -> None:
    reply = client.post(path, content=NESTED_JSON, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert "nested too deeply" in reply.json()["error"]


def test_a_parameter_nested_too_deeply_is_named_in_the_trigger_answer(client: TestClient) -> None:
    data = {"project_id": "D0000", "ra": "10", "dec": "-30", "freqspecs": NESTED_JSON}
    reply = client.post("/trigger/triggerobs", data=data)
    assert reply.status_code == 200, reply.text
    assert "freqspecs" in str(reply.json()["errors"])
    assert reply.json()["success"] is False


def test_a_negative_time_separation_is_refused_with_the_rule(client: TestClient) -> None:
    reply = client.get(
        "/calib/get_cal_solution", params={"obs_id": "1", "max_time_separation": "-5"}
    )
    assert reply.status_code == 400
    assert reply.json()["error"] == (
        "max_time_separation must be a whole number of seconds, 0 or more, not '-5'"
    )


@pytest.mark.parametrize("endpoint", ["conversion_job", "download_vis_job", "voltage_job"])
def test_a_nul_character_in_a_job_form_is_refused_as_invalid_input(
    client: TestClient, endpoint: str
) -> None:
    """error_code 0 is the clients' "invalid input": with 1 giant-squid abandons the batch."""
    assert client.post("/api/api_login", auth=("mantaray-clientv2.0", "key-of-alice")).is_success
    for form in ({"obs_id": "1000000000\x00"}, {"obs_id": "1000000000", "note\x00": "x"}):
        reply = client.post(f"/api/{endpoint}", data=form)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error_code"] == 0 and "NUL" in reply.json()["error"], reply.json()


@pytest.mark.parametrize(
    "body",
    [b"obs_id=\xc3\xa9", b"obs_id=%C3%A9", b"obs_id=%c3%a9"],
    ids=["raw-utf8", "escaped", "escaped-lower"],
)
def test_a_form_value_is_read_as_utf8_whether_escaped_or_not(
    client: TestClient, body: bytes
) -> None:
    """``curl -d 'obs_id=é'`` sends é's two UTF-8 bytes unescaped: they were read as latin-1.
    The form's type in any case, with spaces or a charset, is a form (Starlette reads it as one)."""
    assert client.post("/api/api_login", auth=("mantaray-clientv2.0", "key-of-alice")).is_success
    for content_type in ("application/x-www-form-urlencoded", "Application/X-WWW-Form-Urlencoded",
                         " application/x-www-form-urlencoded ; charset=utf-8"):  # fmt: skip
        reply = client.post("/api/conversion_job", content=body,
                            headers={"content-type": content_type})  # fmt: skip
        assert reply.status_code == 400
        assert reply.json() == {
            "error": "Obs Id: 'é' is not a 10-digit observation id",
            "error_code": 0,
        }, content_type
        nul = client.post("/api/conversion_job", content=b"obs_id=1%00",
                          headers={"content-type": content_type})  # fmt: skip
        assert nul.status_code == 400 and "NUL" in nul.json()["error"], content_type


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [("/api/conversion_job", b"obs_id=\xe9", 0), ("/api/conversion_job", b"obs_id=%E9", 0),
     ("/trigger/busy", b"project_id=D0000&obstime=%FF60", 1)],
)  # fmt: skip
def test_a_form_that_is_not_utf8_is_a_clear_400(
    client: TestClient, path: str, body: bytes, code: int
) -> None:
    """A latin-1 é (raw or escaped) was read as é or as U+FFFD; neither is what was meant."""
    assert client.post("/api/api_login", auth=("mantaray-clientv2.0", "key-of-alice")).is_success
    reply = client.post(path, content=body,
                        headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert reply.status_code == 400
    assert reply.json() == {"error": "the form body is not UTF-8 text", "error_code": code}


def _get_raw_query(client: TestClient, path: str, query: bytes) -> tuple[int, dict[str, Any]]:
    """GET with a query string sent byte for byte (httpx escapes or refuses non-ASCII)."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": "", "headers": [(b"host", b"testserver")],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}  # fmt: skip
    asyncio.run(client.app(scope, receive, send))  # type: ignore[arg-type]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


def test_a_query_string_is_read_as_utf8_and_refused_when_it_is_not(client: TestClient) -> None:
    for query in (b"trigger_id=\xc3\xa9", b"trigger_id=%C3%A9"):
        status, answer = _get_raw_query(client, "/trigger/show", query)
        assert status == 400 and "'é'" in answer["error"], answer
    for query in (b"trigger_id=%E9", b"trigger_id=\xe9"):
        status, answer = _get_raw_query(client, "/trigger/show", query)
        assert (status, answer["error"]) == (400, "the query string is not UTF-8 text")
