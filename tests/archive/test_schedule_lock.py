"""An operator's ``observatory schedule observation`` takes the schedule lock triggers take.

What a reviewer reproduced on PostgreSQL: two operators scheduling at the same moment both
passed the overlap check (overlapping observations in 8 of 20 rounds), and a trigger
inserting the obsid an operator was inserting answered 500 (the primary key refused one).
Each test holds one change between its check and its commit and runs another meanwhile.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from observatory.archive import service
from observatory.archive.models import Observation, ScheduleLock
from observatory.core.accounts import create_project
from observatory.core.config import Settings
from observatory.telescope import sky
from threads import in_thread

#: A moment the trigger tests use too (a multiple of 8 less 3.4 s).
NOW = 1_450_324_816 - 3.4
#: Long enough for anything these tests wait for; never reached when the code is right.
JOIN_S = 60.0


def _schedule(session: Session, start: int, duration_s: int, project_id: str = "C001") -> int:
    observation = service.schedule_observation(
        session, start_gps=start, duration_s=duration_s, mode="MWAX_CORRELATOR",
        coarse_chans=[133, 134], project_id=project_id, obsname="by hand", now_gps_s=NOW,
    )  # fmt: skip
    return observation.obsid


def _rows(session_factory: sessionmaker[Session]) -> list[tuple[int, int, str]]:
    with session_factory() as session:
        return [
            (o.obsid, o.stoptime, o.project_id)
            for o in session.scalars(
                select(Observation)
                .where(Observation.deleted.is_(False))
                .order_by(Observation.obsid)
            )
        ]


def _overlaps(rows: list[tuple[int, int, str]]) -> list[tuple[Any, Any]]:
    return [(a, b) for a, b in itertools.pairwise(rows) if a[1] > b[0]]


@pytest.fixture
def held_after_check(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """The first ``schedule_observation`` pauses right after its overlap check (before its
    insert): the first event is set once it is there, the second lets it go on."""
    checked, go_on = threading.Event(), threading.Event()
    real: Callable[..., Observation | None] = service.overlapping_observation
    first = threading.Lock()

    def check_then_pause(*args: Any, **kwargs: Any) -> Observation | None:
        found = real(*args, **kwargs)
        if first.acquire(blocking=False):  # only the first caller pauses
            checked.set()
            go_on.wait(JOIN_S)
        return found

    monkeypatch.setattr(service, "overlapping_observation", check_then_pause)
    yield checked, go_on
    go_on.set()


def _committed(
    session_factory: sessionmaker[Session], change: Callable[[Session], object]
) -> Callable[[], object]:
    def run() -> object:
        with session_factory() as session:
            result = change(session)
            session.commit()
            return result

    return run


def _second_behind_first(
    session_factory: sessionmaker[Session],
    held_after_check: tuple[threading.Event, threading.Event],
    first: Callable[[Session], object],
    second: Callable[[Session], object],
    hold_s: float = 1.0,
) -> tuple[list[object], list[object]]:
    """``first`` until it pauses after its overlap check (holding the lock), ``second``
    meanwhile, for at least ``hold_s`` (a second that does not wait runs to its end before
    the first), then both: their outcomes."""
    checked, go_on = held_after_check
    first_thread, first_outcome = in_thread(_committed(session_factory, first))
    assert checked.wait(JOIN_S)
    second_thread, second_outcome = in_thread(_committed(session_factory, second))
    second_thread.join(hold_s)
    go_on.set()
    first_thread.join(JOIN_S)
    second_thread.join(JOIN_S)
    return first_outcome, second_outcome


def test_two_operators_cannot_schedule_overlapping_observations(
    session_factory: sessionmaker[Session],
    held_after_check: tuple[threading.Event, threading.Event],
) -> None:
    start = 1_450_324_816 + 600
    # The first holds the lock between its check and its commit: the second waits for it.
    first_outcome, second_outcome = _second_behind_first(
        session_factory, held_after_check,
        lambda s: _schedule(s, start, 32), lambda s: _schedule(s, start + 8, 16),
    )  # fmt: skip
    assert first_outcome == [start]
    (refused,) = second_outcome
    assert isinstance(refused, ValueError) and f"overlaps observation {start}" in str(refused)
    assert _rows(session_factory) == [(start, start + 32, "C001")]


def test_a_start_that_passed_while_the_lock_was_waited_for_is_refused(
    session_factory: sessionmaker[Session],
    held_after_check: tuple[threading.Event, threading.Event],
) -> None:
    """The "in the past" check is made with the time after the lock was taken: checked
    before, an operator waiting behind a trigger booked an observation that had begun."""
    later = 1_450_324_816 + 600
    soon = 1_450_324_816  # 3.4 s after NOW: in the future when the call begins
    first_outcome, second_outcome = _second_behind_first(
        session_factory, held_after_check,
        lambda s: _schedule(s, later, 32), lambda s: _schedule(s, soon, 8),
        hold_s=4.0,  # the first holds the lock past ``soon``
    )  # fmt: skip
    assert first_outcome == [later]
    (refused,) = second_outcome
    assert isinstance(refused, ValueError) and f"start {soon} is in the past" in str(refused)
    assert _rows(session_factory) == [(later, later + 32, "C001")]


def test_operators_scheduling_at_the_same_moment_never_overlap(
    session_factory: sessionmaker[Session],
) -> None:
    """The reviewer's race without a pause: both start together at a barrier, each round."""
    for round_number in range(6):
        start = 1_450_324_816 + 1000 * (round_number + 1)
        barrier = threading.Barrier(2)

        def operator(
            offset: int, duration_s: int, barrier: threading.Barrier = barrier, start: int = start
        ) -> Callable[[Session], object]:
            def change(session: Session) -> object:
                barrier.wait(JOIN_S)
                return _schedule(session, start + offset, duration_s)

            return change

        threads = [
            in_thread(_committed(session_factory, operator(0, 32))),
            in_thread(_committed(session_factory, operator(8, 16))),
        ]
        for thread, _ in threads:
            thread.join(JOIN_S)
        outcomes = [outcome[0] for _, outcome in threads]
        assert sum(isinstance(o, int) for o in outcomes) == 1, outcomes
        assert sum(isinstance(o, ValueError) for o in outcomes) == 1, outcomes
    assert _overlaps(_rows(session_factory)) == []


