"""``postgres/query`` run by the real engine (SPEC 13.5), with the engine's own database on
SQLite or PostgreSQL and the queried database on the session cluster: outputs reach CEL, and
a step timeout or a cancel stops the statement on the server."""

from __future__ import annotations

import psycopg
import pytest

from mantle.connectors.postgres import APPLICATION_NAME
from tests.actors.conftest import apply, finish, run, steps_of, wait_until

pytestmark = pytest.mark.postgres


@pytest.fixture
def target(pg_cluster):
    name = pg_cluster.new_name("pgq")
    url = pg_cluster.create_database(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric)")
        conn.execute("INSERT INTO orders VALUES (1, 10.50), (2, 4.25)")
        yield url, conn
    pg_cluster.drop_database(name)


@pytest.fixture
def secrets(target):
    """The connection URL as a ``generic`` credential from MANTLE_SECRET_WAREHOUSE."""
    return {"MANTLE_SECRET_WAREHOUSE": target[0]}


def _running(conn, marker: str) -> bool:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                        "AND query LIKE %s", (APPLICATION_NAME, f"%{marker}%")).fetchone()[0] > 0


def test_query_rows_reach_later_steps_through_cel(engine, target):
    apply("""
        name: report
        steps:
          - name: totals
            action: postgres/query
            credential: warehouse
            params:
              query: "SELECT id, total FROM orders WHERE total > $1 ORDER BY id"
              args: [1]
          - name: tell
            action: core/log
            params:
              message: "{{ steps.totals.output.row_count }} orders, first {{ steps.totals.output.rows[0].total }}"
    """)
    detail = run(engine, "report")
    assert detail["status"] == "completed", detail
    steps = steps_of(detail)
    assert steps["totals"]["output"] == {
        "rows": [{"id": 1, "total": "10.50"}, {"id": 2, "total": "4.25"}], "row_count": 2}
    assert steps["tell"]["output"] == {"message": "2 orders, first 10.50"}


def test_a_step_timeout_cancels_the_statement_on_the_server(engine, target):
    _, conn = target
    apply("""
        name: slow-query
        steps:
          - name: sleep
            action: postgres/query
            credential: warehouse
            timeout: 1s
            params: {query: "SELECT pg_sleep(60), 'timeout-marker'"}
    """)
    detail = run(engine, "slow-query", timeout=20)
    step = steps_of(detail)["sleep"]
    assert (step["status"], step["error"]) == ("failed", "step timed out after 1s")
    wait_until(lambda: not _running(conn, "timeout-marker"), timeout=5,
               message="the timed-out statement still runs on the server")


def test_cancelling_the_execution_cancels_the_statement_on_the_server(engine, target):
    _, conn = target
    apply("""
        name: held-query
        steps:
          - name: sleep
            action: postgres/query
            credential: warehouse
            params: {query: "SELECT pg_sleep(60), 'cancel-marker'"}
    """)
    execution_id = engine.run("held-query").execution_id
    wait_until(lambda: _running(conn, "cancel-marker"), timeout=10,
               message="the statement never started")
    engine.cancel(execution_id, actor="cli")
    detail = finish(engine, execution_id)
    assert detail["status"] == "cancelled"
    wait_until(lambda: not _running(conn, "cancel-marker"), timeout=5,
               message="the cancelled statement still runs on the server")
    assert steps_of(detail)["sleep"]["status"] == "cancelled"
