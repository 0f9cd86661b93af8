"""The trigger services as a real server: the client library's calls, and 100 concurrent triggers."""

from __future__ import annotations

import itertools
import os
import random
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from observatory.archive.models import Observation
from observatory.cli import main
from observatory.clients import trigger as ts
from observatory.core.database import make_engine, make_session_factory
from observatory.core.gpstime import now_gps
from observatory.telescope import sky
from servers import free_port, observatory_server, wait_for

PROJECTS = {f"T{index:04d}": (index, f"key-of-project-{index}") for index in range(10)}


@pytest.fixture
def server(tmp_path: Path, migrated_db_url: str) -> Iterator[tuple[str, str]]:
    data_dir = tmp_path / "data"
    os.environ["OBSERVATORY_DATABASE_URL"] = migrated_db_url
    try:
        for project_id, (priority, key) in PROJECTS.items():
            assert main(["--data-dir", str(data_dir), "projects", "create", project_id,
                         "--priority", str(priority), "--secure-key", key]) == 0  # fmt: skip
    finally:
        del os.environ["OBSERVATORY_DATABASE_URL"]
    port = free_port()
    process = observatory_server(data_dir, port, {"OBSERVATORY_DATABASE_URL": migrated_db_url})
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}/trigger/", migrated_db_url
    finally:
        process.stop()


def zenith_ra() -> float:
    return round(float(sky.local_apparent_sidereal_deg([now_gps()])[0]), 3)


def database_schedule(database_url: str) -> list[tuple[int, int, str]]:
    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        rows = [(o.obsid, o.stoptime, o.project_id)
                for o in session.scalars(select(Observation).order_by(Observation.obsid))]  # fmt: skip
    engine.dispose()
    return rows


def test_the_client_library_calls(server: tuple[str, str]) -> None:
    base, _ = server
    project, (_, key) = "T0005", PROJECTS["T0005"]
    assert ts.busy(project_id=project, obstime=600, base_url=base) is False
    assert ts.obslist(obstime=600, base_url=base) == []
    assert isinstance(ts.vcsfree(base_url=base), int)
    pretend = ts.trigger(project_id=project, secure_key=key, ra=[zenith_ra()], dec=[-26.7],
                         source=["HydA"], freqspecs=["121,24", "145,24"], nobs=1, exptime=8,
                         freqres=10.0, inttime=0.5, obsname="lib test", pretend=True, base_url=base)  # fmt: skip
    assert pretend is not None and pretend["success"] is True, pretend
    assert len(pretend["obsid_list"]) == 4 and pretend["params"]["obsname"] == "lib test"
    assert pretend["params"]["sourcelist"] == ["HydA"]
    # Tuples, as the Sequence type hints allow, are sent as the lists are.
    as_tuples = ts.trigger(project_id=project, secure_key=key, ra=(zenith_ra(),) * 2, dec=(-26.7, -20.0),
                           freqspecs=("121,24", "145,24"), subarray_list=("all_north", "all_south"),
                           nobs=1, exptime=8, pretend=True, base_url=base)  # fmt: skip
    assert as_tuples is not None and as_tuples["success"] is True, as_tuples
    real = ts.trigger(project_id=project, secure_key=key, ra=zenith_ra(), dec=-26.7, nobs=2, exptime=16,
                      calibrator=False, pretend=False, group_id=1234567896, base_url=base)  # fmt: skip
    assert real is not None and real["success"] is True, real
    rows = ts.obslist(obstime=600, base_url=base)
    assert [row[0] for row in rows or []] == real["obsid_list"]
    assert all(row[4] == project and row[6] == 1234567896 for row in rows or [])
    assert ts.busy(project_id="T0001", obstime=600, base_url=base) is True
    refused = ts.trigger(project_id=project, secure_key="wrong", ra=0.0, dec=0.0, base_url=base)
    assert refused is not None and refused["success"] is False and refused["errors"]
    # TraceT's credential check: pretend VCS at RA 0 Dec 0 for 900 s with a calibrator.
    check = ts.trigger(project_id=project, secure_key=key, ra=0.0, dec=0.0, nobs=1, exptime=900,
                       freqspecs="121,24", calibrator=True, vcsmode=True, pretend=True, base_url=base)  # fmt: skip
    assert check is not None and check["success"] is True, check["errors"]
    assert any("exptime: 900 s" in w for w in check["params"]["warnings"])
    buffer = ts.trigger(project_id=project, secure_key=key, vcsmode=True, buffered=True, nobs=1, exptime=8,
                        pretend=True, base_url=base)  # fmt: skip
    assert buffer is not None and buffer["success"] is False  # nothing is buffering
    assert "no current or previous observation" in " ".join(buffer["errors"].values())
    # Without exptime: no obstime is sent (0 was), and the server says what is missing.
    untimed = ts.trigger(project_id=project, secure_key=key, vcsmode=True, buffered=True,
                         pretend=True, base_url=base)  # fmt: skip
    assert untimed is not None and "give end_time, or obstime" in " ".join(
        untimed["errors"].values()
    )
    assert (
        ts.trigger(project_id=project, secure_key=key, freqres=10.0, base_url=base) is None
    )  # client rule
    assert ts.busy(project_id=project, obstime="soon", base_url=base) is None  # type: ignore[arg-type]


