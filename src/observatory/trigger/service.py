"""Triggering: who may interrupt the schedule, and the observations a trigger puts in it.

The schedule is the ``observations`` table. A trigger is read and planned first
(targets, pointings, calibrators: no locks held), then, unless it is pretend,
the schedule is locked, the override policy checked against what is there, the
overridden observations truncated or deleted and the new ones inserted, and the
trigger recorded, in one transaction. Every call is recorded, refused and
pretend ones too (``find`` / ``show``), and every handled outcome is a JSON
reply with ``success`` and ``errors`` (specs/trigger.md sections 4 and 7).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, TypeVar, cast

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Table, delete, exists, func, select, update
from sqlalchemy.orm import Session

from observatory.archive.models import FileKind, Observation, ObservationFile
from observatory.archive.service import take_schedule_lock
from observatory.core.accounts import check_project_key
from observatory.core.config import Settings
from observatory.core.database import MAX_SQL_ID, MAX_SQL_INTEGER
from observatory.core.gpstime import gps_to_utc_iso, now_gps_precise
from observatory.core.models import Project
from observatory.core.text import is_ascii_digits
from observatory.telescope import catalogue, sky
from observatory.telescope.freqspec import FreqspecError, coarse_channel_centre_mhz, parse_freqspec
from observatory.telescope.instrument import (
    DIPOLE_OFF_DELAY,
    MAX_COARSE_CHANS,
    MAX_METAFITS_NAME_CHARS,
    MWAX_SUBOBS_S,
    full_band_vcs_s,
    subarray_tiles,
    validate_coarse_chans,
    validate_fine_chan_width_hz,
    validate_int_time_ms,
)
from observatory.trigger import pointing
from observatory.trigger.models import Trigger, TriggerMode
from observatory.trigger.params import (
    ParameterError,
    as_bool,
    as_float_list,
    as_number,
    as_str_list,
    as_text,
    conflicting_group_ids,
    decode_value,
    echo_text,
    is_blank,
    is_bool_word,
    present,
)

T = TypeVar("T")

#: Observations start and stop on multiples of this many GPS seconds...
BOUNDARY_S = 8
#: ...and no sooner than this after the request (M&C sends configurations ahead).
LEAD_S = 4
#: A VCS observation followed by a correlator one needs a gap for the mode change.
MODE_CHANGE_GAP_S = 8
#: Modes that write voltages to the VCS disk (a capture in progress is never interrupted).
VCS_MODES = frozenset({"MWAX_VCS", "VOLTAGE_START", "VOLTAGE_BUFFER"})
#: Modes that hold voltages in memory, ready for triggerbuffer to dump.
BUFFER_MODES = frozenset({"MWAX_BUFFER", "VOLTAGE_BUFFER"})
SUBARRAYS = (
    "all_north",
    "all_south",
    "all_east",
    "all_west",
    "all_ne",
    "all_nw",
    "all_se",
    "all_sw",
)
#: All-sky voltage capture: one dipole per tile, the others switched off.
ALL_SKY_DELAYS = (0,) + (DIPOLE_OFF_DELAY,) * 15
MAX_ATTEN_DB = 31.75

#: DESIGN: the longest a trigger may observe (targets, repeats, freqspecs and calibrators in
#: all); nothing in the real system's documents says, and a longer one only blocks the schedule.
MAX_TRIGGER_S = 2 * 86400

#: The longest observation name: the telescope writes it into the metafits (FILENAME),
#: so an observation with a longer name could be scheduled but never recorded.
#: Calibrator observations' and buffer dumps' names, made from it, must fit too.
MAX_OBSNAME_CHARS = MAX_METAFITS_NAME_CHARS
#: The width of the ``creator`` and ``project_id`` columns.
MAX_CREATOR_CHARS = 100
MAX_PROJECT_ID_CHARS = 20
BUFFER_DUMP_SUFFIX = " buffer dump"

#: DESIGN: the most targets one trigger may name: in each of ``ra``, ``dec``, ``alt``,
#: ``az`` and ``source``, and in all. The real system schedules at most tens of
#: observations per call (TraceT's gravitational-wave follow-up: four pointings), and
#: every value is work before anything is checked (a body's position, a name looked up);
#: a list of 50,000 sources took seconds and was stored whole. Like MAX_TRIGGER_S, nothing
#: in the real system's documents says.
MAX_TARGETS = 100
#: DESIGN: the most freqspecs: the 256 coarse channels hold ten separate 24-channel bands;
#: this leaves room for overlapping and picket-fence ones.
MAX_FREQSPECS = 24
#: A refused call is stored (and answered, and served by find and show) with what was
#: sent, which may be anything: each of its values (as JSON, if not text) and error
#: messages is cut to this many characters, with a marker saying how much was left out...
MAX_RECORDED_CHARS = 1000
#: ...and its errors after this many: a row of a refused call stays some tens of KB.
MAX_RECORDED_ERRORS = 50

DEFAULTS: dict[str, Any] = {
    "project_id": "C001",
    "pretend": True,
    "calibrator": False,
    "calexptime": 120,
    "freqspecs": "145,24",
    "creator": "djmwa/trigger",
    "freqres": 10.0,
    "inttime": 0.5,
    "avoidsun": False,
    "obsname": "trigger",
    "exptime": 120,
    "nobs": 15,
    "atten": 1.0,
}


# -- reading a request ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Something to point at: J2000 RA/Dec, a fixed alt/az, or nothing (all-sky VCS)."""

    kind: str  # "radec" | "azel" | "allsky"
    label: str
    ra_deg: float | None = None
    dec_deg: float | None = None
    az_deg: float | None = None
    el_deg: float | None = None
    #: A solar-system body (``pointing.BODIES``): it moves, so each observation points
    #: where it is then, seen from the MWA; ``ra_deg``/``dec_deg`` are where it was
    #: when the trigger was made.
    body: str | None = None


#: The parameters that name targets; ``triggervcs`` without any of them captures the whole sky.
TARGET_PARAMETERS = ("ra", "dec", "alt", "az", "source")

#: The wiki's defaults of ``freqres`` (kHz) and ``inttime`` (s).
DEFAULT_FREQ_RES_KHZ = 10.0
DEFAULT_INT_TIME_S = 0.5


