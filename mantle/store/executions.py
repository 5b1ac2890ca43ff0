"""Execution rows: creation (limits, idempotency), the end, cancel, the queue, snapshots.

Each function runs inside a journal transaction (``mantle.services.journal``) or another
``transaction()``; none opens one itself. Expected outcomes (unknown workflow, limit reached)
are returned, not raised, so operations batch freely.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

from peewee import SQL, PeeweeException, fn

from mantle.db import is_postgres, lock_for_update
from mantle.db.fields import dump_json, storable, utcnow
from mantle.db.models import Node, StepExecution, Workflow, WorkflowExecution
from mantle.errors import (ExecutionFinished, ExecutionNotFound, LimitReached, MantleError,
                           VersionNotFound)
from mantle.states import ExecutionStatus
from mantle.store.statements import Pending, Statements, storable_text
from mantle.store.versions import stored_version, version_of
from mantle.workflow import Workflow as WorkflowModel
from mantle.workflow import check_inputs

__all__ = ["Created", "Parent", "Cancelled", "create_execution", "finish_execution",
           "fail_execution", "Failed", "cancel_execution", "cancel_children", "promote_queued",
           "workflow_of", "queued_workflows", "execution_snapshot", "execution_row",
           "copy_steps", "mark_hooks_started", "final_results", "Snapshot", "Promotion",
           "MANUAL_TRIGGER", "CHILD_KEY_PREFIX", "child_hook_block"]

_ACTIVE = (ExecutionStatus.PENDING.value, ExecutionStatus.RUNNING.value)
MANUAL_TRIGGER = {"type": "manual", "payload": None}
# How the idempotency keys of sub-workflow children begin (``actors.children.child_key``); a
# client's key may not, or its execution would be taken for a parent step's child.
CHILD_KEY_PREFIX = "mantle-child:"
_COLUMNS = ("id", "workflow_name", "version", "status", "inputs", "trigger", "error",
            "started_at", "completed_at", "owner", "epoch", "running_since", "hooks_since",
            "retry_of", "parent_execution_id", "parent_step", "depth")


def child_hook_block(parent_id: str, key: str | None) -> str | None:
    """The hook block (``on_failure``...) whose step created the child of ``parent_id`` with
    idempotency key ``key``; None for a main step's child. A hook's key names its block
    where a main step's has its attempt (``...<parent>:<digest>:<block>:<attempt>``,
    ``actors.children.child_key``)."""
    prefix = f"{CHILD_KEY_PREFIX}{parent_id}:"
    if not key or not key.startswith(prefix):
        return None
    parts = key[len(prefix):].split(":")
    return parts[1] if len(parts) > 2 and not parts[1].isdigit() else None


@dataclasses.dataclass(frozen=True, slots=True)
class Parent:
    """Where a sub-workflow's execution hangs in its tree (SPEC 13.3): the parent's
    execution and step, and, when known, the step attempt (main step or hook) that creates
    the child, which must still be running for the child to be created."""

    execution_id: str
    step: str
    depth: int  # the child's own depth
    attempt: int | None = None
    hook: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Created:
    """Outcome of create_execution: the row as a dict, or the error to report."""

    execution: dict | None = None
    model: WorkflowModel | None = None  # of the execution's version, for the engine
    existing: bool = False
    queued: bool = False
    error: MantleError | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Cancelled:
    """Outcome of cancel_execution: the status found, and every execution this cancel made
    ``cancelled`` (itself and running descendants) as (id, workflow, owner node)."""

    previous: str
    workflow: str
    cancelled: tuple[tuple[str, str, str | None], ...] = ()


def execution_row(row: WorkflowExecution) -> dict:
    """The dict form of an execution row that the engine passes around."""
    return {"id": row.id, "workflow": row.workflow_name, "version": row.version,
            "status": row.status, "inputs": row.inputs, "trigger": row.trigger,
            "error": row.error, "started_at": row.started_at,
            "completed_at": row.completed_at, "owner": row.owner, "epoch": row.epoch,
            "running_since": row.running_since, "hooks_since": row.hooks_since,
            "outcome": row.outcome,
            "retry_of": row.retry_of, "parent_execution_id": row.parent_execution_id,
            "parent_step": row.parent_step, "depth": row.depth}


def _existing(workflow: str, key: str) -> WorkflowExecution | None:
    return WorkflowExecution.get_or_none(WorkflowExecution.workflow_name == workflow,
                                         WorkflowExecution.idempotency_key == key)


def create_execution(workflow: str, inputs: dict | None, version: int | None, trigger: Any,
                     node: str, actor: str, idempotency_key: str | None = None,
                     retry_of: str | None = None, from_step: str | None = None,
                     parent: Parent | None = None, now: dt.datetime | None = None) -> Created:
    """Insert an execution owned by ``node`` (epoch 1) after the input, idempotency and limit
    checks (4.9): ``running`` when it may start now, ``pending`` when it waits in the queue
    (no slot is free, or older queued executions that a live node will start wait for the
    one that is). ``now`` is the database's time as the caller knows it (``started_at``, the
    queue's order, and ``running_since``).

    An idempotency key already used for the workflow, here or by a concurrent creation on
    another node, answers the original execution (``existing``)."""
    if idempotency_key is not None and storable(workflow):
        earlier = _existing(workflow, idempotency_key)
        if earlier is not None:
            return Created(execution_row(earlier), existing=True)
    found = version_of(workflow, version)
    if isinstance(found, MantleError):
        return Created(error=found)
    version, _definition, model = found
    try:
        effective = check_inputs(model, inputs or {})
    except MantleError as exc:
        return Created(error=exc)
    queued = False
    sql = Statements.of_bound()
    if parent is not None:
        refused = _parent_gone(sql, parent)
        if refused is not None:
            return Created(error=refused)
    if model.max_parallel_executions > 0:
        sql.flush()  # the count must see executions created earlier in this batch
        lock_for_update(Workflow, Workflow.name == workflow)
        if idempotency_key is not None:
            # A creation with this key (another node's) may have committed while this one
            # waited for the lock: it holds the slot this one would be refused for.
            earlier = _existing(workflow, idempotency_key)
            if earlier is not None:
                return Created(execution_row(earlier), existing=True)
        if _running_count(workflow) >= model.max_parallel_executions:
            if model.on_limit == "reject":
                return Created(error=LimitReached(workflow, model.max_parallel_executions))
            queued = True
        elif model.on_limit == "queue" and _waiting(sql, workflow):
            # A slot freed since the last promotion and older executions wait for it: this
            # one queues behind them (FIFO, 4.9); the promotion that follows starts the oldest.
            queued = True
    # An execution that got a slot is created running, so the next limit check counts it:
    # counting "pending" too would count queued ones, and a created-then-started pair of writes
    # would let two creations pass the check between them.
    status = ExecutionStatus.PENDING if queued else ExecutionStatus.RUNNING
    trigger = trigger if trigger is not None else MANUAL_TRIGGER
    # ``started_at`` orders the queue: the database's time, never this host's clock (13.7).
    started = now or utcnow()
    running_since = None if queued else started
    execution = {"id": str(uuid.uuid4()), "workflow": workflow, "version": version,
                 "status": status.value, "inputs": effective, "trigger": trigger,
                 "error": None, "started_at": started, "completed_at": None,
                 "owner": node, "epoch": 1, "running_since": running_since,
                 "hooks_since": None,
                 "retry_of": retry_of,
                 "parent_execution_id": parent.execution_id if parent else None,
                 "parent_step": parent.step if parent else None,
                 "depth": parent.depth if parent else 1}
    row = (execution["id"], workflow, version, status.value, dump_json(effective),
           dump_json(trigger), sql.stamp(started), node, 1, idempotency_key, retry_of,
           sql.stamp(running_since), execution["parent_execution_id"],
           execution["parent_step"], execution["depth"])
    if idempotency_key is None and sql.batch is not None:
        sql.batch.executions.append(row)  # nothing can conflict: written with the batch
    elif not sql.run(sql.insert_execution, row):  # the key was taken since the look-up
        return Created(execution_row(_existing(workflow, idempotency_key)), existing=True)
    if not queued:
        sql.audit(actor, "workflow.executed", "workflow_execution", execution["id"],
                  {"workflow": workflow, "version": version})
    if retry_of is not None:
        sql.audit(actor, "execution.retried", "workflow_execution", execution["id"],
                  {"original_execution_id": retry_of, "from_step": from_step})
    return Created(execution, model, queued=queued)


def _parent_gone(sql: Statements, parent: Parent) -> MantleError | None:
    """Why a child of ``parent`` may not be created: the parent is no longer running, or
    the step attempt creating it has ended.

    A cancel may commit while the parent's owner is creating a child (from another node, or
    ahead of the creation in this node's journal); the cancel's cascade cannot see a child
    created after it, so the creation must see the cancel (SPEC 13.3). Likewise the write
    that ends the attempt (a step, workflow or hooks timeout) cancels the attempt's children
    (``cancel_children``): a creation after it must see the attempt's row ended. On
    PostgreSQL both rows stay share-locked until this transaction ends: a cancel or an
    attempt's end committing meanwhile waits for it, and then finds the child."""
    p = sql.db.param
    rows = sql.rows(f"SELECT status FROM workflow_executions WHERE id = {p}{sql.share_lock}",
                    (parent.execution_id,))
    if not rows:
        return ExecutionNotFound(parent.execution_id)
    if rows[0][0] != ExecutionStatus.RUNNING.value:
        return ExecutionFinished(parent.execution_id, rows[0][0])
    if parent.attempt is None:
        return None
    sql.flush()  # the attempt's row may have been written earlier in this batch
    rows = sql.rows(f"SELECT status FROM step_executions WHERE execution_id = {p} AND "
                    f"is_hook = {p} AND step_name = {p} AND attempt = {p}{sql.share_lock}",
                    (parent.execution_id, parent.hook, parent.step, parent.attempt))
    if not rows or rows[0][0] != "running":
        kind = "hook" if parent.hook else "step"
        return MantleError(f'{kind} "{parent.step}" attempt {parent.attempt} of execution '
                           f"{parent.execution_id} is no longer running")
    return None


