import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import MetaData, Table, inspect, text
from sqlalchemy import types as sa_types
from sqlalchemy.orm import Session

from observatory.core.accounts import (
    authenticate_api_key,
    check_project_key,
    create_project,
    create_user,
    reset_api_key,
)
from observatory.core.config import ConfigFileError, Settings
from observatory.core.database import make_engine
from observatory.core.errors import Conflict, Unauthorized
from observatory.core.migrate import current_revision, head_revision, upgrade


def test_defaults(tmp_path: Path) -> None:
    settings = Settings()
    assert settings.data_dir == Path("./observatory-data")
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.resolved_database_url.endswith("observatory-data/observatory.sqlite3")
    assert settings.dask_scheduler is None


def test_environment_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "obs.toml"
    config.write_text('data_dir = "/srv/from-toml"\ndask_scheduler = "tcp://127.0.0.1:8786"\n')
    monkeypatch.setenv("OBSERVATORY_CONFIG", str(config))
    settings = Settings()
    assert settings.data_dir == Path("/srv/from-toml")
    assert settings.dask_scheduler == "tcp://127.0.0.1:8786"
    monkeypatch.setenv("OBSERVATORY_DATA_DIR", "/srv/from-env")
    assert Settings().data_dir == Path("/srv/from-env")  # the environment wins


def test_missing_toml_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OBSERVATORY_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        Settings()


