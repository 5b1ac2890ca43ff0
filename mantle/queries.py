"""Read-side queries shared by the CLI and the REST API (SPEC 6.2, 7.4, 13.8).

Each returns the API shape (RFC 3339 strings, ``null``s as None) so both front ends show the
same data; ``raw=True`` variants keep datetimes for the CLI's own formatting. The API shape
bounds step outputs (``OUTPUT_LIMIT``); ``step_output`` gives one whole.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid

from peewee import Cast

from mantle.db import database_proxy, is_sqlite, unwrap
from mantle.db.fields import storable, utcnow
from mantle.db.models import StepExecution, WorkflowExecution
from mantle.errors import ExecutionNotFound, InvalidInput, MantleError
from mantle.store.executions import child_hook_block
from mantle.store.versions import model_of
from mantle.timefmt import rfc3339
from mantle.workflow import Workflow

__all__ = ["execution_detail", "list_executions", "list_page", "step_output", "is_uuid",
           "workflow_version_model", "InvalidCursor", "StepNotFound", "OUTPUT_LIMIT",
           "CURSOR_PATTERN"]

_FINAL = ("completed", "failed", "cancelled")
# A step output whose JSON is larger than this many bytes is shown in the API's detail as
# ``{"truncated": true, "size": <bytes>}`` (SPEC 13.8).
OUTPUT_LIMIT = 64 * 1024


# What ``next_cursor`` looks like (the OpenAPI document gives the same pattern).
CURSOR_PATTERN = re.compile(
    r"([1-9][0-9]{3})(0[1-9]|1[0-2])(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3])([0-5][0-9])"
    r"([0-5][0-9])\.([0-9]{6})Z_([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


class InvalidCursor(InvalidInput):
    def __init__(self) -> None:
        super().__init__("invalid cursor")


class StepNotFound(MantleError):
    def __init__(self, step: str):
        super().__init__(f'step "{step}" not found')
        self.step = step


def is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except (ValueError, AttributeError, TypeError):
        return False


def workflow_version_model(workflow: str, version: int) -> Workflow:
    """The model of a stored version (the process's one cache, ``mantle.store.versions``)."""
    return model_of(workflow, version)


def _summary(row: WorkflowExecution, raw: bool) -> dict:
    when = (lambda v: v) if raw else rfc3339
    return {"id": row.id, "workflow": row.workflow_name, "version": row.version,
            "status": row.status, "started_at": when(row.started_at),
            "completed_at": when(row.completed_at),
            "parent_execution_id": row.parent_execution_id, "parent_step": row.parent_step}


def list_executions(workflow: str | None = None, status: str | None = None,
                    since: float | None = None, limit: int = 20, raw: bool = False) -> list:
    """Newest first; ``since`` in seconds before now."""
    return [row for row, _ in _page(workflow, status, since, limit, raw, None)]


def list_page(workflow: str | None = None, status: str | None = None,
              since: float | None = None, limit: int = 20,
              cursor: str | None = None) -> tuple[list[dict], str | None]:
    """One page of the API's list and the cursor of the next one (None on the last page).

    Keyset pagination on the list's order (``started_at``, ``id``, newest first): a page
    continues strictly after the last row of the one before, so rows inserted meanwhile
    never make a page repeat or skip a row that existed when the walk began.
    """
    after = None if cursor is None else _decode_cursor(cursor)
    rows = _page(workflow, status, since, limit + 1, False, after)
    if len(rows) <= limit:
        return [row for row, _ in rows], None
    rows = rows[:limit]
    # The page shows milliseconds; the position is the stored microseconds, read with the page
    # (a second read could find the row deleted by retention meanwhile).
    last, started = rows[-1]
    return [row for row, _ in rows], _encode_cursor(started, last["id"])


def _encode_cursor(started: dt.datetime, execution_id: str) -> str:
    return f"{started.strftime('%Y%m%dT%H%M%S.%f')}Z_{execution_id}"


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    """(started_at, id) of the row a page continues after; InvalidCursor for anything else.

    A cursor is a position in the list's order, ``<started_at, ISO 8601 basic, UTC>_<id>``
    (``20260318T090000.412345Z_5c0f8a52-...``): any such position is a valid place to
    continue from, so a day past its month's end counts on into the next month.
    """
    match = CURSOR_PATTERN.fullmatch(cursor)
    if match is None:
        raise InvalidCursor()
    year, month, day, hour, minute, second, micro, execution_id = match.groups()
    started = (dt.datetime(int(year), int(month), 1, int(hour), int(minute), int(second),
                           int(micro)) + dt.timedelta(days=int(day) - 1))
    return started, execution_id


def _page(workflow, status, since, limit: int, raw: bool,
          after) -> list[tuple[dict, dt.datetime]]:
    """The page's summaries, each with its stored ``started_at`` (a cursor's position)."""
    if workflow is not None and not storable(workflow):
        return []  # no workflow has that name
    query = WorkflowExecution.select(
        WorkflowExecution.id, WorkflowExecution.workflow_name, WorkflowExecution.version,
        WorkflowExecution.status, WorkflowExecution.started_at, WorkflowExecution.completed_at,
        WorkflowExecution.parent_execution_id, WorkflowExecution.parent_step)
    if workflow is not None:
        query = query.where(WorkflowExecution.workflow_name == workflow)
    if status is not None:
        query = query.where(WorkflowExecution.status == status)
    if since is not None:
        query = query.where(WorkflowExecution.started_at >= utcnow() - dt.timedelta(seconds=since))
    if after is not None:
        started, execution_id = after
        query = query.where((WorkflowExecution.started_at < started)
                            | ((WorkflowExecution.started_at == started)
                               & (WorkflowExecution.id < execution_id)))
    query = query.order_by(WorkflowExecution.started_at.desc(), WorkflowExecution.id.desc())
    query = query.limit(limit)
    database = unwrap(database_proxy)
    if is_sqlite(database) and not raw:
        return _sqlite_page(database, query)
    return [(_summary(row, raw), row.started_at) for row in query]


def _sqlite_page(database, query) -> list[tuple[dict, dt.datetime]]:
    """The page as one row of JSON built by SQLite.

    The sqlite3 module lets go of the GIL for every row it steps through and must queue to get
    it back behind the daemon's other threads: fifty rows, fifty waits. One row holding the
    whole page waits once; under load that cut the list endpoint's tail latency (issue 6).
    Stored times are fixed-width UTC text, so the API's form is a slice of them.
    """
    sql, params = query.sql()
    rows = database.execute_sql(
        "SELECT json_group_array(json_array(id, workflow_name, version, status, started_at, "
        f"completed_at, parent_execution_id, parent_step)) FROM ({sql})",
        params).fetchone()[0]
    found = json.loads(rows)
    # An aggregate's input order is not promised on this SQLite version: sort again, on the
    # stored microseconds as the query did.
    found.sort(key=lambda row: (row[4], row[0]), reverse=True)
    return [({"id": i, "workflow": w, "version": v, "status": st,
              "started_at": _stored_time(started), "completed_at": _stored_time(completed),
              "parent_execution_id": parent, "parent_step": parent_step},
             dt.datetime.fromisoformat(started))
            for i, w, v, st, started, completed, parent, parent_step in found]


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
    rows = _step_rows(execution_id)
    detail["steps"] = _steps(model, rows, row.status, raw)
    detail["hooks"] = _hooks(rows, raw)
    detail["children"] = _children(execution_id, raw)
    return detail


def _children(execution_id: str, raw: bool) -> list[dict]:
    """The sub-workflow executions this one started (SPEC 13.3), oldest first; for the CLI
    (``raw``) also the hook block whose step started each (``parent_block``, None for a
    main step), as ``parent_step`` alone cannot tell a hook from a main step of its name."""
    children = []
    for child in (WorkflowExecution.select(
            WorkflowExecution.id, WorkflowExecution.workflow_name, WorkflowExecution.status,
            WorkflowExecution.parent_step, WorkflowExecution.idempotency_key)
            .where(WorkflowExecution.parent_execution_id == execution_id)
            .order_by(WorkflowExecution.started_at, WorkflowExecution.id)):
        entry = {"id": child.id, "workflow": child.workflow_name, "status": child.status,
                 "parent_step": child.parent_step}
        if raw:
            entry["parent_block"] = child_hook_block(execution_id, child.idempotency_key)
        children.append(entry)
    return children


def _step_rows(execution_id: str, name: str | None = None) -> list[StepExecution]:
    """Attempt rows in insertion order, with ``output_text``: the stored JSON text, so that
    an output too large to show is never parsed."""
    S = StepExecution
    query = S.select(S.id, S.step_name, S.attempt, S.status, S.is_hook, S.hook_block, S.error,
                     S.started_at, S.completed_at, Cast(S.output, "TEXT").alias("output_text")
                     ).where(S.execution_id == execution_id)
    if name is not None:
        query = query.where(S.step_name == name)
    return list(query.order_by(S.id))


def _output(text: str | None, raw: bool):
    """The stored output: whole for the CLI (``raw``), else bounded to OUTPUT_LIMIT bytes."""
    if text is None:
        return None
    if not raw:
        size = len(text.encode("utf-8"))
        if size > OUTPUT_LIMIT:
            return {"truncated": True, "size": size}
    return json.loads(text)


def step_output(execution_id: str, step: str):
    """The whole stored output of the latest attempt of ``step`` (a main step, else a hook
    step of that name); None when it has none. ExecutionNotFound / StepNotFound."""
    if not is_uuid(execution_id):
        raise ExecutionNotFound(execution_id)
    row = (WorkflowExecution.select(WorkflowExecution.workflow_name, WorkflowExecution.version)
           .where(WorkflowExecution.id == execution_id).first())
    if row is None:
        raise ExecutionNotFound(execution_id)
    model = workflow_version_model(row.workflow_name, row.version)
    hook = step not in {spec.name for spec in model.steps}
    hooks = model.hooks.on_success + model.hooks.on_failure + model.hooks.on_finish
    if hook and step not in {spec.name for spec in hooks}:
        raise StepNotFound(step)
    latest = _latest(_step_rows(execution_id, step), is_hook=hook).get(step)
    if latest is None or latest.status == "skipped":
        return None
    return _output(latest.output_text, raw=True)


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
            "output": None if row.status == "skipped" else _output(row.output_text, raw)}


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
