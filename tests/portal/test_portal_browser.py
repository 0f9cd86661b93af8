"""The portal in headless Chromium against a live server that runs jobs on Dask.

Sign in, read a new API key, submit a job and watch it reach ``completed`` without a
reload, download its product, cancel another job, sign out; screenshots of every page.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends import sqlite_only
from browser import browser_page, screenshot
from observatory.core.config import Settings
from observatory.core.web import size_text
from servers import (
    free_port,
    handler_server,
    observatory_server,
    seed,
    threaded_app_server,
    wait_for,
)

OBSID = 1320409688
PASSWORD = "portal-password-1"


def set_password(data_dir: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from observatory.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["--data-dir", str(data_dir), "users", "set-password", name]) == 0


UNLABELLED = """() => [...document.querySelectorAll('input:not([type=hidden]), select, button')]
    .filter(el => el.offsetParent !== null)
    .filter(el => el.tagName === 'BUTTON' ? !(el.getAttribute('aria-label') || el.textContent.trim())
                                           : el.labels.length === 0)
    .map(el => el.outerHTML)"""


def check_page(page: Any, heading: str) -> None:
    """The page's key elements: its heading, the navigation, every control labelled."""
    assert page.locator("h1").first.inner_text().startswith(heading)
    assert page.locator("nav[aria-label='Main'] a").count() == 6
    assert page.evaluate(UNLABELLED) == []


def test_portal_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    seed(data_dir, None, [OBSID], api_key="first-key-of-dave", timesteps=8)
    set_password(data_dir, "dave", monkeypatch)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = observatory_server(data_dir, port, None, "--no-telescope")
    try:
        wait_for(f"{base}/healthz")
        with browser_page() as page:
            page.goto(f"{base}/jobs")  # not signed in: the sign-in form, then back here
            assert page.url.startswith(f"{base}/login?next=")
            assert page.get_by_label("User name").is_visible()
            check_page(page, "Sign in")
            screenshot(page, "portal-login", tmp_path)
            page.get_by_label("User name").fill("dave")
            page.get_by_label("Password").fill("wrong-password")
            page.click("#sign-in")
            assert "wrong password" in page.inner_text("#login-error")
            assert page.get_by_label("User name").input_value() == "dave"  # kept
            page.get_by_label("Password").fill(PASSWORD)
            page.click("#sign-in")
            page.wait_for_url(f"{base}/jobs")
            assert page.inner_text("#signed-in-user") == "dave"
            check_page(page, "Your jobs")
            page.keyboard.press("Tab")  # the first stop is the skip link
            assert page.evaluate("document.activeElement.textContent") == "Skip to the content"

            page.get_by_role("link", name="Profile").click()
            page.wait_for_url(f"{base}/profile")
            assert page.is_visible("#key-fingerprint")
            page.click("#regenerate-key")
            key = page.inner_text("#api-key").strip()
            check_page(page, "Your profile")
            screenshot(page, "portal-profile-new-key", tmp_path)
            login = httpx.post(f"{base}/api/api_login", auth=("mantaray-clientv2.0", key))
            assert login.status_code == 200  # the key shown works for the clients

            page.get_by_role("link", name="Submit a job").click()
            page.select_option("#job_type", "download_vis")
            assert page.is_hidden("#conversion-options") and page.is_visible("#download-options")
            page.get_by_label("Observation ID").fill(str(OBSID))
            page.select_option("#download_type", "vis")
            check_page(page, "Submit a job")
            screenshot(page, "portal-submit", tmp_path)
            page.click("#submit-job")
            page.wait_for_url(f"{base}/jobs?submitted=*")
            job_id = int(page.url.rsplit("=", 1)[1])
            page.evaluate("window.notReloaded = true")
            state = page.locator(f"#job-{job_id} td.state")
            state.filter(has_text="completed").wait_for(timeout=120_000)
            assert page.evaluate("window.notReloaded === true")  # live, no reload
            assert "is now completed" in page.inner_text("#live-status")
            screenshot(page, "portal-jobs-completed", tmp_path)
            link = page.locator(f"#job-{job_id} td.product a").first
            with page.expect_download() as waiting:
                link.click()
            download = waiting.value
            saved = tmp_path / download.suggested_filename
            download.save_as(saved)
            jobs = httpx.get(f"{base}/api/get_jobs", cookies=login.cookies).json()
            product = next(j["row"]["product"] for j in jobs if j["row"]["id"] == job_id)
            assert hashlib.sha1(saved.read_bytes()).hexdigest() == product["files"][0]["sha1"]
            # The live row shows the size as a reload does (the server's size_text).
            shown = page.inner_text(f"#job-{job_id} td.product span.muted").strip()
            assert shown == f"({size_text(product['files'][0]['size'])})"

            page.get_by_role("link", name="Submit a job").click()
            page.select_option("#job_type", "conversion")
            page.get_by_label("Observation ID").fill(str(OBSID))
            page.get_by_label("Time resolution (s)").fill("4")
            page.click("#submit-job")
            page.wait_for_url(f"{base}/jobs?submitted=*")
            other = int(page.url.rsplit("=", 1)[1])
            page.get_by_role("button", name=f"Cancel job {other}").click()
            page.wait_for_url(f"{base}/jobs")
            page.locator(f"#job-{other} td.state").filter(has_text="cancelled").wait_for(
                timeout=60_000
            )
            assert page.locator(f"#job-{other} button").count() == 0
            screenshot(page, "portal-jobs-cancelled", tmp_path)

            page.get_by_role("link", name="Observations").click()
            page.get_by_label("Mode").fill("MWAX_CORRELATOR")
            page.get_by_role("button", name="Search").click()
            page.wait_for_url("**/observations?*mode=MWAX_CORRELATOR*")
            observation = page.locator(f"#observations a[href='/metadata/obs_page?obs_id={OBSID}']")
            assert observation.count() == 1
            check_page(page, "Observations")
            screenshot(page, "portal-observations", tmp_path)
            for name, path in (("Triggers", "/trigger/find"), ("Calibration", "/calib/summary")):
                assert page.get_by_role("link", name=name).get_attribute("href") == path

            page.click("#sign-out")
            page.wait_for_url(f"{base}/login")
            page.goto(f"{base}/jobs")
            assert page.url.startswith(f"{base}/login")
            screenshot(page, "portal-signed-out", tmp_path)
    finally:
        server.stop()


