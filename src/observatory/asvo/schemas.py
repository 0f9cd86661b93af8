"""Shapes of the ASVO replies, as the clients decode them (specs/asvo.md section 3), and the
job submissions' form fields, as /docs shows them (sections 2.1 and 5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from observatory.asvo.models import JobState
from observatory.asvo.service import DEFAULT_CONVERSION_OUTPUT, DELIVERIES, VOLTAGE_DELIVERY
from observatory.core.openapi import DeclaredParameter, body_openapi
from observatory.preprocess.options import (
    COTTER_SWITCHES,
    DEFAULT_FLAG_EDGE_WIDTH_KHZ,
    LEGACY_KEYS,
    ConversionOptions,
    OutputFormat,
    PhaseCentre,
)


class SubmitResponse(BaseModel):
    """A successful submission: only the job id (error keys would look like a refusal)."""

    job_id: int


class ProductFile(BaseModel):
    """One delivered file: a signed URL for acacia, a path for scratch and dug."""

    model_config = ConfigDict(extra="allow")

    type: Literal["acacia", "scratch", "dug"]
    size: int
    url: str | None = None
    sha1: str | None = None
    blake3: str | None = None
    path: str | None = None


class Product(BaseModel):
    files: list[ProductFile]


class JobRow(BaseModel):
    """``row`` of a get_jobs element or websocket frame."""

    id: int
    job_type: int
    job_state: JobState
    user_id: int
    job_params: dict[str, Any]
    error_code: int | None
    error_text: str | None
    created: str | None
    started: str | None
    completed: str | None
    product: Product | None


class JobEnvelope(BaseModel):
    """The change-feed envelope the clients expect around each row."""

    action: Literal["INSERT", "UPDATE", "DELETE"]
    table: Literal["jobs"]
    row: JobRow


# ----------------------------------------------------------------------------------------------
# What /docs shows for the job submissions, which read their form by hand (specs/asvo.md
# sections 2.1 and 5). Deliveries, output formats, phase centres, conversion defaults and the
# older key names come from the parser's own tables; tests/asvo/test_asvo_openapi.py checks
# that the parser refuses a bad value of every key declared here and ignores every other key.

_BOOLEAN = {"type": "boolean"}
_INTEGER = {"type": "integer"}
_NUMBER = {"type": "number"}
_STRING = {"type": "string"}
_CHANNEL = {**_INTEGER, "minimum": 0, "maximum": 255}
_CONVERSION_DEFAULTS = ConversionOptions()

#: Every submission's keys.
COMMON_FIELDS = (
    DeclaredParameter(
        "obs_id",
        {**_STRING, "pattern": r"^[0-9]{10}$"},
        "The observation's 10-digit obsid.",
        required=True,
    ),
    DeclaredParameter(
        "delivery",
        {**_STRING, "enum": list(DELIVERIES)},
        "acacia: a download URL; scratch or dug: a directory.",
        default=DELIVERIES[0],
    ),
    DeclaredParameter(
        "delivery_format",
        {**_STRING, "enum": ["tar"]},
        "tar: scratch and dug get one tar of the files, not the files (acacia is always a tar).",
    ),
    DeclaredParameter(
        "allow_resubmit",
        _BOOLEAN,
        "Accept a duplicate of a completed job (queued and running ones are still refused).",
        default=False,
    ),
)

DOWNLOAD_VIS_FIELDS = (
    *COMMON_FIELDS,
    DeclaredParameter(
        "download_type",
        {**_STRING, "enum": ["vis", "vis_meta"]},
        "vis: the visibilities; vis_meta: the metafits with PPDs, and the flags.",
        required=True,
    ),
)

VOLTAGE_FIELDS = (
    *(
        DeclaredParameter(
            "delivery",
            {**_STRING, "enum": [VOLTAGE_DELIVERY]},
            "scratch: a directory (voltages are left on scratch only).",
            default=VOLTAGE_DELIVERY,
        )
        if field.name == "delivery"
        else field
        for field in COMMON_FIELDS
    ),
    DeclaredParameter(
        "offset",
        {**_INTEGER, "minimum": 0},
        "Seconds from the observation's start.",
        required=True,
    ),
    DeclaredParameter(
        "duration", {**_INTEGER, "minimum": 1}, "Seconds of voltages.", required=True
    ),
    DeclaredParameter(
        "channel_range",
        _BOOLEAN,
        "Only the receiver channels from_channel..to_channel.",
        default=False,
    ),
    DeclaredParameter("from_channel", _CHANNEL, "First receiver channel (with channel_range)."),
    DeclaredParameter(
        "to_channel", _CHANNEL, "Last receiver channel, inclusive (with channel_range)."
    ),
    DeclaredParameter("download_type", _STRING, "giant-squid sends volt; not read.", ignored=True),
)

#: The conversion options under their ASVO names (preprocess/options.py).
_CONVERSION_OPTIONS = (
    DeclaredParameter(
        "output",
        {**_STRING, "enum": [output.value for output in OutputFormat]},
        "uvfits, ms, or both (two files).",
        default=DEFAULT_CONVERSION_OUTPUT,
    ),
    DeclaredParameter(
        "avg_time_res",
        _NUMBER,
        "Seconds to average to, a whole multiple of the integration time (default: native).",
    ),
    DeclaredParameter(
        "avg_freq_res",
        _NUMBER,
        "kHz to average to, a whole multiple of the fine-channel width (default: native).",
    ),
    DeclaredParameter(
        "flag_edge_width",
        _NUMBER,
        "kHz flagged at each coarse-channel edge, a multiple of the fine-channel width; 0: none"
        f" (default: {DEFAULT_FLAG_EDGE_WIDTH_KHZ:g} kHz rounded up to whole fine channels).",
    ),
    DeclaredParameter("no_rfi", _BOOLEAN, "Skip AOFlagger's RFI flagging.", default=False),
    DeclaredParameter(
        "no_geometric_delay", _BOOLEAN, "Skip the geometric delay correction.", default=False
    ),
    DeclaredParameter(
        "no_cable_delay", _BOOLEAN, "Skip the cable delay correction.", default=False
    ),
    DeclaredParameter(
        "no_digital_gains", _BOOLEAN, "Skip the digital gain correction.", default=False
    ),
    DeclaredParameter(
        "no_passband_gains", _BOOLEAN, "Skip the passband gain correction.", default=False
    ),
    DeclaredParameter(
        "flag_dc", _BOOLEAN, "Flag the DC fine channel (default: for legacy-correlator data)."
    ),
    DeclaredParameter("no_flag_dc", _BOOLEAN, "true: do not flag the DC fine channel."),
    DeclaredParameter(
        "flagdcchannels", _BOOLEAN, "cotter's name: flag the DC fine channel (as flag_dc)."
    ),
    DeclaredParameter(
        "apply_di_cal",
        _BOOLEAN,
        "Apply the best direction-independent calibration solution.",
        default=False,
    ),
    DeclaredParameter(
        "centre",
        {**_STRING, "enum": [centre.value for centre in PhaseCentre]},
        "Phase centre: the metafits phase centre, the pointing centre, or custom.",
        default=_CONVERSION_DEFAULTS.centre.value,
    ),
    DeclaredParameter(
        "phase_centre_ra",
        {**_NUMBER, "minimum": 0, "maximum": 360},
        "Custom phase centre RA in degrees (ICRS).",
    ),
    DeclaredParameter(
        "phase_centre_dec",
        {**_NUMBER, "minimum": -90, "maximum": 90},
        "Custom phase centre Dec in degrees (ICRS).",
    ),
    DeclaredParameter(
        "centre_pointing", _BOOLEAN, "true: phase at the pointing centre (as centre=pointing)."
    ),
    DeclaredParameter(
        "centre_custom",
        _STRING,
        "Custom phase centre 'RA Dec' as cotter's -centre takes it: 18h33m41.89s -03d39m04.25s.",
    ),
    DeclaredParameter(
        "allow_missing",
        _BOOLEAN,
        "Convert even if some coarse channels have no files.",
        default=False,
    ),
)
_BY_NAME = {option.name: option for option in _CONVERSION_OPTIONS}

CONVERSION_FIELDS = (
    *COMMON_FIELDS,
    *_CONVERSION_OPTIONS,
    # The older names MWA users still have in their CSV files, as options.py maps them.
    *(
        replace(_BY_NAME[name], name=legacy, description=f"Older name of {name}.")
        for legacy, name in LEGACY_KEYS.items()
    ),
    # cotter's switches for what every conversion does or never offers (options.py).
    *(
        DeclaredParameter(
            key,
            _BOOLEAN,
            f"cotter's switch: {'only true' if supported else 'only false'} is accepted "
            f"({behaviour}).",
            default=False,
        )
        for key, (supported, behaviour) in COTTER_SWITCHES.items()
    ),
)

#: How a submission's body is read.
SUBMISSION_DESCRIPTION = (
    "Form fields, all strings (booleans true or false); unknown keys are ignored, as the "
    "clients send extra ones."
)


def submission_openapi(fields: Sequence[DeclaredParameter]) -> dict[str, Any]:
    """``openapi_extra`` of a job submission: ``fields`` as a form body.

    Parameters
    ----------
    fields
        The keys the submission reads.

    Returns
    -------
    dict
        The operation's ``requestBody``.
    """
    return body_openapi(fields, ("application/x-www-form-urlencoded",), SUBMISSION_DESCRIPTION)
