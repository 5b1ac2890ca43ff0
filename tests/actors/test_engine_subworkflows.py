"""Sub-workflows (SPEC 13.3) through the real engine, on SQLite and PostgreSQL: the output
shape in CEL, failures, cancel and timeout cascades, the depth limit, the child's own limits."""

from __future__ import annotations

import threading
import time

import pytest

from mantle import store
from mantle.db import transaction
from mantle.db.connect import connect, is_postgres
from mantle.db.models import WorkflowExecution
from tests.actors.conftest import apply, finish, run, steps_of, wait_until

KID = """
    name: kid
    inputs: {who: {type: string, default: nobody}}
    steps:
      - {name: greet, action: core/log, params: {message: "hi {{ inputs.who }}"}}
"""


def _children(parent_id: str) -> list[WorkflowExecution]:
    return list(WorkflowExecution.select().where(
        WorkflowExecution.parent_execution_id == parent_id))


def test_child_output_is_readable_in_cel_as_steps_of_the_child(engine):
    apply(KID)
    apply("""
        name: parent
        steps:
          - {name: child, action: workflow/run, params: {workflow: kid, inputs: {who: ann}}}
          - name: after
            action: core/log
            params: {message: "{{ steps.child.output.steps['greet'].output.message }}"}
    """)
    detail = run(engine, "parent")
    steps = steps_of(detail)
    assert detail["status"] == "completed", detail
    output = steps["child"]["output"]
    [child] = _children(detail["id"])
    assert output == {"execution_id": child.id, "status": "completed",
                      "steps": {"greet": {"output": {"message": "hi ann"}, "error": None}}}
    assert steps["after"]["output"] == {"message": "hi ann"}
    assert (child.parent_step, child.depth, child.workflow_name) == ("child", 2, "kid")


def test_a_failed_child_fails_the_parent_step_with_the_childs_error(engine):
    apply("""
        name: broken-kid
        steps: [{name: boom, action: core/fail, params: {message: it broke}}]
    """)
    apply("""
        name: parent
        steps: [{name: child, action: workflow/run, params: {workflow: broken-kid}}]
    """)
    detail = run(engine, "parent")
    [child] = _children(detail["id"])
    assert steps_of(detail)["child"]["error"] == (
        f'child execution {child.id} failed: step "boom" failed: it broke')
    assert detail["error"] == (f'step "child" failed: child execution {child.id} failed: '
                               'step "boom" failed: it broke')


def test_unknown_child_workflow_or_bad_inputs_fail_the_step_without_retry(engine):
    apply(KID)
    apply("""
        name: parent
        steps:
          - {name: ghost, action: workflow/run, params: {workflow: nope},
             retry: {max_attempts: 3}}
          - {name: typed, action: workflow/run, params: {workflow: kid, inputs: {who: 1}},
             retry: {max_attempts: 3}}
    """)
    steps = steps_of(run(engine, "parent"))
    assert (steps["ghost"]["error"], steps["ghost"]["attempt"]) == (
        'workflow/run: workflow "nope" not found', 1)
    assert (steps["typed"]["error"], steps["typed"]["attempt"]) == (
        'workflow/run: input "who" must be a string', 1)


