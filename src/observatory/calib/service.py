"""Calibration fits: storing them, choosing the best one for a target, packaging it.

The choice (specs/calib.md section 5 DESIGN, with the source document's defaults):
fits of calibrator observations with the target's coarse channels, its number of
tiles, when both are known its tiles (the same tile id at each metafits antenna index,
the axis of AO-cal solutions) and its analogue attenuation, in which at least half of
the tiles calibrated (``MIN_CALIBRATED_FRACTION``); within ``max_time_separation``
(86400 s, at most ``MAX_TIME_SEPARATION_S``) of the target, after it too unless
``allow_after=0`` (the source document's default is 1); the smallest time separation,
ties going to the newest fit. ``prefer_fitid`` names a fit to use instead, however far
in time (the user chose it), but only one of a calibrator with the target's coarse
channels and tiles: another's solutions are for other frequencies or would be applied
to other tiles, so naming it is a 400. A fit in which no tile calibrated (every
``x_delay_m`` and ``y_delay_m`` NULL) is never a solution: it is not a candidate, and
naming it is a 404 (the source document's "no valid calibration fit").
"""

from __future__ import annotations

import io
import math
import stat
import time
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import numpy as np
from astropy.io import fits
from sqlalchemy import ColumnElement, exists, func, null, or_, select, tuple_
from sqlalchemy.orm import Session

from observatory.archive import service as archive_service
from observatory.archive.models import Observation
from observatory.calib.formats import (
    CalSolutions,
    read_aocal,
    read_hyperdrive,
    write_aocal,
    write_hyperdrive,
)
from observatory.calib.models import CalibrationFit, CalibrationSolution
from observatory.core.config import Settings
from observatory.core.errors import BadRequest, NotFound
from observatory.core.gpstime import MAX_GPS_SECONDS
from observatory.core.storage import Storage
from observatory.telescope.instrument import (
    COARSE_CHAN_WIDTH_HZ,
    SPEED_OF_LIGHT_M_S,
    fine_chan_freqs_hz,
    tile_layout,
)

DEFAULT_MAX_TIME_SEPARATION_S = 86_400
#: A fit is chosen for a target only if at least this fraction of its tiles (the target's
#: tiles: see ``incompatibility``) calibrated; among those, the nearest in time wins. A fit
#: in which 1 of 8 tiles calibrated calibrates 1/8 of the target: a fit of all 8 a few
#: minutes further away is better, while one of 120 of 128 tiles an hour nearer than one
#: of all 128 is still preferred (the array changes with time).
MIN_CALIBRATED_FRACTION = 0.5
#: The largest ``max_time_separation`` taken: the whole range of obsids (GPS seconds), so
#: ``obsid +- separation`` spans the archive and stays far inside a 64-bit SQL integer.
MAX_TIME_SEPARATION_S = MAX_GPS_SECONDS
#: Chanblock width of solutions rebuilt from the table (calvin's Birli setting).
REBUILT_CHANBLOCK_HZ = 40_000
OUTPUT_FORMATS = ("aocal", "auto", "hyperdrive")
#: Permissions of the files in a solution zip (rw-r--r--).
ZIP_MEMBER_MODE = 0o644
#: Australian Western Standard Time (the MWA's; no daylight saving).
AWST = timezone(timedelta(hours=8), "AWST")


@dataclass(frozen=True)
class Candidate:
    """A fit that may calibrate a target: its calibrator and how far in time it is.

    ``filename`` is the fit's hyperdrive FITS in the calibration store, as the source
    document's ``get_cal_fits`` reports it (its key in the store: ``<fitid>/<calid>_solutions.fits``,
    one file per fit), None for a fit with no files.
    """

    fitid: int
    calid: int
    offset_s: int
    filename: str | None


def new_fitid() -> int:
    """A fit id: the Unix time now in microseconds (calvin's convention)."""
    return time.time_ns() // 1000


#: Fit ids below this are legacy Unix seconds (10 digits); newer ones are microseconds (16).
_FITID_MICROSECONDS_FROM = 10**12


def fitid_unix_s(fitid: int) -> int:
    """The Unix second a fit ran, from its id (Unix microseconds; legacy ids are seconds already)."""
    return fitid // 1_000_000 if fitid >= _FITID_MICROSECONDS_FROM else fitid


def target_observation(session: Session, obsid: int) -> Observation:
    """The observation to calibrate.

    Raises
    ------
    BadRequest
        If it is not in the schedule database.
    """
    observation = session.get(Observation, obsid)
    if observation is None or observation.deleted:
        raise BadRequest(f"obs_id {obsid} does not exist in the schedule database")
    return observation


#: Why a calibrator or fit of the target's number of tiles but other tiles, or the same
#: tiles in another antenna order, cannot calibrate it (see :func:`incompatibility`).
OTHER_TILES = "for other tiles"


def incompatibility(
    target: Observation,
    calibrator: Observation,
    *,
    match_attenuation: bool = True,
    fit_tiles: int | None = None,
    same_tiles: bool | None = None,
) -> str | None:
    """Why ``calibrator`` (or its fit) cannot calibrate ``target``, or None when it can.

    Parameters
    ----------
    target, calibrator
        The observation to calibrate, and the calibrator observation (of the fit).
    match_attenuation
        Whether another attenuation rules the calibrator out.
    fit_tiles
        How many tiles the fit has (its ``calibration_solutions`` rows), if a fit is meant.
    same_tiles
        Whether the calibrator (or the fit) has the target's tile id at each antenna
        index (:func:`matching_tiles`); None when the tile ids of either are not known.

    Returns
    -------
    str or None
        The reason, the first of these that applies, in this order:

        - ``"for other coarse channels"``: not exactly the target's;
        - ``"for another number of tiles"``: AO-cal solutions are one per antenna index
          of the array, so a 4-tile calibrator's cannot calibrate 8 tiles. When the
          target's ``n_tiles`` is known, the calibrator's ``n_tiles`` and (when given)
          ``fit_tiles`` must equal it;
        - ``"for another attenuation"``: when both are known and ``match_attenuation``;
        - :data:`OTHER_TILES` (``"for other tiles"``): ``same_tiles`` is False. The same
          number of tiles is not enough: the array is reconfigured (the MWA's compact
          and extended 128-tile layouts) and tiles are swapped for maintenance, and
          solutions indexed by antenna would then be applied, silently, to other
          tiles. The schedule records how many tiles, not which (only metafits and the
          fit's rows do), so the count is the rule when the ids are not known. Checked
          last: finding a calibrator's tile ids may mean reading its metafits, which
          callers then do only for one that passed the cheaper checks.
        - None: it can calibrate the target.
    """
    if sorted(target.coarse_chans or []) != sorted(calibrator.coarse_chans or []):
        return "for other coarse channels"
    if target.n_tiles:
        if calibrator.n_tiles and calibrator.n_tiles != target.n_tiles:
            return "for another number of tiles"
        if fit_tiles is not None and fit_tiles != target.n_tiles:
            return "for another number of tiles"
    if (
        match_attenuation
        and target.atten_db is not None
        and calibrator.atten_db is not None
        and target.atten_db != calibrator.atten_db
    ):
        return "for another attenuation"
    return OTHER_TILES if same_tiles is False else None


