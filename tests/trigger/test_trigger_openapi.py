"""/docs for the /trigger endpoints: /openapi.json is well formed, lists every endpoint's
parameters, and declares exactly the parameters the handlers read (so the two cannot drift).

The structure check covers the whole document, the /api endpoints' declarations included.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from observatory.app import create_app
from observatory.core.config import Settings
from observatory.core.openapi import DeclaredParameter
from observatory.trigger import router as trigger_router
from observatory.trigger.params import read_request_parameters
from observatory.trigger.schemas import BODY_MEDIA_TYPES, ENDPOINT_PARAMETERS

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PARAMETER_LOCATIONS = {"query", "header", "path", "cookie"}
JSON_TYPES = {"string", "number", "integer", "boolean", "array", "object", "null"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def openapi(tmp_path: Path) -> dict[str, Any]:
    """The app's /openapi.json (built without a database: the document needs none)."""
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path}/unused")
    reply = TestClient(create_app(settings)).get("/openapi.json")
    assert reply.status_code == 200
    document: dict[str, Any] = reply.json()
    return document


# ----------------------------------------------------------------------------------------------
# A valid document (openapi-spec-validator is not a dependency: the rules /docs relies on)


def _conforms(value: Any, json_type: str) -> bool:
    python_types: dict[str, type | tuple[type, ...]] = {
        "string": str, "number": (int, float), "integer": int, "boolean": bool,
        "array": list, "object": dict, "null": type(None),
    }  # fmt: skip
    if isinstance(value, bool) and json_type in ("number", "integer"):
        return False
    return isinstance(value, python_types[json_type])


def check_schema(schema: Mapping[str, Any], where: str) -> None:
    """A JSON Schema's types, items, required properties, defaults and enums agree."""
    json_type = schema.get("type")
    if isinstance(json_type, str):
        assert json_type in JSON_TYPES, where
        for value in [schema["default"]] if "default" in schema else []:
            assert _conforms(value, json_type), f"{where}: default {value!r} is not {json_type}"
        for value in schema.get("enum", []):
            assert _conforms(value, json_type), f"{where}: enum value {value!r} is not {json_type}"
    if json_type == "array":
        check_schema(schema["items"], f"{where}[]")
    for name, member in schema.get("properties", {}).items():
        check_schema(member, f"{where}.{name}")
    assert set(schema.get("required", [])) <= set(schema.get("properties", {})), where
    for keyword in ("anyOf", "oneOf", "allOf"):
        for index, member in enumerate(schema.get(keyword, [])):
            check_schema(member, f"{where}.{keyword}[{index}]")


def _references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        if isinstance(value.get("$ref"), str):
            yield value["$ref"]
        for member in value.values():
            yield from _references(member)
    elif isinstance(value, list):
        for member in value:
            yield from _references(member)


def test_the_document_is_valid_openapi(openapi: dict[str, Any]) -> None:
    assert openapi["openapi"].startswith("3.")
    assert openapi["info"]["title"] and openapi["info"]["version"]
    operation_ids = []
    for path, item in openapi["paths"].items():
        assert path.startswith("/"), path
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            assert method in HTTP_METHODS, where
            assert operation["responses"], where
            operation_ids.append(operation["operationId"])
            locations = [(p["name"], p["in"]) for p in operation.get("parameters", [])]
            assert len(locations) == len(set(locations)), f"{where}: a parameter twice"
            for parameter in operation.get("parameters", []):
                assert parameter["in"] in PARAMETER_LOCATIONS, where
                assert isinstance(parameter["name"], str) and parameter["name"], where
                if parameter["in"] == "path":
                    assert parameter["required"] is True and f"{{{parameter['name']}}}" in path
                check_schema(parameter["schema"], f"{where} {parameter['name']}")
            if "requestBody" in operation:
                content = operation["requestBody"]["content"]
                assert content, where
                for media_type, media in content.items():
                    check_schema(media["schema"], f"{where} {media_type}")
    assert len(operation_ids) == len(set(operation_ids)), "operation ids must be unique"
    schemas = openapi.get("components", {}).get("schemas", {})
    for reference in set(_references(openapi)):
        assert reference.startswith("#/components/schemas/"), reference
        assert reference.removeprefix("#/components/schemas/") in schemas, reference


# ----------------------------------------------------------------------------------------------
# Every endpoint lists its parameters


def test_every_trigger_endpoint_is_declared(openapi: dict[str, Any]) -> None:
    documented = {path.removeprefix("/trigger/") for path in openapi["paths"] if path.startswith("/trigger/")}  # fmt: skip
    assert documented == set(ENDPOINT_PARAMETERS)
    assert documented == {
        "busy", "obslist", "vcsfree", "triggerobs", "triggervcs", "triggerbuffer", "find", "show"
    }  # fmt: skip


@pytest.mark.parametrize("endpoint", sorted(ENDPOINT_PARAMETERS))
def test_get_lists_the_query_parameters(openapi: dict[str, Any], endpoint: str) -> None:
    declared = ENDPOINT_PARAMETERS[endpoint]
    listed = openapi["paths"][f"/trigger/{endpoint}"]["get"]["parameters"]
    assert [p["name"] for p in listed] == [p.name for p in declared]
    for parameter, entry in zip(declared, listed, strict=True):
        assert entry["in"] == "query"
        assert entry["required"] is parameter.required
        assert entry["description"] == parameter.description
        assert entry["schema"]["type"] == parameter.schema["type"]


