"""Steps a dead owner left running in a cancelled execution (SPEC 4.6, 13.7;
``mantle.store.close_orphaned_steps``, run by daemons with their takeover). The black-box
case, a real owner killed before a cancel, is in ``tests/faults/test_final_states.py``."""

from __future__ import annotations

from mantle import store
from mantle.db import transaction
from mantle.db.models import StepExecution
from tests.helpers.waiting import apply_yaml

TWO = """
name: two
steps:
  - {name: a, action: core/sleep, params: {duration: 60s}}
  - {name: b, action: core/sleep, params: {duration: 60s}}
"""


def _execution(owner: str, status: str, step_statuses: dict[str, str]) -> str:
    with transaction():
        execution_id = store.create_execution("two", {}, None, None, owner, "api",
                                              None).execution["id"]
        for step, step_status in step_statuses.items():
            store.write_step(execution_id, step, 1, step_status)
    if status == "cancelled":
        with transaction():
            store.cancel_execution(execution_id, "cli")
    return execution_id


def _steps(execution_id: str) -> dict[str, tuple[str, bool]]:
    return {row.step_name: (row.status, row.completed_at is not None) for row in
            StepExecution.select().where(StepExecution.execution_id == execution_id)}


def test_only_the_active_steps_of_cancelled_executions_whose_owner_is_gone_are_ended(db):
    apply_yaml(TWO)
    with transaction():
        for node in ("dead", "alive"):
            store.register_node(node, "host", 1, "serve", "key", None, 60)
        store.expire_node("dead")
    orphaned = _execution("dead", "cancelled", {"a": "running", "b": "completed"})
    no_owner = _execution("never-registered", "cancelled", {"a": "pending"})
    owner_alive = _execution("alive", "cancelled", {"a": "running"})
    running = _execution("dead", "running", {"a": "running"})  # claim_expired's, not ours

    with transaction():
        closed = store.close_orphaned_steps()

    assert sorted(closed) == sorted([orphaned, no_owner])
    assert _steps(orphaned) == {"a": ("cancelled", True), "b": ("completed", False)}
    assert _steps(no_owner) == {"a": ("cancelled", True)}
    assert _steps(owner_alive) == {"a": ("running", False)}  # its owner records it
    assert _steps(running) == {"a": ("running", False)}
    with transaction():
        assert store.close_orphaned_steps() == []
