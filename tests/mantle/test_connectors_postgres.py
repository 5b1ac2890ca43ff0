"""``postgres/query`` (SPEC 13.5) against the session's real PostgreSQL: statements, the type
mapping, errors with their SQLSTATE, one connection per attempt, and a cancel that stops the
statement on the server. Placeholder translation is checked on its own first."""

from __future__ import annotations

import json
import threading

import psycopg
import pytest

from mantle.connectors import ConnectorError, ConnectorInterrupted, Invocation, run_action
from mantle.connectors.credentials import Credential
from mantle.connectors.pgvalues import placeholders
from mantle.connectors.postgres import APPLICATION_NAME, _connect_options
from tests.helpers import cancelled_once_accepted
from tests.helpers.pgproxy import QueryDelayer
from tests.helpers.waiting import wait_until


# --- $n placeholders (no database) ---

@pytest.mark.parametrize("sql, expected, used", [
    ("SELECT $1, $2", "SELECT $1, $2", [1, 2]),
    ("SELECT $2 + $1 + $2", "SELECT $1 + $2 + $3", [2, 1, 2]),
    ("SELECT $3::int, $3::text", "SELECT $1::int, $2::text", [3, 3]),
    ("SELECT 'cost: $2 50%' || $2", "SELECT 'cost: $2 50%' || $1", [2]),
    ('SELECT "col$2", $2', 'SELECT "col$2", $1', [2]),
    ("SELECT a$2, $2", "SELECT a$2, $1", [2]),
    ("SELECT $$ body $2 $$, $tag$ $3 $tag$, $2", "SELECT $$ body $2 $$, $tag$ $3 $tag$, $1",
     [2]),
    ("SELECT 1 -- $2\n, $2 /* $3 /* nested $4 */ */", "SELECT 1 -- $2\n, $1 /* $3 /* "
     "nested $4 */ */", [2]),
    ("SELECT E'it\\'s $2', $2", "SELECT E'it\\'s $2', $1", [2]),
    ("SELECT 'a''$2', $2 % 2", "SELECT 'a''$2', $1 % 2", [2]),
])
def test_dollar_placeholders_are_numbered_by_use_outside_literals_and_comments(sql, expected,
                                                                               used):
    """Each use of a parameter is sent as a parameter of its own, numbered in order, so that
    each takes the type its place asks for (``$3::int, $3::text``)."""
    assert placeholders(sql) == (expected, used)


def test_a_query_without_placeholders_is_left_exactly_as_written():
    assert placeholders("SELECT '100%' AS p") == ("SELECT '100%' AS p", [])


# --- against the server ---

@pytest.fixture
def target(pg_cluster):
    """A scratch database on the session cluster: (url, a psycopg connection to it)."""
    name = pg_cluster.new_name("pgq")
    url = pg_cluster.create_database(name)
    with psycopg.connect(url, autocommit=True) as conn:
        yield url, conn
    pg_cluster.drop_database(name)


def query(url: str, sql: str, args=None, cancel=None, kind: str = "postgres") -> dict:
    field = "url" if kind == "postgres" else "key"
    params = {"query": sql} if args is None else {"query": sql, "args": args}
    return run_action(Invocation("postgres/query", params, cancel or threading.Event(),
                                 credential=Credential("db", kind, {field: url})))


def failure(url, sql, args=None, **kwargs) -> ConnectorError:
    with pytest.raises(ConnectorError) as caught:
        query(url, sql, args, **kwargs)
    return caught.value


@pytest.mark.postgres
def test_select_returns_rows_and_row_count(target):
    url, _ = target
    assert query(url, "SELECT n, n * $1 AS doubled FROM generate_series(1, 3) n", [2]) == {
        "rows": [{"n": 1, "doubled": 2}, {"n": 2, "doubled": 4}, {"n": 3, "doubled": 6}],
        "row_count": 3}
    assert query(url, "SELECT 1 WHERE false") == {"rows": [], "row_count": 0}


@pytest.mark.postgres
def test_insert_update_delete_return_rows_affected_and_commit(target):
    url, conn = target
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text, tags text[], meta jsonb)")
    assert query(url, "INSERT INTO items VALUES ($1, $2, $3, $4), ($5, $2, NULL, NULL)",
                 [1, "a", ["x", "y"], {"k": [1, 2]}, 2]) == {"rows_affected": 2}
    assert query(url, "UPDATE items SET name = $1 WHERE id >= $2", ["b", 1]) == \
        {"rows_affected": 2}
    assert query(url, "DELETE FROM items WHERE id = $1", [2]) == {"rows_affected": 1}
    assert query(url, "INSERT INTO items (id, name) VALUES ($1, $2) RETURNING id, name",
                 [3, "c"]) == {"rows": [{"id": 3, "name": "c"}], "row_count": 1}
    # Committed: another connection sees it.
    assert conn.execute("SELECT id, name, tags, meta FROM items ORDER BY id").fetchall() == \
        [(1, "b", ["x", "y"], {"k": [1, 2]}), (3, "c", None, None)]