def antenna_tiles(session: Session, settings: Settings | None, obsid: int) -> dict[int, int] | None:
    """The tile id at each antenna index of an archived observation, from its metafits.

    The antenna index (TILEDATA ``Antenna``) is the antenna axis of AO-cal solutions
    (specs/calib.md 1.2): a solution applies to an observation only when each index is
    the same tile in both.

    Parameters
    ----------
    session
        A database session.
    settings
        Where the archive is; None when the caller has none (the ids are then unknown).
    obsid
        The observation.

    Returns
    -------
    dict of int to int, or None
        ``{antenna: tile id}``; None when not known (no settings, or no metafits with
        TILEDATA in the archive). Read through :func:`observation_tiles`, whose parse of a
        metafits is cached: asking again for an unchanged file costs a query and a stat.
    """
    if settings is None:
        return None
    tiles = observation_tiles(session, settings, obsid)
    return {row.antenna: tile for tile, row in tiles.items()} or None


def matching_tiles(
    target_tiles: Mapping[int, int] | None, tiles: Mapping[int, int] | None
) -> bool | None:
    """Whether two ``{antenna: tile id}`` maps (:func:`antenna_tiles`) are the same array.

    None when either is not known; the ``same_tiles`` of :func:`incompatibility`.
    """
    if target_tiles is None or tiles is None:
        return None
    return dict(target_tiles) == dict(tiles)


def fit_antenna_tiles(fit: CalibrationFit) -> dict[int, int]:
    """The tile id at each antenna index of a fit (its ``calibration_solutions`` rows)."""
    return {row.antenna: row.tileid for row in fit.solutions}


def rejection_note(rejected: Counter[str]) -> str:
    """``rejected`` (how many candidates each reason left out) as a sentence for a 404.

    For example ``"; 3 within range passed over: 2 for other coarse channels, 1 for another
    attenuation"``.
    """
    if not rejected:
        return ""
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(rejected.items()))
    return f"; {sum(rejected.values())} within range passed over: {parts}"


def has_calibrated_tile() -> ColumnElement[bool]:
    """SQL: the fit has a tile that calibrated (a delay in either polarisation).

    ``store_fit`` stores NaN as NULL, so a tile that failed has NULL delays.
    """
    return exists().where(
        CalibrationSolution.fitid == CalibrationFit.fitid,
        or_(CalibrationSolution.x_delay_m.is_not(None), CalibrationSolution.y_delay_m.is_not(None)),
    )


def calibrated(fit: CalibrationFit) -> bool:
    """Whether any tile of ``fit`` calibrated (a finite delay in either polarisation)."""
    return len(flagged_tiles(fit)) < len(fit.solutions)


def candidate_fits(
    session: Session,
    target: Observation,
    *,
    max_time_separation_s: int = DEFAULT_MAX_TIME_SEPARATION_S,
    allow_after: bool = True,
    match_attenuation: bool = True,
    settings: Settings | None = None,
) -> list[Candidate]:
    """Every fit that may calibrate ``target``, best first (fits with no calibrated tile left out).

    With ``settings`` (where the archive is), a fit of other tiles than those of the
    target's metafits is left out too; without, or with no metafits archived, only the
    number of tiles is compared (:func:`incompatibility`).
    """
    found, _ = _candidates(
        session, target, max_time_separation_s=max_time_separation_s, allow_after=allow_after,
        match_attenuation=match_attenuation,
        target_tiles=antenna_tiles(session, settings, target.obsid),
    )  # fmt: skip
    return found


