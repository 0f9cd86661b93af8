"""Simulated observations written into the archive: only what is registered stays there,
project ids are checked before anything is written, and the telescope records an
operator's and a resolved calibrator's observations with their positions."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from astropy.io import fits
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from observatory.archive import runner, simulated
from observatory.archive.models import Observation, ObservationFile
from observatory.archive.service import find_observations, schedule_observation
from observatory.archive.simulated import simulate_and_register
from observatory.core.accounts import create_project
from observatory.core.config import Settings
from observatory.telescope.catalogue import UnknownSourceError, lookup
from observatory.telescope.simulator import PointSource
from observatory.trigger import service

observe_due = partial(runner.observe_due, buffer_dumps=service.buffer_dumps)
OBSID = 1480000000
NOW = OBSID + 1000
#: Ids ``create_project`` refuses: PostgreSQL refused the long one only when the
#: observation was registered (SQLite took it), the others only the telescope's metafits.
BAD_PROJECT_IDS = ["ABCDEFGHIJKLMNOPQRSTUVWXYZ", "x" * 68, "é", "", "G 0055", "G-0055"]


def _counts(session: Session) -> tuple[int, int]:
    return (
        session.scalar(select(func.count()).select_from(Observation)) or 0,
        session.scalar(select(func.count()).select_from(ObservationFile)) or 0,
    )


def _archived(settings: Settings, obsid: int) -> list[str]:
    """Every file in the archive directory of ``obsid``, hidden ones too."""
    directory = settings.archive_dir / str(obsid)
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _simulate(session: Session, settings: Settings, **kwargs: Any) -> Observation:
    fields: dict[str, Any] = {"obsid": OBSID, "n_tiles": 4, "coarse_chans": (133,),
                              "n_timesteps": 1, "sources": [PointSource(30.0, -27.0, 10.0)]}  # fmt: skip
    return simulate_and_register(session, settings, **{**fields, **kwargs})


@pytest.mark.parametrize("project_id", BAD_PROJECT_IDS)
def test_a_simulation_of_a_bad_project_id_is_refused_before_anything_is_written(
    session: Session, settings: Settings, project_id: str
) -> None:
    with pytest.raises(ValueError, match=r"must be 1-20 characters of A-Z a-z 0-9 _"):
        _simulate(session, settings, project_id=project_id)
    session.rollback()
    assert _counts(session) == (0, 0)
    assert _archived(settings, OBSID) == []


def _failing_after(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, then a failure, as when the database refuses what it registered."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise RuntimeError("the database refused the registration")

    return fail


def test_a_failed_registration_leaves_no_files_behind(
    session: Session, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files stayed in the archive, unregistered, and a later ingest picked them up."""
    monkeypatch.setattr(simulated, "ingest_directory", _failing_after(simulated.ingest_directory))
    with pytest.raises(RuntimeError, match="refused the registration"):
        _simulate(session, settings)
    session.rollback()
    assert _archived(settings, OBSID) == []
    monkeypatch.undo()
    observation = _simulate(session, settings)  # the obsid can be simulated again
    assert sorted(f.name for f in observation.files) == _archived(settings, OBSID)


def test_parts_a_killed_simulation_left_are_removed(session: Session, settings: Settings) -> None:
    """Ingest skips hidden files, so nothing else would ever remove them."""
    directory = settings.archive_dir / str(OBSID)
    directory.mkdir(parents=True)
    for name in (f".{OBSID}.metafits.0a1b2c3d.part", f".{OBSID}_20261129150624_ch133_000.fits.ffffffff.part"):  # fmt: skip
        (directory / name).write_bytes(b"half written")
    (directory / ".keep").write_text("not the simulation's")
    observation = _simulate(session, settings)
    assert _archived(settings, OBSID) == sorted([".keep", *(f.name for f in observation.files)])


