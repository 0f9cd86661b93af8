"""The portal's pages over HTTP: sign-in, forgery tokens, profile and API key, jobs, submission."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from urllib.parse import unquote

import httpx
import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from sqlalchemy import select
from starlette.websockets import WebSocketDisconnect

from observatory.app import create_app
from observatory.archive.models import FileKind, Observation, ObservationFile
from observatory.asvo.models import Job
from observatory.core.accounts import create_user, set_password
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from observatory.core.gpstime import now_gps
from observatory.core.models import User
from observatory.core.text import size_text

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


def key_form(page: str) -> dict[str, str]:
    """The profile page's new-key form: its token and the key it replaces."""
    match = re.search(r'name="replaces" value="([0-9a-f]+)"', page)
    assert match, "the page has no new-key form"
    return {"csrf_token": token_of(page), "replaces": match.group(1)}


def api_client(client: TestClient, name: str, key: str | None = None) -> TestClient:
    """Another client of the same app, logged in as mwa_client does (the MWA_JOB_COOKIE)."""
    api = TestClient(client.app)
    auth = ("mantaray-clientv2.0", key or f"api-key-of-{name}")
    assert api.post("/api/api_login", auth=auth).status_code == 200
    return api


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
    for name in ("mallory", "alice"):  # an empty password was a 500 for unknown names only
        empty = client.post("/login", data={**form, "username": name, "password": "", "csrf_token": token})  # fmt: skip
        assert empty.status_code == 401 and "unknown user name or wrong password" in empty.text
    reply = client.post("/login", data={**form, "csrf_token": token}, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/profile"
    session_cookie = reply.headers["set-cookie"]
    # The portal's own cookie, not the clients' MWA_JOB_COOKIE (see the cross-site test).
    assert session_cookie.startswith("portal_session=") and "MWA_JOB_COOKIE" not in session_cookie
    assert "HttpOnly" in session_cookie and "SameSite=lax" in session_cookie
    assert ">alice<" in client.get("/profile").text
    # It also opens the API calls that only read (the jobs page's websocket uses one).
    assert client.get("/api/get_jobs").status_code == 200


def test_no_page_may_be_framed_by_another_site(client: TestClient) -> None:
    """A page on another port of the host framed /profile invisibly and had the user click
    "Generate a new API key". Every answer, errors and JSON included, refuses framing."""
    sign_in(client, "alice")
    for path in ("/profile", "/jobs", "/login", "/no-such-page", "/api/get_jobs",
                 "/calib/summary", "/metadata/find", "/healthz"):  # fmt: skip
        reply = client.get(path, headers={"Accept": "text/html"})
        assert reply.headers["x-frame-options"] == "DENY", path
        assert reply.headers["content-security-policy"] == "frame-ancestors 'none'", path
        assert reply.headers["x-content-type-options"] == "nosniff", path
        assert len(reply.headers.get_list("x-frame-options")) == 1


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
    reply = client.post("/profile/api-key", data=key_form(page))
    key = re.search(r'id="api-key">([^<]+)<', reply.text).group(1)  # type: ignore[union-attr]
    assert reply.headers["cache-control"] == "no-store"
    assert key not in client.get("/profile").text  # never again
    # Reloading the new key's page sends its form again: nothing changes, and it says so.
    again = client.post("/profile/api-key", data=key_form(page))
    assert again.status_code == 200 and 'id="key-kept"' in again.text
    assert key not in again.text and 'id="api-key"' not in again.text
    api = TestClient(create_app(app_settings))
    auth = ("mantaray-clientv2.0", key)
    assert api.post("/api/api_login", auth=auth).status_code == 200  # after the reload too
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
    # A token hmac.compare_digest cannot compare (non-ASCII) was a 500.
    refused = client.post("/profile/api-key", data={"csrf_token": "\u00e9" * 64})
    assert refused.status_code == 400 and "security token" in refused.json()["error"]


def test_submit_validates_like_the_api_and_jobs_are_private(client: TestClient) -> None:
    sign_in(client, "alice")
    page = client.get("/submit?obs_id=1320409688").text
    assert 'value="1320409688"' in page and 'for="job_type"' in page
    assert "<option selected>ms</option>" in page  # the API's default (the ASVO's), not uvfits
    token = token_of(page)
    bad = {"csrf_token": token, "job_type": "conversion", "obs_id": "1320409688",
           "avg_time_res": "0.01", "output": "uvfits"}  # fmt: skip
    refused = client.post("/submit", data=bad)
    api = api_client(client, "alice").post(
        "/api/conversion_job", data={k: v for k, v in bad.items() if k != "csrf_token"}
    )
    assert refused.status_code == 400 and api.status_code == 400
    assert str(escape(api.json()["error"])) in refused.text  # the same message as the API
    assert 'value="0.01"' in refused.text  # the form comes back filled in
    assert "<option selected>uvfits</option>" in refused.text
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
    assert reply.status_code == 303 and 'portal_session=""' in reply.headers["set-cookie"]
    assert client.get("/jobs", follow_redirects=False).status_code == 303


def test_sign_out_ends_the_session_in_every_browser(client: TestClient) -> None:
    """A cookie saved before signing out (a copy, another browser) stops working at once."""
    sign_in(client, "alice")
    saved = client.cookies["portal_session"]
    laptop = TestClient(client.app)
    sign_in(laptop, "alice")
    api = api_client(client, "alice")  # a client's login (API key) is another matter
    page = client.get("/jobs").text
    with laptop.websocket_connect(
        "/api/job_results", headers={"cookie": f"portal_session={laptop.cookies['portal_session']}"}
    ) as open_socket:  # the laptop's jobs page, open: it streamed on after the sign-out
        client.post("/logout", data={"csrf_token": token_of(page)})
        with pytest.raises(WebSocketDisconnect) as closed:
            for _ in range(1000):
                open_socket.receive_text()
        assert closed.value.code == 4401
    replayed = TestClient(client.app, cookies={"portal_session": saved})
    assert replayed.get("/profile", follow_redirects=False).status_code == 303  # to /login
    assert replayed.get("/jobs", follow_redirects=False).status_code == 303
    assert replayed.get("/api/get_jobs").status_code == 401
    with (
        pytest.raises(WebSocketDisconnect),
        replayed.websocket_connect(
            "/api/job_results", headers={"cookie": f"portal_session={saved}"}
        ) as socket,
    ):
        socket.receive_text()
    assert laptop.get("/profile", follow_redirects=False).status_code == 303  # every browser
    assert api.get("/api/get_jobs").status_code == 200
    sign_in(client, "alice")  # signing in again works at once, and revives no old cookie
    assert ">alice<" in client.get("/profile").text
    assert replayed.get("/profile", follow_redirects=False).status_code == 303


def test_a_new_password_ends_portal_sessions(client: TestClient, app_settings: Settings) -> None:
    sign_in(client, "alice")
    engine = make_engine(app_settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        alice = session.scalar(select(User).where(User.name == "alice"))
        assert alice is not None
        set_password(session, alice, "an entirely new password")
        session.commit()
    engine.dispose()
    assert client.get("/profile", follow_redirects=False).status_code == 303


def test_a_new_api_key_ends_the_logins_made_with_the_old_one(client: TestClient) -> None:
    """docs/portal.md: "the old key stops working", and so do the cookies it bought."""
    old_login = api_client(client, "alice")
    bob = api_client(client, "bob")
    assert old_login.get("/api/get_jobs").status_code == 200
    sign_in(client, "alice")
    page = client.get("/profile").text
    reply = client.post("/profile/api-key", data=key_form(page))
    key = re.search(r'id="api-key">([^<]+)<', reply.text).group(1)  # type: ignore[union-attr]
    refused = old_login.get("/api/get_jobs")
    assert refused.status_code == 401 and "api_login" in refused.json()["error"]
    assert old_login.get("/api/cancel_job", params={"job_id": "1"}).status_code == 401
    with pytest.raises(WebSocketDisconnect):
        cookie = old_login.cookies["MWA_JOB_COOKIE"]
        with old_login.websocket_connect(
            "/api/job_results", headers={"cookie": f"MWA_JOB_COOKIE={cookie}"}
        ) as socket:
            socket.receive_text()
    assert bob.get("/api/get_jobs").status_code == 200  # only alice's logins end
    assert api_client(client, "alice", key).get("/api/get_jobs").status_code == 200
    assert ">alice<" in client.get("/profile").text  # the browser that asked stays signed in


def test_a_link_from_another_site_cannot_cancel_a_job(client: TestClient) -> None:
    """GET /api/cancel_job changes a job (the clients' protocol), and a browser sends the
    portal's SameSite=Lax cookie on a top-level navigation from any site: the portal cookie
    must not open it. The portal's own cancel (a POST with the forgery token) works."""
    sign_in(client, "alice")
    page = client.get("/submit").text
    form = {"csrf_token": token_of(page), "job_type": "download_vis", "obs_id": str(OBS),
            "download_type": "vis"}  # fmt: skip
    reply = client.post("/submit", data=form, follow_redirects=False)
    job_id = int(reply.headers["location"].rsplit("=", 1)[1])
    navigation = {"Accept": "text/html", "Sec-Fetch-Site": "cross-site"}
    forged = client.get("/api/cancel_job", params={"job_id": job_id}, headers=navigation)
    assert forged.status_code == 401
    # Nothing else of /api or /uws that changes something opens with it either.
    submitted = client.post("/api/download_vis_job", data={"obs_id": OBS, "download_type": "vis",
                                                          "allow_resubmit": "true"})  # fmt: skip
    assert submitted.status_code == 401
    assert client.post(f"/uws/asvo/{job_id}/phase", data={"PHASE": "ABORT"}).status_code == 401
    assert client.get("/jobs/1/cancel").status_code == 405  # the portal's cancel is a POST
    (row,) = [e["row"] for e in client.get("/api/get_jobs").json()]  # reading still works
    assert row["id"] == job_id and row["job_state"] == "queued"
    cookie = client.cookies["portal_session"]
    with client.websocket_connect(
        "/api/job_results", headers={"cookie": f"portal_session={cookie}"}
    ) as socket:  # the jobs page's live updates
        frame = json.loads(socket.receive_text())
        rows = [e["row"] for e in (frame if isinstance(frame, list) else [frame])]
        assert rows[0]["id"] == job_id
    # The clients' login cookie still cancels by GET, as the protocol has it.
    other = client.post("/submit", data={**form, "download_type": "vis_meta"},
                        follow_redirects=False)  # fmt: skip
    other_id = int(other.headers["location"].rsplit("=", 1)[1])
    api = api_client(client, "alice")
    assert api.get("/api/cancel_job", params={"job_id": other_id}).status_code == 200
    # And the portal's own cancel.
    cancelled = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": form["csrf_token"]})
    assert cancelled.status_code == 200
    states = {e["row"]["id"]: e["row"]["job_state"] for e in api.get("/api/get_jobs").json()}
    assert states == {job_id: "cancelled", other_id: "cancelled"}


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


def test_submission_links_fit_the_observation(client: TestClient, app_settings: Settings) -> None:
    """No link to submit a job for an observation still to come (the ASVO refuses it), nor
    for one ended whose files are not in the archive yet (the job failed, finding none);
    and a voltage observation's form starts as a voltage download (a conversion is refused)."""
    future, vcs, unarchived = (now_gps() + 86_400) // 8 * 8, OBS + 800, OBS + 1600
    engine = make_engine(app_settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        for obsid, mode, name in ((future, "MWAX_CORRELATOR", "to_come"), (vcs, "MWAX_VCS", "vcs"),
                                  (unarchived, "MWAX_CORRELATOR", "on_its_way")):  # fmt: skip
            session.add(Observation(
                obsid=obsid, stoptime=obsid + 16, obsname=name, creator="test", project_id="G0001",
                mode=mode, delays=[0] * 16, coarse_chans=[133, 134],
            ))  # fmt: skip
        session.flush()
        for obsid in (OBS, vcs):
            session.add(ObservationFile(
                obsid=obsid, name=f"{obsid}.metafits", kind=FileKind.METAFITS, size_bytes=1,
                sha1="0" * 40, storage_key=f"{obsid}/{obsid}.metafits",
            ))  # fmt: skip
        session.commit()
    engine.dispose()
    sign_in(client, "alice")
    listed = client.get("/observations").text
    assert f"/submit?obs_id={OBS}" in listed and f"/submit?obs_id={future}" not in listed
    assert f"/submit?obs_id={unarchived}" not in listed and "no files in the archive yet" in listed
    assert "scheduled" in listed
    form = client.get("/submit", params={"obs_id": str(vcs)}).text
    assert '<option value="voltage" selected>' in form
    assert '<option value="conversion" selected>' in client.get(f"/submit?obs_id={OBS}").text
    for not_an_obsid in ("99999999999999999999999", "9223372036854775808", "abc"):
        form = client.get("/submit", params={"obs_id": not_an_obsid})  # was a 500 (overflow)
        assert form.status_code == 200 and '<option value="conversion" selected>' in form.text


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
        for name, password in (("bob", "a-new-password"), ("carol", "carol-password")):
            # A fresh form each time: a token is bound to the sign-in it was shown with.
            token = token_of(client.get("/login").text)
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
    assert "(2.0 MB)" in page


def test_sizes_are_shown_in_units_that_fit() -> None:
    """A 20 kB product was shown as (0.0 MB)."""
    assert [size_text(n) for n in (512, 20_480, 2_000_000, 123_456_789, 4.2e9)] == [
        "512 bytes", "20.5 kB", "2.0 MB", "123 MB", "4.2 GB"
    ]  # fmt: skip
    # Rounded before the unit is chosen: not "1000 kB" nor "100.0 kB".
    assert [size_text(n) for n in (999_600, 99_960, 2.5e12)] == ["1.0 MB", "100 kB", "2500 GB"]


def test_malformed_parameters_get_an_error_page(client: TestClient) -> None:
    """docs/portal.md: errors reach a browser as a small page; API clients keep the JSON."""
    page = {"Accept": "text/html"}
    for path in ("/observations?page=abc", "/jobs?submitted=abc"):
        reply = client.get(path, headers=page)
        assert reply.status_code == 400 and reply.headers["content-type"].startswith("text/html")
        assert 'id="error-message"' in reply.text and "invalid request" in reply.text
    sign_in(client, "alice")
    token = token_of(client.get("/jobs").text)
    reply = client.post("/jobs/abc/cancel", data={"csrf_token": token}, headers=page)
    assert reply.status_code == 400 and 'id="error-message"' in reply.text
    as_json = client.get("/observations?page=abc")
    assert as_json.status_code == 400 and "page" in as_json.json()["error"]


def test_unknown_pages_and_methods_get_an_error_page_in_a_browser(client: TestClient) -> None:
    page = {"Accept": "text/html"}
    missing = client.get("/no-such-page", headers=page)
    assert missing.status_code == 404 and 'id="error-message"' in missing.text
    wrong = client.get("/profile/api-key", headers=page)
    assert wrong.status_code == 405 and 'id="error-message"' in wrong.text
    assert wrong.headers["allow"] == "POST"
    assert client.get("/no-such-page").json()["error"] == "Not Found"  # clients: JSON


def test_a_form_posted_after_the_sign_in_ended_comes_back_after_signing_in(
    client: TestClient,
) -> None:
    """The sign-in sent the browser back to the address the form was posted to, which it
    then asked for with a GET: 405, and the submission form's input was lost."""
    token = token_of(client.get("/login").text)  # a page left open, its sign-in ended
    profile = client.post("/profile/api-key", data={"csrf_token": token}, follow_redirects=False)
    assert profile.headers["location"] == "/login?next=/profile"
    cancel = client.post("/jobs/7/cancel", data={"csrf_token": token}, follow_redirects=False)
    assert cancel.headers["location"] == "/login?next=/jobs"
    form = {"job_type": "conversion_job", "obs_id": "1320409688", "avg_time_res": "4",
            "no_rfi": "true", "csrf_token": token}  # fmt: skip
    submit = client.post("/submit", data=form, follow_redirects=False)
    location = submit.headers["location"]
    assert location.startswith("/login?next=/submit%3F")
    sign_in(client, "alice")
    back = client.get(unquote(location.partition("next=")[2]))
    assert back.status_code == 200
    assert 'value="1320409688"' in back.text and 'name="avg_time_res" value="4"' in back.text
    assert 'name="no_rfi" type="checkbox" value="true" checked' in back.text


def test_live_rows_are_named_with_the_server_labels(
    client: TestClient, app_settings: Settings
) -> None:
    """A job the websocket adds to /jobs is labelled from the same table as a reload shows
    (its job_params.job_type says "download" for a metadata download)."""
    from observatory.portal.service import JOB_TYPE_LABELS

    sign_in(client, "alice")
    page = client.get("/jobs").text
    match = re.search(r"const JOB_TYPE_LABELS = (\{.*?\});", page)
    assert match, "the jobs page's script has no label table"
    assert json.loads(match.group(1)) == {str(int(k)): v for k, v in JOB_TYPE_LABELS.items()}
    assert "job.job_params.job_type" not in page
    token = token_of(page)
    form = {"csrf_token": token, "job_type": "download_vis", "obs_id": str(OBS),
            "download_type": "vis_meta"}  # fmt: skip
    client.post("/submit", data=form)
    assert "<td>metadata download</td>" in client.get("/jobs").text


def test_the_submit_form_offers_allow_missing(client: TestClient, app_settings: Settings) -> None:
    """A conversion that fails for missing files says "or set allow_missing=true": the form
    has that field."""
    from observatory.preprocess.options import ConversionOptions

    sign_in(client, "alice")
    page = client.get("/submit").text
    assert 'name="allow_missing"' in page and 'for="allow_missing"' in page
    assert "allow_missing" in page.split('for="allow_missing"')[1].split("</label>")[0]
    form = {"csrf_token": token_of(page), "job_type": "conversion", "obs_id": str(OBS),
            "output": "uvfits", "allow_missing": "true"}  # fmt: skip
    reply = client.post("/submit", data=form, follow_redirects=False)
    assert reply.status_code == 303, reply.text
    engine = make_engine(app_settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        (job,) = session.scalars(select(Job)).all()
        assert ConversionOptions.from_params(job.params).allow_missing is True
    engine.dispose()


def socket_reply(client: TestClient, url: str = "/api/job_results", **headers: str) -> object:
    """The job ids of the jobs websocket's first frame, or ``(close code, reason)`` when it
    is refused."""
    try:
        with client.websocket_connect(url, headers=headers) as socket:
            frame = json.loads(socket.receive_text())
    except WebSocketDisconnect as exc:
        return exc.code, exc.reason
    return [envelope["row"]["id"] for envelope in (frame if isinstance(frame, list) else [frame])]


def submitted_job(client: TestClient, download_type: str = "vis") -> int:
    """A job submitted through the portal by the signed-in user of ``client``."""
    form = {"csrf_token": token_of(client.get("/submit").text), "job_type": "download_vis",
            "obs_id": str(OBS), "download_type": download_type}  # fmt: skip
    reply = client.post("/submit", data=form, follow_redirects=False)
    assert reply.status_code == 303, reply.text
    return int(reply.headers["location"].rsplit("=", 1)[1])


FOREIGN = (4403, "origin not allowed: not this site's page")


def test_the_jobs_websocket_opens_only_for_pages_of_this_site(client: TestClient) -> None:
    """A page of the same *site* (another port of the host, a sibling subdomain) gets the
    SameSite=Lax sign-in cookie sent with its websocket: it read the user's jobs and their
    signed download links. Only this origin's pages (and programs, which send no Origin)
    may open it."""
    sign_in(client, "alice")
    job_id = submitted_job(client)
    portal = {"cookie": f"portal_session={client.cookies['portal_session']}"}
    api = {"cookie": f"MWA_JOB_COOKIE={api_client(client, 'alice').cookies['MWA_JOB_COOKIE']}"}
    browser = TestClient(client.app)  # no cookie jar: each socket sends only the cookie given
    # The jobs page's own socket; the clients' (no Origin); websocket-client's (the real
    # mwa_client's library: the origin of the address it connects to, default port and all).
    for origin in ("http://testserver", "http://TestServer:80", None):
        for cookie in (portal, api):
            headers = cookie if origin is None else {**cookie, "origin": origin}
            assert socket_reply(browser, **headers) == [job_id], origin
    for origin in (
        "http://evil.example",  # the reviewer's
        "http://testserver:8080",  # another port of this host: the same site
        "http://sub.testserver",  # a sibling subdomain
        "https://testserver",  # another scheme
        "null",  # a sandboxed frame
        "http://testserver/jobs",  # no origin has a path
        "http://alice@testserver",
        "http://testserver:99999",
        "testserver",
    ):
        for cookie in (portal, api):
            assert socket_reply(browser, **cookie, origin=origin) == FOREIGN, origin
    # Two Origin headers: no browser sends them; which one counts is unclear, so neither.
    both = httpx.Headers([("cookie", portal["cookie"]), ("origin", "http://testserver"),
                          ("origin", "http://evil.example")])  # fmt: skip
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        browser.websocket_connect("/api/job_results", headers=both) as socket,
    ):
        socket.receive_text()
    assert (refused.value.code, refused.value.reason) == FOREIGN
    # Refused before the cookie is looked at; a foreign page without a sign-in is refused too.
    assert socket_reply(browser, origin="http://evil.example") == FOREIGN
    assert socket_reply(browser, origin="http://testserver") == (4401, "not logged in")


def test_the_jobs_websocket_compares_the_origin_with_the_scheme_the_proxy_gave(
    client: TestClient,
) -> None:
    """Over https the page's origin is https://host: the scheme is the one uvicorn takes
    from a trusted proxy's X-Forwarded-Proto (``--proxy-headers``, docs/deploy.md), and the
    host is the Host header nginx passes on."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    sign_in(client, "alice")
    job_id = submitted_job(client)
    value = client.cookies["portal_session"]
    # Over https the sign-in cookie is __Host-portal_session (plain http's name beside it).
    cookie = f"portal_session={value}; __Host-portal_session={value}"
    direct = TestClient(client.app, base_url="https://testserver")  # TLS in uvicorn itself
    url = "wss://testserver/api/job_results"
    assert socket_reply(direct, url, cookie=cookie, origin="https://testserver") == [job_id]
    assert socket_reply(direct, url, cookie=cookie, origin="http://testserver") == FOREIGN
    # Behind nginx: plain ws to the worker, the original scheme and host in the headers.
    proxied = TestClient(ProxyHeadersMiddleware(client.app, trusted_hosts="*"))  # type: ignore[arg-type]
    behind = {"cookie": cookie, "host": "observatory.example.org", "x-forwarded-proto": "https"}
    page = "https://observatory.example.org"
    assert socket_reply(proxied, **behind, origin=page) == [job_id]
    assert socket_reply(proxied, **behind, origin=page + ":443") == [job_id]
    for origin in ("http://observatory.example.org", "https://testserver", page + ":8443"):
        assert socket_reply(proxied, **behind, origin=origin) == FOREIGN, origin
    # An untrusted X-Forwarded-Proto (the worker's port reached directly) is not believed.
    untrusted = TestClient(ProxyHeadersMiddleware(client.app, trusted_hosts="10.0.0.1"))  # type: ignore[arg-type]
    assert socket_reply(untrusted, **behind, origin=page) == FOREIGN


def test_a_forgery_token_is_bound_to_the_sign_in(
    client: TestClient, app_settings: Settings
) -> None:
    """The token was an HMAC of the anti-forgery cookie alone: a cookie and token obtained
    anonymously (GET /login) worked with any user's sign-in, so a page that can set
    cookies for this host (a sibling subdomain, plain http) could forge every form."""
    anonymous = TestClient(client.app)
    planted_token = token_of(anonymous.get("/login").text)
    planted_cookie = anonymous.cookies["portal_csrf"]
    alice = client
    sign_in(alice, "alice")
    alice_page = alice.get("/submit").text
    bob = TestClient(client.app)
    sign_in(bob, "bob")
    form = {"job_type": "download_vis", "obs_id": str(OBS), "download_type": "vis"}

    def jobs_of(name: str) -> int:
        engine = make_engine(app_settings.resolved_database_url)
        with make_session_factory(engine)() as session:
            count = len(session.scalars(select(Job).join(User).where(User.name == name)).all())
        engine.dispose()
        return count

    # The reviewer's forgery: bob's sign-in, the anonymous pair.
    bob.cookies.delete("portal_csrf")  # planted in its place
    bob.cookies.set("portal_csrf", planted_cookie)
    forged = bob.post("/submit", data={**form, "csrf_token": planted_token},
                      follow_redirects=False)  # fmt: skip
    assert forged.status_code == 400 and "security token" in forged.json()["error"]
    # Nor does another user's pair (alice's cookie and her page's token) open bob's.
    bob.cookies.delete("portal_csrf")
    bob.cookies.set("portal_csrf", alice.cookies["portal_csrf"])
    for path, data in (("/submit", form), ("/profile/api-key", {}), ("/logout", {})):
        stolen = bob.post(path, data={**data, "csrf_token": token_of(alice_page)},
                          follow_redirects=False)  # fmt: skip
        assert stolen.status_code == 400, path
    assert jobs_of("bob") == 0 and ">bob<" in bob.get("/profile").text  # nothing happened
    # A user's own token works (with whatever anti-forgery cookie the page was shown with).
    own = bob.post("/submit", data={**form, "csrf_token": token_of(bob.get("/submit").text)},
                   follow_redirects=False)  # fmt: skip
    assert own.status_code == 303 and jobs_of("bob") == 1
    assert alice.post("/submit", data={**form, "csrf_token": token_of(alice_page)},
                      follow_redirects=False).status_code == 303  # fmt: skip
    # The sign-in form's token is a pre-session one: it signs in, and then no longer
    # passes, bound to no sign-in; signing in gives a new anti-forgery cookie.
    carol = TestClient(client.app)
    login_token = token_of(carol.get("/login").text)
    before = carol.cookies["portal_csrf"]
    signed = carol.post("/login", data={"username": "alice", "password": PASSWORD + "alice",
                                        "csrf_token": login_token}, follow_redirects=False)  # fmt: skip
    assert signed.status_code == 303
    assert any(value.startswith("portal_csrf=") and "HttpOnly" in value and "SameSite=strict"
               in value for value in signed.headers.get_list("set-cookie"))  # fmt: skip
    assert carol.cookies["portal_csrf"] != before
    late = carol.post("/submit", data={**form, "csrf_token": login_token}, follow_redirects=False)
    assert late.status_code == 400
    # A form shown while signed in, posted after the sign-in ended (signed out in another
    # browser), still goes to the sign-in form and back, filled in.
    page = carol.get("/submit").text
    carol_too = TestClient(client.app)
    sign_in(carol_too, "alice")
    carol_too.post("/logout", data={"csrf_token": token_of(carol_too.get("/jobs").text)})
    ended = carol.post("/submit", data={**form, "csrf_token": token_of(page)},
                       follow_redirects=False)  # fmt: skip
    assert ended.status_code == 303 and ended.headers["location"].startswith("/login?next=/submit")
    # The same after signing out in this browser, or its cookie expiring: the browser no
    # longer sends the cookie the form's token was bound to (this was a 400, the form lost).
    sign_in(carol, "alice")
    page = carol.get("/submit").text
    profile = carol.get("/profile").text
    carol.post("/logout", data={"csrf_token": token_of(carol.get("/jobs").text)})
    assert "portal_session" not in carol.cookies
    for path, data, back in (("/submit", {**form, "csrf_token": token_of(page)}, "/submit"),
                             ("/profile/api-key", key_form(profile), "/profile"),
                             ("/jobs/1/cancel", {"csrf_token": token_of(page)}, "/jobs"),
                             ("/logout", {"csrf_token": token_of(page)}, "")):  # fmt: skip
        after = carol.post(path, data=data, follow_redirects=False)
        assert after.status_code == 303, (path, after.text)
        assert after.headers["location"].startswith(f"/login{'?next=' + back if back else ''}")
    sign_in(carol, "alice")
    assert jobs_of("alice") == 1  # nothing was done for anyone meanwhile
    # Signing in itself is always checked: a page elsewhere cannot sign a browser in.
    stranger = TestClient(client.app)
    stranger.get("/login")
    forged_sign_in = stranger.post("/login", data={"username": "alice", "password": PASSWORD + "alice",
                                                   "csrf_token": "0" * 64}, follow_redirects=False)  # fmt: skip
    assert forged_sign_in.status_code == 400


def test_the_forgery_cookie_is_host_prefixed_over_https(client: TestClient) -> None:
    """Over https the anti-forgery cookie is ``__Host-portal_csrf`` (Secure, Path=/, no
    Domain), which a sibling subdomain or a plain http page cannot set; a plain
    ``portal_csrf`` planted beside it is not read."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    secure = TestClient(client.app, base_url="https://testserver")
    login = secure.get("/login")
    (cookie,) = login.headers.get_list("set-cookie")
    assert cookie.startswith("__Host-portal_csrf=")
    assert all(part in cookie for part in ("HttpOnly", "Path=/", "SameSite=strict", "Secure"))
    assert "domain" not in cookie.lower()
    sign_in(secure, "alice")
    job_id = submitted_job(secure)  # the portal works over https with it
    http = TestClient(client.app)  # a pair from plain http, planted beside the real cookie
    planted = token_of(http.get("/login").text)
    secure.cookies.set("portal_csrf", http.cookies["portal_csrf"])
    refused = secure.post(f"/jobs/{job_id}/cancel", data={"csrf_token": planted})
    assert refused.status_code == 400
    # Behind nginx the scheme is the one X-Forwarded-Proto gives.
    proxied = TestClient(ProxyHeadersMiddleware(client.app, trusted_hosts="*"))  # type: ignore[arg-type]
    (behind,) = proxied.get("/login", headers={"x-forwarded-proto": "https"}).headers.get_list(
        "set-cookie"
    )
    assert behind.startswith("__Host-portal_csrf=") and "Secure" in behind
    (plain,) = proxied.get("/login").headers.get_list("set-cookie")
    assert plain.startswith("portal_csrf=") and "Secure" not in plain


def test_the_sign_in_cookie_is_host_prefixed_over_https(client: TestClient) -> None:
    """Over https the sign-in cookie is ``__Host-portal_session`` (Secure, Path=/, no Domain):
    a sibling subdomain or a plain http page cannot plant one (a sign-in of their choosing,
    "login CSRF"); a plain ``portal_session`` beside it is not read there."""
    secure = TestClient(client.app, base_url="https://testserver")
    token = token_of(secure.get("/login").text)
    reply = secure.post(
        "/login",
        data={"username": "alice", "password": PASSWORD + "alice", "csrf_token": token},
        follow_redirects=False,
    )
    (session_cookie,) = [
        cookie for cookie in reply.headers.get_list("set-cookie") if "portal_csrf" not in cookie
    ]
    assert session_cookie.startswith("__Host-portal_session=")
    assert all(part in session_cookie for part in ("HttpOnly", "Path=/", "Secure"))
    assert "domain" not in session_cookie.lower()
    job_id = submitted_job(secure)  # signed in: the portal's pages work with it
    value = secure.cookies["__Host-portal_session"]
    wss = "wss://testserver/api/job_results"
    assert socket_reply(secure, wss, cookie=f"__Host-portal_session={value}") == [job_id]
    assert socket_reply(secure, wss, cookie=f"portal_session={value}") == (4401, "not logged in")
    # A valid sign-in of another user, planted under the plain name, is not read over https.
    http = TestClient(client.app)
    sign_in(http, "bob")
    planted = TestClient(client.app, base_url="https://testserver")
    planted.cookies.set("portal_session", http.cookies["portal_session"])
    assert planted.get("/jobs", follow_redirects=False).status_code == 303
    # Signing out deletes the prefixed cookie.
    out = secure.post("/logout", data={"csrf_token": token_of(secure.get("/jobs").text)},
                      follow_redirects=False)  # fmt: skip
    assert any(c.startswith('__Host-portal_session=""') for c in out.headers.get_list("set-cookie"))


def test_sign_in_is_throttled_after_five_wrong_passwords(client: TestClient) -> None:
    """A robot guessing a password gets five tries, then waits that double (429 and
    Retry-After; the page says so). Its later guesses are refused unchecked."""
    statuses = []
    while 429 not in statuses:  # the waits double: one is soon longer than a slow attempt
        assert len(statuses) < 16, statuses
        token = token_of(client.get("/login").text)
        reply = client.post("/login", data={"username": "alice", "password": "guess-guess",
                                            "csrf_token": token}, headers={"accept": "text/html"})  # fmt: skip
        statuses.append(reply.status_code)
    assert statuses[:5] == [401] * 5 and set(statuses) == {401, 429}
    wait_s = reply.headers["retry-after"]
    assert f"too many failed sign-ins under this name: try again in {wait_s} s" in reply.text


def test_the_header_sign_in_link_comes_back_to_the_page(client: TestClient) -> None:
    """Signing in from /observations?... landed on /jobs: the header's link had no next."""
    page = client.get("/observations?obs_id=1320409688&limit=5").text
    assert 'href="/login?next=/observations%3Fobs_id%3D1320409688%26limit%3D5"' in page
    login = client.get("/login?next=/observations%3Fobs_id%3D1").text
    assert 'href="/login?next=/observations%3Fobs_id%3D1"' in login  # not to /login itself
    assert 'name="next" value="/observations?obs_id=1"' in login


def test_only_the_users_own_submitted_job_is_announced(client: TestClient) -> None:
    """/jobs?submitted=99999 said "Job 99999 submitted." for any number."""
    sign_in(client, "alice")
    assert "submitted." not in client.get("/jobs?submitted=99999").text
    job_id = submitted_job(client)
    assert f"Job {job_id} submitted." in client.get(f"/jobs?submitted={job_id}").text
    bob = TestClient(client.app)
    sign_in(bob, "bob")
    assert "submitted." not in bob.get(f"/jobs?submitted={job_id}").text


def test_an_empty_observation_id_is_named_as_required(client: TestClient) -> None:
    """It said "Obs Id: Expected not None"."""
    sign_in(client, "alice")
    form = {"csrf_token": token_of(client.get("/submit").text), "job_type": "download_vis",
            "obs_id": " ", "download_type": "vis"}  # fmt: skip
    refused = client.post("/submit", data=form)
    assert refused.status_code == 400
    assert "The observation ID is required" in refused.text
    assert "Expected not None" not in refused.text
