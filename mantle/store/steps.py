"""Step attempt rows (SPEC 4.11): one row per attempt, written idempotently.

Every write is an upsert on (execution, is_hook, step, attempt): writing an attempt's row again
after a crash (a resumed hook, a re-run attempt) updates it instead of failing on the unique
index. ``progress`` is never touched by these writes: a connector's checkpoint inside an
attempt survives the attempt's row being rewritten (``write_progress`` sets it).
"""

from __future__ import annotations

import datetime as dt

from mantle.db.fields import dump_json
from mantle.db.models import StepExecution
from mantle.store.statements import Statements, storable_text

__all__ = ["write_step", "write_progress"]


def write_step(execution_id: str, step: str, attempt: int, status: str, *, hook_block=None,
               output=None, error=None, started_at=None, completed_at=None,
               wait_kind: str | None = None, wait_until: dt.datetime | None = None,
               audit_action: str | tuple[str, ...] | None = None,
               audit_extra: dict | None = None) -> None:
    """Insert or update the row of one attempt, and record its audit events (9.3).

    ``wait_kind``/``wait_until``: the attempt is waiting until then (``sleep``: a core/sleep;
    ``retry``: the back-off before it starts), so a resumed runner waits only what is left
    (13.1.11)."""
    is_hook = hook_block is not None
    sql = Statements.of_bound()
    row = (execution_id, step, attempt, status, is_hook, hook_block,
           None if output is None else dump_json(output), storable_text(error),
           sql.stamp(started_at), sql.stamp(completed_at), wait_kind, sql.stamp(wait_until))
    if sql.batch is not None:
        sql.batch.steps.append(row)  # written with the batch (an upsert needs no answer)
    else:
        sql.run(sql.upsert_step, row)
    actions = (audit_action,) if isinstance(audit_action, str) else (audit_action or ())
    if not actions:
        return
    if is_hook:
        metadata = {"execution_id": execution_id, "hook_block": hook_block}
    else:
        metadata = {"execution_id": execution_id, "attempt": attempt}
        if error is not None:
            metadata["error"] = error
    metadata.update(audit_extra or {})
    resource = "hook_step_execution" if is_hook else "step_execution"
    for action in actions:
        sql.audit("engine", action, resource, step, metadata)


def write_progress(execution_id: str, step: str, attempt: int, is_hook: bool,
                   progress) -> bool:
    """Store a connector's checkpoint inside a running attempt; False when the attempt's row
    is no longer running (cancelled, or finished meanwhile)."""
    Statements.of_bound().flush()
    return bool(StepExecution.update(progress=progress).where(
        StepExecution.execution_id == execution_id, StepExecution.is_hook == is_hook,
        StepExecution.step_name == step, StepExecution.attempt == attempt,
        StepExecution.status == "running").execute())
