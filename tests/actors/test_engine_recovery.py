"""Crash safety (SPEC 4.11): a runner killed with SIGKILL mid-workflow, resumed by another."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from actors import messages as m
from actors.engine import Engine
from mantle import store
from mantle import db as mantle_db
from mantle import queries
from mantle.db import transaction
from mantle.db.connect import PG_POOL_SIZE
from mantle.db.models import Node, StepExecution, WorkflowDefinition, WorkflowExecution
from mantle.metrics import Metrics
from mantle.services.nodes import NodeLease
from tests.actors.conftest import apply, finish, steps_of, wait_until

REPO = Path(__file__).resolve().parents[2]

RUNNER = """
import sys, time
from actors.engine import Engine
from mantle import db
database = db.connect(sys.argv[1])
db.bind(database)
engine = Engine(database).start()
for _ in range(int(sys.argv[2])):
    print(engine.run("crashy").execution_id, flush=True)
time.sleep(3600)
"""


def _crashy(target) -> None:
    apply(f"""
        name: crashy
        steps:
          - {{name: a, action: http/request, params: {{url: "{target.url('/a')}"}}}}
          - {{name: b, action: http/request, depends_on: [a],
             params: {{url: "{target.url('/b')}"}}}}
          - name: c
            action: core/log
            depends_on: [b]
            params: {{message: "{{{{ steps.a.output.body }}}}"}}
    """)


def test_killed_runner_executions_resume_without_rerunning_completed_steps(
        migrated_db_url, db, http_target):
    http_target.route("/a", body="from-a")
    http_target.route("/b", hold=True, body="from-b")
    _crashy(http_target)
    count = 5
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, migrated_db_url, str(count)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        text=True)
    try:
        ids = [runner.stdout.readline().strip() for _ in range(count)]
        http_target.wait_for_hits("/b", count, timeout=15)
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
        runner.stdout.close()
    assert http_target.hits("/a") == count
    assert all(WorkflowExecution.get_by_id(i).status == "running" for i in ids)

    http_target.route("/b", body="from-b")  # answer at once from now on
    http_target.release("/b")
    engine = Engine(db, metrics=Metrics(), resume_orphans=True).start()
    try:
        details = [finish(engine, execution_id) for execution_id in ids]
    finally:
        engine.shutdown(timeout=2)
    for detail in details:
        steps = steps_of(detail)
        assert detail["status"] == "completed", detail
        assert steps["b"]["attempt"] == 1  # the interrupted attempt restarted as itself
        assert steps["c"]["output"] == {"message": "from-a"}  # a's output was reloaded
    assert http_target.hits("/a") == count  # completed steps never ran twice
    assert http_target.hits("/b") == 2 * count  # only the step running at the kill repeats


def test_orphan_of_a_live_runner_is_not_taken(engine, db):
    """An execution whose runner is alive and heartbeating stays with it."""
    apply("""
        name: mine
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    result = engine.run("mine")
    wait_until(lambda: StepExecution.select().where(
        StepExecution.execution_id == result.execution_id,
        StepExecution.status == "running").exists())
    other = Engine(db, metrics=Metrics(), resume_orphans=True).start()
    try:
        assert other.live_count() == 0
        wait_until(lambda: WorkflowExecution.get_by_id(result.execution_id).owner
                   == engine.runner)
    finally:
        other.shutdown(timeout=1)
    engine.cancel(result.execution_id)