def test_a_trigger_waits_for_an_operator_inserting_its_obsid(
    settings: Settings,
    session_factory: sessionmaker[Session],
    held_after_check: tuple[threading.Event, threading.Event],
) -> None:
    """The operator's observation starts where the trigger's first one does: the trigger
    (the higher priority) replaces it once the operator has committed, instead of inserting
    the same obsid beside it (one of the two then failed: a 500, or the operator's error)."""
    from observatory.trigger import service as trigger_service

    with session_factory() as session:
        create_project(session, "C001", priority=1, secure_key="c001-key-12")
        create_project(session, "D0009", priority=10, secure_key="director-key")
        session.commit()
    start = trigger_service.first_start_gps(NOW)
    checked, go_on = held_after_check
    operator, operator_outcome = in_thread(
        _committed(session_factory, lambda s: _schedule(s, start, 16))
    )
    assert checked.wait(JOIN_S)
    ra = round(float(sky.local_apparent_sidereal_deg([NOW])[0]), 4)
    raw = {"project_id": "D0009", "secure_key": "director-key", "ra": ra, "dec": -26.7,
           "nobs": 1, "exptime": 64, "pretend": "0", "obsname": "trig"}  # fmt: skip
    trigger, trigger_outcome = in_thread(
        _committed(
            session_factory,
            lambda s: trigger_service.trigger_observations(s, settings, raw, vcs=False, now=NOW),
        )
    )
    trigger.join(1.0)
    go_on.set()
    operator.join(JOIN_S)
    trigger.join(JOIN_S)
    assert operator_outcome == [start]  # scheduled, then replaced by the trigger
    (reply,) = trigger_outcome
    assert isinstance(reply, dict) and reply["success"] is True, reply
    assert reply["obsid_list"] == [start]
    rows = _rows(session_factory)
    assert rows == [(start, start + 64, "D0009")] and _overlaps(rows) == []


def test_the_schedule_lock_is_one_table_for_both_domains(
    session_factory: sessionmaker[Session],
) -> None:
    """The lock the trigger service takes is the archive's (moved below both, same table)."""
    from observatory.trigger import service as trigger_service

    assert trigger_service.take_schedule_lock is service.take_schedule_lock
    assert ScheduleLock.__tablename__ == "schedule_lock"
    with session_factory() as session:
        before = session.scalar(select(ScheduleLock.changes).where(ScheduleLock.id == 1))
        _schedule(session, 1_450_324_816 + 600, 16)
        session.commit()
        assert session.scalar(select(ScheduleLock.changes).where(ScheduleLock.id == 1)) == (
            (before or 0) + 1
        )


def test_a_missing_lock_row_is_an_error_not_an_unlocked_change(
    session_factory: sessionmaker[Session],
) -> None:
    with session_factory() as session:
        session.execute(delete(ScheduleLock))
        with pytest.raises(RuntimeError, match="schedule lock"):
            _schedule(session, 1_450_324_816 + 600, 16)
        session.rollback()
    assert _rows(session_factory) == []
