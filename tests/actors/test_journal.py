"""The journal: batched writes, retry through outages, isolation of a failing operation."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import sys
import threading
import time

import peewee
import pytest

from mantle import db as mantle_db
from mantle import store
from mantle.db import transaction
from mantle.db.models import WorkflowExecution
from mantle.errors import ExecutionStopped, GateClosed, JournalStopped, LeaseLost
from mantle.services.journal import Journal
from tests.helpers.database import bound_database
from tests.helpers.pgproxy import CommitCutter, LateCommit
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


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_writes_wait_out_a_connection_pool_with_none_free_as_an_outage(
        migrated_db_url, monkeypatch):
    """A process holds at most ``PG_POOL_SIZE`` connections, and a thread waits
    ``PG_POOL_WAIT_S`` for a free one (docs/configuration.md). Finding none in that time
    (all held by statements waiting on a lock or a dying server) means the database is
    busy, not that the write is wrong: the journal waits it out as an outage (SPEC 4.11)
    and writes once one frees. It used to fail the operation (``MaxConnectionsExceeded``,
    a ValueError), so the execution it checkpointed ended ``failed`` with ``internal
    error``, as did a step whose credential its evaluation thread could not read."""
    connect_module = sys.modules["mantle.db.connect"]
    monkeypatch.setattr(connect_module, "PG_POOL_SIZE", 1)
    monkeypatch.setattr(connect_module, "PG_POOL_WAIT_S", 0.1)
    database = mantle_db.connect(migrated_db_url)  # this thread holds the only connection
    journal = Journal(database)
    journal.start()
    try:
        outcome: list = []
        finished = threading.Event()
        _submit_recording(journal, lambda: database.execute_sql("SELECT 1").fetchone()[0],
                          outcome, finished)
        wait_until(lambda: outcome or not journal.healthy, timeout=5)
        assert (outcome, journal.healthy) == ([], False)
        mantle_db.release_connection(database)
        assert finished.wait(10)
        assert outcome == [1]
    finally:
        journal.stop()
        mantle_db.close_all(database)


def _executions(count: int) -> list[str]:
    """The ids of ``count`` new running executions of a one-step workflow ``w``."""
    apply_yaml("""
        name: w
        steps: [{name: a, action: core/log, params: {message: hi}}]
    """)
    with transaction():
        return [store.create_execution("w", {}, None, None, "node", "test").execution["id"]
                for _ in range(count)]


def _submit_recording(journal, op, outcome: list, finished: threading.Event) -> None:
    """Submit ``op``; its result or error is appended to ``outcome``, then ``finished`` set."""
    def record(value):
        outcome.append(value)
        finished.set()

    journal.submit(op, record, record)


def _hold(journal):
    """Hold the journal thread until the returned event is set, so what is submitted
    meanwhile is written in one batch."""
    release = threading.Event()
    started = threading.Event()
    journal.submit(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    return release


@contextlib.contextmanager
def _one_batch(db):
    """A started journal, held until the block sets the yielded release (or leaves), so what
    the block submits meanwhile is written in one batch; leaving waits for it to be written
    and stops the journal."""
    journal = Journal(db)
    journal.start()
    try:
        release = _hold(journal)
        yield journal, release
        release.set()
        finished = threading.Event()
        journal.submit(lambda: None, lambda _: finished.set())
        assert finished.wait(10)
    finally:
        journal.stop()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_batch_whose_fence_no_longer_holds_is_written_again_with_its_checks_first(db):
    """On PostgreSQL a batch sends its fence check with its writes and COMMIT (migration
    009). When one fence no longer holds (another node took the execution over), the whole
    transaction is refused; the journal writes the batch again with the checks up front:
    the operation of the lost execution gets LeaseLost, its batch-mates are written."""
    lost, kept = _executions(2)
    db.execute_sql("UPDATE workflow_executions SET epoch = 2 WHERE id = %s", (lost,))
    outcomes = {}
    with _one_batch(db) as (journal, _):
        for execution_id in (lost, kept):
            journal.submit(
                lambda e=execution_id: store.write_step(e, "a", 1, "running"),
                lambda _, e=execution_id: outcomes.__setitem__(e, "written"),
                lambda exc, e=execution_id: outcomes.__setitem__(e, exc), fence=(execution_id, 1))
    assert isinstance(outcomes[lost], LeaseLost) and outcomes[kept] == "written"
    steps = db.execute_sql("SELECT execution_id FROM step_executions").fetchall()
    assert steps == [(kept,)]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_run_after_an_apply_elsewhere_starts_the_new_version(db):
    """A run's batch goes by the current version the process read before and checks it with
    its writes; after an ``apply`` (here or in any other process) the check refuses it and
    the batch reads the new version: the execution is of the version current when it was
    created, as without the guess."""
    workflow = """
        name: w
        steps: [{name: a, action: core/log, params: {message: %s}}]
    """
    apply_yaml(workflow % "one")
    journal = Journal(db)
    journal.start()

    def run():
        return store.create_execution("w", {}, None, None, "node", "test").execution

    try:
        assert journal.call(run, timeout=10)["version"] == 1
        apply_yaml(workflow % "two")
        versions = []
        finished = threading.Event()
        journal.submit(run, lambda execution: (versions.append(execution["version"]),
                                               finished.set()), reads="w")
        assert finished.wait(10)
    finally:
        journal.stop()
    assert versions == [2]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_commit_still_under_way_when_its_connection_broke_is_ended_before_it_is_retried(
        db, migrated_db_url):
    """The connection breaks while the server still runs the transaction's last message
    (its final status waits for a row lock another session holds). Retrying at once would
    let both commit once the lock is free; the journal ends that server process (known by
    its pid and start time), and writes the batch again only once it is gone and the mark
    says it did not commit: the row is written once, and the operation reports it written."""
    execution_id, = _executions(1)
    db.execute_sql("CREATE TABLE t (v INTEGER UNIQUE)")
    holder = mantle_db.connect(migrated_db_url)
    holder.execute_sql("BEGIN")
    holder.execute_sql("SELECT id FROM workflow_executions WHERE id = %s FOR UPDATE",
                       (execution_id,))

    def waiting_backends():
        return db.execute_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE %s", ("%mantle_journal_check%",)).fetchone()[0]

    outcome = []
    with CommitCutter(migrated_db_url, b"INSERT INTO t", lose="answer") as proxy:
        with bound_database(proxy.url) as database:
            journal = Journal(database)
            journal.start()
            finished = threading.Event()

            def op():  # the final status is held back: it goes with the checks and COMMIT
                store.finish_execution(execution_id, "completed", None)
                return database.execute_sql("INSERT INTO t (v) VALUES (1)").rowcount

            try:
                proxy.armed.set()
                _submit_recording(journal, op, outcome, finished)
                assert proxy.cut.wait(10), "the proxy never saw the COMMIT"
                wait_until(lambda: waiting_backends() == 1, timeout=10)  # COMMIT under way
                wait_until(lambda: waiting_backends() == 0, timeout=10)  # ended, not left
                holder.execute_sql("COMMIT")
                assert finished.wait(20)
            finally:
                journal.stop()
                mantle_db.close_all(holder)
    mantle_db.bind(db)  # bound_database unbound the models
    assert outcome == [1]
    assert db.execute_sql("SELECT v FROM t").fetchall() == [(1,)]
    assert WorkflowExecution.get_by_id(execution_id).status == "completed"


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_gated_operation_is_not_committed_after_its_gate_closed_while_a_row_lock_held_it(
        db, migrated_db_url, caplog):
    """A run commits only while its caller waits (its gate, asked before the message with
    the checks and COMMIT goes out). That message does not wait for an execution's row
    lock: the batch is then written with its checks up front, which wait for the lock
    before the gates are asked again, so a run whose caller stopped waiting meanwhile is
    dropped (GateClosed), not committed after the lock goes; its batch-mate is written."""
    execution_id, = _executions(1)
    outcomes = {}
    with contextlib.ExitStack() as stack:
        holder = mantle_db.connect(migrated_db_url)
        stack.callback(mantle_db.close_all, holder)
        journal, release = stack.enter_context(_one_batch(db))
        holder.execute_sql("BEGIN")
        holder.execute_sql("SELECT id FROM workflow_executions WHERE id = %s FOR UPDATE",
                           (execution_id,))
        deadline = time.monotonic() + 1.0
        journal.submit(lambda: store.write_step(execution_id, "a", 1, "running"),
                       lambda _: outcomes.__setitem__("step", "written"),
                       lambda exc: outcomes.__setitem__("step", exc),
                       fence=(execution_id, 1))
        journal.submit(lambda: store.create_execution("w", {}, None, None, "node", "test"),
                       lambda _: outcomes.__setitem__("run", "written"),
                       lambda exc: outcomes.__setitem__("run", exc),
                       reads="w", gate=lambda: time.monotonic() < deadline)
        release.set()
        wait_until(lambda: time.monotonic() > deadline + 0.5, timeout=5)
        holder.execute_sql("COMMIT")
    assert outcomes["step"] == "written"
    assert isinstance(outcomes["run"], GateClosed)
    assert WorkflowExecution.select().count() == 1
    # Waiting for a lock is no outage: nothing logged as one (readiness would fail on it).
    assert not [r for r in caplog.records if r.getMessage() == "database unavailable"]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_commit_still_in_the_network_when_its_connection_broke_is_written_once(
        db, migrated_db_url):
    """The last message (checks, writes, COMMIT) is held up in the network while the
    connection breaks; the server process, idle in the transaction after the operation's
    own statements, commits it when it arrives. The journal must not take the batch for
    not written while that process lives: it ends the process (known by its pid and start
    time, whatever it last ran), then reads the mark. Found by review: the process was
    looked for by a mark in its last query text, which was the operation's INSERT."""
    db.execute_sql("CREATE TABLE t (v INTEGER)")
    with LateCommit(migrated_db_url, b"mantle_journal_check") as proxy:
        database = mantle_db.connect(proxy.url)
        journal = Journal(database)
        journal.start()
        outcome = []
        finished = threading.Event()

        def op():  # a look-up, then a write (as a run with an idempotency key does)
            database.execute_sql("SELECT count(*) FROM t").fetchone()
            return database.execute_sql("INSERT INTO t (v) VALUES (1)").rowcount

        try:
            proxy.armed.set()
            _submit_recording(journal, op, outcome, finished)
            assert proxy.cut.wait(10), "the proxy never saw the COMMIT"
            old_pid = wait_until(lambda: db.execute_sql(
                "SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction' "
                "AND query = 'INSERT INTO t (v) VALUES (1)'").fetchone(), timeout=10)[0]
            assert finished.wait(25), "the journal never settled the batch"
            proxy.deliver.set()  # the held message reaches the old server process now

            def old_transaction_over():
                row = db.execute_sql("SELECT state FROM pg_stat_activity WHERE pid = %s",
                                     (old_pid,)).fetchone()
                return row is None or row[0] == "idle"  # gone, or its transaction ended

            wait_until(old_transaction_over, timeout=10)
            proxy.finish.set()
        finally:
            proxy.deliver.set()
            proxy.finish.set()
            journal.stop()
            mantle_db.close_all(database)
    assert outcome == [1]
    assert db.execute_sql("SELECT count(*) FROM t").fetchone()[0] == 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_run_commits_soon_after_its_gate_however_many_rows_of_its_batch_are_locked(
        db, migrated_db_url):
    """The message with the checks goes out after the runs' gates were asked, so it must
    not wait for row locks: with the batch's ten executions locked one after the other by
    other sessions, each for 120 ms, the run still commits well within its 1 s margin of
    its gate (the batch is written with its checks up front, which wait before the gates
    are asked). Found by review: a lock timeout of 200 ms per lock let the check wait
    1.2 s in all."""
    ids = _executions(10)
    holders = [mantle_db.connect(migrated_db_url) for _ in ids]
    for holder, execution_id in zip(holders, ids):
        holder.execute_sql("BEGIN")
        holder.execute_sql("SELECT id FROM workflow_executions WHERE id = %s FOR UPDATE",
                           (execution_id,))
    journal = Journal(db)
    journal.start()
    gate_asked: list[float] = []
    committed: list = []
    finished = threading.Event()

    def gate():
        gate_asked.append(time.monotonic())
        return True

    def lock_waiters():
        return db.execute_sql("SELECT count(*) FROM pg_stat_activity "
                              "WHERE wait_event_type = 'Lock'").fetchone()[0]

    try:
        release = _hold(journal)
        for execution_id in ids:
            journal.submit(lambda e=execution_id: store.write_step(e, "a", 1, "running"),
                           fence=(execution_id, 1))
        journal.submit(lambda: store.create_execution("w", {}, None, None, "node", "test"),
                       lambda _: committed.append(time.monotonic()),
                       lambda exc: committed.append(exc), reads="w", gate=gate)
        journal.submit(lambda: None, lambda _: finished.set())
        release.set()
        for holder in holders:  # each row held 120 ms once the journal waits for one
            wait_until(lambda: lock_waiters() > 0, timeout=10, interval=0.005)
            time.sleep(0.12)
            holder.execute_sql("COMMIT")
        assert finished.wait(10)
    finally:
        journal.stop()
        for holder in holders:
            mantle_db.close_all(holder)
    assert len(committed) == 1 and isinstance(committed[0], float), committed
    assert committed[0] - gate_asked[-1] < 1.0


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_an_operation_of_a_lost_execution_is_not_run_even_where_it_would_fail(db):
    """The operations of a batch run before the check that goes with their writes. One of an
    execution taken over fails on what its new owner wrote (a step row already there): the
    batch is written again with its checks up front, so that operation is not run and gets
    LeaseLost, as the Execution actor expects of a lost execution, and its batch-mate is
    written. Found by review: it got the IntegrityError."""
    lost, kept = _executions(2)
    db.execute_sql("UPDATE workflow_executions SET epoch = 2 WHERE id = %s", (lost,))
    with transaction():  # the new owner's row for the step
        store.write_step(lost, "a", 1, "running")
    outcomes = {}

    def insert_step(execution_id):
        return db.execute_sql(
            "INSERT INTO step_executions (execution_id, step_name, attempt, status, is_hook) "
            "VALUES (%s, 'a', 1, 'running', false)", (execution_id,)).rowcount

    with _one_batch(db) as (journal, _):
        for execution_id in (lost, kept):
            journal.submit(lambda e=execution_id: insert_step(e),
                           lambda _, e=execution_id: outcomes.__setitem__(e, "written"),
                           lambda exc, e=execution_id: outcomes.__setitem__(e, exc),
                           fence=(execution_id, 1))
    assert outcomes[kept] == "written"
    assert isinstance(outcomes[lost], LeaseLost), repr(outcomes[lost])


