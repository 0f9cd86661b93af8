"""The simulated telescope: observes the schedule as it runs.

When a scheduled correlator observation (one a trigger put in the schedule) has
ended and has no files yet, the simulator records it into the archive under its
own obsid, so it can be ordered through ASVO like any other observation.
Voltage captures (MWAX_VCS, VOLTAGE_BUFFER) are not recorded: a simulated
voltage capture is gigabytes per second of data.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker

from observatory.archive.models import Observation, ObservationFile
from observatory.archive.simulated import observe_scheduled
from observatory.core.config import Settings
from observatory.core.gpstime import now_gps

log = logging.getLogger(__name__)

#: Modes the simulated telescope records.
RECORDED_MODES = ("MWAX_CORRELATOR",)


def due_observations(session: Session, now: float, limit: int) -> list[Observation]:
    """Scheduled correlator observations that have ended and have no files, oldest first."""
    return list(session.scalars(
        select(Observation)
        .where(
            Observation.stoptime <= int(now), Observation.deleted.is_(False),
            Observation.created_by == "trigger", Observation.mode.in_(RECORDED_MODES),
            ~exists().where(ObservationFile.obsid == Observation.obsid),
        )
        .order_by(Observation.obsid)
        .limit(limit)
    ))  # fmt: skip


def observe_due(
    session_factory: sessionmaker[Session],
    settings: Settings,
    *,
    now: float | None = None,
    limit: int = 1,
) -> list[int]:
    """Record up to ``limit`` ended observations; returns their obsids.

    Each is simulated and registered in a transaction of its own; one that fails
    is logged and left for the next pass.
    """
    now = now_gps() if now is None else now
    with session_factory() as session:
        due = [o.obsid for o in due_observations(session, now, limit)]
    recorded = []
    for obsid in due:
        with session_factory() as session:
            observation = session.get(Observation, obsid)
            if observation is None:
                continue
            try:
                observe_scheduled(session, settings, observation)
                session.commit()
            except Exception:  # keep the telescope running; the next pass retries
                session.rollback()
                log.exception("could not record observation %s", obsid)
                continue
        recorded.append(obsid)
        log.info("recorded observation %s", obsid)
    return recorded


class TelescopeRunner:
    """A background thread that calls ``observe_due`` every ``poll_s`` seconds."""

    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], *, poll_s: float = 5.0
    ) -> None:
        self._settings = settings
        self._session_factory = session_factory
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telescope", daemon=True)

    def start(self) -> None:
        """Start observing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the observation in hand (waits up to a minute)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                while (
                    observe_due(self._session_factory, self._settings) and not self._stop.is_set()
                ):
                    pass
            except Exception:  # the database may be away for a moment: try again later
                log.exception("telescope pass failed")
