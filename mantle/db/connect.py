"""Opening a database from a URL (SPEC 10.1) and binding the models to it.

The models are bound to ``database_proxy``; nothing here opens a database at import time.
Connections are per thread (peewee's default), so the CLI, the journal thread and web threads
each get their own.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
import urllib.parse
from typing import Any

import peewee
import psycopg
import psycopg.conninfo
from playhouse.pool import MaxConnectionsExceeded, PooledDatabase, PooledPostgresqlDatabase

from mantle.errors import ConfigError, DatabaseUnavailable

__all__ = ["database_proxy", "connect", "bind", "unwrap", "is_sqlite", "is_postgres",
           "OUTAGE_ERRORS", "is_outage", "close_all", "release_connection", "reset_connection",
           "reserve_connection", "SQLITE_BUSY_TIMEOUT_MS", "PG_CONNECT_TIMEOUT_S",
           "PG_STATEMENT_TIMEOUT_MS", "PG_KEEPALIVES",
           "backend_identity", "backend_ended", "commit_outcome", "journal_check_refused",
           "transaction_conflict", "url_passwords", "database_failure"]

# The CLI and a daemon share one SQLite file: a writer waits this long for the other's lock.
SQLITE_BUSY_TIMEOUT_MS = 10_000
# SPEC 13.7: a dead connection or server is noticed in seconds, not minutes.
PG_CONNECT_TIMEOUT_S = 5
PG_STATEMENT_TIMEOUT_MS = 30_000
PG_IDLE_IN_TRANSACTION_MS = 15_000
# Connections one process holds at most (see _PostgresDatabase), how long a thread waits for
# one, and the age after which a returned connection is closed rather than reused.
PG_POOL_SIZE = 24
PG_POOL_WAIT_S = 30
PG_POOL_STALE_S = 600
# mantle_journal_check's refusal (migration 009's REFUSED_SQLSTATE), and its finding a row
# locked (lock_not_available).
_JOURNAL_CHECK_REFUSED = ("MJ001", "55P03")
# A server that vanished (a host down, a network cut) is noticed within seconds, not when the
# system's TCP gives up (hours); a live server, however busy, answers keepalives at once.
PG_KEEPALIVES = {
    "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}
_PG_CONNECTION_SETTINGS = {
    "application_name": "mantle",  # pg_stat_activity tells mantle's connections apart
    **PG_KEEPALIVES,
}

# The one definition of "the database is unreachable or busy, not: this query is wrong".
# Such errors are waited out (journal retries, 503 answers); any other error is a bug or a
# value the database refuses, and is reported as such. No connection of the process's pool
# freeing within PG_POOL_WAIT_S (every one busy) is the database being busy.
OUTAGE_ERRORS = (peewee.OperationalError, peewee.InterfaceError, DatabaseUnavailable,
                 MaxConnectionsExceeded)


def is_outage(exc: BaseException) -> bool:
    return isinstance(exc, OUTAGE_ERRORS)


def release_connection(database) -> None:
    """Give the calling thread's PostgreSQL connection back to the process's pool, unless a
    transaction is open on it; SQLite connections stay with their thread (they cost no
    server slot)."""
    database = unwrap(database)
    if is_postgres(database) and not database.is_closed() and not database.in_transaction():
        database.close()


def close_all(database) -> None:
    """Close every connection the process holds on ``database`` (its pool too): at exit, and
    before a fork, since no connection may cross one."""
    database = unwrap(database)
    if isinstance(database, _PostgresDatabase):
        database.close_all()
    elif not database.is_closed():
        database.close()


def reserve_connection(database) -> None:
    """Give the calling thread connections of its own, beside the PostgreSQL pool's
    ``PG_POOL_SIZE`` (``_PostgresDatabase.reserve``): for the lease renewal, which no burst
    of other work may keep waiting for a place in the pool past the lease. SQLite: nothing
    to do (each thread has its own connection)."""
    database = unwrap(database)
    if isinstance(database, _PostgresDatabase):
        database.reserve()


def reset_connection(database) -> None:
    """Drop the calling thread's connection, e.g. after an outage broke it; the next query
    opens a fresh one."""
    database = unwrap(database)
    if isinstance(database, _PostgresDatabase):
        database.discard()
        return
    try:
        database.close()
    except Exception:  # already broken: forget it
        database._state.reset()

database_proxy = peewee.DatabaseProxy()

_SQLITE_PRAGMAS = (
    ("busy_timeout", SQLITE_BUSY_TIMEOUT_MS),
    # In WAL mode NORMAL is durable across application crashes; only power loss can drop
    # the last commits, and it never corrupts the file.
    ("synchronous", "normal"),
    ("foreign_keys", 1),
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class _SqliteDatabase(peewee.SqliteDatabase):
    """SqliteDatabase that switches a new file to WAL even when others open it at once."""

    def _set_pragmas(self, conn):
        super()._set_pragmas(conn)
        _enable_wal(conn)


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL unless already there (the mode is stored in the file).

    Changing the mode needs the file to itself and SQLite reports "database is locked" at once
    instead of waiting, e.g. when a CLI and a daemon create the file together; so retry for
    up to the busy timeout.
    """
    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = wal").fetchone()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def unwrap(database) -> peewee.Database:
    """The real database behind a ``DatabaseProxy`` (or the argument itself)."""
    while isinstance(database, peewee.DatabaseProxy):
        database = database.obj
    if database is None:
        raise RuntimeError("mantle.db.database_proxy is not bound; call mantle.db.bind(db)")
    return database


