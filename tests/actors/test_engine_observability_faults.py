"""Metrics (SPEC 9.1), log lines (9.2, 13.1.3) and audit rows (9.3) when executions end
through races, takeovers, refused writes, unloadable rows and shutdowns: each execution is
counted and logged once, by the node that ended it, and durations are never negative. Real
engine, real database; no mocks. Each test failed on the code before its fix.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

import psycopg
import pykka
import pytest

from actors.engine import Engine
from mantle import db as mantle_db
from mantle.db import transaction
from mantle.db.models import AuditEvent, StepExecution, WorkflowExecution
from mantle.metrics import Metrics
from tests.actors.conftest import apply, finish, wait_until
from tests.helpers.database import refuse_poison

SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def _sample(engine: Engine, name: str, labels: dict | None = None):
    return engine.metrics.registry.get_sample_value(name, labels or {})


def _records(caplog, message: str, execution_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message
            and getattr(r, "execution_id", None) == execution_id]


def _engine(db, tmp_path, *, takeover: bool = False, **kwargs) -> Engine:
    return Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path / "plugins"), secrets={},
                  resume_orphans=takeover, **kwargs).start()


# --- 1. a cancel that wins the race with the final status: no `execution finished` line ------

@SQLITE_ONLY
def test_execution_finished_is_logged_when_a_cancel_wins_the_race_with_the_final_status(
        engine, db, http_target, caplog):
    """SPEC 9.2: INFO `execution finished` (`status`) for every execution that ends; 4.6: a
    result racing the cancel may be stored `completed` or `cancelled` (the execution is
    `cancelled` either way).

    The cancel is committed in the same journal transaction as, and ahead of, the owner's
    last step outcome and final status (``finish_execution`` then changes nothing). The
    owner ends the actor with ``_end("cancelled")`` (ExecutionClosed, changed=False) and
    never logs `execution finished`; a cancel that does not race logs it
    (``_maybe_end_cancelled``)."""
    caplog.set_level(logging.INFO)
    http_target.route("/slow", hold=True, body="ok")
    apply(f"""
        name: racing
        steps:
          - {{name: call, action: http/request,
             params: {{url: "{http_target.url('/slow')}"}}}}
    """)
    execution_id = engine.run("racing").execution_id
    http_target.wait_for_hits("/slow", 1)
    fence = (execution_id, WorkflowExecution.get_by_id(execution_id).epoch)
    with transaction(db):  # this thread holds SQLite's write turn: the journal cannot commit
        with pytest.raises(pykka.Timeout):  # the cancel is queued behind the held turn
            engine.cancel(execution_id, timeout=0.2)
        assert engine.responsive()  # the Supervisor has handled it: its write is submitted
        http_target.release("/slow")  # the attempt completes: its outcome + final status ...
        wait_until(lambda: any(entry.fence == fence for entry in list(engine.journal._queue)),
                   message="the step outcome was not submitted")  # ... queue after the cancel
    assert engine.wait(execution_id, timeout=10) == "cancelled"
    assert WorkflowExecution.get_by_id(execution_id).status == "cancelled"
    # the race as intended: the step's outcome landed after the cancel, stored completed
    assert StepExecution.get(StepExecution.execution_id == execution_id).status == "completed"
    wait_until(lambda: _sample(engine, "mantle_active_executions") == 0)
    assert _sample(engine, "mantle_workflow_executions_total",
                   {"workflow": "racing", "status": "cancelled"}) == 1
    assert [r.status for r in _records(caplog, "execution finished", execution_id)] == [
        "cancelled"]


# --- 2. an execution that cannot be loaded ends failed but is never counted ------------------

@SQLITE_ONLY
def test_an_unloadable_execution_that_ends_failed_is_counted(db, caplog):
    """SPEC 9.1: `mantle_workflow_executions_total{workflow,status}` counts every execution
    reaching `failed`; docs/engine.md: an execution whose step row is not JSON ends `failed`
    with `internal error: <reason>`.

    Its snapshot raises while loading (StartFailed with an error), and
    ``Supervisor._on_StartFailed`` calls ``_unstartable`` without the workflow, which then
    skips the counter. The same end for a missing version (``snapshot.error``) is counted."""
    apply("""
        name: fragile
        steps: [{name: say, action: core/log, params: {message: hi}}]
    """)
    missing, broken = ("00000000-0000-4000-8000-0000000000a1",
                       "00000000-0000-4000-8000-0000000000a2")
    with transaction(db):
        for execution_id, version in ((missing, 9), (broken, 1)):
            WorkflowExecution.create(id=execution_id, workflow_name="fragile", version=version,
                                     status="running", inputs={},
                                     trigger={"type": "manual", "payload": None},
                                     started_at=mantle_db.fields.utcnow(), owner="gone-node")
        StepExecution.insert(execution=broken, step_name="say", attempt=1,
                             status="completed", started_at=mantle_db.fields.utcnow()).execute()
        db.execute_sql("UPDATE step_executions SET output = '{broken' WHERE execution_id = "
                       f"'{broken}'")
    engine = Engine(db, metrics=Metrics(), resume_orphans=True).start()
    try:
        wait_until(lambda: all(WorkflowExecution.get_by_id(i).status == "failed"
                               for i in (missing, broken)), timeout=10)
        # both are reported ended (their ExecutionEnded reached the Supervisor)
        assert engine.wait(broken, timeout=5) == "failed"
        assert engine.wait(missing, timeout=5) == "failed"
        failed = _sample(engine, "mantle_workflow_executions_total",
                         {"workflow": "fragile", "status": "failed"})
    finally:
        engine.shutdown(timeout=1)
    assert failed == 2, f"executions ended failed: 2, counted: {failed}"


# --- 3. a takeover: a step duration measured across two hosts' clocks ------------------------

@SQLITE_ONLY
def test_a_resumed_step_never_observes_a_negative_duration(db, tmp_path, http_target, caplog):
    """SPEC 9.1: `mantle_step_duration_seconds` is a histogram of durations; 13.1.3:
    `step finished` carries `duration_ms`; 13.7: clock differences between hosts never
    decide anything.

    The first node stored the attempt's ``started_at`` from its own clock (here 60 s ahead
    of this host's); the node that resumes the attempt keeps that ``started_at`` and ends it
    with its own ``utcnow()`` (``Attempts._start_attempt``/``_finish_step``), so
    ``_observe`` puts a negative value into the histogram (its ``_sum`` goes down) and logs
    a negative ``duration_ms``."""
    caplog.set_level(logging.INFO)
    http_target.route("/slow", hold=True, body="ok")
    apply(f"""
        name: skewed
        steps:
          - {{name: call, action: http/request,
             params: {{url: "{http_target.url('/slow')}"}}}}
    """)
    old = _engine(db, tmp_path)
    execution_id = old.run("skewed").execution_id
    http_target.wait_for_hits("/slow", 1)
    old.shutdown(timeout=0.2)  # the row stays running for the next owner
    # as a host whose clock runs 60 s ahead of this one wrote it
    row = StepExecution.get(StepExecution.execution_id == execution_id)
    with transaction(db):
        StepExecution.update(started_at=row.started_at + dt.timedelta(seconds=60)).where(
            StepExecution.id == row.id).execute()
    http_target.release("/slow")
    new = _engine(db, tmp_path, takeover=True)
    try:
        assert finish(new, execution_id)["status"] == "completed"
        total = _sample(new, "mantle_step_duration_seconds_sum",
                        {"workflow": "skewed", "step": "call", "action": "http/request"})
    finally:
        new.shutdown(timeout=1)
    [line] = [r for r in _records(caplog, "step finished", execution_id)]
    assert total is not None and total >= 0, f"histogram sum {total}"
    assert line.duration_ms >= 0, f"duration_ms {line.duration_ms}"


# --- 4. a node that lost the execution announces a retry it never made -----------------------

@SQLITE_ONLY
def test_a_node_whose_write_is_refused_logs_no_step_retrying(db, tmp_path, http_target, caplog):
    """docs/engine.md: logs (`step started`, `step finished`, `step retrying`) follow from
    the committed change; SPEC 13.7: a node whose write is refused stops the execution at
    once: no new step, no further write.

    ``Attempts._failed_attempt`` logs WARN `step retrying` before the write of the failed
    attempt and the next attempt's row; when that write is refused (another node took the
    execution over), the node stops (`execution lease lost`) but has already announced a
    retry that it never made (the new owner logs its own)."""
    caplog.set_level(logging.INFO)
    http_target.route("/flaky", hold=True, status=503, body="down")
    apply(f"""
        name: flaky
        steps:
          - {{name: call, action: http/request, retry: {{max_attempts: 3}},
             params: {{url: "{http_target.url('/flaky')}"}}}}
    """)
    old = _engine(db, tmp_path, lease_ttl=60.0)  # renews every 20 s: not during this test
    try:
        execution_id = old.run("flaky").execution_id
        http_target.wait_for_hits("/flaky", 1)
        with transaction(db):  # another node claimed it (claim_expired: new owner, epoch + 1)
            WorkflowExecution.update(owner="another-node", epoch=WorkflowExecution.epoch + 1
                                     ).where(WorkflowExecution.id == execution_id).execute()
        http_target.release("/flaky")  # attempt 1 fails with 503 on the old node
        wait_until(lambda: _records(caplog, "execution lease lost", execution_id),
                   message="the old node did not notice it lost the execution")
        wait_until(lambda: old.live_count() == 0)
    finally:
        old.shutdown(timeout=1)
    assert not AuditEvent.select().where(AuditEvent.action == "step.failed").exists()
    assert [(r.attempt, r.delay_ms) for r in _records(caplog, "step retrying",
                                                      execution_id)] == []


# --- 5. a shutdown while the final status after the hooks is being written --------------------

@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_shutdown_while_the_final_status_is_written_after_the_hooks_still_reports_it(
        engine, db, migrated_db_url, http_target, caplog):
    """SPEC 9.1, 9.2: an execution that ends is counted and logged (`execution finished`);
    10.3: a shutdown lets running work end.

    The final status written after the hooks is no step's write: a shutdown arriving while
    it was in flight ended the actor as interrupted, the write then committed `completed`,
    and its outcome went to a stopped actor: never counted, never logged, and no node would
    resume a final execution. Here the write waits on a share lock another session holds on
    the execution's row (the hook's own write passes it)."""
    caplog.set_level(logging.INFO)
    # The hook runs until the lock is held (a 500 ms sleep could end first on a loaded
    # machine: the final status was then written before the lock, and never waited).
    http_target.route("/note", hold=True)
    apply(f"""
        name: closing
        steps: [{{name: main, action: core/log, params: {{message: m}}}}]
        hooks:
          on_success: [{{name: note, action: http/request,
                         params: {{url: "{http_target.url('/note')}"}}}}]
    """)
    holder = psycopg.connect(migrated_db_url)
    watcher = psycopg.connect(migrated_db_url, autocommit=True)
    try:
        execution_id = engine.run("closing").execution_id
        wait_until(lambda: StepExecution.select().where(
            StepExecution.execution_id == execution_id, StepExecution.is_hook == True,  # noqa
            StepExecution.status == "running").exists(), message="the hook did not start")
        holder.execute("SELECT 1 FROM workflow_executions WHERE id = %s FOR SHARE",
                       (execution_id,))
        http_target.release("/note")
        wait_until(lambda: watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE %s", ("%UPDATE workflow_executions%",)).fetchone()[0] > 0,
            message="the final status is not waiting")
        engine.stop_starting(time.monotonic() + 30)
        assert engine.live_count() == 1  # the actor waits for its final write
        holder.rollback()
        assert engine.wait(execution_id, timeout=10) == "completed"
    finally:
        holder.close()
        watcher.close()
    assert WorkflowExecution.get_by_id(execution_id).status == "completed"
    assert _sample(engine, "mantle_workflow_executions_total",
                   {"workflow": "closing", "status": "completed"}) == 1
    assert [r.status for r in _records(caplog, "execution finished", execution_id)] == [
        "completed"]


# --- 6. an execution ended by the internal-error path: its open steps end cancelled ---------

def test_steps_closed_by_an_internal_error_are_counted_and_logged_as_cancelled(
        engine, db, backend, http_target, caplog):
    """SPEC 9.1: `mantle_step_executions_total` counts every main step reaching `cancelled`;
    13.1.3: each step attempt logs `step finished`; 13.1.12: a write the database refuses
    ends the execution `failed` (`internal error: ...`), its running steps interrupted.

    Those steps' rows end `cancelled` in the same transaction as the execution
    (``store.fail_execution``), but the owner interrupted them as if it had lost them: no
    count, no `step finished` line, for the step whose write was refused nor for the one
    still running beside it."""
    caplog.set_level(logging.INFO)
    http_target.route("/poison", body="poison")
    http_target.route("/slow", hold=True, body="slow")
    refuse_poison(db, backend)
    apply(f"""
        name: refused
        steps:
          - {{name: slow, action: http/request, params: {{url: "{http_target.url('/slow')}"}}}}
          - {{name: poison, action: http/request,
             params: {{url: "{http_target.url('/poison')}"}}}}
    """)
    try:
        execution_id = engine.run("refused").execution_id
        assert engine.wait(execution_id, timeout=15) == "failed"
    finally:
        http_target.release("/slow")
    detail = WorkflowExecution.get_by_id(execution_id)
    assert detail.error.startswith("internal error: ")
    rows = {row.step_name: row.status for row in StepExecution.select().where(
        StepExecution.execution_id == execution_id)}
    assert rows == {"slow": "cancelled", "poison": "cancelled"}
    for step in ("slow", "poison"):
        assert _sample(engine, "mantle_step_executions_total",
                       {"workflow": "refused", "step": step, "status": "cancelled"}) == 1, step
    finished = {r.step: r.status for r in _records(caplog, "step finished", execution_id)}
    assert finished == {"slow": "cancelled", "poison": "cancelled"}
    assert _sample(engine, "mantle_workflow_executions_total",
                   {"workflow": "refused", "status": "failed"}) == 1
    wait_until(lambda: _sample(engine, "mantle_active_executions") == 0)


# --- 7. executions ended failed before any actor ran them: logged as they are counted ------

@SQLITE_ONLY
def test_an_execution_that_cannot_be_started_logs_execution_finished(db, caplog):
    """SPEC 9.2: INFO `execution finished` (`status`) for an execution that ends; 9.1 counts
    it. A running execution taken over and a queued one promoted whose version is missing
    end `failed` (`internal error: ...`) in the Supervisor, counted there, but only ERROR
    `execution could not be started` was logged: no `execution finished` line."""
    caplog.set_level(logging.INFO)
    apply("""
        name: fragile
        steps: [{name: say, action: core/log, params: {message: hi}}]
    """)
    taken, queued = ("00000000-0000-4000-8000-0000000000b1",
                     "00000000-0000-4000-8000-0000000000b2")
    with transaction(db):
        for execution_id, status in ((taken, "running"), (queued, "pending")):
            WorkflowExecution.create(id=execution_id, workflow_name="fragile", version=9,
                                     status=status, inputs={},
                                     trigger={"type": "manual", "payload": None},
                                     started_at=mantle_db.fields.utcnow(), owner="gone-node")
    engine = Engine(db, metrics=Metrics(), resume_orphans=True).start()
    try:
        for execution_id in (taken, queued):
            assert engine.wait(execution_id, timeout=10) == "failed"
        counted = _sample(engine, "mantle_workflow_executions_total",
                          {"workflow": "fragile", "status": "failed"})
    finally:
        engine.shutdown(timeout=1)
    assert counted == 2
    for execution_id in (taken, queued):
        lines = _records(caplog, "execution finished", execution_id)
        assert [(r.status, r.workflow) for r in lines] == [("failed", "fragile")], execution_id


def test_a_queued_execution_that_is_cancelled_logs_execution_finished_once(engine, caplog):
    """SPEC 9.2: INFO `execution finished` (`status`) for every execution that ends. A
    cancelled queued execution never had an actor to log it: it was counted by the node that
    committed the cancel, and no line was written. A running one is still logged once, by
    its owner."""
    caplog.set_level(logging.INFO)
    apply("""
        name: one-at-a-time
        max_parallel_executions: 1
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    running = engine.run("one-at-a-time").execution_id
    queued = engine.run("one-at-a-time").execution_id
    assert WorkflowExecution.get_by_id(queued).status == "pending"
    for execution_id in (queued, running):
        engine.cancel(execution_id)
        assert engine.wait(execution_id, timeout=10) == "cancelled"
    wait_until(lambda: engine.live_count() == 0)
    for execution_id in (queued, running):
        lines = _records(caplog, "execution finished", execution_id)
        assert [(r.status, r.workflow) for r in lines] == [("cancelled", "one-at-a-time")], \
            execution_id
