"""Sub-workflows (SPEC 13.3) through the real engine, on SQLite and PostgreSQL: the output
shape in CEL, failures, cancel and timeout cascades (also while the child is being created
and across a takeover), hooks, the depth limit, the child's own limits."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import pytest

from actors.engine import Engine
from mantle import store
from mantle.db import transaction
from mantle.db.connect import connect, is_postgres
from mantle.db.fields import utcnow
from mantle.db.models import StepExecution, WorkflowDefinition, WorkflowExecution
from mantle.metrics import Metrics
from tests.actors.conftest import apply, finish, run, steps_of, wait_until
from tests.helpers.database import lock_waiters

KID = """
    name: kid
    inputs: {who: {type: string, default: nobody}}
    steps:
      - {name: greet, action: core/log, params: {message: "hi {{ inputs.who }}"}}
"""


SLEEPY_KID = """
    name: sleepy-kid
    max_parallel_executions: 5
    steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
"""


def _children(parent_id: str) -> list[WorkflowExecution]:
    return list(WorkflowExecution.select().where(
        WorkflowExecution.parent_execution_id == parent_id)
        .order_by(WorkflowExecution.started_at))


def _status(execution_id: str) -> str:
    return WorkflowExecution.get_by_id(execution_id).status


def _engine(db, tmp_path, *, takeover: bool = False) -> Engine:
    return Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path / "plugins"), secrets={},
                  resume_orphans=takeover).start()


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


def test_a_childs_outputs_over_the_step_output_limit_fail_the_parent_step(engine):
    # Each of the child's steps is under 1 MiB; the parent step's output holds them both.
    apply("""
        name: echo-twice
        inputs: {text: {type: string}}
        steps:
          - {name: one, action: core/log, params: {message: "{{ inputs.text }}"}}
          - {name: two, action: core/log, params: {message: "{{ inputs.text }}"}}
    """)
    apply("""
        name: parent
        inputs: {text: {type: string}}
        steps:
          - {name: child, action: workflow/run,
             params: {workflow: echo-twice, inputs: {text: "{{ inputs.text }}"}}}
    """)
    detail = run(engine, "parent", {"text": "x" * 600_000})
    [child] = _children(detail["id"])
    assert child.status == "completed"
    step = steps_of(detail)["child"]
    assert step["error"].startswith("step output exceeds 1048576 byte limit ("), step["error"]
    assert (step["status"], step["output"], step["attempt"]) == ("failed", None, 1)
    assert detail["status"] == "failed"


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


@pytest.mark.alone
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


@pytest.mark.alone
def test_a_parent_cancelled_on_another_node_of_this_host_stops_forty_children_at_once(
        db, tmp_path):
    """SPEC 13.3 and 13.7 "Cancel anywhere": the node that receives the cancel of a parent
    commits it with its forty running children and tells their owner, another node of this
    host, in one notice; the owner interrupts them all within milliseconds. Notices are sent
    without waiting (a frozen node must not hold up the sender), so one per child would
    overflow the owner's datagram queue and leave most of them to its once-a-second look."""
    apply(SLEEPY_KID.replace("max_parallel_executions: 5", "max_parallel_executions: 0"))
    steps = "\n".join(f"          - {{name: c{index}, action: workflow/run, "
                      "params: {workflow: sleepy-kid}}" for index in range(40))
    apply(f"""
        name: forty
        steps:
{steps}
    """)
    owner, sender = _engine(db, tmp_path), _engine(db, tmp_path)
    try:
        parent = owner.run("forty").execution_id
        wait_until(lambda: owner.live_count() == 41, timeout=20)
        assert sender.cancel(parent) == "running"
        started = time.monotonic()
        wait_until(lambda: owner.live_count() == 0, timeout=5, interval=0.005)
        elapsed = time.monotonic() - started
    finally:
        owner.shutdown(timeout=1)
        sender.shutdown(timeout=1)
    assert elapsed < 0.3, f"the owner took {elapsed:.2f} s to stop the cancelled children"
    assert {child.status for child in _children(parent)} == {"cancelled"}


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
        wait_until(lambda: lock_waiters(watcher) == 1)  # the creation waits for the row

        def cancel_elsewhere():
            with transaction():
                store.cancel_execution(parent, "api")

        cancel = threading.Thread(target=cancel_elsewhere)
        cancel.start()
        # committed, or waiting for the creation to end first
        wait_until(lambda: not cancel.is_alive() or lock_waiters(watcher) == 2)
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


