"""``GET /api/v1/executions[/{id}]`` and ``/api/v1/workflows...`` (SPEC 7.4, 7.5), on SQLite
and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import re

from mantle import definitions
from mantle.db.models import WorkflowExecution
from tests.web.support import apply_yaml

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

REPORT = """
    name: daily-report
    inputs:
      day: {type: string}
      unused: {type: number}
    steps:
      - name: fetch-metrics
        action: core/log
        params: {message: {count: 42}}
      - name: announce
        action: core/log
        if: "steps.fetch-metrics.output.message.count == 42"
        params: {message: "{{ steps.fetch-metrics.output.message.count }} events on {{ inputs.day }}"}
      - name: skipped
        action: core/log
        if: "false"
        depends_on: [announce]
        params: {message: never}
    hooks:
      on_success:
        - {name: notify, action: core/log, params: {message: "done {{ execution.workflow_name }}"}}
      on_finish:
        - {name: unlock, action: core/fail, continue_on_error: true}
"""


def _run(client, engine, workflow: str, inputs=None) -> str:
    reply = client.simulate_post(f"/api/v1/run/{workflow}", json={"inputs": inputs or {}})
    assert reply.status_code == 202, reply.text
    execution_id = reply.json["execution_id"]
    assert engine.wait(execution_id, timeout=10) is not None
    return execution_id


def test_detail_shows_steps_in_start_order_with_outputs_errors_and_hooks(client, engine):
    apply_yaml(REPORT)
    execution_id = _run(client, engine, "daily-report", {"day": "2026-03-17"})
    reply = client.simulate_get(f"/api/v1/executions/{execution_id}")
    assert reply.status_code == 200
    detail = reply.json
    assert list(detail) == ["id", "workflow", "version", "status", "started_at",
                            "completed_at", "parent_execution_id", "parent_step", "inputs",
                            "error", "steps", "hooks", "children"]
    assert {k: detail[k] for k in ("id", "workflow", "version", "status", "inputs", "error")} \
        == {"id": execution_id, "workflow": "daily-report", "version": 1,
            "status": "completed", "inputs": {"day": "2026-03-17"}, "error": None}
    assert RFC3339.match(detail["started_at"]) and RFC3339.match(detail["completed_at"])
    steps = detail["steps"]
    assert [(s["name"], s["status"], s["attempt"], s["error"], s["output"]) for s in steps] == [
        ("fetch-metrics", "completed", 1, None, {"message": {"count": 42}}),
        ("announce", "completed", 1, None, {"message": "42 events on 2026-03-17"}),
        ("skipped", "skipped", 1, None, None),
    ]
    for step in steps:
        assert list(step) == ["name", "status", "attempt", "started_at", "completed_at",
                              "error", "output"]
        assert RFC3339.match(step["started_at"]) and RFC3339.match(step["completed_at"])
    hooks = detail["hooks"]
    assert [(h["block"], h["name"], h["status"], h["error"]) for h in hooks] == [
        ("on_success", "notify", "completed", None),
        ("on_finish", "unlock", "failed", "failed by core/fail"),
    ]
    assert hooks[0]["output"] == {"message": "done daily-report"}


def test_detail_of_an_unknown_or_malformed_id_is_404(client):
    for execution_id in ("5c0f8a52-3b7e-4c1e-9a43-0d2b7f0e6a11", "nope", "5C0F8A52"):
        reply = client.simulate_get(f"/api/v1/executions/{execution_id}")
        assert (reply.status_code, reply.json) == \
            (404, {"error": f'execution "{execution_id}" not found'})


def test_list_is_newest_first_and_filters_by_workflow_status_since_and_limit(client, engine):
    apply_yaml(REPORT)
    apply_yaml("""
        name: broken
        steps: [{name: boom, action: core/fail, params: {message: no}}]
    """)
    ids = [_run(client, engine, "daily-report", {"day": str(n)}) for n in range(3)]
    failed = _run(client, engine, "broken")
    # An old execution, for ``since``.
    old = WorkflowExecution.get_by_id(ids[0]).started_at - dt.timedelta(days=3)
    WorkflowExecution.update(started_at=old).where(WorkflowExecution.id == ids[0]).execute()

    def listed(query: str) -> list[str]:
        reply = client.simulate_get("/api/v1/executions", query_string=query)
        assert reply.status_code == 200, reply.text
        return [row["id"] for row in reply.json["executions"]]

    everything = client.simulate_get("/api/v1/executions").json["executions"]
    assert [row["id"] for row in everything] == [failed, ids[2], ids[1], ids[0]]
    assert list(everything[0]) == ["id", "workflow", "version", "status", "started_at",
                                   "completed_at", "parent_execution_id", "parent_step"]
    assert (everything[0]["workflow"], everything[0]["status"]) == ("broken", "failed")
    assert listed("workflow=daily-report") == [ids[2], ids[1], ids[0]]
    assert listed("status=failed") == [failed]
    assert listed("status=running") == []
    assert listed("since=1h") == [failed, ids[2], ids[1]]
    assert listed("since=4d") == [failed, ids[2], ids[1], ids[0]]
    # Before year 1, beyond a float, beyond Python's 4,300 digits for int: nothing filtered.
    for days in ("999999999", "1" + "0" * 400, "9" * 5000):
        assert listed(f"since={days}d") == [failed, ids[2], ids[1], ids[0]], days[:10]
    assert listed("since=90s&workflow=daily-report&limit=1") == [ids[2]]
    assert listed("limit=2") == [failed, ids[2]]
    # Unknown parameters are ignored; a repeated one keeps its last value.
    assert listed("colour=red&status=bogus&status=failed") == [failed]
    assert listed("limit=1000&limit=1") == [failed]
    assert listed("workflow=nobody") == []


def test_list_refuses_bad_filters_with_the_exact_400_bodies(client):
    status = "invalid status: must be one of pending, running, completed, failed, cancelled"
    since = ("invalid since parameter: must be a positive duration such as 90s, 30m, 1h30m "
             "or 7d")
    limit = "invalid limit parameter: must be an integer from 1 to 1000"
    cases = [("status=done", status), ("status=", status), ("status=failed&status=FAILED",
                                                             status),
             ("since=yesterday", since), ("since=0s", since), ("since=-5m", since),
             ("since=", since), ("since=0d", since),
             ("limit=0", limit), ("limit=1001", limit), ("limit=ten", limit), ("limit=", limit),
             ("limit=-1", limit), ("limit=2.5", limit)]
    for query, message in cases:
        reply = client.simulate_get("/api/v1/executions", query_string=query)
        assert (reply.status_code, reply.json) == (400, {"error": message}), query


def test_workflow_endpoints_show_current_version_versions_and_definitions(client):
    apply_yaml(REPORT)
    apply_yaml(REPORT.replace("name: skipped", "name: left-out"))
    definitions.rollback("daily-report", 1)

    listing = client.simulate_get("/api/v1/workflows")
    assert listing.status_code == 200
    [row] = listing.json["workflows"]
    assert list(row) == ["name", "latest_version", "created_at", "updated_at"]
    assert (row["name"], row["latest_version"]) == ("daily-report", 1)
    assert row["updated_at"] > row["created_at"]

    current = client.simulate_get("/api/v1/workflows/daily-report").json
    assert (current["name"], current["version"]) == ("daily-report", 1)
    assert current["definition"]["steps"][2]["name"] == "skipped"
    assert current["definition"]["inputs"]["day"] == {"type": "string"}

    versions = client.simulate_get("/api/v1/workflows/daily-report/versions").json
    assert (versions["name"], versions["current_version"]) == ("daily-report", 1)
    assert [v["version"] for v in versions["versions"]] == [2, 1]
    assert all(re.fullmatch(r"[0-9a-f]{64}", v["content_hash"]) and RFC3339.match(
        v["created_at"]) for v in versions["versions"])

    second = client.simulate_get("/api/v1/workflows/daily-report/versions/2").json
    assert (second["name"], second["version"]) == ("daily-report", 2)
    assert second["definition"]["steps"][2]["name"] == "left-out"
    assert client.simulate_get("/api/v1/workflows/daily-report/versions/02").json[
        "version"] == 2


def test_workflow_endpoints_answer_404_and_400_with_the_exact_bodies(client):
    apply_yaml(REPORT)
    missing = {"error": 'workflow "ghost" not found'}
    for path in ("/api/v1/workflows/ghost", "/api/v1/workflows/ghost/versions",
                 "/api/v1/workflows/ghost/versions/1"):
        reply = client.simulate_get(path)
        assert (reply.status_code, reply.json) == (404, missing), path
    # Beyond the integer column too, also with more digits than Python's int() takes (5000:
    # that was a 500), and written with leading zeros.
    for version, shown in (("3", "3"), ("99999999999999999999", "99999999999999999999"),
                           ("9" * 5000, "9" * 5000), ("0003", "3"), ("00" + "9" * 20, "9" * 20)):
        reply = client.simulate_get(f"/api/v1/workflows/daily-report/versions/{version}")
        assert (reply.status_code, reply.json) == \
            (404, {"error": f'workflow "daily-report" version {shown} not found'}), version
    for version in ("0", "000", "-1", "x", "1.0", "+1"):
        reply = client.simulate_get(f"/api/v1/workflows/daily-report/versions/{version}")
        assert (reply.status_code, reply.json) == (400, {"error": "invalid version number"})
