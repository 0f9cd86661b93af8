"""The summary page's plots of a fit, as PNG (matplotlib, Agg), cached beside the fit.

As the source document describes them:

- ``tilediff``: each tile's X and Y cable-length residuals (large circles) over the
  residuals of all the other tiles of the same observation (small points);
- ``timediff``: each tile's residuals over that tile's residuals in the fits of the
  previous 7 days, older ones more transparent;
- ``xydiff``: each tile's Y - X residual, over the previous 30 days;
- ``gains``: each tile's X and Y gain over the coarse channels of the fit;
- ``gaintimes``: the gains per tile and channel against the previous 7 days' fits.

Colours follow the page's legend: ``mwa``/``msok`` fits blue (X) and green (Y),
``calvin`` fits red (X) and orange (Y). A fit's plots depend only on it and on
fits before it, so once drawn they never change.
"""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgba
from sqlalchemy import select
from sqlalchemy.orm import Session

from observatory.calib.models import CalibrationFit, CalibrationSolution
from observatory.core.config import Settings
from observatory.core.errors import BadRequest

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


def _mean(values: list[float | None] | None) -> float:
    array = np.array(values or [np.nan], dtype=float)  # None becomes NaN
    finite = array[np.isfinite(array)]
    return float(finite.mean()) if finite.size else np.nan


def _history(session: Session, fit: CalibrationFit, days: int) -> list[CalibrationFit]:
    """Fits of the ``days`` before this one (by fit time), oldest first."""
    since = fit.fit_time - timedelta(days=days)
    return list(session.scalars(
        select(CalibrationFit).where(CalibrationFit.fit_time >= since, CalibrationFit.fit_time < fit.fit_time)
        .order_by(CalibrationFit.fit_time)
    ))  # fmt: skip


def _age_alpha(fit: CalibrationFit, other: CalibrationFit, days: int) -> float:
    age = (fit.fit_time - other.fit_time).total_seconds() / 86400.0
    return float(np.clip(0.8 * (1.0 - age / days), 0.08, 0.8))


def draw(session: Session, fit: CalibrationFit, kind: str) -> bytes:
    """The PNG of one plot of ``fit``."""
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
        axes.set_ylabel("cable length residual (m)")
    elif kind in ("timediff", "xydiff", "gaintimes"):
        days = 30 if kind == "xydiff" else 7
        earlier = {f.fitid: f for f in _history(session, fit, days)}
        wanted: list[Any] = [CalibrationSolution.fitid, CalibrationSolution.tileid, CalibrationSolution.x_delay_m,
                  CalibrationSolution.y_delay_m]  # fmt: skip
        if kind == "gaintimes":  # only this one needs the gain arrays (JSON: the costly part)
            wanted += [CalibrationSolution.x_gains, CalibrationSolution.y_gains]
        found = session.execute(
            select(*wanted).where(CalibrationSolution.fitid.in_(earlier), CalibrationSolution.tileid.in_(position))
        ).all() if earlier else []  # fmt: skip
        if found:
            # Arrays, not per-point calls: a month of hourly fits is ~100,000 points.
            alpha_of = {f: _age_alpha(fit, other, days) for f, other in earlier.items()}
            column = np.array([position[r.tileid] for r in found])
            alpha = np.array([alpha_of[r.fitid] for r in found])
            creator = np.array([earlier[r.fitid].creator for r in found])
            if kind == "timediff":
                series = [(np.array([_value(r.x_delay_m) for r in found]), 0),
                          (np.array([_value(r.y_delay_m) for r in found]), 1)]  # fmt: skip
            elif kind == "xydiff":
                series = [(np.array([_value(r.y_delay_m) - _value(r.x_delay_m) for r in found]), 0)]
            else:
                series = [(np.array([_mean(r.x_gains) for r in found]), 0),
                          (np.array([_mean(r.y_gains) for r in found]), 1)]  # fmt: skip
            for values, pol in series:
                rgba = np.zeros((len(found), 4))
                for name in np.unique(creator):
                    rgba[creator == name, :3] = to_rgba(_colours(str(name))[pol])[:3]
                rgba[:, 3] = alpha
                axes.scatter(column, values, s=10, c=rgba, lw=0)
        if kind == "timediff":
            axes.plot(index, x, "o", color=colour_x, ms=7, label="X (this fit)")
            axes.plot(index, y, "o", color=colour_y, ms=7, mfc="none", label="Y (this fit)")
            axes.set_ylabel("cable length residual (m)")
        elif kind == "xydiff":
            axes.plot(index, y - x, "o", color=colour_x, ms=7, label="Y - X (this fit)")
            axes.set_ylabel("Y - X residual (m)")
        else:
            axes.plot(
                index,
                [_mean(r.x_gains) for r in rows],
                "o",
                color=colour_x,
                ms=7,
                label="X (this fit)",
            )
            axes.plot(index, [_mean(r.y_gains) for r in rows], "o", color=colour_y, ms=7, mfc="none",
                      label="Y (this fit)")  # fmt: skip
            axes.set_ylabel("gain (mean over channels)")
    else:  # gains
        for r in rows:
            gx = np.array([_value(v) for v in r.x_gains])
            gy = np.array([_value(v) for v in r.y_gains])
            axes.plot(np.arange(len(gx)), gx, "-", color=colour_x, alpha=0.5, lw=1)
            axes.plot(np.arange(len(gy)), gy, "--", color=colour_y, alpha=0.5, lw=1)
        axes.plot([], [], "-", color=colour_x, label="X")
        axes.plot([], [], "--", color=colour_y, label="Y")
        axes.set_xlabel("coarse channel (index in the observation)")
        axes.set_ylabel("gain")
    if kind != "gains":
        axes.set_xticks(index[:: max(1, len(index) // 32)])
        axes.set_xticklabels(
            [str(tiles[i]) for i in index[:: max(1, len(index) // 32)]], rotation=90, fontsize=7
        )
        axes.set_xlabel("tile")
    axes.set_title(f"{kind}: fit {fit.fitid} of {fit.obsid} ({fit.creator})")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    output = io.BytesIO()
    with np.errstate(all="ignore"):
        figure.savefig(output, format="png")
    plt.close(figure)
    return output.getvalue()


def plot_png(session: Session, settings: Settings, fit: CalibrationFit, kind: str) -> bytes:
    """A plot of ``fit``, drawn once and then read from ``<calib dir>/<fitid>/plots/``."""
    if kind not in KINDS:
        raise BadRequest(f"plot {kind!r} is not one of {', '.join(KINDS)}")
    path: Path = settings.calib_dir / str(fit.fitid) / "plots" / f"{kind}.png"
    if path.is_file():
        return path.read_bytes()
    image = draw(session, fit, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(image)
    temporary.replace(path)
    return image


def draw_all(session: Session, settings: Settings, fit: CalibrationFit) -> None:
    """Draw every plot of a new fit into the cache, so that no page view waits for one."""
    for kind in KINDS:
        plot_png(session, settings, fit, kind)
