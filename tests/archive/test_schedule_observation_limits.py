"""An operator's ``observatory schedule observation`` is held to what a trigger is: at most
2 days long, and a voltage capture only with room for it on the VCS disk.

What a review reproduced: ``--start 1480400000 --duration 99999999999992`` (three million
years) was accepted and blocked the whole schedule; an ``MWAX_VCS`` capture of any length
was accepted whatever the VCS disk held, and drove ``vcsfree`` to 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from observatory.archive import service
from observatory.archive.models import Observation
from observatory.cli import main
from observatory.core.config import Settings
from observatory.core.gpstime import now_gps
from observatory.trigger import service as trigger_service

#: A moment long after the archive's fixtures, before any start these tests use.
NOW_GPS_S = 1_480_000_000.0
START_GPS = 1_480_400_000
#: 24 receiver channels: a capture of the full band, the unit of vcsfree.
FULL_BAND_CHANS = list(range(109, 133))


def _schedule(session: Session, settings: Settings, **fields: object) -> Observation:
    def read_vcs_free_s(session: Session, now_gps_s: float) -> int:
        return trigger_service.vcs_free_s(session, settings, now_gps_s)

    arguments: dict[str, object] = {
        "start_gps": START_GPS, "duration_s": 8, "mode": "MWAX_CORRELATOR",
        "coarse_chans": [133], "project_id": "D0000", "obsname": "by hand",
        "now_gps_s": NOW_GPS_S, "vcs_free_s": read_vcs_free_s,
    }  # fmt: skip
    return service.schedule_observation(session, **{**arguments, **fields})


def _observation_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Observation)) or 0


def test_the_cap_is_the_one_a_trigger_has() -> None:
    assert service.MAX_SCHEDULED_OBSERVATION_S == trigger_service.MAX_TRIGGER_S == 2 * 86400


@pytest.mark.parametrize(
    ("start", "duration", "message"),
    [
        # Three million years, accepted: it blocked the whole schedule.
        (str(START_GPS), "99999999999992", "duration 99999999999992 s is longer than the 172800 s (2 days)"),
        # Scheduled, then refused by /metadata/obs (out of range).
        ("9999999999992", "64", "start 9999999999992 is out of range (1 .. 2999999999)"),
    ],
)  # fmt: skip
def test_the_reported_schedule_commands_are_refused_naming_the_limit(
    tmp_path: Path,
    migrated_db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    start: str,
    duration: str,
    message: str,
) -> None:
    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", migrated_db_url)
    command = ["--data-dir", str(tmp_path / "data"), "schedule", "observation",
               "--start", start, "--duration", duration, "--project", "G0001"]  # fmt: skip
    assert main(command) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("mode", service.SCHEDULABLE_MODES)
def test_two_days_is_the_longest_observation_of_every_mode(
    session: Session, settings: Settings, mode: str
) -> None:
    longest_s = service.MAX_SCHEDULED_OBSERVATION_S
    with pytest.raises(ValueError, match=rf"longer than the {longest_s} s \(2 days\)"):
        _schedule(session, settings, mode=mode, duration_s=longest_s + 8)
    session.rollback()
    assert _observation_count(session) == 0
    observation = _schedule(session, settings, mode=mode, duration_s=longest_s)
    assert observation.stoptime - observation.obsid == longest_s


def test_a_voltage_capture_must_fit_on_the_vcs_disk_as_a_triggered_one_must(
    session: Session, settings: Settings
) -> None:
    free_s = trigger_service.vcs_free_s(session, settings, NOW_GPS_S)
    assert free_s == 12715  # the default disk at the default rate, empty
    # All but 3 s of it, in whole 8-s blocks of 24-channel capture: taken.
    filling_s = free_s // 8 * 8
    _schedule(session, settings, mode="MWAX_VCS", coarse_chans=FULL_BAND_CHANS,
              duration_s=filling_s)  # fmt: skip
    session.commit()
    assert trigger_service.vcsfree_answer_s(session, settings, NOW_GPS_S) == 0
    later = START_GPS + filling_s
    with pytest.raises(ValueError, match=r"needs 8 s of 24-channel capture; the VCS disk has "
                                         r"room for 3 s"):  # fmt: skip
        _schedule(session, settings, mode="MWAX_VCS", coarse_chans=FULL_BAND_CHANS,
                  start_gps=later, duration_s=8)  # fmt: skip
    session.rollback()
    assert _observation_count(session) == 1
    # One coarse channel for 8 s is a third of a second of 24-channel capture: it fits. So
    # do observations that write nothing to the VCS disk.
    _schedule(session, settings, mode="MWAX_VCS", coarse_chans=[133], start_gps=later)
    for offset_s, mode in ((8, "MWAX_CORRELATOR"), (16, "MWAX_BUFFER")):
        _schedule(session, settings, mode=mode, start_gps=later + offset_s, duration_s=8)
    session.commit()
    assert _observation_count(session) == 4


def test_the_command_checks_a_voltage_capture_against_the_vcs_disk(
    tmp_path: Path,
    migrated_db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Within the 2 days, but longer than the (default, empty) VCS disk holds."""
    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", migrated_db_url)
    start = (now_gps() // 8 + 1000) * 8
    command = ["--data-dir", str(tmp_path / "data"), "schedule", "observation", "--start",
               str(start), "--mode", "MWAX_VCS", "--coarse-chans", ",".join(map(str, FULL_BAND_CHANS))]  # fmt: skip
    assert main([*command, "--duration", "86400"]) == 2
    assert "the VCS disk has room for 12715 s" in capsys.readouterr().err
    assert main([*command, "--duration", "12712"]) == 0
    assert "(MWAX_VCS) until" in capsys.readouterr().out


def test_a_voltage_capture_is_not_scheduled_without_a_way_to_read_the_vcs_disk(
    session: Session, settings: Settings
) -> None:
    with pytest.raises(TypeError, match="needs vcs_free_s"):
        _schedule(session, settings, mode="MWAX_VCS", vcs_free_s=None)
