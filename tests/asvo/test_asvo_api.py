"""The ASVO /api as mwa_client and giant-squid use it (specs/asvo.md sections 1-3, checklist 2-8)."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select

from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.asvo.models import Job
from observatory.asvo.service import check_client_version
from observatory.core.accounts import reset_api_key
from observatory.core.config import Settings, settings_from
from observatory.core.database import make_engine, make_session_factory, utcnow
from observatory.core.errors import Forbidden
from observatory.core.gpstime import now_gps
from observatory.core.models import User
from observatory.core.security import sign_value

MWAX_OBS = "1320409688"
LEGACY_OBS = "1131733552"
VCS_OBS = 1320412440
API_KEY = "test-key-of-alice"
STATES = {
    "queued", "waitcal", "staging", "staged", "downloading", "preparing", "preprocessing",
    "imaging", "delivering", "completed", "error", "expired", "cancelled",
}  # fmt: skip


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def app_settings(seed_archive: Callable[[int, Mapping[str, str]], Settings]) -> Settings:
    return seed_archive(VCS_OBS, {"alice": API_KEY, "bob": "test-key-of-bob"})


@pytest.fixture
def client(app_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings)) as client:
        reply = client.post("/api/api_login", headers=basic("mantaray-clientv2.0", API_KEY))
        assert reply.status_code == 200, reply.text
        yield client


def submit(client: TestClient, endpoint: str, **form: Any) -> Any:
    return client.post(f"/api/{endpoint}", data={k: str(v) for k, v in form.items()})


def check_giant_squid_row(element: dict[str, Any]) -> None:
    """Every rule of specs/asvo.md section 3's table, as giant-squid's serde decodes a row."""
    assert element["action"] in ("INSERT", "UPDATE", "DELETE") and element["table"] == "jobs"
    row = element["row"]
    assert isinstance(row["id"], int) and 0 <= row["id"] < 1_000_000_000
    assert isinstance(row["job_type"], int) and 0 <= row["job_type"] <= 6
    assert row["job_state"] in STATES
    assert "error_text" in row
    if row["job_state"] == "error":
        assert isinstance(row["error_text"], str)
    params = row["job_params"]
    assert isinstance(params["obs_id"], str) and re.fullmatch(r"\d{10}", params["obs_id"])
    assert isinstance(params["delivery"], str)
    assert isinstance(params["job_type"], str)
    assert isinstance(params["priority"], int) and 0 <= params["priority"] < 65536
    for optional in ("download_type", "user_pawsey_group"):
        assert params.get(optional) is None or isinstance(params[optional], str)
    if row["product"] is not None:
        assert row["job_state"] == "completed"
        for file in row["product"]["files"]:
            assert file["type"] in ("acacia", "dug", "scratch")
            assert isinstance(file["size"], int) and file["size"] >= 0
            if file["type"] == "acacia":
                assert isinstance(file["url"], str) and re.fullmatch(r"[0-9a-f]{40}", file["sha1"])
            else:
                assert isinstance(file["path"], str)
    else:
        assert row["job_state"] != "completed"


# ----------------------------------------------------------------------------------------------
# Login


def test_login_sets_the_signed_cookie_without_domain(app_settings: Settings) -> None:
    with TestClient(create_app(app_settings)) as client:
        reply = client.post("/api/api_login", headers=basic("giant-squidv2.5.1", API_KEY))
        assert reply.status_code == 200
        cookie = reply.headers["set-cookie"]
        assert cookie.startswith("MWA_JOB_COOKIE=")
        assert "httponly" in cookie.lower()
        assert "domain" not in cookie.lower()
        assert "secure" not in cookie.lower()  # served over http here
        assert client.get("/api/get_jobs").status_code == 200


def test_login_over_https_marks_the_cookie_secure(app_settings: Settings) -> None:
    with TestClient(create_app(app_settings), base_url="https://testserver") as client:
        reply = client.post("/api/api_login", headers=basic("giant-squidv2.5.1", API_KEY))
        assert "secure" in reply.headers["set-cookie"].lower()


@pytest.mark.parametrize(
    ("user", "password", "status", "fragment"),
    [
        ("mantaray-clientv2.0", "wrong-key", 401, "invalid API key"),
        ("curl/8.0", API_KEY, 400, "Unrecognised client"),
        ("mantaray-clientv1.1", API_KEY, 403, "too old"),
        ("giant-squidv1.9.9", API_KEY, 403, "too old"),
        ("giant-squidv2.0.0-rc1", API_KEY, 403, "Client version 2.0.0-rc1 is too old"),
        ("giant-squidv" + "9" * 5000, API_KEY, 400, "Unrecognised client"),  # int() refuses it
    ],
)
def test_login_refusals_are_json(
    app_settings: Settings, user: str, password: str, status: int, fragment: str
) -> None:
    with TestClient(create_app(app_settings)) as client:
        reply = client.post("/api/api_login", headers=basic(user, password))
        assert reply.status_code == status
        assert fragment in reply.json()["error"]
        assert "set-cookie" not in reply.headers


@pytest.mark.parametrize(
    ("client", "minimum", "accepted"),
    [
        ("giant-squidv2.5.0", "2.5", True),  # was refused: (2, 5, 0, 1) < (2, 5, 1)
        ("giant-squidv3.0.0", "3.0", True),
        ("mantaray-clientv2.0", "2", True),
        ("giant-squidv2.5", "2.5.0", True),
        ("giant-squidv2.5.1", "2.5", True),
        ("giant-squidv2.4.9", "2.5", False),
        ("giant-squidv2.5.0-rc1", "2.5", False),
        ("mantaray-clientv1.9", "2", False),
    ],
)
def test_a_minimum_version_with_fewer_parts_compares_as_padded_with_zeros(
    client: str, minimum: str, accepted: bool
) -> None:
    prefix = client[: client.index("v") + 1]
    if accepted:
        check_client_version(client, {prefix: minimum})
    else:
        with pytest.raises(Forbidden, match="too old"):
            check_client_version(client, {prefix: minimum})


@pytest.mark.parametrize(
    ("minimums", "fragment"),
    [
        ({"giant-squidv": "2.5-beta"}, "is not a version of numbers and dots"),
        ({"giant-squid": "2.5"}, "unknown client 'giant-squid'"),
    ],
)
def test_a_minimum_version_that_cannot_be_compared_is_refused_at_start(
    minimums: dict[str, str], fragment: str
) -> None:
    with pytest.raises(ValidationError, match=fragment):
        settings_from(asvo_min_client_versions=minimums)


@pytest.mark.parametrize(
    "user", ["giant-squidv2.5.1-rc1", "giant-squidv2.6.0-alpha.2", "giant-squidv2.5.1+git.abc"]
)
def test_giant_squid_pre_releases_and_builds_log_in(app_settings: Settings, user: str) -> None:
    """Cargo versions may carry a SemVer pre-release or build: refused as "Unrecognised"."""
    with TestClient(create_app(app_settings)) as client:
        assert client.post("/api/api_login", headers=basic(user, API_KEY)).status_code == 200


def test_calls_without_the_cookie_are_401(app_settings: Settings) -> None:
    with TestClient(create_app(app_settings)) as client:
        assert client.get("/api/get_jobs").status_code == 401
        client.cookies.set("MWA_JOB_COOKIE", "user:1.1700000000.forged")
        reply = client.get("/api/get_jobs")
        assert reply.status_code == 401 and "api_login" in reply.json()["error"]
        # A signature hmac.compare_digest cannot compare (non-ASCII) was a 500.
        raw = {"Cookie": "MWA_JOB_COOKIE=api:1:0.1700000000.\u00e9".encode()}
        assert client.get("/api/get_jobs", headers=raw).status_code == 401
        assert client.post("/api/api_login").status_code == 401
        # Validly signed, but tied to no key (the old format, which nothing could end) or a
        # portal sign-in (which must not open cancel_job): refused.
        key = app_settings.secret_key_bytes()
        for value in ("user:1", "portal:1:0", "api:1:0000000000000000"):
            client.cookies.set("MWA_JOB_COOKIE", sign_value(value, key))
            assert client.get("/api/get_jobs").status_code == 401
            assert client.get("/api/cancel_job", params={"job_id": "1"}).status_code == 401


def test_a_login_ends_when_the_api_key_changes(client: TestClient, app_settings: Settings) -> None:
    """A cookie from /api/api_login names the key it was made with: a new key ends it."""
    job_id = submit(client, "download_vis_job", obs_id=MWAX_OBS, download_type="vis").json()[
        "job_id"
    ]
    engine = make_engine(app_settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        alice = session.scalar(select(User).where(User.name == "alice"))
        assert alice is not None
        reset_api_key(session, alice, "the-new-key-of-alice")
        session.commit()
    engine.dispose()
    assert client.get("/api/get_jobs").status_code == 401
    assert client.get("/api/cancel_job", params={"job_id": job_id}).status_code == 401
    assert (
        submit(client, "download_vis_job", obs_id=MWAX_OBS, download_type="vis_meta").status_code
        == 401
    )
    relogin = client.post(
        "/api/api_login", headers=basic("giant-squidv2.5.1", "the-new-key-of-alice")
    )
    assert relogin.status_code == 200
    assert client.get("/api/cancel_job", params={"job_id": job_id}).status_code == 200


# ----------------------------------------------------------------------------------------------
# Submission


def test_each_job_type_is_queued_and_listed(client: TestClient) -> None:
    replies = [
        submit(client, "conversion_job", obs_id=MWAX_OBS, output="uvfits", avg_freq_res=80,
               flag_edge_width=80, delivery="acacia", allow_resubmit="false", unknown_key="x"),
        submit(client, "download_vis_job", obs_id=MWAX_OBS, download_type="vis", delivery="acacia"),
        submit(client, "download_vis_job", obs_id=LEGACY_OBS, download_type="vis_meta"),
        submit(client, "voltage_job", obs_id=VCS_OBS, offset=0, duration=8, delivery="scratch"),
        submit(client, "voltage_job", obs_id=VCS_OBS, offset=8, duration=8, channel_range="true",
               from_channel=130, to_channel=133),
        # An mwa_client CSV row may give the channels without channel_range: still a range.
        submit(client, "voltage_job", obs_id=VCS_OBS, offset=0, duration=4, from_channel=133,
               to_channel=133),
    ]  # fmt: skip
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert set(reply.json()) == {"job_id"}
    ids = [reply.json()["job_id"] for reply in replies]
    listing = client.get("/api/get_jobs").json()
    assert [e["row"]["id"] for e in listing] == ids
    assert [e["row"]["job_type"] for e in listing] == [0, 1, 2, 3, 3, 3]
    for element in listing:
        check_giant_squid_row(element)
        assert element["row"]["job_state"] == "queued"
    conversion = listing[0]["row"]["job_params"]
    assert conversion["obs_id"] == MWAX_OBS and conversion["job_type"] == "conversion"
    assert conversion["avg_freq_res"] == "80.0" and "unknown_key" not in conversion
    assert listing[2]["row"]["job_params"]["download_type"] == "vis_meta"
    assert listing[3]["row"]["job_params"]["delivery"] == "scratch"
    assert listing[4]["row"]["job_params"]["from_channel"] == 130
    implied = listing[5]["row"]["job_params"]
    assert (implied["channel_range"], implied["from_channel"], implied["to_channel"]) == (
        True,
        133,
        133,
    )


@pytest.mark.parametrize(
    ("endpoint", "form", "message"),
    [
        ("download_vis_job", {"obs_id": MWAX_OBS}, "Download Type: Expected not None"),
        ("download_vis_job", {"obs_id": MWAX_OBS, "download_type": "raw"}, "Download Type: 'raw'"),
        ("download_vis_job", {"download_type": "vis"}, "Obs Id: Expected not None"),
        ("download_vis_job", {"obs_id": "12345", "download_type": "vis"}, "not a 10-digit"),
        ("download_vis_job", {"obs_id": "1000000000", "download_type": "vis"}, "Observation 1000000000 does not exist"),
        ("download_vis_job", {"obs_id": str(VCS_OBS), "download_type": "vis"}, "no visibilities to download"),
        ("download_vis_job", {"obs_id": MWAX_OBS, "download_type": "vis", "delivery": "ftp"}, "Delivery: 'ftp'"),
        ("download_vis_job", {"obs_id": MWAX_OBS, "download_type": "vis", "delivery_format": "zip"}, "only tar"),
        ("download_vis_job", {"obs_id": MWAX_OBS, "download_type": "vis", "allow_resubmit": "maybe"}, "allow_resubmit='maybe'"),
        ("conversion_job", {"obs_id": MWAX_OBS, "avg_time_res": "3"}, "avg_time_res=3.0 is not valid"),
        ("conversion_job", {"obs_id": MWAX_OBS, "avg_freq_res": "50"}, "avg_freq_res=50.0 is not valid"),
        ("conversion_job", {"obs_id": MWAX_OBS, "output": "fits"}, "output='fits' is not valid"),
        ("conversion_job", {"obs_id": MWAX_OBS, "centre": "custom"}, "phase_centre_ra"),
        ("conversion_job", {"obs_id": str(VCS_OBS)}, "no visibilities to convert"),
        ("voltage_job", {"obs_id": MWAX_OBS, "offset": "0", "duration": "8"}, "has no voltages"),
        ("voltage_job", {"obs_id": str(VCS_OBS), "duration": "8"}, "Offset: Expected not None"),
        ("voltage_job", {"obs_id": str(VCS_OBS), "offset": "0", "duration": "999"}, "Duration: 999 is outside 1..16"),
        ("voltage_job", {"obs_id": str(VCS_OBS), "offset": "x", "duration": "8"}, "Offset: 'x' is not a whole number"),
        # Full-width digits: int() reads them, no other MWA tool does.
        ("download_vis_job", {"obs_id": "\uff11" * 10, "download_type": "vis"}, "not a 10-digit"),
        ("voltage_job", {"obs_id": str(VCS_OBS), "offset": "\uff10", "duration": "8"}, "Offset: '\uff10' is not a whole number"),
        ("voltage_job", {"obs_id": str(VCS_OBS), "offset": "0", "duration": "9" * 5000}, "Duration: '999"),
        ("voltage_job", {"obs_id": str(VCS_OBS), "offset": "0", "duration": "8", "channel_range": "true",
                         "from_channel": "200", "to_channel": "210"}, "none of the observation's coarse channels"),
        ("voltage_job", {"obs_id": str(VCS_OBS), "offset": "0", "duration": "8",
                         "from_channel": "140", "to_channel": "150"}, "none of the observation's coarse channels"),
        ("voltage_job", {"obs_id": str(VCS_OBS), "offset": "0", "duration": "8", "channel_range": "false",
                         "from_channel": "133", "to_channel": "133"}, "with channel_range=false"),
        ("voltage_job", {"obs_id": str(VCS_OBS), "offset": "0", "duration": "8",
                         "from_channel": "133"}, "To Channel: Expected not None: a channel range needs both"),
        ("voltage_job", {"obs_id": str(VCS_OBS), "offset": "0", "duration": "8", "channel_range": "true",
                         "to_channel": "133"}, "From Channel: Expected not None: a channel range needs both"),
        # It said "To Channel: 133 is outside 134..255", as if channels stopped at 134.
        ("voltage_job", {"obs_id": str(VCS_OBS), "offset": "0", "duration": "8", "channel_range": "true",
                         "from_channel": "134", "to_channel": "133"},
         "To Channel: 133 is below From Channel 134: to_channel must not be below from_channel"),
        ("beamformer_job", {"obs_id": MWAX_OBS}, "Beamformer jobs are not offered"),
        ("imaging_job", {"obs_id": MWAX_OBS}, "Imaging jobs are not offered"),
    ],
)  # fmt: skip
def test_bad_submissions_are_400_with_error_code_0(
    client: TestClient, endpoint: str, form: dict[str, str], message: str
) -> None:
    reply = submit(client, endpoint, **form)
    assert reply.status_code == 400
    body = reply.json()
    assert body["error_code"] == 0 and message in body["error"], body
    assert "job_id" not in body
    assert client.get("/api/get_jobs").json() == []
    # giant-squid goes on to its batch's next obsid only after a refusal worded as one about
    # an observation (specs/asvo.md 2.2); any other ends the batch. One obsid's problems
    # (its mode, length, channels, integration time) must read so; the form's must not.
    about_the_observation = (
        "does not exist", "no visibilities", "has no voltages", "is outside 1..16",
        "coarse channels", "avg_time_res=3.0", "avg_freq_res=50.0",
    )  # fmt: skip
    goes_on = body["error"].startswith("Unable to submit job. Observation ") or (
        body["error"].startswith("Observation ") and body["error"].endswith(" does not exist")
    )
    assert goes_on == any(m in message for m in about_the_observation), body


def test_unknown_observation_message_lets_giant_squid_skip_it(client: TestClient) -> None:
    body = submit(client, "download_vis_job", obs_id="1000000000", download_type="vis").json()
    assert body == {"error": "Observation 1000000000 does not exist", "error_code": 0}
    assert body["error"].startswith("Observation ") and body["error"].endswith(" does not exist")


def _set_state(app_settings: Settings, job_id: int, state: str) -> None:
    engine = make_engine(app_settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state = state
        if state == "error":
            job.error_text = "failed"
        if state == "completed":  # as the pipeline leaves a completed job: with its product
            job.product = {"files": [{"type": "acacia", "url": "https://testserver/p.tar",
                                      "size": 10240, "sha1": "0" * 40}]}  # fmt: skip
        session.commit()
    engine.dispose()


def test_duplicates_and_allow_resubmit(client: TestClient, app_settings: Settings) -> None:
    form = {"obs_id": MWAX_OBS, "download_type": "vis", "delivery": "acacia"}
    first = submit(client, "download_vis_job", **form).json()["job_id"]
    # A queued duplicate is refused with or without allow_resubmit (section 2.3).
    reply = submit(client, "download_vis_job", **form, allow_resubmit="false")
    assert reply.status_code == 400
    assert reply.json() == {
        "error": "Job already queued, processing or complete",
        "error_code": 2,
        "job_id": first,
    }
    reply = submit(client, "download_vis_job", **form, allow_resubmit="true")
    assert reply.json() == {
        "error": "Job already queued or processing.",
        "error_code": 2,
        "job_id": first,
    }
    # A different delivery is a different job.
    dug = submit(client, "download_vis_job", **{**form, "delivery": "dug"}).json()["job_id"]
    # Completed: refused unless allow_resubmit.
    _set_state(app_settings, first, "completed")
    assert submit(client, "download_vis_job", **form).json()["error_code"] == 2
    second = submit(client, "download_vis_job", **form, allow_resubmit="true").json()["job_id"]
    assert second != first
    # Errored and cancelled jobs never block a new one.
    for state in ("error", "cancelled"):
        _set_state(app_settings, dug, state)
        reply = submit(client, "download_vis_job", **{**form, "delivery": "dug"})
        assert set(reply.json()) == {"job_id"}
        dug = reply.json()["job_id"]
    # Another user's identical job is not a duplicate.
    with TestClient(create_app(app_settings)) as bob:
        bob.post("/api/api_login", headers=basic("giant-squidv2.5.1", "test-key-of-bob"))
        assert submit(bob, "download_vis_job", **form).status_code == 200
        assert len(bob.get("/api/get_jobs").json()) == 1
    for element in client.get("/api/get_jobs").json():
        check_giant_squid_row(element)


def test_outage_modes_return_the_real_messages(app_settings: Settings) -> None:
    for outage, delivery, expected in (
        ("full", "scratch", "Your job cannot be submitted as there is a full outage in progress."),
        ("partial", "acacia", "Your job cannot be submitted as there is a partial outage, please use a delivery location other than acacia."),
    ):  # fmt: skip
        settings = app_settings.model_copy(update={"asvo_outage": outage})
        with TestClient(create_app(settings)) as client:
            client.post("/api/api_login", headers=basic("mantaray-clientv2.0", API_KEY))
            reply = submit(
                client, "download_vis_job", obs_id=MWAX_OBS, download_type="vis", delivery=delivery
            )
            assert reply.status_code == 400
            assert reply.json() == {"error": expected, "error_code": 0}
    settings = app_settings.model_copy(update={"asvo_outage": "partial"})
    with TestClient(create_app(settings)) as client:
        client.post("/api/api_login", headers=basic("mantaray-clientv2.0", API_KEY))
        reply = submit(
            client, "download_vis_job", obs_id=MWAX_OBS, download_type="vis", delivery="scratch"
        )
        assert reply.status_code == 200


def test_active_job_cap(app_settings: Settings) -> None:
    settings = app_settings.model_copy(update={"asvo_max_active_jobs": 2})
    with TestClient(create_app(settings)) as client:
        client.post("/api/api_login", headers=basic("mantaray-clientv2.0", API_KEY))
        for delivery in ("acacia", "scratch"):
            assert (
                submit(
                    client,
                    "download_vis_job",
                    obs_id=MWAX_OBS,
                    download_type="vis",
                    delivery=delivery,
                ).status_code
                == 200
            )
        reply = submit(
            client, "download_vis_job", obs_id=MWAX_OBS, download_type="vis", delivery="dug"
        )
        assert reply.status_code == 400
        assert "the limit is 2" in reply.json()["error"]


# ----------------------------------------------------------------------------------------------
# Cancel


def test_cancel_answers_200_400_404(client: TestClient, app_settings: Settings) -> None:
    job_id = submit(client, "download_vis_job", obs_id=MWAX_OBS, download_type="vis").json()[
        "job_id"
    ]
    reply = client.get("/api/cancel_job", params={"job_id": job_id})
    assert reply.status_code == 200
    (element,) = client.get("/api/get_jobs").json()
    assert element["row"]["job_state"] == "cancelled"
    check_giant_squid_row(element)
    # Already cancelled: 400; malformed: 400; unknown or another user's: 404.
    assert client.get("/api/cancel_job", params={"job_id": job_id}).status_code == 400
    assert client.get("/api/cancel_job", params={"job_id": "abc"}).status_code == 400
    reply = client.get("/api/cancel_job", params={"job_id": 999_999})
    assert reply.status_code == 404
    assert reply.json()["error"] == "Job Id 999999 not found"
    with TestClient(create_app(app_settings)) as bob:
        bob.post("/api/api_login", headers=basic("giant-squidv2.5.1", "test-key-of-bob"))
        assert bob.get("/api/cancel_job", params={"job_id": job_id}).status_code == 404


def test_rows_written_outside_the_orm_are_listed(
    client: TestClient, app_settings: Settings
) -> None:
    from sqlalchemy import insert

    job_id = submit(client, "download_vis_job", obs_id=MWAX_OBS, download_type="vis").json()[
        "job_id"
    ]
    engine = make_engine(app_settings.resolved_database_url)
    with engine.begin() as connection:
        row = connection.execute(Job.__table__.select().where(Job.id == job_id)).mappings().one()
        copy = {**row, "id": job_id + 1, "request_key": "other", "row_json": ""}
        connection.execute(insert(Job), [copy])
    engine.dispose()
    listing = client.get("/api/get_jobs").json()
    assert [e["row"]["id"] for e in listing] == [job_id, job_id + 1]
    assert listing[0]["row"] | {"id": 0} == listing[1]["row"] | {"id": 0}
    for element in listing:
        check_giant_squid_row(element)


def test_a_conversion_that_names_no_output_is_a_measurement_set(client: TestClient) -> None:
    """The ASVO's default (specs/asvo.md section 5); ``conversion=`` (cotter's name) counts,
    and an empty one (or ``Output=``) names none: it was refused as contradicting the default."""
    for form in ({}, {"conversion": "uvfits"}, {"output": "both"}):
        assert submit(client, "conversion_job", obs_id=MWAX_OBS, **form).status_code == 200
    outputs = [e["row"]["job_params"]["output"] for e in client.get("/api/get_jobs").json()]
    assert outputs == ["ms", "uvfits", "both"]
    # Empty ones are the first's job again (a duplicate: code 2), not a contradiction.
    for empty in ({"conversion": ""}, {"Output": " "}):
        again = submit(client, "conversion_job", obs_id=MWAX_OBS, **empty)
        assert again.json()["error_code"] == 2, again.text


def test_a_conversion_spelling_out_its_defaults_is_a_duplicate(client: TestClient) -> None:
    """giant-squid sends avg_freq_res and flag_edge_width always; a CSV line leaves them out.
    Meaning the same conversion of this observation, the second was queued as a new job."""
    observation = client.get("/metadata/obs", params={"obs_id": MWAX_OBS}).json()
    native = {"avg_time_res": f"{observation['int_time_s']:g}",
              "avg_freq_res": f"{observation['freq_res_khz']:g}"}  # fmt: skip
    first = submit(client, "conversion_job", obs_id=MWAX_OBS, output="uvfits").json()["job_id"]
    for spelled in (native, {"flag_edge_width": "80"}, {**native, "flag_edge_width": "80"}):
        again = submit(client, "conversion_job", obs_id=MWAX_OBS, output="uvfits", **spelled)
        assert again.json() == {"error": "Job already queued, processing or complete",
                                "error_code": 2, "job_id": first}, spelled  # fmt: skip
    # The job records what was asked: the first job's parameters, not the resolution.
    (row,) = [e["row"] for e in client.get("/api/get_jobs").json()]
    assert "avg_freq_res" not in row["job_params"] and "resolved" not in row["job_params"]
    # Another averaging or edge width is another conversion.
    wider = f"{2 * observation['freq_res_khz']:g}"
    assert set(submit(client, "conversion_job", obs_id=MWAX_OBS, output="uvfits",
                      avg_freq_res=wider).json()) == {"job_id"}  # fmt: skip
    assert set(submit(client, "conversion_job", obs_id=MWAX_OBS, output="uvfits",
                      flag_edge_width="0").json()) == {"job_id"}  # fmt: skip


@pytest.mark.parametrize(
    ("obs_id", "default_dc"),
    [(MWAX_OBS, "no_flag_dc"), (LEGACY_OBS, "flag_dc")],
    ids=["mwax", "legacy"],
)
def test_a_dc_flag_choice_that_is_the_datas_default_is_a_duplicate(
    client: TestClient, obs_id: str, default_dc: str
) -> None:
    """flag_dc=false on MWAX data (true on legacy data) is what a conversion does anyway:
    it was queued as a new job beside the same conversion without it."""
    first = submit(client, "conversion_job", obs_id=obs_id, output="uvfits").json()["job_id"]
    same = {"no_flag_dc": {"flag_dc": "false"}, "flag_dc": {"flag_dc": "true"}}[default_dc]
    spellings = [same, {"flagdcchannels": same["flag_dc"]}]
    if default_dc == "no_flag_dc":
        spellings.append({"no_flag_dc": "true"})
    for spelled in spellings:
        again = submit(client, "conversion_job", obs_id=obs_id, output="uvfits", **spelled)
        assert again.json() == {"error": "Job already queued, processing or complete",
                                "error_code": 2, "job_id": first}, spelled  # fmt: skip
    # The other choice is another conversion.
    other = {"no_flag_dc": "true", "flag_dc": "false"}[default_dc]
    reply = submit(client, "conversion_job", obs_id=obs_id, output="uvfits", flag_dc=other)
    assert set(reply.json()) == {"job_id"}, reply.json()


FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        # The last value used to win silently: this job was stored as ms.
        ({"content": f"obs_id={MWAX_OBS}&output=uvfits&output=ms", "headers": {"Content-Type": FORM}},
         "output is given more than once"),
        ({"json": {"obs_id": MWAX_OBS}}, "not from a JSON body"),  # was "Obs Id: Expected not None"
        ({"data": {"obs_id": MWAX_OBS}, "files": {"output": ("hostname", b"ms")}}, "output is a file"),
        # A multipart text field passed the NUL check (which reads urlencoded bodies only).
        ({"data": {"obs_id": MWAX_OBS}, "files": {"note": (None, b"a\x00b")}}, "note holds a control character"),
        ({"data": {"obs_id": MWAX_OBS, "note": "a" * 10_001}}, "note is longer than 10000 characters"),
        ({"data": {"obs_id": MWAX_OBS, "note": "a\x1bb"}}, "note holds a control character"),
        ({"data": {f"k{i}": "1" for i in range(101)}}, "at most 100 fields"),
    ],
)  # fmt: skip
def test_a_form_that_cannot_be_read_as_sent_is_a_clear_400(
    client: TestClient, request_kwargs: dict[str, Any], message: str
) -> None:
    reply = client.post("/api/conversion_job", **request_kwargs)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]
    # The ASVO's code for invalid input (it was the services' 1: mwa_client then dropped
    # the job without a word, and giant-squid abandoned the rest of its batch).
    assert reply.json()["error_code"] == 0
    assert "UploadFile" not in reply.text
    assert client.get("/api/get_jobs").json() == []


@pytest.mark.parametrize("endpoint", ["download_vis_job", "conversion_job", "voltage_job"])
def test_fields_in_the_query_string_are_refused_naming_the_form_body(
    client: TestClient, endpoint: str
) -> None:
    """`curl -X POST '.../api/download_vis_job?obs_id=...&download_type=vis'` was told
    "Download Type: Expected not None", as if download_type had not been given."""
    reply = client.post(
        f"/api/{endpoint}", params={"obs_id": str(MWAX_OBS), "download_type": "vis"}
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert "must be sent as a form body" in error and "not in the query string" in error
    assert "(found: obs_id, download_type)" in error and "Expected not None" not in error
    assert reply.json()["error_code"] == 0
    # With a form body as well: which of the two was meant is unclear, so refused too.
    reply = client.post(
        f"/api/{endpoint}", params={"download_type": "vis"}, data={"obs_id": str(MWAX_OBS)}
    )
    assert reply.status_code == 400 and "(found: download_type)" in reply.json()["error"]
    assert client.get("/api/get_jobs").json() == []


def test_a_conversion_records_the_output_it_makes(client: TestClient) -> None:
    """uvfits is our engine's default but not the ASVO's: a row without it would read as ms."""
    assert submit(client, "conversion_job", obs_id=MWAX_OBS, output="uvfits").status_code == 200
    [job] = client.get("/api/get_jobs").json()
    assert job["row"]["job_params"]["output"] == "uvfits"


def test_an_observation_not_yet_observed_is_refused_at_submission(
    client: TestClient, app_settings: Settings
) -> None:
    """It was accepted, and failed when it ran ("no visibility files in the archive")."""
    future = (now_gps() + 86_400) // 8 * 8  # a day ahead
    engine = make_engine(app_settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        session.add(Observation(
            obsid=future, stoptime=future + 120, obsname="later", creator="test",
            project_id="D0000", mode="MWAX_CORRELATOR", delays=[0] * 16, coarse_chans=[133],
        ))  # fmt: skip
        session.commit()
    engine.dispose()
    reply = submit(client, "download_vis_job", obs_id=future, download_type="vis")
    assert reply.status_code == 400
    assert reply.json()["error"].startswith(
        f"Unable to submit job. Observation {future}: it has not been observed yet"
    )
    assert client.get("/api/get_jobs").json() == []


def test_a_download_url_is_the_same_in_every_listing_and_ends_with_the_product(
    client: TestClient, app_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signed as of the job's completion: it was signed as of each listing, so a client
    comparing rows (mwa_client's watch) saw the same completed job change at every poll."""
    job_id = submit(client, "download_vis_job", obs_id=MWAX_OBS, download_type="vis").json()[
        "job_id"
    ]

    def complete(ago: timedelta) -> None:
        engine = make_engine(app_settings.resolved_database_url)
        with make_session_factory(engine)() as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.state, job.completed = "completed", utcnow() - ago
            job.created = job.completed - timedelta(minutes=10)  # made before it completed
            job.product = {"files": [{"type": "acacia", "name": "p.tar", "size": 10240,
                                      "sha1": "0" * 40}]}  # fmt: skip
            session.commit()
        engine.dispose()

    def url_at(now_s: float) -> str:
        with monkeypatch.context() as patch:
            patch.setattr(time, "time", lambda: now_s)
            (file,) = client.get("/api/get_jobs").json()[0]["row"]["product"]["files"]
        return str(file["url"])

    complete(timedelta(minutes=5))
    url = url_at(time.time())
    assert url_at(time.time() + 60) == url_at(time.time() + 3600) == url
    # The signature holds (no such file on disk: 404, not the 403 of a bad link) ...
    assert client.get(url).status_code == 404
    # ... until the product's lifetime has passed since completion.
    complete(timedelta(days=app_settings.asvo_product_ttl_days, minutes=1))
    reply = client.get(url_at(time.time()))  # gone: 404, which giant-squid reports as expired
    assert reply.status_code == 404 and "expired" in reply.json()["error"]