@pytest.mark.parametrize("endpoint", sorted(ENDPOINT_PARAMETERS))
def test_post_lists_the_body_fields(openapi: dict[str, Any], endpoint: str) -> None:
    declared = ENDPOINT_PARAMETERS[endpoint]
    body = openapi["paths"][f"/trigger/{endpoint}"]["post"]["requestBody"]
    assert set(body["content"]) == set(BODY_MEDIA_TYPES)
    assert "query string" in body["description"]
    for media in body["content"].values():
        schema = media["schema"]
        assert schema["type"] == "object"
        assert list(schema["properties"]) == [p.name for p in declared]
        assert schema.get("required", []) == [p.name for p in declared if p.required]
        for parameter in declared:
            field = schema["properties"][parameter.name]
            assert field["description"] == parameter.description
            assert field["type"] == parameter.schema["type"]


def test_the_documented_parameters_are_there(openapi: dict[str, Any]) -> None:
    """Spot checks against docs/trigger.md's tables."""

    def listed(endpoint: str) -> dict[str, dict[str, Any]]:
        parameters = openapi["paths"][f"/trigger/{endpoint}"]["get"]["parameters"]
        return {p["name"]: p for p in parameters}

    busy = listed("busy")
    assert busy["project_id"]["required"] and busy["obstime"]["schema"]["default"] == 0
    triggerobs = listed("triggerobs")
    assert {"ra", "dec", "alt", "az", "source", "subarrays", "freqspecs", "nobs", "exptime",
            "calibrator", "calexptime", "freqres", "inttime", "avoidsun", "obsname", "creator",
            "atten", "groupid", "secure_key", "pretend"} <= set(triggerobs)  # fmt: skip
    assert triggerobs["pretend"]["schema"]["default"] is True
    assert triggerobs["freqspecs"]["schema"]["default"] == ["145,24"]
    assert triggerobs["nobs"]["schema"]["default"] == 15
    assert "all_ne" in triggerobs["subarrays"]["schema"]["items"]["enum"]
    assert set(listed("triggerbuffer")) >= {"start_time", "end_time", "obstime"}
    assert listed("show")["trigger_id"]["required"]
    find = listed("find")
    assert find["trigger_mode"]["schema"]["enum"] == ["MWAX_CORRELATOR", "MWAX_VCS", "BUFFER"]
    assert find["pagesize"]["schema"]["default"] == 200


# ----------------------------------------------------------------------------------------------
# No drift: the handlers read exactly the declared parameters


#: Other names of a declared parameter, read under them too: ``group_id`` (what
#: triggerservice.py posts) is ``groupid``, looked up to refuse the two given different values.
ALIASES = {"group_id": "groupid"}


class RecordingParameters(dict[str, Any]):
    """Merged parameters that note every name a handler (or the service) looks up."""

    def __init__(self, items: Mapping[str, Any], read: set[str]) -> None:
        super().__init__(items)
        self.read = read

    def _note(self, key: object) -> None:
        self.read.add(ALIASES.get(str(key), str(key)))

    def __getitem__(self, key: str) -> Any:
        self._note(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self._note(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._note(key)
        return super().__contains__(key)


def sample(parameter: DeclaredParameter) -> str:
    """A value of the declared type: enough to make the handler read the parameter."""
    schema = parameter.schema["items"] if parameter.schema["type"] == "array" else parameter.schema
    if "enum" in schema:
        return str(schema["enum"][0])
    if schema.get("format") == "date-time":
        return "2026-01-01T00:00:00"
    return {"boolean": "true", "integer": "1", "number": "1"}.get(schema["type"], "x")


def test_handlers_read_exactly_the_declared_parameters(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each endpoint is called without parameters, with all of them, and with each alone;
    the names looked up must be the declared ones, less those declared ignored.

    The endpoints run in ENDPOINT_PARAMETERS' order: show then finds a trigger call to read.
    """
    read: set[str] = set()

    async def recording_read(request: Request) -> dict[str, Any]:
        return RecordingParameters(await read_request_parameters(request), read)

    monkeypatch.setattr(trigger_router, "read_request_parameters", recording_read)
    for endpoint, declared in ENDPOINT_PARAMETERS.items():
        every = {parameter.name: sample(parameter) for parameter in declared}
        calls = [{}, every, *({name: value} for name, value in every.items())]
        looked_up: set[str] = set()
        for index, params in enumerate(calls):
            read.clear()
            # Both ways in: the query string (GET) and a form (POST).
            if index % 2:
                reply = client.post(f"/trigger/{endpoint}", data=params)
            else:
                reply = client.get(f"/trigger/{endpoint}", params=params)
            assert reply.status_code < 500, reply.text
            looked_up |= read
        expected = {parameter.name for parameter in declared if not parameter.ignored}
        assert looked_up == expected, (
            f"{endpoint}: read but not declared {sorted(looked_up - expected)}, "
            f"declared but not read {sorted(expected - looked_up)}"
        )
