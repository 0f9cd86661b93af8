"""Trigger input the telescope, the database or the reply cannot hold is refused, and named.

A real trigger changes the schedule at once, and the simulated telescope records its
observations later: anything the metafits cannot hold must be refused before the
schedule changes. A request body that cannot be read is refused as such, never
read as nothing; values a client writes for "not set" mean the default.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from astropy.io import fits
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.core.accounts import create_project
from observatory.core.config import Settings
from observatory.core.gpstime import now_gps
from observatory.telescope import sky
from observatory.telescope.simulator import simulate_observation
from observatory.trigger import service
from observatory.trigger.params import ParameterError, as_bool

KEY = "grb-key-123"


@pytest.fixture
def client(settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key=KEY)
        session.commit()
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def zenith_radec() -> tuple[float, float]:
    """A position near the zenith now: up whatever the hour."""
    return round(float(sky.local_apparent_sidereal_deg([now_gps()])[0]), 4), -26.7


def real_trigger_params(**params: Any) -> dict[str, Any]:
    """A valid real (pretend=0) trigger of one 8-s observation at the zenith, plus ``params``."""
    ra, dec = zenith_radec()
    return {"project_id": "G0055", "secure_key": KEY, "ra": ra, "dec": dec, "nobs": 1,
            "exptime": 8, "pretend": "0", **params}  # fmt: skip


def post(client: TestClient, endpoint: str = "triggerobs", **params: Any) -> dict[str, Any]:
    reply = client.post(f"/trigger/{endpoint}", data={k: str(v) for k, v in params.items()})
    assert reply.status_code == 200, reply.text
    return reply.json()


def schedule(session_factory: sessionmaker[Session]) -> list[tuple[int, int, str]]:
    with session_factory() as session:
        rows = session.scalars(select(Observation).order_by(Observation.obsid))
        return [(o.obsid, o.stoptime, o.obsname) for o in rows]


def add_running_observation(session_factory: sessionmaker[Session]) -> None:
    """An observation of the triggering project running now: a real trigger would truncate it."""
    now = now_gps()
    with session_factory() as session:
        session.add(Observation(obsid=now - 100, stoptime=now + 10_000, project_id="G0055",
                                mode="MWAX_CORRELATOR", obsname="running"))  # fmt: skip
        session.commit()


def errors_of(result: dict[str, Any]) -> str:
    return " | ".join(result["errors"].values())


# -- H2: names the metafits cannot hold ---------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"obsname": "café"}, "obsname: 'café' holds 'é'"),
        ({"obsname": "Größe☃"}, "obsname: 'Größe☃' holds 'ö'"),
        ({"obsname": "grb\t123"}, "obsname: 'grb\\t123' holds '\\t'"),
        ({"obsname": "x" * 61}, "obsname: 61 characters"),  # was recorded, never observed
        ({"obsname": "x" * 201}, "obsname: 201 characters"),  # was cut to 200 without notice
        ({"creator": "tëster"}, "creator: 'tëster' holds 'ë'"),
        ({"creator": "c" * 101}, "creator: 101 characters"),  # was cut to 100 without notice
        # Channel 0 is a valid freqspec, but no receiver channel: the telescope cannot record it.
        ({"freqspecs": "12,24"}, "freqspecs: '12,24'"),
    ],
)
def test_what_a_metafits_cannot_hold_is_refused_before_the_schedule_changes(
    client: TestClient,
    session_factory: sessionmaker[Session],
    params: dict[str, Any],
    message: str,
) -> None:
    add_running_observation(session_factory)
    before = schedule(session_factory)
    result = post(client, **real_trigger_params(**params))
    assert result["success"] is False
    assert message in errors_of(result), result["errors"]
    assert result["obsid_list"] == [] and result["clear"] == {}
    assert schedule(session_factory) == before  # nothing truncated, nothing inserted


def test_calibrator_observation_names_are_shortened_to_fit_the_metafits(client: TestClient) -> None:
    """Robots send calibrator=True with names of their own: the trigger must not be refused
    for the length of "<obsname> Cal: <calibrator> at <freqspec>" (it was)."""
    name = "SWIFT_Fermi_LVC_S230518h_0123456789ab"  # 37 characters
    result = post(client, **real_trigger_params(obsname=name, calibrator="HydA", pretend="1",
                                                freqspecs='["121:132;141:152"]'))  # fmt: skip
    assert result["success"] is True, result["errors"]
    for obsname, calibrator, spec in (
        (name, "HydA", "121:132;141:152"),
        ("n" * 60, "HydA", "145,24"),
        ("x", "HydA", "1;" * 40),
    ):
        made = service.calibrator_observation_name(obsname, calibrator, spec)
        assert len(made) <= service.MAX_OBSNAME_CHARS and " Cal: HydA" in made, made
    assert service.calibrator_observation_name("GRB", "HydA", "145,24") == "GRB Cal: HydA at 145,24"


def test_a_calibrator_name_keeps_its_freqspec_once_the_obsname_has_given_way() -> None:
    """The obsname part gives way first: the freqspec was dropped whenever the suffix was
    over 30 characters, and two calibrator observations at different freqspecs got one name."""
    names = [
        service.calibrator_observation_name("G" * 40, "PKS2356-61", spec)
        for spec in ("101:112;141:152", "109:120;149:160")
    ]
    assert names == [
        "G" * 25 + " Cal: PKS2356-61 at 101:112;141:152",
        "G" * 25 + " Cal: PKS2356-61 at 109:120;149:160",
    ]
    assert all(len(name) == service.MAX_OBSNAME_CHARS for name in names)
    # All of the obsname may give way; a name cut where it had a space does not keep it.
    spec = "57:68;93:104;121:132;145:156"  # " Cal: PKS2356-61 at <spec>": 48 characters
    assert service.calibrator_observation_name("GRB 1234567 890", "PKS2356-61", spec) == (
        "GRB 1234567 Cal: PKS2356-61 at " + spec
    )
    assert service.calibrator_observation_name("GRB 1", "PKS2356-61", "1;" * 26) == (
        "GRB 1 Cal: PKS2356-61"  # the freqspec cannot fit whatever the obsname
    )
    longest = "1;" * 22 + "1"  # " Cal: HydA at <spec>": 59 characters
    assert (
        service.calibrator_observation_name("GRB", "HydA", longest) == f"G Cal: HydA at {longest}"
    )
    assert service.calibrator_observation_name("GRB", "HydA", longest + "2") == (
        f"Cal: HydA at {longest}2"  # 60 with the space before it, which goes
    )


@pytest.mark.filterwarnings("ignore:Card is too long, comment will be truncated")
def test_the_longest_accepted_name_is_one_the_simulated_telescope_records(
    tmp_path: Path,
) -> None:
    from observatory.trigger.params import as_text  # new with the fix

    name = as_text("obsname", " " + "".join(map(chr, range(0x21, 0x7F)))[:60] + " ",
                   max_chars=service.MAX_OBSNAME_CHARS, printable_ascii=True)  # fmt: skip
    assert len(name) == service.MAX_OBSNAME_CHARS
    simulate_observation(tmp_path, 1_450_000_000, n_tiles=1, coarse_chans=[133], n_timesteps=1,
                         int_time_s=8, fine_chan_khz=1280, obs_name=name)  # fmt: skip
    assert fits.getheader(tmp_path / "1450000000.metafits")["FILENAME"] == name
    with pytest.raises(ParameterError, match="obsname: 61 characters"):
        as_text("obsname", "x" * 61, max_chars=service.MAX_OBSNAME_CHARS)


def buffering(session_factory: sessionmaker[Session], obsname: str) -> float:
    """Project G0055 and an MWAX_BUFFER observation running at the time returned."""
    now = 1_450_324_816 + 0.5
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key=KEY)
        session.add(Observation(obsid=int(now) - 96, stoptime=int(now) + 800, project_id="C001",
                                mode="MWAX_BUFFER", obsname=obsname))  # fmt: skip
        session.commit()
    return now


def test_a_buffer_dump_of_a_long_named_observation_gets_a_name_the_metafits_holds(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    now = buffering(session_factory, obsname="b" * 60)
    with session_factory() as session:
        raw = {"project_id": "G0055", "secure_key": KEY, "pretend": "0", "obstime": 30}
        result = service.trigger_buffer(session, settings, raw, now=now)
        assert result["success"] is True, result["errors"]
        capture = session.scalars(
            select(Observation).where(Observation.mode == "VOLTAGE_BUFFER")
        ).one()
        assert capture.obsname.endswith(" buffer dump")
        assert len(capture.obsname) <= service.MAX_OBSNAME_CHARS
    # A dump taking its settings from another dump's capture keeps its name, not "... buffer
    # dump buffer dump".
    assert service.buffer_dump_name("buffering buffer dump") == "buffering buffer dump"
    assert service.buffer_dump_name("buffering") == "buffering buffer dump"


# -- H3: "None" is not false --------------------------------------------------------------------


def test_none_null_and_empty_booleans_mean_the_default(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    add_running_observation(session_factory)
    before = schedule(session_factory)
    for value in ("None", "none", "NULL", "null", ""):
        result = post(client, **real_trigger_params(pretend=value, calibrator=value,
                                                    avoidsun=value))  # fmt: skip
        assert result["success"] is True, result["errors"]
        params = result["params"]
        assert params["pretend"] is True, value  # the default: never a real trigger
        assert params["calibrator"] is False and params["avoidsun"] is False
        assert result["schedule"]["stdout"] == "Pretending: commands not run"
    # A JSON null, too.
    ra, dec = zenith_radec()
    by_json = client.post("/trigger/triggerobs", json={"project_id": "G0055", "secure_key": KEY,
                          "ra": ra, "dec": dec, "nobs": 1, "exptime": 8, "pretend": None}).json()  # fmt: skip
    assert by_json["success"] is True and by_json["params"]["pretend"] is True
    assert schedule(session_factory) == before
    assert client.get("/trigger/obslist?obstime=60&current=None").status_code == 200


def test_a_secure_key_that_is_not_text_is_a_wrong_key(client: TestClient) -> None:
    """A JSON body may hold a lone surrogate (``"\\ud800"``): hashing it failed with a 500."""
    ra, dec = zenith_radec()
    body = '{"project_id": "G0055", "secure_key": "\\ud800abc", ' + (
        f'"ra": {ra!r}, "dec": {dec!r}, "nobs": 1, "exptime": 8}}'
    )
    reply = client.post("/trigger/triggerobs", content=body,
                        headers={"Content-Type": "application/json"})  # fmt: skip
    assert reply.status_code != 500
    assert reply.json()["success"] is False and "secure_key" in str(reply.json()["errors"])


def test_none_and_null_mean_the_default_for_every_parameter(client: TestClient) -> None:
    """Not only the yes/no ones: ``exptime=None`` was "not a number", and ``obsname=None``
    was stored as the name "None"."""
    unset = {name: "None" for name in ("nobs", "atten", "calexptime", "groupid", "freqres",
                                       "inttime", "source", "subarrays", "alt", "az")}  # fmt: skip
    result = post(client, **real_trigger_params(pretend="true", exptime="null", obsname="None",
                                                creator="NULL", **unset))  # fmt: skip
    assert result["success"] is True, result["errors"]
    params = result["params"]
    assert (params["obsname"], params["creator"]) == ("trigger", "djmwa/trigger")
    assert params["exptime"] == 120 and params["nobs"] == 15


def test_as_bool_gives_the_default_for_unset_words_and_refuses_them_without_one() -> None:
    for word in ("None", "null", "", " NONE "):
        assert as_bool("pretend", word, default=True) is True
        assert as_bool("avoidsun", word, default=False) is False
        with pytest.raises(ParameterError, match="vcsmode"):
            as_bool("vcsmode", word)
    assert as_bool("pretend", None, default=True) is True


def test_triggerbuffer_pretend_none_is_pretend(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    now = buffering(session_factory, obsname="buffering")
    with session_factory() as session:
        raw = {"project_id": "G0055", "secure_key": KEY, "pretend": "None", "obstime": 30}
        result = service.trigger_buffer(session, settings, raw, now=now)
        assert result["success"] is True, result["errors"]
        assert result["params"]["pretend"] is True
        modes = session.scalars(select(Observation.mode)).all()
        assert modes == ["MWAX_BUFFER"]  # nothing captured, nothing cleared


# -- M5: bodies that cannot be read -------------------------------------------------------------


def test_multipart_forms_are_read(client: TestClient) -> None:
    fields = {"project_id": (None, "G0055"), "obstime": (None, "60")}
    busy = client.post("/trigger/busy", files=fields)
    assert busy.status_code == 200, busy.text
    assert busy.json() is False
    ra, dec = zenith_radec()
    form = {"project_id": "G0055", "secure_key": KEY, "ra": str(ra), "dec": str(dec), "nobs": "1",
            "exptime": "8", "obsname": "multipart"}  # fmt: skip
    result = client.post("/trigger/triggerobs", files={k: (None, v) for k, v in form.items()})
    assert result.status_code == 200, result.text
    assert result.json()["success"] is True, result.json()["errors"]
    assert result.json()["params"]["obsname"] == "multipart"
    upload = client.post("/trigger/busy", files={"project_id": ("id.txt", b"G0055"),
                                                 "obstime": (None, "60")})  # fmt: skip
    assert upload.status_code == 400
    assert "project_id" in upload.text and "file" in upload.text
    assert "UploadFile" not in upload.text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'"project_id=G0055"', "a JSON request body must be an object"),
        (b"42", "a JSON request body must be an object"),
        (b"\x8f\xfe\x01abc\xff", "not UTF-8"),
        (b"Qr7!x z", "neither a JSON object nor a form"),
        (b"{not json", "not valid JSON"),
    ],
)
def test_a_body_that_is_neither_a_json_object_nor_a_form_is_a_bad_request(
    client: TestClient, body: bytes, message: str
) -> None:
    reply = client.post("/trigger/triggerobs?project_id=G0055", content=body,
                        headers={"Content-Type": "application/json"})  # fmt: skip
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]


# -- L5: values that were stored or ignored without a word ---------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "params", "message"),
    [
        ("triggerobs", {"groupid": "-1"}, "groupid: -1"),
        ("triggerobs", {"group_id": "0"}, "groupid: 0"),
        ("triggervcs", {"vcsmode": "maybe"}, "vcsmode: 'maybe' is not a boolean"),
        ("triggerobs", {"vcsmode": "True"}, "vcsmode"),  # a voltage capture asked of triggerobs
    ],
)
def test_group_ids_and_vcsmode_are_checked(
    client: TestClient,
    session_factory: sessionmaker[Session],
    endpoint: str,
    params: dict[str, Any],
    message: str,
) -> None:
    result = post(client, endpoint, **real_trigger_params(**params))
    assert result["success"] is False
    assert message in errors_of(result), result["errors"]
    assert schedule(session_factory) == []


@pytest.mark.parametrize("endpoint", ["triggerobs", "triggervcs"])
def test_group_id_and_groupid_with_different_values_are_refused_naming_both(
    client: TestClient, session_factory: sessionmaker[Session], endpoint: str
) -> None:
    """One parameter under two names, given two values: groupid won in silence."""
    params = real_trigger_params()
    reply = client.post(f"/trigger/{endpoint}?project_id=G0055&group_id=111",
                        data={k: str(v) for k, v in params.items() if k != "project_id"}
                        | {"groupid": "222"})  # fmt: skip
    # Answered as every parameter problem of a trigger call is (triggerservice.py loses
    # the message of a 4xx): 200, success false, the reason in errors.
    assert reply.status_code == 200, reply.text
    result = reply.json()
    assert result["success"] is False
    assert "group_id and groupid: given both, with different values ('111' and '222')" in (
        errors_of(result)
    )
    assert schedule(session_factory) == []
    # The same value under both names says one thing: taken.
    same = post(client, endpoint, **real_trigger_params(group_id="111", groupid=" 111 ",
                                                        pretend="1"))  # fmt: skip
    assert same["success"] is True, same["errors"]
    assert same["params"]["groupid"] == 111


def test_vcsmode_as_triggerservice_sends_it_is_accepted(client: TestClient) -> None:
    for endpoint, vcsmode in (("triggerobs", "False"), ("triggervcs", "True")):
        params = real_trigger_params(vcsmode=vcsmode, pretend="1")
        if endpoint == "triggervcs":
            params.pop("ra"), params.pop("dec")  # all-sky
        result = post(client, endpoint, **params)
        assert result["success"] is True, result["errors"]
        assert result["params"]["vcsmode"] is (vcsmode == "True")


# -- L3: lists and objects where one value is expected ------------------------------------------


def test_lists_and_objects_are_refused_where_one_text_value_is_expected(
    client: TestClient,
) -> None:
    ra, dec = zenith_radec()
    base = {"secure_key": KEY, "ra": ra, "dec": dec, "nobs": 1, "exptime": 8}
    listed = client.post("/trigger/triggerobs", json={**base, "project_id": ["G0055"]}).json()
    assert listed["success"] is False
    assert "project_id: " in errors_of(listed)
    assert "['G0055']" not in json.dumps(listed)  # no Python repr, echoed or stored
    assert listed["params"]["project_id"] == '["G0055"]'
    named = client.post("/trigger/triggerobs",
                        json={**base, "project_id": "G0055", "obsname": {"x": 1}}).json()  # fmt: skip
    assert named["success"] is False
    assert "obsname: " in errors_of(named) and "{'x': 1}" not in json.dumps(named)
    assert named["params"]["obsname"] == '{"x": 1}'
    shown = client.get("/trigger/show", params={"trigger_id": named["trigger_id"]}).json()
    assert shown["obsname"] == '{"x": 1}'
    repeated = client.post("/trigger/triggerobs?obsname=a&obsname=b",
                           data={**base, "project_id": "G0055"}).json()  # fmt: skip
    assert repeated["success"] is False and "obsname: given 2 values" in errors_of(repeated)


@pytest.mark.parametrize("source", ["[null]", "[1, [2]]", "['Sun', None]", '{"a": 1}'])
def test_a_source_list_holding_no_name_is_an_error_in_the_answer(
    client: TestClient, source: str
) -> None:
    """It was a 500: the reply's params parsed the list again, unguarded."""
    result = post(client, **real_trigger_params(source=source, pretend="1"))
    assert result["success"] is False
    assert "source: " in errors_of(result) and "is not a name" in errors_of(result)