@contextmanager
def app_server(settings: Settings) -> Iterator[str]:
    """The app without its job dispatcher (jobs stay queued), by uvicorn in a thread."""
    from observatory.app import create_app

    with threaded_app_server(create_app(settings)) as base:
        yield base


@contextmanager
def another_site(
    pages: dict[str, str], host: str = "localhost", cookies: dict[str, str] | None = None
) -> Iterator[str]:
    """Pages served at ``http://localhost:<port>``: another site than ``127.0.0.1``; with
    ``host`` 127.0.0.1, the same site on another port. ``cookies``: a ``Set-Cookie`` value
    sent with the page of each path named."""

    class Pages(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            if self.path in (cookies or {}):
                self.send_header("Set-Cookie", (cookies or {})[self.path])
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    with handler_server(Pages) as port:
        yield f"http://{host}:{port}"


def socket_attack(base: str) -> str:
    """A page that opens the jobs websocket of ``base`` and shows what it read, if anything."""
    ws_base = "ws" + base.removeprefix("http")
    return f'''<p id="result">waiting</p><script>
        const socket = new WebSocket("{ws_base}/api/job_results");
        const result = document.getElementById("result");
        socket.onmessage = (event) => {{ result.textContent = "read: " + event.data; }};
        socket.onclose = () => {{
          if (result.textContent === "waiting") result.textContent = "refused";
        }};
        </script>'''


def seed_erin(settings: Settings) -> tuple[Any, Any, int]:
    """Erin (with a portal password), the observation and a queued job of hers: the engine
    (to dispose of), a session factory and the job's id."""
    from observatory.archive.models import Observation
    from observatory.asvo import service as asvo_service
    from observatory.asvo.models import JobType
    from observatory.core.accounts import create_user
    from observatory.core.accounts import set_password as store_password
    from observatory.core.database import make_engine, make_session_factory

    engine = make_engine(settings.resolved_database_url)
    sessions = make_session_factory(engine)
    with sessions() as session:
        session.add(
            Observation(
                obsid=OBSID, stoptime=OBSID + 16, obsname="csrf_test", creator="test",
                project_id="G0001", mode="MWAX_CORRELATOR", delays=[0] * 16,
                coarse_chans=[133, 134], int_time_s=2.0, freq_res_khz=40.0,
            )
        )  # fmt: skip
        user, _ = create_user(session, "erin", "api-key-of-erin")
        store_password(session, user, PASSWORD)
        job_id = asvo_service.submit_job(
            session, settings, user.id, JobType.DOWNLOAD_VISIBILITIES,
            {"obs_id": str(OBSID), "download_type": "vis"},
        ).id  # fmt: skip
        session.commit()
    return engine, sessions, job_id


def sign_in_erin(page: Any, base: str) -> None:
    page.goto(f"{base}/login")
    page.get_by_label("User name").fill("erin")
    page.get_by_label("Password").fill(PASSWORD)
    page.click("#sign-in")
    page.wait_for_url(f"{base}/jobs")


@sqlite_only
def test_another_site_cannot_use_the_portal_session(settings: Settings) -> None:
    """A signed-in user visits a page on another site that navigates to GET
    /api/cancel_job (the browser sends the SameSite=Lax session cookie along), posts the
    portal's cancel form and opens the jobs websocket: the job stays queued and nothing is
    read. The portal itself still shows jobs live (named as after a reload) and cancels."""
    from sqlalchemy import select

    from observatory.asvo.models import Job

    engine, sessions, job_id = seed_erin(settings)

    def state() -> str:
        with sessions() as session:
            return str(session.scalar(select(Job.state).where(Job.id == job_id)))

    try:
        with app_server(settings) as base, browser_page() as page:
            sign_in_erin(page, base)
            assert page.locator(f"#job-{job_id} td.state").inner_text() == "queued"
            attack = {
                "/navigate": f'<script>location = "{base}/api/cancel_job?job_id={job_id}";</script>',
                "/post": f'''<form method="post" action="{base}/jobs/{job_id}/cancel"></form>
                    <script>document.forms[0].submit();</script>''',
                "/socket": socket_attack(base),
            }  # fmt: skip
            with another_site(attack) as evil:
                page.goto(f"{evil}/navigate")
                page.wait_for_url(f"{base}/api/cancel_job?job_id={job_id}")
                assert "Not logged in" in page.content()
                assert state() == "queued"
                page.goto(f"{evil}/post")
                # Sent without the sign-in cookie (SameSite=Lax): it acts for nobody and
                # leads to the sign-in form.
                page.wait_for_url(re.compile(re.escape(f"{base}/login?next=/jobs")))
                assert state() == "queued"
                page.goto(f"{evil}/socket")
                page.locator("#result").filter(has_not_text="waiting").wait_for(timeout=10_000)
                assert page.inner_text("#result") == "refused"

            page.goto(f"{base}/jobs")  # the portal itself: live rows, then its own cancel
            page.evaluate("window.notReloaded = true")
            with httpx.Client(base_url=base) as api:  # a client submits a job meanwhile
                login = api.post("/api/api_login", auth=("mantaray-clientv2.0", "api-key-of-erin"))
                assert login.status_code == 200
                form = {"obs_id": OBSID, "download_type": "vis_meta"}
                live = api.post("/api/download_vis_job", data=form).json()["job_id"]
            page.locator(f"#job-{live}").wait_for(timeout=10_000)
            assert page.evaluate("window.notReloaded === true")
            live_label = page.locator(f"#job-{live} td").nth(2).inner_text()
            page.reload()
            assert live_label == page.locator(f"#job-{live} td").nth(2).inner_text()
            assert live_label == "metadata download"
            page.get_by_role("button", name=f"Cancel job {job_id}").click()
            page.wait_for_url(f"{base}/jobs")
            assert state() == "cancelled"
    finally:
        engine.dispose()


@sqlite_only
def test_the_jobs_page_says_when_its_user_was_signed_out(settings: Settings) -> None:
    """Its live updates stopped with "reconnecting..." for ever. Signed out elsewhere (the
    socket closed with 4401), or refused before it opened (signed out while the page
    was away), it says so and links to the sign-in form. No page logs a console error
    (the browser's request for /favicon.ico was a 404)."""
    from sqlalchemy import select

    from observatory.core.accounts import end_portal_sessions
    from observatory.core.models import User

    engine, sessions, _job_id = seed_erin(settings)

    def sign_out_elsewhere() -> None:
        with sessions() as session:
            end_portal_sessions(
                session, session.scalars(select(User).where(User.name == "erin")).one()
            )
            session.commit()

    try:
        with app_server(settings) as base, browser_page() as page:
            errors: list[str] = []
            page.on(
                "console", lambda message: message.type == "error" and errors.append(message.text)
            )
            sign_in_erin(page, base)
            page.locator("#live-status").filter(has_text="update").wait_for()
            sign_out_elsewhere()
            again = page.locator("#sign-in-again")
            again.wait_for(timeout=10_000)
            assert "signed out" in page.inner_text("#live-status")
            assert again.get_attribute("href") == "/login?next=%2Fjobs"
            # Refused before the socket opens: the page asks itself whether it is signed in.
            sign_in_erin(page, base)
            page.evaluate(
                "() => { window.WebSocket = class extends WebSocket {"
                " constructor(url) { super(url + '-refused'); } }; }"
            )
            page.evaluate("connect(1000)")  # a socket the server refuses to open (no such path)
            # Signed in: the page asks, is told so, and retries.
            page.locator("#live-status").filter(has_text="reconnecting").wait_for(timeout=10_000)
            assert page.locator("#sign-in-again").count() == 0
            sign_out_elsewhere()
            page.locator("#sign-in-again").wait_for(timeout=10_000)
            # Only the refused sockets this test made are errors (no missing favicon).
            assert [error for error in errors if "-refused" not in error] == []
    finally:
        engine.dispose()


@sqlite_only
def test_a_delivered_path_stays_on_the_jobs_page_after_its_live_update(
    settings: Settings,
) -> None:
    """A scratch delivery's location, rendered by the server, vanished a moment after
    every reload: the websocket's update emptied the product cell and then skipped every
    file without a download URL."""
    from datetime import UTC, datetime

    from observatory.asvo.models import Job, JobState

    engine, sessions, job_id = seed_erin(settings)
    delivered = f"/group/scratch/erin/asvo/{job_id}"
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state = JobState.COMPLETED
        job.completed = datetime.now(UTC)
        job.product = {"files": [{"type": "scratch", "path": delivered, "size": 1234}]}
        session.commit()
    try:
        with app_server(settings) as base, browser_page() as page:
            sign_in_erin(page, base)
            product = page.locator(f"#job-{job_id} td.product")
            rendered = product.inner_text()
            assert rendered.strip() == delivered
            # update() marks the state cell when the websocket's row for the job arrives.
            page.locator(f"#job-{job_id} td.state[data-state='completed']").wait_for(timeout=10_000)
            assert product.inner_text() == rendered
    finally:
        engine.dispose()


@sqlite_only
def test_a_voltage_job_needs_its_offset_and_duration_before_it_is_sent(settings: Settings) -> None:
    """Left empty they were sent, and came back as "Offset: Expected not None" (the API's
    words) at the top of the form; the browser now asks for them, and only for them when
    the job is a voltage job."""
    engine, _sessions, _job_id = seed_erin(settings)
    try:
        with app_server(settings) as base, browser_page() as page:
            sign_in_erin(page, base)
            page.goto(f"{base}/submit?obs_id={OBSID}")
            page.select_option("#job_type", "voltage")
            page.click("#submit-job")
            assert page.url == f"{base}/submit?obs_id={OBSID}"  # not sent
            assert page.evaluate("document.querySelector('#offset').matches(':invalid')")
            assert page.evaluate("document.activeElement.id") == "offset"
            page.select_option("#job_type", "download_vis")  # hidden, so not asked for
            page.select_option("#download_type", "vis_meta")  # (erin has a "vis" one queued)
            page.click("#submit-job")
            page.wait_for_url(re.compile(re.escape(f"{base}/jobs?submitted=")))
    finally:
        engine.dispose()


@sqlite_only
def test_a_page_on_another_port_of_this_host_cannot_use_the_portal_session(
    settings: Settings,
) -> None:
    """Another port of the portal's host is the same *site*: the browser sends the
    SameSite cookies with its websocket and its form posts, and it may set cookies for the
    host (cookies know no ports). Such a page read the jobs websocket (signed download
    links), and planted an anti-forgery cookie whose token it got anonymously, then
    submitted a job in the user's name. Both are refused; the portal goes on working,
    planted cookie and all."""
    from sqlalchemy import func, select

    from observatory.asvo.models import Job

    engine, sessions, job_id = seed_erin(settings)

    def job_count() -> int:
        with sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Job)) or 0)

    try:
        with app_server(settings) as base, browser_page() as page:
            sign_in_erin(page, base)
            anonymous = httpx.get(f"{base}/login")  # what anyone can get
            token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', anonymous.text)
            assert token is not None
            fields = {"csrf_token": token.group(1), "job_type": "download_vis",
                      "obs_id": str(OBSID), "download_type": "vis_meta"}  # fmt: skip
            inputs = "".join(
                f'<input type="hidden" name="{name}" value="{value}">'
                for name, value in fields.items()
            )
            attack = {
                "/socket": socket_attack(base),
                "/post": f'''<form method="post" action="{base}/submit">{inputs}</form>
                    <script>document.forms[0].submit();</script>''',
            }
            planted = (f"portal_csrf={anonymous.cookies['portal_csrf']}; Path=/; HttpOnly; "
                       "SameSite=Strict")  # fmt: skip
            with another_site(attack, "127.0.0.1", {"/post": planted}) as evil:
                assert evil.startswith("http://127.0.0.1:") and evil != base
                page.goto(f"{evil}/socket")
                page.locator("#result").filter(has_not_text="waiting").wait_for(timeout=10_000)
                assert page.inner_text("#result") == "refused"
                page.goto(f"{evil}/post")
                page.wait_for_url(lambda url: url.startswith(base))  # refused, or on to /jobs
                assert job_count() == 1, "a job was submitted in erin's name"
                assert page.url == f"{base}/submit" and "security token" in page.content()
            page.goto(f"{base}/jobs")  # the portal itself, with the planted cookie
            page.evaluate("window.notReloaded = true")
            with httpx.Client(base_url=base) as api:
                login = api.post("/api/api_login", auth=("mantaray-clientv2.0", "api-key-of-erin"))
                assert login.status_code == 200
                live = api.post("/api/download_vis_job", data={"obs_id": OBSID,
                                "download_type": "vis_meta"}).json()["job_id"]  # fmt: skip
            page.locator(f"#job-{live}").wait_for(timeout=10_000)  # its own websocket works
            assert page.evaluate("window.notReloaded === true")
            page.get_by_role("button", name=f"Cancel job {job_id}").click()
            page.wait_for_url(f"{base}/jobs")
            page.locator(f"#job-{job_id} td.state").filter(has_text="cancelled").wait_for()
    finally:
        engine.dispose()


