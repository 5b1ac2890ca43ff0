"""Fixtures for the fault tests: the parametrised migrated database, bound in this process
too, so a test can read what a ``mantle serve`` subprocess wrote."""

from __future__ import annotations

import pytest

from mantle import db as mantle_db

__all__ = ["bound", "dump_database"]


@pytest.fixture
def bound(migrated_db_url):
    """The URL of a migrated database that the models are bound to in this process."""
    database = mantle_db.connect(migrated_db_url)
    mantle_db.bind(database)
    yield migrated_db_url
    database.close()
    mantle_db.database_proxy.initialize(None)


def dump_database() -> str:
    """Every row of every table of the bound database, as text (one line per row)."""
    database = mantle_db.database_proxy.obj
    database.rollback() if database.in_transaction() else None
    lines = []
    for table in database.get_tables():
        cursor = database.execute_sql(f'SELECT * FROM "{table}"')
        lines.extend(f"{table}: {row!r}" for row in cursor.fetchall())
    return "\n".join(lines)
