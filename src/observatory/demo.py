"""`observatory demo`: a small, complete installation to try the services on."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
from astropy.coordinates import AltAz, SkyCoord
from astropy.time import Time
from rich.console import Console
from sqlalchemy import select

from observatory.archive.models import Observation
from observatory.core.accounts import (
    create_project,
    create_user,
    reset_api_key,
    set_password,
    set_project_key,
)
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory, session_scope
from observatory.core.gpstime import now_gps
from observatory.core.migrate import upgrade
from observatory.core.models import Project, User
from observatory.core.security import new_api_key
from observatory.telescope.catalogue import lookup
from observatory.telescope.simulator import PointSource
from observatory.telescope.site import mwa_location

DEMO_USER = "demo"
DEMO_PROJECT = "D0000"

#: Calibrators from the catalogue whose RAs are spread so that one is always well up.
DEMO_SOURCE_NAMES = ("HydA", "PicA", "3C444", "HerA")


def _demo_source(name: str) -> PointSource:
    entry = lookup(name)
    assert entry.flux_jy_150mhz is not None and entry.spectral_index is not None
    return PointSource(
        entry.ra_deg, entry.dec_deg, entry.flux_jy_150mhz, entry.spectral_index, entry.name
    )


#: (offset from the first observation in s, exposure in s, is a calibrator, obsname prefix)
DEMO_SCHEDULE = (
    (0, 120, True, "demo_cal1"),
    (1200, 296, False, "demo_target1"),
    (3600, 296, False, "demo_target2"),
    (6000, 120, True, "demo_cal2"),
    (8400, 296, False, "demo_target3"),
)


def highest_source(gps_s: float) -> PointSource:
    """The demo source highest in the sky at ``gps_s`` (their RAs are spread so one is always up)."""
    sources = [_demo_source(name) for name in DEMO_SOURCE_NAMES]
    coords = SkyCoord([s.ra_deg for s in sources], [s.dec_deg for s in sources], unit="deg")
    frame = AltAz(obstime=Time(gps_s, format="gps"), location=mwa_location())
    altitudes = coords.transform_to(frame).alt.deg
    return sources[int(np.argmax(altitudes))]


@dataclass
class DemoSummary:
    """What the demo made, for printing."""

    user_name: str
    api_key: str
    password: str  # for the portal
    project_id: str
    project_key: str
    obsids: list[int]


def seed_demo(settings: Settings, console: Console | None = None) -> DemoSummary:
    """Create (or refresh) the demo installation in ``settings.data_dir``.

    Makes the database, a demo user (with a new API key and portal password) and a
    demo trigger project (with a new key), all printed once, and simulates a few small observations over the last
    few hours: calibrators and targets, 4 tiles, 2 coarse channels. Running it
    again keeps the observations and issues new keys.
    """
    from observatory.archive.simulated import simulate_and_register

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    project_key = new_api_key()
    password = secrets.token_urlsafe(12)
    with session_scope(factory) as session:
        user = session.scalar(select(User).where(User.name == DEMO_USER))
        if user is None:
            user, api_key = create_user(session, DEMO_USER, email="demo@example.org")
        else:
            api_key = reset_api_key(session, user)
        set_password(session, user, password)
        project = session.get(Project, DEMO_PROJECT)
        if project is None:
            create_project(
                session, DEMO_PROJECT, priority=1, secure_key=project_key,
                description="Demonstration triggers",
            )  # fmt: skip
        else:
            set_project_key(session, project, project_key)
    # Observations end well before now, on 8-second boundaries as the real schedule's do.
    first = (now_gps() - 4 * 3600) // 8 * 8
    obsids: list[int] = []
    for offset_s, exposure_s, is_calibrator, prefix in DEMO_SCHEDULE:
        obsid = first + offset_s
        source = highest_source(obsid + exposure_s / 2)
        obsname = f"{prefix}_{source.name}"
        with session_scope(factory) as session:
            existing = session.scalar(
                select(Observation).where(Observation.obsname.startswith(prefix + "_"))
            )
            if existing is not None:
                obsids.append(existing.obsid)
                if console is not None:
                    console.print(f"kept {existing.obsid} {existing.obsname}", highlight=False)
                continue
            observation = simulate_and_register(
                session, settings, obsid=obsid, n_tiles=4, coarse_chans=[133, 134],
                fine_chan_khz=80.0, int_time_s=8.0, n_timesteps=exposure_s // 8,
                sources=[source], calibrator=source.name if is_calibrator else None,
                project_id=DEMO_PROJECT,
                obsname=obsname, seed=offset_s,
            )  # fmt: skip
            obsids.append(observation.obsid)
            if console is not None:
                console.print(f"simulated {observation.obsid} {obsname}", highlight=False)
    engine.dispose()
    return DemoSummary(DEMO_USER, api_key, password, DEMO_PROJECT, project_key, obsids)
