"""Calibration data for Grafana's JSON datasource (simPod/grafana-json-datasource; specs/calib.md 6).

Targets are the receivers (``rec01`` ... ``recNN``: the cable-length residuals of
their tiles over time) and ``sources`` (the calibrators observed). Payload
options: ``channel`` (ANY, or a coarse channel the calibrator observation must
include), ``source`` (ANY, or a calibrator), ``style`` (``full``: X and Y per tile;
``Y-X``; ``recmean``: the receiver's mean; ``tilemean``: each tile's mean of X and
Y; ``quality``: the phase-fit quality) and ``clip`` (None, or drop values beyond
it). Frames are Grafana data frames in JSON: ``{"schema": {...}, "data": {"values":
[times, values]}}``.

Dashboard variables (``/variable``, its payload's ``target``): the values the other
endpoints take (:data:`VARIABLES`). Ad-hoc filters (``/tag-keys``, ``/tag-values``): none;
the channel and calibrator are chosen by each target's payload instead.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from observatory.archive.models import Observation
from observatory.calib.models import CalibrationFit, CalibrationSolution
from observatory.calib.service import observation_tiles
from observatory.core.config import Settings
from observatory.core.errors import BadRequest
from observatory.core.gpstime import gps_to_unix, utc_to_gps
from observatory.core.text import is_ascii_digits
from observatory.core.web import loads_request_json
from observatory.telescope.instrument import tile_layout

STYLES = (
    ("Full", "full"), ("Y-X", "Y-X"), ("Receiver Mean", "recmean"), ("Tile Mean", "tilemean"),
    ("Phase Fit Quality", "quality"),
)  # fmt: skip
PAYLOADS = ("channel", "source", "style", "clip")
#: The targets of ``/variable`` (a dashboard variable's query): ``receivers`` (the query
#: targets ``recNN``), the payloads' choices (``sources``, ``channels``, ``styles``),
#: ``obsids`` (the calibrator observations fitted in the time range, newest first: the
#: ``obs_id`` of get_cal_json and get_cal_solution) and ``tiles`` (the names of the
#: array's tiles, as the frames of the receivers name them).
VARIABLES = ("receivers", "sources", "channels", "styles", "obsids", "tiles")


def _layout_tiles() -> dict[int, tuple[str, int]]:
    """The built-in 128-tile layout: tile id -> (name, receiver)."""
    return {tile.tile_id: (tile.tile_name, tile.rx) for tile in tile_layout()}


def _tiles_of(session: Session, settings: Settings, obsid: int) -> dict[int, tuple[str, int]]:
    """An observation's tiles: id -> (name, receiver), from its metafits (the built-in
    layout when its metafits is not in the archive)."""
    known = observation_tiles(session, settings, obsid)
    return {tile: (row.tile_name, row.rx) for tile, row in known.items()} or _layout_tiles()


def receivers(session: Session, settings: Settings) -> list[int]:
    """Receiver numbers of the array: those of the newest fitted calibrator observation's
    metafits (the array as it is now), or the built-in layout's without one."""
    newest = session.scalar(select(func.max(CalibrationFit.obsid)))
    tiles = _layout_tiles() if newest is None else _tiles_of(session, settings, newest)
    return sorted({rx for _, rx in tiles.values()})


def metrics(session: Session, settings: Settings) -> list[dict[str, Any]]:
    """What ``/metrics`` offers: one metric per receiver, and ``sources``."""
    payloads = [
        {"name": "channel", "label": "Coarse channel", "type": "select", "reloadMetric": False},
        {"name": "source", "label": "Calibrator", "type": "select"},
        {"name": "style", "label": "Style", "type": "select"},
        {"name": "clip", "label": "Clip (m)", "type": "input", "placeholder": "None"},
    ]
    found = [
        {"value": f"rec{rx:02d}", "label": f"Receiver {rx:02d}", "payloads": payloads}
        for rx in receivers(session, settings)
    ]
    return [*found, {"value": "sources", "label": "Calibrator sources", "payloads": []}]