@sqlite_only
def test_the_api_docs_render_with_no_request_leaving_the_server(
    settings: Settings, tmp_path: Path
) -> None:
    """/docs and /redoc drew nothing offline: FastAPI's pages load Swagger UI and ReDoc from
    a CDN. The app serves them itself: no script, style sheet, font or data comes from
    elsewhere (ReDoc's "powered by" logo image does, and is simply missing offline)."""
    needed = {"document", "script", "stylesheet", "font", "fetch", "xhr"}
    with app_server(settings) as base, browser_page() as page:
        elsewhere: list[str] = []

        def record(request: Any) -> None:
            own = request.url.removeprefix("blob:").startswith(base)  # blob: ReDoc's worker
            if request.resource_type in needed and not own:
                elsewhere.append(request.url)

        page.on("request", record)
        page.goto(f"{base}/docs")
        conversion = page.locator(".opblock-summary-path", has_text="/api/conversion_job")
        conversion.first.wait_for(timeout=30_000)
        screenshot(page, "api-docs-swagger", tmp_path)
        page.goto(f"{base}/redoc")
        page.get_by_role("heading", name="observatory-services").first.wait_for(timeout=30_000)
        assert page.get_by_text("/api/conversion_job").count() > 0
        screenshot(page, "api-docs-redoc", tmp_path)
        assert elsewhere == []
