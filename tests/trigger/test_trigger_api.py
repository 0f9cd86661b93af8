"""The /trigger endpoints over HTTP: parameters, defaults, errors, override rules, pretend."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.core.accounts import create_project
from observatory.core.config import Settings
from observatory.core.gpstime import now_gps, now_gps_precise
from observatory.telescope import sky
from observatory.telescope.instrument import tile_layout
from observatory.trigger import pointing, service

KEYS = {
    "G0055": "grb-key-123",
    "D0009": "director-key",
    "C001": "c001-key-12",
    "G0008": "eor-key-123",
}
PRIORITIES = {"G0055": 5, "D0009": 10, "C001": 1, "G0008": 2}


@pytest.fixture
def client(settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with session_factory() as session:
        for project_id, key in KEYS.items():
            create_project(session, project_id, priority=PRIORITIES[project_id], secure_key=key)
        create_project(session, "G0001", priority=0)  # no key: may not trigger
        session.commit()
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def zenith_radec(offset_deg: float = 0.0) -> tuple[float, float]:
    """A position near the zenith now (RA = local sidereal time, Dec = latitude)."""
    lst = float(sky.local_apparent_sidereal_deg([now_gps()])[0])
    return round((lst + offset_deg) % 360.0, 4), -26.7


def calibrator_up() -> str:
    """A standard calibrator high in the sky now: a named one must be up whatever the hour."""
    best = pointing.best_calibrator(now_gps() + 600, min_el_deg=30.0, sun_exclusion_deg=0.0)
    assert best is not None, "no standard calibrator 30 deg up"
    return best[0].name


def trigger(client: TestClient, endpoint: str = "triggerobs", **params: Any) -> dict[str, Any]:
    params.setdefault("project_id", "G0055")
    params.setdefault("secure_key", KEYS.get(params["project_id"], ""))
    reply = client.post(f"/trigger/{endpoint}", data={k: str(v) for k, v in params.items()})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json; charset=utf-8"
    return reply.json()


def schedule(session_factory: sessionmaker[Session]) -> list[dict[str, Any]]:
    with session_factory() as session:
        return [
            {c: v for c, v in o.to_dict().items() if c != "created_at"}
            for o in session.scalars(select(Observation).order_by(Observation.obsid))
        ]


def next_second() -> None:
    """Until the GPS second changes (busy/obslist answers are reused within one)."""
    second = now_gps()
    while now_gps() == second:
        time.sleep(0.02)


def add_observation(
    session_factory: sessionmaker[Session], start: int, stop: int, project_id: str, **fields: Any
) -> None:
    with session_factory() as session:
        session.add(Observation(obsid=start, stoptime=stop, project_id=project_id,
                                mode=fields.pop("mode", "MWAX_CORRELATOR"), obsname=f"{project_id} obs",
                                **fields))  # fmt: skip
        session.commit()


# -- the result and its defaults ----------------------------------------------------------------


def test_defaults_and_the_result_structure(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    ra, dec = zenith_radec()
    before = now_gps()
    result = trigger(client, ra=ra, dec=dec)
    assert result["success"] is True, result["errors"]
    assert result["errors"] == {}
    params = result["params"]
    assert params["pretend"] is True  # the default
    assert (params["nobs"], params["exptime"], params["calexptime"]) == (15, 120, 120)
    assert (params["freqspecs"], params["creator"], params["obsname"]) == (
        ["145,24"],
        "djmwa/trigger",
        "trigger",
    )
    assert (params["freqres"], params["inttime"], params["atten"]) == (10.0, 0.5, 1.0)
    assert params["avoidsun"] is False and params["calibrator"] is False
    assert "secure_key" not in json.dumps(result)
    obsids = result["obsid_list"]
    assert len(obsids) == 15 and obsids[0] % 8 == 0 and obsids[0] >= before + 4
    assert obsids[0] - now_gps() <= 4 + 8 + 1
    assert all(b - a == 120 for a, b in itertools.pairwise(obsids))
    assert params["groupid"] == obsids[0]
    for part in ("clear", "schedule"):
        assert set(result[part]) >= {"command", "commands", "retcode", "stdout", "stderr"}
    assert result["schedule"]["stdout"] == "Pretending: commands not run"
    assert result["schedule"]["command"].count("schedule_observation.py") == 15
    info = [
        line
        for line in result["schedule"]["stderr"].splitlines()
        if line.startswith("INFO:Schedule metadata for ")
    ]
    # TraceT's reading: the text after " for ", less its last character.
    assert [int(line.split(" for ")[1][:-1]) for line in info] == obsids
    assert isinstance(result["trigger_id"], int) and result["trigger_id"] > 0
    assert schedule(session_factory) == []  # pretend


def test_a_real_trigger_schedules_back_to_back_observations(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    ra, dec = zenith_radec()
    calibrator = calibrator_up()
    result = trigger(client, ra=json.dumps([ra, (ra + 10) % 360]), dec=dec, nobs=2, exptime=16,
                     freqspecs='["121,24", "145,24"]', pretend="false", calibrator=calibrator,
                     obsname="grb123", creator="tester", group_id=1234567896)  # fmt: skip
    assert result["success"] is True, result["errors"]
    rows = schedule(session_factory)
    assert [r["obsid"] for r in rows] == result["obsid_list"]
    assert len(rows) == 2 * 2 * 2 + 2
    assert all(a["stoptime"] == b["obsid"] for a, b in itertools.pairwise(rows))
    targets, calibrators = rows[:8], rows[8:]
    assert [r["coarse_chans"][0] for r in targets] == [109, 109, 133, 133] * 2
    assert all(r["groupid"] == 1234567896 and r["project_id"] == "G0055" for r in rows)
    assert all(r["creator"] == "tester" and r["obsname"] == "grb123" for r in targets)
    assert all(r["stoptime"] - r["obsid"] == 16 for r in targets)
    assert [r["obsname"] for r in calibrators] == [
        f"grb123 Cal: {calibrator} at 121,24",
        f"grb123 Cal: {calibrator} at 145,24",
    ]
    assert all(r["calibration"] and r["calibrator_source"] == calibrator for r in calibrators)
    assert all(r["stoptime"] - r["obsid"] == 120 for r in calibrators)
    assert result["params"]["calname"] == calibrator
    grid = pointing.sweet_grid()
    for row in targets:
        number = int(
            next(i for i in range(len(grid.number)) if list(grid.delays[i]) == row["delays"])
        )
        assert (row["az_deg"], row["el_deg"]) == (
            pytest.approx(grid.az_deg[number]),
            pytest.approx(grid.el_deg[number]),
        )
        assert row["ra_phase_deg"] in (pytest.approx(ra), pytest.approx((ra + 10) % 360))
    shown = client.get("/trigger/show", params={"trigger_id": result["trigger_id"]}).json()
    assert shown["success"] is True and shown["obsids"] == result["obsid_list"]
    assert shown["trigger_mode"] == "MWAX_CORRELATOR" and shown["pretend"] is False
    assert shown["created_datetime"].count("T") == 1 and "+" not in shown["created_datetime"]


def test_parameters_in_the_url_in_json_and_in_a_mislabelled_form(client: TestClient) -> None:
    ra, dec = zenith_radec()
    query = urlencode(
        {"project_id": "G0055", "secure_key": KEYS["G0055"], "ra": ra, "dec": dec, "nobs": 1}
    )
    by_url = client.get(f"/trigger/triggerobs?{query}").json()
    by_json = client.post("/trigger/triggerobs", json={"project_id": "G0055", "secure_key": KEYS["G0055"],
                                                       "ra": [ra], "dec": [dec], "nobs": 1}).json()  # fmt: skip
    # triggerservice.py: project_id and obsname in the query, the rest urlencoded, labelled JSON.
    body = urlencode({"secure_key": KEYS["G0055"], "ra": str([ra]), "dec": str([dec]), "nobs": 1,
                      "pretend": True, "vcsmode": False})  # fmt: skip
    mislabelled = client.post("/trigger/triggerobs?project_id=G0055&obsname=x", content=body,
                              headers={"Content-Type": "application/json", "Accept": "application/json"}).json()  # fmt: skip
    for result in (by_url, by_json, mislabelled):
        assert result["success"] is True, result["errors"]
        assert len(result["obsid_list"]) == 1
    assert mislabelled["params"]["obsname"] == "x"
    # A trailing slash is served, not redirected (urllib would turn a redirected POST into a GET).
    slash = client.post("/trigger/triggerobs/", content=body, follow_redirects=False,
                        params={"project_id": "G0055"})  # fmt: skip
    assert slash.status_code == 200 and slash.json()["success"] is True
    pretty = client.get("/trigger/obslist?obstime=60&pretty=1").text
    assert pretty == json.dumps([], indent=2)
    # pretty defaults to true for a web browser, false for a script (the source's rule).
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    shown = client.get("/trigger/show", params={"trigger_id": mislabelled["trigger_id"]},
                       headers=browser)  # fmt: skip
    assert shown.text.startswith("{\n  ") and shown.headers["content-type"].startswith(
        "application/json"
    )
    assert not client.get(
        "/trigger/show", params={"trigger_id": mislabelled["trigger_id"]}
    ).text.startswith("{\n")
    assert client.get("/trigger/show", params={"trigger_id": mislabelled["trigger_id"], "pretty": 0},
                      headers=browser).text.startswith('{"')  # fmt: skip


@pytest.mark.parametrize(
    ("given", "expected"), [({"freqres": 40}, (40.0, 0.5)), ({"inttime": 2}, (10.0, 2.0))]
)
def test_freqres_or_inttime_alone_takes_the_others_default(
    client: TestClient, given: dict[str, Any], expected: tuple[float, float]
) -> None:
    """The wiki gives each its own default; one alone was refused."""
    ra, dec = zenith_radec()
    result = trigger(client, ra=ra, dec=dec, nobs=1, pretend="true", **given)
    assert result["success"] is True, result["errors"]
    assert (result["params"]["freqres"], result["params"]["inttime"]) == expected
    assert f"--freqres={expected[0]:g} --inttime={expected[1]:g}" in result["schedule"]["command"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"ra": "[10, 20]", "dec": "[1, 2, 3]"}, "ra and dec must have the same number of values"),
        ({"freqspecs": "121,300"}, "freqspecs"),
        ({"exptime": 100}, "exptime: 100 s is not a positive multiple of 8 s"),
        (
            {"calexptime": 7, "calibrator": "true"},
            "calexptime: 7 s is not a positive multiple of 8 s",
        ),
        ({"source": "NoSuchThing"}, "NoSuchThing"),
        ({"subarrays": '["all_up"]'}, "unknown subarray 'all_up'"),
        ({"subarrays": '["all_ne", "all_nw"]'}, "2 subarrays for 1 targets"),
        ({"freqres": 7, "inttime": 0.5}, "freqres"),
        ({"freqres": 10, "inttime": 0.1}, "inttime"),
        ({"nobs": 0}, "nobs: 0 is not at least 1"),
        ({"dec": 95}, "Dec -90..90"),
        ({"secure_key": "wrong"}, "secure_key is not the key of project G0055"),
        ({"secure_key": ""}, "secure_key is missing"),
        ({"project_id": "Z9999"}, "project_id 'Z9999' is not a known project"),
        ({"project_id": "G0001"}, "G0001 has no secure key set"),
        ({"ra": "", "dec": ""}, "no target"),
        ({"pretend": "perhaps"}, "pretend: 'perhaps' is not a boolean"),
        ({"calibrator": "NotACalibrator"}, "calibrator"),
        # Never schedulable: errors even in pretend mode, where other lengths only warn.
        ({"exptime": 0, "pretend": "true"}, "exptime: 0 s must be a positive multiple of 8 s"),
        ({"calexptime": -8, "calibrator": "true", "pretend": "true"}, "calexptime: -8 s must be"),
        # All targets are observed at once: two cannot share tiles.
        (
            {"ra": "[10, 20]", "dec": "[-26.7, -26.7]", "subarrays": '["all_north", "all_north"]'},
            "all_north and all_north share tiles",
        ),
    ],
)
def test_errors_are_reported_and_change_nothing(
    client: TestClient, session_factory: sessionmaker[Session], params: dict[str, Any], message: str
) -> None:
    ra, dec = zenith_radec()
    request = {"ra": ra, "dec": dec, "pretend": "false", **params}
    result = trigger(client, **request)
    assert result["success"] is False
    assert any(message in text for text in result["errors"].values()), result["errors"]
    assert result["obsid_list"] == [] and result["clear"] == {} and result["schedule"] == {}
    assert schedule(session_factory) == []
    shown = client.get("/trigger/show", params={"trigger_id": result["trigger_id"]}).json()
    assert shown["success"] is False and shown["errors"] == result["errors"]


def test_a_target_below_the_horizon_at_the_start_is_refused(client: TestClient) -> None:
    """Rising: below the horizon when the observation starts, well up at its middle."""
    ra, dec = zenith_radec(offset_deg=110.0)  # hour angle -110 deg: about 4 deg below
    result = trigger(client, ra=ra, dec=dec, nobs=1, exptime=4 * 3600, pretend="false")
    assert result["success"] is False
    assert any("below the horizon (-" in text for text in result["errors"].values())


def test_a_target_below_the_configured_elevation_is_refused_naming_it(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """With OBSERVATORY_TRIGGER_MIN_ELEVATION_DEG=80, a target 70 deg up was refused as
    "below the horizon (70.0 deg)"."""
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key=KEYS["G0055"])
        session.commit()
    high = settings.model_copy(update={"trigger_min_elevation_deg": 80.0})
    ra, dec = zenith_radec(offset_deg=20.0)  # about 70 deg up
    with TestClient(create_app(high)) as test_client:
        result = trigger(test_client, ra=ra, dec=dec, nobs=1, exptime=8, pretend="false")
    assert result["success"] is False, result
    errors = " ".join(result["errors"].values())
    assert "below the lowest elevation allowed (80 deg) (7" in errors, errors


def test_calexptime_is_unread_without_a_calibrator(client: TestClient) -> None:
    """Clients send their calexptime default whether or not they ask for a calibrator."""
    ra, dec = zenith_radec()
    for calexptime in (100, 0):
        result = trigger(client, ra=ra, dec=dec, nobs=1, exptime=8, calexptime=calexptime)
        assert result["success"] is True, result["errors"]
        assert not any("calexptime" in w for w in result["params"].get("warnings", []))


def test_trigger_ids_are_unique_for_every_call(client: TestClient) -> None:
    ra, dec = zenith_radec()
    ids = {trigger(client, ra=ra, dec=dec, nobs=1)["trigger_id"] for _ in range(3)}
    ids.add(trigger(client, ra=ra, dec=dec, secure_key="wrong")["trigger_id"])
    assert len(ids) == 4


# -- who may override what -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "fields", "running", "requester", "allowed"),
    [
        ("C001", {}, False, "G0055", True),  # lower priority
        ("G0055", {}, False, "G0055", True),  # its own
        ("G0055", {}, False, "C001", False),  # higher priority
        ("G0008", {}, False, "G0008", True),
        ("G0055", {}, False, "G0055", True),
        ("D0009", {}, False, "G0055", False),
        ("C001", {"interruptible": False}, False, "D0009", False),  # marked non-interruptible
        ("C001", {"mode": "MWAX_VCS"}, True, "D0009", False),  # voltage capture in progress
        ("G0055", {"mode": "MWAX_VCS"}, True, "G0055", False),  # ... even one's own
        ("C001", {"mode": "MWAX_VCS"}, False, "D0009", True),  # a future capture may go
        ("C001", {}, True, "G0055", True),  # a running observation is truncated
        ("UNLISTED", {}, False, "C001", True),  # unknown projects rank lowest
    ],
)
def test_override_rules(
    client: TestClient,
    session_factory: sessionmaker[Session],
    owner: str,
    fields: dict[str, Any],
    running: bool,
    requester: str,
    allowed: bool,
) -> None:
    now = now_gps()
    start = (now // 8) * 8 - 8 if running else service.first_start_gps(now) + 8
    add_observation(session_factory, start, start + 600, owner, **fields)
    before = schedule(session_factory)
    ra, dec = zenith_radec()
    result = trigger(client, project_id=requester, ra=ra, dec=dec, nobs=1, exptime=32, pretend="no")
    assert result["success"] is allowed, result["errors"]
    rows = {r["obsid"]: r for r in schedule(session_factory)}
    if not allowed:
        assert list(rows.values()) == before
        assert (
            "may not" in " ".join(result["errors"].values())
            or "cannot" in " ".join(result["errors"].values())
            or "not interruptible" in " ".join(result["errors"].values())
        )
        return
    new = result["obsid_list"][0]
    if running:
        assert rows[start]["stoptime"] == new  # truncated at the new start
        assert "Truncated" in result["clear"]["stdout"]
    else:
        assert all(r["obsname"] != f"{owner} obs" for r in rows.values())  # deleted
        assert f"Deleted {start}" in result["clear"]["stdout"]
    assert rows[new]["project_id"] == requester


def test_pretend_never_changes_the_schedule(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    start = service.first_start_gps(now_gps()) + 8
    add_observation(session_factory, start, start + 240, "C001")
    before = schedule(session_factory)
    ra, dec = zenith_radec()
    result = trigger(client, ra=ra, dec=dec, nobs=3, exptime=120)
    assert result["success"] is True and result["params"]["pretend"] is True
    assert f"Would delete {start}" in result["clear"]["stdout"]
    assert len(result["obsid_list"]) == 3
    assert schedule(session_factory) == before
    refused = trigger(
        client, project_id="C001", ra=ra, dec=dec, nobs=1, exptime=8
    )  # equal priority
    assert refused["success"] is True  # its own observation
    add_observation(session_factory, start + 240, start + 480, "D0009")
    refused = trigger(client, ra=ra, dec=dec, nobs=4, exptime=120)
    assert refused["success"] is False and "D0009" in " ".join(refused["errors"].values())


# -- busy, obslist, vcsfree ----------------------------------------------------------------------


def test_busy_obslist_and_current(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    now = now_gps()
    assert (
        client.get("/trigger/busy", params={"project_id": "C001", "obstime": 600}).json() is False
    )
    assert client.get("/trigger/obslist", params={"obstime": 600}).json() == []
    running_start = (now // 8) * 8 - 64
    add_observation(
        session_factory, running_start, running_start + 128, "G0055", groupid=running_start
    )
    later = running_start + 128 + 64
    add_observation(session_factory, later, later + 120, "C001")
    # Written behind the server's back (as another process would): seen within a second.
    assert client.get("/trigger/obslist", params={"obstime": 600}).json() in ([], [[
        running_start, running_start + 128, "G0055 obs", "", "G0055", "MWAX_CORRELATOR", running_start],
        [later, later + 120, "C001 obs", "", "C001", "MWAX_CORRELATOR", None]])  # fmt: skip
    next_second()
    assert client.get("/trigger/busy", params={"project_id": "C001", "obstime": 30}).json() is True
    assert (
        client.get("/trigger/busy", params={"project_id": "D0009", "obstime": 600}).json() is False
    )
    assert (
        client.get("/trigger/busy", params={"project_id": "G0055", "obstime": 600}).json() is False
    )
    assert (
        client.get("/trigger/busy", params={"project_id": "Z9999", "obstime": 600}).json() is True
    )
    rows = client.get("/trigger/obslist", params={"obstime": 600}).json()
    assert rows == [
        [
            running_start,
            running_start + 128,
            "G0055 obs",
            "",
            "G0055",
            "MWAX_CORRELATOR",
            running_start,
        ],
        [later, later + 120, "C001 obs", "", "C001", "MWAX_CORRELATOR", None],
    ]
    assert client.get("/trigger/obslist", params={"obstime": 10}).json() == rows[:1]
    assert client.get("/trigger/obslist", params={"current": 1}).json() == rows[:1]
    bad = client.get("/trigger/busy", params={"project_id": "C001", "obstime": "soon"})
    assert bad.status_code == 400 and "obstime" in bad.json()["error"]
    assert client.get("/trigger/busy", params={"obstime": 5}).status_code == 400


def _at_the_start_of_an_8_s_window() -> None:
    """Wait until a trigger's first start (the multiple of 8 at least 4 s ahead) has just
    moved on: for the next 7 s, triggers start where the first one did, and a capture it
    scheduled is not yet running at their cut."""
    wait_s = (4.05 - now_gps_precise()) % 8
    if wait_s > 1:
        time.sleep(wait_s)


def test_vcsfree_and_voltage_triggers(
    client: TestClient, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    free = client.get("/trigger/vcsfree").json()
    _at_the_start_of_an_8_s_window()  # the capture below is replaced by later pretend calls
    rate = 24 * settings.trigger_vcs_bytes_per_s_per_chan
    # Whole 8 s blocks (12715 s fit here): a caller who caps exptime at vcsfree must ask
    # for an exposure triggervcs takes.
    assert free == int(settings.trigger_vcs_capacity_bytes // rate) // 8 * 8 == 12712
    capped = trigger(client, "triggervcs", nobs=1, exptime=min(20000, free), pretend="true")
    assert capped["success"] is True, capped["errors"]
    too_long = trigger(client, "triggervcs", nobs=1, exptime=free + 8, pretend="true")
    assert too_long["success"] is False
    assert "VCS disk" in " ".join(too_long["errors"].values())
    # vcsfree counts seconds of 24-channel capture: half the channels fit twice as long.
    half_band = trigger(client, "triggervcs", nobs=1, exptime=free + 8,
                        freqspecs="121,12", pretend="true")  # fmt: skip
    assert half_band["success"] is True, half_band["errors"]
    # The real capture last: a pretend call after it would interrupt it, which it refuses
    # once the capture has begun (a slow machine got there within seconds).
    result = trigger(
        client, "triggervcs", nobs=1, exptime=96, pretend="false"
    )  # all-sky: no target
    assert result["success"] is True, result["errors"]
    (row,) = schedule(session_factory)
    assert row["mode"] == "MWAX_VCS" and row["delays"] == [0] + [32] * 15
    assert client.get("/trigger/vcsfree").json() == free - 96
    assert (
        client.get("/trigger/show", params={"trigger_id": result["trigger_id"]}).json()[
            "trigger_mode"
        ]
        == "MWAX_VCS"
    )


def test_subarrays_observe_targets_at_once(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    ra, dec = zenith_radec()
    ras = [ra, (ra + 5) % 360, (ra + 10) % 360, (ra + 15) % 360]
    result = trigger(client, ra=json.dumps(ras), dec=dec, nobs=2, exptime=64, pretend=0,
                     subarrays='["all_ne", "all_nw", "all_se", "all_sw"]')  # fmt: skip
    assert result["success"] is True, result["errors"]
    rows = schedule(session_factory)
    assert len(rows) == 2
    for row in rows:
        pointings = row["subarray_pointings"]
        assert [p["subarray"] for p in pointings] == ["all_ne", "all_nw", "all_se", "all_sw"]
        assert sum(p["n_tiles"] for p in pointings) == 128
        assert [p["ra_phase_deg"] for p in pointings] == pytest.approx(ras)


def test_automatic_calibrator_and_vcs_mode_change_gap(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    ra, dec = zenith_radec()
    result = trigger(client, "triggervcs", ra=ra, dec=dec, nobs=1, exptime=64, calibrator="true",
                     calexptime=120, pretend="false")  # fmt: skip
    if not result["success"]:  # no calibrator up at this hour: said so
        assert "no standard calibrator" in " ".join(result["errors"].values())
        return
    target, cal = schedule(session_factory)
    assert target["mode"] == "MWAX_VCS" and cal["mode"] == "MWAX_CORRELATOR"
    assert cal["obsid"] == target["stoptime"] + 8  # the mode change
    assert cal["calibration"] and cal["calibrator_source"] == result["params"]["calname"]
    assert cal["el_deg"] >= 17.0


# -- find and show -----------------------------------------------------------------------------


def test_find_filters_pages_and_html(client: TestClient) -> None:
    ra, dec = zenith_radec()
    made = [
        trigger(client, ra=ra, dec=dec, nobs=1, obsname="GRB 1", creator="robot/grb"),
        trigger(
            client, ra=ra, dec=dec, nobs=1, obsname="GRB 2", creator="robot/grb", pretend="false"
        ),
        trigger(
            client, "triggervcs", ra=ra, dec=dec, nobs=1, exptime=8, obsname="FRB 1", creator="me"
        ),
        trigger(client, ra=ra, dec=dec, secure_key="wrong", obsname="GRB 3", creator="robot/grb"),
        trigger(client, project_id="D0009", ra=ra, dec=dec, nobs=1, obsname="flare", creator="me"),
    ]
    ids = [m["trigger_id"] for m in made]

    def find(**params: Any) -> list[int]:
        reply = client.get("/trigger/find", params=params)
        assert reply.status_code == 200, reply.text
        return [t["trigger_id"] for t in reply.json()]

    assert find(pagesize=200) == ids
    assert find(desc=1) == ids[::-1]
    assert find(obsname="GRB%") == ids[:2] + ids[3:4]
    assert find(creator="robot/%", success="true") == ids[:2]
    assert find(success="0") == [ids[3]]
    assert find(pretend="on") == [ids[0], ids[2], ids[3], ids[4]]
    assert find(pretend="false") == [ids[1]]
    # Neither an integer nor on/true: false, as the wiki's rule says (--1 was a 500).
    assert find(pretend="-2") == find(pretend="on") and find(pretend="--1") == [ids[1]]
    assert find(trigger_mode="MWAX_VCS") == [ids[2]]
    assert find(project_id="D0009") == [ids[4]]
    assert find(trigger_id=ids[2]) == [ids[2]]
    assert find(pagesize=2, page=2) == ids[2:4]
    assert find(mintime_utc="2000-01-01T00:00:00", maxtime_utc="2100-01-01T00:00:00") == ids
    assert find(maxtime_utc="2000-01-01T00:00:00") == []
    # The ends of time bound nothing (they were a 500: past year 9999 once made UTC or ended).
    for latest in (
        "9999-12-31T23:59:59",
        "9999-12-31T23:59:59.999999",
        "9999-12-31T23:00:00-05:00",
    ):
        assert find(maxtime_utc=latest) == ids
        assert find(mintime_utc=latest) == []
    assert find(mintime_utc="0001-01-01T00:00:00+01:00") == ids
    assert find(maxtime_utc="0001-01-01T00:00:00+01:00") == []
    # A time with a zone is that instant (SQLite once compared its wall time as UTC).
    made_at = datetime.fromisoformat(client.get("/trigger/show", params={"trigger_id": ids[0]}).json()["created_datetime"]).replace(tzinfo=UTC)  # fmt: skip
    in_perth = (made_at - timedelta(minutes=1)).astimezone(timezone(timedelta(hours=8)))
    assert find(mintime_utc=in_perth.isoformat()) == ids
    in_perth = (made_at + timedelta(hours=1)).astimezone(timezone(timedelta(hours=8)))
    assert find(mintime_utc=in_perth.isoformat()) == []
    # The creation time as shown (to the second) as maxtime takes that whole second.
    last_shown = client.get("/trigger/show", params={"trigger_id": ids[-1]}).json()[
        "created_datetime"
    ]
    assert "." not in last_shown and find(maxtime_utc=last_shown)[-1] == ids[-1]
    # TraceT's link: every filter present, most of them empty.
    tracet = client.get(f"/trigger/find/?search=search&html=1&pagesize=100&trigger_id={ids[1]}&trigger_mode="
                        "&pretend=&success=&mintime_utc=&maxtime_utc=&project_id=&obsname=&creator=")  # fmt: skip
    assert tracet.status_code == 200 and tracet.headers["content-type"].startswith("text/html")
    # Its links resolve from /trigger/find/ to /trigger/show, /metadata/obs_page, /trigger/find.
    assert f'href="../show?trigger_id={ids[1]}' in tracet.text
    first_obsid = made[1]["obsid_list"][0]
    assert f'href="../../metadata/obs_page?obs_id={first_obsid}"' in tracet.text
    assert 'action="../find"' in tracet.text
    assert 'action="find"' in client.get("/trigger/find").text  # without the slash: as it was
    form = client.get("/trigger/find")
    assert form.status_code == 200 and "<form" in form.text and 'id="results"' not in form.text
    paged = client.get("/trigger/find", params={"html": 1, "pagesize": 2})
    assert 'id="next"' in paged.text and 'id="previous"' not in paged.text
    for bad in ({"trigger_mode": "SOMETHING"}, {"mintime_utc": "yesterday"}, {"pagesize": 0}):
        reply = client.get("/trigger/find", params=bad)
        assert reply.status_code == 400 and reply.json()["error"]
    assert client.get("/trigger/show", params={"trigger_id": 999999}).status_code == 404


# -- triggerbuffer ----------------------------------------------------------------------------------


def test_triggerbuffer(
    client: TestClient, session_factory: sessionmaker[Session], settings: Settings
) -> None:
    now = now_gps()
    refused = trigger(client, "triggerbuffer", obstime=120, pretend="false")
    assert (
        refused["success"] is False
        and "no current or previous observation" in refused["errors"]["0"]
    )
    buffer_start = (now // 8) * 8 - 64
    add_observation(session_factory, buffer_start, buffer_start + 640, "G0055", mode="MWAX_BUFFER",
                    coarse_chans=list(range(109, 133)), delays=[0] * 16, az_deg=0.0, el_deg=90.0)  # fmt: skip
    before = schedule(session_factory)

    null = trigger(client, "triggerbuffer", start_time=0, end_time=0, pretend="false")
    assert null["success"] is True and null["obsid_list"] == [buffer_start]
    assert null["schedule"]["command"].endswith("--start=0 --end=0")
    past = trigger(
        client, "triggerbuffer", start_time=now - 100, end_time=now - 50, pretend="false"
    )
    assert past["success"] is True and past["obsid_list"] == [buffer_start]
    pretend = trigger(client, "triggerbuffer", obstime=120)
    assert (
        pretend["success"] is True
        and pretend["schedule"]["stdout"] == "Pretending: trigger command not run"
    )
    assert schedule(session_factory) == before

    called_at = now_gps_precise()
    result = trigger(client, "triggerbuffer", obstime=120, pretend="false")
    answered_at = now_gps_precise()
    assert result["success"] is True, result["errors"]
    params = result["params"]
    # Buffering began 64 s before the call: the buffer holds nothing older than that.
    assert params["capture_start"] == buffer_start and params["buffering_since"] == buffer_start
    assert called_at + 120 <= params["capture_end"] <= answered_at + 120
    rows = {r["obsid"]: r for r in schedule(session_factory)}
    new_start = result["obsid_list"][-1]
    assert result["obsid_list"] == [buffer_start, new_start]
    assert rows[buffer_start]["stoptime"] == new_start  # buffering gave way to the capture
    capture = rows[new_start]
    assert capture["mode"] == "VOLTAGE_BUFFER" and capture["stoptime"] >= now + 120
    assert capture["coarse_chans"] == list(range(109, 133))  # settings inherited
    shown = client.get("/trigger/show", params={"trigger_id": result["trigger_id"]}).json()
    assert shown["trigger_mode"] == "BUFFER" and shown["obsids"] == result["obsid_list"]
    # A capture in progress is not interrupted, not even by a higher priority.
    blocked = trigger(
        client, project_id="D0009", ra=zenith_radec()[0], dec=-26.7, nobs=1, pretend="no"
    )
    assert blocked["success"] is False and "voltage capture in progress" in " ".join(
        blocked["errors"].values()
    )
    assert trigger(client, "triggerbuffer", start_time="x", obstime=5)["errors"]["0"].startswith(
        "start_time"
    )
    # The buffer holds the past: a start to come is refused; with end_time, obstime is unread.
    future = trigger(client, "triggerbuffer", start_time=now + 50, end_time=now + 100)
    assert future["success"] is False and "in the future" in future["errors"]["0"]
    for unread in (-5, "abc"):
        ignored = trigger(client, "triggerbuffer", start_time=0, end_time=now + 30, obstime=unread)
        assert "obstime" not in " ".join(ignored["errors"].values())


def test_avoidsun_puts_the_sun_in_a_null(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """At local noon, a target 15 deg from the Sun: the Sun ends up below the threshold."""
    noon = 1_450_324_818  # 2025-12-21 04:00 UTC, the Sun near the zenith at the MWA
    sun_ra, sun_dec = pointing.body_radec("sun", noon)
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key=KEYS["G0055"])
        session.commit()
        raw = {"project_id": "G0055", "secure_key": KEYS["G0055"], "ra": (sun_ra + 15.0) % 360,
               "dec": sun_dec, "nobs": 1, "exptime": 120, "avoidsun": "yes", "freqspecs": "121,24"}  # fmt: skip
        plain = service.trigger_observations(
            session, settings, {**raw, "avoidsun": "no"}, vcs=False, now=noon
        )
        result = service.trigger_observations(session, settings, raw, vcs=False, now=noon)
    assert result["success"] is True, result["errors"]
    (chosen,) = result["params"]["pointings"]
    (nearest,) = plain["params"]["pointings"]
    assert chosen["sun_power"] < settings.trigger_sun_threshold
    assert chosen["nearest_grid_number"] == nearest["grid_number"]
    sun_az, sun_el = sky.azel_at([sun_ra], [sun_dec], [noon + 60])
    freq_hz = 1.28e6 * 121
    at_nearest = pointing.beam_power(nearest["delays"], sun_az, sun_el, freq_hz)[0]
    at_chosen = pointing.beam_power(chosen["delays"], sun_az, sun_el, freq_hz)[0]
    assert at_chosen < settings.trigger_sun_threshold < at_nearest
    assert chosen["sun_attenuation_db"] > 10
    assert chosen["target_power"] > 0.2  # the target stays in the main lobe


def _service_projects(session: Session) -> None:
    for project_id, key in KEYS.items():
        create_project(session, project_id, priority=PRIORITIES[project_id], secure_key=key)
    session.commit()


def _zenith_at(gps: float) -> tuple[float, float]:
    return round(float(sky.local_apparent_sidereal_deg([gps])[0]), 4), -26.7


@pytest.mark.parametrize("pretend", ["0", "1"])
def test_a_voltage_capture_about_to_start_is_not_cut(
    settings: Settings, session_factory: sessionmaker[Session], pretend: str
) -> None:
    """A capture starting at T, triggered over at T - 3.4 s: it would be running at the cut (T + 8)."""
    capture_start = 1_450_324_816  # a multiple of 8
    now = capture_start - 3.4
    ra, dec = _zenith_at(now)
    with session_factory() as session:
        _service_projects(session)
        session.add(Observation(obsid=capture_start, stoptime=capture_start + 600, project_id="C001",
                                mode="MWAX_VCS", obsname="vcs capture"))  # fmt: skip
        session.commit()
        assert service.first_start_gps(now) == capture_start + 8
        assert service.is_busy(session, "D0009", 60, now=now) is True
        result = service.trigger_observations(
            session, settings, {"project_id": "D0009", "secure_key": KEYS["D0009"], "ra": ra,
                                "dec": dec, "nobs": 1, "exptime": 32, "pretend": pretend},
            vcs=False, now=now,
        )  # fmt: skip
        assert result["success"] is False
        assert "voltage capture in progress" in " ".join(result["errors"].values())
        (row,) = session.scalars(select(Observation)).all()
        assert (row.obsid, row.stoptime) == (capture_start, capture_start + 600)
        # A capture that would not have started by the cut may still be replaced.
        row.obsid, row.stoptime = capture_start + 8, capture_start + 608
        session.commit()
        assert service.is_busy(session, "D0009", 60, now=now) is False
        replaced = service.trigger_observations(
            session, settings, {"project_id": "D0009", "secure_key": KEYS["D0009"], "ra": ra,
                                "dec": dec, "nobs": 1, "exptime": 32, "pretend": "1"},
            vcs=False, now=now,
        )  # fmt: skip
        assert replaced["success"] is True, replaced["errors"]
        assert f"Would delete {capture_start + 8}" in replaced["clear"]["stdout"]


@pytest.mark.parametrize("pretend", ["0", "1"])
def test_a_voltage_capture_replaced_by_its_own_project_needs_no_room_twice(
    settings: Settings, session_factory: sessionmaker[Session], pretend: str
) -> None:
    """Re-pointing a capture that has not started (TraceT's skymap updates): the disk check
    charged the capture being replaced as well as the new one, and refused."""
    now = 1_450_324_816 - 3.4
    with session_factory() as session:
        _service_projects(session)
        session.commit()
        free_s = service.vcs_free_s(session, settings, now)
        exptime_s = (free_s * 2 // 3) // 8 * 8  # two of them do not fit together
        raw = {"project_id": "G0055", "secure_key": KEYS["G0055"], "nobs": 1,
               "exptime": exptime_s, "pretend": "0"}  # fmt: skip
        first = service.trigger_observations(session, settings, raw, vcs=True, now=now)
        assert first["success"] is True, first["errors"]
        assert service.vcs_free_s(session, settings, now) == free_s - exptime_s
        again = service.trigger_observations(
            session, settings, {**raw, "pretend": pretend}, vcs=True, now=now + 1
        )
        assert again["success"] is True, again["errors"]
        assert f"{first['obsid_list'][0]}" in again["clear"]["stdout"]  # replaced
        # The room it has is the disk's with the replaced capture's given back, no more.
        too_long = service.trigger_observations(
            session, settings, {**raw, "pretend": "1", "exptime": free_s + 8}, vcs=True, now=now + 2
        )
        assert too_long["success"] is False
        # Named in whole 8 s blocks, as vcsfree counts the room.
        room_s = free_s - free_s % 8
        assert f"the VCS disk has room for {room_s} s" in " ".join(too_long["errors"].values())


def test_vcsfree_and_the_refusals_name_the_same_room(
    client: TestClient, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """vcsfree answered 12712 (whole 8 s blocks) while triggervcs, in the same state, refused
    a capture saying "the VCS disk has room for 12715 s" (its own count, unrounded): one
    computation now, so a capture of vcsfree seconds is taken and one 8 s longer is refused
    naming the number vcsfree gave; triggerbuffer names it too."""
    rate = 24 * settings.trigger_vcs_bytes_per_s_per_chan
    assert int(settings.trigger_vcs_capacity_bytes // rate) % 8 != 0  # a part block: 12715 s
    free = client.get("/trigger/vcsfree").json()
    assert free % 8 == 0
    taken = trigger(client, "triggervcs", nobs=1, exptime=free, pretend="true")
    assert taken["success"] is True, taken["errors"]
    refused = trigger(client, "triggervcs", nobs=1, exptime=free + 8, pretend="true")
    assert refused["success"] is False
    assert f"the VCS disk has room for {free} s" in " ".join(refused["errors"].values())
    # A dump of a buffering telescope, capturing for longer than there is room for.
    now = 1_450_324_816 + 0.5
    with session_factory() as session:
        session.add(Observation(obsid=1_450_324_816 - 96, stoptime=1_450_324_816 + 800,
                                project_id="C001", mode="MWAX_BUFFER", obsname="buffering",
                                coarse_chans=list(range(109, 133))))  # fmt: skip
        session.commit()
        assert service.vcsfree_answer_s(session, settings, now) == free
        dump = _buffer_call(session, settings, now, obstime=free + 8, pretend="1")
    assert dump["success"] is False
    assert f"the VCS disk has room for {free} s" in " ".join(dump["errors"].values())


def test_a_calibrator_found_by_the_online_name_resolver_is_observed(
    settings: Settings, session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was accepted by name, then looked up in the catalogue alone: a server error. And
    OBSERVATORY_ALLOW_INTERNET, which lets the resolver go online, made Settings refuse to
    load ('names no setting')."""
    from astropy.coordinates import SkyCoord

    from observatory.telescope import catalogue

    now = 1_450_324_816 - 3.4
    ra, dec = _zenith_at(now)
    asked: list[str] = []

    def resolver(name: str) -> SkyCoord:  # the network stands in: nothing goes online
        asked.append(name)
        return SkyCoord(ra=(ra + 3) % 360, dec=dec + 2, unit="deg")

    monkeypatch.setenv("OBSERVATORY_ALLOW_INTERNET", "1")
    monkeypatch.setattr(catalogue.SkyCoord, "from_name", resolver)
    assert Settings(data_dir=settings.data_dir).data_dir == settings.data_dir
    with session_factory() as session:
        _service_projects(session)
        result = service.trigger_observations(
            session, settings, {"project_id": "G0055", "secure_key": KEYS["G0055"], "ra": ra,
                                "dec": dec, "nobs": 1, "exptime": 16, "pretend": "1",
                                "calibrator": "J1234-2711"},
            vcs=False, now=now,
        )  # fmt: skip
    assert result["success"] is True, result["errors"]
    assert result["params"]["calibrator"] == "J1234-2711" == result["params"]["calname"]
    assert asked == ["J1234-2711"]  # resolved once


def test_avoidsun_follows_the_sun_through_an_hour_long_trigger(settings: Settings) -> None:
    """Each observation is pointed for where the Sun is at its own midpoint, not at the start."""
    noon = 1_450_324_818
    sun_ra, sun_dec = pointing.body_radec("sun", noon)
    raw = {"ra": (sun_ra + 15.0) % 360, "dec": sun_dec, "nobs": 30, "exptime": 120,
           "avoidsun": "yes", "freqspecs": "121,24", "pretend": "1"}  # fmt: skip
    request = service.read_trigger_request(raw, vcs=False, when_gps=noon)
    assert request.errors == []
    planned = service.plan(request, service.first_start_gps(noon), settings)
    assert len(planned) == 30 and planned[-1].stoptime - planned[0].obsid == 3600
    freq_hz = 1.28e6 * 120.5  # the middle of channels 109..132
    midpoints = np.array([o.midpoint_gps for o in planned])
    sun_ras, sun_decs = pointing.bodies_radec("sun", midpoints)
    sun_az, sun_el = sky.azel_at(sun_ras, sun_decs, midpoints)
    assert (sun_el > 0).all()
    for i, observation in enumerate(planned):
        (entry,) = observation.pointings
        (expected,) = pointing.avoid_sun_many(
            np.array([entry["target_az_deg"]]), np.array([entry["target_el_deg"]]), sun_az[i : i + 1],
            sun_el[i : i + 1], np.array([freq_hz]), threshold=settings.trigger_sun_threshold,
        )  # fmt: skip
        assert entry["grid_number"] == expected.grid_number, observation.obsid
        at_sun = pointing.beam_power(entry["delays"], sun_az[i : i + 1], sun_el[i : i + 1], freq_hz)
        assert at_sun[0] == pytest.approx(entry["sun_power"], rel=1e-6, abs=1e-12)
        if expected.sun_power < settings.trigger_sun_threshold:
            assert at_sun[0] < settings.trigger_sun_threshold, observation.obsid
    # The Sun moves across the sky in an hour: the pointing has to change with it.
    assert len({o.pointings[0]["grid_number"] for o in planned}) > 1


def test_avoidsun_checks_whether_the_sun_is_up_at_each_observation(settings: Settings) -> None:
    """A trigger starting before sunrise: observations after sunrise avoid the Sun."""
    day = 1_450_324_818
    times = day - np.arange(0, 12 * 3600, 60.0)
    ras, decs = pointing.bodies_radec("sun", times)
    _, els = sky.azel_at(ras, decs, times)
    sunrise = float(times[np.flatnonzero(els < 0)[0]])  # the last minute the Sun was down
    start = int(sunrise - 1800) // 8 * 8
    sun_ra, sun_dec = pointing.body_radec("sun", sunrise + 1800)
    raw = {"ra": (sun_ra + 15.0) % 360, "dec": sun_dec, "nobs": 30, "exptime": 120,
           "avoidsun": "yes", "freqspecs": "121,24", "pretend": "1"}  # fmt: skip
    request = service.read_trigger_request(raw, vcs=False, when_gps=start)
    planned = service.plan(request, start, settings)
    avoided = ["sun_power" in o.pointings[0] for o in planned]
    before = [o.midpoint_gps < sunrise for o in planned]
    assert any(before) and not all(before)
    assert not any(a for a, b in zip(avoided, before, strict=True) if b)
    assert any(a for a, b in zip(avoided, before, strict=True) if not b)


def test_integers_other_than_0_and_1_are_booleans(client: TestClient) -> None:
    """current=2, pretend=2, avoidsun=2, calibrator=2: a non-zero integer is true."""
    reply = client.get("/trigger/obslist", params={"current": 2})
    assert reply.status_code == 200 and reply.json() == []
    ra, dec = zenith_radec()
    result = trigger(client, ra=ra, dec=dec, nobs=1, pretend=2, avoidsun=2, calibrator=2)
    assert result["params"]["pretend"] is True and result["params"]["avoidsun"] is True
    assert result["params"]["calibrator"] is True
    assert not any("is not in the catalogue" in e for e in result["errors"].values())
    assert result["success"] is True, result["errors"]
    # A calibrator was chosen, or (pretend) a warning says none is up at this hour.
    assert result["params"]["calname"] or "no standard calibrator" in " ".join(
        result["params"]["warnings"]
    )
    off = trigger(client, ra=ra, dec=dec, nobs=1, avoidsun=0, calibrator="00")
    assert off["params"]["avoidsun"] is False and off["params"]["calibrator"] is False
    refused = trigger(client, ra=ra, dec=dec, nobs=1, pretend="99999999999999999999999")
    assert refused["success"] is False and "pretend" in refused["errors"]["0"]


def test_find_with_only_desc_or_pretty_gives_results(client: TestClient) -> None:
    """The wiki: desc, "if supplied, with any value", reverses the order."""
    ra, dec = zenith_radec()
    ids = [trigger(client, ra=ra, dec=dec, nobs=1)["trigger_id"] for _ in range(2)]
    for query in ("desc", "desc=", "desc=0"):
        reply = client.get(f"/trigger/find?{query}")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith(
            "application/json"
        ), query
        assert [t["trigger_id"] for t in reply.json()] == ids[::-1], query
    pretty = client.get("/trigger/find?pretty=1")
    assert pretty.status_code == 200 and pretty.text.startswith("[\n")
    assert [t["trigger_id"] for t in pretty.json()] == ids
    assert [t["trigger_id"] for t in client.get("/trigger/find?trigger_id=").json()] == ids
    form = client.get("/trigger/find")
    assert "<form" in form.text and 'id="results"' not in form.text


def test_subarray_quarters_and_halves_are_even() -> None:
    """The wiki: halves hold about half the tiles, quarters about a quarter."""
    tiles = service.subarray_tiles()
    sizes = service.subarray_sizes()
    assert [sizes[q] for q in ("all_ne", "all_nw", "all_se", "all_sw")] == [32] * 4
    assert [sizes[h] for h in ("all_north", "all_south", "all_east", "all_west")] == [64] * 4
    quarters = [set(tiles[q]) for q in ("all_ne", "all_nw", "all_se", "all_sw")]
    assert set().union(*quarters) == set(range(128)) and sum(map(len, quarters)) == 128
    assert set(tiles["all_ne"]) | set(tiles["all_nw"]) == set(tiles["all_north"])
    assert set(tiles["all_se"]) | set(tiles["all_sw"]) == set(tiles["all_south"])
    assert set(tiles["all_north"]).isdisjoint(tiles["all_south"])
    assert set(tiles["all_east"]).isdisjoint(tiles["all_west"])
    # Each quarter is its two halves' share: a half and the quarter opposite are disjoint.
    for quarter, halves in (("all_ne", ("all_north", "all_east")), ("all_nw", ("all_north", "all_west")),
                            ("all_se", ("all_south", "all_east")), ("all_sw", ("all_south", "all_west"))):  # fmt: skip
        assert set(tiles[quarter]) == set(tiles[halves[0]]) & set(tiles[halves[1]]), quarter
    east = {index: tile.east_m for index, tile in enumerate(tile_layout())}
    assert sum(east[i] for i in tiles["all_east"]) > sum(east[i] for i in tiles["all_west"])


def test_subarray_schedule_commands_name_every_subarray_pointing(client: TestClient) -> None:
    ra, dec = zenith_radec()
    ras = [ra, (ra + 5) % 360, (ra + 10) % 360, (ra + 15) % 360]
    names = ["all_ne", "all_nw", "all_se", "all_sw"]
    result = trigger(client, ra=json.dumps(ras), dec=dec, nobs=2, exptime=64,
                     subarrays=json.dumps(names))  # fmt: skip
    assert result["success"] is True, result["errors"]
    lines = result["schedule"]["command"].split(" ;\n")
    assert len(lines) == 2
    for line in lines:
        for name, target_ra in zip(names, ras, strict=True):
            assert f"--subarray={name} --alt=" in line
            assert f"--ra={target_ra:.6f} --dec={dec:.6f}" in line
    info = [x for x in result["schedule"]["stderr"].splitlines() if x.startswith("INFO:  ")]
    assert len(info) == 2 and all(all(name in x for name in names) for x in info)
    pointings = result["params"]["pointings"]
    assert [p["n_tiles"] for p in pointings] == [32] * 4


def _buffer_call(session: Session, settings: Settings, now: float, **params: Any) -> dict[str, Any]:
    raw = {"project_id": "G0055", "secure_key": KEYS["G0055"], "pretend": "0", **params}
    return service.trigger_buffer(session, settings, raw, now=now)


def test_busy_and_obslist_take_obstime_0_when_it_is_left_out(client: TestClient) -> None:
    """mwa_trigger's obslist() and busy() send obstime only when given one."""
    assert client.get("/trigger/obslist").json() == []
    assert client.get("/trigger/busy", params={"project_id": "C001"}).json() is False
    fraction = client.get("/trigger/show", params={"trigger_id": "2.7"})
    assert fraction.status_code == 400 and "trigger_id" in fraction.json()["error"]


def test_obslist_without_obstime_lists_an_observation_in_its_first_second(
    session_factory: sessionmaker[Session],
) -> None:
    start = 1_450_324_816
    add_observation(session_factory, start - 96, start, "C001")
    add_observation(session_factory, start, start + 96, "C001")
    with session_factory() as session:
        assert [row[0] for row in service.obslist(session, 0, now=start)] == [start]
        assert [row[0] for row in service.obslist(session, 0, now=start - 1)] == [start - 96]


def test_triggerbuffer_claims_no_data_from_before_buffering_began(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    now = 1_450_324_816 + 0.5
    buffering = 1_450_324_816 - 96  # 96 s of buffer, less than the 240 s it can hold
    with session_factory() as session:
        _service_projects(session)
        session.add(Observation(obsid=buffering - 400, stoptime=buffering, project_id="C001",
                                mode="MWAX_CORRELATOR", obsname="correlating"))  # fmt: skip
        session.add(Observation(obsid=buffering, stoptime=buffering + 800, project_id="C001",
                                mode="MWAX_BUFFER", obsname="buffering"))  # fmt: skip
        session.commit()
        for start_time in (0, now - 200):  # as much as possible; earlier than the buffer holds
            result = _buffer_call(session, settings, now, start_time=start_time, obstime=16,
                                  pretend="1")  # fmt: skip
            assert result["success"] is True, result["errors"]
            assert result["params"]["capture_start"] == buffering
            assert result["schedule"]["command"].startswith(
                f"triggerbuffer.py --start={buffering} "
            )
            assert result["obsid_list"][0] == buffering  # not the correlator observation before it
        later = _buffer_call(session, settings, now, start_time=now - 50, obstime=16, pretend="1")
        assert later["params"]["capture_start"] == now - 50
        backwards = _buffer_call(session, settings, now, start_time=int(now) - 50,
                                 end_time=int(now) - 80, pretend="1")  # fmt: skip
        assert backwards["success"] is False
        assert f"end_time {int(now) - 80} is before start_time {int(now) - 50}" in str(
            backwards["errors"]
        )
        # Buffering in two observations back to back: the buffer runs across both.
        session.add(Observation(obsid=buffering - 400 + 8, stoptime=buffering, project_id="C001",
                                mode="MWAX_BUFFER", obsname="buffering before"))  # fmt: skip
        session.execute(delete(Observation).where(Observation.obsid == buffering - 400))
        session.commit()
        chained = _buffer_call(session, settings, now, obstime=16, pretend="1")
        assert chained["params"]["capture_start"] == now - settings.trigger_buffer_s


def test_triggerbuffer_is_refused_once_the_dump_capture_has_ended(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    now = 1_450_324_816 + 0.5
    with session_factory() as session:
        _service_projects(session)
        # Buffering that ends within the capture: nothing buffers after it.
        session.add(Observation(obsid=int(now) - 96, stoptime=int(now) + 24,
                                project_id="C001", mode="MWAX_BUFFER", obsname="buffering"))  # fmt: skip
        session.commit()
        dump = _buffer_call(session, settings, now, obstime=30)
        assert dump["success"] is True, dump["errors"]
        capture = session.scalars(
            select(Observation).where(Observation.mode == "VOLTAGE_BUFFER")
        ).one()
        # While the capture runs, a null dump (the settings of the capture) is still accepted...
        during = _buffer_call(session, settings, capture.obsid + 8.0, start_time=0, end_time=0)
        assert during["success"] is True, during["errors"]
        # ...but once it has ended nothing is buffering: the dump took the buffer.
        after = capture.stoptime + 20.0
        for params in ({"obstime": 30}, {"start_time": 0, "end_time": 0}):
            refused = _buffer_call(session, settings, after, pretend="1", **params)
            assert refused["success"] is False
            assert "not buffering" in " ".join(refused["errors"].values())
        # An ordinary observation in progress is not buffering either.
        session.add(Observation(obsid=capture.stoptime + 8, stoptime=capture.stoptime + 400,
                                project_id="C001", mode="MWAX_CORRELATOR", obsname="next"))  # fmt: skip
        session.commit()
        refused = _buffer_call(session, settings, capture.stoptime + 20.0, obstime=30)
        assert refused["success"] is False and "MWAX_CORRELATOR" in refused["errors"]["0"]


def test_buffering_resumes_after_a_dumps_capture_and_can_be_dumped_again(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """The wiki clears the schedule "through to 'end_time' or the end of the 'obstime'": a
    20-minute buffering observation lost its 19 minutes after a 40 s capture, and a robot's
    second dump was refused ("not buffering")."""
    now = 1_450_324_816 + 0.5
    start, stop = int(now) - 96, int(now) + 1200
    with session_factory() as session:
        _service_projects(session)
        session.add(Observation(obsid=start, stoptime=stop, project_id="C001", mode="MWAX_BUFFER",
                                obsname="buffering", coarse_chans=list(range(109, 133))))  # fmt: skip
        session.commit()
        pretend = _buffer_call(session, settings, now, obstime=40, pretend="1")
        assert "Would resume" in pretend["clear"]["stdout"]
        dump = _buffer_call(session, settings, now, obstime=40)
        assert dump["success"] is True, dump["errors"]
        capture = session.scalars(
            select(Observation).where(Observation.mode == "VOLTAGE_BUFFER")
        ).one()
        rows = session.scalars(select(Observation).order_by(Observation.obsid)).all()
        assert [(o.obsid, o.stoptime, o.mode) for o in rows] == [
            (start, capture.obsid, "MWAX_BUFFER"),
            (capture.obsid, capture.stoptime, "VOLTAGE_BUFFER"),
            (capture.stoptime, stop, "MWAX_BUFFER"),  # the rest of the buffering
        ]
        resumed = rows[-1]
        assert (resumed.obsname, resumed.project_id, resumed.coarse_chans) == (
            "buffering", "C001", list(range(109, 133)))  # fmt: skip
        assert resumed.groupid == start
        assert f"Resumed {start} (buffering, C001) as {capture.stoptime}" in dump["clear"]["stdout"]
        again = _buffer_call(session, settings, capture.stoptime + 100.0, obstime=16)
        assert again["success"] is True, again["errors"]


# -- busy answers as a trigger would be decided ---------------------------------------------------


def test_busy_is_whether_a_trigger_of_obstime_would_be_refused(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """busy(project, obstime) agrees with a pretend triggerobs of that project, made at the same
    moment, observing for obstime seconds: an observation ending before the trigger's first start
    is not in its way; one starting after now + obstime but before the trigger's end is."""
    base = 1_450_324_816  # a multiple of 8
    now = base + 4.5  # the first start is base + 16
    with session_factory() as session:
        _service_projects(session)
        for start, stop, project_id, mode in (
            (base - 200, base + 8, "D0009", "MWAX_CORRELATOR"),  # ends before the first start
            (base + 8, base + 16, "D0009", "MWAX_VCS"),  # likewise, a capture
            (base + 16, base + 40, "G0008", "MWAX_CORRELATOR"),
            (base + 40, base + 80, "C001", "MWAX_CORRELATOR"),
            (base + 80, base + 400, "D0009", "MWAX_CORRELATOR"),  # after now + 65, before its end
        ):
            session.add(Observation(obsid=start, stoptime=stop, project_id=project_id, mode=mode,
                                    obsname=f"{project_id} obs"))  # fmt: skip
        session.commit()
        assert service.first_start_gps(now) == base + 16
        answers = {}
        for project_id, obstime in itertools.product(
            ("G0055", "D0009", "C001", "G0008"), (8, 24, 60, 65, 600)
        ):
            busy = service.is_busy(session, project_id, obstime, now=now)
            result = service.trigger_observations(session, settings, {
                "project_id": project_id, "secure_key": KEYS[project_id], "alt": 90, "az": 0,
                "nobs": 1, "exptime": obstime, "pretend": "1",  # 60 s is planned as 64, 65 as 72
            }, vcs=False, now=now)  # fmt: skip
            assert busy is not result["success"], (project_id, obstime, result["errors"])
            if busy:  # refused for the schedule, nothing else
                assert all("observation " in e for e in result["errors"].values())
            answers[project_id, obstime] = busy
    assert [answers["G0055", t] for t in (8, 24, 60, 65, 600)] == [False, False, False, True, True]
    assert not any(answers["D0009", t] for t in (8, 24, 60, 65, 600))


def test_busy_for_a_project_that_cannot_trigger(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """A project without a secure key cannot interrupt anything, whatever its priority: busy
    whenever something is scheduled in the window (even its own), as for an unknown project;
    not busy when nothing is."""
    base = 1_450_324_816
    now = base + 4.5
    with session_factory() as session:
        _service_projects(session)
        create_project(session, "D0010", priority=20)  # no key
        session.add(Observation(obsid=base - 64, stoptime=base + 64, project_id="C001",
                                mode="MWAX_CORRELATOR", obsname="C001 obs"))  # fmt: skip
        session.add(Observation(obsid=base + 200, stoptime=base + 400, project_id="D0010",
                                mode="MWAX_CORRELATOR", obsname="D0010 obs"))  # fmt: skip
        session.commit()
        assert service.is_busy(session, "D0009", 60, now=now) is False  # it may interrupt C001
        assert service.is_busy(session, "D0010", 60, now=now) is True
        assert service.is_busy(session, "Z9999", 60, now=now) is True
        assert service.is_busy(session, "D0010", 60, now=base + 64 + 4.5) is False  # nothing then
        assert service.is_busy(session, "D0010", 60, now=base + 200 - 16.5) is True  # its own
        result = service.trigger_observations(session, settings, {
            "project_id": "D0010", "secure_key": "anything", "alt": 90, "az": 0, "nobs": 1,
            "exptime": 64}, vcs=False, now=now)  # fmt: skip
        assert result["success"] is False and "no secure key" in result["errors"]["0"]


# -- a dump while an earlier dump's capture runs --------------------------------------------------


def _captures(session: Session) -> list[tuple[int, int]]:
    return [(obsid, stop) for obsid, stop, _ in _owned_captures(session)]


def test_a_dump_during_a_dump_capture_continues_that_capture(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """A second triggerbuffer while the first dump's capture runs (or is about to start) is not
    an interruption: the capture goes on, under its obsid, to the later of the two ends; the
    VCS disk is charged only for what the second dump adds."""
    now = 1_450_324_816 + 0.5
    buffering = int(now) - 96
    with session_factory() as session:
        _service_projects(session)
        session.add(Observation(obsid=buffering, stoptime=int(now) + 800, project_id="C001",
                                mode="MWAX_BUFFER", obsname="buffering",
                                coarse_chans=list(range(109, 133))))  # fmt: skip
        session.commit()
        first = _buffer_call(session, settings, now, obstime=60)
        assert first["success"] is True, first["errors"]
        ((capture, stop),) = _captures(session)
        assert (capture, stop) == (service.first_start_gps(now), 1_450_324_880)
        # A capture running is charged whole (what it has captured is on the disk).
        free = service.vcs_free_s(session, settings, capture + 4)
        assert service.vcs_free_s(session, settings, capture + 40) == free

        # Asked again before the capture has begun, or while it runs, ending within it: kept.
        for when, params in ((now + 2, {"obstime": 40}), (capture + 12.5, {"obstime": 20}),
                             (capture + 12.5, {"end_time": capture + 9})):  # fmt: skip
            again = _buffer_call(session, settings, when, **params)
            assert again["success"] is True, (params, again["errors"])
            assert again["obsid_list"] == [buffering, capture]
            assert _captures(session) == [(capture, stop)]
            assert service.vcs_free_s(session, settings, capture + 40) == free  # nothing new
            assert again["clear"]["command"] == "" and again["clear"]["retcode"] is None
        # Another project's dump, before the capture has begun: the capture holds its span.
        raw = {"project_id": "D0009", "secure_key": KEYS["D0009"], "pretend": "1", "obstime": 40}
        early = service.trigger_buffer(session, settings, raw, now=now + 2)
        assert early["success"] is True and early["obsid_list"] == [buffering, capture]

        # Ending after it: the capture is extended, never cut and replaced.
        pretend = _buffer_call(session, settings, capture + 12.5, obstime=120, pretend="1")
        assert pretend["success"] is True, pretend["errors"]
        assert f"Would extend capture {capture}" in pretend["clear"]["stdout"]
        longer = _buffer_call(session, settings, capture + 12.5, obstime=120)
        assert longer["success"] is True, longer["errors"]
        new_stop = 1_450_324_960  # capture + 12.5 + 120, up to a whole 8 s
        assert _captures(session) == [(capture, new_stop)]
        assert longer["obsid_list"] == [buffering, capture]
        assert f"Extended capture {capture}" in longer["clear"]["stdout"]
        # Charged for the extension only: the past it saved again is on the disk already.
        assert service.vcs_free_s(session, settings, capture + 40) == pytest.approx(
            free - (new_stop - stop), abs=1
        )

        # Another project's dump meanwhile does not put its data under this capture's project:
        # its own capture starts where this one stops (it holds the seconds before).
        raw = {"project_id": "D0009", "secure_key": KEYS["D0009"], "pretend": "0", "obstime": 160}
        other = service.trigger_buffer(session, settings, raw, now=capture + 20.5)
        assert other["success"] is True, other["errors"]
        other_stop = 1_450_325_008  # capture + 20.5 + 160, up to a whole 8 s
        assert _captures(session) == [(capture, new_stop), (new_stop, other_stop)]
        assert other["obsid_list"] == [buffering, capture, new_stop]
        owners = {
            row.obsid: row.project_id
            for row in session.execute(
                select(Observation.obsid, Observation.project_id)
                .where(Observation.mode == "VOLTAGE_BUFFER")
            )
        }  # fmt: skip
        assert owners == {capture: "G0055", new_stop: "D0009"}


def _owned_captures(session: Session) -> list[tuple[int, int, str]]:
    """The voltage captures (obsid, stop, project), in order."""
    return [
        (o.obsid, o.stoptime, o.project_id)
        for o in session.scalars(
            select(Observation)
            .where(Observation.mode == "VOLTAGE_BUFFER")
            .order_by(Observation.obsid)
        )
    ]


def test_a_dump_never_cuts_a_capture_queued_behind_the_running_one(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """G0055 dumps, D0009 dumps a second later (its capture queued after G0055's), G0055 dumps
    again for longer: it was refused, "observation ... (project D0009) is a voltage capture in
    progress", though that capture had not started. Its own capture cannot grow into D0009's:
    a new one of its own follows the queue, and nothing is cut."""
    now = 1_450_324_816 + 0.5
    buffering = int(now) - 96
    with session_factory() as session:
        _service_projects(session)
        session.add(Observation(obsid=buffering, stoptime=int(now) + 1200, project_id="G0008",
                                mode="MWAX_BUFFER", obsname="buffering",
                                coarse_chans=list(range(109, 133))))  # fmt: skip
        session.commit()
        first = _buffer_call(session, settings, now, obstime=60)
        assert first["success"] is True, first["errors"]
        raw = {"project_id": "D0009", "secure_key": KEYS["D0009"], "pretend": "0", "obstime": 200}
        second = service.trigger_buffer(session, settings, raw, now=now + 1)
        assert second["success"] is True, second["errors"]
        ((x, x_stop, _), (y, y_stop, _)) = queued = _owned_captures(session)
        assert queued == [(x, x_stop, "G0055"), (x_stop, y_stop, "D0009")]

        free = service.vcs_free_s(session, settings, now + 2)
        for pretend in ("1", "0"):
            third = _buffer_call(session, settings, now + 2, obstime=300, pretend=pretend)
            assert third["success"] is True, third["errors"]
        z_stop = 1_450_325_120  # now + 2 + 300, up to a whole 8 s
        assert _owned_captures(session) == [
            (x, x_stop, "G0055"), (y, y_stop, "D0009"), (y_stop, z_stop, "G0055")
        ]  # fmt: skip
        assert third["obsid_list"] == [buffering, x, y, y_stop]
        # Charged for what goes beyond the queue only: the queue holds the seconds before.
        assert service.vcs_free_s(session, settings, now + 2) == pytest.approx(
            free - (z_stop - y_stop), abs=1
        )
        # Buffering goes on after the last capture, as after any dump.
        resumed = session.get(Observation, z_stop)
        assert resumed is not None and resumed.mode == "MWAX_BUFFER"

        # A dump ending within the queue adds nothing and cuts nothing.
        within = _buffer_call(session, settings, now + 3, obstime=100)
        assert within["success"] is True, within["errors"]
        assert within["obsid_list"] == [buffering, x, y]
        assert f"Kept capture {x}" in within["clear"]["stdout"]
        assert len(_owned_captures(session)) == 3


def test_a_dump_continues_its_projects_capture_queued_behind_another(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """D0009 dumps, G0055 dumps (its capture queued behind D0009's), G0055 dumps again: it was
    refused by its own queued capture instead of extending it."""
    now = 1_450_324_816 + 0.5
    buffering = int(now) - 96
    with session_factory() as session:
        _service_projects(session)
        session.add(Observation(obsid=buffering, stoptime=int(now) + 1200, project_id="G0008",
                                mode="MWAX_BUFFER", obsname="buffering",
                                coarse_chans=list(range(109, 133))))  # fmt: skip
        session.commit()
        raw = {"project_id": "D0009", "secure_key": KEYS["D0009"], "pretend": "0", "obstime": 60}
        assert service.trigger_buffer(session, settings, raw, now=now)["success"] is True
        queued = _buffer_call(session, settings, now + 1, obstime=200)
        assert queued["success"] is True, queued["errors"]
        ((a, a_stop, _), (b, b_stop, _)) = _owned_captures(session)
        assert (b, b_stop) == (a_stop, 1_450_325_024)  # behind it: now + 1 + 200, to 8 s

        longer = _buffer_call(session, settings, now + 2, obstime=300)
        assert longer["success"] is True, longer["errors"]
        new_stop = 1_450_325_120  # now + 2 + 300, up to a whole 8 s
        assert _owned_captures(session) == [(a, a_stop, "D0009"), (b, new_stop, "G0055")]
        assert f"Extended capture {b}" in longer["clear"]["stdout"]
        assert longer["obsid_list"] == [buffering, a, b]
        shorter = _buffer_call(session, settings, now + 3, obstime=100)
        assert shorter["success"] is True, shorter["errors"]
        assert f"Kept capture {b}" in shorter["clear"]["stdout"]
        assert _owned_captures(session) == [(a, a_stop, "D0009"), (b, new_stop, "G0055")]


# -- the sweet spot a triggered observation points at ---------------------------------------------

#: A real observation the MWA scheduled at the Sun (MWATelescope/mwax_mover, tests/data/
#: metafits_ppd/1328239120.metafits): 32 s, GRIDNAME 'sweet', GRIDNUM 21, AZIMUTH 45.0,
#: ALTITUDE 70.4075, RAPHASE/DECPHASE the Sun.
REAL_SUN_OBSID, REAL_SUN_GRIDNUM = 1_328_239_120, 21


def _trigger_the_real_sun_observation(
    session_factory: sessionmaker[Session], settings: Settings
) -> dict[str, Any]:
    with session_factory() as session:
        _service_projects(session)
        result = service.trigger_observations(session, settings, {
            "project_id": "C001", "secure_key": KEYS["C001"], "source": "Sun", "nobs": 1,
            "exptime": 32, "freqspecs": "121,2", "pretend": "0"},
            vcs=False, now=REAL_SUN_OBSID - 5.0)  # fmt: skip
    assert result["success"] is True, result["errors"]
    assert result["obsid_list"] == [REAL_SUN_OBSID]
    return result


def test_the_sweet_spot_is_the_one_the_real_scheduler_chose(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    result = _trigger_the_real_sun_observation(session_factory, settings)
    (chosen,) = result["params"]["pointings"]
    assert chosen["grid_number"] == REAL_SUN_GRIDNUM
    (row,) = schedule(session_factory)
    assert (row["az_deg"], row["el_deg"]) == (45.0, pytest.approx(70.4075, abs=0.01))
    assert f"grid {REAL_SUN_GRIDNUM} " in result["schedule"]["stderr"]


def test_the_metafits_names_the_sweet_spot(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """The real scheduler's metafits name the grid point the beam points at."""
    from astropy.io import fits

    from observatory.archive.runner import observe_due

    _trigger_the_real_sun_observation(session_factory, settings)
    recorder = settings.model_copy(update={"telescope_tiles": 4})
    assert observe_due(
        session_factory, recorder, buffer_dumps=service.buffer_dumps, now=REAL_SUN_OBSID + 40
    ) == [REAL_SUN_OBSID]
    header = fits.getheader(
        settings.archive_dir / str(REAL_SUN_OBSID) / f"{REAL_SUN_OBSID}.metafits"
    )
    assert (header["GRIDNAME"], header["GRIDNUM"]) == ("sweet", REAL_SUN_GRIDNUM)


# -- a solar-system body as the target ---------------------------------------------------------

#: The Moon rising at the MWA (a multiple of 8): 0.46 deg below the horizon seen from the site,
#: 0.46 deg above it seen from the Earth's centre (its parallax), where the service placed it.
MOON_RISING_GPS = 1_450_482_616


def _moon_seen_from_the_mwa(gps: float) -> tuple[float, float, float, float]:
    """The Moon's RA, Dec (GCRS), azimuth and elevation seen from the MWA, by astropy alone."""
    from astropy.coordinates import AltAz, get_body
    from astropy.time import Time

    from observatory.telescope.site import mwa_location

    when = Time(gps, format="gps")
    moon = get_body("moon", when, mwa_location())
    seen = moon.transform_to(AltAz(obstime=when, location=mwa_location()))
    return float(moon.ra.deg), float(moon.dec.deg), float(seen.az.deg), float(seen.alt.deg)


def test_the_moon_below_the_horizon_seen_from_the_mwa_is_refused(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Placed at the Earth's centre, the Moon 0.45 deg below the horizon was 0.45 deg above it,
    and a real trigger was accepted."""
    now = MOON_RISING_GPS - 5.0
    assert _moon_seen_from_the_mwa(MOON_RISING_GPS + 8)[3] < -0.4
    with session_factory() as session:
        _service_projects(session)
        result = service.trigger_observations(session, settings, {
            "project_id": "G0055", "secure_key": KEYS["G0055"], "source": "Moon", "nobs": 1,
            "exptime": 16, "pretend": "0"}, vcs=False, now=now)  # fmt: skip
        assert result["success"] is False
        assert "Moon is below the horizon" in " ".join(result["errors"].values())
        assert session.scalars(select(Observation)).all() == []


def test_each_observation_of_the_moon_points_where_it_then_is(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """The Moon's position at the request time was used for every observation of the trigger:
    over 15 x 1200 s it had moved 2 deg from the phase centre and the beam."""
    now = MOON_RISING_GPS + 2 * 3600 - 5.0
    with session_factory() as session:
        _service_projects(session)
        result = service.trigger_observations(session, settings, {
            "project_id": "G0055", "secure_key": KEYS["G0055"], "source": "moon", "nobs": 15,
            "exptime": 1200, "pretend": "0"}, vcs=False, now=now)  # fmt: skip
    assert result["success"] is True, result["errors"]
    rows = schedule(session_factory)
    assert len(rows) == 15
    grid = pointing.sweet_grid()
    for row in rows:
        ra, dec, az, el = _moon_seen_from_the_mwa((row["obsid"] + row["stoptime"]) / 2)
        assert (row["ra_phase_deg"], row["dec_phase_deg"]) == pytest.approx((ra, dec), abs=0.005)
        nearest = pointing.nearest_grid_point(az, el)
        assert (row["az_deg"], row["el_deg"]) == (grid.az_deg[nearest], grid.el_deg[nearest])
    # Each observation's command line gives its own phase centre.
    lines = result["schedule"]["command"].split(" ;\n")
    for row, line in zip(rows, lines, strict=True):
        assert line.startswith(f"schedule_observation.py --starttime={row['obsid']} ")
        assert f"--ra={row['ra_phase_deg']:.6f} --dec={row['dec_phase_deg']:.6f}" in line
    moved_deg = math.hypot(
        (rows[-1]["ra_phase_deg"] - rows[0]["ra_phase_deg"])
        * math.cos(math.radians(rows[-1]["dec_phase_deg"])),
        rows[-1]["dec_phase_deg"] - rows[0]["dec_phase_deg"],
    )
    assert moved_deg > 1.5  # what the one position got wrong
    (first,) = result["params"]["pointings"]
    assert first["target_el_deg"] == pytest.approx(
        _moon_seen_from_the_mwa((rows[0]["obsid"] + rows[0]["stoptime"]) / 2)[3], abs=0.005
    )


def test_a_trigger_that_waited_for_the_schedule_lock_plans_from_the_time_it_got_it(
    settings: Settings, session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock was read before the lock was waited for: a trigger queued behind others
    scheduled observations starting in the past, and deleted a voltage capture that had
    started meanwhile (one in progress is never interrupted)."""
    sent_gps = 1_450_324_816 - 3.4
    clock = iter([sent_gps, sent_gps + 20.0])  # read when sent, then when the lock is held
    monkeypatch.setattr(service, "now_gps_precise", lambda: next(clock))
    with session_factory() as session:
        _service_projects(session)
        session.commit()
        raw = {"project_id": "G0055", "secure_key": KEYS["G0055"], "nobs": 1, "exptime": 64,
               "alt": 90, "az": 0, "pretend": "0"}  # fmt: skip
        result = service.trigger_observations(session, settings, raw, vcs=False)
    assert result["success"] is True, result["errors"]
    assert result["obsid_list"][0] >= service.first_start_gps(sent_gps + 20.0)
