"""The portal's pages over HTTP: sign-in, forgery tokens, profile and API key, jobs, submission."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from sqlalchemy import select

from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.asvo.models import Job
from observatory.core.accounts import create_user, set_password
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from observatory.core.models import User

OBS = 1320409688
PASSWORD = "correct horse battery"


@pytest.fixture
def app_settings(settings: Settings) -> Settings:
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        session.add(
            Observation(
                obsid=OBS, stoptime=OBS + 16, obsname="portal_test", creator="test",
                project_id="G0001", mode="MWAX_CORRELATOR", delays=[0] * 16,
                coarse_chans=[133, 134], int_time_s=2.0, freq_res_khz=40.0,
            )
        )  # fmt: skip
        for name in ("alice", "bob"):
            user, _ = create_user(session, name, f"api-key-of-{name}")
            set_password(session, user, PASSWORD + name)
        session.commit()
    engine.dispose()
    return settings


@pytest.fixture
def client(app_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings)) as client:
        yield client


def token_of(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page)
    assert match, "the page has no forgery token"
    return match.group(1)


def sign_in(client: TestClient, name: str) -> None:
    token = token_of(client.get("/login").text)
    reply = client.post(
        "/login",
        data={"username": name, "password": PASSWORD + name, "csrf_token": token, "next": "/jobs"},
        follow_redirects=False,
    )
    assert reply.status_code == 303 and reply.headers["location"] == "/jobs", reply.text


def test_sign_in_sets_a_safe_session_cookie(client: TestClient) -> None:
    login = client.get("/login")
    assert (
        login.status_code == 200
        and 'for="username"' in login.text
        and 'for="password"' in login.text
    )
    forgery = login.headers["set-cookie"]
    assert "portal_csrf=" in forgery and "HttpOnly" in forgery and "SameSite=strict" in forgery
    token = token_of(login.text)
    form = {"username": "alice", "password": PASSWORD + "alice", "next": "/profile"}
    refused = client.post("/login", data=form, follow_redirects=False)  # no token
    assert refused.status_code == 400 and "security token" in refused.json()["error"]
    as_page = client.post("/login", data=form, headers={"Accept": "text/html"})
    assert as_page.status_code == 400 and 'id="error-message"' in as_page.text
    wrong = client.post("/login", data={**form, "password": "nope-nope", "csrf_token": token})
    assert wrong.status_code == 401 and "unknown user name or wrong password" in wrong.text
    unknown = client.post("/login", data={**form, "username": "mallory", "csrf_token": token})
    assert unknown.status_code == 401 and "unknown user name or wrong password" in unknown.text
    reply = client.post("/login", data={**form, "csrf_token": token}, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/profile"
    session_cookie = reply.headers["set-cookie"]
    assert session_cookie.startswith("MWA_JOB_COOKIE=")
    assert "HttpOnly" in session_cookie and "SameSite=lax" in session_cookie
    assert ">alice<" in client.get("/profile").text
    # The same cookie serves the API (and the jobs page's websocket).
    assert client.get("/api/get_jobs").status_code == 200


def test_no_open_redirect_and_pages_need_a_session(client: TestClient) -> None:
    for path in ("/jobs", "/profile", "/submit"):
        reply = client.get(path, follow_redirects=False)
        assert reply.status_code == 303 and reply.headers["location"].startswith("/login?next=")
    page = client.get("/login?next=//evil.example/x").text
    assert 'name="next" value="/jobs"' in page
    token = token_of(page)
    form = {"username": "alice", "password": PASSWORD + "alice", "csrf_token": token,
            "next": "https://evil.example/"}  # fmt: skip
    assert client.post("/login", data=form, follow_redirects=False).headers["location"] == "/jobs"


def test_profile_makes_a_new_api_key_shown_once_and_stored_hashed(
    client: TestClient, app_settings: Settings
) -> None:
    sign_in(client, "alice")
    page = client.get("/profile").text
    assert "api-key-of-alice" not in page and 'id="key-fingerprint"' in page
    reply = client.post("/profile/api-key", data={"csrf_token": token_of(page)})
    key = re.search(r'id="api-key">([^<]+)<', reply.text).group(1)  # type: ignore[union-attr]
    assert reply.headers["cache-control"] == "no-store"
    assert key not in client.get("/profile").text  # never again
    api = TestClient(create_app(app_settings))
    auth = ("mantaray-clientv2.0", key)
    assert api.post("/api/api_login", auth=auth).status_code == 200
    old = api.post("/api/api_login", auth=("mantaray-clientv2.0", "api-key-of-alice"))
    assert old.status_code == 401
    engine = make_engine(app_settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        alice = session.scalar(select(User).where(User.name == "alice"))
        assert alice is not None and key not in alice.api_key_hash
        assert alice.password_hash is not None and PASSWORD not in alice.password_hash
    engine.dispose()
    refused = client.post("/profile/api-key", data={"csrf_token": "0" * 64})
    assert refused.status_code == 400


def test_submit_validates_like_the_api_and_jobs_are_private(client: TestClient) -> None:
    sign_in(client, "alice")
    page = client.get("/submit?obs_id=1320409688").text
    assert 'value="1320409688"' in page and 'for="job_type"' in page
    token = token_of(page)
    bad = {"csrf_token": token, "job_type": "conversion", "obs_id": "1320409688",
           "avg_time_res": "0.01", "output": "uvfits"}  # fmt: skip
    refused = client.post("/submit", data=bad)
    api = client.post(
        "/api/conversion_job", data={k: v for k, v in bad.items() if k != "csrf_token"}
    )
    assert refused.status_code == 400 and api.status_code == 400
    assert str(escape(api.json()["error"])) in refused.text  # the same message as the API
    assert 'value="0.01"' in refused.text  # the form comes back filled in
    missing = client.post("/submit", data={**bad, "obs_id": "1111111111", "avg_time_res": "2"})
    assert "Observation 1111111111 does not exist" in missing.text
    good = {**bad, "avg_time_res": "4"}
    reply = client.post("/submit", data=good, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"].startswith("/jobs?submitted=")
    job_id = int(reply.headers["location"].rsplit("=", 1)[1])
    jobs = client.get(reply.headers["location"]).text
    assert f'id="job-{job_id}"' in jobs and "queued" in jobs and f"Job {job_id} submitted" in jobs

    bob = TestClient(client.app)
    sign_in(bob, "bob")
    bob_page = bob.get("/jobs").text
    assert f'id="job-{job_id}"' not in bob_page and "No jobs yet" in bob_page
    stolen = bob.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token_of(bob_page)})
    assert stolen.status_code == 404
    assert "queued" in client.get("/jobs").text
    no_token = client.post(f"/jobs/{job_id}/cancel", data={})
    assert no_token.status_code == 400
    cancelled = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert cancelled.status_code == 200 and "cancelled" in cancelled.text


def test_sign_out(client: TestClient) -> None:
    sign_in(client, "alice")
    page = client.get("/jobs").text
    assert 'id="sign-out"' in page
    reply = client.post("/logout", data={"csrf_token": token_of(page)}, follow_redirects=False)
    assert reply.status_code == 303 and 'MWA_JOB_COOKIE=""' in reply.headers["set-cookie"]
    assert client.get("/jobs", follow_redirects=False).status_code == 303


def test_observations_browser(client: TestClient) -> None:
    found = client.get(
        "/observations", params={"mintime": "2021-11-08T12:00", "mode": "MWAX_CORRELATOR"}
    )
    assert found.status_code == 200 and "portal_test" in found.text
    assert f"/metadata/obs_page?obs_id={OBS}" in found.text
    none = client.get("/observations", params={"projectid": "NOPE"})
    assert "No observations match" in none.text
    bad = client.get("/observations", params={"mintime": "yesterday"})
    assert bad.status_code == 400 and "From: &#39;yesterday&#39; is neither GPS seconds" in bad.text


def test_users_set_password_command(
    app_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from observatory.cli import main

    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", app_settings.resolved_database_url)
    data_dir = str(app_settings.data_dir)
    monkeypatch.setattr("sys.stdin", io.StringIO("a-new-password\n"))
    assert main(["--data-dir", data_dir, "users", "set-password", "bob"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["--data-dir", data_dir, "users", "set-password", "bob"]) == 2  # a usage error
    monkeypatch.setattr("sys.stdin", io.StringIO("carol-password\n"))
    assert main(["--data-dir", data_dir, "users", "create", "carol", "--password"]) == 0
    with TestClient(create_app(app_settings)) as client:
        token = token_of(client.get("/login").text)
        for name, password in (("bob", "a-new-password"), ("carol", "carol-password")):
            form = {"username": name, "password": password, "csrf_token": token}
            assert client.post("/login", data=form, follow_redirects=False).status_code == 303


def test_every_job_state_is_shown(client: TestClient, app_settings: Settings) -> None:
    sign_in(client, "alice")
    engine = make_engine(app_settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        alice = session.scalar(select(User).where(User.name == "alice"))
        assert alice is not None
        for index, state in enumerate(("queued", "preprocessing", "completed", "error")):
            session.add(Job(user_id=alice.id, job_type=0, obs_id=OBS, state=state,
                            params={"obs_id": str(OBS)}, request_key=f"k{index}", delivery="acacia",
                            priority=1, cancel_requested=False, deleted=False,
                            error_text="it broke" if state == "error" else None,
                            product={"files": [{"name": "1320409688_ms.tar", "size": 2_000_000,
                                                "sha1": "0" * 40, "type": "acacia"}]}
                            if state == "completed" else None))  # fmt: skip
        session.commit()
    engine.dispose()
    page = client.get("/jobs").text
    assert page.count('aria-label="Cancel job') == 2  # only the unfinished ones
    assert "error: it broke" in page
    assert re.search(r'href="http://testserver/api/download/\d+/1320409688_ms.tar\?token=', page)