def test_an_attempt_is_not_started_by_the_batch_that_cancels_its_execution_first(db):
    """SPEC 4.6, nothing starts after a cancel: a node's cancel (the Supervisor's operation)
    and the write of an attempt's ``running`` row for the same execution, queued behind it,
    can share one journal transaction. Checked once for the whole batch before its
    operations ran, the attempt's ``STARTING`` fence found the execution still ``running``,
    so the row was written in the transaction that cancelled it, and the attempt started
    after the cancel had committed. It is refused with ``ExecutionStopped``, and the cancel
    is written."""
    [execution_id] = _executions(1)
    outcomes = {}

    def record(name):
        return (lambda value: outcomes.__setitem__(name, value),) * 2

    with _one_batch(db) as (journal, _):
        journal.submit(lambda: store.cancel_execution(execution_id, "api"), *record("cancel"))
        journal.submit(lambda: store.write_step(execution_id, "a", 1, "running"),
                       *record("start"), fence=(execution_id, 1, store.STARTING))
    assert outcomes["cancel"].previous == "running"
    assert isinstance(outcomes["start"], ExecutionStopped), repr(outcomes["start"])
    assert WorkflowExecution.get_by_id(execution_id).status == "cancelled"
    assert db.execute_sql("SELECT count(*) FROM step_executions").fetchone() == (0,)