def cancel_children(parent_id: str, key: str | None = None
                    ) -> tuple[tuple[str, str, str | None], ...]:
    """Commit ``cancelled`` for the pending/running children of ``parent_id`` (and their
    descendants, as ``cancel_execution`` does): those whose idempotency key is ``key`` or
    extends it (``<key>:...``), or all of them when ``key`` is None. Written with the end of
    the step attempt that created them (SPEC 13.3: a timeout of the parent cancels the
    child), so no crash can come between the two. Returns every execution cancelled, as
    (id, workflow, owner node)."""
    Statements.of_bound().flush()
    children = (WorkflowExecution.select(WorkflowExecution.id,
                                         WorkflowExecution.idempotency_key)
                .where(WorkflowExecution.parent_execution_id == parent_id,
                       WorkflowExecution.status.in_(_ACTIVE)))
    cancelled: list[tuple[str, str, str | None]] = []
    for child in list(children):
        found = child.idempotency_key or ""
        if key is None or found == key or found.startswith(key + ":"):
            outcome = cancel_execution(child.id, "engine")
            cancelled.extend(outcome.cancelled if outcome is not None else ())
    return tuple(cancelled)


def _running_count(workflow: str) -> int:
    return (WorkflowExecution.select(fn.COUNT(WorkflowExecution.id))
            .where(WorkflowExecution.workflow_name == workflow,
                   WorkflowExecution.status == ExecutionStatus.RUNNING.value).scalar())