@pytest.mark.postgres
def test_values_map_to_json_as_the_spec_says(target):
    url, _ = target
    row = query(url, """
        SELECT 1::int2 AS small, 2147483647::int4 AS int, 9007199254740993::int8 AS huge,
               -9007199254740992::int8 AS edge, 12.50::numeric AS dec,
               123456789012345678901234567890::numeric AS bignum, 1.5::float8 AS dbl,
               'NaN'::float8 AS nan, 'Infinity'::float4 AS inf, true AS yes, NULL AS nothing,
               'text'::varchar AS str, '2026-03-18 09:00:00.412+02'::timestamptz AS tstz,
               '2026-03-18 09:00:00'::timestamp AS ts, '2026-03-18'::date AS day,
               '09:30:00'::time AS clock, '1 day 02:03:04.5'::interval AS span,
               '\\x00ff10'::bytea AS raw, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS id,
               '{"a": [1, {"b": null}]}'::jsonb AS doc, '[1, 2]'::json AS list,
               ARRAY[1, 2, NULL] AS ints, ARRAY['2026-01-01'::date] AS days,
               '10.0.0.1/8'::inet AS addr
    """)["rows"][0]
    assert row == {
        "small": 1, "int": 2147483647, "huge": "9007199254740993", "edge": -9007199254740992,
        "dec": "12.50", "bignum": "123456789012345678901234567890", "dbl": 1.5,
        "nan": "NaN", "inf": "Infinity", "yes": True, "nothing": None, "str": "text",
        "tstz": "2026-03-18T07:00:00.412000Z", "ts": "2026-03-18T09:00:00",
        "day": "2026-03-18", "clock": "09:30:00", "span": "P1DT2H3M4.5S", "raw": "AP8Q",
        "id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "doc": {"a": [1, {"b": None}]},
        "list": [1, 2], "ints": [1, 2, None], "days": ["2026-01-01"], "addr": "10.0.0.1/8"}


@pytest.mark.postgres
def test_dates_and_times_a_python_date_cannot_hold_come_as_postgres_text(target):
    # 'infinity' (an open-ended validity), BC or year 10000 dates and 24:00:00 are valid
    # PostgreSQL values: a SELECT meeting one failed ("timestamp too large (after year 10K)").
    url, _ = target
    row = query(url, """
        SELECT 'infinity'::timestamptz AS open_end, '-infinity'::timestamp AS start,
               'infinity'::date AS day, '10000-01-01'::date AS far, '0044-03-15 BC'::date AS bc,
               '24:00:00'::time AS midnight, ARRAY['infinity'::timestamptz] AS list,
               '2026-03-18 09:00:00+00'::timestamptz AS usual
    """)["rows"][0]
    assert row == {"open_end": "infinity", "start": "-infinity", "day": "infinity",
                   "far": "10000-01-01", "bc": "0044-03-15 BC", "midnight": "24:00:00",
                   "list": ["infinity"], "usual": "2026-03-18T09:00:00Z"}


@pytest.mark.postgres
def test_a_json_value_with_an_escaped_lone_surrogate_keeps_a_replacement_character(target):
    # The json type keeps its text as written: "\ud800" decodes to a lone surrogate, which
    # no database, JSON document or HTTP body can carry (storing the output failed).
    url, _ = target
    row = query(url, """SELECT '{"t": "a\\ud800", "\\udfff": 1}'::json AS doc""")["rows"][0]
    assert row == {"doc": {"t": "a\ufffd", "\ufffd": 1}}
    json.dumps(row, ensure_ascii=False).encode("utf-8")  # storable


@pytest.mark.postgres
def test_server_errors_are_worded_with_the_message_and_keep_the_sqlstate(target):
    url, conn = target
    conn.execute("CREATE TABLE once (id int PRIMARY KEY)")
    query(url, "INSERT INTO once VALUES ($1)", [1])
    duplicate = failure(url, "INSERT INTO once VALUES ($1)", [1])
    assert duplicate.message == ('postgres/query: duplicate key value violates unique '
                                 'constraint "once_pkey"')
    assert duplicate.output == {"sqlstate": "23505"}
    syntax = failure(url, "SELEC 1")
    assert syntax.message == 'postgres/query: syntax error at or near "SELEC"'
    assert syntax.output == {"sqlstate": "42601"}
    assert failure(url, "SELECT * FROM nowhere").output == {"sqlstate": "42P01"}