def payload_options(session: Session, name: str) -> list[dict[str, Any]]:
    """The choices of one payload (``/metric-payload-options``)."""
    if name == "style":
        return [{"label": label, "value": value} for label, value in STYLES]
    if name == "clip":
        return [{"label": "None", "value": "None"}] + [
            {"label": f"{c} m", "value": str(c)} for c in (0.5, 1, 2, 5)
        ]
    calibrators = session.execute(
        select(Observation.calibrator_source, Observation.coarse_chans)
        .join(CalibrationFit, CalibrationFit.obsid == Observation.obsid)
    ).all()  # fmt: skip
    if name == "source":
        names = sorted({source for source, _ in calibrators if source})
        return [{"label": "Any", "value": "ANY"}] + [{"label": n, "value": n} for n in names]
    if name == "channel":
        chans = sorted({c for _, coarse in calibrators for c in coarse or []})
        return [{"label": "Any", "value": "ANY"}] + [
            {"label": str(c), "value": str(c)} for c in chans
        ]
    raise BadRequest(f"payload {name!r} is not one of {', '.join(PAYLOADS)}")


def variable(session: Session, settings: Settings, body: Mapping[str, Any]) -> list[dict[str, str]]:
    """Answer ``/variable``: the values a dashboard variable can take, ``{"__text", "__value"}``.

    Parameters
    ----------
    body
        ``{"payload": {"target": one of VARIABLES}, "range": {"from", "to"}}``, as the
        datasource sends it (the payload may also be the target's name as a string, as
        the variable editor's JSON mode can send it). ``range`` bounds ``obsids``
        (all fits without one).

    Raises
    ------
    BadRequest
        A payload without a known target, or a malformed range.
    """
    payload = body.get("payload")
    target = payload.get("target") if isinstance(payload, Mapping) else payload
    if not isinstance(target, str) or target.strip() not in VARIABLES:
        raise BadRequest(
            f"variable needs payload.target, one of {', '.join(VARIABLES)}, not {target!r}"
        )
    target = target.strip()
    if target == "receivers":
        return [{"__text": m["label"], "__value": m["value"]}
                for m in metrics(session, settings) if m["value"] != "sources"]  # fmt: skip
    if target in ("sources", "channels", "styles"):
        options = payload_options(session, target.removesuffix("s"))
        return [{"__text": str(o["label"]), "__value": str(o["value"])} for o in options]
    if target == "tiles":
        newest = session.scalar(select(func.max(CalibrationFit.obsid)))
        tiles = _layout_tiles() if newest is None else _tiles_of(session, settings, newest)
        return [{"__text": name, "__value": name} for _tile, (name, _rx) in sorted(tiles.items())]
    found = select(Observation.obsid, Observation.obsname).join(
        CalibrationFit, CalibrationFit.obsid == Observation.obsid
    )
    if body.get("range") is not None:
        first_gps, last_gps = _time_range(body)
        found = found.where(Observation.obsid >= first_gps, Observation.obsid <= last_gps)
    rows = session.execute(found.distinct().order_by(Observation.obsid.desc())).all()
    return [{"__text": f"{obsid}={name}" if name else str(obsid), "__value": str(obsid)}
            for obsid, name in rows]  # fmt: skip


def tag_keys() -> list[dict[str, str]]:
    """Answer ``/tag-keys``: the keys of the ad-hoc filters ``/query`` applies (none)."""
    return []


