"""The journal's batched writes (``store.batch_scope``: on PostgreSQL one statement per table
over a JSON recordset) store exactly what the same writes store one statement at a time:
NULLs, booleans, integers, timestamps to the microsecond, text that looks like JSON,
backslashes, quotes, non-ASCII text and NUL (SPEC 13.1.12)."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sqlite3
import tempfile

import peewee
import pytest
from psycopg import pq

from mantle import store
from mantle.db import is_postgres, transaction
from mantle.db.connect import journal_check_refused
from mantle.errors import WorkflowNotFound
from mantle.store.statements import Statements
from mantle.db.models import AuditEvent, StepExecution, WorkflowExecution
from tests.helpers.waiting import apply_yaml

TINY = """name: tiny
inputs: {note: {type: string, required: false}}
steps: [{name: a, action: core/log, params: {message: x}}]
"""
AWKWARD = 'say "hi" \\ {"not": "json"} \u00e9\u4e2d \U0001f600 nul:\x00 end'
WAKE = dt.datetime(2031, 2, 3, 4, 5, 6, 789012)


def _write_one(note: str) -> str:
    created = store.create_execution("tiny", {"note": note}, None, {"k": note}, "r1", "api")
    execution_id = created.execution["id"]
    store.write_step(execution_id, "a", 1, "running", started_at=WAKE,
                     audit_action="step.started")
    store.write_step(execution_id, "a", 2, "pending", wait_kind="retry", wait_until=WAKE,
                     error=note, output={"text": note, "n": 1.5, "none": None})
    store.write_step(execution_id, "on_failure", 1, "completed", hook_block="on_failure",
                     output={"ok": True}, started_at=WAKE, completed_at=WAKE,
                     audit_action="step.completed", audit_extra={"note": note})
    assert store.finish_execution(execution_id, "failed", note) is not False
    return execution_id


def _stored(execution_id: str) -> tuple:
    execution = WorkflowExecution.get_by_id(execution_id)
    steps = [(s.step_name, s.attempt, s.status, s.is_hook, s.hook_block, s.output, s.error,
              s.started_at, s.completed_at, s.wait_kind, s.wait_until)
             for s in StepExecution.select().where(StepExecution.execution_id == execution_id)
             .order_by(StepExecution.is_hook, StepExecution.attempt)]
    return (execution.workflow_name, execution.version, execution.status, execution.inputs,
            execution.trigger, execution.error, execution.depth, execution.epoch, steps)


def _audits(after: int, upto: int, execution_id: str) -> list[tuple]:
    return [(a.action, a.resource_type, a.resource_id.replace(execution_id, "<id>"),
             str(a.metadata).replace(execution_id, "<id>"), a.timestamp.year)
            for a in AuditEvent.select().where(AuditEvent.id > after, AuditEvent.id <= upto,
                                         AuditEvent.actor != "cli")
            .order_by(AuditEvent.id)]


def _tiny_execution(db) -> str:
    """Applies ``tiny`` and creates one execution of it, outside any batch."""
    apply_yaml(TINY)
    with transaction(db):
        return store.create_execution("tiny", {}, None, None, "r1", "api").execution["id"]


def _a_run_and_a_checkpoint(running: str):
    """What a journal batch typically holds: a new run and a running execution's step
    outcome."""
    created = store.create_execution("tiny", {"note": "x"}, None, None, "r1", "api")
    store.write_step(running, "a", 1, "completed", output={"ok": True},
                     audit_action="step.completed")
    return created


def test_a_batch_stores_exactly_what_single_statements_store(db):
    apply_yaml(TINY)
    with transaction(db):
        single = _write_one(AWKWARD)
    middle = AuditEvent.select(AuditEvent.id).order_by(AuditEvent.id.desc()).first().id
    with transaction(db), store.batch_scope(db):
        batched = _write_one(AWKWARD)
    assert _stored(batched) == _stored(single)
    assert _audits(middle, 2**62, batched) == _audits(0, middle, single)
    assert len(_audits(0, middle, single)) >= 4
    name, version, status, inputs, trigger, error, depth, epoch, steps = _stored(batched)
    assert (status, inputs, error, depth, epoch) == ("failed", {"note": AWKWARD},
                                                     AWKWARD.replace("\x00", "\\u0000"), 1, 1)
    assert [(s[0], s[1], s[3], s[4], s[9], s[10]) for s in steps] == [
        ("a", 1, False, None, None, None), ("a", 2, False, None, "retry", WAKE),
        ("on_failure", 1, True, "on_failure", None, None)]
    assert steps[1][5] == {"text": AWKWARD, "n": 1.5, "none": None}
    assert steps[2][7] == steps[2][8] == WAKE


def test_a_batch_reads_its_fences_and_its_runs_current_versions_in_one_message(db, caplog):
    """The journal starts a transaction with the fence check and the current versions of the
    workflows its runs create executions of (``refused_fences(fences, workflows)``): on
    PostgreSQL one statement text, one round trip; on SQLite each read stays where it is
    needed. Later look-ups in the batch ask the database nothing more."""
    execution_id = _tiny_execution(db)
    caplog.set_level(logging.DEBUG, logger="peewee")
    with transaction(db), store.batch_scope(db):
        refused = store.refused_fences({(execution_id, 1), (execution_id, 2), ("gone", 1)},
                                       ["tiny", "absent", "nul\x00"])
        assert store.version_of("tiny", None)[0] == 1
        assert isinstance(store.version_of("absent", None), WorkflowNotFound)
        assert isinstance(store.version_of("nul\x00", None), WorkflowNotFound)
    assert set(refused) == {(execution_id, 2), ("gone", 1)}
    sent = [record.msg[0] for record in caplog.records if record.name == "peewee"]
    reads = [text for text in sent if "epoch" in text or "current_version" in text]
    if is_postgres(db):
        assert len(reads) == 1 and "epoch" in reads[0] and "current_version" in reads[0]
    else:
        assert [("epoch" in text, "current_version" in text) for text in reads] == [
            (True, False), (False, True), (False, True)]


@contextlib.contextmanager
def _sent(db):
    """What this thread's PostgreSQL connection sends while the block runs, as libpq traces
    it: one ``(message, text)`` per round trip (a simple ``Query``, or an extended-protocol
    ``Sync``)."""
    pgconn = db.connection().pgconn
    messages: list[tuple[str, str]] = []
    with tempfile.TemporaryFile("w+") as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield messages
        finally:
            pgconn.untrace()
            trace.seek(0)
            for line in trace:
                fields = line.rstrip("\n").split("\t")
                if fields[0] == "F" and fields[2] in ("Query", "Sync"):
                    messages.append((fields[2], fields[3].strip() if len(fields) > 3 else ""))


def test_a_journal_transaction_with_its_checks_up_front_is_two_round_trips(db):
    """What the journal's transaction of a run plus a running execution's checkpoint sends
    when it checks up front (its runs' versions were never read, or a check with the writes
    failed): BEGIN, the fence check and the workflow's current version in one message; the
    held-back writes and the COMMIT in another (``batch_scope(..., ends_transaction=True)``)."""
    if not is_postgres(db):
        pytest.skip("SQLite statements are calls into the library, not round trips")
    running = _tiny_execution(db)
    with _sent(db) as sent:
        with transaction(db), store.batch_scope(db, ends_transaction=True):
            assert store.refused_fences({(running, 1)}, ["tiny"]) == {}
            created = _a_run_and_a_checkpoint(running)
    assert [(kind, text.startswith('"BEGIN; SELECT id, epoch'), text.endswith('; COMMIT"'))
            for kind, text in sent] == [("Query", True, False), ("Query", False, True)]
    assert WorkflowExecution.get_by_id(created.execution["id"]).inputs == {"note": "x"}
    assert StepExecution.get(StepExecution.execution_id == running).output == {"ok": True}


def test_a_journal_transaction_with_its_checks_later_is_one_round_trip(db):
    """When the process knows the versions its runs need, the journal's transaction sends
    BEGIN, ``mantle_journal_check`` (fences, versions, the journal's mark: migration 009),
    the held-back writes and COMMIT in one message."""
    if not is_postgres(db):
        pytest.skip("SQLite statements are calls into the library, not round trips")
    running = _tiny_execution(db)
    with _sent(db) as sent:
        with transaction(db), store.batch_scope(db, ends_transaction=True):
            store.check_with_writes(db, "mark-a", 7, {(running, 1)}, {"tiny": 1})
            created = _a_run_and_a_checkpoint(running)
    assert [(kind, text.startswith('"BEGIN; SELECT mantle_journal_check'),
             text.endswith('; COMMIT"')) for kind, text in sent] == [("Query", True, True)]
    assert WorkflowExecution.get_by_id(created.execution["id"]).version == 1
    assert StepExecution.get(StepExecution.execution_id == running).output == {"ok": True}
    assert db.execute_sql("SELECT seq FROM journal_marks WHERE journal = 'mark-a'"
                          ).fetchall() == [(7,)]


@pytest.mark.parametrize("stale", ["fence", "version"])
def test_a_journal_check_that_no_longer_holds_refuses_the_whole_transaction(db, stale):
    """An execution taken over (its epoch moved on) or a workflow applied again since the
    batch's guess: ``mantle_journal_check`` refuses the transaction with ``MJ001``, nothing
    of it stays, not even the mark."""
    if not is_postgres(db):
        pytest.skip("the check is PostgreSQL's (SQLite checks up front, at no cost)")
    running = _tiny_execution(db)
    before = WorkflowExecution.select().count()
    fence, version = ((running, 2), 1) if stale == "fence" else ((running, 1), 2)
    with pytest.raises(peewee.DatabaseError) as refused:
        with transaction(db), store.batch_scope(db, ends_transaction=True):
            store.check_with_writes(db, "mark-b", 1, {fence}, {"tiny": version})
            store.create_execution("tiny", {}, None, None, "r1", "api")
    assert journal_check_refused(refused.value)
    assert WorkflowExecution.select().count() == before
    assert db.execute_sql("SELECT count(*) FROM journal_marks").fetchone() == (0,)


@pytest.mark.parametrize("status", ["running", "cancelled"])
def test_a_starting_fence_also_needs_the_execution_running(db, status):
    """SPEC 4.6, nothing starts after a cancel: a fence marked ``STARTING`` (the write of an
    attempt's ``running`` row) is refused for an execution no longer ``running``, with
    ``ExecutionStopped``; its plain fence, for the writes that record what already ran, still
    holds; another epoch is ``LeaseLost`` as before. On PostgreSQL the one-message check
    (``mantle_journal_check``, migration 010) refuses it the same way, and still takes
    the plain fences of nodes of the release before."""
    execution_id = _tiny_execution(db)
    if status == "cancelled":
        with transaction(db):
            store.cancel_execution(execution_id, "cli")
    starting, plain = (execution_id, 1, store.STARTING), (execution_id, 1)
    with transaction(db):
        refused = store.refused_fences({starting, plain, (execution_id, 2, store.STARTING)})
    assert {fence: type(error).__name__ for fence, error in refused.items()} == {
        (execution_id, 2, store.STARTING): "LeaseLost",
        **({starting: "ExecutionStopped"} if status == "cancelled" else {})}
    if not is_postgres(db):
        return

    def start_attempt():
        with transaction(db), store.batch_scope(db, ends_transaction=True):
            store.check_with_writes(db, "mark-s", 1, {starting, plain}, {"tiny": 1})
            store.write_step(execution_id, "a", 1, "running", audit_action="step.started")

    if status == "running":
        start_attempt()
        assert StepExecution.select().count() == 1
    else:
        with pytest.raises(peewee.DatabaseError) as refused:
            start_attempt()
        assert journal_check_refused(refused.value)
        assert StepExecution.select().count() == 0
        # A node of the release before 010 (a rolling upgrade) sends plain fences only.
        with transaction(db):
            db.execute_sql("SELECT mantle_journal_check('mark-old', 1, %s::json, '[]')",
                           (f'[{{"c0": "{execution_id}", "c1": 1}}]',))


def test_writes_that_carry_the_commit_and_fail_leave_nothing_behind(db):
    """A held-back write the database refuses (an execution row whose id is taken) fails
    the message before its COMMIT: the whole transaction rolls back, nothing of it stays, and
    the connection serves the next transaction."""
    taken = _tiny_execution(db)
    before = (WorkflowExecution.select().count(), AuditEvent.select().count())
    with pytest.raises((peewee.IntegrityError, sqlite3.IntegrityError)):
        with transaction(db), store.batch_scope(db, ends_transaction=True):
            store.create_execution("tiny", {}, None, None, "r1", "api")
            sql = Statements.of(db)
            row = list(sql.batch.executions[0])
            row[0] = taken
            sql.batch.executions.append(tuple(row))
    assert (WorkflowExecution.select().count(), AuditEvent.select().count()) == before
    with transaction(db), store.batch_scope(db, ends_transaction=True):
        store.create_execution("tiny", {}, None, None, "r1", "api")
    assert WorkflowExecution.select().count() == before[0] + 1
