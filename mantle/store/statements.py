"""Hand-written SQL for the engine's hottest writes, per database, and the batch scope.

Profiling W1 showed peewee building INSERT/UPDATE statements costing four times what SQLite
spent running them; the text only depends on the database (placeholder style, dialect), so it
is built once per database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading

from mantle.db import database_proxy, is_sqlite, unwrap
from mantle.db.engine import later_sql, now_sql, share_lock_sql
from mantle.db.fields import dump_json, sqlite_text, utcnow

__all__ = ["Statements", "Batch", "Pending", "batch_scope", "storable_text"]


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
        columns = ("INSERT INTO workflow_executions (id, workflow_name, version, status, "
                   "inputs, trigger, started_at, owner, epoch, idempotency_key, retry_of, "
                   "running_since, parent_execution_id, parent_step, depth) ")
        self.insert_execution_plain = f"{columns}VALUES ({values(15)})"
        self.insert_execution = (f"{columns}VALUES ({values(15)}) "
                                 "ON CONFLICT (workflow_name, idempotency_key) DO NOTHING")
        self.finish_execution = (
            f"UPDATE workflow_executions SET status = {p}, error = {p}, completed_at = {p} "
            f"WHERE id = {p} AND status = 'running'")
        self.current_version = f"SELECT current_version FROM workflows WHERE name = {p}"
        self.bulk = None if self.sqlite else _PostgresBulk()
        self.share_lock = share_lock_sql(database)
        self.local = threading.local()  # .batch: this thread's open batch_scope()

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
        batch = self.batch
        if batch is None:
            self.run(self.insert_audit, row)
        else:
            batch.audits.append(row)

    @property
    def batch(self) -> Batch | None:
        """This thread's open ``batch_scope``, if any."""
        return getattr(self.local, "batch", None)

    def flush(self) -> None:
        """Write what this thread's batch holds back, before a statement that reads it."""
        batch = self.batch
        if batch is not None:
            batch.flush()


class Pending:
    """Whether a final status held back in a batch was the one written (a cancel committed
    first leaves ``cancelled``): known once the batch is written (``Batch.flush``), or read
    back (``settle``) when the answer to that write was lost; the journal hands callbacks
    the ``value``."""

    __slots__ = ("execution_id", "status", "value")

    def __init__(self, execution_id: str, status: str):
        self.execution_id = execution_id
        self.status = status
        self.value: bool | None = None


def settle(database, pendings: list[Pending]) -> None:
    """The values of ``pendings`` whose transaction committed but whose answer was lost,
    read back: a final status is final, so the row still holds what won."""
    sql = Statements.of(database)
    ours = _holding(sql, [(pending.execution_id, pending.status) for pending in pendings])
    for pending in pendings:
        pending.value = pending.execution_id in ours


def _holding(sql: Statements, rows: list[tuple[str, str]]) -> set[str]:
    """The ids among (execution id, status) ``rows`` whose execution now has that status."""
    statuses = dict(sql.rows(
        f"SELECT id, status FROM workflow_executions WHERE id IN "
        f"({sql.placeholders(len(rows))})", tuple(row[0] for row in rows)))
    return {execution_id for execution_id, status in rows
            if statuses.get(execution_id) == status}


class Batch:
    """The writes of one journal transaction that need no answer on the spot, held back and
    written together when the transaction ends (or earlier, when a statement must see them:
    ``Statements.flush``).

    One statement per row is what bounded the engine: every statement is a round trip on
    PostgreSQL, and on both databases a moment without the GIL that the journal thread then
    queues to get back. On PostgreSQL each table's rows go as one ``_PostgresBulk``
    statement and all of them in one message (one round trip); on SQLite ``executemany``
    steps each table's rows in one call. Order: execution rows before step rows (foreign
    key), then the audit rows, then final statuses last, so that the ``execution.finished``
    audit row the database adds for a final status (migration 005) comes after every audit
    row of the steps that led to it: event streams read the audit trail in id order.
    """

    def __init__(self, sql: Statements):
        self._sql = sql
        self.executions: list[tuple] = []
        self.steps: list[tuple] = []
        self.finishes: list[tuple[tuple, str, Pending]] = []
        self.audits: list[tuple] = []
        self.versions: dict[str, int | None] = {}  # current versions read in this batch
        # PostgreSQL journal transactions: (mark, seq, fences, versions) for
        # mantle_journal_check, sent ahead of the first writes (migration 009).
        self.check: tuple[str, int, list[tuple], list[tuple[str, int]]] | None = None

    def flush(self, commit: bool = False) -> None:
        """Write what is held back; ``commit``: these are the transaction's last statements
        (on PostgreSQL its COMMIT goes in the same message)."""
        executions, steps, audits, finishes = (self.executions, self.steps, self.audits,
                                               self.finishes)
        self.executions, self.steps, self.audits, self.finishes = [], [], [], []
        rows = [row for row, _, _ in finishes]
        if self._sql.bulk:
            won = self._write_together(executions, steps, audits, rows, commit)
        else:
            won = self._write_each(executions, steps, audits, rows)
        for row, _status, pending in finishes:
            pending.value = row[3] in won

    def _write_together(self, executions, steps, audits, finishes, commit) -> set[str]:
        """PostgreSQL: one message; the ids of the executions the finishes ended."""
        sql, bulk = self._sql, self._sql.bulk
        texts: list[str] = []
        params: list = []
        if self.check is not None:
            mark, seq, fences, versions = self.check
            self.check = None
            texts.append(bulk.journal_check)
            params += (mark, seq, _json_rows(fences)[0], _json_rows(versions)[0])
        for text, rows in ((bulk.insert_executions, executions),
                           # one statement may not upsert a row twice: the last write wins
                           (bulk.upsert_steps,
                            list({(r[0], r[4], r[1], r[2]): r for r in steps}.values())),
                           (bulk.insert_audits, audits),
                           (bulk.finish_executions, finishes)):  # last: its rows are read
            if rows:
                texts.append(text)
                params += _json_rows(rows)
        if not texts:
            return set()
        cursor = sql.db.execute_together("; ".join(texts), tuple(params), commit=commit)
        try:
            return {row[0] for row in cursor.fetchall()} if finishes else set()
        finally:
            cursor.close()

    def _write_each(self, executions, steps, audits, finishes) -> set[str]:
        """SQLite: ``executemany`` per table; the ids of the executions the finishes ended."""
        sql = self._sql
        for statement, rows in ((sql.insert_execution_plain, executions),
                                (sql.upsert_step, steps), (sql.insert_audit, audits),
                                (sql.finish_execution, finishes)):
            if rows:
                cursor = sql.db.cursor()
                try:
                    cursor.executemany(statement, rows)
                finally:
                    cursor.close()
        if not finishes:
            return set()
        # Ours if the row now holds what we wrote (a cancel committed first leaves
        # ``cancelled``, which no finish writes).
        return _holding(sql, [(row[3], row[0]) for row in finishes])