def tag_values(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """Answer ``/tag-values`` (``{"key": str}``): the values of an ad-hoc filter key.

    No key is offered (:func:`tag_keys`), so any key has none.

    Raises
    ------
    BadRequest
        Without a ``key`` string.
    """
    key = body.get("key")
    if not isinstance(key, str):
        raise BadRequest(f"tag-values needs the filter's key, a string, not {key!r}")
    return []


def _time_range(body: Mapping[str, Any]) -> tuple[float, float]:
    try:
        span = body["range"]
        start, stop = (
            datetime.fromisoformat(str(span[k]).replace("Z", "+00:00")) for k in ("from", "to")
        )
        # OverflowError: a zone that moves a time past the calendar's ends (9999, year 1).
        return utc_to_gps(start), utc_to_gps(stop)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise BadRequest("query needs range.from and range.to as ISO-8601 times") from exc


def _frame(name: str, ref_id: str, times_ms: list[float], values: list[Any], kind: str = "number",
           labels: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "schema": {"name": name, "refId": ref_id, "fields": [
            {"name": "time", "type": "time"},
            {"name": name, "type": kind, "labels": dict(labels or {})},
        ]},
        "data": {"values": [times_ms, values]},
    }  # fmt: skip


def query(session: Session, settings: Settings, body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Answer ``/query``: frames for every (visible) target."""
    first_gps, last_gps = _time_range(body)
    rows = session.execute(
        select(Observation.obsid, Observation.calibrator_source, Observation.coarse_chans, CalibrationFit.fitid,
               CalibrationFit.reference_tileid)
        .join(CalibrationFit, CalibrationFit.obsid == Observation.obsid)
        .where(Observation.obsid >= first_gps, Observation.obsid <= last_gps)
        .order_by(Observation.obsid, CalibrationFit.fitid)
    ).all()  # fmt: skip
    # One point per observation, from its newest fit (a refit is not another observation).
    rows = list({row.obsid: row for row in rows}.values())
    reference = _common_reference(session, rows)
    frames: list[dict[str, Any]] = []
    # Each calibrator's tiles read once per query, however many receivers are asked for
    # (past the metafits cache's size, every target read every metafits again).
    tiles: dict[int, dict[int, tuple[str, int]]] = {}

    def tiles_of(obsid: int) -> dict[int, tuple[str, int]]:
        if obsid not in tiles:
            tiles[obsid] = _tiles_of(session, settings, obsid)
        return tiles[obsid]

    # Absent or null: no targets (a null value is an absent one, as in the payloads). Any
    # other non-list (an object, an empty one included, or a string) is malformed.
    targets = body.get("targets")
    if targets is None:
        targets = []
    if not isinstance(targets, list):
        raise BadRequest(
            f"targets must be a list of objects with a target name, not {_json_type(targets)}"
        )
    for target in targets:
        if not isinstance(target, Mapping):
            raise BadRequest(f"each of targets must be an object, not {target!r}")
        if target.get("hide") or not target.get("target"):
            continue
        name, ref_id = str(target["target"]), str(target.get("refId", "A"))
        payload = _payload(target.get("payload"))
        if name == "sources":
            frames.append(_frame("sources", ref_id, [gps_to_unix(r.obsid) * 1000 for r in rows],
                                 [r.calibrator_source or "" for r in rows], kind="string"))  # fmt: skip
            continue
        if not (name.startswith("rec") and is_ascii_digits(name[3:])):
            raise BadRequest(f"target {name!r} is not recNN or sources")
        frames += _receiver_frames(
            session, settings, int(name[3:]), ref_id, rows, payload, tiles_of, reference
        )
    return frames


@dataclass(frozen=True)
class CommonReference:
    """The tile a query's delays are referenced to, and each fit's delays of it.

    ``shift_m[fitid]`` is ``(x, y)``: that fit's delays of ``tileid``, subtracted from its
    other tiles' to reference them to ``tileid``; a fit in which ``tileid`` did not
    calibrate is not in it (its delays are left as stored, in series of their own).
    """

    tileid: int | None
    shift_m: Mapping[int, tuple[float, float]]


def _common_reference(session: Session, rows: Sequence[Any]) -> CommonReference:
    """The reference tile most of the query's fits have (ties: the lowest tile id), and
    each fit's delays of that tile (:class:`CommonReference`).

    A fit's delays are relative to its own reference tile. When that tile is flagged in an
    observation the reference moves to another, and every tile's residual jumps by the
    delay between the two: a step in every series that no cable made. Referenced to one
    tile throughout (``d_t - d_ref``, per polarisation), the series show the tiles.
    """
    counts = Counter(r.reference_tileid for r in rows if r.reference_tileid is not None)
    if not counts:
        return CommonReference(None, {})
    tileid = min(counts, key=lambda tile: (-counts[tile], tile))
    found = session.execute(
        select(CalibrationSolution.fitid, CalibrationSolution.x_delay_m, CalibrationSolution.y_delay_m)
        .where(CalibrationSolution.fitid.in_([r.fitid for r in rows]), CalibrationSolution.tileid == tileid)
    ).all()  # fmt: skip
    shift_m = {
        fitid: (float(x), float(y))
        for fitid, x, y in found
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    }
    return CommonReference(tileid, shift_m)


def _json_type(value: object) -> str:
    """What a JSON value is, for a message (``an object``, ``a string``...)."""
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else type(value).__name__


def _payload_text(payload: Mapping[str, Any], key: str, default: str) -> str:
    """A payload option as text: ``default`` when absent or null (a null value is an
    absent one: ``{"source": null}`` is any source), a string as it is, a number (a
    channel, a clip) as its text.

    Raises
    ------
    BadRequest
        For any other JSON value (an object, a list, a boolean), naming the option.
    """
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise BadRequest(
        f"payload {key} must be a string (or null for {default}), not {_json_type(value)}"
    )


def _payload(value: object) -> Mapping[str, Any]:
    """A target's payload: an object, or the JSON text of one (as Grafana's editor sends it)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = loads_request_json(value)
        except ValueError:
            raise BadRequest(f"payload {value!r} is not a JSON object") from None
    if not isinstance(value, Mapping):
        raise BadRequest(f"payload {value!r} is not an object")
    return value


def _receiver_frames(
    session: Session,
    settings: Settings,
    rx: int,
    ref_id: str,
    rows: Sequence[Any],
    payload: Mapping[str, Any],
    tiles_of: Callable[[int], dict[int, tuple[str, int]]],
    reference: CommonReference,
) -> list[dict[str, Any]]:
    """The frames of receiver ``rx``: its tiles in each fit are those its calibrator
    observation's metafits puts on it (tiles move between receivers, and arrays differ).
    ``tiles_of``: an observation's tiles (:func:`_tiles_of`, read once per query).

    Delays are referenced to ``reference.tileid`` (:func:`_common_reference`); those of a
    fit in which that tile did not calibrate are as stored, in series of their own, named
    after that fit's reference (``Tile011 X (ref tile 12)``), so that no series mixes two
    references. The phase-fit quality is no delay: it is never moved."""
    channel, source = (
        _payload_text(payload, "channel", "ANY"),
        _payload_text(payload, "source", "ANY"),
    )
    style = _payload_text(payload, "style", "full")
    if style not in {value for _, value in STYLES}:
        raise BadRequest(f"style {style!r} is not one of {', '.join(v for _, v in STYLES)}")
    clip_text = _payload_text(payload, "clip", "None") or "None"
    try:
        clip = None if clip_text in ("None", "") else float(clip_text)
    except ValueError:
        raise BadRequest(f"clip {clip_text!r} is not a number or None") from None
    if clip is not None and not clip >= 0:
        raise BadRequest(f"clip {clip_text!r} must be a number of metres >= 0, or None")
    if channel != "ANY" and not is_ascii_digits(channel):
        raise BadRequest(f"channel {channel!r} is not a coarse channel number or ANY")
    chosen = [r for r in rows if (channel == "ANY" or (is_ascii_digits(channel) and int(channel) in (r.coarse_chans or [])))
              and (source == "ANY" or r.calibrator_source == source)]  # fmt: skip
    fits = {r.fitid: gps_to_unix(r.obsid) * 1000 for r in chosen}
    array_of = {obsid: tiles_of(obsid) for obsid in {r.obsid for r in chosen}}
    # Per fit, the tiles on this receiver: tile id -> name.
    on_rx = {r.fitid: {tile: name for tile, (name, r_x) in array_of[r.obsid].items() if r_x == rx}
             for r in chosen}  # fmt: skip
    known = {r_x for tiles in array_of.values() for _, r_x in tiles.values()}
    # Any receiver /metrics offers (the newest fit's array) is answered, with empty frames
    # where no fit in range has it: one refused target failed a whole Grafana panel.
    if rx not in known | {r_x for _, r_x in _layout_tiles().values()} and rx not in receivers(
        session, settings
    ):
        raise BadRequest(f"receiver {rx} is not in the array")
    wanted = {tile for tiles in on_rx.values() for tile in tiles}
    solutions = [s for s in session.scalars(
        select(CalibrationSolution).where(CalibrationSolution.fitid.in_(fits), CalibrationSolution.tileid.in_(wanted))
    ) if s.tileid in on_rx[s.fitid]] if fits and wanted else []  # fmt: skip
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    # The reference each series is relative to: the common one, or the fit's own.
    series_reference: dict[str, str] = {}
    per_fit: dict[tuple[float, str], list[float]] = defaultdict(list)
    own_reference = {r.fitid: r.reference_tileid for r in chosen}
    common = "" if reference.tileid is None else str(reference.tileid)

    def add(name: str, point: tuple[float, float], relative_to: str) -> None:
        series[name].append(point)
        series_reference[name] = relative_to

    for s in sorted(solutions, key=lambda s: (fits[s.fitid], s.tileid)):
        when, label = fits[s.fitid], on_rx[s.fitid][s.tileid]
        x, y = _number(s.x_delay_m), _number(s.y_delay_m)
        shift = reference.shift_m.get(s.fitid)
        suffix, relative_to = "", common
        if shift is not None:
            x, y = x - shift[0], y - shift[1]
        elif reference.tileid is not None and style != "quality":
            own = own_reference[s.fitid]
            relative_to = "unknown" if own is None else str(own)
            suffix = f" (ref tile {relative_to})"
        if style == "full":
            add(f"{label} X{suffix}", (when, x), relative_to)
            add(f"{label} Y{suffix}", (when, y), relative_to)
        elif style == "Y-X":
            add(f"{label} Y-X{suffix}", (when, y - x), relative_to)
        elif style == "tilemean":
            add(f"{label}{suffix}",
                (when, float(np.nanmean([x, y])) if np.isfinite([x, y]).any() else math.nan), relative_to)  # fmt: skip
        elif style == "quality":
            add(f"{label} quality", (when, float(np.nanmean([_number(s.x_phase_fit_quality),
                                                              _number(s.y_phase_fit_quality)]))), "")  # fmt: skip
        else:  # recmean: one mean per fit, of values relative to one tile
            per_fit[(when, relative_to if suffix else "")] += [
                v for v in (x, y) if math.isfinite(v)
            ]
    if style == "recmean":
        for (when, own), values in sorted(per_fit.items()):
            if values:
                name = f"rec{rx:02d} mean" + (f" (ref tile {own})" if own else "")
                add(name, (when, float(np.mean(values))), own or common)
    frames = []
    for label, points in series.items():
        kept = [(t, v) for t, v in points if math.isfinite(v) and (clip is None or abs(v) <= clip)]
        if not kept and series_reference[label] not in ("", common):
            continue  # a fit's own reference's series, of nothing (e.g. that tile flagged)
        labels = {"receiver": f"rec{rx:02d}", "style": style}
        if series_reference[label]:
            labels["reference_tile"] = series_reference[label]
        frames.append(
            _frame(label, ref_id, [t for t, _ in kept], [v for _, v in kept], labels=labels)
        )
    return frames


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)
