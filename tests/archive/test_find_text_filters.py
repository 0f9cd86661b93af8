"""/metadata/find's text filters: case-insensitive, and still exact or literal where they were."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from observatory.archive.models import Observation
from observatory.archive.service import find_observations
from observatory.core.errors import BadRequest

FIRST = 1_400_000_000
ROWS = [
    # obsid, project, creator, obsname, mode
    (FIRST, "G0008", "Émile", "HydA_100%_cal", "MWAX_CORRELATOR"),
    (FIRST + 200, "test", "emile", "hyda_x", "MWAX_VCS"),
    (FIRST + 400, "Mixed", "EMILE", "PicA", "HW_LFILES"),
]
A, B, C = (row[0] for row in ROWS)


@pytest.fixture
def filled(session: Session) -> Session:
    for obsid, project, creator, obsname, mode in ROWS:
        session.add(Observation(obsid=obsid, stoptime=obsid + 120, project_id=project,
                                creator=creator, obsname=obsname, mode=mode))  # fmt: skip
    session.commit()
    return session


def found(session: Session, **filters: str) -> list[int]:
    rows, _, total = find_observations(session, with_total=True, **filters)  # type: ignore[arg-type]
    assert total == len(rows)
    return [row.obsid for row in rows]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        # Project codes: whole codes in any case, however they are stored.
        ({"project_id": "g0008"}, [A]),
        ({"project_id": "G0008"}, [A]),
        ({"project_id": "TEST"}, [B]),
        ({"project_id": "Test"}, [B]),
        ({"project_id": "Mixed"}, [C]),
        ({"project_id": "MIXED"}, [C]),
        ({"project_id": "mIxEd"}, [C]),
        # Still whole values, never patterns.
        ({"project_id": "G000"}, []),
        ({"project_id": "G000_"}, []),
        ({"project_id": "%"}, []),
        # Creators: whole values in any case of A-Z; one typed exactly always matches.
        ({"creator": "EMILE"}, [C, B]),
        ({"creator": "Émile"}, [A]),
        ({"creator": "%"}, []),
        # Names: substrings in any case, "%" and "_" taken literally.
        ({"obsname": "HYDA"}, [B, A]),
        ({"obsname": "pica"}, [C]),
        ({"obsname": "100%"}, [A]),
        ({"obsname": "%_c"}, [A]),  # as a pattern it would match "PicA" too
        ({"mode": "mwax_vcs"}, [B]),
        ({"mode": "Hw_LFiles", "creator": "emile"}, [C]),
    ],
)
def test_text_filters_ignore_case(
    filled: Session, filters: dict[str, str], expected: list[int]
) -> None:
    assert found(filled, **filters) == expected


def test_an_unknown_mode_is_named_as_typed(filled: Session) -> None:
    with pytest.raises(BadRequest, match="mode 'mwax_bogus' is not one of"):
        find_observations(filled, mode="mwax_bogus")


def test_a_project_code_in_any_case_is_found_through_the_index(filled: Session) -> None:
    """The lower(project_id) expression index serves the query on both backends (without
    it, a rare code scans the whole table)."""
    from sqlalchemy import event, text

    statements: list[tuple[str, object]] = []

    def capture(_conn: object, _cursor: object, statement: str, parameters: object,
                *_args: object) -> None:  # fmt: skip
        statements.append((statement, parameters))

    engine = filled.get_bind()
    event.listen(engine, "before_cursor_execute", capture)
    try:
        assert found(filled, project_id="mixed") == [C]
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    statement, parameters = next(s for s in statements if "ORDER BY" in s[0])
    connection = filled.connection()
    if engine.dialect.name == "sqlite":
        plan = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
    else:  # a table this small is read whole unless the planner must use an index
        connection.execute(text("SET LOCAL enable_seqscan = off"))
        plan = connection.exec_driver_sql(f"EXPLAIN {statement}", parameters)
    assert "ix_observations_lower_project_id_obsid" in " ".join(str(row) for row in plan)