def _queue(sql: Statements, workflow: str, everyone: bool):
    """The queued executions of ``workflow``, oldest first: all of them (``everyone``), or
    only those whose creating node is alive to start them."""
    query = (WorkflowExecution.select(WorkflowExecution.id, WorkflowExecution.version,
                                      WorkflowExecution.owner)
             .where(WorkflowExecution.workflow_name == workflow,
                    WorkflowExecution.status == ExecutionStatus.PENDING.value))
    if not everyone:
        query = (query.join(Node, on=(Node.id == WorkflowExecution.owner))
                 .where(Node.lease_expires_at >= SQL(sql.now)))
    return query.order_by(WorkflowExecution.started_at, WorkflowExecution.id)


def _daemon_alive(sql: Statements) -> bool:
    """Whether a live node starts any node's queued executions: a ``serve`` node or worker
    (a ``mantle run`` starts only its own)."""
    return (Node.select(Node.id)
            .where(Node.kind != "run", Node.lease_expires_at >= SQL(sql.now)).exists())


def _waiting(sql: Statements, workflow: str) -> bool:
    """Whether queued executions of ``workflow`` wait that a live node will start: those
    ``promote_queued`` counts, on any node, ahead of a new one. One nobody alive will start
    (its ``mantle run`` is gone and no daemon runs) does not hold the others back."""
    if not _queue(sql, workflow, everyone=True).exists():
        return False
    return _daemon_alive(sql) or _queue(sql, workflow, everyone=False).exists()