@pytest.mark.postgres
def test_a_generic_credential_holds_the_url_in_its_key(target):
    url, _ = target
    assert query(url, "SELECT 7 AS n", kind="generic") == {"rows": [{"n": 7}], "row_count": 1}


def test_bad_params_and_missing_credentials_fail_without_retry():
    cases = [
        ({"query": "SELECT 1"}, None,
         "postgres/query: a credential with the connection URL is required"),
        ({"query": "SELECT 1"}, Credential("t", "bearer", {"token": "x"}),
         "postgres/query: a credential with the connection URL is required"),
        ({}, Credential("db", "postgres", {"url": "postgresql://h/d"}),
         "postgres/query: query is required"),
        ({"query": "SELECT $1", "args": "x"}, Credential("db", "postgres", {"url": "x"}),
         "postgres/query: args must be a list"),
        ({"query": "SELECT $1, $3", "args": [1, 2]}, Credential("db", "postgres", {"url": "x"}),
         "postgres/query: query uses $3 but args has 2 value(s)"),
    ]
    for params, credential, message in cases:
        with pytest.raises(ConnectorError) as caught:
            run_action(Invocation("postgres/query", params, threading.Event(),
                                  credential=credential))
        assert (caught.value.message, caught.value.retryable) == (message, False)


@pytest.mark.postgres
def test_a_connection_failure_never_shows_the_password(pg_cluster):
    url = f"postgresql://postgres:hunter2-Pw@127.0.0.1:{pg_cluster.port}/no_such_database"
    error = failure(url, "SELECT 1")
    assert error.message.startswith("postgres/query: ")
    assert 'database "no_such_database" does not exist' in error.message
    assert "hunter2-Pw" not in error.message and "hunter2-Pw" not in str(error.output)


@pytest.mark.parametrize("url, shown", [
    # libpq quotes the token it cannot decode: here the password of a password= parameter
    ("postgresql://bob@127.0.0.1:1/db?password=hunter2%ZZ", "invalid percent-encoded token"),
    # libpq quotes the whole URL, which Python's URL parser refuses too
    ("postgresql://bob:hunter2@[::1/db", "looking for matching"),
])
def test_a_url_libpq_cannot_parse_is_refused_without_showing_its_password(url, shown):
    error = failure(url, "SELECT 1")
    assert error.message.startswith("postgres/query: invalid connection URL: ")
    assert shown in error.message and "hunter2" not in error.message


@pytest.mark.postgres
def test_the_attempts_connection_has_keepalives_unless_the_url_sets_them(target):
    """A statement whose server vanished (a host down, a network cut) held its step, without
    a step timeout, until the system's TCP gave up (hours): the attempt's connection had
    none of the keepalives and ``tcp_user_timeout`` of mantle's own connections."""
    url, _ = target
    for own_url, idle in ((url, "5"), (f"{url}?keepalives_idle=60", "60")):
        options = _connect_options(own_url)
        with psycopg.connect(**options) as conn:
            settings = conn.info.get_parameters()
        assert (settings.get("keepalives"), settings.get("keepalives_idle"),
                settings.get("tcp_user_timeout")) == ("1", idle, "10000"), settings


def _backends(conn, marker: str) -> list[tuple]:
    return conn.execute("SELECT pid, state, query FROM pg_stat_activity "
                        "WHERE application_name = %s AND query LIKE %s",
                        (APPLICATION_NAME, f"%{marker}%")).fetchall()


@pytest.mark.postgres
def test_each_attempt_closes_its_connection(target):
    url, conn = target
    query(url, "SELECT 'closing-marker' AS m")
    wait_until(lambda: not _backends(conn, "closing-marker"), timeout=5,
               message="the attempt's connection is still open")


@pytest.mark.postgres
def test_a_cancel_stops_the_statement_on_the_server(target):
    url, conn = target
    cancel = threading.Event()
    outcome = {}

    def attempt():
        try:
            query(url, "SELECT pg_sleep(60), 'cancel-marker'", cancel=cancel)
        except ConnectorInterrupted as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=attempt)
    worker.start()
    wait_until(lambda: any(state == "active" for _, state, _ in _backends(conn, "cancel-marker")),
               timeout=10, message="the statement never started")
    cancel.set()
    worker.join(5)
    assert not worker.is_alive() and isinstance(outcome.get("error"), ConnectorInterrupted)
    # Stopped on the server, and its connection closed: nothing of it is left there.
    wait_until(lambda: not _backends(conn, "cancel-marker"), timeout=5,
               message="the statement still runs on the server")