def test_two_daemons_never_resume_the_same_orphan(db):
    apply("""
        name: contested
        steps: [{name: nap, action: core/sleep, params: {duration: 300ms}}]
    """)
    with transaction(db):
        for index in range(6):
            WorkflowExecution.create(id=f"00000000-0000-4000-8000-00000000000{index}",
                                     workflow_name="contested", version=1, status="running",
                                     inputs={}, trigger={"type": "manual", "payload": None},
                                     started_at=mantle_db.fields.utcnow(),
                                     owner="gone-node")
    engines = [Engine(db, metrics=Metrics(), resume_orphans=True) for _ in range(2)]
    threads = [threading.Thread(target=e.start) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        wait_until(lambda: WorkflowExecution.select().where(
            WorkflowExecution.status == "completed").count() == 6, timeout=15)
    finally:
        for e in engines:
            e.shutdown(timeout=1)
    # Each execution has exactly one attempt row for its step: nobody ran it twice.
    rows = StepExecution.select().where(StepExecution.step_name == "nap")
    assert sorted(r.execution_id for r in rows) == sorted(
        f"00000000-0000-4000-8000-00000000000{i}" for i in range(6))


def test_an_orphan_that_cannot_be_loaded_ends_failed_instead_of_running_for_good(db):
    """13.1.12: an execution never stays ``running``. One whose stored version is missing,
    or whose version or step rows are in a form this code cannot read (edited by hand,
    written by another release), used to be claimed and then left as it was: running, under
    a live owner that nothing takes over, holding its slot for good."""
    apply("""
        name: fragile
        steps: [{name: say, action: core/log, params: {message: hi}}]
    """)
    WorkflowDefinition.insert(workflow_name="fragile", version=2, raw_yaml="?",
                              definition={"name": "fragile", "steps": "unreadable"},
                              content_hash="0" * 64,
                              created_at=mantle_db.fields.utcnow()).execute()
    ids = {2: "00000000-0000-4000-8000-000000000002", 3: "00000000-0000-4000-8000-000000000003",
           1: "00000000-0000-4000-8000-000000000001"}
    with transaction(db):
        for version, execution_id in ids.items():
            WorkflowExecution.create(id=execution_id, workflow_name="fragile", version=version,
                                     status="running", inputs={},
                                     trigger={"type": "manual", "payload": None},
                                     started_at=mantle_db.fields.utcnow(), owner="gone-node")
        broken_row = "00000000-0000-4000-8000-000000000004"  # a step row that is not JSON
        WorkflowExecution.create(id=broken_row, workflow_name="fragile", version=1,
                                 status="running", inputs={},
                                 trigger={"type": "manual", "payload": None},
                                 started_at=mantle_db.fields.utcnow(), owner="gone-node")
        StepExecution.insert(execution=broken_row, step_name="say", attempt=1,
                             status="completed", started_at=mantle_db.fields.utcnow()).execute()
        db.execute_sql("UPDATE step_executions SET output = '{broken' WHERE execution_id = "
                       f"'{broken_row}'")
    engine = Engine(db, metrics=Metrics(), resume_orphans=True).start()
    try:
        assert finish(engine, ids[1])["status"] == "completed"  # the readable one runs
        wait_until(lambda: all(WorkflowExecution.get_by_id(i).status == "failed"
                               for i in (ids[2], ids[3], broken_row)), timeout=10)
    finally:
        engine.shutdown(timeout=1)
    assert WorkflowExecution.get_by_id(broken_row).error.startswith(
        "internal error: Expecting property name enclosed in double quotes")
    assert WorkflowExecution.get_by_id(ids[2]).error == (
        "internal error: cannot read workflow 'fragile' version 2: AttributeError: "
        "'str' object has no attribute 'get'")
    assert WorkflowExecution.get_by_id(ids[3]).error == (
        'internal error: workflow "fragile" version 3 not found')


def test_a_running_execution_its_live_owner_runs_no_actor_for_is_started_again(db, caplog):
    """Exactly one live owner, and it runs the execution: a running row this node owns but
    has no actor for (its start message or its actor lost to a bug) is found by the owner's
    reconciliation, every two lease periods, and started again from its checkpoints. No
    other node takes it over, since its owner is alive; it used to stay running for good."""
    apply("""
        name: forgotten
        steps:
          - {name: first, action: core/log, params: {message: one}}
          - {name: second, action: core/log, depends_on: [first], params: {message: two}}
    """)
    engine = Engine(db, metrics=Metrics(), resume_orphans=True, lease_ttl=1.0).start()
    forgotten = "00000000-0000-4000-8000-0000000000f0"
    try:
        with transaction(db):  # as this node would have left it: created, first step done
            WorkflowExecution.create(id=forgotten, workflow_name="forgotten", version=1,
                                     status="running", inputs={},
                                     trigger={"type": "manual", "payload": None},
                                     started_at=mantle_db.fields.utcnow(),
                                     running_since=mantle_db.fields.utcnow(),
                                     owner=engine.runner, epoch=1)
            StepExecution.insert(execution=forgotten, step_name="first", attempt=1,
                                 status="completed", output={"message": "one"},
                                 started_at=mantle_db.fields.utcnow(),
                                 completed_at=mantle_db.fields.utcnow()).execute()
        with caplog.at_level(logging.WARNING, logger="mantle.engine"):
            detail = finish(engine, forgotten, timeout=10)
    finally:
        engine.shutdown(timeout=1)
    assert detail["status"] == "completed"
    assert [(s["name"], s["attempt"]) for s in detail["steps"]] == [("first", 1),
                                                                     ("second", 1)]
    assert WorkflowExecution.get_by_id(forgotten).owner == engine.runner  # not taken over
    [record] = [r for r in caplog.records if r.getMessage() == "execution restarted"]
    assert record.execution_id == forgotten


def test_two_hundred_dag_executions_complete_in_dependency_order(engine):
    apply("""
        name: dag
        steps:
          - {name: a, action: core/log, params: {message: a}}
          - {name: b, action: core/log, depends_on: [a], params: {message: b}}
          - {name: c, action: core/log, depends_on: [a], params: {message: c}}
          - {name: d, action: core/log, depends_on: [a], params: {message: d}}
          - {name: e, action: core/log, depends_on: [a], params: {message: e}}
          - {name: f, action: core/log, depends_on: [b, c, d, e], params: {message: f}}
    """)
    ids = [engine.run("dag").execution_id for _ in range(200)]
    deps = {"b": "a", "c": "a", "d": "a", "e": "a"}
    for execution_id in ids:
        detail = finish(engine, execution_id, timeout=60)
        assert detail["status"] == "completed"
        steps = steps_of(detail)
        for child, parent in deps.items():
            assert steps[parent]["completed_at"] <= steps[child]["started_at"]
        assert max(steps[x]["completed_at"] for x in "bcde") <= steps["f"]["started_at"]


def test_runs_wait_out_another_process_holding_the_sqlite_write_lock(tmp_path):
    """Another process holds SQLite's write lock for seconds; creation and checkpoints wait."""
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    database = mantle_db.connect(url)
    mantle_db.bind(database)
    from mantle.db import migrations
    migrations.migrate(database)
    apply("""
        name: patient
        steps:
          - {name: a, action: core/sleep, params: {duration: 200ms}}
          - {name: b, action: core/log, depends_on: [a], params: {message: done}}
    """)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, sys, time
        conn = sqlite3.connect({str(tmp_path / 'locked.db')!r}, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        time.sleep(6.5)
        conn.execute("ROLLBACK")
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    engine = Engine(database, metrics=Metrics()).start()
    try:
        result = engine.run("patient")  # its creation waits for the lock too
        status = engine.wait(result.execution_id, timeout=30)
    finally:
        holder.wait(timeout=20)
        holder.stdout.close()
        engine.shutdown(timeout=2)
    assert status == "completed"
    mantle_db.close_all(database)


# --- hooks, timeouts and back-offs across a restart or a takeover ----------------------------
#
# A restart is made the way ``mantle serve`` makes one at SIGTERM (SPEC 10.3): the first
# engine stops starting work, interrupts what still runs, leaves the rows ``running`` and ends
# its lease; a second engine (a daemon: ``resume_orphans``) takes the execution over and
# resumes it from its rows, as after a SIGKILL once the lease is gone.

def _engine(db, tmp_path, *, takeover: bool = False, **kwargs) -> Engine:
    return Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path / "plugins"), secrets={},
                  resume_orphans=takeover, **kwargs).start()


