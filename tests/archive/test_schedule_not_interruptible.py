"""An operator can protect an observation from triggers: ``observatory schedule observation
--not-interruptible``.

docs/trigger.md said observations "can be marked ``interruptible = false``", but nothing
could mark one: every operator's observation could be deleted by any trigger of a project
of higher priority.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.cli import main
from observatory.core.accounts import create_project
from observatory.core.config import Settings
from observatory.core.gpstime import now_gps_precise
from observatory.telescope import sky
from observatory.trigger import service

#: The operator's observation belongs to a low-priority project; the trigger's outranks it.
OWNER, TRIGGERING, TRIGGER_KEY = "C001", "D0009", "director-key"


def _schedule_by_hand(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
) -> int:
    """Schedule an observation of 5 minutes from the next start a trigger could have, as an
    operator does; return its obsid."""
    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", settings.resolved_database_url)
    start = service.first_start_gps(now_gps_precise() + 16)
    command = ["--data-dir", str(settings.data_dir), "schedule", "observation",
               "--start", str(start), "--duration", "304", "--project", OWNER, *extra]  # fmt: skip
    assert main(command) == 0, capsys.readouterr().err
    assert f"scheduled {start} " in capsys.readouterr().out
    return start


def _trigger_now(session_factory: sessionmaker[Session], settings: Settings) -> dict[str, object]:
    """A correlator trigger of the zenith by the higher-priority project."""
    now = now_gps_precise()
    lst = float(sky.local_apparent_sidereal_deg([now])[0])
    with session_factory() as session:
        result: dict[str, object] = service.trigger_observations(session, settings, {
            "project_id": TRIGGERING, "secure_key": TRIGGER_KEY, "pretend": "false",
            "ra": round(lst, 4), "dec": -26.7, "nobs": 1, "exptime": 64,
        }, vcs=False, now=now)  # fmt: skip
    return result


@pytest.mark.parametrize("protected", [True, False])
def test_a_higher_priority_trigger_cannot_override_a_not_interruptible_observation(
    settings: Settings,
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    protected: bool,
) -> None:
    with session_factory() as session:
        create_project(session, OWNER, priority=1)
        create_project(session, TRIGGERING, priority=10, secure_key=TRIGGER_KEY)
        session.commit()
    extra = ["--not-interruptible"] if protected else []
    obsid = _schedule_by_hand(settings, monkeypatch, capsys, extra)
    with session_factory() as session:
        scheduled = session.get(Observation, obsid)
        assert scheduled is not None and scheduled.interruptible is not protected
    # /metadata/obs says so.
    with TestClient(create_app(settings)) as client:
        reply = client.get("/metadata/obs", params={"obs_id": str(obsid)})
    assert reply.status_code == 200 and reply.json()["interruptible"] is not protected

    result = _trigger_now(session_factory, settings)
    with session_factory() as session:
        live = session.scalars(
            select(Observation.obsid).where(Observation.deleted.is_(False))
        ).all()
    if protected:
        assert result["success"] is False
        assert f"{obsid}" in str(result["errors"]) and "not interruptible" in str(result["errors"])
        assert list(live) == [obsid]  # the schedule is as it was
    else:
        # Without the option, the same trigger overrides it (the test can tell the two apart).
        assert result["success"] is True, result["errors"]
        assert result["obsid_list"][0] in live  # obsid_list: the trigger's, in the schedule


def test_the_observations_own_project_may_still_replace_it(
    session: Session, settings: Settings
) -> None:
    """Protection is from other projects' triggers, as docs/trigger.md's rules say."""
    from observatory.archive.service import schedule_observation

    create_project(session, OWNER, priority=1, secure_key="c001-key-12")
    now = now_gps_precise()
    start = service.first_start_gps(now + 16)
    schedule_observation(
        session, start_gps=start, duration_s=304, mode="MWAX_CORRELATOR", coarse_chans=[133],
        project_id=OWNER, obsname="protected", now_gps_s=now, interruptible=False,
    )  # fmt: skip
    session.commit()
    lst = float(sky.local_apparent_sidereal_deg([now])[0])
    result = service.trigger_observations(session, settings, {
        "project_id": OWNER, "secure_key": "c001-key-12", "pretend": "false",
        "ra": round(lst, 4), "dec": -26.7, "nobs": 1, "exptime": 64,
    }, vcs=False, now=now)  # fmt: skip
    assert result["success"] is True, result["errors"]