def finish_execution(execution_id: str, status: str, error: str | None) -> bool | Pending:
    """running -> final; False when the row is no longer running (a cancel won the race).

    Inside a journal batch the answer is Pending until the batch is written."""
    sql = Statements.of_bound()
    params = (status, storable_text(error), sql.stamp(utcnow()), execution_id)
    if sql.batch is not None:
        pending = Pending(execution_id, status)
        sql.batch.finishes.append((params, status, pending))
        return pending
    return bool(sql.run(sql.finish_execution, params))


@dataclasses.dataclass(frozen=True, slots=True)
class Failed:
    """Outcome of ``fail_execution``: whether the execution was still running (``changed``),
    and the step rows it closed ``cancelled`` at ``completed_at``, as (step, is_hook)."""

    changed: bool
    closed: tuple[tuple[str, bool], ...] = ()
    completed_at: dt.datetime | None = None


def fail_execution(execution_id: str, error: str) -> Failed:
    """End an execution ``failed`` after an engine or storage error (SPEC 13.1.12): the
    execution row, and any step row still pending or running, which becomes ``cancelled``
    (interrupted). Not ``changed`` when the execution was no longer running."""
    now = utcnow()
    sql = Statements.of_bound()
    sql.flush()
    p = sql.db.param
    closed = sql.rows(f"UPDATE step_executions SET status = 'cancelled', completed_at = {p} "
                      f"WHERE execution_id = {p} AND status IN ('pending', 'running') "
                      "RETURNING step_name, is_hook", (sql.stamp(now), execution_id))
    changed = bool(sql.run(sql.finish_execution, ("failed", storable_text(error),
                                                  sql.stamp(now), execution_id)))
    return Failed(changed, tuple((name, bool(hook)) for name, hook in closed), now)


def workflow_of(execution_id: str) -> str | None:
    """The workflow an execution runs (None for an unknown id)."""
    return (WorkflowExecution.select(WorkflowExecution.workflow_name)
            .where(WorkflowExecution.id == execution_id).scalar())


def mark_hooks_started(execution_id: str, outcome: dict) -> None:
    """Record when the hook phase began, so ``hooks.timeout`` survives a crash (13.1.11),
    and the outcome its hooks run for (``status``, ``error``, ``failed_step``), so a node
    resuming the hooks runs the same blocks and writes the same final status (4.8, 13.1.8).
    Both are written once: the first hook phase's values stay."""
    sql = Statements.of_bound()
    p = sql.db.param
    sql.run(f"UPDATE workflow_executions SET hooks_since = COALESCE(hooks_since, {sql.now}), "
            f"outcome = COALESCE(outcome, {p}) WHERE id = {p}",
            (dump_json(outcome), execution_id))


def cancel_execution(execution_id: str, actor: str) -> Cancelled | None:
    """Commit ``cancelled`` if pending/running, with every pending/running descendant
    (sub-workflows, 13.3); None for an unknown id. On PostgreSQL each cancelled id is also
    announced with ``NOTIFY mantle_cancel`` (delivered at commit) so its owner, on any host,
    interrupts it at once (13.7)."""
    Statements.of_bound().flush()  # what was submitted before the cancel comes first
    row = (WorkflowExecution.select(WorkflowExecution.status, WorkflowExecution.workflow_name,
                                    WorkflowExecution.owner)
           .where(WorkflowExecution.id == execution_id).first())
    if row is None:
        return None
    if row.status not in _ACTIVE:
        return Cancelled(row.status, row.workflow_name)
    if not _cancel_one(execution_id):  # finished between the two statements
        return cancel_execution(execution_id, actor)
    Statements.of_bound().audit(actor, "execution.cancelled", "workflow_execution",
                                execution_id, {"workflow": row.workflow_name})
    cancelled = [(execution_id, row.workflow_name, row.owner)]
    frontier = [execution_id]
    while frontier:
        children = list(WorkflowExecution.select(
            WorkflowExecution.id, WorkflowExecution.workflow_name, WorkflowExecution.owner)
            .where(WorkflowExecution.parent_execution_id.in_(frontier),
                   WorkflowExecution.status.in_(_ACTIVE)))
        frontier = [child.id for child in children if _cancel_one(child.id)]
        for child in children:
            if child.id in frontier:
                Statements.of_bound().audit("engine", "execution.cancelled",
                                            "workflow_execution", child.id,
                                            {"workflow": child.workflow_name,
                                             "parent_execution_id": execution_id})
                cancelled.append((child.id, child.workflow_name, child.owner))
    _announce([entry[0] for entry in cancelled])
    return Cancelled(row.status, row.workflow_name, tuple(cancelled))