def _candidates(
    session: Session,
    target: Observation,
    *,
    max_time_separation_s: int,
    allow_after: bool,
    match_attenuation: bool,
    target_tiles: Mapping[int, int] | None,
) -> tuple[list[Candidate], Counter[str]]:
    """``candidate_fits``, and how many fits in range each :func:`incompatibility` left out.

    ``target_tiles`` is the target's ``{antenna: tile id}`` (:func:`antenna_tiles`), None
    when not known.
    """
    latest = target.obsid + (max_time_separation_s if allow_after else 0)
    n_rows = (
        select(func.count())
        .where(CalibrationSolution.fitid == CalibrationFit.fitid)
        .correlate(CalibrationFit)
        .scalar_subquery()
    )
    n_calibrated = (
        select(func.count())
        .where(
            CalibrationSolution.fitid == CalibrationFit.fitid,
            or_(
                CalibrationSolution.x_delay_m.is_not(None),
                CalibrationSolution.y_delay_m.is_not(None),
            ),
        )
        .correlate(CalibrationFit)
        .scalar_subquery()
    )
    # How many of the fit's rows are one of the target's (antenna, tile id) pairs: the fit is
    # of the target's tiles when that is all its rows and all the target's tiles. Counted by
    # the database, like the rows above, so that the many fits a wide range may hold cost no
    # rows fetched and no file read; the target's metafits was read once, by the caller.
    n_same: ColumnElement[Any] = (
        select(func.count())
        .where(
            CalibrationSolution.fitid == CalibrationFit.fitid,
            tuple_(CalibrationSolution.antenna, CalibrationSolution.tileid).in_(
                sorted(target_tiles.items())
            ),
        )
        .correlate(CalibrationFit)
        .scalar_subquery()
        if target_tiles
        else null()
    )
    rows = session.execute(
        select(
            CalibrationFit.fitid,
            CalibrationFit.solution_file,
            n_rows,
            n_calibrated,
            n_same,
            Observation,
        )
        .join(Observation, Observation.obsid == CalibrationFit.obsid)
        .where(
            CalibrationFit.obsid >= target.obsid - max_time_separation_s,
            CalibrationFit.obsid <= latest,
            Observation.calibration.is_(True),
            Observation.deleted.is_(False),
            has_calibrated_tile(),
        )
    )
    found: list[Candidate] = []
    rejected: Counter[str] = Counter()
    for fitid, filename, fit_tiles, fit_calibrated, fit_same, calibrator in rows:
        same_tiles = None if not target_tiles else fit_tiles == fit_same == len(target_tiles)
        reason = incompatibility(
            target, calibrator, match_attenuation=match_attenuation, fit_tiles=fit_tiles,
            same_tiles=same_tiles,
        )  # fmt: skip
        if reason is None and fit_calibrated < MIN_CALIBRATED_FRACTION * fit_tiles:
            reason = "with under half of their tiles calibrated"
        if reason is not None:
            rejected[reason] += 1
            continue
        found.append(Candidate(
            fitid, calibrator.obsid, abs(calibrator.obsid - target.obsid),
            f"{fitid}/{calibrator.obsid}_solutions.fits" if filename else None,
        ))  # fmt: skip
    return sorted(found, key=lambda c: (c.offset_s, -c.fitid)), rejected


def best_fit(
    session: Session,
    obsid: int,
    *,
    max_time_separation_s: int = DEFAULT_MAX_TIME_SEPARATION_S,
    allow_after: bool = True,
    prefer_fitid: int | None = None,
    match_attenuation: bool = True,
    settings: Settings | None = None,
) -> tuple[Observation, CalibrationFit]:
    """The target observation and the fit to calibrate it with.

    ``prefer_fitid`` is used whatever its time separation and attenuation, as long as it
    calibrated and its calibrator has the target's coarse channels and tiles.

    ``settings`` locates the archive, whose metafits of the target says which tile is at
    each antenna index: a fit of other tiles (by its rows) is then refused. Without it,
    or when the target's metafits is not archived, the number of tiles is the rule.

    Raises
    ------
    BadRequest
        For an unknown obsid, or a ``prefer_fitid`` whose calibrator has other coarse
        channels than the target (the body's ``obs_id_coarse_chans`` and
        ``fit_coarse_chans`` list both), another number of tiles (``obs_id_tiles``,
        ``fit_tiles``) or other tiles (``obs_id_tile_ids``, ``fit_tile_ids``: the tile ids
        in antenna order).
    NotFound
        When ``prefer_fitid`` does not exist, has no calibrated tile or its calibrator
        observation is not in the archive, or no fit is within range.
    """
    target = target_observation(session, obsid)
    # Read once for every fit considered (a metafits read per candidate would not scale).
    target_tiles = antenna_tiles(session, settings, target.obsid)
    if prefer_fitid is not None:
        return target, _preferred_fit(session, target, prefer_fitid, target_tiles)
    candidates, rejected = _candidates(
        session, target, max_time_separation_s=max_time_separation_s, allow_after=allow_after,
        match_attenuation=match_attenuation, target_tiles=target_tiles,
    )  # fmt: skip
    if not candidates:
        raise NotFound(
            f"no calibration fit for obs_id {obsid} within {max_time_separation_s} s"
            f"{'' if allow_after else ' before it'} (a calibrator with the same coarse channels, "
            f"tiles and attenuation){rejection_note(rejected)}"
        )
    fit = session.get(CalibrationFit, candidates[0].fitid)
    assert fit is not None
    return target, fit


def _preferred_fit(
    session: Session,
    target: Observation,
    prefer_fitid: int,
    target_tiles: Mapping[int, int] | None,
) -> CalibrationFit:
    """``best_fit``'s ``prefer_fitid``, if it can calibrate ``target`` (see there)."""
    preferred = session.get(CalibrationFit, prefer_fitid)
    if preferred is None:
        raise NotFound(f"prefer_fitid {prefer_fitid} is not a calibration fit")
    if not calibrated(preferred):
        raise NotFound(
            f"prefer_fitid {prefer_fitid} is not a valid calibration fit: no tile of it calibrated"
        )
    calibrator = session.get(Observation, preferred.obsid)
    if calibrator is None:
        # Without its observation the fit's channels are unknown: it cannot be checked.
        raise NotFound(
            f"prefer_fitid {prefer_fitid} is not a valid calibration fit: its calibrator "
            f"observation {preferred.obsid} is not in the archive"
        )
    # The default choice's channel and tile rules, without its attenuation one: the user
    # chose this fit, and another attenuation scales the gains, while other channels are
    # solutions for frequencies the target does not have, and other tiles solutions applied
    # to the wrong tiles (a zip that silently does not apply).
    fit_tiles = fit_antenna_tiles(preferred)
    reason = incompatibility(
        target, calibrator, match_attenuation=False, fit_tiles=len(fit_tiles),
        same_tiles=matching_tiles(target_tiles, fit_tiles),
    )  # fmt: skip
    if reason is None:
        return preferred
    if reason == "for another number of tiles":
        raise BadRequest(
            f"prefer_fitid {prefer_fitid} is a fit of calibrator observation {calibrator.obsid}"
            f" with {len(fit_tiles)} tiles, but obs_id {target.obsid} has {target.n_tiles}: its "
            "solutions (one per antenna of the array) cannot calibrate it",
            extra={"obs_id_tiles": target.n_tiles, "fit_tiles": len(fit_tiles)},
        )
    if reason == OTHER_TILES:
        assert target_tiles is not None  # matching_tiles said False: both are known
        differ = sorted(
            a for a in target_tiles.keys() | fit_tiles.keys()
            if target_tiles.get(a) != fit_tiles.get(a)
        )  # fmt: skip
        first = differ[0]
        in_fit, in_target = (
            "no tile" if tile is None else f"tile {tile}"
            for tile in (fit_tiles.get(first), target_tiles.get(first))
        )
        raise BadRequest(
            f"prefer_fitid {prefer_fitid} is a fit of calibrator observation {calibrator.obsid}"
            f", whose tiles are not those of obs_id {target.obsid} ({len(differ)} of "
            f"{len(target_tiles)} antenna indices differ; antenna {first} is {in_fit} in the "
            f"fit, {in_target} in obs_id {target.obsid}): its solutions (one per antenna index) "
            "would be applied to other tiles",
            extra={
                "obs_id_tile_ids": [target_tiles[a] for a in sorted(target_tiles)],
                "fit_tile_ids": [fit_tiles[a] for a in sorted(fit_tiles)],
            },
        )
    fit_chans = sorted(calibrator.coarse_chans or [])
    obs_chans = sorted(target.coarse_chans or [])
    raise BadRequest(
        f"prefer_fitid {prefer_fitid} is a fit of calibrator observation {calibrator.obsid}"
        f", whose coarse channels {fit_chans} are not those of obs_id {target.obsid} "
        f"{obs_chans}: its solutions cannot calibrate it",
        extra={"obs_id_coarse_chans": obs_chans, "fit_coarse_chans": fit_chans},
    )


