"""Which database backends a test runs on, and how a test's database is migrated."""

import io
from functools import cache

import pytest
from alembic import command
from sqlalchemy import create_engine

from observatory.core.migrate import alembic_config

#: For tests whose subject is not the database (a conversion, a fit, its plots): SQLite
#: alone. Their PostgreSQL variant repeated seconds of numerical work and tested nothing
#: more; the services' database behaviour is tested on both backends elsewhere.
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@cache
def postgres_migration_sql() -> str:
    """The SQL of every migration, as Alembic writes it for PostgreSQL (its offline mode):
    run in one round trip, it makes a test's schema three times faster than the migrations
    run one statement at a time (tests/core/test_config_db.py checks it makes the same)."""
    script = io.StringIO()
    config = alembic_config("postgresql+psycopg://")
    config.output_buffer = script
    command.upgrade(config, "head", sql=True)
    statements = script.getvalue().splitlines()
    return "\n".join(line for line in statements if line.strip() not in ("BEGIN;", "COMMIT;"))


def migrate_postgres_schema(url: str) -> None:
    """Migrate the (empty) schema ``url`` names with :func:`postgres_migration_sql`."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(postgres_migration_sql())
    finally:
        engine.dispose()
