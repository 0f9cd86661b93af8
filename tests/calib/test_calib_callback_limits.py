"""Callback attempts are bounded: a receiver answering without end, or a byte at a time,
costs one attempt of at most the deadline and a few kilobytes, and no other callback waits.

A receiver answering 700 MB grew the server by 740 MB (the answer was read whole), and one
trickling a byte every 10 s stalled every callback for good (the timeout was per read, and
callbacks went one after another).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from backends import sqlite_only
from observatory.calib import requests as calib_requests
from observatory.calib.models import CalibrationRequest
from observatory.calib.requests import deliver_callbacks
from observatory.core.config import Settings
from servers import CallbackReceiver

#: The attempt deadline in these tests (monkeypatched over the 30 s of the service).
DEADLINE_S = 2.0
#: What the huge receiver offers: far more than any attempt may read.
HUGE_BYTES = 128 << 20


class BadReceiver:
    """A loopback HTTP receiver answering every POST badly, on a raw socket:

    - ``huge``: a 200 with a ``HUGE_BYTES`` body, sent as fast as the client takes it;
    - ``slow_body``: a 200, then a chunked body of one byte every 0.2 s;
    - ``slow_headers``: a status line, then a header line every 0.2 s.

    It records how many bytes of answer the client took (``sent``: what the kernel
    accepted, so at most the client's reads plus the sockets' buffers) and stops
    trickling after ``give_up_s`` (so that a client without a deadline ends at last).
    """

    def __init__(self, mode: str, give_up_s: float = 30.0) -> None:
        self.mode, self.give_up_s = mode, give_up_s
        self.sent = 0
        self.calls = 0
        self.closed = threading.Event()  # the client hung up (or the answer ended)
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/calibrated"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _read_request(self, connection: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += connection.recv(65536)

    def _send(self, connection: socket.socket, data: bytes) -> None:
        connection.sendall(data)
        self.sent += len(data)

    def _answer(self, connection: socket.socket) -> None:
        self.calls += 1
        started = time.monotonic()
        try:
            with connection:
                self._read_request(connection)
                if self.mode == "huge":
                    self._send(
                        connection, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % HUGE_BYTES
                    )
                    block = b"x" * (1 << 20)
                    for _ in range(HUGE_BYTES >> 20):
                        self._send(connection, block)
                    return
                if self.mode == "slow_body":
                    self._send(connection, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    drip, end = b"1\r\nx\r\n", b"0\r\n\r\n"
                else:
                    self._send(connection, b"HTTP/1.1 200 OK\r\n")
                    drip, end = b"X-Drip: x\r\n", b"Content-Length: 0\r\n\r\n"
                while time.monotonic() - started < self.give_up_s and not self._stop.is_set():
                    self._send(connection, drip)
                    time.sleep(0.2)
                self._send(connection, end)
        except OSError:  # the client hung up: what it took is counted
            pass
        finally:
            self.closed.set()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calib_requests, "CALLBACK_TIMEOUT_S", DEADLINE_S)


def add_finished(session_factory: sessionmaker[Session], *urls: str) -> list[int]:
    """Finished requests calling back ``urls`` (in that order of id)."""
    now = datetime.now(UTC)
    with session_factory() as session:
        requests = [
            CalibrationRequest(
                cal_id=1_400_003_000,
                target_obs_id=1_400_000_000,
                callback_url=url,
                calibration_completed_datetime=now,
                calibration_fit_id=1,
            )
            for url in urls
        ]
        session.add_all(requests)
        session.commit()
        return [r.id for r in requests]


def stored(session_factory: sessionmaker[Session], request_id: int) -> CalibrationRequest:
    with session_factory() as session:
        request = session.get(CalibrationRequest, request_id)
        assert request is not None
        return request


class Pass:
    """``deliver_callbacks`` run in a thread: a client without limits must fail the test,
    not hang it."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings) -> None:
        self.accepted: list[int] = []
        self.started = time.monotonic()
        self.thread = threading.Thread(
            target=lambda: self.accepted.append(deliver_callbacks(session_factory, settings)),
            daemon=True,
        )
        self.thread.start()

    def join(self, timeout_s: float) -> float:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the pass did not end within {timeout_s} s"
        return time.monotonic() - self.started


@pytest.fixture
def receivers() -> Iterator[list[BadReceiver]]:
    made: list[BadReceiver] = []
    yield made
    for receiver in made:
        receiver.stop()


