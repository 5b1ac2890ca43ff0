"""Read-side queries shared by the CLI and the REST API (SPEC 6.2, 7.4).

Each returns the API shape (RFC 3339 strings, ``null``s as None) so both front ends show the
same data; ``raw=True`` variants keep datetimes for the CLI's own formatting.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import uuid

from mantle.db import database_proxy, is_sqlite, unwrap
from mantle.db.fields import storable, utcnow
from mantle.db.models import StepExecution, WorkflowDefinition, WorkflowExecution
from mantle.errors import ExecutionNotFound
from mantle.timefmt import rfc3339
from mantle.workflow import Workflow, workflow_from_definition

__all__ = ["execution_detail", "list_executions", "is_uuid", "workflow_version_model"]

_FINAL = ("completed", "failed", "cancelled")


def is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except (ValueError, AttributeError, TypeError):
        return False


@functools.lru_cache(maxsize=256)
def _model(workflow: str, version: int, content_hash: str) -> Workflow:
    row = WorkflowDefinition.get(WorkflowDefinition.workflow_name == workflow,
                                 WorkflowDefinition.version == version)
    return workflow_from_definition(row.definition)


def workflow_version_model(workflow: str, version: int) -> Workflow:
    """The model of a stored version (cached; versions are immutable)."""
    digest = (WorkflowDefinition.select(WorkflowDefinition.content_hash)
              .where(WorkflowDefinition.workflow_name == workflow,
                     WorkflowDefinition.version == version).scalar())
    return _model(workflow, version, digest or "")


def _summary(row: WorkflowExecution, raw: bool) -> dict:
    when = (lambda v: v) if raw else rfc3339
    return {"id": row.id, "workflow": row.workflow_name, "version": row.version,
            "status": row.status, "started_at": when(row.started_at),
            "completed_at": when(row.completed_at)}


def list_executions(workflow: str | None = None, status: str | None = None,
                    since: float | None = None, limit: int = 20, raw: bool = False) -> list:
    """Newest first; ``since`` in seconds before now."""
    if workflow is not None and not storable(workflow):
        return []  # no workflow has that name
    query = WorkflowExecution.select(
        WorkflowExecution.id, WorkflowExecution.workflow_name, WorkflowExecution.version,
        WorkflowExecution.status, WorkflowExecution.started_at, WorkflowExecution.completed_at)
    if workflow is not None:
        query = query.where(WorkflowExecution.workflow_name == workflow)
    if status is not None:
        query = query.where(WorkflowExecution.status == status)
    if since is not None:
        query = query.where(WorkflowExecution.started_at >= utcnow() - dt.timedelta(seconds=since))
    query = query.order_by(WorkflowExecution.started_at.desc(), WorkflowExecution.id.desc())
    query = query.limit(limit)
    database = unwrap(database_proxy)
    if is_sqlite(database) and not raw:
        return _sqlite_page(database, query)
    return [_summary(row, raw) for row in query]


def _sqlite_page(database, query) -> list[dict]:
    """The page as one row of JSON built by SQLite.

    The sqlite3 module lets go of the GIL for every row it steps through and must queue to get
    it back behind the daemon's other threads: fifty rows, fifty waits. One row holding the
    whole page waits once; under load that cut the list endpoint's tail latency (issue 6).
    Stored times are fixed-width UTC text, so the API's form is a slice of them.
    """
    sql, params = query.sql()
    rows = database.execute_sql(
        "SELECT json_group_array(json_array(id, workflow_name, version, status, started_at, "
        f"completed_at)) FROM ({sql})", params).fetchone()[0]
    found = json.loads(rows)
    # An aggregate's input order is not promised on this SQLite version: sort again, on the
    # stored microseconds as the query did.
    found.sort(key=lambda row: (row[4], row[0]), reverse=True)
    return [{"id": i, "workflow": w, "version": v, "status": st,
             "started_at": _stored_time(started), "completed_at": _stored_time(completed)}
            for i, w, v, st, started, completed in found]


def _stored_time(text: str | None) -> str | None:
    """``2026-03-18 09:00:00.412345`` (SQLITE_DATETIME_FORMAT) -> ``2026-03-18T09:00:00.412Z``."""
    return None if text is None else f"{text[:10]}T{text[11:23]}Z"


def execution_detail(execution_id: str, raw: bool = False) -> dict:
    """The 7.4 detail document; raises ExecutionNotFound for unknown or non-UUID ids."""
    if not is_uuid(execution_id):
        raise ExecutionNotFound(execution_id)
    row = WorkflowExecution.get_or_none(WorkflowExecution.id == execution_id)
    if row is None:
        raise ExecutionNotFound(execution_id)
    detail = _summary(row, raw)
    detail["inputs"] = row.inputs or {}
    detail["error"] = row.error if row.status == "failed" else None
    model = workflow_version_model(row.workflow_name, row.version)
    rows = list(StepExecution.select().where(StepExecution.execution_id == execution_id)
                .order_by(StepExecution.id))
    detail["steps"] = _steps(model, rows, row.status, raw)
    detail["hooks"] = _hooks(rows, raw)
    return detail


def _latest(rows, is_hook: bool) -> dict[str, StepExecution]:
    latest: dict[str, StepExecution] = {}
    for step in rows:
        if step.is_hook == is_hook:
            seen = latest.get(step.step_name)
            if seen is None or step.attempt >= seen.attempt:
                latest[step.step_name] = step
    return latest


def _step_doc(row: StepExecution | None, name: str, execution_status: str, raw: bool) -> dict:
    when = (lambda v: v) if raw else rfc3339
    if row is None:
        status = "cancelled" if execution_status in _FINAL else "pending"
        return {"name": name, "status": status, "attempt": 0, "started_at": None,
                "completed_at": None, "error": None, "output": None}
    return {"name": name, "status": row.status, "attempt": row.attempt,
            "started_at": when(row.started_at), "completed_at": when(row.completed_at),
            "error": row.error if row.status == "failed" else None,
            "output": None if row.status == "skipped" else row.output}


def _steps(model: Workflow, rows, execution_status: str, raw: bool) -> list[dict]:
    latest = _latest(rows, is_hook=False)
    order = {spec.name: index for index, spec in enumerate(model.steps)}
    never = dt.datetime.max

    def key(spec):
        row = latest.get(spec.name)
        started = row.started_at if row is not None and row.started_at else None
        return (started is None, started or never, order[spec.name])

    return [_step_doc(latest.get(spec.name), spec.name, execution_status, raw)
            for spec in sorted(model.steps, key=key)]


def _hooks(rows, raw: bool) -> list[dict]:
    latest = _latest(rows, is_hook=True)
    first_seen = {}
    for step in rows:
        if step.is_hook:
            first_seen.setdefault(step.step_name, step.id)
    hooks = []
    for name in sorted(latest, key=first_seen.get):
        doc = _step_doc(latest[name], name, "", raw)
        doc["block"] = latest[name].hook_block
        hooks.append(doc)
    return hooks
