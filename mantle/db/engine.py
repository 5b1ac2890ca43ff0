"""The one place for SQL that differs between SQLite and PostgreSQL (STYLE habit 5).

SQLite has a single writer: a write transaction begins with ``BEGIN IMMEDIATE`` (every SQLite
database from ``connect`` does so by default), which holds the file's write lock until commit,
so row locks are unnecessary there. PostgreSQL locks rows: ``SELECT ... FOR UPDATE`` to
serialise on a row, ``SKIP LOCKED`` to hand rows out to competing claimers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterable

import peewee

from mantle.db.connect import (SQLITE_BUSY_TIMEOUT_MS, database_proxy, is_postgres, is_sqlite,
                               unwrap)

__all__ = ["transaction", "write_transaction", "lock_for_update", "claim_rows", "upsert",
           "sqlite_file", "migration_lock", "now_sql", "later_sql", "share_lock_sql",
           "skip_locked_sql"]

# Any constant works: it only has to be the same in every mantle process using the database.
_MIGRATION_LOCK_KEY = 0x6D616E746C65  # "mantle"


def transaction(database=None, patient: bool = False):
    """A write transaction on ``database`` (default: the bound one); nested calls savepoint.

    On SQLite it begins with BEGIN IMMEDIATE, so it waits for another writer instead of
    failing half-way when it upgrades from reading to writing; and mantle's writers of one
    file first take turns on an OS file lock (``_WriterTurn``), waited for at most the busy
    timeout, or as long as it takes when ``patient`` (a migration run, which waits behind
    another runner's as on PostgreSQL).
    """
    database = unwrap(database if database is not None else database_proxy)
    if is_sqlite(database):
        return _sqlite_transaction(database, patient)
    return database.atomic()


def sqlite_file(database) -> str | None:
    """The path of a SQLite database's file; None for PostgreSQL, ``:memory:`` and ``file:``
    URIs (nothing beside them to lock or checkpoint)."""
    database = unwrap(database)
    path = database.database if is_sqlite(database) else None
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return path


class _WriterTurn:
    """An exclusive ``flock`` on ``<database file>-writer`` around SQLite write transactions.

    SQLite's own busy handler makes a writer that finds the lock taken sleep 1, 2, 5, 10...
    ms before it looks again; with several processes writing one file (``serve --workers``,
    a CLI next to a daemon) those sleeps, not the writes, decided the throughput. A blocked
    ``flock`` is woken by the kernel the moment the holder lets go. One descriptor per thread
    and process (locks belong to open files: the thread that forks a ``serve --workers``
    worker goes on in it with its descriptor, which the parent and every sibling share),
    held re-entrantly for nested transactions. Writers that do not take it (other programs)
    are still excluded by SQLite's own lock.

    A holder that never lets go (a process stopped by SIGSTOP or Ctrl-Z inside a write) is
    waited for ``wait_s`` seconds, SQLite's own busy timeout, and then the write fails as a
    locked database does (an outage: the journal waits it out, the API answers 503).
    """

    _by_path: dict[str, _WriterTurn] = {}
    _lock = threading.Lock()
    wait_s = SQLITE_BUSY_TIMEOUT_MS / 1000

    def __init__(self, path: str):
        self._path = path
        self._local = threading.local()

    @classmethod
    def of(cls, database) -> _WriterTurn | None:
        path = sqlite_file(database)
        if path is None:
            return None
        with cls._lock:
            turn = cls._by_path.get(path)
            if turn is None:
                turn = cls._by_path[path] = cls(path + "-writer")
            return turn

    def take(self, wait_s: float | None) -> None:
        """Take the turn (again, when nested), waiting at most ``wait_s`` seconds (None: as
        long as it takes)."""
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth == 0:
            file = getattr(local, "file", None)
            if file is None or file.pid != os.getpid():  # none yet, or inherited by a fork
                if file is not None:
                    file.close()
                file = local.file = _LockFile(self._path)
            try:
                fcntl.flock(file.fd, fcntl.LOCK_EX | (0 if wait_s is None else fcntl.LOCK_NB))
            except BlockingIOError:
                if not _TurnWait(file.fd).wait(wait_s):
                    file.fd, local.file = None, None  # the waiting thread closes it
                    raise peewee.OperationalError(
                        f"database is locked (another mantle writer has held it for "
                        f"{wait_s:g} s)") from None
        local.depth = depth + 1

    def release(self) -> None:
        local = self._local
        local.depth -= 1
        if local.depth == 0:
            fcntl.flock(local.file.fd, fcntl.LOCK_UN)

    def __enter__(self) -> _WriterTurn:
        self.take(self.wait_s)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _LockFile:
    """One thread's descriptor of a writer-turn lock file, closed once that thread has ended
    (its thread-local state goes with it), so threads that write and end leak none."""

    __slots__ = ("fd", "pid")

    def __init__(self, path: str):
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.pid = os.getpid()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        if self.pid == os.getpid():  # a fork's copy is closed by ``take`` in the child
            self.close()


class _TurnWait:
    """A blocking ``flock`` of ``fd`` taken on a thread of its own, as ``flock`` has no
    timeout: the caller that stops waiting leaves the descriptor to that thread, which lets
    go of the lock (closing it) the moment it gets it. While a holder never lets go, each
    writing thread leaves one such thread behind per ``wait_s``."""

    def __init__(self, fd: int):
        self._fd = fd
        self._changed = threading.Condition()
        self._state = "waiting"  # then "taken" (the caller holds the lock) or "abandoned"
        threading.Thread(target=self._take, name="mantle-writer-turn", daemon=True).start()

    def _take(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        with self._changed:
            if self._state == "waiting":
                self._state = "taken"
                self._changed.notify_all()
                return
        os.close(self._fd)

    def wait(self, timeout: float) -> bool:
        """Whether the caller now holds the lock (False: it gave up after ``timeout``)."""
        with self._changed:
            if self._changed.wait_for(lambda: self._state == "taken", timeout):
                return True
            self._state = "abandoned"
            return False


@contextlib.contextmanager
def _sqlite_transaction(database, patient: bool):
    turn = _WriterTurn.of(database)
    if turn is None:
        with database.atomic("IMMEDIATE"):
            yield
        return
    turn.take(None if patient else turn.wait_s)
    try:
        with database.atomic("IMMEDIATE"):
            yield
    finally:
        turn.release()


def write_transaction():
    """``transaction()`` on the bound database."""
    return transaction(database_proxy)


def lock_for_update(model: type[peewee.Model], *where) -> list[peewee.Model]:
    """Lock (PostgreSQL) the rows of ``model`` matching ``where`` until the transaction ends.

    Used to serialise writers on one row, e.g. a workflow's concurrency slots. On SQLite the
    IMMEDIATE transaction already excludes other writers, so it only reads. Returns the rows.
    """
    query = model.select().where(*where) if where else model.select()
    if is_postgres(model._meta.database):
        query = query.for_update()
    return list(query)


def claim_rows(query: peewee.Select, limit: int | None = None) -> list[peewee.Model]:
    """Rows of ``query`` that no concurrent transaction holds, locked for this one.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so two claimers get disjoint rows at once. SQLite:
    the caller's IMMEDIATE transaction makes claimers take turns, and the second sees the
    first's committed changes; the query's own condition (e.g. ``runner IS NULL``) must
    therefore exclude rows already claimed. Call inside ``transaction()`` and update the rows
    before it commits.
    """
    if limit is not None:
        query = query.limit(limit)
    if is_postgres(query.model._meta.database):
        query = query.for_update(skip_locked=True)
    return list(query)


def upsert(model: type[peewee.Model], values: dict, conflict: Iterable[peewee.Field],
           update: Iterable[peewee.Field]) -> None:
    """INSERT ``values``; when a row with the same ``conflict`` columns exists, set its
    ``update`` columns to the new values instead, or leave it alone when ``update`` is empty
    (``ON CONFLICT ... DO UPDATE`` / ``DO NOTHING``, spelled the same on both engines)."""
    update = list(update)
    query = model.insert(**values)
    if update:
        query = query.on_conflict(conflict_target=list(conflict), preserve=update)
    else:
        query = query.on_conflict(conflict_target=list(conflict), action="IGNORE")
    query.execute()


def migration_lock(database: peewee.Database) -> None:
    """Serialise migration runs across processes; call first inside the transaction.

    PostgreSQL: a transaction-level advisory lock. SQLite: the IMMEDIATE transaction is the lock
    (begun with ``transaction(database, patient=True)``, which waits for the writer turn).
    A migration is no engine statement: the connection's ``statement_timeout`` (SPEC 13.7) is
    lifted for its transaction, so it waits for another runner's turn and builds an index on
    a large table as long as that takes.
    """
    if is_postgres(database):
        database.execute_sql("SET LOCAL statement_timeout = 0")
        database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))


def now_sql(database) -> str:
    """SQL for the database's clock as stored timestamps are (naive UTC).

    Ownership decisions (lease expiry) compare against this, never against one host's clock
    (SPEC 13.7). SQLite's ``%f`` has milliseconds; three zeros keep the stored width (six
    fractional digits) so text comparisons stay right.
    """
    if is_postgres(database):
        return "(now() AT TIME ZONE 'UTC')"
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"


def later_sql(database) -> str:
    """SQL for the database's clock plus a number of seconds given as the one parameter."""
    if is_postgres(database):
        return f"({now_sql(database)} + make_interval(secs => {database.param}))"
    return (f"(strftime('%Y-%m-%d %H:%M:%f', 'now', "
            f"printf('%+.3f seconds', {database.param})) || '000')")


def share_lock_sql(database) -> str:
    """Suffix keeping rows read by a writer from changing owner until it commits (PostgreSQL;
    SQLite's IMMEDIATE transaction already excludes every other writer)."""
    return " FOR SHARE" if is_postgres(database) else ""


def skip_locked_sql(database, table: str) -> str:
    """Suffix of a claim's inner SELECT: lock the claimed rows, skip those another claimer
    (or a writer holding its share lock) has (PostgreSQL); SQLite claimers take turns."""
    return f" FOR UPDATE OF {table} SKIP LOCKED" if is_postgres(database) else ""
