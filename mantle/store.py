"""The engine's database operations: each function runs inside a journal transaction.

Functions here never open transactions themselves and never raise for expected outcomes
(unknown workflow, limit reached): they return a result the caller inspects, so the journal
can batch them freely. Reads used by the CLI and the REST API live in ``mantle.queries``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import threading
import uuid
from typing import Any

from peewee import fn

from mantle.db import audit, database_proxy, is_sqlite, lock_for_update, unwrap
from mantle.db.fields import MAX_INTEGER, dump_json, sqlite_text, storable, utcnow
from mantle.db.models import (Node, StepExecution, Workflow, WorkflowDefinition,
                              WorkflowExecution)
from mantle.errors import MantleError, VersionNotFound, WorkflowNotFound
from mantle.states import ExecutionStatus
from mantle.workflow import Workflow as WorkflowModel
from mantle.workflow import check_inputs, workflow_from_definition

__all__ = [
    "Created", "LimitReached", "create_execution", "mark_running", "promote_queued", "write_step",
    "finish_execution", "write_progress", "cancel_execution", "heartbeat", "cancelled_since",
    "execution_snapshot", "find_orphans", "claim", "definition_of", "copy_steps",
    "batched_audit",
]

_ACTIVE = (ExecutionStatus.PENDING.value, ExecutionStatus.RUNNING.value)


class LimitReached(MantleError):
    def __init__(self, workflow: str, limit: int):
        super().__init__(f'workflow "{workflow}" has reached the maximum of {limit} '
                         "concurrent executions")
        self.workflow = workflow
        self.limit = limit


@dataclasses.dataclass(frozen=True, slots=True)
class Created:
    """Outcome of create_execution: the row as a dict, or the error to report."""

    execution: dict | None = None
    definition: dict | None = None
    existing: bool = False
    queued: bool = False
    error: MantleError | None = None


class _Statements:
    """Hand-written SQL for the engine's hottest writes, one set per database.

    Profiling W1 showed peewee building these statements costing four times what SQLite spent
    running them; the text only depends on the placeholder style, so it is built once.
    """

    _by_database: dict[int, _Statements] = {}

    def __init__(self, database):
        self.db = database
        self.sqlite = is_sqlite(database)
        p = database.param

        def values(n: int) -> str:
            return ", ".join([p] * n)

        self.insert_audit = (
            "INSERT INTO audit_events (timestamp, actor, action, resource_type, resource_id, "
            f"metadata) VALUES ({values(6)})")
        self.insert_step = (
            "INSERT INTO step_executions (execution_id, step_name, attempt, status, is_hook, "
            f"hook_block, output, error, started_at, completed_at) VALUES ({values(10)})")
        self.update_step = (
            f"UPDATE step_executions SET status = {p}, output = {p}, error = {p}, "
            f"started_at = {p}, completed_at = {p} WHERE execution_id = {p} AND is_hook = {p} "
            f"AND step_name = {p} AND attempt = {p}")
        self.insert_execution = (
            "INSERT INTO workflow_executions (id, workflow_name, version, status, inputs, "
            "trigger, started_at, owner, idempotency_key, retry_of, epoch) "
            f"VALUES ({values(10)}, 1)")
        self.finish_execution = (
            f"UPDATE workflow_executions SET status = {p}, error = {p}, completed_at = {p} "
            f"WHERE id = {p} AND status = 'running'")
        self.current_version = f"SELECT current_version FROM workflows WHERE name = {p}"
        # Stored versions never change, so their parsed form can be kept: per database,
        # since two databases may hold different workflows under the same name and version.
        self.definitions: collections.OrderedDict = collections.OrderedDict()
        self.local = threading.local()  # .audit_rows: this thread's batched_audit() buffer

    @classmethod
    def of_bound(cls) -> _Statements:
        return cls.of(database_proxy)

    @classmethod
    def of(cls, database) -> _Statements:
        database = unwrap(database)
        statements = cls._by_database.get(id(database))
        if statements is None or statements.db is not database:
            statements = cls._by_database[id(database)] = cls(database)
        return statements

    def stamp(self, value):
        if value is None:
            return None
        return sqlite_text(value) if self.sqlite else value

    def run(self, sql: str, params: tuple) -> int:
        return self.db.execute_sql(sql, params).rowcount

    def audit(self, actor, action, resource_type, resource_id, metadata) -> None:
        row = (self.stamp(utcnow()), actor, action, resource_type, str(resource_id),
               dump_json(metadata))
        rows = getattr(self.local, "audit_rows", None)
        if rows is None:
            self.run(self.insert_audit, row)
        else:
            rows.append(row)


@contextlib.contextmanager
def batched_audit(database):
    """Inside a transaction: collect the audit rows this thread's operations write and insert
    them in one ``executemany`` when the block ends without error (before the commit).

    Audit rows are appended and never read back by an operation, so inserting them at the end
    of the transaction changes nothing but the cost: one statement per row was a tenth of the
    daemon's time under load, and on PostgreSQL one network round trip per row.
    """
    sql = _Statements.of(database)
    if getattr(sql.local, "audit_rows", None) is not None:  # nested: the outer block inserts
        yield
        return
    rows = sql.local.audit_rows = []
    try:
        yield
        if rows:
            cursor = sql.db.cursor()
            try:
                cursor.executemany(sql.insert_audit, rows)
            finally:
                cursor.close()
    finally:
        sql.local.audit_rows = None


def _json(value):
    return None if value is None else dump_json(value)


def _cached_definition(workflow: str, version: int) -> tuple[dict, WorkflowModel] | None:
    """(definition, model) of an immutable stored version, cached per database."""
    cache = _Statements.of_bound().definitions
    key = (workflow, version)
    found = cache.get(key)
    if found is None:
        row = (WorkflowDefinition.select(WorkflowDefinition.definition)
               .where(WorkflowDefinition.workflow_name == workflow,
                      WorkflowDefinition.version == version).first())
        if row is None:
            return None
        found = cache[key] = (row.definition, workflow_from_definition(row.definition))
        if len(cache) > 512:
            cache.popitem(last=False)
    return found


def _row(execution: WorkflowExecution) -> dict:
    return {"id": execution.id, "workflow": execution.workflow_name,
            "version": execution.version, "status": execution.status,
            "inputs": execution.inputs, "trigger": execution.trigger,
            "error": execution.error, "started_at": execution.started_at,
            "completed_at": execution.completed_at, "runner": execution.owner,
            "retry_of": execution.retry_of}


def definition_of(workflow: str, version: int | None) -> tuple[int, dict] | MantleError:
    """(version, definition) of the requested or current version, or the error."""
    found = _version_of(workflow, version)
    if isinstance(found, MantleError):
        return found
    return found[0], found[1]


def _version_of(workflow: str, version: int | None):
    """(version, definition, model) or the error to report."""
    if not storable(workflow):
        return WorkflowNotFound(workflow)
    if version is not None and version > MAX_INTEGER:
        if Workflow.get_or_none(Workflow.name == workflow) is None:
            return WorkflowNotFound(workflow)
        return VersionNotFound(workflow, version)
    if version is None:
        sql = _Statements.of_bound()
        row = sql.db.execute_sql(sql.current_version, (workflow,)).fetchone()
        if row is None:
            return WorkflowNotFound(workflow)
        version = row[0]
    found = _cached_definition(workflow, version)
    if found is None:
        if Workflow.get_or_none(Workflow.name == workflow) is None:
            return WorkflowNotFound(workflow)
        return VersionNotFound(workflow, version)
    return version, found[0], found[1]


def create_execution(workflow: str, inputs: dict | None, version: int | None, trigger: Any,
                     runner: str, actor: str, idempotency_key: str | None = None,
                     retry_of: str | None = None, from_step: str | None = None) -> Created:
    """Insert an execution after the input, idempotency and limit checks (4.9): ``running``
    when it may start now, ``pending`` when it waits in the queue."""
    if idempotency_key is not None and storable(workflow):
        earlier = WorkflowExecution.get_or_none(
            WorkflowExecution.workflow_name == workflow,
            WorkflowExecution.idempotency_key == idempotency_key)
        if earlier is not None:
            return Created(_row(earlier), existing=True)
    found = _version_of(workflow, version)
    if isinstance(found, MantleError):
        return Created(error=found)
    version, definition, model = found
    try:
        effective = check_inputs(model, inputs or {})
    except MantleError as exc:
        return Created(error=exc)
    queued = False
    if model.max_parallel_executions > 0:
        lock_for_update(Workflow, Workflow.name == workflow)
        if _running_count(workflow) >= model.max_parallel_executions:
            if model.on_limit == "reject":
                return Created(error=LimitReached(workflow, model.max_parallel_executions))
            queued = True
    # An execution that got a slot is created running, so the next limit check counts it:
    # counting "pending" too would count queued ones, and a created-then-started pair of writes
    # would let two creations pass the check between them.
    status = ExecutionStatus.PENDING if queued else ExecutionStatus.RUNNING
    sql = _Statements.of_bound()
    execution = {"id": str(uuid.uuid4()), "workflow": workflow, "version": version,
                 "status": status.value, "inputs": effective,
                 "trigger": trigger if trigger is not None else {"type": "manual",
                                                                 "payload": None},
                 "error": None, "started_at": utcnow(), "completed_at": None,
                 "runner": runner, "retry_of": retry_of}
    sql.run(sql.insert_execution, (
        execution["id"], workflow, version, status.value, dump_json(effective),
        dump_json(execution["trigger"]), sql.stamp(execution["started_at"]), runner,
        idempotency_key, retry_of))
    if not queued:
        sql.audit(actor, "workflow.executed", "workflow_execution", execution["id"],
                  {"workflow": workflow, "version": version})
    if retry_of is not None:
        sql.audit(actor, "execution.retried", "workflow_execution", execution["id"],
                  {"original_execution_id": retry_of, "from_step": from_step})
    return Created(execution, definition, queued=queued)


def _running_count(workflow: str) -> int:
    return (WorkflowExecution.select(fn.COUNT(WorkflowExecution.id))
            .where(WorkflowExecution.workflow_name == workflow,
                   WorkflowExecution.status == ExecutionStatus.RUNNING.value).scalar())


def mark_running(execution_id: str, workflow: str, version: int, actor: str) -> bool:
    """pending -> running; False when it is no longer pending (cancelled meanwhile)."""
    changed = (WorkflowExecution.update(status=ExecutionStatus.RUNNING.value)
               .where(WorkflowExecution.id == execution_id,
                      WorkflowExecution.status == ExecutionStatus.PENDING.value).execute())
    if changed:
        audit.record_audit(actor, "workflow.executed", "workflow_execution", execution_id,
                           {"workflow": workflow, "version": version})
    return bool(changed)


def promote_queued(workflow: str, runner: str, limit: int) -> tuple[list[str], bool]:
    """Move this runner's oldest queued executions of ``workflow`` to ``running`` while slots
    are free (FIFO, 4.9); return (promoted ids, whether some are still queued)."""
    lock_for_update(Workflow, Workflow.name == workflow)
    free = limit - _running_count(workflow)
    queued = list(WorkflowExecution.select(WorkflowExecution.id, WorkflowExecution.version)
                  .where(WorkflowExecution.workflow_name == workflow,
                         WorkflowExecution.owner == runner,
                         WorkflowExecution.status == ExecutionStatus.PENDING.value)
                  .order_by(WorkflowExecution.started_at, WorkflowExecution.id)
                  .limit(max(free, 0) + 1))
    promoted = []
    for row in queued[:max(free, 0)]:
        if mark_running(row.id, workflow, row.version, "engine"):
            audit.record_audit("engine", "execution.promoted", "workflow_execution", row.id,
                               {"workflow": workflow})
            promoted.append(row.id)
    return promoted, len(queued) > len(promoted)


def write_step(execution_id: str, step: str, attempt: int, status: str, *, hook_block=None,
               output=None, error=None, started_at=None, completed_at=None,
               audit_action: str | tuple[str, ...] | None = None,
               audit_extra: dict | None = None,
               new: bool = False) -> None:
    """Insert or update the row of one attempt (the unique key makes it idempotent).

    ``new``: the caller knows no row exists yet, so the insert is tried first.
    """
    is_hook = hook_block is not None
    sql = _Statements.of_bound()
    values = (status, _json(output), error, sql.stamp(started_at), sql.stamp(completed_at))
    key = (execution_id, is_hook, step, attempt)
    if new or not sql.run(sql.update_step, values + key):
        sql.run(sql.insert_step, (execution_id, step, attempt, status, is_hook, hook_block,
                                  *values[1:]))
    actions = (audit_action,) if isinstance(audit_action, str) else (audit_action or ())
    if actions:
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
    return bool(StepExecution.update(progress=progress).where(
        StepExecution.execution_id == execution_id, StepExecution.is_hook == is_hook,
        StepExecution.step_name == step, StepExecution.attempt == attempt,
        StepExecution.status == "running").execute())


def finish_execution(execution_id: str, status: str, error: str | None) -> bool:
    """running -> final; False when the row is no longer running (a cancel won the race)."""
    sql = _Statements.of_bound()
    return bool(sql.run(sql.finish_execution,
                        (status, error, sql.stamp(utcnow()), execution_id)))


def cancel_execution(execution_id: str, actor: str) -> tuple[str, str] | None:
    """Commit ``cancelled`` if pending/running; return (status found, workflow) or None."""
    row = (WorkflowExecution.select(WorkflowExecution.status, WorkflowExecution.workflow_name)
           .where(WorkflowExecution.id == execution_id).first())
    if row is None:
        return None
    if row.status not in _ACTIVE:
        return row.status, row.workflow_name
    changed = (WorkflowExecution.update(status=ExecutionStatus.CANCELLED.value,
                                        completed_at=utcnow())
               .where(WorkflowExecution.id == execution_id,
                      WorkflowExecution.status.in_(_ACTIVE)).execute())
    if not changed:  # finished between the two statements
        return cancel_execution(execution_id, actor)
    audit.record_audit(actor, "execution.cancelled", "workflow_execution", execution_id,
                       {"workflow": row.workflow_name})
    return row.status, row.workflow_name


def heartbeat(runner: str, hostname: str, pid: int) -> None:
    now = utcnow()
    if not Node.update(lease_expires_at=now).where(Node.id == runner).execute():
        Node.insert(id=runner, hostname=hostname, pid=pid, kind="serve", started_at=now,
                    lease_expires_at=now).execute()


def cancelled_since(runner: str, since: dt.datetime) -> list[tuple[str, str]]:
    """(id, workflow) of this runner's executions cancelled (by anyone) since ``since``."""
    return [(row.id, row.workflow_name) for row in WorkflowExecution.select(
            WorkflowExecution.id, WorkflowExecution.workflow_name).where(
        WorkflowExecution.owner == runner,
        WorkflowExecution.status == ExecutionStatus.CANCELLED.value,
        WorkflowExecution.completed_at >= since)]


