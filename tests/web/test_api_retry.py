"""``POST /api/v1/retry/{execution}`` and ``mantle retry --server`` (issue 15 item 9; SPEC
13.8, 6.2): the rules and messages of ``mantle retry``, over a real socket, on SQLite and
PostgreSQL. A local HTTP server plays the flaky service whose hit counts show what ran again.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import uuid

import pytest

from mantle import apikeys
from mantle.db.models import AuditEvent, StepExecution
from tests.web.served import served
from tests.web.support import REPO, Daemon, apply_yaml, cli

FLAKY = """
    name: flaky
    inputs: {{day: {{type: string, default: today}}}}
    steps:
      - {{name: prepare, action: core/log, params: {{message: "{{{{ inputs.day }}}}"}}}}
      - {{name: side, action: core/log, params: {{message: independent}}}}
      - name: call
        action: http/request
        depends_on: [prepare]
        params: {{url: "{url}"}}
      - {{name: report, action: core/log, depends_on: [call], params: {{message: done}}}}
"""
NAP = """
    name: nap
    steps: [{name: a, action: core/sleep, params: {duration: 20s}}]
"""


@pytest.fixture
def flaky(http_target, db):
    http_target.route("/service", status=503)
    apply_yaml(FLAKY.format(url=http_target.url("/service")))
    apply_yaml(NAP)
    return http_target


def _failed_original(api, engine) -> str:
    execution_id = api.post("/api/v1/run/flaky", {"inputs": {"day": "mon"}}).json[
        "execution_id"]
    assert engine.wait(execution_id, timeout=15) == "failed"
    return execution_id


def test_retry_of_a_failed_execution_answers_202_and_reruns_from_the_failed_step(
        flaky, engine, db):
    with served(engine, db) as api:
        original = _failed_original(api, engine)
        flaky.route("/service", status=200, body='{"ok": true}')
        key = {"Authorization": "Bearer " + apikeys.create_key("ops", role="operator")}
        reply = api.post(f"/api/v1/retry/{original}", body=b"", headers=key)
        assert reply.status == 202, reply.text
        body = reply.json
        assert set(body) == {"execution_id", "workflow", "version", "from_step", "reused"}
        assert (body["workflow"], body["version"], body["from_step"]) == ("flaky", 1, "call")
        assert sorted(body["reused"]) == ["prepare", "side"]
        assert engine.wait(body["execution_id"], timeout=15) == "completed"
        detail = api.get(f"/api/v1/executions/{body['execution_id']}", headers=key).json
    assert detail["inputs"] == {"day": "mon"}
    assert {step["name"]: step["status"] for step in detail["steps"]} == {
        "prepare": "completed", "side": "completed", "call": "completed",
        "report": "completed"}
    # The reused steps were copied, not run: one row each, with the original's output.
    copied = StepExecution.get(StepExecution.execution_id == body["execution_id"],
                               StepExecution.step_name == "prepare")
    assert copied.output == {"message": "mon"}
    assert len(flaky.requests("/service")) == 2
    audit = AuditEvent.get(AuditEvent.action == "execution.retried")
    assert (audit.actor, audit.resource_id, audit.metadata) == (
        "apikey:ops", body["execution_id"],
        {"original_execution_id": original, "from_step": "call"})


def test_retry_answers_400_404_and_409_with_the_words_of_mantle_retry(flaky, engine, db):
    with served(engine, db) as api:
        original = _failed_original(api, engine)
        running = api.post("/api/v1/run/nap", {}).json["execution_id"]
        completed = None
        for path, body, status, answer in (
                (f"/api/v1/retry/{original}", {"from_step": "nope"}, 400,
                 {"error": 'step "nope" not found in workflow "flaky"'}),
                (f"/api/v1/retry/{original}", {"from_step": 7}, 400,
                 {"error": '"from_step" must be a string'}),
                (f"/api/v1/retry/{original}", "[1]", 400,
                 {"error": "request body must be a JSON object"}),
                (f"/api/v1/retry/{original}", "{", 400,
                 {"error": "request body is not valid JSON"}),
                ("/api/v1/retry/nope", {}, 404, {"error": 'execution "nope" not found'}),
                (f"/api/v1/retry/{running}", {}, 409,
                 {"error": f"execution {running} is still running", "status": "running"})):
            reply = (api.post(path, body) if isinstance(body, dict)
                     else api.post(path, body=body))
            assert (reply.status, reply.json) == (status, answer), path
        unknown = str(uuid.uuid4())
        assert api.post(f"/api/v1/retry/{unknown}", {}).json == {
            "error": f'execution "{unknown}" not found'}
        # A retry from an explicit step; the retry completes, and cannot itself be retried.
        flaky.route("/service", status=200)
        retried = api.post(f"/api/v1/retry/{original}", {"from_step": "prepare"}).json
        assert (retried["from_step"], retried["reused"]) == ("prepare", ["side"])
        completed = retried["execution_id"]
        assert engine.wait(completed, timeout=15) == "completed"
        reply = api.post(f"/api/v1/retry/{completed}", {})
        assert (reply.status, reply.json) == (409, {
            "error": f"execution {completed} is not in a failed state (status: completed).",
            "status": "completed"})
        api.post(f"/api/v1/cancel/{running}", {})


def test_mantle_retry_with_server_uses_the_rest_endpoint(flaky, tmp_path, db, migrated_db_url,
                                                       engine):
    with served(engine, db) as api:
        original = _failed_original(api, engine)
        running = api.post("/api/v1/run/nap", {}).json["execution_id"]
    daemon = Daemon(tmp_path, migrated_db_url).start()
    try:
        flaky.route("/service", status=200)
        result = cli(tmp_path, migrated_db_url, "retry", original, "--server", daemon.url)
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == f'Retrying execution {original} from step "call"...'
        new_id = re.fullmatch(r"Execution ([0-9a-f-]{36}): completed", lines[1]).group(1)
        # Reused steps first, in the detail's order (by start: the two started together).
        assert sorted(lines[2:4]) == ["  prepare: reused (cached)", "  side: reused (cached)"]
        for line, name in zip(lines[4:], ("call", "report")):
            assert re.fullmatch(rf"  {name}: completed \((\d+ms|\d+\.\ds)\)", line), line
        assert len(lines) == 6
        assert daemon.get(f"/api/v1/executions/{new_id}").json["status"] == "completed"
        # The CLI's own words for an execution that has not failed, through the server too.
        result = cli(tmp_path, migrated_db_url, "retry", running, "--server", daemon.url,
                     "--from-step", "a")
        assert (result.returncode, result.stdout, result.stderr) == (
            1, "", f"Error: execution {running} is not in a failed state (status: running).\n")
        result = cli(tmp_path, migrated_db_url, "retry", original, "--from-step", "nope",
                     env={"MANTLE_SERVER": daemon.url})
        assert (result.returncode, result.stderr) == (
            1, 'Error: step "nope" not found in workflow "flaky"\n')
        daemon.post(f"/api/v1/cancel/{running}", {})

        # A signal cancels the retry through the server, exits 130, and the summary waits
        # for the rows to settle as ``run --server`` does: no step is left "running".
        flaky.route("/service", hold=True)
        retry = subprocess.Popen(
            [sys.executable, "-m", "mantle", "retry", original, "--server", daemon.url],
            cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        flaky.wait_for_hits("/service", 3, timeout=15)
        retry.send_signal(signal.SIGTERM)
        stdout, stderr = retry.communicate(timeout=30)
        assert (retry.returncode, stderr) == (130, ""), stderr
        lines = stdout.splitlines()
        assert re.fullmatch(r"Execution [0-9a-f-]{36}: cancelled", lines[1]), stdout
        assert re.fullmatch(r"  call: cancelled \((\d+ms|\d+\.\ds)\)", lines[4]), stdout
        assert lines[5:] == ["  report: cancelled"], stdout
    finally:
        daemon.stop()
