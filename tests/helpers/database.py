"""The models bound to a database in the test process, for a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import peewee
import pykka

from mantle import db as mantle_db
from mantle.db import migrations

__all__ = ["bound_database", "lock_waiters", "two_applies_at_once", "refuse_poison"]


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


_REFUSE_POISON = {
    # Refuse the completed row of the one step whose output holds the word "poison".
    "sqlite": [
        """CREATE TRIGGER refuse_poison BEFORE UPDATE ON step_executions
           WHEN NEW.status = 'completed' AND instr(NEW.output, 'poison') > 0
           BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END""",
        """CREATE TRIGGER refuse_poison_insert BEFORE INSERT ON step_executions
           WHEN NEW.status = 'completed' AND instr(NEW.output, 'poison') > 0
           BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END""",
    ],
    "postgres": [
        """CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.status = 'completed' AND strpos(NEW.output::text, 'poison') > 0 THEN
               RAISE EXCEPTION 'refused by the test trigger';
             END IF;
             RETURN NEW;
           END $$""",
        """CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON step_executions
           FOR EACH ROW EXECUTE FUNCTION refuse_poison()""",
    ],
}


def refuse_poison(database: peewee.Database, backend: str) -> None:
    """Make ``database`` refuse (a trigger) the ``completed`` row of any step whose output
    holds the word "poison": a write that is not an outage, which no retry will get past."""
    for statement in _REFUSE_POISON[backend]:
        database.execute_sql(statement)
