"""The portal's sign-in throttle: failed sign-ins under a name make further attempts wait.

Failures are counted per name as typed, known or not (the replies must not tell which names
exist), in the database (every web worker sees them), by one upsert each (attempts at the
same moment each count). A success, or a new password, clears them.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from observatory.core.accounts import (
    SIGN_IN_FREE_FAILURES,
    SIGN_IN_MAX_WAIT_S,
    authenticate_password,
    create_user,
    set_password,
    sign_in_wait_s,
)
from observatory.core.database import utcnow
from observatory.core.errors import TooManyRequests, Unauthorized
from observatory.core.models import SignInFailures, User
from threads import in_thread

PASSWORD = "correct horse battery"


@pytest.fixture
def alice(session: Session) -> User:
    user, _key = create_user(session, "alice", "key-of-alice")
    set_password(session, user, PASSWORD)
    session.commit()
    return user


def _fail(session: Session, name: str, now: datetime) -> None:
    with pytest.raises(Unauthorized):
        authenticate_password(session, name, "wrong password", now=now)
    session.commit()


def test_the_waits_double_from_the_sixth_failure_up_to_fifteen_minutes() -> None:
    waits = [sign_in_wait_s(n) for n in range(SIGN_IN_FREE_FAILURES + 12)]
    assert waits[:SIGN_IN_FREE_FAILURES] == [0] * SIGN_IN_FREE_FAILURES
    assert waits[SIGN_IN_FREE_FAILURES:][:5] == [1, 2, 4, 8, 16]
    assert max(waits) == SIGN_IN_MAX_WAIT_S == sign_in_wait_s(10_000)


@pytest.mark.parametrize("name", ["alice", "nobody-has-this-name"])
def test_a_name_is_throttled_after_five_failures_known_or_not(
    session: Session, alice: User, name: str
) -> None:
    start = utcnow()
    for attempt in range(SIGN_IN_FREE_FAILURES):
        _fail(session, name, start + timedelta(milliseconds=attempt))
    last = start + timedelta(milliseconds=SIGN_IN_FREE_FAILURES - 1)
    with pytest.raises(TooManyRequests) as refused:
        authenticate_password(session, name, PASSWORD, now=last + timedelta(milliseconds=500))
    assert refused.value.retry_after_s == 1
    assert str(refused.value) == "too many failed sign-ins under this name: try again in 1 s"
    # A refused attempt is no failure: once the wait is over, the next is checked.
    session.commit()
    later = last + timedelta(seconds=1)
    if name == "alice":
        assert authenticate_password(session, name, PASSWORD, now=later) is alice
        session.commit()
        assert session.scalars(select(SignInFailures)).first() is None  # cleared
    else:
        _fail(session, name, later)
        with pytest.raises(TooManyRequests) as doubled:
            authenticate_password(session, name, PASSWORD, now=later + timedelta(seconds=1))
        assert doubled.value.retry_after_s == 1  # 2 s after the sixth failure, 1 s left


def _row(session: Session) -> SignInFailures:
    row = session.scalars(select(SignInFailures)).first()
    assert row is not None
    return row


def test_other_names_are_not_held_up(session: Session, alice: User) -> None:
    now = utcnow()
    for _ in range(SIGN_IN_FREE_FAILURES + 3):
        try:
            _fail(session, "mallory-guesses", now)
        except TooManyRequests:
            session.rollback()
    assert authenticate_password(session, "alice", PASSWORD, now=now) is alice


def test_failures_a_day_old_are_forgotten_and_deleted(session: Session, alice: User) -> None:
    then = utcnow() - timedelta(days=2)
    for attempt in range(SIGN_IN_FREE_FAILURES + 5):  # each once the wait before it is over
        _fail(session, "alice", then + timedelta(seconds=attempt * SIGN_IN_MAX_WAIT_S))
    _fail(session, "someone-else", utcnow())  # a failure prunes the old rows
    assert [row.failures for row in session.scalars(select(SignInFailures))] == [1]
    assert authenticate_password(session, "alice", PASSWORD) is alice


def test_a_new_password_clears_the_failures(session: Session, alice: User) -> None:
    start = utcnow() - timedelta(hours=3)
    for attempt in range(SIGN_IN_FREE_FAILURES + 5):
        _fail(session, "alice", start + timedelta(seconds=attempt * SIGN_IN_MAX_WAIT_S))
    now = start + timedelta(seconds=(SIGN_IN_FREE_FAILURES + 4) * SIGN_IN_MAX_WAIT_S + 1)
    with pytest.raises(TooManyRequests):
        authenticate_password(session, "alice", PASSWORD, now=now)
    session.rollback()
    set_password(session, session.get(User, alice.id), PASSWORD + "!")  # type: ignore[arg-type]
    session.commit()
    assert authenticate_password(session, "alice", PASSWORD + "!", now=now).id == alice.id


def test_failures_at_the_same_moment_each_count(
    session_factory: sessionmaker[Session], alice: User
) -> None:
    """Eight wrong passwords at once (each checked by scrypt, in its own transaction)."""
    now = utcnow()

    def attempt() -> str:
        with session_factory() as own:
            try:
                authenticate_password(own, "alice", "wrong password", now=now)
            except Unauthorized:
                own.commit()
                return "refused"
            return "signed in"

    attempts = [in_thread(attempt) for _ in range(8)]
    for thread, _outcome in attempts:
        thread.join()
    assert [outcome for _thread, outcome in attempts] == [["refused"]] * 8
    with session_factory() as fresh:
        assert _row(fresh).failures == 8