# -- the solution files ------------------------------------------------------------------------


def solution_path(settings: Settings, fit: CalibrationFit) -> Path | None:
    """The fit's cached AO-cal file, if it has one on disk."""
    if not fit.solution_file:
        return None
    path = settings.calib_dir / fit.solution_file
    return path if path.is_file() else None


def hyperdrive_path(settings: Settings, fit: CalibrationFit) -> Path | None:
    """The fit's cached hyperdrive FITS (``<calid>_solutions.fits`` beside its AO-cal file), if on disk."""
    if not fit.solution_file:
        return None
    path = (settings.calib_dir / fit.solution_file).with_name(f"{fit.obsid}_solutions.fits")
    return path if path.is_file() else None


def solutions_from_table(session: Session, settings: Settings, fit: CalibrationFit) -> CalSolutions:
    """AO-cal solutions rebuilt from the fit's per-tile rows (``nocache``).

    Per tile and polarisation the Jones element is ``exp(i(2 pi nu L / c + b)) / a(nu)``
    with L = -delay_m (the stored convention), b the intercept and a(nu) the
    fitted inverse amplitude ``pol0 + pol1 nu`` of the coarse channel (its mean gain
    where the line is missing): the phase fit and the gain fit. Cross terms are 0; a
    tile that did not calibrate is NaN (and flagged).

    The layout is the cached file's, from the calibrator's archive record: one
    chanblock per fine channel of its coarse channels (40 kHz when its resolution is
    not recorded), times the centroids of its first and last integrations, and the
    tiles' names (its metafits' when archived).

    Raises
    ------
    NotFound
        When the calibrator observation is not in the archive.
    BadRequest
        When a tile has delays but no gains (one chanblock per coarse channel).
    """
    calibrator = session.get(Observation, fit.obsid)
    if calibrator is None:
        raise NotFound(
            f"calibrator observation {fit.obsid} of fit {fit.fitid} is not in the archive"
        )
    chans = sorted(calibrator.coarse_chans or [])
    freqs = np.concatenate([fine_chan_freqs_hz(c, _chanblock_width_hz(calibrator)) for c in chans])
    per_coarse = len(freqs) // max(len(chans), 1)
    coarse_index = np.repeat(np.arange(len(chans)), per_coarse)
    rows = sorted(fit.solutions, key=lambda r: r.antenna)
    n_ant = max((r.antenna for r in rows), default=-1) + 1
    jones = np.full((1, n_ant, len(freqs), 4), np.nan, dtype=np.complex128)
    without_gains: list[int] = []
    for row in rows:
        for pol, element in (("x", 0), ("y", 3)):
            delay_m, intercept = getattr(row, f"{pol}_delay_m"), getattr(row, f"{pol}_intercept")
            if delay_m is None or intercept is None or not math.isfinite(delay_m):
                continue
            pol0 = _floats(getattr(row, f"{pol}_gains_pol0"), len(chans))
            pol1 = _floats(getattr(row, f"{pol}_gains_pol1"), len(chans))
            mean = _floats(getattr(row, f"{pol}_gains"), len(chans))
            line = pol0[coarse_index] + pol1[coarse_index] * freqs
            inverse_amplitude = np.where(np.isfinite(line) & (line > 0), line, mean[coarse_index])
            if not np.isfinite(inverse_amplitude).any():
                without_gains.append(row.tileid)
            phase = 2.0 * np.pi * freqs * (-delay_m) / SPEED_OF_LIGHT_M_S + intercept
            jones[0, row.antenna, :, element] = np.exp(1j * phase) / inverse_amplitude
        if np.isfinite(jones[0, row.antenna][:, [0, 3]]).any():
            jones[0, row.antenna, :, 1:3] = 0.0
    if without_gains:
        # calvin fits no gain to one chanblock per coarse channel: the rebuilt solutions
        # would be NaN for every tile said calibrated, flagging a whole target.
        raise BadRequest(
            f"fit {fit.fitid} has delays but no gains for tile(s) "
            f"{', '.join(map(str, sorted(set(without_gains))))} (its calibrator has one fine "
            "channel per coarse channel): its solutions cannot be rebuilt from the table; "
            "ask without nocache for the solutions the fit computed"
        )
    start_gps, end_gps = _centroid_range_gps(calibrator)
    names = tile_names(
        [row.tileid for row in rows], observation_tiles(session, settings, fit.obsid)
    )
    antenna_names = [""] * n_ant  # an antenna without a row has no known tile
    for row, name in zip(rows, names, strict=True):
        antenna_names[row.antenna] = name
    return CalSolutions(
        jones=jones, start_gps=start_gps, end_gps=end_gps,
        timeblocks_gps=np.array([[start_gps, end_gps, (start_gps + end_gps) / 2.0]]),
        chanblock_freqs_hz=freqs, obsid=calibrator.obsid, tile_names=antenna_names,
        tile_flags=~np.isfinite(jones[0]).any(axis=(1, 2)),
    )  # fmt: skip


