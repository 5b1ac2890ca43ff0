"""Hand-written SQL for the engine's hottest writes, per database, and the batch scope.

Profiling W1 showed peewee building INSERT/UPDATE statements costing four times what SQLite
spent running them; the text only depends on the database (placeholder style, dialect), so it
is built once per database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading

from mantle.db import database_proxy, is_sqlite, unwrap
from mantle.db.engine import later_sql, now_sql, share_lock_sql
from mantle.db.fields import dump_json, sqlite_text, utcnow

__all__ = ["Statements", "batch_scope", "storable_text"]


def storable_text(text: str | None) -> str | None:
    """``text`` as a text column can hold it: PostgreSQL refuses NUL, so NUL is written as the
    six characters ``\\u0000`` on both databases (SPEC 13.1.12: stored losslessly, escaped as
    in JSON text). JSON columns need nothing: the encoder escapes NUL already."""
    if text is None or "\x00" not in text:
        return text
    return text.replace("\x00", "\\u0000")


class Statements:
    """The SQL of one database; ``Statements.of_bound()`` for the models' database."""

    _by_database: dict[int, Statements] = {}
    _lock = threading.Lock()

    def __init__(self, database):
        self.db = database
        self.sqlite = is_sqlite(database)
        p = database.param

        def values(n: int) -> str:
            return ", ".join([p] * n)

        self.now = now_sql(database)
        self.later = later_sql(database)
        self.insert_audit = (
            "INSERT INTO audit_events (timestamp, actor, action, resource_type, resource_id, "
            f"metadata) VALUES ({values(6)})")
        self.upsert_step = (
            "INSERT INTO step_executions (execution_id, step_name, attempt, status, is_hook, "
            "hook_block, output, error, started_at, completed_at, wait_kind, wait_until) "
            f"VALUES ({values(12)}) ON CONFLICT (execution_id, is_hook, step_name, attempt) "
            "DO UPDATE SET status = excluded.status, output = excluded.output, "
            "error = excluded.error, started_at = excluded.started_at, "
            "completed_at = excluded.completed_at, wait_kind = excluded.wait_kind, "
            "wait_until = excluded.wait_until")
        self.insert_execution = (
            "INSERT INTO workflow_executions (id, workflow_name, version, status, inputs, "
            "trigger, started_at, owner, epoch, idempotency_key, retry_of, running_since, "
            f"parent_execution_id, parent_step, depth) VALUES ({values(11)}, "
            f"CASE WHEN {p} THEN {self.now} END, {values(3)}) "
            "ON CONFLICT (workflow_name, idempotency_key) DO NOTHING RETURNING running_since")
        self.finish_execution = (
            f"UPDATE workflow_executions SET status = {p}, error = {p}, completed_at = {p} "
            f"WHERE id = {p} AND status = 'running'")
        self.current_version = f"SELECT current_version FROM workflows WHERE name = {p}"
        self.share_lock = share_lock_sql(database)
        self.local = threading.local()  # .audit_rows: this thread's batch_scope() buffer

    @classmethod
    def of_bound(cls) -> Statements:
        return cls.of(database_proxy)

    @classmethod
    def of(cls, database) -> Statements:
        database = unwrap(database)
        statements = cls._by_database.get(id(database))
        if statements is None or statements.db is not database:
            with cls._lock:
                statements = cls._by_database[id(database)] = cls(database)
        return statements

    @staticmethod
    def datetime(value):
        """A timestamp read back by hand-written SQL (text on SQLite) as a datetime."""
        if isinstance(value, str):
            return dt.datetime.fromisoformat(value)
        return value

    def stamp(self, value):
        """A datetime as the driver wants it (fixed-width text on SQLite)."""
        if value is None:
            return None
        return sqlite_text(value) if self.sqlite else value

    def run(self, sql: str, params: tuple) -> int:
        return self.db.execute_sql(sql, params).rowcount

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self.db.execute_sql(sql, params).fetchall()

    def placeholders(self, n: int) -> str:
        return ", ".join([self.db.param] * n)

    def audit(self, actor, action, resource_type, resource_id, metadata) -> None:
        row = (self.stamp(utcnow()), actor, action, resource_type, str(resource_id),
               dump_json(metadata))
        rows = getattr(self.local, "audit_rows", None)
        if rows is None:
            self.run(self.insert_audit, row)
        else:
            rows.append(row)


@contextlib.contextmanager
def batch_scope(database):
    """Inside a transaction: collect the audit rows this thread's operations write and insert
    them in one ``executemany`` when the block ends without error (before the commit).

    Audit rows are appended and never read back by an operation, so inserting them at the end
    of the transaction changes nothing but the cost: one statement per row was a tenth of the
    daemon's time under load, and on PostgreSQL one network round trip per row.
    """
    sql = Statements.of(database)
    if getattr(sql.local, "audit_rows", None) is not None:  # nested: the outer block inserts
        yield
        return
    rows = sql.local.audit_rows = []
    try:
        yield
        if rows:
            cursor = sql.db.cursor()
            try:
                cursor.executemany(sql.insert_audit, rows)
            finally:
                cursor.close()
    finally:
        sql.local.audit_rows = None