def is_sqlite(database) -> bool:
    return isinstance(unwrap(database), peewee.SqliteDatabase)


def is_postgres(database) -> bool:
    return isinstance(unwrap(database), peewee.PostgresqlDatabase)


def bind(database: peewee.Database) -> peewee.Database:
    """Point every model at ``database`` (process-wide)."""
    database_proxy.initialize(database)
    return database


def connect(url: str) -> peewee.Database:
    """Open ``url``, check that the database answers, and return it (not yet bound).

    Raises ConfigError for a malformed URL and DatabaseUnavailable when the server or file
    cannot be used; the connection stays open for the calling thread.
    """
    match = _SCHEME.match(url or "")
    scheme = match.group(1).lower() if match else ""
    if scheme == "sqlite":
        database = _sqlite_database(url)
    elif scheme in ("postgresql", "postgres"):
        database = _postgres_database(url)
    else:
        raise _invalid(url, "expected sqlite:///<path>, postgresql://... or postgres://...")
    _verify(database)
    return database


def _invalid(url: str, reason: str) -> ConfigError:
    """The error for ``url``, with its passwords replaced, in the URL and in the reason
    (libpq's quotes the whole URL, or the token of it that it cannot decode)."""
    for password in url_passwords(url or ""):
        reason = reason.replace(password, "***")
    return ConfigError(f'invalid database URL "{_mask_password(url)}": {reason}')


# A password in the user info (split as libpq does) and in a ``password=`` parameter.
_USERINFO_PASSWORD = re.compile(r"^([^:/]+://[^:@/]*:)([^@/]*)@")
_PARAMETER_PASSWORD = re.compile(r"([?&]password=)([^&#]*)")


def _mask_password(url: str) -> str:
    """The URL with any password replaced, so error messages never leak it."""
    url = _USERINFO_PASSWORD.sub(r"\1***@", url or "")
    return _PARAMETER_PASSWORD.sub(r"\1***", url)


def url_passwords(url: str) -> list[str]:
    """Every password a connection URL holds, in its user info or as a ``password=``
    parameter, as written and percent-decoded, longest first (hiding the longer ones first
    leaves no part of them), even in a URL libpq cannot parse: error texts about the URL
    replace them."""
    found = [match.group(2) for pattern in (_USERINFO_PASSWORD, _PARAMETER_PASSWORD)
             for match in pattern.finditer(url)]
    forms = {form for raw in found for form in (raw, urllib.parse.unquote(raw)) if form}
    return sorted(forms, key=len, reverse=True)