def execution_snapshot(execution_id: str) -> tuple[dict, dict, list[dict]] | None:
    """(execution, definition, step rows) for starting or resuming an execution."""
    execution = WorkflowExecution.get_or_none(WorkflowExecution.id == execution_id)
    if execution is None:
        return None
    found = definition_of(execution.workflow_name, execution.version)
    if isinstance(found, MantleError):
        return None
    rows = [{"step": r.step_name, "attempt": r.attempt, "status": r.status,
             "hook_block": r.hook_block, "is_hook": r.is_hook, "output": r.output,
             "error": r.error, "started_at": r.started_at, "completed_at": r.completed_at,
             "progress": r.progress}
            for r in StepExecution.select().where(StepExecution.execution_id == execution_id)
            .order_by(StepExecution.id)]
    return _row(execution), found[1], rows


def find_orphans(hostname: str, stale_before: dt.datetime, alive) -> list[tuple[str, str]]:
    """(execution id, runner) of pending/running executions whose runner is gone (4.11).

    ``alive(pid)`` tells whether a process of this host exists.
    """
    runners = {r.id: r for r in Node.select()}
    orphans = []
    for row in (WorkflowExecution.select(WorkflowExecution.id, WorkflowExecution.owner)
                .where(WorkflowExecution.status.in_(_ACTIVE))
                .order_by(WorkflowExecution.started_at)):
        runner = runners.get(row.owner)
        if runner is None or runner.lease_expires_at < stale_before:
            orphans.append((row.id, row.owner))
        elif runner.hostname == hostname and not alive(runner.pid):
            orphans.append((row.id, row.owner))
    return orphans


def claim(execution_id: str, old_runner: str | None, runner: str) -> bool:
    """Take over an orphan; compare-and-set so two daemons never both win."""
    return bool(WorkflowExecution.update(owner=runner, epoch=WorkflowExecution.epoch + 1)
                .where(WorkflowExecution.id == execution_id,
                       WorkflowExecution.owner == old_runner,
                       WorkflowExecution.status.in_(_ACTIVE)).execute())


def copy_steps(execution_id: str, rows: list[dict]) -> None:
    """Store reused step results in a retry execution (``mantle retry``)."""
    for row in rows:
        StepExecution.insert(execution_id=execution_id, step_name=row["step"],
                             attempt=row["attempt"], is_hook=False, status=row["status"], output=row["output"],
                             error=row["error"], started_at=row["started_at"],
                             completed_at=row["completed_at"]).execute()