def test_a_config_that_is_a_directory_or_not_utf8_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A directory was said not to exist; a Latin-1 file gave "'utf-8' codec can't decode
    ...", naming no file."""
    monkeypatch.setenv("OBSERVATORY_CONFIG", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is a directory, not a file"):
        Settings()
    config = tmp_path / "obs.toml"
    config.write_bytes('data_dir = "/srv/donn\u00e9es"\n'.encode("latin-1"))
    monkeypatch.setenv("OBSERVATORY_CONFIG", str(config))
    with pytest.raises(
        ConfigFileError, match=rf"config file {re.escape(str(config))} .* not UTF-8"
    ):
        Settings()


def test_a_misspelled_setting_in_the_toml_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """It was ignored, and the default used without a word."""
    config = tmp_path / "obs.toml"
    config.write_text('data_dir = "/srv/x"\ndask_schedular = "tcp://127.0.0.1:8786"\n')
    monkeypatch.setenv("OBSERVATORY_CONFIG", str(config))
    with pytest.raises(
        ConfigFileError, match=r"unknown setting dask_schedular \(did you mean dask_scheduler\?\)"
    ):
        Settings()
    # The README lists it among the settings: the file's key says where it is read.
    config.write_text("allow_internet = true\n")
    with pytest.raises(
        ConfigFileError,
        match=r"unknown setting allow_internet \(OBSERVATORY_ALLOW_INTERNET is read from the "
        r"environment only\)",
    ):
        Settings()
    # A config file cannot name another one: the key was taken, and did nothing.
    config.write_text('config = "/srv/other.toml"\n')
    with pytest.raises(
        ConfigFileError,
        match=r"unknown setting config \(OBSERVATORY_CONFIG is read from the environment only\)",
    ):
        Settings()


def test_the_signing_key_made_by_processes_starting_together_is_one_and_whole(
    tmp_path: Path,
) -> None:
    """A process starting while another was writing the new key file read it empty, and
    signed (and accepted) sessions with an empty key for its whole life."""
    import threading

    for round_number in range(30):
        path = tmp_path / str(round_number) / "secret_key"
        path.parent.mkdir()
        start = threading.Barrier(6)
        keys: list[bytes] = []

        def read(
            target: Path = path, barrier: threading.Barrier = start, found: list[bytes] = keys
        ) -> None:
            barrier.wait()
            found.append(Settings._read_or_create_key(target))

        threads = [threading.Thread(target=read) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(keys)) == 1 and len(keys[0]) >= 16, keys
        assert [p.name for p in path.parent.iterdir()] == ["secret_key"]  # no drafts left
    path.write_text("\n")  # emptied by hand: refused, never an empty key
    with pytest.raises(ValueError, match="holds no signing key"):
        Settings._read_or_create_key(path)


def test_the_signing_key_is_never_made_in_a_missing_data_dir(tmp_path: Path) -> None:
    """A web worker whose share was not mounted made the data directory with a new random
    key, then said it was ready and signed with another key than the other workers."""
    from observatory.core.config import DataDirectoryMissing

    data = tmp_path / "mnt" / "observatory"
    (tmp_path / "mnt").mkdir()
    with pytest.raises(DataDirectoryMissing, match="is the shared file system mounted"):
        Settings(data_dir=data).secret_key_bytes()
    assert not data.exists()
    data.mkdir()  # mounted: the key is made inside it
    assert len(Settings(data_dir=data).secret_key_bytes()) >= 16


@pytest.mark.parametrize(
    "value",
    [
        '["calib-consumer.internal", "b.example"]',
        "[calib-consumer.internal, b.example]",  # an env file's JSON, its quotes stripped
        "calib-consumer.internal, b.example",
    ],
)
def test_callback_hosts_are_a_json_list_or_names_separated_by_commas(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """The env file's example, sourced by a shell, lost its quotes, and every command failed:
    'error parsing value for field "calib_callback_hosts"'."""
    monkeypatch.setenv("OBSERVATORY_CALIB_CALLBACK_HOSTS", value)
    assert Settings().calib_callback_hosts == ["calib-consumer.internal", "b.example"]
    monkeypatch.setenv("OBSERVATORY_CALIB_CALLBACK_HOSTS", "")
    assert Settings().calib_callback_hosts == []


def test_a_server_whose_key_file_was_emptied_does_not_start(tmp_path: Path) -> None:
    """It started, answered /readyz with 200, and every sign-in with a 500."""
    from observatory.app import create_app

    (tmp_path / "secret_key").write_text("\n")
    with pytest.raises(ValueError, match="secret_key holds no signing key"):
        create_app(Settings(data_dir=tmp_path, telescope_runner=False))


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("OBSERVATORY_ASVO_PRODUCT_TTL_DAYS", "inf", "finite number"),
        ("OBSERVATORY_ASVO_PRODUCT_TTL_DAYS", "3e6", "less than or equal to 36500"),
        ("OBSERVATORY_TELESCOPE_TILES", "0", "greater than or equal to 1"),
        ("OBSERVATORY_ASVO_MAX_ACTIVE_JOBS", "0", "greater than or equal to 1"),
        ("OBSERVATORY_SECRET_KEY", "short", "under 16 characters"),
    ],
)
def test_settings_that_would_break_the_services_later_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    """A product lifetime of ``inf`` was taken, and every job then failed at its end."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=expected):
        Settings()


def test_a_misspelled_environment_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """``OBSERVATORY_DATA_DRI`` was ignored: the command ran on ./observatory-data instead."""
    monkeypatch.setenv("OBSERVATORY_DATA_DRI", "/srv/x")
    with pytest.raises(ConfigFileError, match=r"OBSERVATORY_DATA_DRI names no setting \(did "
                       r"you mean OBSERVATORY_DATA_DIR\?\)"):  # fmt: skip
        Settings()
    monkeypatch.delenv("OBSERVATORY_DATA_DRI")
    # The project's variables that are no settings pass.
    for name in ("OBSERVATORY_CONFIG", "OBSERVATORY_TRIGGER_URL", "OBSERVATORY_TEST_X"):
        monkeypatch.setenv(name, "")
    assert Settings().data_dir


def test_migrations_from_empty(db_url: str) -> None:
    engine = make_engine(db_url)
    assert current_revision(engine) is None
    upgrade(db_url)
    assert current_revision(engine) == head_revision()
    tables = set(inspect(engine).get_table_names())
    assert {"users", "projects", "observations", "files", "alembic_version"} <= tables
    upgrade(db_url)  # a second run is a no-op
    assert current_revision(engine) == head_revision()
    engine.dispose()


def _filled_row(table: Table, **given: object) -> dict[str, object]:
    """A row of ``table`` with a plain value in every required column not ``given``."""
    values: dict[type, object] = {
        sa_types.Integer: 1, sa_types.String: "x", sa_types.Text: "x", sa_types.Boolean: False,
        sa_types.Float: 0.0, sa_types.JSON: {}, sa_types.DateTime: datetime(2026, 1, 1, tzinfo=UTC),
    }  # fmt: skip
    row = dict(given)
    for column in table.columns:
        if column.name in row or column.nullable or column.server_default is not None:
            continue
        if column.primary_key and isinstance(column.type, sa_types.Integer):
            continue
        kind = next(k for k in values if isinstance(column.type, k))
        row[column.name] = values[kind]
    return row


def test_a_sqlite_migration_rebuilding_a_table_keeps_the_rows_referencing_it(
    tmp_path: Path,
) -> None:
    """0009 rebuilds ``users`` (copy, drop, rename): with foreign keys on, dropping it deleted
    every ASVO job of every user (ON DELETE CASCADE)."""
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url, "0008")
    engine = make_engine(url)
    tables = MetaData()
    tables.reflect(engine)
    with engine.begin() as connection:
        users, jobs = tables.tables["users"], tables.tables["asvo_jobs"]
        connection.execute(users.insert().values(_filled_row(users, id=7, name="alice")))
        connection.execute(jobs.insert().values(_filled_row(jobs, id=3, user_id=7)))
    upgrade(url)
    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id, user_id FROM asvo_jobs")).all() == [(3, 7)]
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x' / 'db.sqlite3'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


def test_users_and_keys(session: Session) -> None:
    user, key = create_user(session, "alice")
    session.commit()
    assert user.api_key_hash != key
    assert authenticate_api_key(session, key).name == "alice"
    with pytest.raises(Unauthorized):
        authenticate_api_key(session, "wrong-key-123")
    with pytest.raises(Conflict):
        create_user(session, "alice")
    with pytest.raises(ValueError, match="user name"):
        create_user(session, "bad name!")
    _, chosen = create_user(session, "bob", api_key="chosen-key-1")
    assert chosen == "chosen-key-1"
    assert authenticate_api_key(session, "chosen-key-1").name == "bob"
    new_key = reset_api_key(session, user)
    assert authenticate_api_key(session, new_key).name == "alice"
    with pytest.raises(Unauthorized):
        authenticate_api_key(session, key)


def test_projects(session: Session) -> None:
    keyless = create_project(session, "G0001", priority=1)
    secured = create_project(session, "D0009", priority=10, secure_key="s3cret-key")
    session.commit()
    # As the trigger services have it (docs/trigger.md): without a key it cannot trigger.
    assert not check_project_key(keyless, None) and not check_project_key(keyless, "any")
    assert check_project_key(secured, "s3cret-key")
    assert not check_project_key(secured, "wrong")
    assert not check_project_key(secured, None)
    with pytest.raises(Conflict):
        create_project(session, "G0001", priority=1)
    with pytest.raises(ValueError, match="project id"):
        create_project(session, "bad id", priority=1)


def test_migrations_match_models(db_url: str) -> None:
    """Every model change comes with a migration: autogenerate finds nothing to add."""
    from alembic import command

    from observatory.core.migrate import alembic_config

    upgrade(db_url)  # the migrations as a deployment runs them
    command.check(alembic_config(db_url))


def _table_shape(look: Any, table: str) -> tuple[object, ...]:
    """The columns, primary key, foreign keys, indexes, unique and check constraints."""
    columns = [
        (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
        for c in look.get_columns(table)
    ]
    foreign = sorted(
        (tuple(k["constrained_columns"]), k["referred_table"], tuple(k["referred_columns"]),
         str(k.get("options")))
        for k in look.get_foreign_keys(table)
    )  # fmt: skip
    indexes = sorted(
        (i["name"], tuple(i["column_names"]), i["unique"]) for i in look.get_indexes(table)
    )
    uniques = sorted(
        (u["name"], tuple(u["column_names"])) for u in look.get_unique_constraints(table)
    )
    checks = sorted(str(c["sqltext"]) for c in look.get_check_constraints(table))
    primary = look.get_pk_constraint(table)["constrained_columns"]
    return columns, primary, foreign, indexes, uniques, checks


def _schema(url: str) -> dict[str, object]:
    """Everything the inspector sees of the tables at ``url``, and the revision."""
    engine = make_engine(url)
    try:
        look = inspect(engine)
        found: dict[str, object] = {
            table: _table_shape(look, table) for table in sorted(look.get_table_names())
        }
        found["revision"] = current_revision(engine)
        return found
    finally:
        engine.dispose()


def test_the_suites_migration_sql_makes_what_the_migrations_make(
    db_url: str, tmp_path: Path
) -> None:
    """The suite's PostgreSQL schemas are made by the migrations' SQL in one go
    (tests/backends.py): the same tables, columns, keys, indexes and revision as the
    migrations run as a deployment runs them."""
    if not db_url.startswith("postgresql"):
        pytest.skip("the suite migrates SQLite by copying a migrated file")
    from backends import migrate_postgres_schema

    upgrade(db_url)
    online = _schema(db_url)
    with make_engine(db_url).begin() as connection:
        for table in inspect(connection).get_table_names():
            connection.execute(text(f'DROP TABLE "{table}" CASCADE'))
    migrate_postgres_schema(db_url)
    assert _schema(db_url) == online
    assert online["revision"] == head_revision()


def test_sqlite_savepoint_transactions_wait_for_other_writers(tmp_path: Path) -> None:
    """Read-then-write under a savepoint (as a job submission's duplicate check) while another
    connection keeps committing: each waits for the lock instead of 'database is locked'."""
    import threading

    engine = make_engine(f"sqlite:///{tmp_path / 'busy.db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE jobs (id INTEGER PRIMARY KEY, owner TEXT)"))
    failures: list[BaseException] = []

    def keep_writing() -> None:
        try:
            for _ in range(300):
                with engine.begin() as connection:
                    connection.execute(text("INSERT INTO jobs (owner) VALUES ('dispatcher')"))
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        for _ in range(300):
            with Session(engine) as session:
                with session.begin_nested():
                    session.execute(text("SELECT count(*) FROM jobs")).scalar()
                    session.execute(text("INSERT INTO jobs (owner) VALUES ('submitter')"))
                session.commit()
    finally:
        writer.join()
    assert not failures
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM jobs")).scalar() == 600
    engine.dispose()
