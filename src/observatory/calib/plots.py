"""The summary page's plots of a fit, as PNG (matplotlib, Agg), cached beside the fit.

As the source document describes them:

- ``tilediff``: each tile's X and Y cable-length residuals (large circles) over the
  residuals of all the other tiles of the same observation (small points);
- ``timediff``: each tile's residuals over that tile's residuals in the fits of the
  observations of the previous 7 days, older ones more transparent;
- ``xydiff``: each tile's Y - X residual, over the previous 30 days before that observation;
- ``gains``: each tile's X and Y gain over the coarse channels of the fit;
- ``gaintimes``: each tile's X and Y gain for each coarse channel of the fit, over the
  same tile and channel in the fits of the previous 7 days' observations.

Colours follow the page's legend: ``mwa``/``msok`` fits blue (X) and green (Y),
``calvin`` fits red (X) and orange (Y). The history plots take the other fits of this
fit's observation and of the observations before it (by obsid, not by when the fits ran).
A fit's plots are drawn once and cached; a history plot's cache names the fits it drew
(their count and newest fit id), so a new fit in its window is drawn in when next asked
for, whichever process stored it and whenever it was committed.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from observatory.archive.models import Observation
from observatory.calib.models import CalibrationFit, CalibrationSolution
from observatory.core.config import Settings
from observatory.core.errors import BadRequest

SECONDS_PER_DAY = 86_400
KINDS = ("tilediff", "timediff", "xydiff", "gains", "gaintimes")
COLOURS = {
    "calvin": ("tab:red", "tab:orange"),
    "mwa": ("tab:blue", "tab:green"),
    "msok": ("tab:blue", "tab:green"),
}


def _colours(creator: str) -> tuple[str, str]:
    return COLOURS.get(creator, ("tab:purple", "tab:brown"))


def _value(value: float | None) -> float:
    return np.nan if value is None else float(value)


def _in_history(fit: CalibrationFit, days: int) -> tuple[Any, ...]:
    """Conditions on ``CalibrationFit``: the other fits of this fit's observation and of the
    observations of the ``days`` before it."""
    since = fit.obsid - days * SECONDS_PER_DAY
    return (
        CalibrationFit.obsid >= since,
        CalibrationFit.obsid <= fit.obsid,
        CalibrationFit.fitid != fit.fitid,
    )


def _history(session: Session, fit: CalibrationFit, days: int) -> list[CalibrationFit]:
    """The other fits of this fit's observation and of the observations of the ``days``
    before it, oldest observation first.

    By observation time (the obsid), not by when the fits ran: a calibrator fitted
    again later, or observations reprocessed in bulk, keep their place in time.
    """
    return list(session.scalars(
        select(CalibrationFit).where(*_in_history(fit, days))
        .order_by(CalibrationFit.obsid, CalibrationFit.fitid)
    ))  # fmt: skip


def _history_version(session: Session, fit: CalibrationFit, days: int) -> str:
    """What a history plot of ``fit`` was drawn from: ``<number of fits>-<newest fit id>``
    (fits are added, never changed)."""
    count, newest = session.execute(
        select(func.count(), func.max(CalibrationFit.fitid)).where(*_in_history(fit, days))
    ).one()
    return f"{count}-{newest or 0}"


def _age_alpha(fit: CalibrationFit, other: CalibrationFit, days: int) -> float:
    age = (fit.obsid - other.obsid) / SECONDS_PER_DAY
    return float(np.clip(0.8 * (1.0 - age / days), 0.08, 0.8))


def _gain_matrix(values: Sequence[list[float | None] | None], width: int) -> np.ndarray:
    """Per-channel gain lists as a (rows, width) float array, NaN for None and missing values."""
    return np.array(
        [list((v or [])[:width]) + [None] * (width - len(v or [])) for v in values],
        dtype=float,
    ).reshape(len(values), width)


def _coarse_chans(session: Session, obsids: set[int]) -> dict[int, list[int]]:
    """The coarse channels of observations (sorted: the order of a fit's per-channel arrays)."""
    if not obsids:
        return {}
    found = session.execute(
        select(Observation.obsid, Observation.coarse_chans).where(Observation.obsid.in_(obsids))
    ).all()
    return {int(obsid): sorted(chans or []) for obsid, chans in found}


def figure_of(session: Session, fit: CalibrationFit, kind: str) -> Figure:
    """The matplotlib figure of one plot of ``fit`` (the caller closes it)."""
    if kind not in KINDS:
        raise BadRequest(f"plot {kind!r} is not one of {', '.join(KINDS)}")
    rows = sorted(fit.solutions, key=lambda r: r.tileid)
    tiles = [r.tileid for r in rows]
    position = {tile: i for i, tile in enumerate(tiles)}
    x = np.array([_value(r.x_delay_m) for r in rows])
    y = np.array([_value(r.y_delay_m) for r in rows])
    colour_x, colour_y = _colours(fit.creator)
    figure, axes = plt.subplots(figsize=(max(8.0, 0.12 * len(tiles) + 4), 4.5), dpi=90)
    index = np.arange(len(tiles))
    if kind == "tilediff":
        everything = np.concatenate([x, y])
        everything = everything[np.isfinite(everything)]
        columns = np.repeat(index, len(everything))
        axes.scatter(columns, np.tile(everything, len(index)), s=3, color="0.75", lw=0)
        axes.plot(index, x, "o", color=colour_x, ms=7, label="X")
        axes.plot(index, y, "o", color=colour_y, ms=7, mfc="none", label="Y")
        axes.set_ylabel(f"cable length residual (m){_relative_to(fit)}")
    elif kind in ("timediff", "xydiff"):
        days = 30 if kind == "xydiff" else 7
        earlier = {f.fitid: f for f in _history(session, fit, days)}
        wanted: list[Any] = [CalibrationSolution.fitid, CalibrationSolution.tileid, CalibrationSolution.x_delay_m,
                  CalibrationSolution.y_delay_m]  # fmt: skip
        found = session.execute(
            select(*wanted).where(CalibrationSolution.fitid.in_(earlier), CalibrationSolution.tileid.in_(position))
        ).all() if earlier else []  # fmt: skip
        earlier_values: list[np.ndarray] = []
        if found:
            # Arrays, not per-point calls: a month of hourly fits is ~100,000 points.
            alpha_of = {f: _age_alpha(fit, other, days) for f, other in earlier.items()}
            column = np.array([position[r.tileid] for r in found])
            alpha = np.array([alpha_of[r.fitid] for r in found])
            creator = np.array([earlier[r.fitid].creator for r in found])
            old_x = np.array([r.x_delay_m for r in found], dtype=float)  # None becomes NaN
            old_y = np.array([r.y_delay_m for r in found], dtype=float)
            old_x, old_y, moved = rereference(
                np.array([r.fitid for r in found]), np.array([r.tileid for r in found]),
                old_x, old_y, fit.reference_tileid,
            )  # fmt: skip
            both: np.ndarray = np.logical_and(moved[:, 0], moved[:, 1])
            series: list[tuple[np.ndarray, int, np.ndarray]] = (
                [(old_x, 0, moved[:, 0]), (old_y, 1, moved[:, 1])] if kind == "timediff"
                else [(old_y - old_x, 0, both)]
            )  # fmt: skip
            for values, pol, kept in series:
                # Earlier fits that could not be put on this fit's reference: as stored, as x.
                for marker, chosen in (("o", kept), ("x", ~kept)):
                    if chosen.any():
                        axes.scatter(column[chosen], values[chosen], s=10, marker=marker,
                                     c=_rgba(creator[chosen], pol, alpha[chosen]), lw=0 if marker == "o" else 1)  # fmt: skip
                earlier_values.append(values)
            _creator_legend(axes, set(creator), ("X", "Y") if kind == "timediff" else ("Y - X",))
            _reference_legend(axes, fit, earlier, found, moved)
        own = np.concatenate([x, y]) if kind == "timediff" else y - x
        hidden = _robust_ylim(axes, own, np.concatenate(earlier_values or [np.empty(0)]))
        if hidden:
            axes.plot([], [], " ", label=f"{hidden} earlier outliers off the axis")
        if kind == "timediff":
            axes.plot(index, x, "o", color=colour_x, ms=7, label="X (this fit)")
            axes.plot(index, y, "o", color=colour_y, ms=7, mfc="none", label="Y (this fit)")
            axes.set_ylabel(f"cable length residual (m){_relative_to(fit)}")
        else:
            axes.plot(index, y - x, "o", color=colour_x, ms=7, label="Y - X (this fit)")
            axes.set_ylabel(f"Y - X residual (m){_relative_to(fit)}")
    elif kind == "gaintimes":
        _gaintimes(session, fit, rows, axes)
    else:  # gains
        _gains(session, fit, rows, axes)
    if kind != "gains":
        # Every tile labelled: the figure widens with the tiles (0.12 inch each), which
        # leaves room for a 7-point label per tile however many tiles there are.
        axes.set_xticks(index)
        axes.set_xticklabels([str(tile) for tile in tiles], rotation=90, fontsize=7)
        axes.set_xlim(-1, len(index))
        axes.set_xlabel("tile")
    reference = "" if fit.reference_tileid is None else f", reference tile {fit.reference_tileid}"
    axes.set_title(f"{kind}: fit {fit.fitid} of {fit.obsid} ({fit.creator}{reference})")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    figure.tight_layout()
    return figure


def rereference(
    fitids: np.ndarray, tileids: np.ndarray, x_m: np.ndarray, y_m: np.ndarray,
    common: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Delays of several fits (one row per fit and tile) referenced to the tile ``common``.

    A fit's delays are relative to its own reference tile (0 m there). Relative to tile
    ``c`` instead they are ``d_t - d_c`` (per polarisation): exact, whatever the fit's own
    reference was (recorded or not), and nothing changes for a fit already referenced to
    ``c``. When ``c`` did not calibrate in a fit (no ``d_c``, the usual reason its
    reference moved), that fit's delays cannot be moved: they are returned as stored.

    Parameters
    ----------
    fitids, tileids, x_m, y_m
        One entry per (fit, tile): the fit, the tile, its X and Y delays (NaN: none). The
        rows of ``common`` must be among them.
    common
        The tile to reference to; None leaves every delay as stored (``moved`` all False).

    Returns
    -------
    x_m, y_m, moved
        The delays referenced to ``common`` where possible; ``moved`` (n, 2) says, per row
        and polarisation, whether its fit had ``common`` calibrated (the value is relative
        to ``common``) or not (as stored, relative to another tile).
    """
    moved = np.zeros((len(fitids), 2), dtype=bool)
    if common is None or len(fitids) == 0:
        return x_m, y_m, moved
    fits, inverse = np.unique(fitids, return_inverse=True)
    shift = np.full((len(fits), 2), np.nan)
    is_common = tileids == common
    shift[inverse[is_common], 0] = x_m[is_common]
    shift[inverse[is_common], 1] = y_m[is_common]
    per_row = shift[inverse]  # (n, 2): each row's fit's delays of tile ``common``
    moved = np.isfinite(per_row)
    return (
        np.where(moved[:, 0], x_m - per_row[:, 0], x_m),
        np.where(moved[:, 1], y_m - per_row[:, 1], y_m),
        moved,
    )


def _relative_to(fit: CalibrationFit) -> str:
    """The y axis's note of the reference tile (empty when it is not recorded)."""
    return "" if fit.reference_tileid is None else f", relative to tile {fit.reference_tileid}"


def _reference_legend(
    axes: Axes, fit: CalibrationFit, earlier: dict[int, CalibrationFit], found: Sequence[Any],
    moved: np.ndarray,
) -> None:  # fmt: skip
    """Legend lines saying which earlier fits were put on this fit's reference, and which not."""
    if fit.reference_tileid is None:
        axes.plot([], [], " ", label="reference tile not recorded: earlier fits as stored")
        return
    shown = {r.fitid for r in found}
    both: np.ndarray = np.logical_and(moved[:, 0], moved[:, 1])
    unmoved = {r.fitid for r, ok in zip(found, both.tolist(), strict=True) if not ok}
    other = {f for f in shown if earlier[f].reference_tileid != fit.reference_tileid}
    if moved_fits := len(other - unmoved):
        axes.plot(
            [],
            [],
            " ",
            label=f"{moved_fits} earlier fits re-referenced to tile {fit.reference_tileid}",
        )
    if unmoved:
        axes.plot([], [], "x", color="0.4", ms=4,
                  label=f"{len(unmoved)} earlier fits without tile {fit.reference_tileid}: "
                        "as stored (another reference)")  # fmt: skip


#: The history plots' y axis: this fit's values, and the earlier ones within this many
#: robust standard deviations (1.4826 MAD) of their median, or ROBUST_MIN_HALF_M of it.
ROBUST_SIGMAS = 6.0
ROBUST_MIN_HALF_M = 1.0


def _robust_ylim(axes: Axes, own: np.ndarray, earlier: np.ndarray) -> int:
    """Set a y range that earlier outliers (a fit of noise: delays of +-3000 m) cannot set.

    Every finite value of this fit is inside it; earlier values far from their median
    are left off the axis, unless this fit's values take the axis out to them. Returns how
    many earlier values are off the axis as drawn.
    """
    own, earlier = own[np.isfinite(own)], earlier[np.isfinite(earlier)]
    if earlier.size == 0:
        return 0
    centre = float(np.median(earlier))
    half = max(
        ROBUST_SIGMAS * 1.4826 * float(np.median(np.abs(earlier - centre))), ROBUST_MIN_HALF_M
    )
    kept = earlier[np.abs(earlier - centre) <= half]
    shown = np.concatenate([own, kept])
    low, high = float(shown.min()), float(shown.max())
    pad = max(0.05 * (high - low), 0.05)
    axes.set_ylim(low - pad, high + pad)
    return int(np.count_nonzero((earlier < low - pad) | (earlier > high + pad)))


def _gains(
    session: Session, fit: CalibrationFit, rows: list[CalibrationSolution], axes: Axes
) -> None:
    """Each tile's X and Y gain against the receiver channel number (one line per tile and pol).

    The per-channel values follow the calibrator's coarse channels in ascending order;
    when the observation is not in the archive, the axis is the position among them.
    """
    width = max([0, *(len(r.x_gains or []) for r in rows), *(len(r.y_gains or []) for r in rows)])
    known = _coarse_chans(session, {fit.obsid}).get(fit.obsid, [])
    by_number = len(known) >= width > 0
    channels = np.array(known[:width] if by_number else range(width), dtype=float)
    colour_x, colour_y = _colours(fit.creator)
    if width:
        # One call per polarisation: matplotlib draws a line per column of a 2-D array.
        axes.plot(channels, _gain_matrix([r.x_gains for r in rows], width).T, "-",
                  color=colour_x, alpha=0.5, lw=1, marker="." if width < 4 else None)  # fmt: skip
        axes.plot(channels, _gain_matrix([r.y_gains for r in rows], width).T, "--",
                  color=colour_y, alpha=0.5, lw=1, marker="." if width < 4 else None)  # fmt: skip
    axes.plot([], [], "-", color=colour_x, label="X")
    axes.plot([], [], "--", color=colour_y, label="Y")
    axes.set_xlabel(
        "coarse channel (receiver channel number; x 1.28 MHz is its centre frequency)"
        if by_number else "coarse channel (position in the fit)"
    )  # fmt: skip
    axes.set_ylabel("gain")


def _creator_legend(axes: Axes, creators: set[str], pols: Sequence[str]) -> None:
    """Legend entries for the other fits' colour code: one per creator shown and polarisation."""
    for name in sorted(str(c) for c in creators):
        for pol, label in enumerate(pols):
            # A line, not a scatter: a proxy only, no data (the plot's collections are data).
            axes.plot(
                [], [], "o", ms=4, color=_colours(name)[pol], label=f"other {name} fits, {label}"
            )
    axes.plot([], [], " ", label="(fainter: older)")


def _rgba(creator: np.ndarray, pol: int, alpha: np.ndarray) -> np.ndarray:
    """Per point: the colour of its fit's creator and polarisation, with its age's alpha."""
    rgba = np.zeros((len(creator), 4))
    for name in np.unique(creator):
        rgba[creator == name, :3] = to_rgba(_colours(str(name))[pol])[:3]
    rgba[:, 3] = alpha
    return rgba


def _gaintimes(
    session: Session, fit: CalibrationFit, rows: list[CalibrationSolution], axes: Axes
) -> None:
    """Each tile's X and Y gain per coarse channel, over the same tile and channel in the last 7 days.

    A tile's column holds its channels side by side (lowest channel left). Earlier fits
    are matched by receiver channel number, so a fit with other channels adds only the
    channels this one has.
    """
    days = 7
    earlier = {f.fitid: f for f in _history(session, fit, days)}
    chans_of = _coarse_chans(session, {fit.obsid} | {f.obsid for f in earlier.values()})
    width = max((len(r.x_gains or []) for r in rows), default=0)
    width = max([width, *(len(r.y_gains or []) for r in rows)])
    channels = np.array(chans_of.get(fit.obsid) or range(width), dtype=np.int64)[:width]
    n_chan = max(len(channels), 1)
    offsets = (np.arange(n_chan) - (n_chan - 1) / 2.0) * (0.8 / n_chan)
    index = np.arange(len(rows))
    columns = (index[:, None] + offsets[None, :]).ravel()  # (tile, channel) flattened
    position = {r.tileid: i for i, r in enumerate(rows)}
    found = session.execute(
        select(CalibrationSolution.fitid, CalibrationSolution.tileid, CalibrationSolution.x_gains,
               CalibrationSolution.y_gains)
        .where(CalibrationSolution.fitid.in_(earlier), CalibrationSolution.tileid.in_(position))
    ).all() if earlier and len(channels) else []  # fmt: skip
    if found:
        # Arrays, not per-point calls: a week of hourly fits of 128 tiles is ~500,000 gains.
        widest = max(len(r.x_gains or []) for r in found) or 1
        widest = max([widest, *(len(r.y_gains or []) for r in found)])
        # The channel numbers of each row's values (position order if the observation is unknown).
        chan_rows = {f: np.full(widest, -1, np.int64) for f in earlier}
        for fitid, other in earlier.items():
            known = np.array(chans_of.get(other.obsid) or range(widest), dtype=np.int64)[:widest]
            chan_rows[fitid][: len(known)] = known
        numbers = np.stack([chan_rows[r.fitid] for r in found])  # (rows, widest)
        order = np.argsort(channels)
        slot = np.clip(np.searchsorted(channels[order], numbers), 0, len(channels) - 1)
        place = order[slot]  # where each value goes among this fit's channels
        matched = channels[place] == numbers
        column = (
            np.array([position[r.tileid] for r in found], dtype=float)[:, None] + offsets[place]
        )
        alpha_of = {f: _age_alpha(fit, other, days) for f, other in earlier.items()}
        alpha = np.repeat(np.array([alpha_of[r.fitid] for r in found]), widest).reshape(
            numbers.shape
        )
        creator = np.repeat(np.array([earlier[r.fitid].creator for r in found]), widest).reshape(
            numbers.shape
        )
        for values, pol in ((_gain_matrix([r.x_gains for r in found], widest), 0),
                            (_gain_matrix([r.y_gains for r in found], widest), 1)):  # fmt: skip
            keep = matched & np.isfinite(values)
            axes.scatter(
                column[keep], values[keep], s=6, c=_rgba(creator[keep], pol, alpha[keep]), lw=0
            )
        _creator_legend(axes, {earlier[r.fitid].creator for r in found}, ("X", "Y"))
    colour_x, colour_y = _colours(fit.creator)
    gains_x = _gain_matrix([r.x_gains for r in rows], n_chan).ravel()
    gains_y = _gain_matrix([r.y_gains for r in rows], n_chan).ravel()
    axes.plot(columns, gains_x, "o", color=colour_x, ms=4, label="X (this fit)")
    axes.plot(columns, gains_y, "o", color=colour_y, ms=4, mfc="none", label="Y (this fit)")
    axes.set_ylabel(f"gain per coarse channel ({int(channels[0])}-{int(channels[-1])} left to right)"
                    if len(channels) else "gain per coarse channel")  # fmt: skip


def draw(session: Session, fit: CalibrationFit, kind: str) -> bytes:
    """The PNG of one plot of ``fit``."""
    figure = figure_of(session, fit, kind)
    output = io.BytesIO()
    with np.errstate(all="ignore"):
        figure.savefig(output, format="png")
    plt.close(figure)
    return output.getvalue()


#: The plots that show other fits, and how many days back they look.
HISTORY_KINDS = {"timediff": 7, "gaintimes": 7, "xydiff": 30}


#: The directory of a fit's cached plots: renamed whenever stored fits change in a way the
#: plots show, so that every plot is drawn again (2: migration 0011 negated the delays of
#: version 0.1.0's fits, whose plots, and other fits' history plots, showed the old sign;
#: 3: the history plots put earlier fits on this fit's reference tile, migration 0013).
PLOTS_DIRECTORY = "plots.3"


def cached_plot_path(session: Session, settings: Settings, fit: CalibrationFit, kind: str) -> Path:
    """Where ``plot_png`` keeps a plot: ``<calib dir>/<fitid>/<PLOTS_DIRECTORY>/<kind>.png``,
    and for a history plot ``<kind>.<fits drawn>.png`` (see ``_history_version``)."""
    directory = settings.calib_dir / str(fit.fitid) / PLOTS_DIRECTORY
    if kind in HISTORY_KINDS:
        return directory / f"{kind}.{_history_version(session, fit, HISTORY_KINDS[kind])}.png"
    return directory / f"{kind}.png"


def plot_png(session: Session, settings: Settings, fit: CalibrationFit, kind: str) -> bytes:
    """A plot of ``fit``, drawn once and then read from its cache (``cached_plot_path``)."""
    if kind not in KINDS:
        raise BadRequest(f"plot {kind!r} is not one of {', '.join(KINDS)}")
    path = cached_plot_path(session, settings, fit, kind)
    if path.is_file():
        return path.read_bytes()
    image = draw(session, fit, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.write_bytes(image)
    temporary.replace(path)
    if kind in HISTORY_KINDS:  # drawn from fewer fits (or, <kind>.png, before versions)
        for older in [*path.parent.glob(f"{kind}.*.png"), path.parent / f"{kind}.png"]:
            if older != path:
                older.unlink(missing_ok=True)
    return image


def draw_all(session: Session, settings: Settings, fit: CalibrationFit) -> None:
    """Draw every plot of a new fit into the cache, so that no page view waits for one."""
    for kind in KINDS:
        plot_png(session, settings, fit, kind)
