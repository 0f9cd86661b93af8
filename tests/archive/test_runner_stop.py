"""Stopping the simulated telescope while it records: it stops at once, leaving nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from observatory import cli
from observatory.archive import runner
from observatory.archive.models import Observation
from observatory.archive.runner import TelescopeRunner
from observatory.archive.service import schedule_observation
from observatory.core.config import Settings
from observatory.core.gpstime import now_gps
from observatory.telescope import simulator

#: Integrations of the slow observation, and how long each takes to simulate: far longer
#: in all than the server may take to stop.
INTEGRATIONS = 200
SECONDS_PER_INTEGRATION = 0.5


def no_dumps(session: Session) -> dict[int, list[tuple[float, float]]]:
    return {}


@pytest.fixture
def slow_integrations(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Each integration takes ``SECONDS_PER_INTEGRATION`` until the second event is set;
    the first is set at the first integration.

    Waiting on an event rather than sleeping lets the test make a recording fast again, and
    end one that does not stop (as the old runner's did) at once rather than minutes later.
    """
    started = threading.Event()
    done = threading.Event()
    original = simulator._VisibilityEngine.visibilities

    def visibilities(self: object, *args: object, **kwargs: object) -> object:
        started.set()
        done.wait(SECONDS_PER_INTEGRATION)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(simulator._VisibilityEngine, "visibilities", visibilities)
    yield started, done
    done.set()


def test_stopping_the_telescope_while_it_records_cancels_the_recording(
    settings: Settings,
    session_factory: sessionmaker[Session],
    slow_integrations: tuple[threading.Event, threading.Event],
) -> None:
    """``stop`` waited for the observation in hand (a default trigger's took ~50 s), past
    the 45 s the server gives itself to stop: it then exited with status 1, leaving a
    hidden ``.part`` file in the archive."""
    start = now_gps() // 8 * 8 - 8 * 200
    with session_factory() as session:
        schedule_observation(
            session, start_gps=start, duration_s=2 * INTEGRATIONS, mode="MWAX_CORRELATOR",
            coarse_chans=[121], project_id="G0055", obsname="slow", now_gps_s=start - 100,
        )  # fmt: skip
        session.commit()
    settings = settings.model_copy(update={"telescope_tiles": 2})
    telescope = TelescopeRunner(settings, session_factory, no_dumps, poll_s=0.05)
    telescope.start()
    started, fast_again = slow_integrations
    assert started.wait(60), "the telescope never began recording"
    archive = Path(settings.archive_dir)
    out_dir = archive / str(start)
    # Mid-file, in the recording's own staging directory (moved into out_dir once registered).
    assert [p.name for p in archive.glob(f".{start}.staging-*/*") if p.name.endswith(".part")]

    stopping = threading.Thread(target=telescope.stop)
    began = time.monotonic()
    stopping.start()
    stopping.join(20)
    assert not stopping.is_alive(), "stop waited for the whole observation"
    assert time.monotonic() - began < 20
    # No .part file, nor the metafits written before, nor the staging directory.
    assert [p for p in archive.rglob("*") if p != out_dir] == []
    assert not out_dir.exists() or list(out_dir.iterdir()) == []
    with session_factory() as session:
        observation = session.get(Observation, start)
        assert observation is not None and not observation.files

    # Not a failure: at the next start it is recorded, as an observation a kill interrupted.
    fast_again.set()
    assert runner.observe_due(session_factory, settings, buffer_dumps=no_dumps) == [start]
    with session_factory() as session:
        observation = session.get(Observation, start)
        assert observation is not None
        assert sorted(f.kind for f in observation.files).count("mwax_vis") == 1


def test_stopping_waits_less_than_the_server_gives_itself_to_stop() -> None:
    """``observatory serve`` exits (status 1) this long after the stop signal, whatever is
    still running: the telescope's own wait must end well before, as other parts of the
    app stop after it."""
    assert runner.STOP_WAIT_S < (cli.GRACEFUL_SHUTDOWN_S + cli.SHUTDOWN_MARGIN_S) / 2
