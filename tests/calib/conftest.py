"""Fixtures of the calibration tests."""

from __future__ import annotations

from collections.abc import Callable
from itertools import count

import pytest
from sqlalchemy.orm import Session, sessionmaker

from observatory.asvo.models import Job, JobState
from observatory.core.accounts import create_user


@pytest.fixture
def asvo_job(session_factory: sessionmaker[Session]) -> Callable[[int], int]:
    """Makes an ASVO job for an observation and returns its id.

    A fit request may only name an ASVO job that exists. The job is cancelled, so that
    a dispatcher running in the test never picks it up.
    """

    numbers = count(1)

    def make(obs_id: int) -> int:
        number = next(numbers)
        with session_factory() as session:
            user, _key = create_user(session, f"calib-user-{number}")
            job = Job(
                user_id=user.id, job_type=1, obs_id=obs_id, state=JobState.CANCELLED.value,
                params={"job_type": "download", "obs_id": str(obs_id)},
                request_key=f"calib-test-{number}", delivery="acacia",
            )  # fmt: skip
            session.add(job)
            session.commit()
            return job.id

    return make
