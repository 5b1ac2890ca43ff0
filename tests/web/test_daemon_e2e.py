"""``mantle serve`` as a real subprocess, one per backend for the whole module: every
endpoint over HTTP with exact bodies, the API rows of SPEC 11, API keys picked up without a
restart, and ``mantle run --server`` / ``mantle cancel --server``."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mantle import db as mantle_db
from mantle.db.models import ApiKey, AuditEvent, Node, WorkflowExecution
from tests.conftest import BACKENDS
from tests.web.support import Daemon, apply_yaml, cli, wait_until, wait_until_keys_apply

REPORT = """
    name: daily-report
    inputs:
      day: {type: string}
      limit: {type: number, default: 10}
    triggers:
      - {type: webhook, path: /hooks/report}
    steps:
      - name: fetch-metrics
        action: core/sleep
        params: {duration: 1s}
      - name: announce
        action: core/log
        if: "steps.fetch-metrics.status == 'completed'"
        params: {message: "{{ inputs.limit }} events on {{ default(inputs.day, 'today') }}"}
"""
SLOW = """
    name: slow
    max_parallel_executions: 1
    on_limit: reject
    steps:
      - {name: wait, action: core/sleep, params: {duration: 60s}}
"""
DEPLOY = """
    name: deploy-notifier
    triggers:
      - {type: webhook, path: /hooks/deploy, secret: change-me}
    steps:
      - name: announce
        action: core/log
        params:
          message: {payload: "{{ trigger.payload }}", agent: "{{ trigger.headers['user-agent'] }}"}
"""
BROKEN = """
    name: broken
    steps: [{name: boom, action: core/fail, params: {message: it broke}}]