def _restart(old: Engine, db, tmp_path) -> Engine:
    old.shutdown(timeout=0.2)
    return _engine(db, tmp_path, takeover=True)


def _rows(execution_id: str, hook: bool = False) -> list[tuple]:
    """(name, attempt, status, error) of every attempt row, in insertion order."""
    return [(r.step_name, r.attempt, r.status, r.error) for r in StepExecution.select()
            .where(StepExecution.execution_id == execution_id, StepExecution.is_hook == hook)
            .order_by(StepExecution.id)]


def _status(execution_id: str) -> str:
    return WorkflowExecution.get_by_id(execution_id).status


def _final(execution_id: str, timeout: float = 20.0) -> dict:
    wait_until(lambda: _status(execution_id) not in ("pending", "running"), timeout=timeout,
               message=f"execution {execution_id} not final within {timeout}s: "
                       f"{_rows(execution_id)} {_rows(execution_id, hook=True)}")
    return queries.execution_detail(execution_id)


def _started_lines(caplog, execution_id: str) -> list[tuple[str, int]]:
    return [(r.step, r.attempt) for r in caplog.records
            if r.getMessage() == "step started" and getattr(r, "execution_id", None)
            == execution_id]


def _left_running(execution_id: str, workflow: str, now: dt.datetime) -> None:
    """The row of an execution of ``workflow`` (version 1) running for five seconds when its
    owner, ``gone-node``, was killed."""
    WorkflowExecution.create(id=execution_id, workflow_name=workflow, version=1,
                             status="running", inputs={},
                             trigger={"type": "manual", "payload": None},
                             started_at=now - dt.timedelta(seconds=5),
                             running_since=now - dt.timedelta(seconds=5),
                             owner="gone-node", epoch=1)


def _past(moment: dt.datetime, seconds: float) -> bool:
    return mantle_db.fields.utcnow() > moment + dt.timedelta(seconds=seconds)


GATED = """
    name: gated
    timeout: {timeout}
    steps:
      - {{name: call, action: http/request, max_parallel: 1, params: {{url: "{gate}"}}}}
    hooks:
      on_success:
        - {{name: cheer, action: core/log, params: {{message: fine}}}}
      on_failure:
        - {{name: alert, action: http/request, params: {{url: "{alert}"}}}}
"""


def test_hooks_resumed_after_a_restart_run_for_the_stored_outcome_of_a_workflow_timeout(
        db, tmp_path, http_target):
    """SPEC 4.7 (a workflow timeout fails the execution, ``on_failure`` runs), 13.1.8 (a
    hook running at a crash resumes): the outcome is stored when the hooks begin.

    Version 2 times out while its only step waits for the slot version 1 holds, so the step
    ends ``cancelled`` (attempt 0) and no step row carries the timeout's error; the engine
    restarts while ``alert`` runs. The new owner finishes ``on_failure`` and ends the
    execution ``failed`` with the timeout's error (it used to infer ``completed`` from the
    step rows and run ``on_success``)."""
    http_target.route("/gate", hold=True, body="through")
    http_target.route("/alert", hold=True, body="alerted")
    apply(GATED.format(timeout="60s", gate=http_target.url("/gate"),
                       alert=http_target.url("/alert")))
    apply(GATED.format(timeout="1s", gate=http_target.url("/gate"),
                       alert=http_target.url("/alert")))
    first = _engine(db, tmp_path)
    second = None
    try:
        holder = first.run("gated", version=1).execution_id
        http_target.wait_for_hits("/gate", 1, timeout=10)
        impatient = first.run("gated").execution_id  # version 2: waits for the slot
        http_target.wait_for_hits("/alert", 1, timeout=10)  # timed out; on_failure runs
        assert _rows(impatient) == [("call", 0, "cancelled", None)]
        assert _rows(impatient, hook=True) == [("alert", 1, "running", None)]

        http_target.route("/alert", body="alerted")  # answers at once from now on
        second = _restart(first, db, tmp_path)
        detail = _final(impatient)
        hooks = {h["name"]: h["status"] for h in detail["hooks"]}
        outcome = (detail["status"], detail["error"], hooks)
        assert outcome == ("failed", "workflow timed out after 1s", {"alert": "completed"}), \
            outcome
    finally:
        http_target.release()
        if second is not None:
            _final(holder)
            second.shutdown(timeout=1)
        else:
            first.shutdown(timeout=1)


STOPPED = """
    name: stopped
    steps:
      - {{name: boom, action: core/fail, params: {{message: broken}}}}
    hooks:
      on_failure:
        - {{name: first, action: core/fail, params: {{message: hook broke}}}}
        - {{name: second, action: http/request, params: {{url: "{second}"}}}}
      on_finish:
        - {{name: last, action: http/request, params: {{url: "{last}"}}}}
"""


