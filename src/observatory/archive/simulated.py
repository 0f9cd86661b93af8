"""Simulated observations written straight into the archive and registered there."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from observatory.archive.models import Observation
from observatory.archive.service import get_observation, ingest_directory
from observatory.core.config import Settings
from observatory.core.storage import Storage
from observatory.telescope.simulator import PointSource, simulate_observation


def simulate_and_register(
    session: Session,
    settings: Settings,
    *,
    obsid: int,
    sources: Sequence[PointSource],
    n_tiles: int = 8,
    coarse_chans: Sequence[int] = (133, 134),
    fine_chan_khz: float = 40.0,
    int_time_s: float = 2.0,
    n_timesteps: int = 4,
    calibrator: str | None = None,
    mode: str = "MWAX_CORRELATOR",
    project_id: str = "D0000",
    obsname: str | None = None,
    noise_sigma_jy: float = 1.0,
    seed: int = 0,
) -> Observation:
    """Simulate an observation into ``<archive>/<obsid>/`` and register it like an ingest.

    The telescope points at the first source. Per-tile gain amplitudes (10 %
    scatter) and cable-delay errors (2 ns scatter) are injected; the truth is
    archived beside the data as ``<obsid>_truth.json``.
    """
    if session.get(Observation, obsid) is not None:
        raise ValueError(f"observation {obsid} already exists in the archive")
    out_dir = settings.archive_dir / str(obsid)
    simulate_observation(
        out_dir,
        obsid,
        n_tiles=n_tiles,
        coarse_chans=coarse_chans,
        fine_chan_khz=fine_chan_khz,
        int_time_s=int_time_s,
        n_timesteps=n_timesteps,
        sources=sources,
        mode=mode,
        gain_amplitude_scatter=0.1,
        delay_error_scatter_ns=2.0,
        noise_sigma_jy=noise_sigma_jy,
        seed=seed,
        project_id=project_id,
        obs_name=obsname,
        calibrator=calibrator,
    )
    ingest_directory(session, Storage(settings.archive_dir), out_dir)
    observation = get_observation(session, obsid)
    observation.created_by = "simulator"
    session.flush()
    return observation
