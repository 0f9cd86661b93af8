"""What ``/docs`` shows for the /trigger endpoints, which read their parameters by hand.

The handlers take one dict merged from the query string, a form and a JSON body
(params.py), so FastAPI cannot see which parameters they read: these tables tell it.
Defaults, subarray names, trigger modes, find's filters and its page size come from
the service's own tables, and tests/trigger/test_trigger_openapi.py checks that the
handlers read every parameter declared here and no other, so the two cannot drift.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from observatory.core.openapi import DeclaredParameter, body_openapi, query_openapi
from observatory.trigger import service
from observatory.trigger.models import TriggerMode

_BOOLEAN = {"type": "boolean"}
_INTEGER = {"type": "integer"}
_NUMBER = {"type": "number"}
_STRING = {"type": "string"}
_NUMBERS = {"type": "array", "items": _NUMBER}
_STRINGS = {"type": "array", "items": _STRING}
#: What a FITS header (a metafits) can hold.
_PRINTABLE_ASCII = "^[ -~]*$"
#: The handlers refuse negative durations.
_SECONDS = {**_NUMBER, "minimum": 0}


def _call_parameter(name: str, schema: Mapping[str, Any], description: str) -> DeclaredParameter:
    """A parameter of a trigger call, with the default the service takes when it is absent."""
    default = service.DEFAULTS.get(name)
    # DEFAULTS holds what the parser reads: one freqspec stands for a list of one, and
    # calibrator (a boolean or a name) is documented as text.
    if default is not None and schema["type"] == "array" and not isinstance(default, list):
        default = [default]
    if default is not None and schema["type"] == "string" and not isinstance(default, str):
        default = json.dumps(default)
    return DeclaredParameter(name, schema, description, default=default)


PRETTY = DeclaredParameter("pretty", _BOOLEAN, "Indent the JSON answer.")
SECURE_KEY = DeclaredParameter(
    "secure_key", _STRING, "The project's trigger password (checked in pretend mode too)."
)
PROJECT_ID = _call_parameter("project_id", _STRING, "The triggering project's code, e.g. G0055.")
PRETEND = _call_parameter("pretend", _BOOLEAN, "Do everything except change the schedule.")

#: triggerobs and triggervcs (docs/trigger.md, specs/trigger.md section 4.2).
TRIGGER_CALL = (
    PROJECT_ID,
    SECURE_KEY,
    PRETEND,
    _call_parameter(
        "ra",
        _NUMBERS,
        "J2000 RA in degrees: one value or a list (JSON, Python list or repeated key).",
    ),
    _call_parameter(
        "dec", _NUMBERS, "J2000 Dec in degrees, one per ra (one value is repeated against a list)."
    ),
    _call_parameter(
        "alt", _NUMBERS, "Altitude in degrees (0..90): one value or a list, paired with az."
    ),
    _call_parameter(
        "az", _NUMBERS, "Azimuth in degrees, one per alt (one value is repeated against a list)."
    ),
    _call_parameter(
        "source",
        _STRINGS,
        "Source names: catalogue calibrators, Crab, Vela, ..., or Sun, Moon, planets.",
    ),
    _call_parameter(
        "subarrays",
        {"type": "array", "items": {**_STRING, "enum": list(service.SUBARRAYS)}},
        "One subarray per target; the targets are then observed at once.",
    ),
    _call_parameter(
        "freqspecs",
        _STRINGS,
        "Coarse-channel specs: one or a list (121,24 or 121,24,3 or 101:112;141:152).",
    ),
    _call_parameter("nobs", _INTEGER, "Observations per target per freqspec."),
    _call_parameter("exptime", _INTEGER, "Seconds per observation, a multiple of 8."),
    _call_parameter(
        "calibrator",
        _STRING,
        "false, true (the highest standard calibrator above 30 deg), or a calibrator name.",
    ),
    _call_parameter(
        "calexptime",
        _INTEGER,
        "Seconds per calibrator observation (one per freqspec, after the targets).",
    ),
    _call_parameter(
        "freqres", _NUMBER, "Frequency resolution in kHz (give inttime too, or neither)."
    ),
    _call_parameter(
        "inttime", _NUMBER, "Integration time in seconds (give freqres too, or neither)."
    ),
    _call_parameter(
        "avoidsun", _BOOLEAN, "Point RA/Dec targets so that the Sun falls in a beam null."
    ),
    _call_parameter(
        "obsname",
        {**_STRING, "maxLength": service.MAX_OBSNAME_CHARS, "pattern": _PRINTABLE_ASCII},
        "Name recorded with the observations and in their metafits: printable ASCII, "
        f"at most {service.MAX_OBSNAME_CHARS} characters (calibrator observations' names too).",
    ),
    _call_parameter(
        "creator",
        {**_STRING, "maxLength": service.MAX_CREATOR_CHARS, "pattern": _PRINTABLE_ASCII},
        "Creator recorded with the observations: printable ASCII.",
    ),
    _call_parameter(
        "atten",
        {**_NUMBER, "minimum": 0, "maximum": service.MAX_ATTEN_DB},
        "Attenuation in dB, recorded with the observations.",
    ),
    _call_parameter(
        "groupid",
        {**_INTEGER, "minimum": 1},
        "Group id of the observations (group_id is read as groupid); default: the first obsid.",
    ),
    DeclaredParameter(
        "vcsmode",
        _BOOLEAN,
        "Posted by triggerservice.py; must agree with the endpoint (true for triggervcs).",
    ),
    PRETTY,
)

#: find's filters, by name: find lists them in the order of service.FIND_FILTERS.
_FIND_FILTERS = {
    parameter.name: parameter
    for parameter in (
        DeclaredParameter("trigger_id", _INTEGER, "Only this trigger call."),
        DeclaredParameter(
            "trigger_mode",
            {**_STRING, "enum": list(TriggerMode.__members__)},
            "Only calls of this mode.",
        ),
        DeclaredParameter(
            "pretend", _BOOLEAN, "Only pretend calls ('on', 'true' or non-zero) or only real ones."
        ),
        DeclaredParameter(
            "success",
            _BOOLEAN,
            "Only successful calls ('on', 'true' or non-zero) or only refused ones.",
        ),
        DeclaredParameter(
            "mintime_utc",
            {**_STRING, "format": "date-time"},
            "Calls made at or after this UTC time (ISOT).",
        ),
        DeclaredParameter(
            "maxtime_utc",
            {**_STRING, "format": "date-time"},
            "Calls made at or before this UTC time (ISOT).",
        ),
        DeclaredParameter("project_id", _STRING, "Only this project's calls."),
        DeclaredParameter("obsname", _STRING, "Observation name (% is a wildcard)."),
        DeclaredParameter("creator", _STRING, "Creator (% is a wildcard)."),
    )
}

#: What each endpoint reads, by the name of its path under /trigger.
ENDPOINT_PARAMETERS: dict[str, tuple[DeclaredParameter, ...]] = {
    "busy": (
        replace(
            PROJECT_ID,
            default=None,
            required=True,
            description="The project that would trigger, e.g. G0055.",
        ),
        DeclaredParameter(
            "obstime",
            _SECONDS,
            "Seconds from now that the project would take (0: this instant).",
            default=0,
        ),
        PRETTY,
    ),
    "obslist": (
        DeclaredParameter(
            "obstime",
            _SECONDS,
            "Seconds from now to list (0: the observation in progress).",
            default=0,
        ),
        DeclaredParameter(
            "current", _BOOLEAN, "Only the observation in progress (or the last to have started)."
        ),
        PRETTY,
    ),
    "vcsfree": (PRETTY,),
    "triggerobs": TRIGGER_CALL,
    "triggervcs": TRIGGER_CALL,
    "triggerbuffer": (
        PROJECT_ID,
        SECURE_KEY,
        PRETEND,
        DeclaredParameter(
            "start_time",
            _NUMBER,
            "GPS second to dump from; 0, or earlier than the buffer holds: as far back as it goes.",
            default=0,
        ),
        DeclaredParameter(
            "end_time", _NUMBER, "GPS second to stop capturing (may be in the past)."
        ),
        DeclaredParameter(
            "obstime", _SECONDS, "Without end_time: keep capturing until now + obstime seconds."
        ),
        PRETTY,
    ),
    "show": (
        DeclaredParameter(
            "trigger_id", _INTEGER, "The trigger_id a trigger call answered.", required=True
        ),
        PRETTY,
        DeclaredParameter("html", _STRING, "No effect: show always answers JSON.", ignored=True),
    ),
    "find": (
        *(_FIND_FILTERS[name] for name in service.FIND_FILTERS),
        DeclaredParameter(
            "pagesize",
            {**_INTEGER, "minimum": 1, "maximum": service.MAX_PAGE_SIZE},
            "Calls per page.",
            default=service.DEFAULT_PAGE_SIZE,
        ),
        DeclaredParameter("page", {**_INTEGER, "minimum": 1}, "Page number.", default=1),
        DeclaredParameter("desc", _STRING, "Newest first (any value, even none)."),
        DeclaredParameter("html", _STRING, "Answer with an HTML page (any value, even none)."),
        PRETTY,
        DeclaredParameter(
            "search",
            _STRING,
            "Sent by TraceT's links; read as any parameter is: results, not the search form.",
            ignored=True,
        ),
    ),
}

#: How a POST's body is read (params.py).
BODY_DESCRIPTION = (
    "Form fields or one JSON object, merged with the query string (the body wins on a clash): "
    "triggerservice.py sends project_id and obsname in the query string. A body that is not a "
    "JSON object is read as a form whatever its Content-Type says; one that is neither "
    "(another JSON value, text that is not name=value&..., bytes that are not UTF-8) is "
    "answered 400."
)
BODY_MEDIA_TYPES = (
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "application/json",
)


def get_openapi(endpoint: str) -> dict[str, Any]:
    """``openapi_extra`` of an endpoint's GET: its parameters in the query string."""
    return query_openapi(ENDPOINT_PARAMETERS[endpoint])


def post_openapi(endpoint: str) -> dict[str, Any]:
    """``openapi_extra`` of an endpoint's POST: its parameters as a form or JSON body."""
    return body_openapi(ENDPOINT_PARAMETERS[endpoint], BODY_MEDIA_TYPES, BODY_DESCRIPTION)