def test_a_hook_block_stopped_by_a_failed_hook_stays_stopped_after_a_restart(
        db, tmp_path, http_target):
    """SPEC 4.8: a hook failing without ``continue_on_error`` stops its block; 13.1.8.

    ``first`` fails, so ``second`` (same block) never runs; the engine restarts while
    ``last`` (on_finish) runs. The new owner derives the stopped block from the stored hook
    rows and runs only ``last``."""
    http_target.route("/second", body="second")
    http_target.route("/last", hold=True, body="last")
    apply(STOPPED.format(second=http_target.url("/second"), last=http_target.url("/last")))
    first = _engine(db, tmp_path)
    second = None
    try:
        execution_id = first.run("stopped").execution_id
        http_target.wait_for_hits("/last", 1, timeout=10)
        assert [r[:3] for r in _rows(execution_id, hook=True)] == [
            ("first", 1, "failed"), ("last", 1, "running")]
        http_target.route("/last", body="last")
        second = _restart(first, db, tmp_path)
        detail = _final(execution_id)
    finally:
        http_target.release()
        (second or first).shutdown(timeout=1)
    assert detail["status"] == "failed"
    hooks = [(r[0], r[2]) for r in _rows(execution_id, hook=True)]
    assert (hooks, http_target.hits("/second")) == (
        [("first", "failed"), ("last", "completed")], 0)


FIRST_FAILURE = """
    name: two-failures
    steps:
      - {{name: later, action: http/request, params: {{url: "{later}"}}}}
      - {{name: early, action: core/fail, params: {{message: first to fail}}}}
    hooks:
      on_failure:
        - {{name: alert, action: http/request, params: {{url: "{alert}"}}}}
"""


def test_the_error_names_the_first_step_that_failed_also_after_a_restart_in_hooks(
        db, tmp_path, http_target):
    """SPEC 4.3: the execution's ``error`` names the first step that failed; 13.1.8.

    ``early`` fails at once, ``later`` (whose row was written first) half a second after;
    the engine restarts while ``on_failure`` runs, and the new owner ends the execution with
    the stored outcome: ``early``'s failure."""
    http_target.route("/later", status=500, body="late failure", delay=0.5)
    http_target.route("/alert", hold=True, body="alerted")
    apply(FIRST_FAILURE.format(later=http_target.url("/later"), alert=http_target.url("/alert")))
    first = _engine(db, tmp_path)
    second = None
    try:
        execution_id = first.run("two-failures").execution_id
        http_target.wait_for_hits("/alert", 1, timeout=10)
        steps = {r[0]: r for r in _rows(execution_id)}
        assert steps["early"][2:] == ("failed", "first to fail")
        assert steps["later"][2] == "failed"
        http_target.route("/alert", body="alerted")
        second = _restart(first, db, tmp_path)
        detail = _final(execution_id)
    finally:
        http_target.release()
        (second or first).shutdown(timeout=1)
    by_name = {s["name"]: s for s in detail["steps"]}
    assert by_name["early"]["completed_at"] < by_name["later"]["completed_at"]
    assert (detail["status"], detail["error"]) == (
        "failed", 'step "early" failed: first to fail')


def test_a_resumed_execution_names_the_step_that_failed_first_not_the_first_stored(
        db, tmp_path):
    """SPEC 4.3 (``error`` names the first step that failed), 4.11 (resume from the rows).

    ``later``'s row was written first, but ``early`` failed two seconds before it; ``wait``
    was running at the crash. The new owner takes the first failure by when it was stored,
    not by the order of the rows."""
    apply("""
        name: failed-before
        steps:
          - {name: later, action: core/fail, params: {message: second to fail}}
          - {name: early, action: core/fail, params: {message: first to fail}}
          - {name: wait, action: core/log, params: {message: done}}
    """)
    execution_id = "00000000-0000-4000-8000-0000000000e3"
    now = mantle_db.fields.utcnow()
    with transaction(db):  # as a runner killed while ``wait`` ran leaves it
        _left_running(execution_id, "failed-before", now)
        for name, message, seconds in (("later", "second to fail", 1),
                                       ("early", "first to fail", 3)):
            StepExecution.insert(execution=execution_id, step_name=name, attempt=1,
                                 status="failed", error=message,
                                 started_at=now - dt.timedelta(seconds=4),
                                 completed_at=now - dt.timedelta(seconds=seconds)).execute()
        StepExecution.insert(execution=execution_id, step_name="wait", attempt=1,
                             status="running", started_at=now - dt.timedelta(seconds=4)
                             ).execute()
    engine = _engine(db, tmp_path, takeover=True)
    try:
        detail = _final(execution_id)
    finally:
        engine.shutdown(timeout=1)
    assert (detail["status"], detail["error"]) == (
        "failed", 'step "early" failed: first to fail')


OVERDUE = """
    name: overdue
    timeout: 1s
    steps:
      - {{name: call, action: http/request, params: {{url: "{call}"}}}}
"""


