"""Crash safety (SPEC 4.11): a runner killed with SIGKILL mid-workflow, resumed by another."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from actors.engine import Engine
from mantle import db as mantle_db
from mantle.db import transaction
from mantle.db.models import StepExecution, WorkflowDefinition, WorkflowExecution
from mantle.metrics import Metrics
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
