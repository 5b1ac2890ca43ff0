"""The journal: batched writes, retry through outages, isolation of a failing operation."""

from __future__ import annotations

import logging
import sqlite3
import threading

import peewee
import pytest

from mantle.db import transaction
from mantle.errors import JournalStopped
from mantle.services.journal import Journal
from tests.helpers.waiting import wait_until


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