def _held_creation(migrated_db_url):
    """Sessions holding ``sleepy-kid``'s workflow row (which a child's creation locks for
    its limit check) and watching the lock waits: the creation waits until released."""
    holder, watcher = connect(migrated_db_url), connect(migrated_db_url)
    holder.execute_sql("BEGIN")
    holder.execute_sql("SELECT 1 FROM workflows WHERE name = 'sleepy-kid' FOR UPDATE")
    return holder, watcher


def _release(holder, watcher) -> None:
    holder.execute_sql("ROLLBACK")
    holder.close()
    watcher.close()


def test_a_step_timeout_while_the_child_is_being_created_cancels_that_child(
        engine, db, migrated_db_url, caplog):
    """SPEC 13.3: a step timeout of the parent cancels the child; exactly one child per
    parent step attempt. The attempt times out while its child's creation waits in the
    database (a row lock): the attempt ends, the child is created afterwards, and the
    write of the attempt's end must still cancel it, not leave it running with no parent
    step awaiting it. The retry gets a child of its own, cancelled by its own timeout."""
    if not is_postgres(db):
        pytest.skip("holds a row lock from another session")
    apply(SLEEPY_KID)
    apply("""
        name: parent
        steps:
          - {name: child, action: workflow/run, timeout: 300ms, retry: {max_attempts: 2},
             params: {workflow: sleepy-kid}}
    """)
    caplog.set_level(logging.WARNING, logger="mantle.engine")
    holder, watcher = _held_creation(migrated_db_url)
    try:
        parent = engine.run("parent").execution_id
        wait_until(lambda: lock_waiters(watcher) == 1)  # the creation waits for the row
        # the first attempt timed out: the write of its end waits behind the creation
        fence = (parent, WorkflowExecution.get_by_id(parent).epoch)
        wait_until(lambda: any(entry.fence == fence for entry in list(engine.journal._queue)))
    finally:
        _release(holder, watcher)
    detail = finish(engine, parent)
    assert (detail["status"], steps_of(detail)["child"]["attempt"]) == ("failed", 2), detail
    wait_until(lambda: [c.status for c in _children(parent)] == ["cancelled"] * 2,
               timeout=5, message="a child of a timed-out attempt was not cancelled")


def test_a_workflow_timeout_while_the_child_is_being_created_cancels_that_child(
        engine, db, migrated_db_url, http_target):
    """SPEC 13.3: a workflow timeout of the parent cancels the child. The timeout comes
    while the child's creation waits in the database (a row lock): the step ends
    ``failed`` at once, the child is created afterwards, and the write of the step's end
    must still cancel it. The workflow's other step, an HTTP call held open, shows when
    the timeout has been dealt with: it is interrupted right after the child's step."""
    if not is_postgres(db):
        pytest.skip("holds a row lock from another session")
    http_target.route("/hold", hold=True)
    apply(SLEEPY_KID)
    apply(f"""
        name: parent
        timeout: 1s
        steps:
          - {{name: child, action: workflow/run, params: {{workflow: sleepy-kid}}}}
          - {{name: watch, action: http/request, params: {{url: "{http_target.url('/hold')}"}}}}
    """)
    holder, watcher = _held_creation(migrated_db_url)
    try:
        parent = engine.run("parent").execution_id
        wait_until(lambda: lock_waiters(watcher) == 1 and http_target.hits("/hold") == 1)
        wait_until(lambda: http_target.in_progress("/hold") == 0)  # the timeout came
    finally:
        _release(holder, watcher)
    detail = finish(engine, parent)
    assert detail["error"] == "workflow timed out after 1s", detail
    children = wait_until(lambda: _children(parent), timeout=5)  # created after all
    wait_until(lambda: [_status(child.id) for child in children] == ["cancelled"],
               timeout=5, message="the child of a timed-out parent was not cancelled")