def test_a_step_running_at_a_restart_is_not_started_again_after_the_workflow_timeout_passed(
        db, tmp_path, http_target, caplog):
    """SPEC 4.7, 13.1.9, 13.1.11: the workflow timeout counts from ``running_since`` across
    crashes and a step whose start is in flight when it fires does not start.

    ``call`` is running when the engine stops; the 1 s timeout passes before the next owner
    takes over. The new owner applies the timeout before it prepares anything: ``call``
    ends ``failed`` with the timeout's error and is not started again."""
    http_target.route("/call", hold=True, body="called")
    apply(OVERDUE.format(call=http_target.url("/call")))
    first = _engine(db, tmp_path)
    execution_id = first.run("overdue").execution_id
    http_target.wait_for_hits("/call", 1, timeout=10)
    first.shutdown(timeout=0.2)
    since = WorkflowExecution.get_by_id(execution_id).running_since
    wait_until(lambda: _past(since, 1.5), timeout=5)
    assert (_status(execution_id), [r[:3] for r in _rows(execution_id)]) == (
        "running", [("call", 1, "running")])
    caplog.clear()
    caplog.set_level("INFO", logger="mantle.engine")
    second = _engine(db, tmp_path, takeover=True)
    try:
        detail = _final(execution_id)
    finally:
        http_target.release()
        second.shutdown(timeout=1)
    assert (detail["status"], detail["error"]) == ("failed", "workflow timed out after 1s")
    assert _rows(execution_id) == [("call", 1, "failed", "workflow timed out after 1s")]
    started_again = _started_lines(caplog, execution_id)
    assert (started_again, http_target.hits("/call")) == ([], 1)


def test_a_step_ready_at_a_crash_is_cancelled_not_started_when_the_timeout_has_passed(
        db, tmp_path, http_target):
    """SPEC 4.7: at the workflow timeout pending steps become ``cancelled`` (never started:
    attempt 0); 13.1.9: a step whose start is in flight does not start.

    The runner died just after ``a``'s checkpoint, before ``b`` (which depends on it) had a
    row, and the 1 s timeout has passed since: the new owner cancels ``b``, unstarted."""
    http_target.route("/b", body="late")
    apply(f"""
        name: overdue-ready
        timeout: 1s
        steps:
          - {{name: a, action: core/log, params: {{message: a}}}}
          - {{name: b, action: http/request, depends_on: [a],
             params: {{url: "{http_target.url('/b')}"}}}}
    """)
    execution_id = "00000000-0000-4000-8000-0000000000d2"
    now = mantle_db.fields.utcnow()
    with transaction(db):  # as a runner killed right after a's checkpoint leaves it
        _left_running(execution_id, "overdue-ready", now)
        StepExecution.insert(execution=execution_id, step_name="a", attempt=1,
                             status="completed", output={"message": "a"},
                             started_at=now - dt.timedelta(seconds=5),
                             completed_at=now - dt.timedelta(seconds=5)).execute()
    engine = _engine(db, tmp_path, takeover=True)
    try:
        detail = _final(execution_id)
    finally:
        engine.shutdown(timeout=1)
    assert (detail["status"], detail["error"]) == ("failed", "workflow timed out after 1s")
    assert (_rows(execution_id), http_target.hits("/b")) == (
        [("a", 1, "completed", None), ("b", 0, "cancelled", None)], 0)


HOOKS_OVERDUE = """
    name: hooks-overdue
    steps:
      - {{name: main, action: core/log, params: {{message: main}}}}
    hooks:
      timeout: 1s
      on_finish:
        - {{name: notify, action: http/request, params: {{url: "{notify}"}}}}
"""


def test_a_hook_running_at_a_restart_is_not_started_again_after_the_hooks_timeout_passed(
        db, tmp_path, http_target, caplog):
    """SPEC 4.7 ``hooks.timeout`` (the running hook step ``failed``, later ones not run),
    13.1.11 (counted from the stored ``hooks_since``, never skipped).

    ``notify`` is running when the engine stops; the 1 s hooks timeout passes before the
    next owner resumes, which ends ``notify`` failed without starting it again."""
    http_target.route("/notify", hold=True, body="noted")
    apply(HOOKS_OVERDUE.format(notify=http_target.url("/notify")))
    first = _engine(db, tmp_path)
    execution_id = first.run("hooks-overdue").execution_id
    http_target.wait_for_hits("/notify", 1, timeout=10)
    first.shutdown(timeout=0.2)
    since = WorkflowExecution.get_by_id(execution_id).hooks_since
    assert since is not None
    wait_until(lambda: _past(since, 1.5), timeout=5)
    caplog.clear()
    caplog.set_level("INFO", logger="mantle.engine")
    second = _engine(db, tmp_path, takeover=True)
    try:
        detail = _final(execution_id)
    finally:
        http_target.release()
        second.shutdown(timeout=1)
    assert detail["status"] == "completed"  # hook failures never change the status
    assert _rows(execution_id, hook=True) == [("notify", 1, "failed", "hooks timed out after 1s")]
    assert (_started_lines(caplog, execution_id), http_target.hits("/notify")) == ([], 1)


def test_the_step_timeout_of_a_sleep_resumed_after_a_restart_counts_from_its_start(
        db, tmp_path):
    """SPEC 4.7 (a step ``timeout`` bounds each attempt), 13.1.11 (a ``core/sleep`` goes on
    with what was left of it after a crash, it does not start again).

    A 1.5 s sleep with a 1 s timeout fails ``step timed out``. The engine restarts half a
    second into it: the resumed sleep is the same attempt, so its timeout still falls due
    1 s after the sleep began. It used to count the whole second again from the resume,
    after the sleep's end, and the step completed."""
    apply("""
        name: napper
        steps:
          - {name: nap, action: core/sleep, timeout: 1s, params: {duration: 1500ms}}
    """)
    first = _engine(db, tmp_path)
    execution_id = first.run("napper").execution_id
    wait_until(lambda: [r[:3] for r in _rows(execution_id)] == [("nap", 1, "running")])
    began = StepExecution.get(StepExecution.execution_id == execution_id).started_at
    wait_until(lambda: _past(began, 0.6), timeout=5)
    second = _restart(first, db, tmp_path)
    try:
        detail = _final(execution_id)
    finally:
        second.shutdown(timeout=1)
    assert (detail["status"], _rows(execution_id)) == (
        "failed", [("nap", 1, "failed", "step timed out after 1s")])