def _cancel_one(execution_id: str) -> bool:
    return bool(WorkflowExecution.update(status=ExecutionStatus.CANCELLED.value,
                                         completed_at=utcnow())
                .where(WorkflowExecution.id == execution_id,
                       WorkflowExecution.status.in_(_ACTIVE)).execute())


def _announce(execution_ids: list[str]) -> None:
    sql = Statements.of_bound()
    if is_postgres(sql.db):
        for execution_id in execution_ids:
            sql.db.execute_sql("SELECT pg_notify('mantle_cancel', %s)", (execution_id,))


def queued_workflows() -> list[str]:
    """Workflows with executions waiting in their queue (any node's)."""
    return [row[0] for row in Statements.of_bound().rows(
        "SELECT DISTINCT workflow_name FROM workflow_executions WHERE status = 'pending'")]


@dataclasses.dataclass(frozen=True, slots=True)
class Promotion:
    """Outcome of promote_queued for one workflow: the executions started, as (id, epoch),
    and those ended ``failed`` because their version cannot be read, as (id, error)."""

    workflow: str
    started: tuple[tuple[str, int], ...] = ()
    failed: tuple[tuple[str, str], ...] = ()


def promote_queued(workflow: str, node: str, *, own_only: bool = False,
                   internal_error: Callable[[str], str]) -> Promotion:
    """Start queued executions of ``workflow`` while slots are free, oldest first across all
    nodes (FIFO, 4.9, 13.1.10): each becomes ``running`` and is owned by ``node`` under a new
    epoch. The limit is the oldest queued one's version's ``max_parallel_executions``.

    A queue head whose version is missing or cannot be read (edited by hand, written by
    another release) gives no limit to go by: it ends ``failed`` with
    ``internal_error(<reason>)`` (13.1.12), never started, and the next one heads the queue.

    ``own_only`` is for a node that exits once its own executions end and takes nothing over
    (an in-process ``mantle run``): another node's execution promoted there would be left
    ``running`` with no owner when it exits, and only a daemon could take it over. It starts
    only the queued executions it created itself, in their FIFO place among those a live node
    will start: while a daemon runs, all (it promotes any node's); else those whose creator
    is alive (a dead one's wait for a daemon)."""
    sql = Statements.of_bound()
    sql.flush()
    lock_for_update(Workflow, Workflow.name == workflow)
    queue = _queue(sql, workflow, everyone=not own_only or _daemon_alive(sql))
    failed = []
    while True:
        heads = list(queue.limit(1))  # afresh: the one before may have just failed
        if not heads:
            return Promotion(workflow, failed=tuple(failed))
        head = heads[0]
        found = _model_or_problem(workflow, head.version)
        if isinstance(found, WorkflowModel):
            break
        error = internal_error(found)
        if _fail_queued(sql, head.id, error):
            failed.append((head.id, error))
    limit = found.max_parallel_executions
    free = (limit - _running_count(workflow)) if limit > 0 else None
    if free is not None and free <= 0:
        return Promotion(workflow, failed=tuple(failed))
    p = sql.db.param
    promoted = []
    for row in list(queue.limit(free)):
        if own_only and row.owner != node:
            continue
        changed = sql.rows(
            f"UPDATE workflow_executions SET status = 'running', running_since = {sql.now}, "
            f"owner = {p}, epoch = epoch + 1 WHERE id = {p} AND status = 'pending' "
            "RETURNING epoch", (node, row.id))
        if changed:
            sql.audit("engine", "workflow.executed", "workflow_execution", row.id,
                      {"workflow": workflow, "version": row.version})
            sql.audit("engine", "execution.promoted", "workflow_execution", row.id,
                      {"workflow": workflow})
            promoted.append((row.id, changed[0][0]))
    return Promotion(workflow, tuple(promoted), tuple(failed))


