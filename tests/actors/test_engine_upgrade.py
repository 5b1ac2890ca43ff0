"""Executions in flight across an upgrade: what the previous release left is picked up."""

from __future__ import annotations

import hashlib

from actors.engine import Engine
from mantle.db.migrations import m008_hook_child_keys
from mantle.db.models import StepExecution, WorkflowExecution
from mantle.metrics import Metrics
from tests.actors.conftest import apply, wait_until

SHORT_KID = """
    name: short-kid
    steps: [{name: nap, action: core/sleep, params: {duration: 4s}}]
"""


def _engine(db, tmp_path, *, takeover: bool = False) -> Engine:
    return Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path / "plugins"), secrets={},
                  resume_orphans=takeover).start()


def _children(parent_id: str) -> list[WorkflowExecution]:
    return list(WorkflowExecution.select().where(
        WorkflowExecution.parent_execution_id == parent_id)
        .order_by(WorkflowExecution.started_at))


def _legacy_key(parent_id: str, step: str, attempt: int) -> str:
    """The key every ``workflow/run`` child had before e9d5f26, hooks' included."""
    digest = hashlib.sha256(step.encode()).hexdigest()[:16]
    return f"mantle-child:{parent_id}:{digest}:{attempt}"


def test_a_hook_child_created_before_the_upgrade_is_awaited_not_created_again(db, tmp_path):
    """SPEC 13.3: exactly one child per parent step attempt, also across crashes (on resume
    the existing child is awaited, never created again); docs/systemd.md: an upgrade
    followed by a restart is safe, executions pick up where they stopped. A node of the
    previous release created a ``workflow/run`` hook's child under the key hooks had then
    (no block in it) and stopped while the child ran; the upgraded node that resumes the
    hook must find that child, not create a second one under the new key."""
    apply(SHORT_KID)
    apply("""
        name: parent
        steps: [{name: start, action: core/log, params: {message: go}}]
        hooks:
          on_finish:
            - {name: child, action: workflow/run, params: {workflow: short-kid}}
    """)
    old = _engine(db, tmp_path)
    try:
        parent = old.run("parent").execution_id
        [child] = wait_until(lambda: _children(parent))
        wait_until(lambda: WorkflowExecution.get_by_id(child.id).status == "running")
    finally:
        old.shutdown(timeout=0.2)
    # What the previous release left: the hook's child under its key, no stored outcome
    # (migration 007's column is NULL for every execution created before it).
    (WorkflowExecution.update(idempotency_key=_legacy_key(parent, "child", 1))
     .where(WorkflowExecution.id == child.id).execute())
    (WorkflowExecution.update(outcome=None, hooks_since=None)
     .where(WorkflowExecution.id == parent).execute())
    m008_hook_child_keys.up(db)  # the upgrade's migration, on what the old release left

    new = _engine(db, tmp_path, takeover=True)
    try:
        status = new.wait(parent, timeout=20)
        children = _children(parent)
        hook = StepExecution.get(StepExecution.execution_id == parent,
                                 StepExecution.is_hook == True)  # noqa: E712 - SQL
        assert [c.id for c in children] == [child.id], (
            status, [(c.id, c.idempotency_key, c.status) for c in children])
        assert hook.output["execution_id"] == child.id
    finally:
        new.shutdown(timeout=1)