def test_a_sleep_that_ended_while_nobody_ran_it_completes_though_its_timeout_passed_too(
        db, tmp_path):
    """SPEC 4.7, 13.1.11: a 1 s sleep with a 1.5 s timeout completes; the engine stops
    during it and the next owner resumes it only after both its end and its timeout's due
    time have passed. Its end came first, so it completes, as it would have without the
    restart: the timeout is due later than the sleep's end, never before it."""
    apply("""
        name: short-nap
        steps:
          - {name: nap, action: core/sleep, timeout: 1500ms, params: {duration: 1s}}
    """)
    first = _engine(db, tmp_path)
    execution_id = first.run("short-nap").execution_id
    wait_until(lambda: [r[:3] for r in _rows(execution_id)] == [("nap", 1, "running")])
    first.shutdown(timeout=0)
    began = StepExecution.get(StepExecution.execution_id == execution_id).started_at
    wait_until(lambda: _past(began, 1.6), timeout=5)
    assert _rows(execution_id) == [("nap", 1, "running", None)]
    second = _engine(db, tmp_path, takeover=True)
    try:
        detail = _final(execution_id)
    finally:
        second.shutdown(timeout=1)
    assert (detail["status"], _rows(execution_id)) == ("completed", [("nap", 1, "completed",
                                                                       None)])


FLAKY = """
    name: flaky
    steps:
      - {{name: call, action: http/request, retry: {{max_attempts: 3, backoff: exponential}},
         params: {{url: "{url}"}}}}
"""


def test_a_node_whose_lease_ran_out_during_a_back_off_does_not_call_the_retry(
        db, tmp_path, http_target):
    """SPEC 13.7: every write is fenced and a node that lost an execution makes no new
    step; docs/guarantees.md: a node paused past its lease calls no step twice.

    The old node's lease runs out while attempt 3 waits out its back-off and a new node
    takes the execution over. The end of a back-off is a fenced write before the call, so
    the old node's is refused (it stops the execution) and only the new owner calls."""
    http_target.route("/flaky", fail_first=2, body="ok")
    apply(FLAKY.format(url=http_target.url("/flaky")))
    old = _engine(db, tmp_path, lease_ttl=60.0)  # renews every 20 s: not during this test
    new = None
    try:
        execution_id = old.run("flaky").execution_id
        # attempt 2 failed; attempt 3 waits out its 2 s back-off
        wait_until(lambda: [r[:3] for r in _rows(execution_id)][-1:] == [("call", 3, "running")],
                   timeout=10)
        assert http_target.hits("/flaky") == 2
        with transaction(db):  # the old node's lease runs out (paused / cut off)
            Node.update(lease_expires_at=mantle_db.fields.utcnow() - dt.timedelta(seconds=1)
                        ).where(Node.id == old.runner).execute()
        new = _engine(db, tmp_path, takeover=True)
        wait_until(lambda: WorkflowExecution.get_by_id(execution_id).owner == new.runner,
                   timeout=5)
        detail = _final(execution_id)
        wait_until(lambda: old.live_count() == 0, timeout=5)  # the old node stopped it
    finally:
        old.shutdown(timeout=1)
        if new is not None:
            new.shutdown(timeout=1)
    assert (detail["status"], _rows(execution_id)[-1][:3]) == ("completed", ("call", 3,
                                                                               "completed"))
    assert http_target.hits("/flaky") == 3  # attempts 1, 2 and 3, each once