def _restart_while_the_child_runs(db, tmp_path, workflow: str, since_column: str,
                                  seconds: float) -> tuple[str, str, Engine]:
    """Run ``workflow`` until its child runs, restart its node (``shutdown``: the rows stay
    for the next owner) and wait, with no owner, until ``seconds`` passed since the
    parent's ``since_column``; then a node that takes it over. (parent, child, new node)"""
    old = _engine(db, tmp_path)
    try:
        parent = old.run(workflow).execution_id
        [child] = wait_until(lambda: _children(parent))
        wait_until(lambda: _status(child.id) == "running")
    finally:
        old.shutdown(timeout=0.2)
    since = getattr(WorkflowExecution.get_by_id(parent), since_column)

    def passed() -> bool:
        with transaction(db):
            return store.database_now() > since + dt.timedelta(seconds=seconds)

    wait_until(passed, timeout=5)
    return parent, child.id, _engine(db, tmp_path, takeover=True)


def test_a_workflow_timeout_that_passed_while_nobody_ran_the_parent_cancels_its_child(
        db, tmp_path):
    """SPEC 13.3: a workflow timeout of the parent cancels the child; 13.1.9: a deadline
    that passed while nobody ran the execution applies when it is resumed. The next owner
    ends the awaiting step ``failed`` without launching it again; that write must cancel
    the child (taken over too), which would otherwise sleep on to its end."""
    apply(SLEEPY_KID)
    apply("""
        name: parent
        timeout: 1s
        steps: [{name: child, action: workflow/run, params: {workflow: sleepy-kid}}]
    """)
    parent, child, new = _restart_while_the_child_runs(db, tmp_path, "parent",
                                                       "running_since", 1.2)
    try:
        wait_until(lambda: _status(parent) != "running", timeout=10)
        assert WorkflowExecution.get_by_id(parent).error == "workflow timed out after 1s"
        wait_until(lambda: _status(child) == "cancelled", timeout=5,
                   message="the child of a timed-out parent was not cancelled")
    finally:
        new.shutdown(timeout=1)


def test_a_hooks_timeout_that_passed_while_nobody_ran_the_parent_cancels_the_hooks_child(
        db, tmp_path):
    """SPEC 13.3 and 4.8 (hooks run like main steps), 13.1.8/13.1.11: ``hooks.timeout``
    counts across crashes and applies to a hook resumed after it passed. The resumed
    ``workflow/run`` hook ends ``failed`` without being launched again; that write must
    cancel its child."""
    apply(SLEEPY_KID)
    apply("""
        name: parent
        steps: [{name: start, action: core/log, params: {message: go}}]
        hooks:
          timeout: 1s
          on_finish:
            - {name: child, action: workflow/run, params: {workflow: sleepy-kid}}
    """)
    parent, child, new = _restart_while_the_child_runs(db, tmp_path, "parent",
                                                       "hooks_since", 1.2)
    try:
        wait_until(lambda: _status(parent) != "running", timeout=10)
        hook = StepExecution.get(StepExecution.execution_id == parent,
                                 StepExecution.is_hook == True)  # noqa: E712 - SQL
        assert (hook.status, hook.error) == ("failed", "hooks timed out after 1s")
        wait_until(lambda: _status(child) == "cancelled", timeout=5,
                   message="the child of a timed-out hook was not cancelled")
    finally:
        new.shutdown(timeout=1)


def test_the_step_timeout_of_a_parent_resumed_while_its_child_runs_counts_from_before(
        db, tmp_path):
    """SPEC 4.7 (a step ``timeout`` bounds each attempt), 13.3 (a step timeout of the
    parent cancels the child; on resume the existing child is awaited, not created again).

    The parent's step (``timeout: 2s``) awaits a 3.1 s child; both are taken over after
    2.1 s. The resumed attempt is the one that created the child, so its timeout is due
    at once: the step fails and the child is cancelled. It used to get two whole seconds
    again from the resume, and the step completed with the child. The takeover has to come
    before the child's end (a second to spare: with half a second, a slow start of the new
    node under load let the child complete first)."""
    apply("""
        name: kid-nap
        steps: [{name: nap, action: core/sleep, params: {duration: 3100ms}}]
    """)
    apply("""
        name: parent
        steps: [{name: child, action: workflow/run, timeout: 2s, params: {workflow: kid-nap}}]
    """)
    parent, child, new = _restart_while_the_child_runs(db, tmp_path, "parent",
                                                       "running_since", 2.1)
    try:
        wait_until(lambda: _status(parent) != "running", timeout=10)
        wait_until(lambda: _status(child) != "running", timeout=5)
        step = StepExecution.get(StepExecution.execution_id == parent)
        outcome = (_status(parent), step.attempt, step.status, step.error, _status(child))
    finally:
        new.shutdown(timeout=1)
    assert outcome == ("failed", 1, "failed", "step timed out after 2s", "cancelled")


