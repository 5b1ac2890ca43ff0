"""The execution list (SPEC 7.4, 6.2): newest first by stored microseconds, then id; API times
as RFC 3339 milliseconds. SQLite builds the page as one JSON row: the same answer as a plain
query, which PostgreSQL and the CLI's raw form use."""

from __future__ import annotations

import datetime as dt

from mantle import queries
from mantle.db.models import WorkflowExecution
from mantle.timefmt import rfc3339

BASE = dt.datetime(2026, 3, 18, 9, 0, 0, 412000)


def _execution(uid: str, started: dt.datetime, completed: dt.datetime | None, **fields):
    WorkflowExecution.create(id=uid, workflow_name=fields.get("workflow", "w"), version=1,
                             status=fields.get("status", "completed"), inputs={},
                             trigger={"type": "manual"}, started_at=started,
                             completed_at=completed, runner="r:1")


def test_the_list_orders_by_microseconds_then_id_and_formats_times_like_the_detail(db):
    same_ms_later = BASE + dt.timedelta(microseconds=900)  # same millisecond, later instant
    _execution("00000000-0000-4000-8000-000000000001", same_ms_later, None, status="running")
    _execution("00000000-0000-4000-8000-000000000002", BASE, BASE + dt.timedelta(seconds=1))
    _execution("00000000-0000-4000-8000-000000000003", BASE, BASE + dt.timedelta(seconds=2))
    _execution("00000000-0000-4000-8000-000000000004", BASE - dt.timedelta(days=1), BASE,
               workflow="other")
    page = queries.list_executions()
    assert [row["id"][-1] for row in page] == ["1", "3", "2", "4"]
    assert page[0] == {"id": "00000000-0000-4000-8000-000000000001", "workflow": "w",
                       "version": 1, "status": "running",
                       "started_at": "2026-03-18T09:00:00.412Z", "completed_at": None,
                       "parent_execution_id": None, "parent_step": None}
    assert page[1]["completed_at"] == "2026-03-18T09:00:02.412Z"
    raw = queries.list_executions(raw=True)  # the CLI's form: the same rows as datetimes
    assert [(r["id"], rfc3339(r["started_at"]), rfc3339(r["completed_at"])) for r in raw] == \
        [(r["id"], r["started_at"], r["completed_at"]) for r in page]


def test_the_list_filters_and_limits_before_building_the_page(db):
    for index in range(5):
        _execution(f"00000000-0000-4000-8000-00000000000{index}",
                   BASE + dt.timedelta(seconds=index), None,
                   status="running" if index % 2 else "completed")
    assert [r["id"][-1] for r in queries.list_executions(status="running")] == ["3", "1"]
    assert [r["id"][-1] for r in queries.list_executions(workflow="w", limit=2)] == ["4", "3"]
    assert queries.list_executions(workflow="none") == []
