"""The per-resource lock: a second holder of the same lock waits; other kinds and ids do not."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from observatory.core import locks
from observatory.core.config import Settings
from observatory.core.database import make_engine
from observatory.core.locks import resource_lock


@pytest.fixture
def engine(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setattr(locks, "LOCK_POLL_S", 0.05)
    engine = make_engine(settings.resolved_database_url)
    yield engine
    engine.dispose()


class Contender(threading.Thread):
    """Takes a lock in a thread of its own, and holds it until told to let go."""

    def __init__(self, settings: Settings, engine: Engine, kind: str, resource_id: int) -> None:
        super().__init__(name=f"{kind}-{resource_id}", daemon=True)
        self.settings, self.engine = settings, engine
        self.kind, self.resource_id = kind, resource_id
        self.holding = threading.Event()
        self.let_go = threading.Event()

    def run(self) -> None:
        with resource_lock(self.settings, self.engine, self.kind, self.resource_id):
            self.holding.set()
            self.let_go.wait(60)

    def release(self) -> None:
        self.let_go.set()
        self.join(30)
        assert not self.is_alive()


def test_a_second_run_waits_for_the_lock_of_its_own_job_only(
    settings: Settings, engine: Engine
) -> None:
    holder = Contender(settings, engine, "asvo.job", 5)
    holder.start()
    assert holder.holding.wait(30)
    # Calibration request 5 and job 6 have locks of their own: taken at once.
    others = [
        Contender(settings, engine, "calib.request", 5),
        Contender(settings, engine, "asvo.job", 6),
    ]
    same = Contender(settings, engine, "asvo.job", 5)
    try:
        for contender in others:
            contender.start()
            assert contender.holding.wait(30), contender.name
        same.start()
        assert not same.holding.wait(1.0)  # twenty polls: job 5 is still held
        holder.release()
        assert same.holding.wait(30)
    finally:
        for contender in (holder, same, *others):
            if contender.ident is not None:  # started
                contender.release()


@pytest.mark.parametrize("kind", ["", "Asvo.job", "asvo-job", "../job", "asvo/job"])
def test_a_lock_kind_cannot_leave_or_blur_its_lock_file_name(
    settings: Settings, engine: Engine, kind: str
) -> None:
    with pytest.raises(ValueError, match="lock kind"), resource_lock(settings, engine, kind, 1):
        pass
