"""The models bound to a database in the test process, for a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import peewee
import pykka

from mantle import db as mantle_db
from mantle.db import migrations

__all__ = ["bound_database", "lock_waiters"]


@contextlib.contextmanager
def bound_database(url: str, migrate: bool = False) -> Iterator[peewee.Database]:
    """Connect to ``url`` (migrated to head when ``migrate``), bind the models to it, and
    unbind and close it at the end, after stopping any actor that may still write through it."""
    database = mantle_db.connect(url)
    if migrate:
        migrations.migrate(database)
    mantle_db.bind(database)
    try:
        yield database
    finally:
        pykka.ActorRegistry.stop_all(block=True, timeout=10)
        mantle_db.close_all(database)
        mantle_db.database_proxy.initialize(None)


def lock_waiters(session: peewee.Database) -> int:
    """Sessions of ``session``'s PostgreSQL database now waiting for a lock another holds."""
    return session.execute_sql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'").fetchone()[0]