@pytest.mark.alone
def test_a_cancel_while_connecting_ends_the_attempt_at_once():
    # No statement can run yet (the connection, once made, sees the cancel and runs
    # nothing), so there is nothing to wait for: the attempt waited out its 1 s grace, past
    # the 50 ms in which a cancel must interrupt a running step (SPEC 13.7).
    ended, after_cancel = cancelled_once_accepted(lambda port, cancel: query(
        f"postgresql://u:pw@127.0.0.1:{port}/db?connect_timeout=20", "SELECT 1",
        cancel=cancel))  # the server accepts, and never answers the startup
    assert isinstance(ended.error, ConnectorInterrupted)
    assert after_cancel < 0.2


@pytest.mark.postgres
def test_a_cancel_that_reaches_the_server_before_its_statement_still_stops_it(target):
    """SPEC 13.5: cancel of the execution cancels the running statement on the server. A
    cancel request travels on a connection of its own: sent just after the statement left
    the client, it can reach the server first and find nothing running, and the statement
    then ran to its end unseen after the step had ended. The cancel is sent again until the
    statement is gone (or the attempt's grace ends)."""
    url, conn = target
    cancel = threading.Event()
    outcome = {}
    with QueryDelayer(url, b"late-cancel-marker", delay=0.4) as slow:
        def attempt():
            try:
                query(slow.url, "SELECT pg_sleep(60), 'late-cancel-marker'", cancel=cancel)
            except ConnectorInterrupted as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=attempt)
        worker.start()
        assert slow.seen.wait(10), "the statement was never sent"
        cancel.set()  # while the statement is on its way to the server
        worker.join(5)
        assert not worker.is_alive() and isinstance(outcome.get("error"), ConnectorInterrupted)
        wait_until(lambda: not _backends(conn, "late-cancel-marker"), timeout=5,
                   message="the statement still runs on the server")


@pytest.mark.postgres
def test_text_args_are_cast_by_the_server_and_lists_are_arrays(target):
    url, _ = target
    assert query(url, "SELECT $1::date + 1 AS next, 3 = ANY($2) AS found, $3::jsonb ->> 'k' AS k",
                 ["2026-02-28", [1, 3], {"k": "v"}]) == \
        {"rows": [{"next": "2026-03-01", "found": True, "k": "v"}], "row_count": 1}
    # Each use of a parameter is sent on its own, so each use takes the type of its place.
    assert query(url, "SELECT $1::int + 1 AS n, $1::text || '!' AS t", ["41"]) == \
        {"rows": [{"n": 42, "t": "41!"}], "row_count": 1}


@pytest.mark.postgres
def test_several_statements_without_args_answer_with_the_last_one(target):
    url, conn = target
    assert query(url, "CREATE TABLE t (n int); INSERT INTO t VALUES (1), (2); "
                      "SELECT count(*) AS n FROM t") == {"rows": [{"n": 2}], "row_count": 1}
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)


@pytest.mark.postgres
@pytest.mark.parametrize("args", [None, [1000]])
def test_rows_past_the_output_limit_stop_the_statement_instead_of_being_read_whole(
        target, args):
    """A statement whose rows pass the step output limit (1 MiB) fails as they cross it,
    and the statement is stopped on the server: a psycopg cursor read the whole result into
    memory first, so ``SELECT *`` from a large table could take the daemon's memory (this
    one would be a terabyte) and, resumed after the crash, take it again."""
    url, conn = target
    sql = ("SELECT repeat('x', 1000) AS filler, 'limit-marker' AS marker, "
           "generate_series(1, 1000000000) AS n")  # a set function here yields as it goes
    if args is not None:
        sql = sql.replace("1000)", "$1)")
    error = failure(url, sql, args)
    assert error.message.startswith("step output exceeds 1048576 byte limit (more than ")
    assert error.retryable  # as a step output over the limit is
    wait_until(lambda: not _backends(conn, "limit-marker"), timeout=5,
               message="the statement still runs on the server")


@pytest.mark.postgres
def test_copy_from_or_to_the_client_is_a_clear_error(target):
    url, conn = target
    conn.execute("CREATE TABLE t (n int)")
    for sql in ("COPY t TO STDOUT", "COPY t FROM STDIN"):
        error = failure(url, sql)
        assert (error.message, error.retryable) == (
            "postgres/query: COPY from or to the client is not supported", False)
