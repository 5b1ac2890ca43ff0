"""The journal: batched writes, retry through outages, isolation of a failing operation."""

from __future__ import annotations

import logging
import sqlite3
import threading

import peewee
import pytest

from mantle import db as mantle_db
from mantle import store
from mantle.db import transaction
from mantle.db.models import WorkflowExecution
from mantle.errors import JournalStopped
from mantle.services.journal import Journal
from tests.helpers.database import bound_database
from tests.helpers.pgproxy import CommitCutter
from tests.helpers.waiting import apply_yaml, wait_until


@pytest.fixture
def sqlite_file(tmp_path):
    path = tmp_path / "journal.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (v INTEGER UNIQUE)")
    conn.commit()
    conn.close()
    return path


def _journal(path, timeout=0.05):
    database = peewee.SqliteDatabase(str(path), timeout=timeout)
    journal = Journal(database)
    journal.start()
    return database, journal


def _insert(database, value):
    return lambda: database.execute_sql("INSERT INTO t (v) VALUES (?)", (value,)).rowcount


def test_operations_commit_and_report_results_in_order(sqlite_file):
    database, journal = _journal(sqlite_file)
    try:
        done = []
        finished = threading.Event()
        for value in range(50):
            journal.submit(_insert(database, value), lambda r, v=value: done.append(v))
        journal.submit(lambda: None, lambda _: finished.set())
        assert finished.wait(5)
        assert done == list(range(50))
        assert journal.call(lambda: database.execute_sql("SELECT COUNT(*) FROM t")
                            .fetchone()[0]) == 50
    finally:
        journal.stop()


def test_a_failing_operation_does_not_sink_its_batch(sqlite_file):
    database, journal = _journal(sqlite_file)
    try:
        journal.call(_insert(database, 1))
        failures = []
        gate = threading.Event()
        journal.submit(lambda: gate.wait(5))  # hold the journal so the next three batch up
        journal.submit(_insert(database, 2))
        journal.submit(_insert(database, 1), None, failures.append)  # duplicate: fails
        journal.submit(_insert(database, 3))
        gate.set()
        assert journal.call(lambda: [r[0] for r in database.execute_sql(
            "SELECT v FROM t ORDER BY v")]) == [1, 2, 3]
        assert len(failures) == 1 and isinstance(failures[0], peewee.IntegrityError)
    finally:
        journal.stop()


def test_operations_queued_while_it_waits_for_the_write_lock_join_that_transaction(
        sqlite_file):
    """Beginning waits while another writer (a second ``serve`` worker) has its turn; what is
    submitted meanwhile is written in the transaction that was waiting, not in a turn of the
    lock of its own after it."""
    database, journal = _journal(sqlite_file)
    other = peewee.SqliteDatabase(str(sqlite_file))
    events = []
    finished = threading.Event()

    def submit(value, then=None):
        def op():
            events.append(("op", value))
            return _insert(database, value)()

        def done(_):
            events.append(("done", value))
            if then:
                then()

        journal.submit(op, done)

    try:
        with transaction(other):  # the other writer's turn
            submit(1)
            wait_until(lambda: journal.backlog == 0, message="the journal took the first one")
            submit(2)
            submit(3, finished.set)
        assert finished.wait(5)
    finally:
        journal.stop()
        other.close()
    assert events == [("op", 1), ("op", 2), ("op", 3),
                      ("done", 1), ("done", 2), ("done", 3)]


def test_writes_are_retried_through_a_lock_outage_and_logged_once(sqlite_file, caplog):
    caplog.set_level(logging.INFO)
    database, journal = _journal(sqlite_file)
    holder = sqlite3.connect(sqlite_file, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        finished = threading.Event()
        journal.submit(_insert(database, 7), lambda _: finished.set())
        assert not finished.wait(1.2)  # at least two retries while locked
        assert not journal.healthy
        holder.execute("ROLLBACK")
        assert finished.wait(10)
        assert journal.healthy
    finally:
        holder.close()
        journal.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("database unavailable") == 1
    assert "database available again" in messages


def test_stop_during_an_outage_fails_pending_operations(sqlite_file):
    database, journal = _journal(sqlite_file)
    holder = sqlite3.connect(sqlite_file, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    failures = []
    try:
        journal.submit(_insert(database, 1), None, failures.append)
        journal.stop(timeout=0.3)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert len(failures) == 1 and isinstance(failures[0], JournalStopped)


# --- a connection that breaks while COMMIT is in flight (PostgreSQL) ---------------------


@pytest.mark.parametrize("lose", ["answer", "commit"])
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_transaction_whose_commit_outcome_was_lost_is_written_exactly_once(
        db, migrated_db_url, lose):
    """The connection breaks while a transaction's COMMIT is in flight: after the COMMIT
    reached the server (``answer``: it committed, the journal never heard) or before
    (``commit``: it rolled back). The journal asks the database which, once it answers
    again: a committed batch is not written a second time (its operations' results are
    those of the first pass), one that did not commit is."""
    db.execute_sql("CREATE TABLE t (v INTEGER UNIQUE)")
    with CommitCutter(migrated_db_url, b"INSERT INTO t", lose=lose) as proxy:
        database = mantle_db.connect(proxy.url)
        journal = Journal(database)
        journal.start()
        try:
            proxy.armed.set()
            inserted = journal.call(lambda: database.execute_sql(
                "INSERT INTO t (v) VALUES (1)").rowcount, timeout=30)
            assert proxy.cut.is_set(), "the proxy never saw the COMMIT"
        finally:
            journal.stop()
            mantle_db.close_all(database)
    assert inserted == 1  # a second pass would have hit the unique constraint
    assert db.execute_sql("SELECT v FROM t").fetchall() == [(1,)]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_final_status_whose_commit_answer_was_lost_is_reported_as_written(
        db, migrated_db_url):
    """``finish_execution`` answers whether its final status was the one written (False: a
    cancel had committed first). When the answer to the COMMIT that wrote it is lost, the
    status is read back, not written again: a second pass would find the row final and
    answer False, and the Execution actor would take its own finish for a cancel."""
    apply_yaml("""
        name: w
        steps: [{name: a, action: core/log, params: {message: hi}}]
    """)
    with transaction():
        created = store.create_execution("w", {}, None, None, "node", "test")
    execution_id = created.execution["id"]
    with CommitCutter(migrated_db_url, b"UPDATE workflow_executions", lose="answer") as proxy:
        with bound_database(proxy.url) as database:
            journal = Journal(database)
            journal.start()
            try:
                proxy.armed.set()
                written = journal.call(
                    lambda: store.finish_execution(execution_id, "completed", None),
                    timeout=30)
                assert proxy.cut.is_set(), "the proxy never saw the COMMIT"
            finally:
                journal.stop()
    mantle_db.bind(db)  # bound_database unbound the models
    assert written is True
    assert WorkflowExecution.get_by_id(execution_id).status == "completed"
