"""Execution events derived from the audit trail (SPEC 13.8; migration 005).

The engine writes its audit rows in the same transactions as the state they describe, and
migration 005 adds an ``execution.finished`` row whenever an execution's status becomes final.
So the audit table, read in ``id`` order, is the event log of every execution, whichever
process or host owns it. This module turns its rows into the five events of the stream:

=====================  ===================================================================
``execution.started``  ``workflow.executed`` (the execution got a slot and runs)
``step.started``       ``step.started`` / ``hook.step.started``
``step.finished``      ``step.completed``, ``step.skipped``, ``step.failed`` (hooks alike)
``step.retrying``      a ``step.failed`` followed by the next attempt's ``step.started``
``execution.finished`` ``execution.finished``, placed after the execution's last row
=====================  ===================================================================

Event ids are positions in the audit table: ``2 * <row id>`` for a row's event; the
``execution.finished`` row is written during the transaction that ends the execution, before
the engine's own rows of that transaction (audit rows are inserted at its end), so its event
takes the position right after the execution's last row: ``2 * <that row's id> + 1``. Ids
therefore increase along a stream, and a stream resumed after id ``n`` continues with rows
whose id is above ``n // 2`` (and a finish whose position is above ``n``).

Reads only; the shared poller that follows the table is ``web.events``.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Iterable

from mantle.db import database_proxy, is_postgres, unwrap
from mantle.db.migrations.m005_execution_events import (EXECUTION_KEY_POSTGRES,
                                                       EXECUTION_KEY_SQLITE)
from mantle.db.models import AuditEvent, WorkflowExecution
from mantle.timefmt import rfc3339

__all__ = ["Event", "Row", "Translator", "execution_history", "rows_after", "last_row_id",
           "last_execution_row", "finished_rows_between", "KINDS", "FINAL"]

KINDS = ("execution.started", "step.started", "step.finished", "step.retrying",
         "execution.finished")
FINAL = ("completed", "failed", "cancelled")
_STARTED = {"step.started": False, "hook.step.started": True}
_FINISHED = {"step.completed": ("completed", False), "step.skipped": ("skipped", False),
             "step.failed": ("failed", False), "hook.step.completed": ("completed", True),
             "hook.step.failed": ("failed", True)}
_COLUMNS = "id, timestamp, action, resource_type, resource_id, metadata"


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One audit row as read here (``metadata`` decoded)."""

    id: int
    time: object
    action: str
    resource_type: str
    resource_id: str
    metadata: dict


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """``id``: the stream position (module docstring); ``data``: the SSE data object."""

    id: int
    kind: str
    execution_id: str
    workflow: str | None
    data: dict


def _key_sql() -> str:
    database = unwrap(database_proxy)
    return EXECUTION_KEY_POSTGRES if is_postgres(database) else EXECUTION_KEY_SQLITE


def _execute(sql: str, params: tuple) -> list[tuple]:
    database = unwrap(database_proxy)
    return database.execute_sql(sql.replace("?", database.param), params).fetchall()


def _rows(raw: Iterable[tuple]) -> list[Row]:
    when, decode = AuditEvent.timestamp.python_value, AuditEvent.metadata.python_value
    rows = []
    for row_id, time, action, resource_type, resource_id, metadata in raw:
        try:
            decoded = decode(metadata) if metadata else {}
        except ValueError:
            decoded = {}
        rows.append(Row(row_id, when(time), action, resource_type, resource_id,
                        decoded if isinstance(decoded, dict) else {}))
    return rows


def last_row_id() -> int:
    """The highest audit row id (0 when there is none)."""
    return _execute("SELECT COALESCE(MAX(id), 0) FROM audit_events", ())[0][0]


def ids_between(low: int, high: int) -> list[int]:
    """The audit row ids above ``low`` up to ``high``, in order."""
    return [row[0] for row in _execute(
        "SELECT id FROM audit_events WHERE id > ? AND id <= ? ORDER BY id", (low, high))]