def test_a_child_that_ended_before_the_step_timeout_completes_its_resumed_parent(
        db, tmp_path):
    """SPEC 4.7, 13.3: a step timeout is due ``timeout`` after the child's creation also
    for a resumed parent, but a child that ended before then keeps its outcome. Here the
    child (taken over by another node, say) completed 0.2 s after its creation, and the
    parent's 1 s timeout passed while nobody ran the parent: its step completes."""
    apply(SLEEPY_KID)
    apply("""
        name: parent
        steps: [{name: child, action: workflow/run, timeout: 1s,
                 params: {workflow: sleepy-kid}}]
    """)
    old = _engine(db, tmp_path)
    try:
        parent = old.run("parent").execution_id
        [row] = wait_until(lambda: _children(parent))
        wait_until(lambda: _status(row.id) == "running")
    finally:
        old.shutdown(timeout=0.2)
    child, ended = row.id, row.started_at + dt.timedelta(seconds=0.2)
    with transaction(db):
        WorkflowExecution.update(status="completed", completed_at=ended).where(
            WorkflowExecution.id == child).execute()
        StepExecution.update(status="completed", completed_at=ended, output={}).where(
            StepExecution.execution_id == child).execute()
    wait_until(lambda: store.database_now() > row.started_at + dt.timedelta(seconds=1.2),
               timeout=5)
    new = _engine(db, tmp_path, takeover=True)
    try:
        wait_until(lambda: _status(parent) != "running", timeout=10)
        step = StepExecution.get(StepExecution.execution_id == parent)
        outcome = (_status(parent), step.status, step.error, step.output["execution_id"])
    finally:
        new.shutdown(timeout=1)
    assert outcome == ("completed", "completed", None, child)


def test_a_parent_its_next_owner_cannot_load_ends_failed_and_cancels_its_child(db, tmp_path):
    """SPEC 13.3 and 13.1.12: a parent that its next owner cannot load (its version
    unreadable, written by another release) ends ``failed`` with an internal error; no step
    of it awaits its child any more, so the child is cancelled with it, as on any other
    internal failure of the parent. It used to sleep on to its own end, parentless."""
    apply(SLEEPY_KID)
    apply("""
        name: parent
        steps: [{name: child, action: workflow/run, params: {workflow: sleepy-kid}}]
    """)
    old = _engine(db, tmp_path)
    try:
        parent = old.run("parent").execution_id
        [child] = wait_until(lambda: _children(parent))
        wait_until(lambda: _status(child.id) == "running")
    finally:
        old.shutdown(timeout=0.2)
    with transaction(db):
        WorkflowDefinition.insert(workflow_name="parent", version=2, raw_yaml="?",
                                  definition={"name": "parent", "steps": "unreadable"},
                                  content_hash="0" * 64, created_at=utcnow()).execute()
        WorkflowExecution.update(version=2).where(WorkflowExecution.id == parent).execute()
    new = _engine(db, tmp_path, takeover=True)
    try:
        wait_until(lambda: _status(parent) == "failed", timeout=10)
        wait_until(lambda: _status(child.id) == "cancelled", timeout=5,
                   message="the child of a parent that ended failed runs on")
    finally:
        new.shutdown(timeout=1)


@pytest.mark.parametrize("hook_child", ["kid", "other-kid"])
def test_a_workflow_run_hook_named_like_a_main_step_awaits_its_own_child(engine, hook_child):
    """SPEC 2.6/2.7: a hook may share a main step's name (hook names are unique among hooks
    only); 4.8: hooks run like main steps; 13.3: one child per step attempt. The hook's
    child must be its own (not the main step's, found under a shared key), and its end
    must reach the hook (not the finished main step of that name), so the execution
    ends."""
    apply(KID)
    apply(KID.replace("name: kid", "name: other-kid"))
    apply(f"""
        name: parent
        steps:
          - {{name: notify, action: workflow/run,
             params: {{workflow: kid, inputs: {{who: main}}}}}}
        hooks:
          on_success:
            - {{name: notify, action: workflow/run,
               params: {{workflow: {hook_child}, inputs: {{who: hook}}}}}}
    """)
    execution_id = engine.run("parent").execution_id
    status = engine.wait(execution_id, timeout=10)
    children = _children(execution_id)
    assert status == "completed", (status, [(c.parent_step, c.inputs, c.status)
                                            for c in children])
    assert sorted(c.inputs["who"] for c in children) == ["hook", "main"]
    hook = StepExecution.get(StepExecution.execution_id == execution_id,
                             StepExecution.is_hook == True)  # noqa: E712 - SQL
    assert hook.output["steps"]["greet"]["output"] == {"message": "hi hook"}