def _sqlite_database(url: str) -> peewee.SqliteDatabase:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc:
        raise _invalid(url, "expected sqlite:///relative.db or sqlite:////absolute/path.db")
    if parts.query or parts.fragment:
        raise _invalid(url, "SQLite URLs take no parameters")
    path = urllib.parse.unquote(parts.path[1:])  # drop the '/' that ends '//'
    if not path:
        raise _invalid(url, "no database file given")
    if path != ":memory:":
        # Absolute, so a later chdir or a connection opened by another thread sees the same file.
        path = os.path.abspath(path)
    return _SqliteDatabase(path, pragmas=list(_SQLITE_PRAGMAS),
                                 timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                                 # Every transaction takes the write lock when it begins: a
                                 # deferred one that reads, then writes, can fail at once with
                                 # SQLITE_BUSY when another process committed in between.
                                 lock_type="IMMEDIATE")


class _PostgresDatabase(PooledPostgresqlDatabase):
    """PostgreSQL from a per-process pool, whose transactions send BEGIN with their first
    statement.

    Pool: a thread checks a connection out at its first statement and keeps it until it
    calls ``release_connection`` (the API does so after every request, the step pool after
    every attempt); the long-lived threads (journal, lease, retention) keep theirs. So a
    process holds at most ``PG_POOL_SIZE`` connections however many threads it runs, and
    ``serve --workers N`` needs ``N x PG_POOL_SIZE`` of the server's ``max_connections``,
    not one per thread. A thread that finds the pool empty waits up to ``PG_POOL_WAIT_S``;
    the lease renewal's thread never does: its connection is its own, beside the pool's
    (``reserve``), so ``N x (PG_POOL_SIZE + 1)`` in all.
    A checkout does not probe the connection with a round trip; one the server dropped
    fails its first statement, which the outage handling resets (``reset_connection``).

    Every statement is a round trip, and in a busy daemon every round trip also costs the
    calling thread a wait for the interpreter lock when the answer arrives; for the journal,
    whose transactions are a handful of statements, a separate BEGIN was a fifth of its time.
    Here ``begin`` only notes the transaction; the first statement goes out in one message
    with the BEGIN (``execute_together``), and a transaction that ran nothing sends nothing.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reserved: dict[int, Any] = {}  # key -> connection of a reserved thread

    def reserve(self) -> None:
        """The calling thread's connections are opened beside the pool (not counted in
        ``max_connections``, never waiting for a place) and closed when it lets go of them."""
        self._state.reserved = True

    def _connect(self):
        if not getattr(self._state, "reserved", False):
            return super()._connect()
        conn = super(PooledDatabase, self)._connect()  # a new one, as the pool opens them
        with self._pool_lock:
            self._reserved[self.conn_key(conn)] = conn
        return conn

    def _close(self, conn, close_conn=False):
        with self._pool_lock:
            reserved = self._reserved.pop(self.conn_key(conn), None)
        if reserved is None:
            return super()._close(conn, close_conn)
        self._close_raw(conn)

    def close_all(self):
        super().close_all()
        with self._pool_lock:
            reserved, self._reserved = self._reserved, {}
        for conn in reserved.values():
            self._close_raw(conn)

    def discard(self) -> None:
        """Close the calling thread's connection for good (broken, or stuck in a transaction
        an outage interrupted) and free its place in the pool."""
        conn = self._state.conn
        self._state.reset()
        self._state.begin_pending = self._state.commit_sent = False
        if conn is not None:
            with self._pool_lock:
                self._in_use.pop(self.conn_key(conn), None)
                self._reserved.pop(self.conn_key(conn), None)
                self._pool_available.notify()
            self._close_raw(conn)

    def _is_closed(self, conn):
        return conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.UNKNOWN

    def begin(self, isolation_level=None):
        if isolation_level is not None or self._isolation_level:
            return super().begin(isolation_level)
        if self.is_closed():  # connect now, as BEGIN would: connecting resets the state
            self.connect()
        self._state.begin_pending = True

    def backend_identity(self) -> tuple[int, Any]:
        """(pid, start time) of the calling thread's connection's server process: asked of
        the server once per connection (with the statement it goes out with), since a pid
        alone may be another process's later on."""
        conn = self.connection()
        known = getattr(self._state, "identity", None)
        if known is None or known[0] is not conn:
            started = self.execute_sql("SELECT backend_start FROM pg_stat_activity "
                                       "WHERE pid = pg_backend_pid()").fetchone()[0]
            known = self._state.identity = (conn, conn.info.backend_pid, started)
        return known[1], known[2]

    def _send_begin(self) -> None:
        """Send a noted BEGIN on its own (a cursor wanted for statements we do not see)."""
        if getattr(self._state, "begin_pending", False):
            self._state.begin_pending = False
            with peewee.__exception_wrapper__:
                cursor = psycopg.ClientCursor(self._state.conn)
                cursor.execute("BEGIN")
                cursor.close()

    def cursor(self, named_cursor=None):
        cursor = super().cursor(named_cursor)
        self._send_begin()
        return cursor

    def _execute_cursor(self, sql, params, **cursor_options):
        if not getattr(self._state, "begin_pending", False):
            return super()._execute_cursor(sql, params, **cursor_options)
        return self.execute_together(sql, params or ())

    def execute_together(self, sql: str, params: tuple = (), commit: bool = False
                         ) -> psycopg.Cursor:
        """Run ``sql``, one statement or several separated by ``;``, as one message (the
        simple query protocol, parameters bound on the client), behind a noted BEGIN if
        there is one; the cursor is on the last statement's result. One round trip and one
        wake-up of the calling thread, where a pipeline of the same statements woke it
        several times, each a wait for the interpreter lock in a busy daemon.

        ``commit``: the statements end the transaction, and its COMMIT goes with them; the
        transaction's own ``commit()`` then sends nothing. Should one of them fail, nothing
        after it runs (the COMMIT neither) and the transaction rolls back as usual."""
        begin = getattr(self._state, "begin_pending", False)
        self._state.begin_pending = False
        self._log_query(sql, params)
        text = ("BEGIN; " if begin else "") + sql + ("; COMMIT" if commit else "")
        with peewee.__exception_wrapper__:
            cursor = psycopg.ClientCursor(self.connection())
            cursor.execute(text, params)
            cursor.set_result(-2 if commit else -1)
        self._state.commit_sent = commit
        return cursor

    def commit(self):
        if getattr(self._state, "begin_pending", False):
            self._state.begin_pending = False  # nothing was sent: nothing to commit
            return
        if getattr(self._state, "commit_sent", False):
            self._state.commit_sent = False  # sent with the transaction's last statements
            return
        super().commit()

    def rollback(self):
        self._state.commit_sent = False
        if getattr(self._state, "begin_pending", False):
            self._state.begin_pending = False
            return
        super().rollback()


