"""/docs for the ASVO job submissions: /openapi.json lists each one's form fields, and the
parser refuses a bad value of exactly the declared fields (so the two cannot drift).

The whole document's structure is checked in tests/trigger/test_trigger_openapi.py.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from fastapi.testclient import TestClient

from backends import sqlite_only
from observatory.app import create_app
from observatory.asvo import service
from observatory.asvo.schemas import (
    CONVERSION_FIELDS,
    DOWNLOAD_VIS_FIELDS,
    VOLTAGE_FIELDS,
    DeclaredParameter,
)
from observatory.core.config import Settings
from observatory.preprocess import options

MWAX_OBS = "1320409688"
VCS_OBS = 1320412440  # seeded with coarse channels 133 and 134, 16 s long
API_KEY = "test-key-of-alice"
#: Not a valid value of any field: the parser refuses it for every key it reads.
BAD_VALUE = "not-a-valid-value"
FORM = "application/x-www-form-urlencoded"

#: Each submission's declared fields and a form it accepts.
SUBMISSIONS: dict[str, tuple[tuple[DeclaredParameter, ...], dict[str, str]]] = {
    "conversion_job": (CONVERSION_FIELDS, {"obs_id": MWAX_OBS}),
    "download_vis_job": (DOWNLOAD_VIS_FIELDS, {"obs_id": MWAX_OBS, "download_type": "vis"}),
    "voltage_job": (
        VOLTAGE_FIELDS,
        {"obs_id": str(VCS_OBS), "offset": "0", "duration": "8", "channel_range": "true",
         "from_channel": "133", "to_channel": "134"},
    ),
}  # fmt: skip


@pytest.fixture
def client(seed_archive: Callable[[int, Mapping[str, str]], Settings]) -> Iterator[TestClient]:
    settings = seed_archive(VCS_OBS, {"alice": API_KEY})
    with TestClient(create_app(settings)) as test_client:
        reply = test_client.post("/api/api_login", auth=("mantaray-clientv2.0", API_KEY))
        assert reply.status_code == 200, reply.text
        yield test_client


@pytest.mark.parametrize("endpoint", sorted(SUBMISSIONS))
def test_each_submission_lists_its_form_fields(client: TestClient, endpoint: str) -> None:
    declared = SUBMISSIONS[endpoint][0]
    operation = client.get("/openapi.json").json()["paths"][f"/api/{endpoint}"]["post"]
    content = operation["requestBody"]["content"]
    assert set(content) == {FORM}
    schema = content[FORM]["schema"]
    assert schema["type"] == "object"
    assert list(schema["properties"]) == [field.name for field in declared]
    assert schema["required"] == [field.name for field in declared if field.required]
    for field in declared:
        listed = schema["properties"][field.name]
        assert listed["description"] == field.description
        assert listed["type"] == field.schema["type"]


def test_the_documented_fields_are_there(client: TestClient) -> None:
    """Spot checks against docs/asvo.md and specs/asvo.md sections 2.1 and 5."""
    paths = client.get("/openapi.json").json()["paths"]

    def fields(endpoint: str) -> dict[str, Any]:
        content = paths[f"/api/{endpoint}"]["post"]["requestBody"]["content"]
        properties: dict[str, Any] = content[FORM]["schema"]["properties"]
        return properties

    for endpoint in SUBMISSIONS:
        assert {"obs_id", "delivery", "delivery_format", "allow_resubmit"} <= set(fields(endpoint))
        deliveries = ["scratch"] if endpoint == "voltage_job" else ["acacia", "scratch", "dug"]
        assert fields(endpoint)["delivery"]["enum"] == deliveries
        assert fields(endpoint)["delivery"]["default"] == deliveries[0]
    assert fields("download_vis_job")["download_type"]["enum"] == ["vis", "vis_meta"]
    assert {"offset", "duration", "channel_range", "from_channel", "to_channel"} <= set(
        fields("voltage_job")
    )
    conversion = fields("conversion_job")
    assert {"output", "avg_time_res", "avg_freq_res", "flag_edge_width", "no_rfi",
            "no_geometric_delay", "no_cable_delay", "no_digital_gains", "no_passband_gains",
            "no_flag_dc", "apply_di_cal", "centre", "phase_centre_ra", "phase_centre_dec",
            "timeres", "freqres", "edgewidth", "conversion", "calibrate"} <= set(conversion)  # fmt: skip
    assert conversion["output"]["default"] == "ms"  # the ASVO's, not the engine's
    assert conversion["timeres"]["description"] == "Older name of avg_time_res."
    cancel = paths["/api/cancel_job"]["get"]["parameters"]
    assert [(p["name"], bool(p.get("description"))) for p in cancel] == [("job_id", True)]


def key_like_constants() -> set[str]:
    """Every string in the submission parser's modules that could be a form key.

    The conversion options are read after their keys are lower-cased and renamed
    (options.py), out of reach of a recording dict: so every candidate is tried instead.
    """
    return {
        node.value
        for module in (service, options)
        for node in ast.walk(ast.parse(inspect.getsource(module)))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"[a-z][a-z0-9_]*", node.value)
    }


@sqlite_only
def test_the_parser_reads_exactly_the_declared_fields(client: TestClient) -> None:
    """A bad value of a declared field is refused (error_code 0); of any other key, ignored.

    Every key the parser reads checks its value, so a key it reads but /docs does not
    declare is refused here, and a declared key it no longer reads is accepted. The first
    form of each submission is queued; the repeats that ignore the extra key are then
    duplicates (error_code 2), which counts as ignored.
    """
    candidates = key_like_constants()
    for endpoint, (declared, form) in SUBMISSIONS.items():
        assert client.post(f"/api/{endpoint}", data=form).status_code == 200
        refused = set()
        for key in candidates | {field.name for field in declared}:
            reply = client.post(f"/api/{endpoint}", data={**form, key: BAD_VALUE})
            assert reply.status_code in (200, 400), reply.text
            if reply.status_code == 400 and reply.json()["error_code"] == 0:
                refused.add(key)
        expected = {field.name for field in declared if not field.ignored}
        assert refused == expected, (
            f"{endpoint}: read but not declared {sorted(refused - expected)}, "
            f"declared but not read {sorted(expected - refused)}"
        )