def test_a_child_is_created_only_while_its_parent_step_attempt_runs_and_ends_with_it(db):
    """SPEC 13.3: exactly one child per parent step attempt; a timeout of the parent step
    cancels the child. The creation refuses once the attempt's row has ended (the end was
    written first: its cancel of the attempt's children could not see a child created
    later); ``cancel_children`` cancels the running children of one attempt (its own child
    and its tool children), not those of another attempt or of a hook of the same name."""
    apply(KID)

    def create(key: str | None = None, parent: store.Parent | None = None):
        with transaction():
            return store.create_execution("kid", {}, None, None, "r:1", "engine", key,
                                          parent=parent)

    def attempt_row(status: str, attempt: int = 1, block: str | None = None) -> None:
        with transaction():
            store.write_step(parent_id, "call", attempt, status, hook_block=block)

    parent_id = create().execution["id"]
    attempt_row("running")
    attempt_row("running", block="on_finish")
    step_1 = store.Parent(parent_id, "call", 2, attempt=1)
    hook_1 = store.Parent(parent_id, "call", 2, attempt=1, hook=True)
    own, tool, other, hooks = (create(key, parent).execution["id"] for key, parent in (
        ("k:1", step_1), ("k:1:1.0", step_1), ("k:11", step_1), ("k:on_finish:1", hook_1)))
    with transaction():
        cancelled = store.cancel_children(parent_id, "k:1")
    assert sorted(entry[0] for entry in cancelled) == sorted([own, tool])
    assert [_status(i) for i in (own, tool, other, hooks)] == [
        "cancelled", "cancelled", "running", "running"]

    attempt_row("failed")
    refused = create("k:1:2.0", step_1)
    assert refused.error is not None and "no longer running" in refused.error.message
    assert create("k:on_finish:1:1.0", hook_1).error is None  # the hook's row still runs
    assert create("k:2", store.Parent(parent_id, "call", 2, attempt=2)).error is not None


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


def test_a_child_refused_by_its_workflows_limit_is_retried_as_the_step_allows(engine,
                                                                            http_target):
    # A refusal at the limit is transient, unlike an unknown workflow or bad inputs: the
    # step's next attempt creates the child once the slot is free. The slot is held until
    # the first attempt was refused (a 300 ms sleep held it: a parent slower to start than
    # that on a loaded machine got the slot at its first attempt).
    http_target.route("/hold", hold=True)
    apply(f"""
        name: only-one
        max_parallel_executions: 1
        on_limit: reject
        steps: [{{name: call, action: http/request,
                 params: {{url: "{http_target.url('/hold')}"}}}}]
    """)
    apply("""
        name: parent
        steps: [{name: child, action: workflow/run, params: {workflow: only-one},
                 retry: {max_attempts: 2}}]
    """)
    holder = engine.run("only-one").execution_id
    http_target.wait_for_hits("/hold", 1, timeout=10)
    parent = engine.run("parent").execution_id
    wait_until(lambda: StepExecution.select().where(
        StepExecution.execution_id == parent, StepExecution.attempt == 1,
        StepExecution.status == "failed").exists(), message="the first attempt was not refused")
    http_target.release("/hold")  # the retry comes 1 s after the refusal
    detail = finish(engine, parent)
    step = steps_of(detail)["child"]
    assert (detail["status"], step["attempt"]) == ("completed", 2), detail
    [child] = _children(detail["id"])
    assert child.status == "completed" and _status(holder) == "completed"


def test_the_greet_twice_example_runs_hello_world_twice_as_children(engine):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    for name in ("hello-world.yaml", "greet-twice.yaml"):
        apply((examples / name).read_text())
    detail = run(engine, "greet-twice", {"who": "you"})
    assert detail["status"] == "completed", detail
    assert steps_of(detail)["report"]["output"] == {"message": "Hello, you! / completed"}
    assert [child.workflow_name for child in _children(detail["id"])] == ["hello-world"] * 2