@pytest.mark.parametrize("endpoint", ["triggervcs", "triggerobs"])
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"source": "\xa0"}, "source: '\\xa0' is blank"),  # source=%C2%A0
        ({"source": " "}, "source: ' ' is blank"),
        ({"source": "['Sun', ' ']"}, "source: ' ' is a blank name"),
        ({"source": "['']"}, "source: '' is a blank name"),
        ({"source": "[]"}, "source: [] names no source"),
        ({"ra": " ", "dec": " "}, "ra: ' ' is blank"),
    ],
)
def test_a_blank_target_is_an_error_not_an_all_sky_capture(
    client: TestClient,
    session_factory: sessionmaker[Session],
    endpoint: str,
    params: dict[str, str],
    message: str,
) -> None:
    """A source of spaces was read as no source: triggervcs, given no target, captured the
    whole sky (success, sourcelist []), where triggerobs said "no target"."""
    result = post(client, endpoint, project_id="G0055", secure_key=KEY, nobs=1, exptime=8,
                  pretend="0", **params)  # fmt: skip
    assert result["success"] is False, result
    assert message in errors_of(result), result["errors"]
    assert schedule(session_factory) == []


def test_triggervcs_without_a_target_parameter_still_captures_the_whole_sky(
    client: TestClient,
) -> None:
    """The documented all-sky mode: no target parameter at all, or one unset (empty, None,
    null: what a client sends for an argument it did not set)."""
    for unset in ({}, {"source": ""}, {"source": "None"}):
        result = post(client, "triggervcs", project_id="G0055", secure_key=KEY, nobs=1,
                      exptime=8, pretend="1", **unset)  # fmt: skip
        assert result["success"] is True, (unset, result["errors"])
        assert result["params"]["sourcelist"] == [] and result["params"]["ralist"] == []