def rows_after(after: int, limit: int = 1000) -> list[Row]:
    """Audit rows with an id above ``after``, in id order."""
    return _rows(_execute(f"SELECT {_COLUMNS} FROM audit_events WHERE id > ? ORDER BY id "
                          "LIMIT ?", (after, limit)))


def _execution_rows(execution_id: str, after: int, upto: int | None) -> list[Row]:
    sql = f"SELECT {_COLUMNS} FROM audit_events WHERE {_key_sql()} = ? AND id > ?"
    params: tuple = (execution_id, after)
    if upto is not None:
        sql += " AND id <= ?"
        params += (upto,)
    return _rows(_execute(sql + " ORDER BY id", params))


def last_execution_row(execution_id: str) -> int:
    return _execute(f"SELECT COALESCE(MAX(id), 0) FROM audit_events WHERE {_key_sql()} = ?",
                    (execution_id,))[0][0]


def _retried(row: Row, hook: bool) -> bool:
    """Whether the attempt that failed in ``row`` was followed by another (the engine writes
    the failure and the next attempt's start in one transaction)."""
    started = "hook.step.started" if hook else "step.started"
    found = _execute(f"SELECT id FROM audit_events WHERE {_key_sql()} = ? AND id > ? "
                     "AND action = ? AND resource_id = ? LIMIT 1",
                     (row.metadata.get("execution_id"), row.id, started, row.resource_id))
    return bool(found)


def finished_rows_between(low: int, high: int) -> list[Row]:
    """``execution.finished`` rows with ``low < id <= high`` (a resumed global stream looks
    back for finishes placed after its resume point)."""
    return _rows(_execute(f"SELECT {_COLUMNS} FROM audit_events WHERE id > ? AND id <= ? "
                          "AND action = 'execution.finished' ORDER BY id", (low, high)))


