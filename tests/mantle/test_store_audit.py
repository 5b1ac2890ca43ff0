"""Audit rows written by engine operations in one journal transaction (SPEC 9.3): batched into
one insert at the end, in call order, and gone with a rollback."""

from __future__ import annotations

import pytest

from mantle import store
from mantle.db import transaction
from mantle.db.models import AuditEvent
from tests.helpers.waiting import apply_yaml

TINY = "name: tiny\nsteps: [{name: a, action: core/log, params: {message: x}}]\n"


def _actions() -> list[tuple[str, str]]:
    return [(row.action, row.resource_id)
            for row in AuditEvent.select().where(AuditEvent.actor != "cli")
            .order_by(AuditEvent.id)]


def test_audit_rows_of_a_batch_are_inserted_in_call_order(db):
    apply_yaml(TINY)
    with transaction(db), store.batch_scope(db):
        created = store.create_execution("tiny", {}, None, None, "r1", "api")
        execution_id = created.execution["id"]
        store.write_step(execution_id, "a", 1, "running", audit_action="step.started")
        store.write_step(execution_id, "a", 1, "completed", output={"message": "x"},
                         audit_action="step.completed")
        assert _actions() == []  # held back until the block ends: one insert, not three
    assert _actions() == [("workflow.executed", execution_id), ("step.started", "a"),
                          ("step.completed", "a")]


def test_audit_rows_of_a_failed_batch_are_not_written(db):
    apply_yaml(TINY)
    with pytest.raises(RuntimeError), transaction(db), store.batch_scope(db):
        store.create_execution("tiny", {}, None, None, "r1", "api")
        raise RuntimeError("an operation failed")
    assert _actions() == []
    with transaction(db), store.batch_scope(db):  # the buffer was reset
        store.create_execution("tiny", {}, None, None, "r1", "api")
    assert [action for action, _ in _actions()] == ["workflow.executed"]


def test_audit_outside_a_batch_is_written_at_once(db):
    apply_yaml(TINY)
    with transaction(db):
        store.create_execution("tiny", {}, None, None, "r1", "api")
        assert [action for action, _ in _actions()] == ["workflow.executed"]