def _chanblock_width_hz(calibrator: Observation) -> int:
    """The calibrator's fine-channel width (the solver's chanblocks), 40 kHz when unknown."""
    if calibrator.freq_res_khz:
        width_hz = round(calibrator.freq_res_khz * 1000)
        if COARSE_CHAN_WIDTH_HZ % width_hz == 0:
            return width_hz
    return REBUILT_CHANBLOCK_HZ


def _centroid_range_gps(calibrator: Observation) -> tuple[float, float]:
    """Centroids of the calibrator's first and last integrations (the solver's timeblock).

    Without a recorded integration time, the observation's start and end.
    """
    stop = float(calibrator.stoptime or calibrator.obsid)
    half_s = (calibrator.int_time_s or 0.0) / 2.0
    if stop - calibrator.obsid < 2 * half_s:
        return float(calibrator.obsid), stop
    return calibrator.obsid + half_s, stop - half_s


def tile_names(
    tile_ids: Sequence[int], known: Mapping[int, MetafitsInput] | None = None
) -> list[str]:
    """The names of tiles, by tile id: from ``known`` (an observation's metafits, see
    :func:`observation_tiles`), else the built-in layout, else the MWA's ``TileNNN``."""
    names = {tile.tile_id: tile.tile_name for tile in tile_layout()}
    names |= {tile: row.tile_name for tile, row in (known or {}).items()}
    return [names.get(tile_id, f"Tile{tile_id:03d}") for tile_id in tile_ids]


def observation_tiles(session: Session, settings: Settings, obsid: int) -> dict[int, MetafitsInput]:
    """Each tile of an archived observation, by tile id, as its metafits' TILEDATA has it
    (name, receiver; the X input's row). Empty when the metafits is not in the archive.

    The tiles' names and receivers are the observation's own: the built-in layout is one
    128-tile configuration, while the array has had others (e.g. 144 tiles on 18 receivers).
    """
    try:
        key = archive_service.metafits_key(session, obsid)
    except NotFound:
        return {}
    storage = Storage(settings.archive_dir)
    try:
        stamp = storage.local_path(key).stat().st_mtime_ns if storage.is_local else 0
        return dict(_archived_tiles(str(settings.archive_dir), key, stamp))
    except (OSError, KeyError, ValueError):  # gone from disk, or no TILEDATA: the layout's
        return {}


@lru_cache(maxsize=256)
def _archived_tiles(
    archive_dir: str, key: str, stamp: int
) -> tuple[tuple[int, MetafitsInput], ...]:
    """``observation_tiles`` of one metafits, read once (``stamp``: its modification time;
    a grafana query reads the metafits of every calibrator in its range)."""
    with Storage(archive_dir).open_read(key) as stream:
        inputs = metafits_inputs(stream)
    return tuple((i.tile, i) for i in inputs if i.pol == "X")


def fit_solutions(
    session: Session, settings: Settings, fit: CalibrationFit, *, nocache: bool = False
) -> CalSolutions:
    """A fit's solutions: its cached files, or rebuilt from its rows (``nocache`` or no file).

    The hyperdrive FITS first: it keeps the chanblock frequencies and times, which let a
    conversion apply the solutions to data at another frequency resolution (by frequency);
    the AO-cal file has neither.
    """
    if not nocache:
        if (hyperdrive := hyperdrive_path(settings, fit)) is not None:
            return read_hyperdrive(hyperdrive)
        if (aocal := solution_path(settings, fit)) is not None:
            return read_aocal(aocal)
    return solutions_from_table(session, settings, fit)


def _floats(values: Sequence[float | None] | None, n: int) -> np.ndarray:
    array = np.full(n, np.nan)
    for i, value in enumerate((values or [])[:n]):
        array[i] = np.nan if value is None else float(value)
    return array


#: The per-tile values of a fit in ``fit_json``, in the ``calibration_solutions`` table's names.
SOLUTION_JSON_FIELDS = tuple(
    f"{pol}_{name}" for pol in ("x", "y") for name in (
        "delay_m", "intercept", "gains", "gains_pol0", "gains_pol1", "gains_sigma_resid",
        "phase_sigma_resid", "phase_chi2dof", "phase_fit_quality", "gains_fit_quality",
    )
)  # fmt: skip


def fit_json(
    session: Session, settings: Settings, target: Observation, fit: CalibrationFit
) -> dict[str, object]:
    """A fit as JSON (``get_cal_json``): what the fit was, and each tile's delay and gain fits.

    The tiles are in the calibrator's metafits Antenna order, with their names (the
    calibrator's metafits, else the built-in layout); the per-coarse-channel arrays are in
    the order of ``coarse_chans``: ascending, as mwalib orders the metafits' channels and
    the pipeline the arrays, whatever the order of the metafits' ``CHANNELS`` (which the
    archive keeps); NaN (a flagged tile, a channel that could not be fitted) is null.
    ``reference_tileid`` and ``reference_tile_name`` name the tile the delays are
    referenced to (null when not known).
    """
    calibrator = session.get(Observation, fit.obsid)
    rows = list(fit.solutions)
    known = observation_tiles(session, settings, fit.obsid)
    names = tile_names([row.tileid for row in rows], known)
    reference = fit.reference_tileid
    reference_name = None if reference is None else tile_names([reference], known)[0]
    return {
        "obs_id": target.obsid,
        "fitid": fit.fitid,
        "cal_obs_id": fit.obsid,
        "time_separation_s": fit.obsid - target.obsid,
        "creator": fit.creator,
        "code_version": fit.code_version,
        "fit_time": fit.fit_time.isoformat(),
        "fit_niter": fit.fit_niter,
        "fit_limit": _null(fit.fit_limit),
        "source_list": fit.source_list,
        "num_sources": fit.num_sources,
        "calibration_command": fit.calibration_command,
        "gain_max_cutoff": _null(fit.gain_max_cutoff),
        "coarse_chans": sorted(calibrator.coarse_chans or []) if calibrator is not None else None,
        "flagged_tiles": flagged_tiles(fit),
        # The tile the delays are referenced to (its own are 0 m): residuals of fits with
        # different references differ by the delays between those tiles.
        "reference_tileid": fit.reference_tileid,
        "reference_tile_name": reference_name,
        "solutions": [
            _nulls({"tileid": row.tileid, "tile_name": name, "antenna": row.antenna}
                   | {field: getattr(row, field) for field in SOLUTION_JSON_FIELDS})
            for row, name in zip(rows, names, strict=True)
        ],
    }  # fmt: skip


