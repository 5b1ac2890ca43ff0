"""``POST /api/v1/run/{workflow}`` and ``POST /api/v1/cancel/{execution}`` (SPEC 7.2, 7.3),
through the Falcon app on a real engine, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

from mantle.db.models import AuditEvent, WorkflowExecution
from tests.web.support import apply_yaml, wait_until

TYPED = """
    name: typed
    inputs:
      day: {type: string}
      limit: {type: number, default: 10}
      verbose: {type: boolean, default: false}
      anything: {description: any JSON value}
    steps:
      - {name: report, action: core/log, params: {message: "{{ inputs.day }} {{ inputs.limit }}"}}
"""

NAP = """
    name: nap
    max_parallel_executions: 1
    on_limit: reject
    steps:
      - {name: sleep, action: core/sleep, params: {duration: 30s}}
      - {name: after, action: core/log, depends_on: [sleep], params: {message: late}}
"""


def _run(client, workflow: str, body=None, headers=None, raw: str | None = None):
    if raw is None and body is not None:
        raw = json.dumps(body)
    return client.simulate_post(f"/api/v1/run/{workflow}", body=raw, headers=headers or {})


def test_run_answers_202_with_the_execution_before_it_has_run(client, engine):
    apply_yaml(NAP)
    reply = _run(client, "nap")
    assert reply.status_code == 202
    assert reply.headers["content-type"] == "application/json"
    body = reply.json
    assert list(body) == ["execution_id", "workflow", "version"]
    assert (body["workflow"], body["version"]) == ("nap", 1)
    detail = client.simulate_get(f"/api/v1/executions/{body['execution_id']}").json
    assert detail["status"] in ("pending", "running")
    assert engine.cancel(body["execution_id"]) == "running"


def test_run_takes_typed_inputs_and_a_version_and_stores_effective_inputs(client, engine):
    apply_yaml(TYPED)
    apply_yaml(TYPED.replace("default: 10", "default: 20"))
    reply = _run(client, "typed", {"inputs": {"day": "2026-03-17", "anything": [1, {"a": 2}]},
                                   "version": 1, "ignored": True})
    assert reply.status_code == 202, reply.text
    assert reply.json["version"] == 1
    execution_id = reply.json["execution_id"]
    assert engine.wait(execution_id, timeout=10) == "completed"
    detail = client.simulate_get(f"/api/v1/executions/{execution_id}").json
    assert detail["inputs"] == {"day": "2026-03-17", "limit": 10, "verbose": False,
                                "anything": [1, {"a": 2}]}
    assert detail["steps"][0]["output"] == {"message": "2026-03-17 10"}
    row = WorkflowExecution.get_by_id(execution_id)
    assert row.trigger == {"type": "manual", "payload": None}
    audit = AuditEvent.get(AuditEvent.action == "workflow.executed",
                           AuditEvent.resource_id == execution_id)
    assert (audit.actor, audit.resource_type, audit.metadata) == \
        ("api", "workflow_execution", {"workflow": "typed", "version": 1})
    # The current version (2) when none is asked for; an empty body is an empty request.
    again = client.simulate_post("/api/v1/run/typed", body=b"")
    assert (again.status_code, again.json["version"]) == (202, 2)


def test_a_repeated_idempotency_key_returns_200_and_the_original_body(client, engine):
    apply_yaml(TYPED)
    first = _run(client, "typed", {"inputs": {"day": "a"}}, {"Idempotency-Key": "k-1"})
    assert first.status_code == 202
    again = _run(client, "typed", {"inputs": {"day": "other"}, "version": 1},
                 {"Idempotency-Key": "k-1"})
    assert (again.status_code, again.json) == (200, first.json)
    longest = _run(client, "typed", {}, {"Idempotency-Key": "x" * 255})
    assert longest.status_code == 202
    assert WorkflowExecution.select().count() == 2
    # Keys are per workflow.
    apply_yaml(TYPED.replace("name: typed", "name: typed-two"))
    other = _run(client, "typed-two", {}, {"Idempotency-Key": "k-1"})
    assert other.status_code == 202
    assert other.json["execution_id"] != first.json["execution_id"]


def test_run_refuses_bad_requests_with_the_exact_400_bodies(client):
    apply_yaml(TYPED)
    cases = [
        ({"raw": "{not json"}, "request body is not valid JSON"),
        ({"raw": '{"a": NaN}'}, "request body is not valid JSON"),
        ({"raw": "[1, 2]"}, "request body must be a JSON object"),
        ({"raw": "null"}, "request body must be a JSON object"),
        ({"body": {"inputs": [1]}}, '"inputs" must be a JSON object'),
        ({"body": {"inputs": "day=x"}}, '"inputs" must be a JSON object'),
        ({"body": {"version": 0}}, '"version" must be a positive integer'),
        ({"body": {"version": "1"}}, '"version" must be a positive integer'),
        ({"body": {"version": 1.5}}, '"version" must be a positive integer'),
        ({"body": {"version": True}}, '"version" must be a positive integer'),
        ({"body": {"inputs": {"colour": "red"}}}, 'unknown input "colour"'),
        ({"body": {"inputs": {"day": 5}}}, 'input "day" must be a string'),
        ({"body": {"inputs": {"limit": "5"}}}, 'input "limit" must be a number'),
        ({"body": {"inputs": {"limit": True}}}, 'input "limit" must be a number'),
        ({"body": {"inputs": {"verbose": "yes"}}}, 'input "verbose" must be a boolean'),
        ({"body": {}, "headers": {"Idempotency-Key": ""}},
         "Idempotency-Key must be 1 to 255 characters"),
        ({"body": {}, "headers": {"Idempotency-Key": "x" * 256}},
         "Idempotency-Key must be 1 to 255 characters"),
    ]
    for case, message in cases:
        reply = _run(client, "typed", case.get("body"), case.get("headers"), case.get("raw"))
        assert (reply.status_code, reply.json) == (400, {"error": message}), case
    assert WorkflowExecution.select().count() == 0


def test_run_of_an_unknown_workflow_or_version_is_404(client):
    apply_yaml(TYPED)
    reply = _run(client, "ghost", {})
    assert (reply.status_code, reply.json) == (404, {"error": 'workflow "ghost" not found'})
    reply = _run(client, "typed", {"version": 7})
    assert (reply.status_code, reply.json) == \
        (404, {"error": 'workflow "typed" version 7 not found'})


def test_run_over_a_reject_limit_is_429_and_cancel_answers_200_409_404(client, engine):
    apply_yaml(NAP)
    first = _run(client, "nap", {}).json["execution_id"]
    wait_until(lambda: client.simulate_get(f"/api/v1/executions/{first}").json["steps"][0]
               ["status"] == "running")
    reply = _run(client, "nap", {})
    assert (reply.status_code, reply.json) == (429, {
        "error": 'workflow "nap" has reached the maximum of 1 concurrent executions'})

    cancel = client.simulate_post(f"/api/v1/cancel/{first}")
    assert (cancel.status_code, cancel.json) == \
        (200, {"execution_id": first, "status": "cancelled"})
    assert engine.wait(first, timeout=5) == "cancelled"
    again = client.simulate_post(f"/api/v1/cancel/{first}")
    assert (again.status_code, again.json) == \
        (409, {"error": f"execution {first} is already cancelled", "status": "cancelled"})
    audit = AuditEvent.get(AuditEvent.action == "execution.cancelled")
    assert (audit.actor, audit.resource_id) == ("api", first)

    unknown = "0b6f3a8e-2d4c-4f1a-9e7b-5c3d2a1f0e9d"
    for execution_id in (unknown, "not-a-uuid", unknown.upper()):
        reply = client.simulate_post(f"/api/v1/cancel/{execution_id}")
        assert (reply.status_code, reply.json) == \
            (404, {"error": f'execution "{execution_id}" not found'})


def test_cancel_of_a_completed_execution_returns_409_with_its_status(client, engine):
    apply_yaml(TYPED)
    execution_id = _run(client, "typed", {"inputs": {"day": "d"}}).json["execution_id"]
    assert engine.wait(execution_id, timeout=10) == "completed"
    reply = client.simulate_post(f"/api/v1/cancel/{execution_id}")
    assert (reply.status_code, reply.json) == (409, {
        "error": f"execution {execution_id} is already completed", "status": "completed"})


def test_an_idempotency_key_of_the_form_the_engine_gives_sub_workflows_is_refused(
        client, engine, http_target):
    """SPEC 13.3: a ``workflow/run`` step creates its child with an idempotency key derived
    from the parent, the step and the attempt (``mantle-child:...``), and a resumed attempt
    takes the execution under that key as its child. A client sending that key to ``run``
    before the step started had its own execution (its inputs, no parent) taken as the
    parent's child: the parent's step ended with that execution's outcome and its real child
    never ran. The prefix is the engine's: such a key is 400."""
    from actors.children import child_key

    http_target.route("/hold", hold=True)
    apply_yaml("""
        name: kid
        inputs: {who: {type: string}}
        steps: [{name: greet, action: core/log, params: {message: "hi {{ inputs.who }}"}}]
    """)
    apply_yaml(f"""
        name: parent
        steps:
          - {{name: wait, action: http/request, params: {{url: "{http_target.url('/hold')}"}}}}
          - {{name: call, action: workflow/run, depends_on: [wait],
              params: {{workflow: kid, inputs: {{who: ann}}}}}}
    """)
    parent = _run(client, "parent", {}).json["execution_id"]
    http_target.wait_for_hits("/hold", 1, timeout=10)
    forged = _run(client, "kid", {"inputs": {"who": "mallory"}},
                  {"Idempotency-Key": child_key(parent, "call", 1)})
    http_target.release("/hold")
    assert engine.wait(parent, timeout=20) == "completed"
    assert (forged.status_code, forged.json) == (400, {
        "error": 'Idempotency-Key must not begin with "mantle-child:"'})
    [child] = WorkflowExecution.select().where(WorkflowExecution.workflow_name == "kid")
    assert (child.parent_execution_id, child.inputs) == (parent, {"who": "ann"})