#: 24 receiver channels: a voltage capture of the full band, the unit of vcsfree.
FULL_BAND_CHANS = ",".join(str(chan) for chan in range(109, 133))


def _schedule_full_band_capture(
    data_dir: Path, database_url: str, start_gps: int, duration_s: int, project_id: str
) -> None:
    """An operator's 24-channel voltage capture, as `observatory schedule observation` makes it."""
    os.environ["OBSERVATORY_DATABASE_URL"] = database_url
    try:
        assert main(["--data-dir", str(data_dir), "schedule", "observation", "--start", str(start_gps),
                     "--duration", str(duration_s), "--mode", "MWAX_VCS", "--coarse-chans",
                     FULL_BAND_CHANS, "--project", project_id]) == 0  # fmt: skip
    finally:
        del os.environ["OBSERVATORY_DATABASE_URL"]


def test_a_voltage_trigger_sends_exptime_as_given_and_the_server_decides(
    server: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mwa_trigger's trigger(vcsmode=True) (triggerservice.py on its master branch) posts
    exptime as given, in triggervcs and in the buffered path's obstime = nobs * exptime, and
    returns the server's answer. Ours capped exptime at vcsfree() first, and sent nothing
    (None) when that left no time: a capture the caller asked for was silently shortened."""
    base, database_url = server
    project, (_, key) = "T0005", PROJECTS["T0005"]
    # The VCS disk (12715 s of 24-channel capture) nearly full: a capture a day from now
    # leaves 115 s, which vcsfree answers in whole 8 s blocks.
    later = (now_gps() // 8 + 86400 // 8) * 8
    _schedule_full_band_capture(tmp_path / "data", database_url, later, 12600, project)
    free_s = ts.vcsfree(base_url=base)
    assert free_s == 112
    voltage = {"project_id": project, "secure_key": key, "vcsmode": True, "pretend": True,
               "base_url": base}  # fmt: skip
    caplog.clear()
    too_long = ts.trigger(**voltage, freqspecs="121,24", nobs=1, exptime=904)  # all-sky
    assert too_long is not None and too_long["success"] is False, too_long
    assert too_long["params"]["exptime"] == 904  # sent unchanged: the server refused it
    assert "the VCS disk has room for" in " ".join(too_long["errors"].values())
    # A caller that wants what fits caps exptime itself, at vcsfree: then it is taken.
    capped = ts.trigger(**voltage, freqspecs="121,24", nobs=1, exptime=min(904, free_s))
    assert capped is not None and capped["success"] is True, capped
    assert capped["params"]["exptime"] == 112
    buffered = ts.trigger(**voltage, buffered=True, nobs=2, exptime=904)
    assert buffered is not None and buffered["params"]["obstime"] == 2 * 904
    # Full: 3 s of room, no whole 8 s block. The request is still sent, and the server's
    # refusal returned (not None, which robots read as "web API error").
    _schedule_full_band_capture(tmp_path / "data", database_url, later + 12600, 112, project)
    second = now_gps()
    while now_gps() == second:  # the server reuses a vcsfree answer within its GPS second
        time.sleep(0.02)
    assert ts.vcsfree(base_url=base) == 0
    full = ts.trigger(**voltage, freqspecs="121,24", nobs=1, exptime=8)
    assert full is not None and full["success"] is False, full
    assert "the VCS disk has room for" in " ".join(full["errors"].values())
    assert not [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    # A correlator trigger writes nothing to the VCS disk: it is not refused for room.
    correlator = ts.trigger(project_id=project, secure_key=key, freqspecs="121,24", nobs=1,
                            exptime=8, ra=zenith_ra(), dec=-26.7, pretend=True, base_url=base)  # fmt: skip
    assert correlator is not None and correlator["success"] is True, correlator


def _stops(reply: dict[str, Any]) -> dict[int, int]:
    """obsid -> stop time, from the reply's schedule_observation.py lines."""
    stops = {}
    for line in reply["schedule"]["command"].split(" ;\n"):
        start = int(re.search(r"--starttime=(\d+)", line)[1])  # type: ignore[index]
        stops[start] = start + int(re.search(r"--stoptime=\+\+(\d+)s", line)[1])  # type: ignore[index]
    return stops


def test_concurrent_triggers_never_double_book(server: tuple[str, str]) -> None:
    """100 triggers from 10 projects at once: the schedule is exactly the successes, replayed."""
    base, database_url = server
    rng = random.Random(7)
    calls = [
        (f"T{rng.randrange(10):04d}", rng.randint(1, 3), rng.choice([8, 16, 24, 40]))
        for _ in range(100)
    ]
    ra = zenith_ra()

    def call(args: tuple[str, int, int]) -> dict[str, Any]:
        project, nobs, exptime = args
        reply = ts.trigger(project_id=project, secure_key=PROJECTS[project][1], ra=ra, dec=-26.7, nobs=nobs,
                           exptime=exptime, pretend=False, obsname=f"{project} concurrent", base_url=base)  # fmt: skip
        assert reply is not None
        return {**reply, "project": project}

    with ThreadPoolExecutor(max_workers=20) as pool:
        replies = list(pool.map(call, calls))
    successes = sorted((r for r in replies if r["success"]), key=lambda r: r["trigger_id"])
    failures = [r for r in replies if not r["success"]]
    assert successes and failures  # lower priorities lose to higher ones
    assert all("may not interrupt" in " ".join(f["errors"].values()) for f in failures)
    assert len({r["trigger_id"] for r in replies}) == 100

    # Replay the successes in commit order with the schedule's rules.
    replayed: dict[int, tuple[int, str]] = {}
    for reply in successes:
        stops = _stops(reply)
        start, end = min(stops), max(stops.values())
        for obsid, (stop, owner) in list(replayed.items()):
            if obsid < start < stop:
                replayed[obsid] = (start, owner)
            elif start <= obsid < end:
                del replayed[obsid]
        replayed |= {obsid: (stop, reply["project"]) for obsid, stop in stops.items()}
    expected = sorted((obsid, stop, owner) for obsid, (stop, owner) in replayed.items())
    actual = database_schedule(database_url)
    assert actual == expected
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(actual))  # no overlaps