def backend_identity(database) -> tuple[int, Any] | None:
    """(pid, start time) of the server process of the calling thread's PostgreSQL
    connection (``_PostgresDatabase.backend_identity``); None on SQLite."""
    database = unwrap(database)
    return database.backend_identity() if is_postgres(database) else None


def commit_outcome(database, mark: str, seq: int, backend: tuple[int, Any]) -> str:
    """Whether the transaction that set journal ``mark`` to ``seq`` (migration 009), sent
    to the server process ``backend`` (``backend_identity``) on a connection that broke,
    committed: ``committed``, ``aborted`` or ``in progress``.

    While that process lives, its transaction may still commit (it may be waiting for a
    lock, or for the rest of its messages, still in the network): it is asked to end,
    which rolls back a transaction waiting for its client and leaves a commit under way to
    finish, and the outcome is ``in progress`` (ask again). Once it is gone its transaction
    has ended, and the mark tells how."""
    if not backend_ended(database, backend):
        return "in progress"
    row = database.execute_sql("SELECT seq FROM journal_marks WHERE journal = %s",
                               (mark,)).fetchone()
    return "committed" if row is not None and row[0] >= seq else "aborted"


def backend_ended(database, backend: tuple[int, Any]) -> bool:
    """Whether the server process ``backend`` (``backend_identity``) has ended, so that a
    transaction it was sent can no longer commit. While it lives it is asked to end (which
    rolls back a transaction waiting for its client, and lets a commit under way finish):
    ask again."""
    running = database.execute_sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s "
        "AND backend_start = %s", backend).fetchone()
    return running is None