"""


@pytest.fixture(scope="module", params=BACKENDS)
def daemon(request, tmp_path_factory):
    """A running daemon on a fresh database (it migrates it), with the test process bound to
    the same database for setup and checks."""
    cwd = tmp_path_factory.mktemp("serve")
    cluster = name = None
    if request.param == "postgres":
        cluster = request.getfixturevalue("pg_cluster")
        name = cluster.new_name("serve")
        url = cluster.create_database(name)
    else:
        url = f"sqlite:///{cwd / 'mantle.db'}"
    process = Daemon(cwd, url).start()
    database = mantle_db.connect(url)
    mantle_db.bind(database)
    for text in (REPORT, SLOW, DEPLOY, BROKEN):
        apply_yaml(text)
    try:
        yield process
    finally:
        code = process.stop()
        mantle_db.close_all(database)
        mantle_db.database_proxy.initialize(None)
        if cluster is not None:
            cluster.drop_database(name)
        assert code == 0, process.output()


def test_startup_logs_json_lines_on_stdout_in_startup_order(daemon):
    messages = daemon.messages()
    order = [messages.index(m) for m in ("migrations complete", "server listening",
                                         "cron scheduler started")]
    assert order == sorted(order)
    for line in daemon.lines:
        assert list(line)[:3] == ["time", "level", "msg"], line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    listening = daemon.wait_for_log("server listening")
    assert listening["address"] == f"127.0.0.1:{daemon.port}"
    assert daemon.stderr == ""


def test_probes_metrics_and_openapi_answer(daemon):
    assert daemon.get("/healthz").json == {"status": "ok"}
    assert daemon.get("/readyz").json == {"status": "ok"}
    metrics = daemon.get("/metrics")
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE mantle_active_executions gauge" in metrics.text
    document = daemon.get("/api/v1/openapi.json")
    assert document.headers["content-type"] == "application/json"
    assert "/api/v1/run/{workflow}" in document.json["paths"]


def test_run_answers_202_before_it_runs_then_the_detail_shows_every_step(daemon):
    reply = daemon.post("/api/v1/run/daily-report", {"inputs": {"day": "2026-03-17"}})
    assert reply.status == 202
    body = reply.json
    assert body == {"execution_id": body["execution_id"], "workflow": "daily-report",
                    "version": 1}
    assert uuid.UUID(body["execution_id"]).version == 4
    # read while fetch-metrics sleeps (with 300 ms, a slow answer on a loaded machine could
    # come after it and announce had started)
    early = daemon.get(f"/api/v1/executions/{body['execution_id']}").json
    assert early["status"] == "running"
    assert early["steps"][-1]["name"] == "announce" and early["steps"][-1]["attempt"] == 0
    detail = daemon.wait_for_status(body["execution_id"])
    assert (detail["status"], detail["inputs"], detail["error"], detail["hooks"]) == \
        ("completed", {"day": "2026-03-17", "limit": 10}, None, [])
    assert [(s["name"], s["status"], s["attempt"]) for s in detail["steps"]] == \
        [("fetch-metrics", "completed", 1), ("announce", "completed", 1)]
    assert detail["steps"][1]["output"] == {"message": "10 events on 2026-03-17"}
    assert detail["steps"][0]["output"]["duration_ms"] >= 1000
    listed = daemon.get("/api/v1/executions?workflow=daily-report&limit=1").json
    assert listed["executions"][0] == {k: detail[k] for k in (
        "id", "workflow", "version", "status", "started_at", "completed_at",
        "parent_execution_id", "parent_step")}
    assert daemon.wait_for_log("execution finished", execution_id=body["execution_id"])[
        "status"] == "completed"


def test_the_api_rows_of_the_error_table_answer_exactly(daemon):
    unknown = "5c0f8a52-3b7e-4c1e-9a43-0d2b7f0e6a11"
    cases = [
        ("GET", "/api/v2/nothing", None, {}, 404, {"error": "not found"}),
        ("PUT", "/api/v1/executions", None, {}, 405, {"error": "method not allowed"}),
        ("POST", "/api/v1/run/daily-report", "{" + " " * (1 << 20) + "}", {}, 413,
         {"error": "request body too large (limit 1048576 bytes)"}),
        ("POST", "/api/v1/run/daily-report", "{oops", {}, 400,
         {"error": "request body is not valid JSON"}),
        ("POST", "/api/v1/run/daily-report", '"text"', {}, 400,
         {"error": "request body must be a JSON object"}),
        ("POST", "/api/v1/run/daily-report", '{"inputs": 5}', {}, 400,
         {"error": '"inputs" must be a JSON object'}),
        ("POST", "/api/v1/run/daily-report", '{"version": -2}', {}, 400,
         {"error": '"version" must be a positive integer'}),
        ("POST", "/api/v1/run/daily-report", '{"inputs": {"days": "x"}}', {}, 400,
         {"error": 'unknown input "days"'}),
        ("POST", "/api/v1/run/daily-report", '{"inputs": {"limit": "x"}}', {}, 400,
         {"error": 'input "limit" must be a number'}),
        ("POST", "/api/v1/run/daily-report", "{}", {"Idempotency-Key": "k" * 256}, 400,
         {"error": "Idempotency-Key must be 1 to 255 characters"}),
        ("POST", "/api/v1/run/ghost", "", {}, 404, {"error": 'workflow "ghost" not found'}),
        ("POST", "/api/v1/run/daily-report", '{"version": 4}', {}, 404,
         {"error": 'workflow "daily-report" version 4 not found'}),
        ("GET", f"/api/v1/executions/{unknown}", None, {}, 404,
         {"error": f'execution "{unknown}" not found'}),
        ("POST", "/api/v1/cancel/xyz", None, {}, 404, {"error": 'execution "xyz" not found'}),
        ("GET", "/api/v1/workflows/ghost/versions", None, {}, 404,
         {"error": 'workflow "ghost" not found'}),
        ("GET", "/api/v1/workflows/daily-report/versions/v1", None, {}, 400,
         {"error": "invalid version number"}),
        ("GET", "/api/v1/executions?status=done", None, {}, 400,
         {"error": "invalid status: must be one of pending, running, completed, failed, "
                   "cancelled"}),
        ("GET", "/api/v1/executions?since=soon", None, {}, 400,
         {"error": "invalid since parameter: must be a positive duration such as 90s, 30m, "
                   "1h30m or 7d"}),
        ("GET", "/api/v1/executions?limit=5000", None, {}, 400,
         {"error": "invalid limit parameter: must be an integer from 1 to 1000"}),
        ("POST", "/hooks/unknown", "{}", {}, 404, {"error": "no webhook registered for path"}),
        ("POST", "/hooks/deploy", "{}", {}, 403,
         {"error": "invalid or missing webhook signature"}),
    ]
    for method, path, body, headers, status, expected in cases:
        reply = daemon.request(method, path, body, headers)
        assert (reply.status, reply.json) == (status, expected), (method, path)
        assert reply.headers["content-type"] == "application/json"
    assert daemon.request("PUT", "/api/v1/executions").headers["allow"] == "GET"


def test_a_chunked_body_over_the_limit_is_413_too(daemon):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=15)
    chunks = (b"x" * 65536 for _ in range(17))
    conn.request("POST", "/api/v1/run/daily-report", body=chunks, encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    reply = conn.getresponse()
    assert (reply.status, json.loads(reply.read())) == \
        (413, {"error": "request body too large (limit 1048576 bytes)"})
    conn.close()


def test_idempotency_cancel_and_the_reject_limit_over_http(daemon):
    first = daemon.post("/api/v1/run/slow", {}, headers={"Idempotency-Key": "once"})
    assert first.status == 202
    execution_id = first.json["execution_id"]
    again = daemon.post("/api/v1/run/slow", {"inputs": {"x": 1}},
                        headers={"Idempotency-Key": "once"})
    assert (again.status, again.json) == (200, first.json)
    wait_until(lambda: daemon.get(f"/api/v1/executions/{execution_id}").json["steps"][0][
        "status"] == "running")
    limited = daemon.post("/api/v1/run/slow", {})
    assert (limited.status, limited.json) == (429, {
        "error": 'workflow "slow" has reached the maximum of 1 concurrent executions'})
    cancel = daemon.post(f"/api/v1/cancel/{execution_id}")
    assert (cancel.status, cancel.json) == \
        (200, {"execution_id": execution_id, "status": "cancelled"})
    daemon.wait_for_status(execution_id, ("cancelled",))
    # The execution's cancelled is committed first; its running step is interrupted and
    # checkpointed right after (4.6: within 1 s), so the detail may show it running briefly.
    wait_until(lambda: daemon.get(f"/api/v1/executions/{execution_id}").json["steps"][0][
        "status"] == "cancelled", timeout=5)
    conflict = daemon.post(f"/api/v1/cancel/{execution_id}")
    assert (conflict.status, conflict.json) == (409, {
        "error": f"execution {execution_id} is already cancelled", "status": "cancelled"})
    running = daemon.get("/api/v1/executions?status=running&workflow=slow").json
    assert running == {"executions": [], "next_cursor": None}


def test_workflow_endpoints_over_http(daemon):
    listing = daemon.get("/api/v1/workflows").json["workflows"]
    assert [w["name"] for w in listing] == ["broken", "daily-report", "deploy-notifier", "slow"]
    current = daemon.get("/api/v1/workflows/daily-report").json
    assert (current["name"], current["version"]) == ("daily-report", 1)
    assert current["definition"]["inputs"] == {"day": {"type": "string"},
                                               "limit": {"type": "number", "default": 10}}
    versions = daemon.get("/api/v1/workflows/daily-report/versions").json
    assert (versions["current_version"], [v["version"] for v in versions["versions"]]) == \
        (1, [1])
    one = daemon.get("/api/v1/workflows/daily-report/versions/1").json
    assert one == current


def test_webhooks_run_with_the_payload_and_a_valid_signature(daemon):
    body = b'{"repo":"app","sha":"abc1234"}'
    signature = "sha256=" + hmac.new(b"change-me", body, hashlib.sha256).hexdigest()
    reply = daemon.request("POST", "/hooks/deploy", body,
                           {"X-Hub-Signature-256": signature, "User-Agent": "GitHub-Hookshot"})
    assert reply.status == 202
    assert reply.json["workflow"] == "deploy-notifier"
    detail = daemon.wait_for_status(reply.json["execution_id"])
    assert detail["steps"][0]["output"] == {"message": {
        "payload": {"repo": "app", "sha": "abc1234"}, "agent": "GitHub-Hookshot"}}
    trigger = WorkflowExecution.get_by_id(reply.json["execution_id"]).trigger
    assert (trigger["type"], trigger["path"]) == ("webhook", "/hooks/deploy")
    text = daemon.request("POST", "/hooks/report", "day=today")  # form-encoded by curl -d
    assert text.status == 202
    stored = WorkflowExecution.get_by_id(text.json["execution_id"]).trigger
    assert stored["payload"] == "day=today"
    assert stored["headers"]["content-length"] == "9"
    daemon.wait_for_status(text.json["execution_id"])


def test_api_keys_created_and_revoked_by_the_cli_apply_without_a_restart(daemon):
    created = cli(daemon.cwd, daemon.database_url, "keys", "create", "e2e")
    assert created.returncode == 0, created.stderr
    key = re.search(r"API Key: (mk_[0-9a-f]{64})", created.stdout).group(1)
    try:
        wait_until_keys_apply(daemon)  # a daemon reads the keys at most 1 s apart
        refused = daemon.post("/api/v1/run/daily-report", {})
        assert (refused.status, refused.json) == (401, {"error": "missing Authorization header"})
        assert refused.headers["www-authenticate"] == "Bearer"
        basic = daemon.get("/api/v1/executions", headers={"Authorization": "Basic eDp5"})
        assert (basic.status, basic.json) == \
            (401, {"error": "Authorization header must use Bearer scheme"})
        wrong = daemon.post("/hooks/report", headers={"Authorization": "Bearer mk_nope"})
        assert (wrong.status, wrong.json) == (401, {"error": "invalid API key"})
        for path in ("/healthz", "/readyz", "/metrics"):
            assert daemon.get(path).status == 200
        # Refusals are counted by request threads and written by a background one.
        wait_until(lambda: _auth_failures()[-3:] == [
            ("/api/v1/run/{workflow}", "missing Authorization header"),
            ("/api/v1/executions", "Authorization header must use Bearer scheme"),
            ("/hooks/{path}", "invalid API key")], timeout=10)
        auth = {"Authorization": f"Bearer {key}"}
        accepted = daemon.post("/api/v1/run/daily-report", {}, headers=auth)
        assert accepted.status == 202
        daemon.wait_for_status(accepted.json["execution_id"], headers=auth)
        assert ApiKey.get(ApiKey.name == "e2e").last_used_at is not None
        audit = AuditEvent.get(AuditEvent.action == "workflow.executed",
                               AuditEvent.resource_id == accepted.json["execution_id"])
        assert audit.actor == "apikey:e2e"
        listed = cli(daemon.cwd, daemon.database_url, "keys", "list")
        assert re.search(r"^e2e +mk_[0-9a-f]{6} +admin +\S+ \S+ +never +\S+ \S+ +active$",
                         listed.stdout, re.M), listed.stdout
        # The CLI client with --api-key (and without: refused).
        ran = cli(daemon.cwd, daemon.database_url, "run", "daily-report", "--server",
                  daemon.url, "--api-key", key)
        assert ran.returncode == 0, ran.stderr
        no_key = cli(daemon.cwd, daemon.database_url, "run", "daily-report", "--server",
                     daemon.url)
        assert (no_key.returncode, no_key.stderr) == \
            (1, "Error: missing Authorization header\n")
    finally:  # the daemon is shared with the next tests: leave its API open
        revoked = cli(daemon.cwd, daemon.database_url, "keys", "revoke", "e2e")
        wait_until_keys_apply(daemon, required=False)
    assert revoked.stdout.endswith(
        "No active keys remain — the API no longer requires authentication.\n")
    assert daemon.get("/api/v1/executions?limit=1").status == 200


def _auth_failures() -> list[tuple[str, str]]:
    """(route, error) of each ``auth.failed`` audit row, oldest first."""
    return [(event.resource_id, event.metadata["error"]) for event in
            AuditEvent.select().where(AuditEvent.action == "auth.failed").order_by(AuditEvent.id)]


def test_run_and_cancel_with_server_go_through_the_api(daemon):
    ran = cli(daemon.cwd, daemon.database_url, "run", "daily-report", "--input", "day=mon",
              "--input", "limit=3", "--server", daemon.url)
    assert (ran.returncode, ran.stderr) == (0, ""), ran.stderr
    execution_id = re.search(r"Execution (\S+): completed", ran.stdout).group(1)
    # Step lines as the steps finish, the execution line last (13.1.2).
    assert ran.stdout == ("Running daily-report (version 1)...\n"
                          "  fetch-metrics: completed\n"
                          "  announce: completed\n"
                          f"Execution {execution_id}: completed\n")
    row = WorkflowExecution.get_by_id(execution_id)
    assert row.inputs == {"day": "mon", "limit": 3}
    assert Node.get_by_id(row.owner).kind == "serve"  # the daemon ran it
    assert AuditEvent.get(AuditEvent.action == "workflow.executed",
                          AuditEvent.resource_id == execution_id).actor == "api"

    failed = cli(daemon.cwd, daemon.database_url, "run", "broken", "--server", daemon.url)
    assert failed.returncode == 1
    assert failed.stderr == 'Error: step "boom" failed: it broke\n'
    assert re.fullmatch(r"Running broken \(version 1\)\.\.\.\n  boom: failed\n"
                        r"Execution \S+: failed\n", failed.stdout), failed.stdout

    for args, message in (
            (["run", "ghost"], "workflow \"ghost\" not found — have you run 'mantle apply'?"),
            (["run", "daily-report", "--input", "nope=1"], 'unknown input "nope"'),
            (["run", "daily-report", "--input", "limit=x"], 'input "limit" must be a number'),
            (["cancel", "0b6f3a8e-2d4c-4f1a-9e7b-5c3d2a1f0e9d"],
             'execution "0b6f3a8e-2d4c-4f1a-9e7b-5c3d2a1f0e9d" not found'),
            (["cancel", "not an id"], 'execution "not an id" not found')):
        result = cli(daemon.cwd, daemon.database_url, *args, "--server", daemon.url)
        assert (result.returncode, result.stdout, result.stderr) == \
            (1, "", f"Error: {message}\n"), args

    slow = daemon.post("/api/v1/run/slow", {}).json["execution_id"]
    cancelled = cli(daemon.cwd, daemon.database_url, "cancel", slow, "--server", daemon.url)
    assert (cancelled.returncode, cancelled.stdout) == (0, f"Cancelled execution {slow}\n")
    daemon.wait_for_status(slow, ("cancelled",))
    again = cli(daemon.cwd, daemon.database_url, "cancel", slow, "--server", daemon.url,
                env={"MANTLE_SERVER": "http://127.0.0.1:1"})
    assert (again.returncode, again.stdout) == (0, f"Execution {slow} is already cancelled\n")

    unreachable = cli(daemon.cwd, daemon.database_url, "run", "daily-report",
                      env={"MANTLE_SERVER": "http://127.0.0.1:1"})
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("Error: cannot reach server at http://127.0.0.1:1: ")
    malformed = cli(daemon.cwd, daemon.database_url, "cancel", slow, "--server", "nowhere")
    assert (malformed.returncode, malformed.stderr.splitlines()[-1][:37]) == \
        (1, "Error: cannot reach server at nowhere")


def test_metrics_count_requests_by_route_template(daemon):
    """Each (method, route, status) is its own series, also after its first request."""
    daemon.get("/api/v1/executions/not-an-id")
    daemon.get("/no/such/thing")
    for _ in range(2):
        assert daemon.post("/api/v1/run/daily-report",
                           {"inputs": {"day": "2026-03-17"}}).status == 202
    samples = {}
    for family in text_string_to_metric_families(daemon.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "mantle_http_requests_total":
                samples[(sample.labels["method"], sample.labels["route"],
                         sample.labels["status"])] = sample.value
    assert samples[("GET", "/api/v1/executions/{id}", "404")] >= 1
    assert samples[("GET", "unmatched", "404")] >= 1
    assert samples[("POST", "/api/v1/run/{workflow}", "202")] >= 2
    assert all(not re.search(r"[0-9a-f]{8}-", route) for _, route, _ in samples)