def test_cancelling_the_parent_cancels_its_running_child_within_a_second(engine):
    apply("""
        name: sleepy-kid
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    apply("""
        name: parent
        steps: [{name: child, action: workflow/run, params: {workflow: sleepy-kid}}]
    """)
    result = engine.run("parent")
    child = wait_until(lambda: (_children(result.execution_id) or [None])[0])
    wait_until(lambda: WorkflowExecution.get_by_id(child.id).status == "running")
    engine.cancel(result.execution_id)
    started = time.monotonic()
    wait_until(lambda: WorkflowExecution.get_by_id(child.id).status == "cancelled",
               timeout=1.0)
    assert time.monotonic() - started < 1.0
    detail = finish(engine, result.execution_id)
    assert detail["status"] == "cancelled"


def _lock_waiters(session) -> int:
    """Sessions of this test's database now waiting for a lock another session holds."""
    return session.execute_sql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'").fetchone()[0]


def test_a_cancel_committed_while_the_child_is_being_created_still_cancels_the_child(
        engine, db, migrated_db_url):
    """SPEC 13.3: cancelling a parent cancels its running children. Here the cancel commits
    from another session while the owner's creation of the child is held up (another
    session holds the child workflow's row, which its limit check locks); the child was
    created afterwards, running, with a cancelled parent, and ran on."""
    if not is_postgres(db):
        pytest.skip("holds row locks from another session (SQLite: tests/mantle)")
    apply("""
        name: sleepy-kid
        max_parallel_executions: 5
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    apply("""
        name: parent
        steps: [{name: child, action: workflow/run, params: {workflow: sleepy-kid}}]
    """)
    holder, watcher = connect(migrated_db_url), connect(migrated_db_url)
    cancel = None
    try:
        holder.execute_sql("BEGIN")
        holder.execute_sql("SELECT 1 FROM workflows WHERE name = 'sleepy-kid' FOR UPDATE")
        parent = engine.run("parent").execution_id
        wait_until(lambda: _lock_waiters(watcher) == 1)  # the creation waits for the row

        def cancel_elsewhere():
            with transaction():
                store.cancel_execution(parent, "api")

        cancel = threading.Thread(target=cancel_elsewhere)
        cancel.start()
        # committed, or waiting for the creation to end first
        wait_until(lambda: not cancel.is_alive() or _lock_waiters(watcher) == 2)
    finally:
        holder.execute_sql("ROLLBACK")
        holder.close()
        watcher.close()
        if cancel is not None:
            cancel.join(10)
    assert finish(engine, parent)["status"] == "cancelled"
    wait_until(lambda: all(child.status == "cancelled" for child in _children(parent)),
               timeout=5)


def test_a_step_timeout_of_the_parent_cancels_the_child(engine):
    apply("""
        name: sleepy-kid
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    apply("""
        name: parent
        steps: [{name: child, action: workflow/run, timeout: 500ms,
                 params: {workflow: sleepy-kid}}]
    """)
    detail = run(engine, "parent")
    [child] = _children(detail["id"])
    assert steps_of(detail)["child"]["error"] == "step timed out after 500ms"
    wait_until(lambda: WorkflowExecution.get_by_id(child.id).status == "cancelled")


def test_the_eleventh_nested_level_fails_with_the_depth_message(engine):
    apply("""
        name: nest
        steps: [{name: down, action: workflow/run, params: {workflow: nest}}]
    """)
    detail = run(engine, "nest", timeout=30)
    assert detail["status"] == "failed"
    levels = list(WorkflowExecution.select().where(WorkflowExecution.workflow_name == "nest")
                  .order_by(WorkflowExecution.depth))
    assert [row.depth for row in levels] == list(range(1, 11))  # ten levels ran
    deepest = levels[-1]
    assert deepest.error == 'step "down" failed: maximum workflow depth 10 exceeded'
    assert all(row.status == "failed" for row in levels)


def test_children_count_against_their_own_workflows_limit(engine):
    apply("""
        name: single-kid
        max_parallel_executions: 1
        steps: [{name: nap, action: core/sleep, params: {duration: 300ms}}]
    """)
    apply("""
        name: parent
        steps: [{name: child, action: workflow/run, params: {workflow: single-kid}}]
    """)
    parents = [engine.run("parent").execution_id for _ in range(3)]
    most = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        running = WorkflowExecution.select().where(
            WorkflowExecution.workflow_name == "single-kid",
            WorkflowExecution.status == "running").count()
        most = max(most, running)
        if all(WorkflowExecution.get_by_id(p).status == "completed" for p in parents):
            break
        time.sleep(0.02)
    assert [WorkflowExecution.get_by_id(p).status for p in parents] == ["completed"] * 3
    assert most == 1


def test_the_greet_twice_example_runs_hello_world_twice_as_children(engine):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    for name in ("hello-world.yaml", "greet-twice.yaml"):
        apply((examples / name).read_text())
    detail = run(engine, "greet-twice", {"who": "you"})
    assert detail["status"] == "completed", detail
    assert steps_of(detail)["report"]["output"] == {"message": "Hello, you! / completed"}
    assert [child.workflow_name for child in _children(detail["id"])] == ["hello-world"] * 2
