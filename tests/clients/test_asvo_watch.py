"""``Session.watch`` when the server goes away for a while: it waits, then gives up clearly."""

from __future__ import annotations

import errno
import hashlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from observatory.clients import asvo

ROW = {"id": 7, "job_type": 1, "job_state": "completed", "job_params": {"obs_id": "1104585920"}}


class FakeClock:
    """``time`` for the asvo module: sleeping moves the clock on at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(asvo, "time", fake)
    return fake


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch) -> Iterator[asvo.Session]:
    def websocket_gone(_self: asvo.Session) -> None:
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(asvo.Session, "_open_websocket", websocket_gone)
    with asvo.Session("http://127.0.0.1:9", httpx.Client(), verify=True) as session:
        yield session


def refused(what: str = "Could not obtain the jobs list from the server") -> asvo.AsvoError:
    return asvo.AsvoError(f"{what}: [Errno 111] Connection refused")


def test_watch_keeps_polling_while_the_server_is_down(
    session: asvo.Session, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    replies: list[object] = [
        refused(),
        refused(),
        asvo.AsvoError("... HTTP 503: restarting", status_code=503),
        refused(),
        [asvo.Job.from_row(ROW)],
    ]

    def get_jobs(_self: asvo.Session) -> list[asvo.Job]:
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        assert isinstance(reply, list)
        return reply

    monkeypatch.setattr(asvo.Session, "get_jobs", get_jobs)
    update = next(session.watch(poll_interval_s=10))
    assert update.job.id == 7 and update.job.state == "completed"
    assert not replies
    # Backing off: each wait at least as long as the one before, none longer than the cap.
    assert clock.sleeps == sorted(clock.sleeps) and len(clock.sleeps) == 4
    assert clock.sleeps[0] < clock.sleeps[-1] <= asvo.WATCH_BACKOFF_MAX_S


def test_watch_gives_up_after_the_outage_limit_with_a_clear_message(
    session: asvo.Session, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def get_jobs(_self: asvo.Session) -> list[asvo.Job]:
        calls.append(clock.now)
        raise refused()

    monkeypatch.setattr(asvo.Session, "get_jobs", get_jobs)
    with pytest.raises(asvo.AsvoError) as caught:
        next(session.watch(poll_interval_s=10, outage_limit_s=300))
    message = str(caught.value)
    assert "has not answered for 5 minutes" in message and "Connection refused" in message
    assert "-w all" in message and caught.value.status_code is None
    assert calls[-1] - calls[0] >= 300 and len(calls) > 3
    assert max(clock.sleeps) <= asvo.WATCH_BACKOFF_MAX_S


def test_an_outage_limit_under_two_minutes_is_given_in_seconds(
    session: asvo.Session, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "has not answered for 0 minutes"."""

    def get_jobs(_self: asvo.Session) -> list[asvo.Job]:
        raise refused()

    monkeypatch.setattr(asvo.Session, "get_jobs", get_jobs)
    with pytest.raises(asvo.AsvoError, match=r"has not answered for 3[0-9] seconds"):
        next(session.watch(poll_interval_s=10, outage_limit_s=30))


