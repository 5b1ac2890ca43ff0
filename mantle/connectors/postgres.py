"""``postgres/query`` (SPEC 13.5): one SQL statement against a PostgreSQL server, with psycopg.

The connection URL comes from the step's credential (``postgres``: ``url``; ``generic``:
``key``). Each attempt opens its own connection (autocommit: a statement commits on its own)
and closes it at the end.

Results are read one row at a time (libpq's single-row mode, on the connection's libpq
handle: a psycopg cursor holds a whole result in memory before its first row is read), so a
result larger than a step output may be is stopped, on the server too, as it crosses that
limit rather than read whole (``SELECT *`` from a large table).

Threads: the statement runs on a helper thread while the step's thread waits on it and on
``inv.cancel``, so a cancel (execution cancelled, step timeout, shutdown) is answered at once,
even while connecting. The step's thread then asks the server to cancel the statement
(PostgreSQL's cancel request), so it really stops there instead of running on unseen; the
helper closes the connection as soon as the statement ends.
"""

from __future__ import annotations

import select
import threading
import time
from typing import Any

import psycopg
import psycopg.adapt
import psycopg.conninfo
import psycopg.errors
import psycopg.pq
from psycopg.pq import ExecStatus
from psycopg.types.json import Jsonb

from mantle.connectors.base import (MAX_OUTPUT_BYTES, ConnectorError, ConnectorInterrupted,
                                    Invocation, json_size, output_too_large, params_of,
                                    wait_for)
from mantle.connectors.credentials import Credential, redact
from mantle.connectors.pgvalues import placeholders, to_json
from mantle.db.connect import PG_KEEPALIVES, url_passwords

__all__ = ["query", "CONNECT_TIMEOUT", "APPLICATION_NAME"]

CONNECT_TIMEOUT = 10  # seconds, unless the URL sets connect_timeout
APPLICATION_NAME = "mantle postgres/query"  # unless the URL sets application_name
_CANCEL_GRACE = 1.0  # how long a cancelled attempt waits for its statement to stop
_CANCEL_AGAIN = 0.05  # meanwhile, how often it asks the server again
_NO_URL = "postgres/query: a credential with the connection URL is required"


class _Lenient(psycopg.adapt.Loader):
    """A date/time loader that gives PostgreSQL's text for what Python's types cannot hold
    (``infinity``, years past 9999 or BC, ``24:00:00``) instead of failing the query."""

    base: type  # the loader it wraps: the one psycopg has for the type

    def __init__(self, oid: int, context=None):
        super().__init__(oid, context)
        self._inner = self.base(oid, context)

    def load(self, data) -> Any:
        try:
            return self._inner.load(data)
        except psycopg.DataError:
            return bytes(data).decode()


def _lenient_adapters() -> psycopg.adapt.AdaptersMap:
    adapters = psycopg.adapt.AdaptersMap(psycopg.adapters)
    for name in ("date", "time", "timetz", "timestamp", "timestamptz", "interval"):
        oid = adapters.types[name].oid
        base = adapters.get_loader(oid, psycopg.pq.Format.TEXT)
        adapters.register_loader(oid, type(f"Lenient_{name}", (_Lenient,), {"base": base}))
    return adapters


_ADAPTERS = _lenient_adapters()  # results are read as text: only text loaders are needed


def query(inv: Invocation) -> dict:
    """Run the step's ``query`` with ``args``; ``{"rows", "row_count"}`` or
    ``{"rows_affected"}``. Raises ConnectorError (``sqlstate`` in its output) or
    ConnectorInterrupted."""
    sql, values = _statement(params_of(inv))
    url = _url(inv.credential)
    job = _Job(url, sql, values)
    threading.Thread(target=job.run, name="mantle-postgres-query", daemon=True).start()
    if wait_for(job.done, inv.cancel, None) == "cancel":
        # A cancel request travels on a connection of its own and may reach the server
        # before the statement does, finding nothing to stop: sent again until it stops.
        # While still connecting there is nothing to stop: the statement will not start.
        deadline = time.monotonic() + _CANCEL_GRACE
        while job.cancel():
            left = deadline - time.monotonic()
            if job.done.wait(min(_CANCEL_AGAIN, max(left, 0))) or left <= 0:
                break
        raise ConnectorInterrupted()
    if job.error is not None:
        raise _hidden(job.error, url)
    return job.output