def flagged_tiles(fit: CalibrationFit) -> list[int]:
    """Tile ids of the tiles that did not calibrate (no delay fit in either polarisation)."""

    def failed(value: float | None) -> bool:
        return value is None or not math.isfinite(value)

    return sorted(r.tileid for r in fit.solutions if failed(r.x_delay_m) and failed(r.y_delay_m))


FLAGS_SCRIPT = '''#!/usr/bin/env python
"""Flag the tiles of observation {obsid} that did not calibrate (fit {fitid} of {calid}).

In CASA:        casa -c {obsid}_flags.py {obsid}.ms
With casatasks: python {obsid}_flags.py {obsid}.ms
"""

import sys

FLAGGED_TILE_IDS = {tile_ids!r}
FLAGGED_TILE_NAMES = {tile_names!r}


def main(vis):
    if not FLAGGED_TILE_NAMES:
        print("no tiles to flag")
        return
    task = globals().get("flagdata")  # CASA's own session provides it
    if task is None:
        from casatasks import flagdata as task
    task(vis=vis, mode="manual", antenna=",".join(FLAGGED_TILE_NAMES), flagbackup=True)
    print("flagged", len(FLAGGED_TILE_NAMES), "tiles in", vis)


if __name__ == "__main__":
    main(sys.argv[-1])
'''


def check_output_format(output_format: str) -> str:
    """The ``output_format`` of a solution, if it is one of ``OUTPUT_FORMATS``.

    Parameters
    ----------
    output_format
        As the caller gave it; empty means the default, ``aocal`` (as an empty value of
        the other optional parameters does: forms send blanks for what was not filled in).

    Returns
    -------
    str
        ``output_format`` (``aocal`` for an empty one).

    Raises
    ------
    BadRequest
        Naming ``output_format`` and the formats there are.
    """
    if output_format == "":
        return OUTPUT_FORMATS[0]
    if output_format not in OUTPUT_FORMATS:
        raise BadRequest(
            f"output_format {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}"
        )
    return output_format