def journal_check_refused(exc: BaseException) -> bool:
    """``exc`` is ``mantle_journal_check`` refusing a transaction (a fence or a version no
    longer held, or a row it found locked: migration 009)."""
    return any(state in _JOURNAL_CHECK_REFUSED for state in _sqlstates(exc))


def transaction_conflict(exc: BaseException) -> bool:
    """``exc`` is PostgreSQL rolling a transaction back to end a conflict with another
    (SQLSTATE class 40: a deadlock, a serialization failure): nothing of it committed, the
    server is fine, and the same transaction written again at once goes through."""
    return any(state.startswith("40") for state in _sqlstates(exc))


def _sqlstates(exc: BaseException) -> list[str]:
    # peewee wraps the driver's error: the original is its first argument and its context
    candidates = (exc, exc.__cause__, exc.__context__, *getattr(exc, "args", ())[:1])
    return [state for state in (getattr(candidate, "sqlstate", None) for candidate in candidates)
            if isinstance(state, str)]


def _postgres_database(url: str) -> peewee.PostgresqlDatabase:
    normalized = "postgresql://" + url.split("://", 1)[1]
    try:
        params = psycopg.conninfo.conninfo_to_dict(normalized)
    except psycopg.Error as exc:
        raise _invalid(url, str(exc).strip()) from None
    port = params.get("port")
    if port is not None and not re.fullmatch(r"[0-9]+(,[0-9]+)*", str(port)):
        raise _invalid(url, f'invalid port "{port}"')
    dbname = params.pop("dbname", None)
    if not dbname:
        raise _invalid(url, "no database name given")
    params.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
    for key, value in _PG_CONNECTION_SETTINGS.items():
        params.setdefault(key, value)
    # Engine statements never wait forever on a lock or a stuck server (13.7), and a process
    # paused inside a transaction (SIGSTOP, a frozen VM) loses its session and the row locks
    # it held, so other nodes can take its executions over; the libpq ``options`` carries
    # both to every connection of every thread.
    options = params.get("options", "")
    for setting, value in (("statement_timeout", PG_STATEMENT_TIMEOUT_MS),
                           ("idle_in_transaction_session_timeout", PG_IDLE_IN_TRANSACTION_MS)):
        if setting not in options:
            options = f"{options} -c {setting}={value}".strip()
    params["options"] = options
    return _PostgresDatabase(dbname, prefer_psycopg3=True, max_connections=PG_POOL_SIZE,
                             timeout=PG_POOL_WAIT_S, stale_timeout=PG_POOL_STALE_S, **params)


def _verify(database: peewee.Database) -> None:
    """Connect and run a trivial query, turning driver errors into DatabaseUnavailable."""
    try:
        database.connect(reuse_if_open=True)
        database.execute_sql("SELECT 1").fetchone()
    except (peewee.DatabaseError, peewee.InterfaceError, sqlite3.Error, psycopg.Error,
            OSError) as exc:
        if not database.is_closed():
            database.close()
        raise DatabaseUnavailable(_detail(database, exc)) from None


def _detail(database: peewee.Database, exc: BaseException) -> str:
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    message = message or type(exc).__name__
    if isinstance(database, peewee.SqliteDatabase):
        path = database.database
        folder = os.path.dirname(path)
        if folder and not os.path.isdir(folder):
            message = f'directory "{folder}" does not exist'
        return f'cannot open SQLite database "{path}": {message}'
    return message


@contextlib.contextmanager
def database_failure():
    """A database reachable at connect that fails a statement no caller turned into an error
    of its own (locked past the busy timeout, gone since, a role that may not write): SPEC
    10.2's ``failed to connect to database: <detail>`` (``serve`` at startup, every CLI
    command), on one line, not a traceback."""
    try:
        yield
    except peewee.PeeweeException as exc:
        raise DatabaseUnavailable(" ".join(str(exc).split()) or type(exc).__name__) from exc
