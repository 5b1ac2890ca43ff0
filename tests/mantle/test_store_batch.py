"""The journal's batched writes (``store.batch_scope``: on PostgreSQL one statement per table
over a JSON recordset) store exactly what the same writes store one statement at a time:
NULLs, booleans, integers, timestamps to the microsecond, text that looks like JSON,
backslashes, quotes, non-ASCII text and NUL (SPEC 13.1.12)."""

from __future__ import annotations

import datetime as dt

from mantle import store
from mantle.db import transaction
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
