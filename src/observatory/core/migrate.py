"""Database migrations (Alembic), shipped inside the package so an installed wheel can upgrade."""

from __future__ import annotations

import logging
from functools import cache

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import Connection, Engine

from observatory.core.database import make_engine, mask_url


def alembic_config(database_url: str) -> Config:
    """An Alembic configuration for ``database_url`` using the packaged migration scripts."""
    config = Config()
    config.set_main_option("script_location", "observatory.core:migrations")
    # '%' is ConfigParser interpolation syntax; URLs with escaped characters need it doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the database at ``database_url`` up to ``revision`` (creating it if empty).

    Returns
    -------
    tuple of (str or None, str or None)
        The revision the database was at before (None: empty) and the one it is at now;
        equal when there was nothing to do.

    Raises
    ------
    UnknownRevisionError
        When the database is at a revision this version does not ship (a newer version
        migrated it, or it belongs to something else).
    """
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                # A batch migration rebuilds a table (copy, drop, rename): with foreign keys
                # on, dropping ``users`` deleted every job referencing it (ON DELETE CASCADE).
                # Off before the transaction (SQLite ignores the pragma inside one); the
                # references are checked before the migration commits.
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            try:
                with connection.begin():
                    before = current_revision_on(connection)
                    _upgrade_on(connection, database_url, revision)
                    after = current_revision_on(connection)
                    if sqlite:
                        _check_references(connection, database_url)
            finally:
                if sqlite:
                    connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                    connection.commit()
    finally:
        engine.dispose()
    return before, after


def _upgrade_on(connection: Connection, database_url: str, revision: str) -> None:
    config = alembic_config(database_url)
    config.attributes["connection"] = connection
    try:
        command.upgrade(config, revision)
    except CommandError as exc:
        raise UnknownRevisionError(
            f"cannot migrate the database at {mask_url(database_url)}: {exc} (this "
            f"version's newest revision is {head_revision()}; was the database "
            "migrated by a newer version of observatory-services?)"
        ) from None


def _check_references(connection: Connection, database_url: str) -> None:
    """Refuse (roll back) a SQLite migration that left a row referencing a missing one."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        tables = sorted({str(row[0]) for row in broken})
        raise MigrationError(
            f"migrating the database at {mask_url(database_url)} would leave {len(broken)} "
            f"rows of {', '.join(tables)} referencing rows that do not exist; nothing was changed"
        )


class MigrationError(ValueError):
    """A migration that would leave the database inconsistent (rolled back)."""


class UnknownRevisionError(ValueError):
    """The database is at a migration revision this version does not know."""


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    with engine.connect() as connection:
        return current_revision_on(connection)


def current_revision_on(connection: Connection) -> str | None:
    """The revision of the database ``connection`` is on (None for an empty database)."""
    return MigrationContext.configure(connection).get_current_revision()


@cache
def head_revision() -> str | None:
    """The newest revision shipped with the package."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


@cache
def shipped_revisions() -> frozenset[str]:
    """Every revision shipped with the package (a database at another was migrated by a
    newer version, or belongs to something else)."""
    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return frozenset(script.revision for script in scripts.walk_revisions())


class _WithoutContextNotes(logging.Filter):
    """Drops the two lines Alembic logs whenever it looks at a database ("Context impl
    PostgresqlImpl.", "Will assume transactional DDL."): ``/readyz`` looks at every probe,
    and they said nothing an operator acts on. A migration's own lines stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Context impl ", "Will assume "))


logging.getLogger("alembic.runtime.migration").addFilter(_WithoutContextNotes())
