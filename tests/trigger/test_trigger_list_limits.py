"""Trigger calls take bounded lists, and a refused call is stored bounded.

A security review sent an unauthenticated triggerobs with an unknown project and 50,000
``source=moon`` values: seconds of CPU (each Moon's position worked out), a 2.4 MB reply,
and a stored trigger row of megabytes, served publicly by find and show.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.core.accounts import create_project
from observatory.core.config import Settings
from observatory.trigger.models import Trigger

KEY = "grb-key-123"
#: What a refused call's row (params, errors and the reply) may take at most, as JSON: the
#: limits allow ~25 parameters and 50 errors of at most ~1,000 characters each.
SMALL_ROW_CHARS = 100_000


@pytest.fixture
def client(settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key=KEY)
        session.commit()
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def post(client: TestClient, data: Any) -> dict[str, Any]:
    reply = client.post("/trigger/triggerobs", data=data)
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


def row_chars(session_factory: sessionmaker[Session], trigger_id: int) -> int:
    """The size of a stored trigger row's JSON columns, and check ``show`` serves the same."""
    with session_factory() as session:
        trigger = session.get(Trigger, trigger_id)
        assert trigger is not None
        return sum(
            len(json.dumps(value))
            for value in (trigger.params, trigger.errors, trigger.result, trigger.obsids)
        )


def errors_of(answer: dict[str, Any]) -> str:
    return " | ".join(answer["errors"].values())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"source": json.dumps(["Moon"] * 101)}, "source: 101 values; at most 100 are allowed"),
        ({"source": [*["moon"] * 150]}, "source: 150 values; at most 100 are allowed"),
        ({"ra": json.dumps(list(range(101))), "dec": "-30"},
         "ra: 101 values; at most 100 are allowed"),
        ({"ra": "10", "dec": json.dumps([-30] * 101)},
         "dec: 101 values; at most 100 are allowed"),
        ({"alt": json.dumps([60] * 101), "az": "0"}, "alt: 101 values; at most 100 are allowed"),
        ({"alt": "60", "az": json.dumps([0] * 101)}, "az: 101 values; at most 100 are allowed"),
        ({"ra": "10", "dec": "-30", "freqspecs": json.dumps(["145,24"] * 25)},
         "freqspecs: 25 values; at most 24 are allowed"),
        ({"ra": "10", "dec": "-30", "subarrays": json.dumps(["all_ne"] * 9)},
         "subarrays: 9 values; at most 8 are allowed"),
        # Each list within its limit, too many in all.
        ({"ra": json.dumps([10] * 60), "dec": "-30", "alt": json.dumps([60] * 60), "az": "0"},
         "ra/dec, alt/az and source: 120 targets in all; at most 100 are allowed"),
    ],
)  # fmt: skip
def test_an_over_long_list_is_refused_naming_the_parameter_and_the_maximum(
    client: TestClient, params: dict[str, Any], message: str
) -> None:
    answer = post(client, {"project_id": "G0055", "secure_key": KEY, **params})
    assert answer["success"] is False
    assert message in errors_of(answer), answer["errors"]


def test_lists_at_their_maximum_are_read(client: TestClient) -> None:
    answer = post(client, {"project_id": "G0055", "secure_key": KEY, "nobs": "1",
                           "exptime": "8", "source": json.dumps(["Moon"] * 100),
                           "freqspecs": json.dumps(["145,24"] * 24)})  # fmt: skip
    assert "at most" not in errors_of(answer), answer["errors"]
    assert answer["params"]["sourcelist"] == ["Moon"] * 100


def test_the_reviewers_call_is_refused_and_stored_small(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    """An unknown project and thousands of Moons, as a JSON list: refused naming ``source``
    before any Moon is looked at, and stored (and answered) in a few KB."""
    data = {"project_id": "NOSUCH", "secure_key": "x", "source": json.dumps(["moon"] * 5000)}
    reply = client.post("/trigger/triggerobs", data=data)
    assert reply.status_code == 200
    answer = reply.json()
    assert answer["success"] is False
    assert "source: 5000 values; at most 100 are allowed" in errors_of(answer)
    assert len(reply.content) < SMALL_ROW_CHARS
    assert row_chars(session_factory, answer["trigger_id"]) < SMALL_ROW_CHARS


def test_thousands_of_repeated_fields_are_an_unreadable_form(client: TestClient) -> None:
    """50,000 ``source=moon`` fields: more fields than any trigger form, refused as such."""
    body = "project_id=NOSUCH&" + "&".join(["source=moon"] * 50_000)
    reply = client.post("/trigger/triggerobs", content=body,
                        headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert reply.status_code == 400
    assert reply.json()["error"] == (
        "the request body is a form of 50001 fields; at most 1000 are allowed"
    )


def test_a_refused_calls_long_values_and_many_errors_are_stored_cut_short(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    """What was sent is kept, cut to 1,000 characters with a marker; 50 errors at most."""
    long_name = "x" * 300_000
    answer = post(client, {
        "project_id": "G0055", "secure_key": KEY, "obsname": long_name,
        "creator": json.dumps(["c" * 1000] * 100),  # a list where one value is expected
        "ra": json.dumps([400.0] * 100), "dec": "-30",  # 100 errors: RA out of range
    })  # fmt: skip
    assert answer["success"] is False
    params, errors = answer["params"], answer["errors"]
    assert params["obsname"] == "x" * 1000 + "... (299000 more characters)"
    assert params["creator"].startswith('["ccc') and params["creator"].endswith("more characters)")
    assert (
        len(errors) == 51 and errors["50"].startswith("... and ") and "more errors" in errors["50"]
    )
    assert all(len(message) <= 1100 for message in errors.values())
    assert "obsname: 300000 characters; at most 60 are allowed" in errors_of(answer)
    assert row_chars(session_factory, answer["trigger_id"]) < SMALL_ROW_CHARS
    shown = client.get("/trigger/show", params={"trigger_id": answer["trigger_id"]}).json()
    assert shown["params"] == params and shown["errors"] == errors


def test_a_successful_calls_params_are_stored_whole(client: TestClient) -> None:
    """Its values were all checked: a list longer than 1,000 characters as JSON stays a list."""
    ras = [i + 0.123456 for i in range(100)]
    answer = post(client, {"project_id": "G0055", "secure_key": KEY, "nobs": "1", "exptime": "8",
                           "ra": json.dumps(ras), "dec": "-26.7", "pretend": "1"})  # fmt: skip
    assert answer["success"] is True, answer["errors"]
    assert len(json.dumps(ras)) > 1000 and answer["params"]["ralist"] == ras
