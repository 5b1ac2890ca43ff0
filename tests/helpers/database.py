"""The models bound to a database in the test process, for a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import peewee
import pykka

from mantle import db as mantle_db
from mantle.db import migrations

__all__ = ["bound_database", "lock_waiters", "two_applies_at_once"]


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


def two_applies_at_once(url: str, first: str, second: str):
    """Apply the YAML texts ``first`` and ``second`` (PostgreSQL at ``url``, bound) on two
    threads, so that both are inside their transactions at once: the first holds its writes
    uncommitted (its last one, an audit row, waits for a table lock) while the second
    starts; then both go on. Returns their ``Background`` calls, ended or ending."""
    from mantle.db import database_proxy
    from mantle.db.connect import connect
    from tests.helpers import Background
    from tests.helpers.waiting import apply_yaml, wait_until

    def apply(text: str) -> Background:
        def call():
            try:
                return apply_yaml(text)
            finally:
                database_proxy.close()  # this thread's connection
        return Background(call)

    holder, watcher = connect(url), connect(url)
    try:
        holder.execute_sql("BEGIN")
        holder.execute_sql("LOCK TABLE audit_events IN EXCLUSIVE MODE")
        calls = [apply(first)]
        wait_until(lambda: lock_waiters(watcher) == 1)
        calls.append(apply(second))
        wait_until(lambda: lock_waiters(watcher) == 2)
    finally:
        holder.execute_sql("ROLLBACK")
        holder.close()
        watcher.close()
    return calls[0].join(10), calls[1].join(10)