def _model_or_problem(workflow: str, version: int) -> WorkflowModel | str:
    """The model of a stored version, or why there is none: the version is missing, or
    stored in a form this code cannot read (a row edited by hand, a definition from
    another release)."""
    try:
        found = stored_version(workflow, version)
    except PeeweeException:
        raise
    except Exception as exc:  # parsing the stored definition, not the database
        return (f"cannot read workflow {workflow!r} version {version}: "
                f"{type(exc).__name__}: {exc}")
    if found is None:
        return str(VersionNotFound(workflow, version))
    return found[1]


def _fail_queued(sql: Statements, execution_id: str, error: str) -> bool:
    """End a queued execution ``failed`` without starting it; False when it was no longer
    queued (a cancel committed first). It holds no slot and no step ran."""
    p = sql.db.param
    return bool(sql.run(
        f"UPDATE workflow_executions SET status = 'failed', error = {p}, "
        f"completed_at = {sql.now} WHERE id = {p} AND status = 'pending'",
        (storable_text(error), execution_id)))


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """What starting or resuming an execution needs; ``error`` says why it cannot start."""

    execution: dict
    model: WorkflowModel | None
    rows: list[dict]
    error: str | None = None


def execution_snapshot(execution_id: str) -> Snapshot | None:
    """The execution, the model of its version and its step rows; None for an unknown id.
    A version that is missing, or stored in a form this code cannot read (a row edited by
    hand, a definition from another release), gives a snapshot with ``error`` set."""
    Statements.of_bound().flush()
    execution = WorkflowExecution.get_or_none(WorkflowExecution.id == execution_id)
    if execution is None:
        return None
    model = _model_or_problem(execution.workflow_name, execution.version)
    if isinstance(model, str):
        return Snapshot(execution_row(execution), None, [], model)
    rows = [{"step": r.step_name, "attempt": r.attempt, "status": r.status,
             "hook_block": r.hook_block, "is_hook": r.is_hook, "output": r.output,
             "error": r.error, "started_at": r.started_at, "completed_at": r.completed_at,
             "wait_kind": r.wait_kind, "wait_until": r.wait_until, "progress": r.progress}
            for r in StepExecution.select().where(StepExecution.execution_id == execution_id)
            .order_by(StepExecution.id)]
    return Snapshot(execution_row(execution), model, rows)


def final_results(execution_ids: list[str]) -> dict[str, dict]:
    """The outcome of each of ``execution_ids`` that is final, as a ``workflow/run`` step
    reports it (13.3): ``execution_id``, ``status``, ``error`` and ``steps`` (each main
    step's latest ``output`` and ``error``)."""
    if not execution_ids:
        return {}
    Statements.of_bound().flush()
    final = list(WorkflowExecution.select(WorkflowExecution.id, WorkflowExecution.status,
                                          WorkflowExecution.error)
                 .where(WorkflowExecution.id.in_(execution_ids),
                        WorkflowExecution.status.not_in(_ACTIVE)))
    results = {row.id: {"execution_id": row.id, "status": row.status,
                        "error": row.error if row.status == "failed" else None, "steps": {}}
               for row in final}
    if results:
        rows = (StepExecution.select(StepExecution.execution_id, StepExecution.step_name,
                                     StepExecution.output, StepExecution.error,
                                     StepExecution.status)
                .where(StepExecution.execution_id.in_(list(results)),
                       StepExecution.is_hook == False)  # noqa: E712 - SQL, not Python
                .order_by(StepExecution.attempt))
        for row in rows:  # later attempts overwrite earlier ones
            results[row.execution_id]["steps"][row.step_name] = {
                "output": None if row.status == "skipped" else row.output,
                "error": row.error if row.status == "failed" else None}
    return results


def copy_steps(execution_id: str, rows: list[dict]) -> None:
    """Store reused step results in a retry execution (``mantle retry``)."""
    Statements.of_bound().flush()  # the execution row first (foreign key)
    for row in rows:
        StepExecution.insert(execution_id=execution_id, step_name=row["step"],
                             attempt=row["attempt"], is_hook=False, status=row["status"],
                             output=row["output"], error=row["error"],
                             started_at=row["started_at"],
                             completed_at=row["completed_at"]).execute()
