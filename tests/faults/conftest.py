"""Fixtures for the fault tests: the parametrised migrated database, bound in this process
too, so a test can read what a ``mantle serve`` subprocess wrote."""

from __future__ import annotations

import pytest

from mantle import db as mantle_db
from tests.helpers.database import bound_database

__all__ = ["bound", "dump_database"]


@pytest.fixture
def bound(migrated_db_url):
    """The URL of a migrated database that the models are bound to in this process."""
    with bound_database(migrated_db_url):
        yield migrated_db_url


def dump_database() -> str:
    """Every row of every table of the bound database, as text (one line per row)."""
    database = mantle_db.database_proxy.obj
    database.rollback() if database.in_transaction() else None
    lines = []
    for table in database.get_tables():
        cursor = database.execute_sql(f'SELECT * FROM "{table}"')
        lines.extend(f"{table}: {row!r}" for row in cursor.fetchall())
    return "\n".join(lines)