def test_watch_does_not_retry_a_refusal(
    session: asvo.Session, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def get_jobs(_self: asvo.Session) -> list[asvo.Job]:
        raise asvo.AsvoError("... HTTP 401: Not logged in", status_code=401)

    monkeypatch.setattr(asvo.Session, "get_jobs", get_jobs)
    with pytest.raises(asvo.AsvoError, match="401"):
        next(session.watch())
    assert clock.sleeps == []


# -- downloads wait out an unreachable server as watch does ------------------------------


def product_job(tmp_path_url: str = "http://127.0.0.1:9/p/1104585920_7_vis.tar") -> asvo.Job:
    file = asvo.ProductFile(type="acacia", size_bytes=100, url=tmp_path_url, sha1="0" * 40)
    return asvo.Job(id=7, obs_id=1104585920, job_type=1, state="completed", files=(file,))


def test_a_download_waits_out_a_refusing_server_then_gives_up_keeping_the_part_file(
    session: asvo.Session, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """It gave up after three attempts within two seconds, though the job list waits out a
    server that is restarting for ten minutes."""
    calls = []

    def refused_fetch(*_args: object) -> None:
        calls.append(clock.now)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(asvo.Session, "_fetch_into", refused_fetch)
    partial = tmp_path / "1104585920_7_vis.tar.part"
    partial.write_bytes(b"x" * 40)
    with pytest.raises(asvo.AsvoError) as caught:
        session.download_product(product_job(), tmp_path, outage_limit_s=300)
    message = str(caught.value)
    assert "has not answered for 5 minutes" in message and "Connection refused" in message
    assert "1104585920_7_vis.tar.part is kept" in message
    assert calls[-1] - calls[0] >= 300 and len(calls) > asvo.DOWNLOAD_ATTEMPTS
    # Backing off as watch does, and no wait after giving up.
    assert clock.sleeps == sorted(clock.sleeps) and len(clock.sleeps) == len(calls) - 1
    assert max(clock.sleeps) <= asvo.WATCH_BACKOFF_MAX_S
    assert partial.read_bytes() == b"x" * 40


def test_a_server_gone_for_good_is_given_up_once_per_session_not_once_per_file(
    session: asvo.Session, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each file waited its own ten minutes: sixteen files, two hours and forty minutes."""

    def refused_fetch(*_args: object) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(asvo.Session, "_fetch_into", refused_fetch)
    jobs = [
        asvo.Job(id=n, obs_id=1104585920, job_type=1, state="completed", files=(
            asvo.ProductFile(type="acacia", size_bytes=100, sha1="0" * 40,
                             url=f"http://127.0.0.1:9/p/1104585920_{n}_vis.tar"),
        ))
        for n in range(1, 5)
    ]  # fmt: skip
    started = clock.now
    for job in jobs:
        with pytest.raises(asvo.AsvoError, match="has not answered"):
            session.download_product(job, tmp_path, outage_limit_s=300)
    assert clock.now - started < 2 * 300  # the first file's wait, and none more
    # A server that answers again starts a new outage.
    session._outage.ended()
    with pytest.raises(asvo.AsvoError, match="has not answered for 5 minutes"):
        session.download_product(jobs[0], tmp_path, outage_limit_s=300)
    assert clock.now - started >= 2 * 300


@pytest.mark.parametrize(
    "failure",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),
        asvo.AsvoError("Download of x: HTTP 503: restarting", status_code=503),
    ],
    ids=["reset", "timeout", "503"],
)
def test_a_download_resumes_after_an_outage_longer_than_its_attempts(
    session: asvo.Session, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    failure: Exception,
) -> None:  # fmt: skip
    content = b"product bytes" * 10
    failures = asvo.DOWNLOAD_ATTEMPTS + 3

    def fetch(
        _self: asvo.Session, _file: asvo.ProductFile, _algorithm: str, partial: Path, *_rest: object
    ) -> tuple[bool, str]:
        nonlocal failures
        if failures:
            failures -= 1
            raise failure
        partial.write_bytes(content)
        return False, hashlib.sha1(content).hexdigest()

    monkeypatch.setattr(asvo.Session, "_fetch_into", fetch)
    file = asvo.ProductFile(
        type="acacia", size_bytes=len(content), url="http://127.0.0.1:9/p/a.tar",
        sha1=hashlib.sha1(content).hexdigest(),
    )  # fmt: skip
    job = asvo.Job(id=7, obs_id=1104585920, job_type=1, state="completed", files=(file,))
    (result,) = session.download_product(job, tmp_path)
    assert result.outcome == "downloaded" and (tmp_path / "a.tar").read_bytes() == content
    assert len(clock.sleeps) == asvo.DOWNLOAD_ATTEMPTS + 3


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
        asvo.AsvoError("Download of x: HTTP 500: Internal Server Error", status_code=500),
    ],
    ids=["disk-full", "unknown-host", "tls-mismatch", "500"],
)
def test_what_waiting_cannot_mend_is_not_waited_out(
    session: asvo.Session, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    failure: Exception,
) -> None:  # fmt: skip
    """A full disk, a host name that does not resolve, a TLS mismatch, a 500: no outage of
    the server, so tried DOWNLOAD_ATTEMPTS times, as before."""
    calls = 0

    def failing(*_args: object) -> None:
        nonlocal calls
        calls += 1
        raise failure

    monkeypatch.setattr(asvo.Session, "_fetch_into", failing)
    with pytest.raises(asvo.AsvoError, match="failed after 3 attempts"):
        session.download_product(product_job(), tmp_path)
    assert calls == asvo.DOWNLOAD_ATTEMPTS