@dataclass
class TriggerRequest:
    """A trigger call, read and checked; ``errors`` lists everything wrong with it."""

    vcs: bool
    project_id: str = "C001"
    secure_key: str | None = None
    pretend: bool = True
    targets: list[Target] = field(default_factory=list)
    subarrays: list[str] = field(default_factory=list)
    freqspecs: list[tuple[str, list[int]]] = field(default_factory=list)
    nobs: int = 15
    exptime_s: int = 120
    #: False, True (the best standard calibrator then), or the one asked for by name.
    calibrator: bool | catalogue.Source = False
    calexptime_s: int = 120
    freq_res_khz: float | None = DEFAULT_FREQ_RES_KHZ
    int_time_s: float | None = DEFAULT_INT_TIME_S
    avoidsun: bool = False
    obsname: str = "trigger"
    creator: str = "djmwa/trigger"
    atten_db: float = 1.0
    groupid: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Whether ``project_id`` could be read at all (else its error says why, and no
    #: second error about an unknown project ``["G0055"]`` is added).
    project_readable: bool = True

    @property
    def mode(self) -> str:
        return "MWAX_VCS" if self.vcs else "MWAX_CORRELATOR"


def read_trigger_request(raw: Mapping[str, Any], *, vcs: bool, when_gps: int) -> TriggerRequest:
    """Parse triggerobs / triggervcs parameters, collecting every error (never raising)."""
    request = TriggerRequest(vcs=vcs)
    errors = request.errors

    def get(name: str) -> Any:
        return raw[name] if present(raw, name) else DEFAULTS.get(name)

    def attempt(name: str, parse: Any) -> Any:
        try:
            return parse()
        except (ParameterError, FreqspecError, catalogue.UnknownSourceError, ValueError) as exc:
            errors.append(str(exc) if str(exc).startswith(name) else f"{name}: {exc}")
            return None

    _read_who(request, raw)
    # A pretend that cannot be read stays pretend: an error must never trigger for real.
    request.pretend = attempt(
        "pretend", lambda: as_bool("pretend", get("pretend"), default=True)
    ) is not False  # fmt: skip
    # Names end up in the metafits: refused here, before anything changes, if it cannot
    # hold them (a refused call records what was sent, as text).
    request.obsname = attempt("obsname", lambda: as_text(
        "obsname", get("obsname"), max_chars=MAX_OBSNAME_CHARS, printable_ascii=True
    )) or echo_text(get("obsname"))  # fmt: skip
    request.creator = attempt("creator", lambda: as_text(
        "creator", get("creator"), max_chars=MAX_CREATOR_CHARS, printable_ascii=True
    )) or echo_text(get("creator"))  # fmt: skip
    if present(raw, "vcsmode"):  # triggerservice.py posts it; it must agree with the endpoint
        vcsmode = attempt("vcsmode", lambda: as_bool("vcsmode", raw["vcsmode"], default=vcs))
        if vcsmode is not None and vcsmode != vcs:
            errors.append(
                f"vcsmode: {raw['vcsmode']!r} asks for "
                f"{'a voltage capture' if vcsmode else 'correlator observations'}, but this is "
                f"{'triggervcs' if vcs else 'triggerobs'} "
                f"(use {'triggervcs' if vcsmode else 'triggerobs'})"
            )
    request.avoidsun = bool(
        attempt("avoidsun", lambda: as_bool("avoidsun", get("avoidsun"), default=False))
    )
    nobs = attempt("nobs", lambda: as_number("nobs", get("nobs"), integer=True))
    if nobs is not None and nobs < 1:
        errors.append(f"nobs: {nobs} is not at least 1 observation")
    request.nobs = int(nobs or 1)
    request.exptime_s = _exposure(request, "exptime", get("exptime"))
    atten = attempt("atten", lambda: as_number("atten", get("atten")))
    if atten is not None and not 0.0 <= atten <= MAX_ATTEN_DB:
        errors.append(f"atten: {atten} dB is outside 0..{MAX_ATTEN_DB} dB")
    request.atten_db = float(atten if atten is not None else 1.0)
    if conflict := conflicting_group_ids(raw):
        errors.append(conflict)
    elif present(raw, "groupid"):  # group_id is merged into it (params.merge_request_parameters)
        groupid = attempt("groupid", lambda: as_number("groupid", raw["groupid"], integer=True))
        # A group is named by the obsid (GPS start) of its first observation. It need not
        # exist any more: a follow-up trigger may have replaced the first one's observations.
        if groupid is not None and groupid < 1:
            errors.append(f"groupid: {groupid} is not an obsid (the GPS start of the group's "
                          "first observation, a positive number)")  # fmt: skip
        request.groupid = int(groupid) if groupid and groupid > 0 else None

    # freqres and inttime: the client sends both or neither; the wiki gives each its own
    # default, which one given alone is paired with.
    freqres = attempt("freqres", lambda: as_number("freqres", get("freqres")))
    inttime = attempt("inttime", lambda: as_number("inttime", get("inttime")))
    if present(raw, "freqres") != present(raw, "inttime"):
        freqres = DEFAULT_FREQ_RES_KHZ if not present(raw, "freqres") else freqres
        inttime = DEFAULT_INT_TIME_S if not present(raw, "inttime") else inttime
    if freqres is not None:
        attempt("freqres", lambda: validate_fine_chan_width_hz(freqres * 1000.0))
    if inttime is not None:
        attempt("inttime", lambda: validate_int_time_ms(inttime * 1000.0))
    request.freq_res_khz, request.int_time_s = freqres, inttime

    specs = attempt("freqspecs", lambda: as_str_list(
        "freqspecs", get("freqspecs"), max_items=MAX_FREQSPECS
    ))  # fmt: skip
    for spec in specs or []:
        channels = attempt("freqspecs", lambda spec=spec: parse_freqspec(spec))
        if channels is None:
            continue
        # A freqspec may name channel 0, which no receiver has: the telescope could not
        # record the observation (its metafits and data), so it is refused now.
        try:
            validate_coarse_chans(channels)
        except ValueError as exc:
            errors.append(f"freqspecs: {spec!r} cannot be observed: {exc}")
            continue
        request.freqspecs.append((spec, channels))
    if specs == []:
        errors.append("freqspecs: no frequency specification given")

    request.targets = _read_targets(raw, errors, when_gps)
    if not request.targets and not vcs:
        errors.append("no target: give ra and dec, alt and az, or source")
    if not request.targets and vcs:
        request.targets = [Target("allsky", "all sky", az_deg=0.0, el_deg=90.0)]
    if present(raw, "subarrays"):
        # One per target, and no two may share tiles: never more than there are subarrays.
        names = attempt("subarrays", lambda: as_str_list(
            "subarrays", raw["subarrays"], max_items=len(SUBARRAYS)
        )) or []  # fmt: skip
        unknown = [name for name in names if name not in SUBARRAYS]
        if unknown:
            errors.append(f"subarrays: unknown subarray {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(SUBARRAYS)})")  # fmt: skip
        elif names and len(names) != len(request.targets):
            errors.append(f"subarrays: {len(names)} subarrays for {len(request.targets)} targets "
                          "(give one subarray per target)")  # fmt: skip
        else:
            # All targets are observed at once: no tile can point at two of them.
            tiles = subarray_tiles()
            shared = [
                (a, b) for i, a in enumerate(names) for b in names[i + 1 :]
                if set(tiles[a]) & set(tiles[b])
            ]  # fmt: skip
            if shared:
                errors.append("subarrays: " + "; ".join(
                    f"{a} and {b} share tiles" for a, b in shared
                ) + " (the targets are observed at once, each by its own tiles)")  # fmt: skip
        request.subarrays = names

    calibrator = get("calibrator")
    if is_bool_word(calibrator):
        request.calibrator = bool(attempt(
            "calibrator", lambda: as_bool("calibrator", calibrator, default=False)
        ))  # fmt: skip
        asks_for_calibrator = request.calibrator
    else:
        name = str(decode_value(calibrator)).strip()
        asks_for_calibrator = bool(name)
        named = attempt("calibrator", lambda: catalogue.resolve(name))
        if named is not None:  # resolved once: the name resolver may have been asked online
            request.calibrator = named
    if asks_for_calibrator:  # unread without a calibrator (clients send their default)
        request.calexptime_s = _exposure(request, "calexptime", get("calexptime"))

    targets_in_turn = 1 if request.subarrays else len(request.targets)
    total_s = len(request.freqspecs) * (
        targets_in_turn * request.nobs * request.exptime_s
        + (request.calexptime_s if request.calibrator else 0)
    )
    if total_s > MAX_TRIGGER_S:
        errors.append(f"the trigger would observe for {total_s} s, more than the "
                      f"{MAX_TRIGGER_S} s (2 days) one trigger may take")  # fmt: skip

    request.params = {
        "project_id": request.project_id, "pretend": request.pretend,
        "ralist": [t.ra_deg for t in request.targets if t.kind == "radec"],
        "declist": [t.dec_deg for t in request.targets if t.kind == "radec"],
        "altlist": [t.el_deg for t in request.targets if t.kind == "azel"],
        "azlist": [t.az_deg for t in request.targets if t.kind == "azel"],
        "sourcelist": _names_given(raw),
        "subarrays": request.subarrays, "freqspecs": [spec for spec, _ in request.freqspecs],
        "creator": request.creator, "obsname": request.obsname, "nobs": request.nobs,
        "exptime": request.exptime_s,
        "calibrator": request.calibrator if isinstance(request.calibrator, bool)
        else request.calibrator.name,
        "calexptime": request.calexptime_s, "freqres": request.freq_res_khz,
        "inttime": request.int_time_s, "avoidsun": request.avoidsun, "atten": request.atten_db,
        "groupid": request.groupid, "vcsmode": vcs,
    }  # fmt: skip
    return request


def _read_who(request: TriggerRequest, raw: Mapping[str, Any]) -> None:
    """``project_id`` (default C001) and ``secure_key``: one text value each, else an error.

    A list or object is never turned into its repr and looked up as a project.
    """
    value = raw["project_id"] if present(raw, "project_id") else DEFAULTS["project_id"]
    try:
        request.project_id = as_text(
            "project_id", value, max_chars=MAX_PROJECT_ID_CHARS, printable_ascii=True
        )
    except ParameterError as exc:
        request.errors.append(str(exc))
        request.project_id, request.project_readable = echo_text(value), False
    if present(raw, "secure_key"):
        key = raw["secure_key"]
        if isinstance(key, list | tuple | dict):  # never echoed: it may hold the key
            request.errors.append("secure_key: give one value, the project's key")
        else:
            request.secure_key = echo_text(key)


def _authenticate_request(
    session: Session, request: TriggerRequest
) -> tuple[Project | None, str | None]:
    """:func:`authenticate`, unless ``project_id`` could not be read (its error is there)."""
    if not request.project_readable:
        return None, None
    return authenticate(session, request.project_id, request.secure_key)


def _exposure(request: TriggerRequest, name: str, value: Any) -> int:
    """An exposure in seconds, a positive multiple of 8.

    Another length is an error, except in pretend mode, where it is planned
    rounded up and reported as a warning: TraceT checks a project's key with a
    pretend call of ``exptime=900``, which must succeed.
    """
    try:
        seconds = as_number(name, value, integer=True)
    except ParameterError as exc:
        request.errors.append(str(exc))
        return BOUNDARY_S
    if seconds >= BOUNDARY_S and seconds % BOUNDARY_S == 0:
        return int(seconds)
    if seconds <= 0:  # never schedulable: an error in pretend mode too
        request.errors.append(f"{name}: {value} s must be a positive multiple of {BOUNDARY_S} s")
        return BOUNDARY_S
    rounded = max(BOUNDARY_S, math.ceil(seconds / BOUNDARY_S) * BOUNDARY_S)
    message = f"{name}: {value} s is not a positive multiple of {BOUNDARY_S} s"
    _problem(request, message if not request.pretend else f"{message} (planned as {rounded} s)")
    return rounded


def _read_targets(raw: Mapping[str, Any], errors: list[str], when_gps: int) -> list[Target]:
    """RA/Dec targets first, then alt/az, then named sources (triggerservice.py's order).

    A target parameter sent blank (only spaces) or naming no source is an error: read as
    not given, it would turn a targeted ``triggervcs`` into an all-sky capture. Left
    out (or empty, ``None``, ``null``: a client's unset argument) it is not given.
    """
    targets: list[Target] = []
    for name in TARGET_PARAMETERS:
        if is_blank(raw.get(name)):
            errors.append(f"{name}: {raw[name]!r} is blank (nothing but spaces); give a value, "
                          f"or leave {name} out")  # fmt: skip
    for first, second, kind in (("ra", "dec", "radec"), ("alt", "az", "azel")):
        if not (present(raw, first) or present(raw, second)):
            continue
        if not (present(raw, first) and present(raw, second)):
            errors.append(f"{first} and {second} must be given together")
            continue
        try:
            firsts = as_float_list(first, raw[first], max_items=MAX_TARGETS)
            seconds = as_float_list(second, raw[second], max_items=MAX_TARGETS)
        except ParameterError as exc:
            errors.append(str(exc))
            continue
        # One value is broadcast against a list, as triggerservice.py documents.
        if len(firsts) == 1 and len(seconds) > 1:
            firsts *= len(seconds)
        if len(seconds) == 1 and len(firsts) > 1:
            seconds *= len(firsts)
        if len(firsts) != len(seconds):
            errors.append(f"{first} and {second} must have the same number of values "
                          f"({len(firsts)} {first}, {len(seconds)} {second})")  # fmt: skip
            continue
        for a, b in zip(firsts, seconds, strict=True):
            if kind == "radec":
                if not (0.0 <= a < 360.0 and -90.0 <= b <= 90.0):
                    errors.append(f"ra/dec ({a}, {b}): RA must be 0..360 and Dec -90..90 degrees")
                    continue
                targets.append(Target("radec", f"RA {a:.4f} Dec {b:.4f}", ra_deg=a, dec_deg=b))
            else:
                if not 0.0 <= a <= 90.0:
                    errors.append(f"alt {a}: must be 0..90 degrees")
                    continue
                targets.append(
                    Target("azel", f"Alt {a:.4f} Az {b % 360:.4f}", az_deg=b % 360, el_deg=a)
                )
    if present(raw, "source"):
        try:
            names = as_str_list("source", raw["source"], max_items=MAX_TARGETS, blank_ok=False)
        except ParameterError as exc:
            errors.append(str(exc))
            names = []
        else:
            if not names:  # an empty list: no source named, where one was asked for
                errors.append(f"source: {echo_text(raw['source'])} names no source; give a "
                              "name, or leave source out")  # fmt: skip
        for name in names:
            if name.lower() in pointing.BODIES:
                ra, dec = pointing.body_radec(name, when_gps)
                targets.append(Target("radec", name, ra_deg=ra, dec_deg=dec, body=name.lower()))
                continue
            try:
                source = catalogue.resolve(name)
            except catalogue.UnknownSourceError as exc:
                errors.append(f"source: {exc} (and the online name resolver is not enabled)")
                continue
            targets.append(
                Target("radec", source.name, ra_deg=source.ra_deg, dec_deg=source.dec_deg)
            )
    if len(targets) > MAX_TARGETS:
        errors.append(f"ra/dec, alt/az and source: {len(targets)} targets in all; at most "
                      f"{MAX_TARGETS} are allowed")  # fmt: skip
    return targets


# -- planning -------------------------------------------------------------------------------


def first_start_gps(now: float) -> int:
    """The earliest start a trigger can have: an 8-s boundary at least 4 s after now."""
    return int(math.ceil((now + LEAD_S) / BOUNDARY_S) * BOUNDARY_S)


@dataclass
class PlannedObservation:
    """An observation a trigger will insert."""

    obsid: int
    stoptime: int
    obsname: str
    mode: str
    spec: str
    coarse_chans: list[int]
    target: Target
    calibration: bool = False
    calibrator_source: str | None = None
    pointings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def midpoint_gps(self) -> float:
        return (self.obsid + self.stoptime) / 2.0


@cache
def subarray_sizes() -> dict[str, int]:
    """Tiles in each named subarray."""
    return {name: len(tiles) for name, tiles in subarray_tiles().items()}


def plan(request: TriggerRequest, start_gps: int, settings: Settings) -> list[PlannedObservation]:
    """The observations of a trigger, back to back from ``start_gps``, pointed.

    Without subarrays each target is observed in turn, at each freqspec, ``nobs``
    times; with subarrays all targets are observed at once. Calibrators follow,
    one per freqspec (after a mode-change gap when the targets were VCS).
    Problems (a target below the horizon, no calibrator up) go to
    ``request.errors``, or to ``request.warnings`` in pretend mode.
    """
    planned: list[PlannedObservation] = []
    clock = start_gps

    def add(target: Target, spec: str, channels: list[int], seconds: int, **extra: Any) -> None:
        nonlocal clock
        mode = extra.pop("mode", request.mode)
        planned.append(PlannedObservation(clock, clock + seconds, extra.pop("obsname", request.obsname),
                                          mode, spec, channels, target, **extra))  # fmt: skip
        clock += seconds

    if request.subarrays:
        for spec, channels in request.freqspecs:
            for _ in range(request.nobs):
                add(request.targets[0], spec, channels, request.exptime_s)
    else:
        for target in request.targets:
            for spec, channels in request.freqspecs:
                for _ in range(request.nobs):
                    add(target, spec, channels, request.exptime_s)
    if request.calibrator:
        if request.vcs:
            clock += MODE_CHANGE_GAP_S
        for spec, channels in request.freqspecs:
            midpoint = clock + request.calexptime_s / 2.0
            if request.calibrator is True:
                best = pointing.best_calibrator(
                    midpoint, min_el_deg=settings.trigger_calibrator_min_elevation_deg,
                    sun_exclusion_deg=settings.trigger_sun_exclusion_deg,
                )  # fmt: skip
                if best is None:
                    _problem(request, f"no standard calibrator is above "
                             f"{settings.trigger_calibrator_min_elevation_deg} deg at "
                             f"{gps_to_utc_iso(midpoint)}")  # fmt: skip
                    continue
                source = best[0]
            else:
                source = request.calibrator
            target = Target("radec", source.name, ra_deg=source.ra_deg, dec_deg=source.dec_deg)
            add(target, spec, channels, request.calexptime_s, mode="MWAX_CORRELATOR",
                obsname=calibrator_observation_name(request.obsname, source.name, spec),
                calibration=True, calibrator_source=source.name)  # fmt: skip
    _point(request, planned, settings)
    return planned


def _problem(request: TriggerRequest, message: str) -> None:
    (request.warnings if request.pretend else request.errors).append(message)


def _point(request: TriggerRequest, planned: list[PlannedObservation], settings: Settings) -> None:
    """Give every observation (and subarray) its grid pointing, checking the horizon."""
    if not planned:
        return
    jobs: list[tuple[PlannedObservation, Target, str | None]] = []
    for observation in planned:
        if request.subarrays and not observation.calibration:
            jobs += [
                (observation, t, s) for t, s in zip(request.targets, request.subarrays, strict=True)
            ]
        else:
            jobs.append((observation, observation.target, None))
    radec = [(i, j) for i, j in enumerate(jobs) if j[1].kind == "radec"]
    rows = np.array([i for i, _ in radec], dtype=np.int64)
    az = np.array([j[1].az_deg or 0.0 for j in jobs])
    el = np.array([j[1].el_deg or 0.0 for j in jobs])
    # Each RA/Dec job's position at its start, midpoint and stop (a body's where it is then:
    # the Moon moves 0.5 deg an hour), in one ephemeris call per body.
    edges = ("obsid", "midpoint_gps", "stoptime")
    edge_gps = {edge: np.array([float(getattr(j[0], edge)) for _, j in radec]) for edge in edges}
    ra_all, dec_all = _radec_at(
        [j[1] for _, j in radec] * len(edges), np.concatenate([edge_gps[e] for e in edges])
    )
    edge_ra = dict(zip(edges, np.split(ra_all, len(edges)), strict=True))
    edge_dec = dict(zip(edges, np.split(dec_all, len(edges)), strict=True))
    # The phase centre: where the target is at the observation's midpoint.
    phase_centre = {
        int(i): (float(ra), float(dec))
        for i, ra, dec in zip(rows, edge_ra["midpoint_gps"], edge_dec["midpoint_gps"], strict=True)
    }
    if radec:
        az[rows], el[rows] = sky.azel_at(
            edge_ra["midpoint_gps"], edge_dec["midpoint_gps"], edge_gps["midpoint_gps"]
        )
    # avoidsun: the Sun where it is at each observation's own midpoint; jobs whose Sun is up.
    avoiding: dict[int, pointing.SunAvoidance] = {}
    if request.avoidsun and radec:
        midpoints = np.array([j[0].midpoint_gps for j in jobs])
        sun_ra, sun_dec = pointing.bodies_radec("sun", midpoints)
        sun_az, sun_el = sky.azel_at(sun_ra, sun_dec, midpoints)
        chosen = [i for i, _ in radec if sun_el[i] > 0.0]
        centre_hz = {  # one per freqspec
            o.spec: float(np.mean([coarse_channel_centre_mhz(c) for c in o.coarse_chans])) * 1e6
            for o in planned
        }
        freq_hz = np.array([centre_hz[jobs[i][0].spec] for i in chosen])
        avoiding = dict(zip(chosen, pointing.avoid_sun_many(
            az[chosen], el[chosen], sun_az[chosen], sun_el[chosen], freq_hz,
            threshold=settings.trigger_sun_threshold,
        ), strict=True))  # fmt: skip
    grid = pointing.sweet_grid()
    nearest = pointing.nearest_grid_points(az, np.maximum(el, 0.0))
    entries: list[dict[str, Any]] = []
    # The horizon is checked at the start, middle and end: a target may set or rise meanwhile.
    lowest_el, lowest_gps = el.copy(), np.array([j[0].midpoint_gps for j in jobs])
    if radec:
        for edge in ("obsid", "stoptime"):
            _, edge_el = sky.azel_at(edge_ra[edge], edge_dec[edge], edge_gps[edge])
            lower = edge_el < lowest_el[rows]
            lowest_el[rows[lower]], lowest_gps[rows[lower]] = edge_el[lower], edge_gps[edge][lower]
    below_horizon: set[str] = set()
    for index, (observation, target, subarray) in enumerate(jobs):
        low = target.kind != "allsky" and lowest_el[index] < settings.trigger_min_elevation_deg
        if low and target.label not in below_horizon:
            below_horizon.add(target.label)
            # The limit is named when it is not the horizon (OBSERVATORY_TRIGGER_MIN_ELEVATION_DEG):
            # "below the horizon (70.0 deg)" read as a contradiction.
            limit_deg = settings.trigger_min_elevation_deg
            below = (
                "the horizon"
                if limit_deg == 0
                else f"the lowest elevation allowed ({limit_deg:g} deg)"
            )
            _problem(request, f"{target.label} is below {below} ({lowest_el[index]:.1f} deg) "
                     f"at {gps_to_utc_iso(float(lowest_gps[index]))}")  # fmt: skip
        entry: dict[str, Any] = {"target": target.label, "target_az_deg": round(float(az[index]), 4),
                                 "target_el_deg": round(float(el[index]), 4)}  # fmt: skip
        if subarray:
            entry |= {"subarray": subarray, "n_tiles": subarray_sizes()[subarray]}
        if target.kind == "allsky":
            entry |= {
                "grid_number": None,
                "az_deg": 0.0,
                "el_deg": 90.0,
                "delays": list(ALL_SKY_DELAYS),
            }
        elif index in avoiding:
            choice = avoiding[index]
            entry |= {"grid_number": choice.grid_number, "az_deg": choice.az_deg, "el_deg": choice.el_deg,
                      "delays": list(choice.delays), "sun_power": choice.sun_power,
                      "target_power": choice.target_power,
                      "nearest_grid_number": choice.nearest_grid_number,
                      "sun_attenuation_db": round(choice.sun_attenuation_db, 2)}  # fmt: skip
        else:
            number = int(nearest[index])
            entry |= {"grid_number": int(grid.number[number]), "az_deg": float(grid.az_deg[number]),
                      "el_deg": float(grid.el_deg[number]), "delays": [int(d) for d in grid.delays[number]]}  # fmt: skip
        if target.kind == "radec":
            entry["ra_phase_deg"], entry["dec_phase_deg"] = phase_centre[index]
        observation.pointings.append(entry)
        entries.append(entry)
    # Where each beam centre is on the sky (metafits RA/DEC), at the observation's midpoint.
    ra_beam, dec_beam = sky.radec_of_azel(
        np.array([e["az_deg"] for e in entries]), np.array([e["el_deg"] for e in entries]),
        np.array([j[0].midpoint_gps for j in jobs]),
    )  # fmt: skip
    for entry, ra, dec in zip(entries, ra_beam, dec_beam, strict=True):
        entry["ra_deg"], entry["dec_deg"] = round(float(ra), 5), round(float(dec), 5)


def _radec_at(
    targets: Sequence[Target], gps_seconds: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Where RA/Dec targets are, each at its time (arrays of one length).

    A solar-system body is where it is then, seen from the MWA; any other target where it
    was given.
    """
    ra = np.array([t.ra_deg for t in targets], dtype=np.float64)
    dec = np.array([t.dec_deg for t in targets], dtype=np.float64)
    for body in sorted({t.body for t in targets if t.body}):
        matching = np.array([t.body == body for t in targets])
        ra[matching], dec[matching] = pointing.bodies_radec(body, gps_seconds[matching])
    return ra, dec


def first_pointings(planned: Sequence[PlannedObservation]) -> list[dict[str, Any]]:
    """The pointing chosen for each target (and calibrator) at its first observation.

    With ``avoidsun`` these carry the Sun's and the target's beam power and the
    Sun's attenuation against the nearest grid point.
    """
    seen: dict[str, dict[str, Any]] = {}
    for observation in planned:
        for entry in observation.pointings:
            key = f"{entry['target']}|{entry.get('subarray')}"
            seen.setdefault(
                key, {**entry, "obsid": observation.obsid, "freqspec": observation.spec}
            )
    return list(seen.values())


def observation_rows(
    request: TriggerRequest, planned: Sequence[PlannedObservation], groupid: int
) -> list[dict[str, Any]]:
    """The ``observations`` rows of a plan."""
    rows = []
    for observation in planned:
        first = observation.pointings[0]
        rows.append({
            "obsid": observation.obsid, "stoptime": observation.stoptime,
            "obsname": observation.obsname, "creator": request.creator,
            "project_id": request.project_id, "mode": observation.mode, "groupid": groupid,
            "ra_deg": first.get("ra_deg"), "dec_deg": first.get("dec_deg"),
            "ra_phase_deg": first.get("ra_phase_deg"), "dec_phase_deg": first.get("dec_phase_deg"),
            "az_deg": first["az_deg"], "el_deg": first["el_deg"], "delays": first["delays"],
            "coarse_chans": observation.coarse_chans,
            "freq_res_khz": request.freq_res_khz, "int_time_s": request.int_time_s,
            "atten_db": request.atten_db, "calibration": observation.calibration,
            "calibrator_source": observation.calibrator_source, "interruptible": True,
            # The calibrator is observed by the whole array: one pointing, no subarrays.
            "subarray_pointings": (
                observation.pointings if request.subarrays and not observation.calibration else None
            ),
            "deleted": False, "created_by": "trigger", "created_at": datetime.now(UTC),
        })  # fmt: skip
    return rows


# -- the schedule: who may override what ---------------------------------------------------


@dataclass(frozen=True)
class Overlap:
    """What a new block of observations does to the schedule between ``start`` and ``end``."""

    truncated: Observation | None
    deleted: list[Observation]
    blockers: list[str]


def _live() -> Any:
    return Observation.deleted.is_(False)


#: The observations table itself: inserting through Core skips the ORM's per-row bookkeeping.
_OBSERVATIONS = cast(Table, Observation.__table__)
#: What the schedule checks read of an observation (rows, not ORM objects: cheaper).
_SCHEDULE_COLUMNS = (
    Observation.obsid, Observation.stoptime, Observation.obsname, Observation.creator,
    Observation.project_id, Observation.mode, Observation.groupid, Observation.interruptible,
    Observation.coarse_chans,
)  # fmt: skip


def latest_started(session: Session, when: float) -> Any | None:
    """The observation in progress at ``when``, or else the last to have started before it
    (a row of ``_SCHEDULE_COLUMNS``); None when nothing started before ``when``."""
    return session.execute(
        select(*_SCHEDULE_COLUMNS)
        .where(Observation.obsid <= math.floor(when), _live())  # whole seconds: the key's index
        .order_by(Observation.obsid.desc())
        .limit(1)
    ).first()


def overlapping(session: Session, since: float, until: float) -> list[Any]:
    """Observations overlapping [since, until), in time order, with their owner's priority.

    Rows of ``_SCHEDULE_COLUMNS`` plus ``owner_priority`` (0 for an unknown project).
    The schedule never overlaps, so only the last observation to start at or
    before ``since`` can still be running then: one query, on the primary key.
    """
    # Whole seconds: compared with a fractional number, PostgreSQL casts the bigint key
    # to numeric and cannot use its index (a sequential scan of the whole schedule).
    first_second, last_second = math.floor(since), math.ceil(until)
    latest_start = (
        select(func.coalesce(func.max(Observation.obsid), -1))
        .where(Observation.obsid <= first_second, _live())
        .scalar_subquery()
    )
    rows = session.execute(
        select(*_SCHEDULE_COLUMNS, func.coalesce(Project.priority, 0).label("owner_priority"))
        .outerjoin(Project, Project.id == Observation.project_id)
        .where(Observation.obsid >= latest_start, Observation.obsid < last_second, _live())
        .order_by(Observation.obsid)
    )
    return [row for row in rows if row.stoptime > since]


def schedule_window(session: Session, start: int, end: int) -> tuple[Any | None, list[Any]]:
    """What a block [start, end) replaces: the observation to truncate, and those to delete."""
    found = overlapping(session, start, end)
    if found and found[0].obsid < start:
        return found[0], found[1:]
    return None, found


def blockers(
    project: Project, observations: Sequence[Any], now: float, cut: float | None = None
) -> list[str]:
    """Why ``project`` may not interrupt ``observations`` (empty: it may).

    A project may always replace its own observations; others only when they
    belong to a project of lower priority and are interruptible. A voltage
    capture in progress is never interrupted: one running now, or one that will
    be running at ``cut``, the time the new observations start and existing ones
    are truncated (``cut`` defaults to the earliest start a trigger made now can
    have). A triggerbuffer capture is protected from the moment it is made.
    """
    cut = first_start_gps(now) if cut is None else cut
    reasons = []
    for o in observations:
        # A buffer dump's capture runs from the moment of the trigger, before its own start.
        capturing = (
            o.obsid <= now < o.stoptime or o.obsid < cut < o.stoptime or o.mode == "VOLTAGE_BUFFER"
        )
        if o.mode in VCS_MODES and capturing:
            reason = "is a voltage capture in progress and cannot be interrupted"
        elif o.project_id == project.id:
            continue
        elif not o.interruptible:
            reason = "is marked as not interruptible"
        elif o.owner_priority >= project.priority:
            reason = (f"belongs to project {o.project_id} (priority {o.owner_priority}), which project "
                      f"{project.id} (priority {project.priority}) may not interrupt")  # fmt: skip
        else:
            continue
        reasons.append(f"observation {o.obsid} ({o.obsname!r}, project {o.project_id}) {reason}")
    return reasons


def is_busy(session: Session, project_id: str, obstime_s: float, now: float | None = None) -> bool:
    """True if a trigger by ``project_id`` made ``now``, observing for ``obstime_s``, would be
    refused by the override rules (triggerservice.py: False if the project "is allowed to
    override current observations from now for the given length of time").

    The window is the one that trigger would clear: from its first start (an 8-s boundary at
    least 4 s after now) for ``obstime_s`` rounded up to whole 8 s, as ``triggerobs`` plans
    ``exptime=obstime``; it is judged by :func:`blockers` as the trigger is. An observation that
    ends before that start is not in the way (no trigger can reach it); one starting before the
    window's end is. ``obstime_s`` 0 asks about the instant of that start.

    A project that may not trigger (unknown, or without a secure key) can interrupt nothing,
    its own observations included: busy whenever anything is scheduled in the window.
    """
    now = now_gps_precise() if now is None else now
    start = first_start_gps(now)
    end = start + max(math.ceil(obstime_s / BOUNDARY_S) * BOUNDARY_S, 1)
    running, inside = schedule_window(session, start, end)
    observations = [o for o in (running, *inside) if o is not None]
    if not observations:
        return False
    project = session.get(Project, project_id)
    if project is None or project.secure_key_hash is None:
        return True
    return bool(blockers(project, observations, now, start))


def obslist(
    session: Session, obstime_s: float, *, current: bool = False, now: float | None = None
) -> list[list[Any]]:
    """Scheduled observations overlapping [now, now + obstime), as the 7-element rows clients read.

    With ``current``: only the observation in progress, or else the last one to have started.
    """
    now = now_gps_precise() if now is None else now
    if current:
        latest = latest_started(session, now)
        found = [latest] if latest is not None else []
    else:
        # At least the instant ``now``: obstime 0 (the default) asks what runs now, and
        # [now, now) would leave out an observation starting in this very second.
        found = overlapping(session, now, now + max(obstime_s, 1e-3))
    return [
        [o.obsid, o.stoptime, o.obsname, o.creator, o.project_id, o.mode, o.groupid] for o in found
    ]


def buffer_dumps(session: Session) -> dict[int, list[tuple[float, float]]]:
    """What real ``triggerbuffer`` calls saved: for each observation a dump listed, the
    spans (GPS seconds, start and end) its dumps captured. Cut them to the observation:
    a dump's capture into the future is an observation of its own."""
    dumps: dict[int, list[tuple[float, float]]] = {}
    rows = session.execute(
        select(Trigger.obsids, Trigger.params).where(
            Trigger.trigger_mode == TriggerMode.BUFFER.value,
            Trigger.success.is_(True),
            Trigger.pretend.is_(False),
        )
    )
    for obsids, params in rows:
        if params.get("capture_start") is None:  # the null operation saved nothing
            continue
        for obsid in obsids:
            dumps.setdefault(int(obsid), []).append(
                (float(params["capture_start"]), float(params["capture_end"]))
            )
    return dumps


def covered_s(spans: Sequence[tuple[float, float]], since: float, until: float) -> float:
    """Seconds of [since, until) that the union of ``spans`` (start, end) covers."""
    total_s, reached = 0.0, float(since)
    for start, end in sorted(spans):
        end = min(end, until)
        total_s += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return total_s


def vcs_free_s(
    session: Session,
    settings: Settings,
    now: float | None = None,
    *,
    dumps: Mapping[int, Sequence[tuple[float, float]]] | None = None,
    replaced: Collection[int] = frozenset(),
) -> int:
    """Seconds of 24-channel voltage capture the VCS disk can still take.

    Capacity less what was captured and what is still to capture, each at the full
    array's rate (``trigger_vcs_bytes_per_s_per_chan``): every archived voltage sub-file
    (8 s of one coarse channel), every voltage capture that has ended without files (not
    recorded yet, or too large for the simulated telescope to record), what buffer dumps
    saved of buffering observations not recorded yet, and the voltage observations in
    progress (whole: what one has captured so far is on the disk) or still to run. The
    archive's own files hold a few tiles and cannot say what the disk holds. ``dumps``:
    ``buffer_dumps`` already read in this transaction (read here when needed, if not given).
    ``replaced``: obsids of scheduled observations a trigger would delete (their room is
    the trigger's to use).
    """
    now = now_gps_precise() if now is None else now
    rate_per_chan = settings.trigger_vcs_bytes_per_s_per_chan
    subfiles = session.scalar(
        select(func.count()).select_from(ObservationFile).where(
            ObservationFile.kind == FileKind.VOLTAGE
        )
    ) or 0  # fmt: skip
    unrecorded = session.execute(
        select(Observation.obsid, Observation.stoptime, Observation.coarse_chans).where(
            Observation.mode.in_(VCS_MODES), Observation.stoptime <= math.floor(now), _live(),
            ~exists().where(ObservationFile.obsid == Observation.obsid),
        )
    )  # fmt: skip
    captured_s = subfiles * MWAX_SUBOBS_S / MAX_COARSE_CHANS + sum(
        full_band_vcs_s(stoptime - obsid, len(chans or ())) for obsid, stoptime, chans in unrecorded
    )
    # What dumps saved of buffering observations, until the telescope records it. Only
    # unrecorded ones are looked at (no list of ids bound into the query: it only grows).
    buffering = session.execute(
        select(Observation.obsid, Observation.stoptime, Observation.coarse_chans).where(
            Observation.mode == "MWAX_BUFFER", Observation.obsid <= math.floor(now), _live(),
            ~exists().where(ObservationFile.obsid == Observation.obsid),
        )
    ).all()  # fmt: skip
    if dumps is None:
        dumps = buffer_dumps(session) if buffering else {}
    for obsid, stoptime, chans in buffering:
        # Overlapping dumps save the same seconds once (the telescope records their union).
        saved_s = covered_s(dumps.get(obsid, []), obsid, min(stoptime, now))
        captured_s += full_band_vcs_s(saved_s, len(chans or ()))
    running = latest_started(session, now)
    future = session.execute(  # the (mode, obsid) index
        select(*_SCHEDULE_COLUMNS).where(
            Observation.mode.in_(VCS_MODES), Observation.obsid > math.floor(now), _live()
        )
    )
    to_come = 0.0
    scheduled = [row for row in [running, *future] if row is not None and row.mode in VCS_MODES]
    for row in scheduled:
        if row.stoptime <= now or row.obsid in replaced:  # ended: charged above
            continue
        # Whole, the running one too: it has no files until it ends, and what it has
        # captured so far is on the disk already.
        to_come += full_band_vcs_s(row.stoptime - row.obsid, len(row.coarse_chans or ()))
    full_band_rate = MAX_COARSE_CHANS * rate_per_chan
    free = settings.trigger_vcs_capacity_bytes - (captured_s + to_come) * full_band_rate
    return max(0, int(free // full_band_rate))


def vcsfree_answer_s(
    session: Session,
    settings: Settings,
    now: float | None = None,
    *,
    dumps: Mapping[int, Sequence[tuple[float, float]]] | None = None,
    replaced: Collection[int] = frozenset(),
) -> int:
    """The VCS disk's room for a trigger: :func:`vcs_free_s` in whole 8 s blocks.

    What ``vcsfree`` answers, and the room ``triggervcs`` and ``triggerbuffer`` check a
    capture against and name when they refuse one: one computation, so that a caller
    who caps ``exptime`` at ``vcsfree`` asks for an exposure (a multiple of 8 s) that
    fits, and a refusal names the number ``vcsfree`` gave.

    Parameters
    ----------
    session
        The database session (the schedule's lock held, for a trigger).
    settings
        The VCS disk's capacity and data rate.
    now
        GPS seconds; the clock if None.
    dumps
        ``buffer_dumps`` already read in this transaction, if any.
    replaced
        Obsids of scheduled captures the trigger would delete (their room is its to use).

    Returns
    -------
    int
        Seconds of 24-channel voltage capture, a multiple of 8 (0 when no whole 8 s fits).
    """
    free_s = vcs_free_s(session, settings, now, dumps=dumps, replaced=replaced)
    return free_s - free_s % BOUNDARY_S


# -- triggering -----------------------------------------------------------------------------


def authenticate(
    session: Session, project_id: str, secure_key: str | None
) -> tuple[Project | None, str | None]:
    """The project if ``secure_key`` opens it, else None and why (checked in pretend mode too)."""
    project = session.get(Project, project_id)
    if project is None:
        return None, f"project_id {project_id!r} is not a known project"
    if project.secure_key_hash is None:
        return None, f"project {project_id} has no secure key set: it cannot trigger"
    if not secure_key:
        return None, "secure_key is missing"
    if not check_project_key(project, secure_key):
        return None, f"secure_key is not the key of project {project_id}"
    return project, None


def _hold_schedule(session: Session, now: float, clock_now: bool) -> float:
    """Take the schedule's lock (:func:`~observatory.archive.service.take_schedule_lock`)
    before what a trigger checks is read (the schedule, the override rules, the VCS disk's
    room, the observation in progress); the time then, read again unless it was given.

    Taken after those reads, two triggers at once each found room for its capture on the
    VCS disk, and a trigger that waited for the lock planned from the time it was sent: its
    observations started in the past, and a voltage capture that had started meanwhile was
    deleted, though one in progress is never interrupted.
    """
    session.commit()  # the lock must be the write transaction's first statement
    take_schedule_lock(session)
    return float(now_gps_precise()) if clock_now else now


def trigger_observations(
    session: Session,
    settings: Settings,
    raw: Mapping[str, Any],
    *,
    vcs: bool,
    now: float | None = None,
) -> dict[str, Any]:
    """triggerobs / triggervcs: plan, check, and (unless pretend) change the schedule.

    Returns the reply (also recorded): success, errors, params, clear, schedule,
    trigger_id, obsid_list. ``session`` should hold no open transaction.
    """
    clock_now = now is None
    now = float(now_gps_precise() if now is None else now)
    request = read_trigger_request(raw, vcs=vcs, when_gps=int(now))
    project, auth_error = _authenticate_request(session, request)
    if auth_error:
        request.errors.insert(0, auth_error)
    if not request.errors and not request.pretend:
        now = _hold_schedule(session, now, clock_now)
    start = first_start_gps(now)
    planned: list[PlannedObservation] = []
    if not request.errors:
        planned = plan(request, start, settings)
    mode = TriggerMode.MWAX_VCS if vcs else TriggerMode.MWAX_CORRELATOR
    if request.errors or not planned:
        session.rollback()
        return record(session, request, mode, success=False, obsids=[])
    assert project is not None
    end = planned[-1].stoptime
    groupid = request.groupid or planned[0].obsid
    request.params |= {"groupid": groupid, "starttime": start, "stoptime": end,
                       "calname": next((o.calibrator_source for o in planned if o.calibration), None),
                       "warnings": request.warnings, "pointings": first_pointings(planned)}  # fmt: skip
    running, inside = schedule_window(session, start, end)
    refused = blockers(project, [o for o in (running, *inside) if o is not None], now, start)
    if vcs:
        # Under the lock, and with the room of the captures this trigger replaces (a project
        # re-pointing its own capture that has not started needs no room twice), unless
        # it may not replace them.
        needed = sum(
            full_band_vcs_s(o.stoptime - o.obsid, len(o.coarse_chans))
            for o in planned
            if o.mode == "MWAX_VCS"
        )
        replaced = set() if refused else {o.obsid for o in inside}
        free = vcsfree_answer_s(session, settings, now, replaced=replaced)
        if needed > free:
            refused.append(
                f"the voltage capture needs {needed:.0f} s of 24-channel capture; the VCS disk "
                f"has room for {free} s"
            )
    if refused:
        session.rollback()
        request.errors += refused
        return record(session, request, mode, success=False, obsids=[])
    clear = _clear_report(request, start, end, running, inside)
    if not request.pretend:
        if running is not None:
            session.execute(
                update(Observation).where(Observation.obsid == running.obsid).values(stoptime=start)
            )
        if inside:
            session.execute(
                delete(ObservationFile).where(ObservationFile.obsid.in_([o.obsid for o in inside]))
            )
            session.execute(
                delete(Observation).where(Observation.obsid.in_([o.obsid for o in inside]))
            )
        session.flush()
        session.execute(_OBSERVATIONS.insert(), observation_rows(request, planned, groupid))
    return record(session, request, mode, success=True, obsids=[o.obsid for o in planned],
                  clear=clear, schedule=_schedule_report(request, planned, groupid))  # fmt: skip


def _clear_report(
    request: TriggerRequest,
    start: int,
    end: int,
    running: Observation | None,
    inside: Sequence[Observation],
    continued: tuple[Any, int] | None = None,
    resumed: tuple[Any, int] | None = None,
) -> dict[str, Any]:
    """What clearing [start, end) does; ``continued``: a buffer dump's capture that goes on
    (instead of a new one), and the stop it is to have; ``resumed``: a buffering observation
    that goes on after the capture, and the time it resumes."""
    # Nothing to clear (a dump ending within the capture it continues): no command run.
    command = (
        f"clear_schedule.py --starttime={start} --stoptime={end} --force" if end > start else ""
    )
    lines = []
    if continued is not None:
        capture, stop = continued
        name = f"{capture.obsid} ({capture.obsname}, {capture.project_id})"
        lines.append(f"Extended capture {name} to stop at {stop}" if stop > capture.stoptime
                     else f"Kept capture {name}, which stops at {capture.stoptime}")  # fmt: skip
    if running is not None:
        lines.append(
            f"Truncated {running.obsid} ({running.obsname}, {running.project_id}) to stop at {start}"
        )
    lines += [f"Deleted {o.obsid} ({o.obsname}, {o.project_id})" for o in inside]
    if resumed is not None:
        buffering, at = resumed
        lines.append(f"Resumed {buffering.obsid} ({buffering.obsname}, {buffering.project_id}) "
                     f"as {at} after the capture, to stop at {buffering.stoptime}")  # fmt: skip
    stdout = "\n".join(lines) or "No observations cleared"
    if request.pretend:
        stdout = "Pretending: command not run\n" + stdout.replace(
            "Truncated", "Would truncate"
        ).replace("Deleted", "Would delete").replace("Extended", "Would extend").replace(
            "Resumed", "Would resume"
        )
    return {"command": command, "commands": command, "retcode": 0 if command else None,
            "stdout": stdout, "stderr": "Pretending: command not run" if request.pretend else ""}  # fmt: skip


def _schedule_report(
    request: TriggerRequest, planned: Sequence[PlannedObservation], groupid: int
) -> dict[str, Any]:
    """The equivalent schedule_observation.py command lines, and one INFO line per obsid."""
    lines, info = [], []
    for o in planned:
        target = o.pointings[0]
        parts = [f"schedule_observation.py --starttime={o.obsid} --stoptime=++{o.stoptime - o.obsid}s",
                 f'--freq="{o.spec}"']  # fmt: skip
        if request.freq_res_khz is not None and o.mode == "MWAX_CORRELATOR":
            parts.append(f"--freqres={request.freq_res_khz:g} --inttime={request.int_time_s:g}")
        parts += [f'--obsname="{o.obsname}"', f'--creator="{request.creator}"']
        if o.mode != "MWAX_CORRELATOR":
            parts.append(f"--mode={o.mode}")
        parts += [f"--project={request.project_id}", f"--groupid={groupid}"]
        subarrays = [p for p in o.pointings if p.get("subarray")]
        for p in subarrays:  # all targets at once: one pointing per subarray
            parts.append(
                f"--subarray={p['subarray']} --alt={p['el_deg']:.6f} --az={p['az_deg']:.6f}"
            )
            if p.get("ra_phase_deg") is not None:
                parts.append(f"--ra={p['ra_phase_deg']:.6f} --dec={p['dec_phase_deg']:.6f}")
        if not subarrays:
            parts.append(f"--alt={target['el_deg']:.6f} --az={target['az_deg']:.6f}")
            if target.get("ra_phase_deg") is not None:  # a body's moves: this observation's
                parts.append(
                    f"--ra={target['ra_phase_deg']:.6f} --dec={target['dec_phase_deg']:.6f}"
                )
        if o.calibration:
            parts.append(
                f'--calibration --calibrators={o.calibrator_source} --source="{o.calibrator_source}"'
            )
        if request.atten_db is not None:
            parts.append(f"--atten={request.atten_db:g}")
        parts.append("--verbose --ut")
        lines.append(" ".join(parts))
        beams = "; ".join(
            (f"{p['subarray']} " if p.get("subarray") else "")
            + f"grid {p.get('grid_number')} az {p['az_deg']:.4f} el {p['el_deg']:.4f}"
            for p in (subarrays or [target])
        )
        # The line ends at the obsid's colon: TraceT takes the obsid as the text after " for "
        # less its last character (an obsname with " for " in it broke that). Details follow.
        info.append(f"INFO:Schedule metadata for {o.obsid}:")
        info.append(f"INFO:  {o.obsname} {o.mode} {o.spec} {beams}")
    command = " ;\n".join(lines)
    stdout = (
        "Pretending: commands not run"
        if request.pretend
        else f"Scheduled {len(planned)} observations"
    )
    return {
        "command": command,
        "commands": command,
        "retcode": 0,
        "stdout": stdout,
        "stderr": "\n".join(info),
    }


def record(
    session: Session,
    request: TriggerRequest,
    mode: TriggerMode,
    *,
    success: bool,
    obsids: list[int],
    clear: dict[str, Any] | None = None,
    schedule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Store the call (in the session's transaction) and commit; returns the reply.

    A refused call's parameters and errors are stored and answered cut short
    (:func:`_recorded_errors`, :func:`_recorded_value`): they hold what was sent.
    """
    errors = _recorded_errors(request.errors)
    params = json.loads(json.dumps(request.params, default=str))  # plain JSON, never the key
    if not success:  # a successful call's values were all checked, and are needed whole
        params = {name: _recorded_value(value) for name, value in params.items()}
    # Only a refused call's values can exceed the columns (its errors say so); a
    # successful call's were checked to fit.
    trigger = Trigger(project_id=request.project_id[:MAX_PROJECT_ID_CHARS], pretend=request.pretend,
                      success=success, creator=request.creator[:MAX_CREATOR_CHARS],
                      obsname=request.obsname[:200], trigger_mode=mode.value,
                      obsids=obsids, params=params, errors=errors)  # fmt: skip
    session.add(trigger)
    session.flush()
    result = {"success": success, "errors": errors, "params": params, "clear": clear or {},
              "schedule": schedule or {}, "trigger_id": trigger.id, "obsid_list": obsids}  # fmt: skip
    trigger.result = result
    session.commit()
    return result


def _recorded_errors(messages: Sequence[str]) -> dict[str, str]:
    """The ``errors`` of a reply and its row: the first :data:`MAX_RECORDED_ERRORS` messages,
    each cut to :data:`MAX_RECORDED_CHARS`, then one saying how many more there were."""
    kept = [_cut(message) for message in messages[:MAX_RECORDED_ERRORS]]
    if len(messages) > MAX_RECORDED_ERRORS:
        kept.append(f"... and {len(messages) - MAX_RECORDED_ERRORS} more errors")
    return {str(i): message for i, message in enumerate(kept)}


def _recorded_value(value: Any) -> Any:
    """A refused call's parameter as stored: itself, or, when it (as JSON, if not text) is
    longer than :data:`MAX_RECORDED_CHARS`, its text cut short with a marker."""
    text = value if isinstance(value, str) else json.dumps(value)
    return value if len(text) <= MAX_RECORDED_CHARS else _cut(text)


def _cut(text: str) -> str:
    """``text`` cut to :data:`MAX_RECORDED_CHARS` characters, saying how many were left out."""
    if len(text) <= MAX_RECORDED_CHARS:
        return text
    return f"{text[:MAX_RECORDED_CHARS]}... ({len(text) - MAX_RECORDED_CHARS} more characters)"


# -- past triggers -----------------------------------------------------------------------------


def trigger_summary(trigger: Trigger) -> dict[str, Any]:
    """``show``'s record of a trigger."""
    created = trigger.created_at  # aware UTC (UTCDateTime)
    return {
        "trigger_id": trigger.id, "project_id": trigger.project_id, "pretend": trigger.pretend,
        "success": trigger.success, "creator": trigger.creator, "obsname": trigger.obsname,
        "trigger_mode": trigger.trigger_mode, "obsids": trigger.obsids, "params": trigger.params,
        "errors": trigger.errors,
        "created_datetime": created.replace(tzinfo=None).isoformat(timespec="seconds"),
    }  # fmt: skip


#: find's filters, in the order of its form.
FIND_FILTERS = ("trigger_id", "trigger_mode", "pretend", "success", "mintime_utc", "maxtime_utc",
                "project_id", "obsname", "creator")  # fmt: skip
DEFAULT_PAGE_SIZE = 200
MAX_PAGE_SIZE = 10_000


@dataclass(frozen=True)
class FindQuery:
    """find's parameters, read: empty values mean "no filter"."""

    filters: dict[str, Any]
    page: int = 1
    pagesize: int = DEFAULT_PAGE_SIZE
    descending: bool = False


def read_find_query(raw: Mapping[str, Any]) -> FindQuery:
    """Read find's parameters.

    Raises
    ------
    ParameterError
        Naming a malformed value (a bad number, time or mode).
    """
    filters: dict[str, Any] = {}
    for name in FIND_FILTERS:
        if not present(raw, name):
            continue
        value = str(raw[name]).strip()
        if name == "trigger_id":
            filters[name] = int(as_number(name, value, integer=True))
            if not 0 <= filters[name] <= MAX_SQL_ID:
                raise ParameterError(f"trigger_id: {value!r} is out of range (0..{MAX_SQL_ID})")
        elif name == "trigger_mode":
            if value.upper() not in TriggerMode.__members__:
                raise ParameterError(
                    f"trigger_mode: {value!r} is not one of {', '.join(TriggerMode.__members__)}"
                )
            filters[name] = value.upper()
        elif name in ("pretend", "success"):
            # The wiki's rule: 'on', 'true' or a non-zero integer mean true; anything else false.
            filters[name] = value.lower() in ("on", "true") or (
                is_ascii_digits(value.removeprefix("-")) and int(value) != 0
            )
        elif name in ("mintime_utc", "maxtime_utc"):
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                raise ParameterError(
                    f"{name}: {value!r} is not an ISOT time (e.g. 2026-11-29T12:00:00)"
                ) from None
            # In UTC, naive (as UTCDateTime takes it). A time whose UTC, or whose end, falls
            # outside years 1-9999 bounds nothing: it is the earliest or latest time there is.
            offset = when.utcoffset() or timedelta(0)
            try:
                when = when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when
                if name == "maxtime_utc":
                    # The end of the time written: a whole second takes all of it, as find
                    # and show print creation times to the second.
                    when += timedelta(microseconds=1) if "." in value else timedelta(seconds=1)
            except OverflowError:
                when = datetime.min if offset > timedelta(0) else datetime.max
            filters[name] = when
        else:
            filters[name] = value
    page = int(as_number("page", raw["page"], integer=True)) if present(raw, "page") else 1
    pagesize = (
        int(as_number("pagesize", raw["pagesize"], integer=True))
        if present(raw, "pagesize")
        else DEFAULT_PAGE_SIZE
    )
    if not 1 <= pagesize <= MAX_PAGE_SIZE:
        raise ParameterError(f"pagesize must be 1..{MAX_PAGE_SIZE}, not {pagesize}")
    if not 1 <= page <= MAX_SQL_INTEGER // MAX_PAGE_SIZE:
        raise ParameterError(f"page must be 1..{MAX_SQL_INTEGER // MAX_PAGE_SIZE}, not {page}")
    return FindQuery(filters, page, pagesize, descending="desc" in raw)


def find_triggers(session: Session, query: FindQuery) -> tuple[list[Trigger], bool]:
    """One page of past triggers matching the filters, and whether more follow."""
    statement = select(Trigger)
    f = query.filters
    if "trigger_id" in f:
        statement = statement.where(Trigger.id == f["trigger_id"])
    if "trigger_mode" in f:
        statement = statement.where(Trigger.trigger_mode == f["trigger_mode"])
    if "pretend" in f:
        statement = statement.where(Trigger.pretend.is_(f["pretend"]))
    if "success" in f:
        statement = statement.where(Trigger.success.is_(f["success"]))
    if "mintime_utc" in f:
        statement = statement.where(Trigger.created_at >= f["mintime_utc"])
    if "maxtime_utc" in f:
        statement = statement.where(Trigger.created_at < f["maxtime_utc"])
    if "project_id" in f:
        statement = statement.where(Trigger.project_id == f["project_id"])
    for name, column in (("obsname", Trigger.obsname), ("creator", Trigger.creator)):
        if name in f:
            statement = statement.where(column.like(f[name]))
    order = Trigger.id.desc() if query.descending else Trigger.id
    rows = list(session.scalars(
        statement.order_by(order).offset((query.page - 1) * query.pagesize).limit(query.pagesize + 1)
    ))  # fmt: skip
    return rows[: query.pagesize], len(rows) > query.pagesize


# -- triggerbuffer -------------------------------------------------------------------------------


def trigger_buffer(
    session: Session, settings: Settings, raw: Mapping[str, Any], *, now: float | None = None
) -> dict[str, Any]:
    """Dump the voltage buffer from ``start_time`` and keep capturing until ``end_time``.

    ``start_time`` 0 (the default), or earlier than the buffer holds, means as far
    back as the buffer goes (``trigger_buffer_s``); ``end_time`` may be in the
    past; without it capture runs until now + ``obstime``. ``start_time`` and
    ``end_time`` both 0 is a null operation. Future observations up to the end of
    capture are deleted (or truncated); the capture into the future becomes a
    VOLTAGE_BUFFER observation with the settings of the observation in progress
    (or the last one), which must be buffering voltages. Earlier dumps' captures running
    then, or queued back to back behind the one running, are never cut: the last of them is
    continued if it is this project's (extended if this one ends later), else this dump's
    capture follows them. The VCS disk must hold what the dump adds (:func:`_unsaved_s`).
    """
    clock_now = now is None
    now = float(now_gps_precise() if now is None else now)
    request = TriggerRequest(vcs=True)
    errors = request.errors
    _read_who(request, raw)
    try:
        request.pretend = as_bool("pretend", raw.get("pretend"), default=True)
    except ParameterError as exc:
        errors.append(str(exc))
    times: dict[str, float | None] = {}
    for name in ("start_time", "end_time", "obstime"):
        if name == "obstime" and present(raw, "end_time"):  # unread with end_time, as documented
            times[name] = None
            continue
        try:
            times[name] = as_number(name, raw[name]) if present(raw, name) else None
        except ParameterError as exc:
            errors.append(str(exc))
            times[name] = None
    start_time = times["start_time"] or 0.0
    end_time, obstime = times["end_time"], times["obstime"]
    request.params = {"project_id": request.project_id, "start_time": start_time, "end_time": end_time,
                      "obstime": obstime, "pretend": request.pretend}  # fmt: skip
    if end_time is None and obstime is None and not errors:
        errors.append("give end_time, or obstime (seconds to keep capturing from now)")
    if obstime is not None and obstime < 0:
        errors.append(f"obstime: {obstime} must not be negative")
    if start_time > now:
        errors.append(f"start_time {start_time:.0f} is in the future (now {now:.0f}): the buffer "
                      "holds the past; 0 dumps all it holds")  # fmt: skip
    project, auth_error = _authenticate_request(session, request)
    if auth_error:
        errors.insert(0, auth_error)
    if not errors and not request.pretend:
        now = _hold_schedule(session, now, clock_now)
    latest = latest_started(session, now)
    source = session.get(Observation, latest.obsid) if latest is not None else None
    buffering_since = None
    if source is None:
        errors.append("there is no current or previous observation to take the settings from")
    else:
        problem, buffering_since = _buffering(session, source, now, settings.trigger_buffer_s)
        if problem:
            errors.append(f"the telescope is not buffering voltages: {problem}")
    if errors:
        session.rollback()
        return record(session, request, TriggerMode.BUFFER, success=False, obsids=[])
    assert project is not None and source is not None and buffering_since is not None
    null = start_time == 0 and end_time == 0
    # The buffer holds the last trigger_buffer_s seconds, and nothing from before buffering began.
    buffer_start = max(now - settings.trigger_buffer_s, float(buffering_since))
    capture_start = max(start_time, buffer_start) if start_time else buffer_start
    capture_end = float(end_time) if end_time is not None else now + float(obstime or 0.0)
    if not null and start_time and end_time is not None and end_time < start_time:
        errors.append(f"end_time {end_time:.0f} is before start_time {start_time:.0f}")
    elif not null and capture_end < capture_start:
        errors.append(f"end_time {capture_end:.0f} is before the start of capture {capture_start:.0f} "
                      f"(the buffer holds the last {settings.trigger_buffer_s} s)")  # fmt: skip
    new_start = first_start_gps(now)
    new_stop = int(math.ceil(capture_end / BOUNDARY_S) * BOUNDARY_S)
    into_future = not null and new_stop > new_start
    # What the dump adds to the disk: the past it saves and its capture into the future (to
    # a whole 8 s), less what earlier dumps saved and captures already scheduled will hold (a
    # dump during another's capture adds only what goes beyond it).
    dumps = buffer_dumps(session)  # the source is buffering: both below need them
    needed = 0.0 if null else full_band_vcs_s(
        _unsaved_s(session, capture_start, new_stop if into_future else capture_end, dumps),
        len(source.coarse_chans or ()),
    )  # fmt: skip
    if needed > (free := vcsfree_answer_s(session, settings, now, dumps=dumps)):
        errors.append(f"the capture needs {needed:.0f} s of 24-channel capture; the VCS disk has "
                      f"room for {free} s")  # fmt: skip
    if errors:
        session.rollback()
        return record(session, request, TriggerMode.BUFFER, success=False, obsids=[])
    request.params |= {"capture_start": None if null else capture_start, "capture_end": None if null else capture_end,
                       "buffer_s": settings.trigger_buffer_s, "buffering_since": buffering_since,
                       "settings_from": source.obsid}  # fmt: skip
    # Earlier dumps' captures running at the new start, and those queued back to back behind
    # it, are never cut (nor refused as interruptions): they hold the seconds up to the end
    # of the queue, whoever's they are. Beyond it, the last one goes on to the later end if
    # it is this project's (the same capture, under its obsid); otherwise this dump's own
    # capture starts there, so that no project's data are put under another's.
    queue = _dump_captures_from(session, new_start) if into_future else []
    clear_from = queue[-1].stoptime if queue else new_start
    # The captures that hold part of this dump's span, and the one it continues, if any: the
    # last of the queue to extend, or, when the queue holds all of it, its own latest in it.
    holding = [o for o in queue if o.obsid < new_stop]
    own = [o for o in holding if o.project_id == request.project_id]
    # Only the last of the queue can grow (into what is cleared after it); one kept keeps its
    # stop, which a later capture of the queue may follow.
    if new_stop > clear_from:
        capture = queue[-1] if queue and queue[-1].project_id == request.project_id else None
        capture_stop = new_stop
    else:
        capture = own[-1] if own else None
        capture_stop = capture.stoptime if capture is not None else new_stop
    # A capture of its own from clear_from, when it is not continuing one and goes beyond it.
    new_capture = into_future and capture is None and new_stop > clear_from
    running, inside = (
        schedule_window(session, clear_from, new_stop)
        if into_future and new_stop > clear_from
        else (None, [])
    )
    refused = blockers(project, [o for o in (running, *inside) if o is not None], now, clear_from)
    if refused:
        session.rollback()
        errors += refused
        return record(session, request, TriggerMode.BUFFER, success=False, obsids=[])
    past = (
        []
        if null
        else [o.obsid for o in overlapping(session, capture_start, min(capture_end, new_start))]
    )
    capture_obsid = capture.obsid if capture is not None else clear_from if new_capture else None
    obsids = sorted(set(past) | {int(o.obsid) for o in holding})
    if capture_obsid is not None:
        obsids = sorted({*obsids, capture_obsid})
    if not obsids:
        obsids = [source.obsid]  # nothing captured (the null operation): the settings' observation
    continued = None if capture is None else (capture, capture_stop)
    # The wiki clears the schedule up to the end of capture only: a buffering observation
    # that was to go on beyond it resumes there (under the obsid of that time), so the
    # telescope buffers again and can be dumped again.
    beyond = next((o for o in (running, *inside) if o is not None and o.mode == "MWAX_BUFFER"
                   and o.stoptime > new_stop > clear_from), None)  # fmt: skip
    resumed = None if beyond is None else (beyond, new_stop)
    clear = _clear_report(request, clear_from, max(new_stop, clear_from), running, inside, continued,
                          resumed) if into_future else {
        "command": "", "commands": "", "retcode": None, "stdout": "No observations cleared", "stderr": ""}  # fmt: skip
    resumed_row = None
    if beyond is not None and not request.pretend:
        whole = session.get(Observation, beyond.obsid)  # every column, before it is cut
        assert whole is not None
        resumed_row = {c.key: getattr(whole, c.key) for c in Observation.__table__.columns}
        resumed_row |= {"obsid": new_stop, "groupid": whole.groupid or whole.obsid,
                        "created_by": "trigger", "created_at": datetime.now(UTC)}  # fmt: skip
    if not request.pretend and into_future:
        if running is not None:
            session.execute(
                update(Observation)
                .where(Observation.obsid == running.obsid)
                .values(stoptime=clear_from)
            )
        if inside:
            session.execute(
                delete(ObservationFile).where(ObservationFile.obsid.in_([o.obsid for o in inside]))
            )
            session.execute(
                delete(Observation).where(Observation.obsid.in_([o.obsid for o in inside]))
            )
        session.flush()
        if new_capture:
            inherited = {c.key: getattr(source, c.key) for c in Observation.__table__.columns}
            inherited |= {"obsid": clear_from, "stoptime": new_stop, "mode": "VOLTAGE_BUFFER",
                          "obsname": buffer_dump_name(source.obsname), "creator": "triggerbuffer",
                          "project_id": request.project_id, "groupid": source.groupid or source.obsid,
                          "interruptible": True, "deleted": False, "created_by": "trigger",
                          "created_at": datetime.now(UTC)}  # fmt: skip
            session.execute(_OBSERVATIONS.insert(), [inherited])
        elif capture is not None and capture_stop > capture.stoptime:
            session.execute(
                update(Observation)
                .where(Observation.obsid == capture.obsid)
                .values(stoptime=capture_stop)
            )
        if resumed_row is not None:
            session.execute(_OBSERVATIONS.insert(), [resumed_row])
    command = "triggerbuffer.py --start=0 --end=0" if null else (
        f"triggerbuffer.py --start={capture_start:.0f} --end={capture_end:.0f}")  # fmt: skip
    schedule = {"command": command, "commands": command, "retcode": 0,
                "stdout": "Pretending: trigger command not run" if request.pretend else
                ("Null capture: nothing saved" if null else f"Capturing {capture_start:.0f} to {capture_end:.0f}"),
                "stderr": "\n".join(f"INFO:Schedule metadata for {obsid}:" for obsid in obsids)}  # fmt: skip
    return record(
        session,
        request,
        TriggerMode.BUFFER,
        success=True,
        obsids=obsids,
        clear=clear,
        schedule=schedule,
    )


def _names_given(raw: Mapping[str, Any]) -> list[str]:
    """The ``source`` names as given, for the reply; [] when they cannot be read (the
    parse of the targets has reported that among the errors)."""
    if not present(raw, "source"):
        return []
    try:
        return as_str_list("source", raw["source"], max_items=MAX_TARGETS)
    except ParameterError:
        return []


def calibrator_observation_name(obsname: str, calibrator: str, freqspec: str) -> str:
    """``<obsname> Cal: <calibrator> at <freqspec>``, shortened to fit the metafits.

    The target's name gives way first, then the freqspec: a trigger is never refused for
    the length of a name the service makes (robots send ``calibrator=True`` with names
    of their own). The freqspec is kept whenever it fits, however little of the obsname
    is left: it is what tells one calibrator observation of a trigger from the next.
    """
    for suffix in (f" Cal: {calibrator} at {freqspec}", f" Cal: {calibrator}"):
        room = MAX_OBSNAME_CHARS - len(suffix)
        if len(obsname) <= room:
            return obsname + suffix
        if room >= 0:
            # A name cut short ends where it was cut, not in a space (" Cal:" follows).
            return (obsname[:room].rstrip() + suffix).lstrip()
    # Not even "Cal: <calibrator>" fits (a long name from the online resolver): cut it.
    return f"Cal: {calibrator}"[:MAX_OBSNAME_CHARS]


def buffer_dump_name(obsname: str) -> str:
    """The name of a buffer dump's capture: the buffering observation's, marked as a dump.

    Shortened as needed so that it fits the metafits like every name (a dump is never
    refused for the length of a name it did not choose). A dump whose settings come from
    another dump's capture keeps that name (not "... buffer dump buffer dump").
    """
    if obsname.endswith(BUFFER_DUMP_SUFFIX):
        return obsname
    return obsname[: MAX_OBSNAME_CHARS - len(BUFFER_DUMP_SUFFIX)] + BUFFER_DUMP_SUFFIX


def _buffering(
    session: Session, source: Observation, now: float, buffer_s: float
) -> tuple[str | None, int | None]:
    """Whether the telescope is buffering voltages, judged from ``source``.

    ``source`` is the observation in progress, or else the last one (the wiki:
    a dump inherits their settings). It must be an ``MWAX_BUFFER`` observation
    (in progress, or ended so recently that the buffer still holds some of it),
    or a buffer dump's capture (``VOLTAGE_BUFFER``) still in progress. A
    capture that has ended is not buffering: the dump took the buffer, and
    nothing has buffered since.

    Returns (why not, None), or (None, the start of the unbroken run of
    buffering observations that ends with ``source``: the earliest data the
    buffer can hold).
    """
    in_progress = source.obsid <= now < source.stoptime
    if source.mode not in BUFFER_MODES:
        return (f"observation {source.obsid} is {source.mode}, not "
                f"{' or '.join(sorted(BUFFER_MODES))}", None)  # fmt: skip
    if not in_progress and source.mode == "VOLTAGE_BUFFER":
        return (f"the last observation, {source.obsid}, was a buffer dump's capture "
                f"(VOLTAGE_BUFFER), which ended at {source.stoptime}; nothing has buffered "
                "since", None)  # fmt: skip
    if not in_progress and source.stoptime <= now - buffer_s:
        return (f"the last observation, {source.obsid} ({source.mode}), ended at "
                f"{source.stoptime}, longer ago than the buffer holds ({buffer_s:g} s)", None)  # fmt: skip
    since = source.obsid
    for earlier in reversed(overlapping(session, now - buffer_s, source.obsid)):
        if earlier.obsid >= since:
            continue
        if earlier.stoptime != since or earlier.mode not in BUFFER_MODES:
            break
        since = earlier.obsid
    return None, since


def _dump_capture_at(session: Session, when: int) -> Any | None:
    """A buffer dump's capture (``VOLTAGE_BUFFER``) running at ``when`` (not ending then),
    else None: a later dump continues it, or starts after it, rather than cutting it."""
    latest = latest_started(session, when)
    # Strictly running: one ending at ``when`` may be recorded before this dump commits.
    if latest is None or latest.mode != "VOLTAGE_BUFFER" or latest.stoptime <= when:
        return None
    return latest


def _dump_captures_from(session: Session, when: int) -> list[Any]:
    """The buffer dump's capture running at ``when`` (:func:`_dump_capture_at`) and those
    queued back to back behind it (a dump by another project starts where the one before it
    stops), in time order; [] when none is running then."""
    first = _dump_capture_at(session, when)
    if first is None:
        return []
    queue = [first]
    later = session.execute(  # the (mode, obsid) index; only captures still to start
        select(*_SCHEDULE_COLUMNS)
        .where(Observation.mode == "VOLTAGE_BUFFER", Observation.obsid > first.obsid, _live())
        .order_by(Observation.obsid)
    ).all()
    for row in later:
        if row.obsid != queue[-1].stoptime:
            break
        queue.append(row)
    return queue


def _unsaved_s(
    session: Session,
    since: float,
    until: float,
    dumps: Mapping[int, Sequence[tuple[float, float]]],
) -> float:
    """Seconds of [since, until) the VCS disk neither holds nor expects yet: not saved by an
    earlier real dump (``dumps``, from ``buffer_dumps``) of a buffering observation, nor within
    a voltage capture scheduled (an earlier dump's capture among them). What a dump of that
    span adds to the disk."""
    if until <= since:
        return 0.0
    found = overlapping(session, since, until)
    held = [(float(o.obsid), float(o.stoptime)) for o in found if o.mode in VCS_MODES]
    buffering = [o for o in found if o.mode == "MWAX_BUFFER"]
    if buffering:
        held += [
            (max(start, o.obsid), min(end, o.stoptime))
            for o in buffering
            for start, end in dumps.get(o.obsid, [])
        ]
    return (until - since) - covered_s(held, since, until)


# -- answers to the read-only questions ----------------------------------------------------------


class RecentAnswers:
    """busy / obslist / vcsfree answers, worked out at most once per GPS second per question.

    Robots poll these; within one second the answer can only change if the
    schedule does. A schedule change made through this process (``invalidate``)
    takes effect at once; one made elsewhere (another server process, the CLI) is
    seen within a second. A trigger never relies on these answers: it checks the
    schedule again under the lock.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[Any, ...], tuple[tuple[int, int], Any]] = {}
        self._generation = 0
        self._max_entries = max_entries

    def known(self, key: tuple[Any, ...], second: int) -> tuple[bool, Any]:
        """(True, answer) if ``key`` was answered in ``second`` since the last change, else (False, None)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == (second, self._generation):
                return True, entry[1]
        return False, None

    def get(self, key: tuple[Any, ...], second: int, compute: Callable[[], T]) -> T:
        """The answer to ``key`` in GPS second ``second``, computed if not known yet."""
        with self._lock:
            stamp = (second, self._generation)
            known = self._entries.get(key)
            if known is not None and known[0] == stamp:
                return cast(T, known[1])
        value = compute()
        with self._lock:
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[key] = (stamp, value)
        return value

    def invalidate(self) -> None:
        """Forget every answer (the schedule just changed)."""
        with self._lock:
            self._generation += 1
            self._entries.clear()