UNBUILDABLE_LITERAL = "[{[]: 1}]"  # a Python list literal whose dict key is unhashable
HUGE_INTEGER = "9" * 4301  # int() refuses more than 4,300 digits


@pytest.mark.parametrize("name", ["ra", "source", "nobs", "exptime", "freqspecs", "subarrays"])
def test_a_literal_that_cannot_be_built_is_an_error_in_the_answer(
    client: TestClient, name: str
) -> None:
    """It was a 500: the Python-literal fallback raised TypeError for an unhashable key."""
    result = post(client, **real_trigger_params(pretend="1", **{name: UNBUILDABLE_LITERAL}))
    assert result["success"] is False
    assert f"{name}: " in errors_of(result)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/trigger/busy", {"project_id": "G0055", "obstime": UNBUILDABLE_LITERAL}),
        ("/trigger/show", {"trigger_id": UNBUILDABLE_LITERAL}),
        ("/trigger/find", {"page": UNBUILDABLE_LITERAL}),
        ("/trigger/obslist", {"current": HUGE_INTEGER}),
        ("/trigger/find", {"trigger_id": UNBUILDABLE_LITERAL}),
    ],
)
def test_unreadable_queries_are_bad_requests_naming_the_parameter(
    client: TestClient, path: str, params: dict[str, str]
) -> None:
    reply = client.get(path, params=params)
    assert reply.status_code == 400, reply.text
    assert list(params)[-1] in reply.text


def test_a_huge_integer_for_a_boolean_is_refused_as_such(client: TestClient) -> None:
    with pytest.raises(ParameterError, match=r"pretend: .* is not a boolean"):
        as_bool("pretend", HUGE_INTEGER, default=True)
    result = post(client, "triggerbuffer", project_id="G0055", secure_key=KEY,
                  pretend=HUGE_INTEGER, obstime=8)  # fmt: skip
    assert result["success"] is False and "pretend: " in errors_of(result)
    # pretty takes any value as "indent" (find?pretty): a huge one too, not a 500.
    indented = client.get("/trigger/vcsfree", params={"pretty": HUGE_INTEGER})
    assert indented.status_code == 200 and indented.json() >= 0