@pytest.mark.parametrize("order", ["cancel-then-read", "read-then-cancel"])
def test_a_cancel_committed_while_a_taken_over_execution_loads_ends_its_running_steps(
        db, monkeypatch, order):
    """SPEC 4.6 and 13.7 ("cancel anywhere", takeover): a node that takes an execution over
    loads its snapshot in a journal operation of its own before it starts an actor. A
    cancel from another node can commit in between: after the claim made this node the
    owner, before (or just after) the read. The node then rightly starts nothing, but it
    used to leave the step that was running when the dead owner stopped ``running`` in a
    ``cancelled`` execution for good: no actor of its owner records it, and the takeover's
    clean-up only closes the steps of owners whose lease has expired, which this live owner's
    never does. Both orders are frozen here: the cancel commits just before the snapshot is
    read, or just after it with its notice reaching the Supervisor first."""
    apply("""
        name: handed-over
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    orphan = "00000000-0000-4000-8000-0000000000c1"
    with transaction(db):  # a dead node's execution, its step running when it died
        WorkflowExecution.create(id=orphan, workflow_name="handed-over", version=1,
                                 status="running", inputs={},
                                 trigger={"type": "manual", "payload": None},
                                 started_at=mantle_db.fields.utcnow(),
                                 running_since=mantle_db.fields.utcnow(), owner="gone-node")
        StepExecution.insert(execution=orphan, step_name="nap", attempt=1, status="running",
                             started_at=mantle_db.fields.utcnow()).execute()
    real = store.execution_snapshot
    engines: list[Engine] = []

    def cancelled_meanwhile(execution_id: str):
        if execution_id != orphan:
            return real(execution_id)
        if order == "cancel-then-read":
            store.cancel_execution(orphan, "api")  # the other node's cancel, committed first
            return real(execution_id)
        snapshot = real(execution_id)  # says running
        store.cancel_execution(orphan, "api")
        engines[0]._supervisor.tell(m.CancelNotified(orphan))  # its notice, first
        return snapshot

    monkeypatch.setattr(store, "execution_snapshot", cancelled_meanwhile)
    engines.append(Engine(db, metrics=Metrics(), resume_orphans=True))
    engine = engines[0].start()
    try:
        wait_until(lambda: WorkflowExecution.get_by_id(orphan).status == "cancelled",
                   timeout=10, message="the orphan was not taken over and cancelled")
        assert WorkflowExecution.get_by_id(orphan).owner == engine.runner
        wait_until(lambda: _rows(orphan)[0][2] == "cancelled", timeout=5,
                   message=f"the cancelled execution kept its step running: {_rows(orphan)}")
    finally:
        engine.shutdown(timeout=1)
    [step] = StepExecution.select().where(StepExecution.execution_id == orphan)
    assert (step.status, step.attempt, step.completed_at is not None) == ("cancelled", 1, True)


HELD = """
    name: held
    steps:
      - {{name: call, action: http/request, params: {{url: "{url}"}}}}
"""


def _lease_of(engine: Engine) -> dt.datetime:
    return Node.get_by_id(engine.runner).lease_expires_at


def test_a_node_back_from_an_outage_longer_than_the_lease_takes_over_no_live_nodes_work(
        db, tmp_path, http_target):
    """docs/engine.md: when the database is unreachable for longer than the lease, leases
    are renewed again when it returns and nobody takes anything over.

    Every lease ran out meanwhile; the node that reaches the database first must not take
    over the executions of the others before they had a lease period to renew (then the
    step running on the owner would be called a second time). Here the owner renewed just
    before the outage, so its next renewal is a third of the lease away, while the other
    node looks for expired leases every 2 s."""
    http_target.route("/held", hold=True, body="ok")
    apply(HELD.format(url=http_target.url("/held")))
    owner = _engine(db, tmp_path, takeover=True, lease_ttl=12.0)  # renews every 4 s
    other = None
    try:
        execution_id = owner.run("held").execution_id
        http_target.wait_for_hits("/held", 1, timeout=10)
        other = _engine(db, tmp_path, takeover=True, lease_ttl=12.0)
        renewed = _lease_of(owner)
        wait_until(lambda: _lease_of(owner) != renewed, timeout=10)
        with transaction(db):  # the outage: every lease ran out
            Node.update(lease_expires_at=mantle_db.fields.utcnow() - dt.timedelta(seconds=1)
                        ).execute()
        wait_until(lambda: all(_lease_of(engine) > mantle_db.fields.utcnow()
                               for engine in (owner, other)), timeout=10)
        time.sleep(2.5)  # a takeover round of the other node after both renewed
        row = WorkflowExecution.get_by_id(execution_id)
        assert (row.owner, row.epoch, http_target.hits("/held")) == (owner.runner, 1, 1)
        http_target.release("/held")
        detail = finish(owner, execution_id)
    finally:
        http_target.release()
        owner.shutdown(timeout=1)
        if other is not None:
            other.shutdown(timeout=1)
    assert (detail["status"], http_target.hits("/held")) == ("completed", 1)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_renewal_that_commits_after_the_lease_ran_out_reports_the_lapse(db, migrated_db_url):
    """SPEC 13.7 and docs/engine.md: a node whose lease ran out (paused, or cut off from the
    database) checks its executions' epochs as soon as it renews again, and for a lease
    period takes over only from leases that ran out well after that.

    A renewal judged the lease by a read at the start of its transaction. One that then
    waited (for a row lock, as here, or on a stalled connection) while the lease ran out and
    other nodes could take its work over reported no lapse: no check, no takeover floor
    (a likely cause of the outage test above failing now and then under load)."""
    lapses: list[dt.datetime] = []
    lease = NodeLease(db, "serve", ttl=0.9,  # renews every 0.3 s
                      on_lapse=lambda: lapses.append(mantle_db.fields.utcnow()))
    holder = mantle_db.connect(migrated_db_url)
    lease.start()
    try:
        holder.execute_sql("BEGIN")  # the next renewal waits behind this lock
        holder.execute_sql("SELECT id FROM nodes WHERE id = %s FOR SHARE", (lease.id,))
        wait_until(lambda: db.execute_sql("SELECT count(*) FROM pg_stat_activity "
                                          "WHERE wait_event_type = 'Lock'").fetchone()[0],
                   message="the renewal did not wait for the lock")
        lease._stop.set()  # the renewal under way is the last one
        wait_until(lambda: Node.get_by_id(lease.id).lease_expires_at < store.database_now(),
                   timeout=5, message="the lease did not run out")
        holder.execute_sql("COMMIT")
        lease._thread.join(5)
    finally:
        holder.close()
        lease.stop()
    assert len(lapses) == 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_lease_renews_while_other_threads_hold_every_pooled_connection(db):
    """SPEC 13.7: a renewal path that other work cannot starve. The lease thread took its
    connection from the process's pool like every thread; once the server had dropped it
    (a restart, a failover, an idle timeout), the next renewal waited for a place in the
    pool behind the API's requests, the step preparations and the AI steps, up to 30 s with
    every place held: far past the lease, so other nodes took the node's executions over
    while it was running them."""
    lease = NodeLease(db, "serve", ttl=0.9)  # renews every 0.3 s, after a failure every 1 s
    release = threading.Event()
    holders: list[threading.Thread] = []
    held_pids: list[int] = []

    def hold() -> None:
        held_pids.append(db.execute_sql("SELECT pg_backend_pid()").fetchone()[0])
        release.wait(30)
        db.close()

    lease.start()
    try:
        # read on the test thread's own connection, taken before the pool is full
        wait_until(lambda: _expiry(lease) > store.database_now(), message="no lease taken")
        for _ in range(PG_POOL_SIZE - len(db._in_use)):
            holders.append(threading.Thread(target=hold, daemon=True))
            holders[-1].start()
        wait_until(lambda: len(held_pids) == len(holders), message="the pool was not filled")
        dropped_at = store.database_now()
        db.execute_sql(  # every other connection of this database: the lease thread's
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
            "current_database() AND pid <> pg_backend_pid() AND NOT (pid = ANY(%s))",
            (held_pids,))
        wait_until(lambda: _expiry(lease) > dropped_at + dt.timedelta(seconds=1.5), timeout=5,
                   message="the lease was not renewed with the pool full")
    finally:
        release.set()
        for holder in holders:
            holder.join(5)
        lease.stop()


def _expiry(lease: NodeLease) -> dt.datetime:
    return Node.get_by_id(lease.id).lease_expires_at


def test_a_workflow_timeout_that_only_cancelled_steps_still_fails_after_a_restart(
        db, tmp_path):
    """SPEC 4.7 (workflow timeout: pending steps ``cancelled``, the execution ``failed``
    with the timeout's error, ``on_failure`` runs), 4.11 (resume from the rows).

    The 1 s timeout fired while ``wait`` waited for its ``max_parallel`` slot and ``after``
    for ``wait``: both were committed ``cancelled`` (attempt 0), and the runner died before
    its next write (the hooks' outcome, or the final status). No row carries the timeout's
    error, so the next owner used to find no failure and end the execution ``completed``,
    running ``on_success``. A main step cancelled while all its dependencies were resolved
    has only one cause in a running execution: the workflow timeout."""
    apply("""
        name: timed-out-waiting
        timeout: 1s
        steps:
          - {name: first, action: core/log, params: {message: one}}
          - {name: wait, action: core/log, max_parallel: 1, depends_on: [first],
             params: {message: two}}
          - {name: after, action: core/log, depends_on: [wait], params: {message: three}}
        hooks:
          on_success:
            - {name: cheer, action: core/log, params: {message: fine}}
          on_failure:
            - {name: alert, action: core/log, params: {message: "{{ execution.error }}"}}
    """)
    execution_id = "00000000-0000-4000-8000-0000000000d3"
    now = mantle_db.fields.utcnow()
    with transaction(db):  # as a runner killed right after the timeout's cancels leaves it
        _left_running(execution_id, "timed-out-waiting", now)
        StepExecution.insert(execution=execution_id, step_name="first", attempt=1,
                             status="completed", output={"message": "one"},
                             started_at=now - dt.timedelta(seconds=5),
                             completed_at=now - dt.timedelta(seconds=5)).execute()
        for name in ("wait", "after"):
            StepExecution.insert(execution=execution_id, step_name=name, attempt=0,
                                 status="cancelled",
                                 completed_at=now - dt.timedelta(seconds=4)).execute()
    engine = _engine(db, tmp_path, takeover=True)
    try:
        detail = _final(execution_id)
    finally:
        engine.shutdown(timeout=1)
    hooks = {h["name"]: (h["status"], h["output"]) for h in detail["hooks"]}
    assert (detail["status"], detail["error"], hooks) == (
        "failed", "workflow timed out after 1s",
        {"alert": ("completed", {"message": "workflow timed out after 1s"})})


SKIPPED_HOOK = """
    name: skipped-hook
    steps:
      - {name: main, action: core/log, params: {message: main}}
    hooks:
      on_finish:
        - {name: check, action: core/log, if: "false", params: {message: never}}
        - {name: report, action: core/log,
           params: {message: "{{ hooks.check.status }} {{ hooks.check.output }}"}}
"""


def test_a_skipped_hook_reads_as_it_did_before_a_restart_in_the_hooks(db, tmp_path):
    """SPEC 3.1: ``hooks.<name>`` is ``{output, error, status}`` of a hook already run, its
    ``output`` ``{}`` when skipped (as for ``steps``); 13.1.8: the hooks resume after a
    crash. The runner died after ``check`` was skipped, before ``report``: the next owner
    read the skipped hook's stored output (``null``) as its ``output``, so ``report``
    logged ``skipped null`` where it logs ``skipped {}`` without the crash."""
    apply(SKIPPED_HOOK)
    engine = _engine(db, tmp_path, takeover=True)
    try:
        live = _final(engine.run("skipped-hook").execution_id)
        execution_id = "00000000-0000-4000-8000-0000000000b7"
        now = mantle_db.fields.utcnow()
        with transaction(db):  # as a runner killed right after ``check`` was skipped leaves it
            WorkflowExecution.create(
                id=execution_id, workflow_name="skipped-hook", version=1, status="running",
                inputs={}, trigger={"type": "manual", "payload": None},
                started_at=now - dt.timedelta(seconds=2),
                running_since=now - dt.timedelta(seconds=2), hooks_since=now,
                outcome={"status": "completed", "error": None, "failed_step": None,
                         "duration_ms": 5}, owner="gone-node", epoch=1)
            StepExecution.insert(execution=execution_id, step_name="main", attempt=1,
                                 status="completed", output={"message": "main"},
                                 started_at=now, completed_at=now).execute()
            StepExecution.insert(execution=execution_id, step_name="check", attempt=1,
                                 status="skipped", is_hook=True, hook_block="on_finish",
                                 started_at=now, completed_at=now).execute()
        resumed = _final(execution_id)
    finally:
        engine.shutdown(timeout=1)
    outputs = [{h["name"]: (h["status"], h["output"]) for h in detail["hooks"]}
               for detail in (live, resumed)]
    assert outputs == [{"check": ("skipped", None),
                        "report": ("completed", {"message": "skipped {}"})}] * 2, outputs