@sqlite_only
def test_a_huge_answer_is_not_read_and_fails_the_attempt(
    settings: Settings,
    session_factory: sessionmaker[Session],
    short_deadline: None,
    receivers: list[BadReceiver],
) -> None:
    huge = BadReceiver("huge")
    receivers.append(huge)
    good = CallbackReceiver(failures=0)
    huge_id, good_id = add_finished(session_factory, huge.url, good.url)
    # The huge answer was read whole (128 MB here, 700 MB in the report).
    assert Pass(session_factory, settings).join(timeout_s=60) < 30
    assert huge.closed.wait(10)
    # What the kernel took for the client: its reads (16 KiB and a socket read beyond) and
    # the two sockets' buffers. Far below the answer either way.
    assert huge.sent < 40 << 20, huge.sent
    failed = stored(session_factory, huge_id)
    assert failed.callback_attempts == 1 and failed.callback_delivered_datetime is None
    limit = calib_requests.CALLBACK_REPLY_MAX_BYTES
    assert f"longer than {limit} bytes" in (failed.callback_error_message or "")
    # The other request's callback is delivered in the same pass.
    assert len(good.bodies) == 1
    assert stored(session_factory, good_id).callback_delivered_datetime is not None
    # The failed attempt is retried as any other, after its backoff.
    later = datetime.now(UTC) + timedelta(seconds=settings.calib_callback_backoff_s + 1)
    assert deliver_callbacks(session_factory, settings, now=later) == 0
    assert stored(session_factory, huge_id).callback_attempts == 2 and huge.calls == 2
    good.server.shutdown()
    good.server.server_close()


@sqlite_only
@pytest.mark.parametrize("mode", ["slow_body", "slow_headers"])
def test_a_trickling_receiver_is_cut_off_at_the_deadline_and_holds_up_no_other(
    settings: Settings,
    session_factory: sessionmaker[Session],
    short_deadline: None,
    receivers: list[BadReceiver],
    mode: str,
) -> None:
    slow = BadReceiver(mode)
    receivers.append(slow)
    good = CallbackReceiver(failures=0)
    # The slow receiver's request first: callbacks sent one after another waited for it.
    slow_id, good_id = add_finished(session_factory, slow.url, good.url)
    delivery = Pass(session_factory, settings)
    while not good.bodies and delivery.thread.is_alive():
        time.sleep(0.02)
    # The other callback arrived while the slow attempt still ran (sent alongside it).
    assert len(good.bodies) == 1 and delivery.thread.is_alive()
    # Cut off at the deadline (2 s here); asserted loosely, as the machine may be loaded.
    assert delivery.join(timeout_s=20) < DEADLINE_S + 8
    assert slow.closed.wait(5)  # the client hung up: the receiver stopped trickling
    failed = stored(session_factory, slow_id)
    assert failed.callback_attempts == 1 and failed.callback_delivered_datetime is None
    message = failed.callback_error_message or ""
    assert f"no complete answer within {DEADLINE_S:g} s" in message and "cut off" in message
    assert delivery.accepted == [1]
    assert stored(session_factory, good_id).callback_delivered_datetime is not None
    good.server.shutdown()
    good.server.server_close()


@sqlite_only
def test_callbacks_are_sent_by_a_bounded_number_of_threads(
    settings: Settings,
    session_factory: sessionmaker[Session],
    short_deadline: None,
    receivers: list[BadReceiver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More slow receivers than threads: a pass claims (and sends at once) only as many
    as it has threads, never more threads than allowed; the rest go at the next pass."""
    monkeypatch.setattr(calib_requests, "CALLBACK_WORKERS", 2)
    for _ in range(4):
        receivers.append(BadReceiver("slow_body"))
    ids = add_finished(session_factory, *(r.url for r in receivers))
    for _ in range(2):
        most = 0
        delivery = Pass(session_factory, settings)
        while delivery.thread.is_alive():
            busy = sum(t.name.startswith("calib-callback_") for t in threading.enumerate())
            most = max(most, busy)
            time.sleep(0.05)
        assert 1 <= most <= 2
        # Two attempts at once, each cut off at the deadline (a lower bound: not tight).
        assert delivery.join(timeout_s=1) >= DEADLINE_S * 0.9
    for request_id in ids:
        request = stored(session_factory, request_id)
        assert request.callback_attempts == 1
        assert "cut off" in (request.callback_error_message or "")