def solution_zip(
    session: Session,
    settings: Settings,
    target: Observation,
    fit: CalibrationFit,
    *,
    output_format: str = "aocal",
    nocache: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> bytes:
    """The zip ``get_cal_solution`` answers: solutions, flagged tiles, CASA flag script.

    ``<calid>.bin`` (AO-cal; ``output_format=hyperdrive`` gives
    ``<calid>_solutions.fits``), ``<obsid>_flagged_tiles.txt`` (one tile id a line)
    and ``<obsid>_flags.py``. The cached file of the fit in the format asked for
    (its AO-cal ``.bin`` or its hyperdrive FITS, with the obsid, chanblock frequencies,
    tile names and flags the solver wrote) is used unless ``nocache`` or there is none;
    then the solutions are rebuilt from the table.

    Raises
    ------
    BadRequest
        For an unknown ``output_format``.
    """
    output_format = check_output_format(output_format)
    hyperdrive = output_format == "hyperdrive"
    finder = hyperdrive_path if hyperdrive else solution_path
    cached = None if nocache else finder(settings, fit)
    name = f"{fit.obsid}_solutions.fits" if hyperdrive else f"{fit.obsid}.bin"
    if cached is not None:
        solution_bytes = cached.read_bytes()
    else:
        solutions = fit_solutions(session, settings, fit, nocache=nocache)
        writer, suffix = (write_hyperdrive, ".fits") if hyperdrive else (write_aocal, ".bin")
        solution_bytes = _file_bytes(writer, solutions, suffix)
    tiles = flagged_tiles(fit)
    members: dict[str, bytes | str] = {
        name: solution_bytes,
        f"{target.obsid}_flagged_tiles.txt": "".join(f"{t}\n" for t in tiles),
        f"{target.obsid}_flags.py": FLAGS_SCRIPT.format(
            obsid=target.obsid, fitid=fit.fitid, calid=fit.obsid, tile_ids=tiles,
            tile_names=tile_names(tiles, observation_tiles(session, settings, target.obsid)),
        ),
    }  # fmt: skip
    members.update(extra_files or {})
    scratch = io.BytesIO()
    now = time.localtime()[:6]
    with zipfile.ZipFile(scratch, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in members.items():
            # Readable by all when unpacked (rw-r--r--): writestr's default is rw-------,
            # and a cached file's own mode (its atomic write's 0600) would be copied.
            info = zipfile.ZipInfo(member, date_time=now)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | ZIP_MEMBER_MODE) << 16
            archive.writestr(info, data)
    return scratch.getvalue()


def _file_bytes(writer: object, solutions: CalSolutions, suffix: str) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"solutions{suffix}"
        writer(path, solutions)  # type: ignore[operator]
        return path.read_bytes()


def store_fit(
    session: Session,
    settings: Settings,
    obsid: int,
    solutions: CalSolutions,
    tile_rows: Sequence[dict[str, object]],
    *,
    creator: str = "calvin",
    code_version: str = "",
    fit_niter: int | None = None,
    fit_limit: float | None = None,
    source_list: str | None = None,
    num_sources: int | None = None,
    calibration_command: str = "",
    gain_max_cutoff: float | None = None,
    reference_tileid: int | None = None,
) -> CalibrationFit:
    """Record a fit: its AO-cal file in the calibration store, its row and one row per tile.

    ``tile_rows`` hold ``calibration_solutions`` columns (``tileid``, ``antenna``,
    ``x_delay_m``, ...); NaN becomes NULL. ``fit_niter`` and ``fit_limit`` are the fit's
    parameters the summary shows as "Niter/Limit" (our pipeline: the phase-fit iterations
    and the solver's iteration limit). ``reference_tileid`` is the tile the delays are
    referenced to (None: not known).
    """
    fitid = new_fitid()
    while session.get(CalibrationFit, fitid) is not None:
        fitid += 1
    relative = f"{fitid}/{obsid}.bin"
    path = settings.calib_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    write_aocal(path, solutions)
    # hyperdrive's FITS beside it: the same solutions, with frequencies and tile flags.
    write_hyperdrive(path.with_name(f"{obsid}_solutions.fits"), solutions)
    fit = CalibrationFit(
        fitid=fitid, obsid=obsid, creator=creator, code_version=code_version, fit_niter=fit_niter,
        fit_limit=fit_limit, source_list=source_list, num_sources=num_sources,
        calibration_command=calibration_command, gain_max_cutoff=gain_max_cutoff,
        solution_file=relative, reference_tileid=reference_tileid,
    )  # fmt: skip
    fit.solutions = [CalibrationSolution(obsid=obsid, **_nulls(row)) for row in tile_rows]
    session.add(fit)
    session.flush()
    return fit


def _null(value: object) -> object:
    """NaN (a scalar, or the items of a list) to None: JSON and SQL have no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple | np.ndarray):
        return [None if v is None else _null(float(v)) for v in value]
    return value


def _nulls(row: dict[str, object]) -> dict[str, object]:
    """:func:`_null` of every value of ``row``."""
    return {key: _null(value) for key, value in row.items()}


#: Coarse channels a CALIBDATA row holds (the receivers' maximum).
CALIBDATA_COARSE = 24


@dataclass(frozen=True)
class MetafitsInput:
    """A TILEDATA row of a metafits: one rf input (a tile's X or Y)."""

    antenna: int
    tile: int
    tile_name: str
    pol: str
    rx: int


def metafits_inputs(metafits: Path | IO[bytes]) -> list[MetafitsInput]:
    """The TILEDATA rows of a metafits, in its order (what mwalib's rf inputs are)."""
    with fits.open(metafits) as hdus:
        rows = hdus["TILEDATA"].data
        rx = rows["Rx"] if "Rx" in rows.columns.names else np.zeros(len(rows), int)
        return [
            MetafitsInput(int(a), int(t), str(n).strip(), str(p).strip().upper(), int(r))
            for a, t, n, p, r in zip(
                rows["Antenna"], rows["Tile"], rows["TileName"], rows["Pol"], rx, strict=True
            )
        ]


def calibdata_hdu(
    fit: CalibrationFit, target_obsid: int, inputs: Sequence[MetafitsInput] | None = None
) -> fits.BinTableHDU:
    """The fit as a metafits ``CALIBDATA`` table (specs/calib.md 3.6): one row per tile and pol.

    ``inputs`` are the metafits' TILEDATA rows: the table's rows then follow them, as
    mwalib 3.0 requires (it reads row i as TILEDATA's row i, and aborts when the tile
    names differ), each with the fit's values for that tile id (NaN for a tile the fit
    does not have). Without them, the fit's tiles by antenna, Y before X.
    """
    by_tile = {r.tileid: r for r in fit.solutions}
    if inputs is None:
        ordered = sorted(fit.solutions, key=lambda r: r.antenna)
        names = tile_names([r.tileid for r in ordered])
        inputs = [
            MetafitsInput(r.antenna, r.tileid, name, pol, 0)
            for r, name in zip(ordered, names, strict=True)
            for pol in ("Y", "X")
        ]
    n = len(inputs)

    def column(tile: int, pol: str, name: str) -> np.ndarray:
        row = by_tile.get(tile)
        return _floats(None if row is None else getattr(row, f"{pol}_{name}"), CALIBDATA_COARSE)

    def scalar(tile: int, pol: str, name: str) -> float:
        row = by_tile.get(tile)
        value = None if row is None else getattr(row, f"{pol}_{name}")
        return math.nan if value is None else float(value)

    def scalars(name: str) -> np.ndarray:
        return np.array([scalar(i.tile, i.pol.lower(), name) for i in inputs], dtype=np.float32)

    def columns(name: str) -> np.ndarray:
        return np.array([column(i.tile, i.pol.lower(), name) for i in inputs]).reshape(
            n, CALIBDATA_COARSE
        )

    table = fits.BinTableHDU.from_columns([
        fits.Column("Antenna", "I", array=np.array([i.antenna for i in inputs], np.int16)),
        fits.Column("Tile", "I", array=np.array([i.tile for i in inputs], np.int16)),
        fits.Column("TileName", "8A", array=[i.tile_name[:8] for i in inputs]),
        fits.Column("Pol", "A", array=[i.pol for i in inputs]),
        fits.Column("delay_m", "E", unit="m", array=scalars("delay_m")),
        # "Intercept": mwalib reads the column by that name, case and all (the MWA's files
        # have "intercept", which it then reads as 0). Radians, as calvin fits it (their
        # TUNIT says m).
        fits.Column("Intercept", "E", unit="rad", array=scalars("intercept")),
        fits.Column("gains", "24E", array=columns("gains")),
        fits.Column("gains_pol1", "24E", array=columns("gains_pol1")),
        fits.Column("gains_pol0", "24E", array=columns("gains_pol0")),
        fits.Column("phase_fit_quality", "E", array=scalars("phase_fit_quality")),
        fits.Column("gains_fit_quality", "E", array=scalars("gains_fit_quality")),
        # The gain fit's quality, the delays and the gains again under the names mwalib
        # reads (gain_fit_quality; the older layout's Calib_Delay and Calib_Gains, all
        # mwalib 3.0 reads).
        fits.Column("gain_fit_quality", "E", array=scalars("gains_fit_quality")),
        fits.Column("Calib_Delay", "E", unit="m", array=scalars("delay_m")),
        fits.Column("Calib_Gains", "24E", array=columns("gains")),
    ], name="CALIBDATA")  # fmt: skip
    header = table.header
    # mwalib (3.0) reads CALFITID as a 32-bit integer, which a fit id in Unix microseconds
    # (16 digits) overflows, and then refuses the whole metafits. The MWA's own metafits
    # carried seconds there (a 2022 fit: CALFITID=1664491391), so CALFITID is the fit's
    # Unix second, and the full id (what prefer_fitid takes) is in CALFITUS.
    header["CALFITID"] = (fitid_unix_s(fit.fitid), "fit id: Unix s of fit (full id: CALFITUS)")
    header["CALFITUS"] = (fit.fitid, "calibration fit id (Unix microseconds)")
    header["CALOBSID"] = (fit.obsid, "calibrator observation")
    header["TAROBSID"] = (target_obsid, "target observation")
    header["FILENAME"] = (Path(fit.solution_file or f"{fit.obsid}.bin").name, "solutions file")
    header["CALCDVER"] = (fit.code_version or "", "fit code version")
    header["CALDTIME"] = (
        fit.fit_time.astimezone(AWST).isoformat(timespec="seconds"),
        "fit time (AWST)",
    )
    header["CALCRTR"] = (fit.creator, "fit creator")
    # Left out when unknown: mwalib reads CALITERS as an unsigned 16-bit number (a -1 would
    # make it refuse the metafits), and treats a missing key as "not recorded".
    if fit.fit_niter is not None:
        header["CALITERS"] = (fit.fit_niter, "phase fit iterations")
    if fit.fit_limit is not None:
        header["CALITLIM"] = (float(fit.fit_limit), "fit limit")  # mwalib reads a float
    return table


def metafits_with_calibdata(metafits: Path, fit: CalibrationFit, target_obsid: int) -> bytes:
    """A metafits file with the fit's ``CALIBDATA`` table added (replacing one already there)."""
    with fits.open(metafits) as hdus:
        kept = [hdu.copy() for hdu in hdus if hdu.name != "CALIBDATA"]
    output = io.BytesIO()
    table = calibdata_hdu(fit, target_obsid, metafits_inputs(metafits))
    fits.HDUList([*kept, table]).writeto(output)
    return output.getvalue()


# -- the summary pages -------------------------------------------------------------------------


@dataclass(frozen=True)
class FitSummary:
    """A row of the summary table."""

    fit: CalibrationFit
    obsname: str
    fit_time_awst: str


#: The most fits the summary page lists; it says so when a range holds more.
SUMMARY_MAX_FITS = 1000


def fits_between(
    session: Session, first_gps: float, last_gps: float, limit: int = SUMMARY_MAX_FITS
) -> list[FitSummary]:
    """Fits of observations that started between two GPS times, newest first (at most
    ``limit``)."""
    rows = session.execute(
        select(CalibrationFit, Observation.obsname)
        .join(Observation, Observation.obsid == CalibrationFit.obsid, isouter=True)
        .where(CalibrationFit.obsid >= first_gps, CalibrationFit.obsid <= last_gps)
        .order_by(CalibrationFit.obsid.desc(), CalibrationFit.fitid.desc())
        .limit(limit)
    ).all()  # fmt: skip
    return [FitSummary(fit, obsname or "", awst_time(fit)) for fit, obsname in rows]


def awst_time(fit: CalibrationFit) -> str:
    """When the fit ran, in AWST (the MWA's time zone)."""
    return fit.fit_time.astimezone(AWST).strftime("%Y-%m-%d %H:%M:%S AWST")


@dataclass(frozen=True)
class TileResidual:
    """A tile's residuals in a fit; ``receiver`` is None when the tile is unknown.

    ``reference`` marks the tile the fit's delays are referenced to (0 m by construction).
    """

    tileid: int
    name: str
    receiver: int | None
    x_delay_m: float | None
    y_delay_m: float | None
    quality: float | None
    reference: bool = False


@dataclass(frozen=True)
class ReceiverMedian:
    """A receiver's median cable-length residuals in a fit, X and Y apart (None: no tile).

    ``n_x`` and ``n_y`` count the tiles each median is of (the reference tile left out).
    """

    x_delay_m: float | None
    y_delay_m: float | None
    n_x: int
    n_y: int


def fit_residuals(
    fit: CalibrationFit, tiles: Mapping[int, MetafitsInput]
) -> tuple[list[TileResidual], dict[int | None, ReceiverMedian]]:
    """Per tile, and the median residual per receiver, X and Y apart.

    ``tiles`` are the calibrator observation's (:func:`observation_tiles`): each tile's
    name and receiver are as its metafits had them. A tile it does not have (no metafits)
    takes the built-in layout's; one in neither has no receiver (None).

    The reference tile (``fit.reference_tileid``) is in the tiles, marked, but not in its
    receiver's medians: its 0 m is the reference itself, not a measurement, and would pull
    the median of its receiver towards 0. X and Y are not pooled: each polarisation has its
    own cable path and its own reference (the reference tile's X, or Y), and pooling hides a
    receiver whose X and Y disagree.
    """
    layout = {t.tile_id: t for t in tile_layout()}
    rows = sorted(fit.solutions, key=lambda r: r.tileid)
    names = tile_names([row.tileid for row in rows], tiles)
    residuals: list[TileResidual] = []
    for row, name in zip(rows, names, strict=True):
        known, built_in = tiles.get(row.tileid), layout.get(row.tileid)
        receiver = known.rx if known else built_in.rx if built_in else None
        qualities = [q for q in (row.x_phase_fit_quality, row.y_phase_fit_quality) if q is not None]
        residuals.append(TileResidual(
            row.tileid, name, receiver, row.x_delay_m, row.y_delay_m,
            float(np.mean(qualities)) if qualities else None,
            reference=row.tileid == fit.reference_tileid,
        ))  # fmt: skip
    receivers: dict[int | None, tuple[list[float], list[float]]] = {}
    for residual in residuals:
        x_values, y_values = receivers.setdefault(residual.receiver, ([], []))
        if residual.reference:
            continue
        for values, value in ((x_values, residual.x_delay_m), (y_values, residual.y_delay_m)):
            if value is not None and math.isfinite(value):
                values.append(value)
    order = sorted(receivers, key=lambda rx: (rx is None, rx or 0))

    def median(values: list[float]) -> float | None:
        return float(np.median(values)) if values else None

    medians = {
        rx: ReceiverMedian(
            median(receivers[rx][0]), median(receivers[rx][1]),
            len(receivers[rx][0]), len(receivers[rx][1]),
        )
        for rx in order
    }  # fmt: skip
    return residuals, medians