def _json_rows(rows: list[tuple]) -> tuple[str]:
    """Rows as the one JSON parameter of a ``_PostgresBulk`` statement: ``[{"c0": .., ..}]``,
    timestamps in ISO form. Encoded by the json module's C code and sent as one text value,
    where psycopg adapting an array per column cost ~14 us of Python per row (its list
    dumpers are pure Python; this is ~1.5 us)."""
    if not rows:
        return ("[]",)
    keys = _KEYS[:len(rows[0])]
    return (json.dumps([dict(zip(keys, row)) for row in rows], default=_iso,
                       separators=(",", ":")),)


def _iso(value):
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not a column value")


_KEYS = tuple(f"c{i}" for i in range(16))


def _recordset(*types: str) -> str:
    """``json_to_recordset`` over the rows of ``_json_rows``, one typed column per value."""
    columns = ", ".join(f"c{i} {kind}" for i, kind in enumerate(types))
    return f"json_to_recordset(%s::json) AS u({columns})"


class _PostgresBulk:
    """One statement for any number of rows on PostgreSQL: the rows go as one JSON text
    (``_json_rows``) and ``json_to_recordset`` makes them typed rows again. Fixed SQL text
    (prepared once), one message, one parameter."""

    journal_check = "SELECT mantle_journal_check(%s, %s, %s::json, %s::json)"
    insert_audits = (
        "INSERT INTO audit_events (timestamp, actor, action, resource_type, resource_id, "
        "metadata) SELECT * FROM " + _recordset("timestamp", "text", "text", "text", "text",
                                                 "text"))
    upsert_steps = (
        "INSERT INTO step_executions (execution_id, step_name, attempt, status, is_hook, "
        "hook_block, output, error, started_at, completed_at, wait_kind, wait_until) "
        "SELECT * FROM " + _recordset("text", "text", "int", "text", "bool", "text", "text",
                                      "text", "timestamp", "timestamp", "text", "timestamp")
        + " ON CONFLICT (execution_id, is_hook, step_name, attempt) DO UPDATE SET "
        "status = excluded.status, output = excluded.output, error = excluded.error, "
        "started_at = excluded.started_at, completed_at = excluded.completed_at, "
        "wait_kind = excluded.wait_kind, wait_until = excluded.wait_until")
    insert_executions = (
        "INSERT INTO workflow_executions (id, workflow_name, version, status, inputs, trigger, "
        "started_at, owner, epoch, idempotency_key, retry_of, running_since, "
        "parent_execution_id, parent_step, depth) SELECT * FROM "
        + _recordset("text", "text", "int", "text", "text", "text", "timestamp", "text", "int",
                     "text", "text", "timestamp", "text", "text", "int"))
    finish_executions = (
        "UPDATE workflow_executions AS e SET status = u.c0, error = u.c1, "
        "completed_at = u.c2 FROM " + _recordset("text", "text", "timestamp", "text")
        + " WHERE e.id = u.c3 AND e.status = 'running' RETURNING e.id")


@contextlib.contextmanager
def batch_scope(database, ends_transaction: bool = False):
    """Inside a transaction: hold back this thread's writes that need no answer (``Batch``)
    and write them, in bulk, when the block ends without error (before the commit).

    ``ends_transaction``: the block ends a top-level transaction (not a savepoint: peewee
    cannot tell them apart here), and nothing runs in it after the block; on PostgreSQL its
    COMMIT then goes with those writes, one round trip fewer (the journal's transactions)."""
    sql = Statements.of(database)
    if sql.batch is not None:  # nested: the outer block writes
        yield
        return
    batch = sql.local.batch = Batch(sql)
    try:
        yield
        batch.flush(commit=ends_transaction)
    finally:
        sql.local.batch = None
