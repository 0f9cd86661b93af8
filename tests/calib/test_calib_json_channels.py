"""get_cal_json labels the per-channel arrays with their channels, whatever the metafits' order."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from backends import sqlite_only
from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.archive.service import ingest_directory
from observatory.archive.simulated import catalogue_point_source
from observatory.calib.pipeline import fit_observation
from observatory.core.config import Settings
from observatory.core.storage import Storage
from observatory.telescope.simulator import simulate_observation
from observatory.trigger import pointing

CAL_OBS = 1_450_324_816  # 2025-12-21 04:00 UTC: 3C353 is 60 deg up
CHANS = (109, 110, 140, 141)
#: The metafits' CHANNELS as it may be written: not ascending.
HEADER_ORDER = (140, 141, 109, 110)


@sqlite_only
def test_coarse_chans_are_the_order_of_the_arrays_when_channels_is_not_ascending(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """A calibrator whose metafits CHANNELS is 140,141,109,110: its fit's arrays are in
    ascending channel order (mwalib's), and get_cal_json said they were 140,141,109,110."""
    best = pointing.best_calibrator(CAL_OBS + 8, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    out_dir = settings.archive_dir / str(CAL_OBS)
    sim = simulate_observation(out_dir, CAL_OBS, n_tiles=8, coarse_chans=CHANS, n_timesteps=2,
                               sources=[catalogue_point_source(best[0].name)], calibrator=best[0].name,
                               gain_amplitude_scatter=0.2, noise_sigma_jy=1.0)  # fmt: skip
    fits.setval(sim.metafits_path, "CHANNELS", value=",".join(map(str, HEADER_ORDER)))
    with session_factory() as session:
        ingest_directory(session, Storage(settings.archive_dir), out_dir)
        session.commit()
        calibrator = session.get(Observation, CAL_OBS)
        assert calibrator is not None and list(calibrator.coarse_chans) == list(HEADER_ORDER)
        fit_observation(session, settings, CAL_OBS)
        session.commit()
    with TestClient(create_app(settings)) as client:
        reply = client.get(
            "/calib/get_cal_json", params={"obs_id": CAL_OBS, "max_time_separation": 0}
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["coarse_chans"] == sorted(CHANS)
    # Each value under its label is that channel's: the simulator's truth is in CHANS order.
    truth = sim.truth
    position = {chan: index for index, chan in enumerate(CHANS)}
    for antenna, tile in enumerate(body["solutions"]):
        for pol, name in ((0, "x"), (1, "y")):
            gains = np.array(tile[f"{name}_gains"], dtype=float)
            expected = truth.gain_amplitudes[
                antenna, pol, [position[c] for c in body["coarse_chans"]]
            ]
            assert gains == pytest.approx(expected, rel=0.02), (tile["tileid"], name)
