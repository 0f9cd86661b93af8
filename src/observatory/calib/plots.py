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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
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
        for i in index:
            axes.plot(np.full(len(everything), i), everything, ".", color="0.75", ms=2)
        axes.plot(index, x, "o", color=colour_x, ms=7, label="X")
        axes.plot(index, y, "o", color=colour_y, ms=7, mfc="none", label="Y")
        axes.set_ylabel("cable length residual (m)")
    elif kind in ("timediff", "xydiff"):
        days = 7 if kind == "timediff" else 30
        earlier = _history(session, fit, days)
        solutions = session.scalars(
            select(CalibrationSolution).where(CalibrationSolution.fitid.in_([f.fitid for f in earlier]))
        ).all() if earlier else []  # fmt: skip
        by_fit = {f.fitid: f for f in earlier}
        for s in solutions:
            if s.tileid not in position:
                continue
            other = by_fit[s.fitid]
            alpha = _age_alpha(fit, other, days)
            ox, oy = _colours(other.creator)
            column = position[s.tileid]
            if kind == "timediff":
                axes.plot(column, _value(s.x_delay_m), ".", color=ox, alpha=alpha, ms=4)
                axes.plot(column, _value(s.y_delay_m), ".", color=oy, alpha=alpha, ms=4)
            else:
                difference = _value(s.y_delay_m) - _value(s.x_delay_m)
                axes.plot(column, difference, ".", color=ox, alpha=alpha, ms=4)
        if kind == "timediff":
            axes.plot(index, x, "o", color=colour_x, ms=7, label="X (this fit)")
            axes.plot(index, y, "o", color=colour_y, ms=7, mfc="none", label="Y (this fit)")
            axes.set_ylabel("cable length residual (m)")
        else:
            axes.plot(index, y - x, "o", color=colour_x, ms=7, label="Y - X (this fit)")
            axes.set_ylabel("Y - X residual (m)")
    elif kind == "gains":
        for r in rows:
            gx = np.array([_value(v) for v in r.x_gains])
            gy = np.array([_value(v) for v in r.y_gains])
            axes.plot(np.arange(len(gx)), gx, "-", color=colour_x, alpha=0.5, lw=1)
            axes.plot(np.arange(len(gy)), gy, "--", color=colour_y, alpha=0.5, lw=1)
        axes.plot([], [], "-", color=colour_x, label="X")
        axes.plot([], [], "--", color=colour_y, label="Y")
        axes.set_xlabel("coarse channel (index in the observation)")
        axes.set_ylabel("gain")
    else:  # gaintimes
        earlier = _history(session, fit, 7)
        solutions = session.scalars(
            select(CalibrationSolution).where(CalibrationSolution.fitid.in_([f.fitid for f in earlier]))
        ).all() if earlier else []  # fmt: skip
        by_fit = {f.fitid: f for f in earlier}
        for s in solutions:
            if s.tileid not in position:
                continue
            other = by_fit[s.fitid]
            ox, oy = _colours(other.creator)
            alpha = _age_alpha(fit, other, 7)
            axes.plot(position[s.tileid], np.nanmean([_value(v) for v in s.x_gains] or [np.nan]), ".",
                      color=ox, alpha=alpha, ms=4)  # fmt: skip
            axes.plot(position[s.tileid], np.nanmean([_value(v) for v in s.y_gains] or [np.nan]), ".",
                      color=oy, alpha=alpha, ms=4)  # fmt: skip
        mean_x = [np.nanmean([_value(v) for v in r.x_gains] or [np.nan]) for r in rows]
        mean_y = [np.nanmean([_value(v) for v in r.y_gains] or [np.nan]) for r in rows]
        axes.plot(index, mean_x, "o", color=colour_x, ms=7, label="X (this fit)")
        axes.plot(index, mean_y, "o", color=colour_y, ms=7, mfc="none", label="Y (this fit)")
        axes.set_ylabel("gain (mean over channels)")
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