def _statement(params: dict) -> tuple[str, list | None]:
    text = params.get("query")
    if not isinstance(text, str) or not text.strip():
        raise ConnectorError("postgres/query: query is required", retryable=False)
    if "\x00" in text:
        raise ConnectorError("postgres/query: query contains a NUL character",
                             retryable=False)
    args = params.get("args")
    if args is None:
        args = []
    if not isinstance(args, list):
        raise ConnectorError("postgres/query: args must be a list", retryable=False)
    sql, used = placeholders(text)
    if not used:
        return sql, None
    missing = max(used)
    if missing > len(args) or min(used) < 1:
        number = missing if missing > len(args) else min(used)
        raise ConnectorError(f"postgres/query: query uses ${number} but args has "
                             f"{len(args)} value(s)", retryable=False)
    return sql, [_argument(args[number - 1]) for number in used]


def _argument(value: Any) -> Any:
    """A JSON value as psycopg should send it: maps as jsonb, lists as arrays, the rest as
    themselves (text goes untyped, so the server casts it to what the statement needs)."""
    if isinstance(value, dict):
        return Jsonb(value)
    if isinstance(value, list):
        return [_argument(item) for item in value]
    return value


def _url(credential: Credential | None) -> str:
    field = {"postgres": "url", "generic": "key"}.get(credential.type) if credential else None
    url = credential.fields.get(field, "") if field else ""
    if not url:
        raise ConnectorError(_NO_URL, retryable=False)
    return url


def _hidden(error: ConnectorError, url: str) -> ConnectorError:
    """``error`` with the URL's password replaced (``run_action`` hides the whole URL)."""
    for password in _passwords(url):
        error = ConnectorError(redact(error.message, password), redact(error.output, password),
                               error.retryable)
    return error


def _passwords(url: str) -> list[str]:
    """The password libpq reads from ``url`` (a URL or ``key=value`` text), and every spelling
    of one in a URL it cannot parse, whose error may quote them."""
    try:
        password = psycopg.conninfo.conninfo_to_dict(url).get("password")
    except psycopg.Error:
        return url_passwords(url)
    return [password] if password else []


class _Job:
    """One connection and one statement, run by ``run`` on the helper thread."""

    def __init__(self, url: str, sql: str, values: list | None):
        self.url, self.sql, self.values = url, sql, values
        self.done = threading.Event()
        self.output: dict | None = None
        self.error: ConnectorError | None = None
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._cancelled = False

    def run(self) -> None:
        try:
            self.output = self._execute()
        except psycopg.Error as exc:
            self.error = _failure(exc)
        except ConnectorError as exc:
            self.error = exc
        except Exception as exc:  # a value psycopg cannot send or read
            self.error = ConnectorError(f"postgres/query: {exc}")
        finally:
            with self._lock:
                conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
            self.done.set()

    def _execute(self) -> dict:
        options = _connect_options(self.url)
        conn = psycopg.connect(**options, context=_ADAPTERS)
        with self._lock:
            self._conn = conn
            if self._cancelled:
                raise ConnectorError("postgres/query: cancelled")
        return _Results(conn).read(self.sql, self.values)

    def cancel(self) -> bool:
        """Runs on the step's thread: stop the statement on the server, if one runs. False
        when none can run: not connected yet (``_execute`` then runs nothing) or ended."""
        with self._lock:
            self._cancelled = True
            conn = self._conn
        if conn is None:
            return False
        _stop(conn)
        return True


def _stop(conn: psycopg.Connection) -> None:
    """Ask the server to cancel what ``conn`` runs (PostgreSQL's cancel request)."""
    try:
        conn.cancel_safe(timeout=_CANCEL_GRACE)
    except (psycopg.Error, OSError):
        pass  # the statement ended meanwhile, or the server is gone: nothing runs


