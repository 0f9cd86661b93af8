"""Fornax A and PKS 2153-69, among the MWA's bright calibrators (specs/trigger.md 3.4), are
targets and calibrators a trigger may name, and ones ``calibrator=True`` may choose.

Missing from the offline catalogue, ``calibrator=ForA`` and ``source=ForA`` were refused, and
the picker never considered them.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from observatory.core.accounts import create_project
from observatory.core.config import Settings
from observatory.trigger import pointing, service

#: 2025-12-20 13:40 UTC, night at the MRO: Fornax A crosses the meridian 80 deg up, the
#: highest calibrator by far (Pictor A is next, at 60 deg).
FORNAX_A_TRANSIT_GPS = 1_450_273_216
KEY = "grb-key-123"


def test_the_picker_chooses_fornax_a_when_it_is_the_highest_calibrator_up() -> None:
    best = pointing.best_calibrator(FORNAX_A_TRANSIT_GPS, min_el_deg=30.0, sun_exclusion_deg=20.0)
    assert best is not None
    source, _, el_deg = best
    assert source.name == "ForA" and el_deg > 79.0


def _trigger(session_factory: sessionmaker[Session], settings: Settings, **raw: Any) -> Any:
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key=KEY)
        session.commit()
        fields = {"project_id": "G0055", "secure_key": KEY, "nobs": 1, "exptime": 16,
                  "freqspecs": "121,24", "pretend": "1", **raw}  # fmt: skip
        # 3.4 s before an 8-s boundary, as a trigger arrives: its first start is the next one.
        return service.trigger_observations(
            session, settings, fields, vcs=False, now=FORNAX_A_TRANSIT_GPS - 3.4
        )


@pytest.mark.parametrize(
    ("source", "calibrator"),
    [("For A", "Fornax A"), ("ForA", "ForA"), ("NGC 1316", "true"), ("PKS 2153-69", "ForA")],
)
def test_a_trigger_observes_them_by_name_and_calibrates_on_fornax_a(
    session_factory: sessionmaker[Session], settings: Settings, source: str, calibrator: str
) -> None:
    result = _trigger(session_factory, settings, source=source, calibrator=calibrator)
    assert result["success"] is True, result["errors"]
    assert result["params"]["calname"] == "ForA"
    expected_target = "PKS2153-69" if source.startswith("PKS") else "ForA"
    assert result["params"]["sourcelist"] == [source]
    assert result["params"]["pointings"][0]["target"] == expected_target