def test_a_download_link_works_while_its_product_does_whatever_the_lifetime_is_now(
    client: TestClient, app_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link lasts as long as its job's product (its ``expires_at``, set at completion with
    the lifetime of then): checked against the current lifetime, lowering it
    refused links to products get_jobs still listed."""
    job_id = submit(client, "download_vis_job", obs_id=MWAX_OBS, download_type="vis").json()[
        "job_id"
    ]
    name, content = f"{MWAX_OBS}_{job_id}_vis.tar", b"product" * 100
    (app_settings.products_dir / str(job_id)).mkdir(parents=True, exist_ok=True)
    (app_settings.products_dir / str(job_id) / name).write_bytes(content)

    def complete(ago: timedelta, expires_in: timedelta) -> str:
        """Complete the job ``ago`` with this expiry; its link, as get_jobs gives it."""
        engine = make_engine(app_settings.resolved_database_url)
        with make_session_factory(engine)() as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.state, job.created = "completed", utcnow() - ago - timedelta(minutes=10)
            job.completed, job.expires_at = utcnow() - ago, utcnow() + expires_in
            job.product = {"files": [{"type": "acacia", "name": name, "size": len(content),
                                      "sha1": "0" * 40}]}  # fmt: skip
            session.commit()
        engine.dispose()
        (file,) = client.get("/api/get_jobs").json()[0]["row"]["product"]["files"]
        return str(file["url"])

    # Completed three days ago with a 7-day lifetime, which has since been lowered to one.
    url = complete(timedelta(days=3), timedelta(days=4))
    monkeypatch.setattr(app_settings, "asvo_product_ttl_days", 1.0)
    reply = client.get(url)
    assert reply.status_code == 200, reply.text
    assert reply.content == content
    assert client.get(url, headers={"Range": "bytes=7-"}).content == content[7:]
    # giant-squid, having emptied a complete file that failed its hash, asks for the byte
    # past the end: it wants the whole file. A plain range from there is still 416.
    whole = client.get(url, headers={"Range": f"Range: bytes={len(content)}-{len(content)}"})
    assert (whole.status_code, whole.content) == (200, content)
    beyond = client.get(url, headers={"Range": f"bytes={len(content)}-"})
    assert beyond.status_code == 416
    # Still bound to the job and the file name, and unforgeable.
    path, _, token = url.partition("?token=")
    value, issued, signature = token.rsplit(".", 2)
    assert client.get(f"{path}?token={value}.{int(issued) + 86_400}.{signature}").status_code == 403
    other = sign_value(f"{job_id}/other.tar", app_settings.secret_key_bytes(), now_s=int(issued))
    assert client.get(f"{path}?token={other}").status_code == 403
    forged = sign_value(f"{job_id}/{name}", b"not the key", now_s=int(issued))
    assert client.get(f"{path}?token={forged}").status_code == 403
    assert client.get(f"{path}?token={value}.{issued}.%C3%A9").status_code == 403  # was a 500
    # Up to the product's own expiry (when the dispatcher deletes it), then refused.
    url = complete(timedelta(days=7), timedelta(minutes=1))
    assert client.get(url).status_code == 200
    url = complete(timedelta(days=7), -timedelta(minutes=1))
    reply = client.get(url)
    assert reply.status_code == 404 and "has expired" in reply.json()["error"]
    # Nor does a link signed for an earlier job of the same id (before this one was created).
    monkeypatch.setattr(app_settings, "asvo_product_ttl_days", 7.0)
    url = complete(timedelta(days=3), timedelta(days=4))
    early = sign_value(f"{job_id}/{name}", app_settings.secret_key_bytes(),
                       now_s=time.time() - 5 * 86_400)  # fmt: skip
    assert client.get(f"{path}?token={early}").status_code == 403
    # Even 20 minutes before it (an id reused within the hour was let through).
    shortly = sign_value(f"{job_id}/{name}", app_settings.secret_key_bytes(),
                         now_s=time.time() - 3 * 86_400 - 30 * 60)  # fmt: skip
    assert client.get(f"{path}?token={shortly}").status_code == 403
    assert client.get(url).status_code == 200
