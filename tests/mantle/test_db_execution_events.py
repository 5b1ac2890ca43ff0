"""Migration 005 and the event log read from the audit trail (``mantle.events``), on SQLite
and PostgreSQL: the ``execution.finished`` row, the per-execution index, and where a finish
is placed."""

from __future__ import annotations

import uuid

from mantle.db import migrations, transaction
from mantle.db.fields import utcnow
from mantle.db.models import AuditEvent, WorkflowExecution
from mantle import events
from mantle.store import write_step


def _execution(status: str = "running") -> str:
    return WorkflowExecution.create(id=str(uuid.uuid4()), workflow_name="wf", version=1,
                                    status=status, inputs={}, trigger={},
                                    started_at=utcnow()).id


def _finished_rows(execution_id: str) -> list[AuditEvent]:
    return list(AuditEvent.select().where(AuditEvent.action == "execution.finished",
                                          AuditEvent.resource_id == execution_id))


def test_an_execution_reaching_a_final_status_gets_one_execution_finished_row(db):
    running, queued = _execution(), _execution("pending")
    done = utcnow()
    WorkflowExecution.update(status="failed", error="boom", completed_at=done).where(
        WorkflowExecution.id == running).execute()
    WorkflowExecution.update(status="cancelled", completed_at=done).where(
        WorkflowExecution.id == queued).execute()
    # Changes that do not end an execution write nothing.
    WorkflowExecution.update(status="cancelled").where(WorkflowExecution.id == running).execute()
    WorkflowExecution.update(error="again").where(WorkflowExecution.id == running).execute()
    untouched = _execution()
    WorkflowExecution.update(status="running").where(WorkflowExecution.id == untouched).execute()
    rows = _finished_rows(running)
    assert len(rows) == 1
    row = rows[0]
    assert (row.actor, row.resource_type, row.timestamp) == ("engine", "workflow_execution", done)
    assert row.metadata == {"workflow": "wf", "status": "failed", "error": "boom"}
    assert [r.metadata["status"] for r in _finished_rows(queued)] == ["cancelled"]
    assert _finished_rows(untouched) == []


def test_migrating_005_down_removes_the_trigger_and_up_restores_it(db):
    while migrations.migrate_down(db) != "005_execution_events":  # and those after it
        pass
    execution_id = _execution()
    WorkflowExecution.update(status="completed", completed_at=utcnow()).where(
        WorkflowExecution.id == execution_id).execute()
    assert _finished_rows(execution_id) == []
    assert migrations.migrate(db)[0] == "005_execution_events"
    second = _execution()
    WorkflowExecution.update(status="completed", completed_at=utcnow()).where(
        WorkflowExecution.id == second).execute()
    assert len(_finished_rows(second)) == 1


def test_a_finish_written_before_the_last_steps_rows_is_placed_after_them(db):
    execution_id = _execution()
    now = utcnow()
    write_step(execution_id, "a", 1, "running", started_at=now, audit_action="step.started")
    # The engine's last checkpoint and the final status in one transaction: the status
    # update (and so the finish row) comes before the step's audit row.
    with transaction(db):
        WorkflowExecution.update(status="completed", completed_at=now).where(
            WorkflowExecution.id == execution_id).execute()
        write_step(execution_id, "a", 1, "completed", started_at=now, completed_at=now,
                   output={"x": 1}, audit_action="step.completed")
    finish = _finished_rows(execution_id)[0]
    started = AuditEvent.get(AuditEvent.action == "step.started")
    completed = AuditEvent.get(AuditEvent.action == "step.completed")
    assert started.id < finish.id < completed.id
    found, ended = events.execution_history(execution_id, "wf", 0, None)
    assert ended
    assert [(event.kind, event.id) for event in found] == [
        ("step.started", 2 * started.id), ("step.finished", 2 * completed.id),
        ("execution.finished", 2 * completed.id + 1)]
    # The live translator, fed every row in id order, places it the same way.
    live = events.Translator().feed(events.rows_after(0))
    assert [event.id for event in live] == [event.id for event in found]
    # Resumed after the step's finish: only the execution's finish is left.
    rest, ended = events.execution_history(execution_id, "wf", 2 * completed.id, None)
    assert ended and [event.kind for event in rest] == ["execution.finished"]
    rest, ended = events.execution_history(execution_id, "wf", 2 * completed.id + 1, None)
    assert ended and rest == []


def test_an_executions_rows_are_found_by_its_id_among_others(db):
    mine, other = _execution(), _execution()
    for attempt, execution_id in enumerate((mine, other, mine), start=1):
        write_step(execution_id, "s", attempt, "running", started_at=utcnow(),
                   audit_action="step.started")
    # A metadata text that merely mentions the id does not count as the execution's.
    AuditEvent.create(timestamp=utcnow(), actor="cli", action="note", resource_type="x",
                      resource_id="y", metadata={"error": f'"execution_id":"{mine}"'})
    found, ended = events.execution_history(mine, "wf", 0, None)
    assert not ended
    assert [(event.data["execution_id"], event.data["attempt"]) for event in found] == [
        (mine, 1), (mine, 3)]
    assert events.last_execution_row(mine) == max(
        row.id for row in AuditEvent.select().where(AuditEvent.action == "step.started"))