class Translator:
    """Turns audit rows, fed in id order, into events.

    Keeps the workflow of recent executions (an LRU of ``cache`` entries) and the finishes
    waiting for their position (``execution.finished`` placed after a later row). Used by one
    thread at a time.
    """

    def __init__(self, cache: int = 10000):
        self._workflows: OrderedDict[str, str] = OrderedDict()
        self._cache = cache
        self._waiting: dict[int, list[Event]] = {}

    def remember(self, execution_id: str, workflow: str) -> None:
        self._workflows[execution_id] = workflow
        self._workflows.move_to_end(execution_id)
        if len(self._workflows) > self._cache:
            self._workflows.popitem(last=False)

    def _workflow_of(self, rows: list[Row]) -> None:
        """Look up, in one query, the workflows of executions not seen before."""
        missing = {row.metadata.get("execution_id") for row in rows
                   if row.action in _STARTED or row.action in _FINISHED}
        missing = [x for x in missing if isinstance(x, str) and x not in self._workflows]
        for start in range(0, len(missing), 500):
            chunk = missing[start:start + 500]
            for execution_id, workflow in (
                    WorkflowExecution.select(WorkflowExecution.id,
                                             WorkflowExecution.workflow_name)
                    .where(WorkflowExecution.id.in_(chunk)).tuples()):
                self.remember(execution_id, workflow)

    def expect_finish(self, finish: Row, passed: int) -> list[Event]:
        """A finish row that lies before this translator's first row (a resumed stream): its
        event if its position is not after row ``passed``, else kept for its position."""
        return self._finish(finish, passed)

    def finish_event(self, row: Row, last: int) -> Event:
        """The ``execution.finished`` event of finish row ``row``, placed after row
        ``last`` (the execution's last row)."""
        execution_id = row.resource_id
        workflow = row.metadata.get("workflow")
        if isinstance(workflow, str):
            self.remember(execution_id, workflow)
        data = {"execution_id": execution_id, "workflow": workflow,
                "status": row.metadata.get("status"), "error": row.metadata.get("error"),
                "time": rfc3339(row.time)}
        return Event(2 * last + 1, "execution.finished", execution_id, workflow, data)

    def feed(self, rows: list[Row], upto: int | None = None) -> list[Event]:
        """Events of ``rows`` (in id order), each finish at its position."""
        self._workflow_of(rows)
        events: list[Event] = []
        for index, row in enumerate(rows):
            event = self._translate(row, rows, index)
            if event is not None:
                events.append(event)
            if row.action == "execution.finished":
                events.extend(self._finish(row, passed=row.id))
            events.extend(self._waiting.pop(row.id, ()))
        return events

    def _finish(self, row: Row, passed: int) -> list[Event]:
        last = max(row.id, last_execution_row(row.resource_id))
        event = self.finish_event(row, last)
        if last <= passed:
            return [event]
        self._waiting.setdefault(last, []).append(event)
        return []

    def _translate(self, row: Row, rows: list[Row], index: int) -> Event | None:
        action = row.action
        if action == "workflow.executed":
            workflow = row.metadata.get("workflow")
            if isinstance(workflow, str):
                self.remember(row.resource_id, workflow)
            return Event(2 * row.id, "execution.started", row.resource_id, workflow,
                         {"execution_id": row.resource_id, "workflow": workflow,
                          "version": row.metadata.get("version"), "time": rfc3339(row.time)})
        if action not in _STARTED and action not in _FINISHED:
            return None
        execution_id = row.metadata.get("execution_id")
        if not isinstance(execution_id, str):
            return None
        workflow = self._workflows.get(execution_id)
        data = {"execution_id": execution_id, "workflow": workflow, "step": row.resource_id}
        hook = _STARTED.get(action, _FINISHED.get(action, (None, False))[1])
        if hook:
            data["block"] = row.metadata.get("hook_block")
        elif "attempt" in row.metadata:
            data["attempt"] = row.metadata["attempt"]
        if action in _STARTED:
            kind = "step.started"
        else:
            status, _ = _FINISHED[action]
            kind = "step.finished"
            if status == "failed":
                if self._retried_in(row, rows, index, hook):
                    kind = "step.retrying"
                data["error"] = row.metadata.get("error")
            if kind == "step.finished":
                data["status"] = status
        data["time"] = rfc3339(row.time)
        return Event(2 * row.id, kind, execution_id, workflow, data)

    @staticmethod
    def _retried_in(row: Row, rows: list[Row], index: int, hook: bool) -> bool:
        started = "hook.step.started" if hook else "step.started"
        execution_id = row.metadata.get("execution_id")
        for later in rows[index + 1:]:
            if (later.action == started and later.resource_id == row.resource_id
                    and later.metadata.get("execution_id") == execution_id):
                return True
        return _retried(row, hook)


def execution_history(execution_id: str, workflow: str, after: int,
                      upto: int | None) -> tuple[list[Event], bool]:
    """The events of one execution positioned after ``after``, from its rows with an id up to
    ``upto`` (None: all), and whether its ``execution.finished`` is among them or was before
    ``after`` (then the stream is over). A finish placed after ``upto`` is left out: the live
    poller, which has passed ``upto``, delivers it."""
    translator = Translator()
    translator.remember(execution_id, workflow)
    rows = _execution_rows(execution_id, after // 2, upto)
    events = [event for event in translator.feed(rows) if event.id > after]
    finish = _finish_row(execution_id)
    if finish is None:
        return events, False
    last = max(finish.id, last_execution_row(execution_id))
    if upto is not None and last > upto:
        return events, False
    if finish.id <= after // 2 and 2 * last + 1 > after:  # its row lies before the rows read
        events.append(translator.finish_event(finish, last))
    return events, True


def _finish_row(execution_id: str) -> Row | None:
    found = _rows(_execute(f"SELECT {_COLUMNS} FROM audit_events WHERE {_key_sql()} = ? "
                           "AND action = 'execution.finished' ORDER BY id DESC LIMIT 1",
                           (execution_id,)))
    return found[0] if found else None