@pytest.mark.parametrize("project_id", [*BAD_PROJECT_IDS, "G9999"])
def test_an_operator_cannot_schedule_a_project_the_telescope_cannot_record(
    session: Session, project_id: str
) -> None:
    """The runner failed to record such an observation, and only logged it."""
    create_project(session, "G0055", priority=1)
    fields: dict[str, Any] = {"start_gps": OBSID, "duration_s": 8, "mode": "MWAX_CORRELATOR",
                              "coarse_chans": [133], "obsname": "by hand", "now_gps_s": OBSID - 100}  # fmt: skip
    message = "is not a known project" if project_id == "G9999" else "must be 1-20 characters"
    with pytest.raises(ValueError, match=message) as caught:
        schedule_observation(session, project_id=project_id, **fields)
    assert repr(project_id) in str(caught.value)
    session.rollback()
    assert _counts(session) == (0, 0)
    # A registered project, and (before any is registered) any well-formed id, are taken.
    create_project(session, "G0055", priority=1)
    assert schedule_observation(session, project_id="G0055", **fields).project_id == "G0055"
    session.rollback()
    assert schedule_observation(session, project_id="D0000", **fields).project_id == "D0000"


def test_an_operators_observation_is_recorded_with_its_position(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Scheduled without a position, it kept none once recorded, though its metafits had one:
    /metadata/obs and find showed null RA and Dec."""
    with session_factory() as session:
        schedule_observation(session, start_gps=OBSID, duration_s=8, mode="MWAX_CORRELATOR",
                             coarse_chans=[133], project_id="D0000", obsname="by hand",
                             now_gps_s=OBSID - 100)  # fmt: skip
        session.commit()
    settings = settings.model_copy(update={"telescope_tiles": 4})
    assert observe_due(session_factory, settings, now=NOW) == [OBSID]
    header = fits.getheader(settings.archive_dir / str(OBSID) / f"{OBSID}.metafits")
    with session_factory() as session:
        (found,), _, _ = find_observations(session, mintime=OBSID, maxtime=OBSID)
        position = (found.ra_deg, found.dec_deg, found.ra_phase_deg, found.dec_phase_deg)
        assert None not in position
        assert position == (header["RA"], header["DEC"], header["RAPHASE"], header["DECPHASE"])


def test_a_calibrator_not_in_the_catalogue_is_recorded_at_its_phase_centre(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """A trigger accepts a calibrator the online resolver found; the telescope looked it up
    in the offline catalogue, failed (UnknownSourceError), and never recorded it."""
    with pytest.raises(UnknownSourceError):
        lookup("3C286")
    with session_factory() as session:
        session.add(Observation(
            obsid=OBSID, stoptime=OBSID + 8, obsname="trigger Cal: 3C286", creator="t",
            project_id="D0000", mode="MWAX_CORRELATOR", ra_deg=202.78, dec_deg=30.5,
            ra_phase_deg=202.78, dec_phase_deg=30.5, az_deg=0, el_deg=30, delays=[0] * 16,
            coarse_chans=[133], calibration=True, calibrator_source="3C286",
            created_by="trigger", deleted=False,
        ))  # fmt: skip
        session.commit()
    settings = settings.model_copy(update={"telescope_tiles": 4})
    assert observe_due(session_factory, settings, now=NOW) == [OBSID]
    directory = settings.archive_dir / str(OBSID)
    assert fits.getheader(directory / f"{OBSID}.metafits")["CALIBSRC"] == "3C286"
    (source,) = json.loads((directory / f"{OBSID}_truth.json").read_text())["sources"]
    assert (source["ra_deg"], source["dec_deg"]) == pytest.approx((202.78, 30.5))


def test_the_telescope_leaves_no_files_of_an_observation_it_failed_to_record(
    settings: Settings, session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nor the parts an earlier, killed recording of it left."""
    with session_factory() as session:
        schedule_observation(session, start_gps=OBSID, duration_s=8, mode="MWAX_CORRELATOR",
                             coarse_chans=[133], project_id="D0000", obsname="by hand",
                             now_gps_s=OBSID - 100)  # fmt: skip
        session.commit()
    directory = settings.archive_dir / str(OBSID)
    directory.mkdir(parents=True)
    (directory / f".{OBSID}.metafits.0a1b2c3d.part").write_bytes(b"half written")
    monkeypatch.setattr(simulated, "ingest_directory", _failing_after(simulated.ingest_directory))
    settings = settings.model_copy(update={"telescope_tiles": 4})
    assert observe_due(session_factory, settings, now=NOW) == []
    assert _archived(settings, OBSID) == []
    with session_factory() as session:
        assert _counts(session) == (1, 0)