def _broken_reply_server(status: int, headers: dict[str, str], body: bytes, sent: int) -> Any:
    """A loopback server answering every request with ``status`` and the first ``sent``
    bytes of ``body`` (its Content-Length is the whole body's), then closing."""
    from http.server import BaseHTTPRequestHandler

    from servers import handler_server

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body[:sent])

        def log_message(self, *_args: object) -> None:
            pass

    return handler_server(Handler)


@pytest.mark.parametrize(
    ("status", "headers", "body", "sent"),
    [
        (200, {"Content-Type": "application/json"}, b"[" + b"1," * 50 + b"1]", 5),  # cut short
        (500, {"Content-Type": "text/plain"}, b"internal error " * 10, 5),  # its error cut short
        (200, {"Content-Type": "application/json; charset=utf-8"}, b'"\xff\xfe"', 4),
        (200, {"Content-Type": "application/json; charset=no-such"}, b"[]", 2),
    ],
)
def test_a_broken_reply_is_none_logged_as_the_library_promises(
    status: int, headers: dict[str, str], body: bytes, sent: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Robots (TraceT) take None as "web API error": these raised IncompleteRead,
    UnicodeDecodeError or LookupError instead."""
    with _broken_reply_server(status, headers, body, sent) as port:
        assert ts.obslist(obstime=600, base_url=f"http://127.0.0.1:{port}/trigger/") is None
    assert caplog.records and caplog.records[-1].levelname == "ERROR"