class _Results:
    """One query text sent on ``conn``'s libpq handle, its results read a row at a time."""

    def __init__(self, conn: psycopg.Connection):
        self._conn = conn
        self._pgconn = conn.pgconn  # non-blocking: psycopg sets it so
        self._encoding = conn.info.encoding
        self._tx = psycopg.adapt.Transformer(conn)  # conn's adapters: _ADAPTERS

    def read(self, sql: str, values: list | None) -> dict:
        """The output of the last statement of ``sql``: ``{"rows", "row_count"}`` or
        ``{"rows_affected"}``. Raises psycopg.Error for the server's error, ConnectorError
        when the rows grow past the step output limit (the statement is cancelled)."""
        self._send(sql, values)
        answer: dict = {"rows_affected": 0}  # a text of comments only runs nothing
        rows: list[dict] = []
        names: list[str] | None = None  # those of the result being read
        size = 0
        while (result := self._next()) is not None:
            status = result.status
            if status == ExecStatus.SINGLE_TUPLE:
                self._tx.set_pgresult(result, set_loaders=names is None)
                if names is None:
                    names = [result.fname(i).decode(self._encoding)
                             for i in range(result.nfields)]
                row = dict(zip(names, map(to_json, self._tx.load_row(0, tuple))))
                size += json_size(row) + 1
                if size > MAX_OUTPUT_BYTES:
                    _stop(self._conn)
                    raise ConnectorError(output_too_large(size, more=True))
                rows.append(row)
            elif status == ExecStatus.TUPLES_OK:  # a statement's rows ended (or it had none)
                answer = {"rows": rows, "row_count": len(rows)}
                rows, names, size = [], None, 0
            elif status == ExecStatus.COMMAND_OK:
                answer = {"rows_affected": result.command_tuples or 0}
            elif status == ExecStatus.EMPTY_QUERY:
                answer = {"rows_affected": 0}
            elif status == ExecStatus.FATAL_ERROR:
                raise psycopg.errors.error_from_result(result, encoding=self._encoding)
            else:  # COPY FROM STDIN / TO STDOUT: the connection is closed after this
                raise ConnectorError("postgres/query: COPY from or to the client is not "
                                     "supported", retryable=False)
        return answer

    def _send(self, sql: str, values: list | None) -> None:
        query = sql.encode(self._encoding)
        if values is None:  # the simple protocol: several statements may follow each other
            self._pgconn.send_query(query)
        else:
            params = self._tx.dump_sequence(values, [psycopg.adapt.PyFormat.AUTO] * len(values))
            self._pgconn.send_query_params(query, params, param_types=self._tx.types,
                                           param_formats=self._tx.formats)
        self._pgconn.set_single_row_mode()
        while self._pgconn.flush():
            if self._wait(select.POLLIN | select.POLLOUT) & select.POLLIN:
                self._pgconn.consume_input()

    def _next(self) -> psycopg.pq.abc.PGresult | None:
        """The next result (a row, in single-row mode); None once the text has run."""
        while self._pgconn.is_busy():
            self._wait(select.POLLIN)
            self._pgconn.consume_input()
        return self._pgconn.get_result()

    def _wait(self, events: int) -> int:
        poller = select.poll()  # not select(): the daemon's descriptors may pass 1024
        poller.register(self._pgconn.socket, events)
        ready = poller.poll()
        return ready[0][1] if ready else 0


def _connect_options(url: str) -> dict:
    try:
        options = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ConnectorError(f"postgres/query: invalid connection URL: {_first_line(exc)}"
                             ) from None
    options.setdefault("connect_timeout", CONNECT_TIMEOUT)
    options.setdefault("application_name", APPLICATION_NAME)
    for key, value in PG_KEEPALIVES.items():  # a statement on a vanished server fails
        options.setdefault(key, value)
    options["autocommit"] = True
    return options


def _failure(exc: psycopg.Error) -> ConnectorError:
    sqlstate = getattr(exc, "sqlstate", None)
    message = exc.diag.message_primary if sqlstate and exc.diag else None
    output = {"sqlstate": sqlstate} if sqlstate else None
    return ConnectorError(f"postgres/query: {message or _first_line(exc)}", output)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) or type(exc).__name__
