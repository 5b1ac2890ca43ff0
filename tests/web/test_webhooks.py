"""Webhook triggers (SPEC 8, 3.1, 7.5): payloads, headers, signatures, lifecycle."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from mantle import definitions
from mantle.db.connect import is_postgres
from mantle.db.models import AuditEvent, WorkflowExecution
from mantle.errors import WebhookPathTaken
from tests.helpers.database import two_applies_at_once
from tests.web.support import apply_yaml

ECHO = """
    name: echo
    triggers:
      - {type: webhook, path: /hooks/team/echo.v1}
    steps:
      - name: show
        action: core/log
        params:
          message:
            payload: "{{ trigger.payload }}"
            kind: "{{ trigger.type }} {{ trigger.path }}"
            event: "{{ default(trigger.headers['x-event'], 'none') }}"
"""

SIGNED = """
    name: signed
    max_parallel_executions: 1
    on_limit: reject
    triggers:
      - {type: webhook, path: /hooks/signed, secret: s3cret}
    steps:
      - {name: wait, action: core/sleep, params: {duration: 30s}}
"""


def _sign(body: bytes, secret: str = "s3cret") -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _fire(client, engine, path: str, body: bytes, headers=None) -> tuple[dict, dict]:
    """POST a webhook, wait for the run; (stored trigger, step output)."""
    reply = client.simulate_post(path, body=body, headers=headers or {})
    assert reply.status_code == 202, reply.text
    assert reply.json["workflow"] == "echo"
    execution_id = reply.json["execution_id"]
    assert engine.wait(execution_id, timeout=10) == "completed"
    detail = client.simulate_get(f"/api/v1/executions/{execution_id}").json
    output = detail["steps"][0]["output"]["message"]
    return WorkflowExecution.get_by_id(execution_id).trigger, output


def test_a_webhook_run_carries_the_json_payload_path_and_lower_cased_headers(client, engine):
    apply_yaml(ECHO)
    trigger, output = _fire(client, engine, "/hooks/team/echo.v1",
                            b'{"repo": "app", "sha": "abc1234", "n": 3, "f": 1.5}',
                            {"X-Event": "push", "Content-Type": "application/json",
                             "Authorization": "Bearer secret-key"})
    payload = {"repo": "app", "sha": "abc1234", "n": 3, "f": 1.5}
    assert output == {"payload": payload, "kind": "webhook /hooks/team/echo.v1",
                      "event": "push"}
    assert (trigger["type"], trigger["path"], trigger["payload"]) == \
        ("webhook", "/hooks/team/echo.v1", payload)
    assert trigger["headers"]["x-event"] == "push"
    assert trigger["headers"]["content-type"] == "application/json"
    assert all(name == name.lower() for name in trigger["headers"])
    assert "authorization" not in trigger["headers"]  # the API key is never stored
    audit = AuditEvent.get(AuditEvent.action == "workflow.executed")
    assert audit.actor == "webhook"


def test_a_non_json_body_is_passed_as_text_and_an_empty_one_as_null(client, engine):
    apply_yaml(ECHO)
    _, output = _fire(client, engine, "/hooks/team/echo.v1", b"plain text, {not json",
                      {"Content-Type": "text/plain"})
    assert output["payload"] == "plain text, {not json"
    assert output["event"] == "none"
    trigger, output = _fire(client, engine, "/hooks/team/echo.v1", b"")
    assert trigger["payload"] is None and output["payload"] is None
    trigger, _ = _fire(client, engine, "/hooks/team/echo.v1", b"42")
    assert trigger["payload"] == 42


def test_a_webhook_with_a_secret_needs_a_valid_signature(client, engine):
    apply_yaml(SIGNED)
    body = b'{"deploy": true}'
    refused = {"error": "invalid or missing webhook signature"}
    for headers in ({}, {"X-Hub-Signature-256": _sign(body, "wrong")},
                    {"X-Hub-Signature-256": _sign(b"other body")},
                    {"X-Hub-Signature-256": _sign(body)[7:]},
                    {"X-Signature-256": "sha1=" + _sign(body)[7:]}):
        reply = client.simulate_post("/hooks/signed", body=body, headers=headers)
        assert (reply.status_code, reply.json) == (403, refused), headers
    assert WorkflowExecution.select().count() == 0
    ok = client.simulate_post("/hooks/signed", body=body,
                              headers={"X-Hub-Signature-256": _sign(body)})
    assert ok.status_code == 202
    engine.cancel(ok.json["execution_id"])
    engine.wait(ok.json["execution_id"], timeout=5)
    upper = "sha256=" + _sign(body)[7:].upper()
    other = client.simulate_post("/hooks/signed", body=body, headers={"X-Signature-256": upper})
    assert other.status_code == 202
    # Over the limit with on_limit: reject.
    limited = client.simulate_post("/hooks/signed", body=body,
                                   headers={"X-Signature-256": _sign(body)})
    assert (limited.status_code, limited.json) == (429, {
        "error": 'workflow "signed" has reached the maximum of 1 concurrent executions'})
    engine.cancel(other.json["execution_id"])


def test_webhooks_honour_idempotency_keys(client, engine):
    apply_yaml(ECHO)
    first = client.simulate_post("/hooks/team/echo.v1", body=b"{}",
                                 headers={"Idempotency-Key": "delivery-1"})
    again = client.simulate_post("/hooks/team/echo.v1", body=b'{"other": 1}',
                                 headers={"Idempotency-Key": "delivery-1"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json == first.json
    bad = client.simulate_post("/hooks/team/echo.v1", body=b"{}",
                               headers={"Idempotency-Key": "k" * 256})
    assert (bad.status_code, bad.json) == \
        (400, {"error": "Idempotency-Key must be 1 to 255 characters"})
    engine.wait(first.json["execution_id"], timeout=10)


def test_unknown_paths_are_404_and_apply_and_rollback_change_paths_at_once(client, engine):
    missing = {"error": "no webhook registered for path"}
    for path in ("/hooks/team/echo.v1", "/hooks/team", "/hooks/team/echo.v1/more"):
        reply = client.simulate_post(path, body=b"{}")
        assert (reply.status_code, reply.json) == (404, missing), path
    apply_yaml(ECHO)
    assert client.simulate_post("/hooks/team/echo.v1", body=b"{}").status_code == 202
    apply_yaml(ECHO.replace("/hooks/team/echo.v1", "/hooks/echo2"))
    assert client.simulate_post("/hooks/team/echo.v1", body=b"{}").json == missing
    assert client.simulate_post("/hooks/echo2", body=b"{}").status_code == 202
    definitions.rollback("echo")
    assert client.simulate_post("/hooks/echo2", body=b"{}").status_code == 404
    reply = client.simulate_post("/hooks/team/echo.v1", body=b"{}")
    assert (reply.status_code, reply.json["version"]) == (202, 1)
    reply = client.simulate_get("/hooks/team/echo.v1")
    assert (reply.status_code, reply.headers["allow"]) == (405, "POST")
    for row in WorkflowExecution.select():
        engine.wait(row.id, timeout=10)


def test_two_applies_registering_one_path_at_once_refuse_the_second_by_name(
        db, migrated_db_url):
    """SPEC 6.1/8: a webhook path has one owner; an apply that registers another
    workflow's path fails with ``webhook path "<p>" is already registered by workflow
    "<other>"``, also when the two applies run at once on PostgreSQL (both look for an owner
    before either commits): the second waits for the first's row, then names its owner."""
    if not is_postgres(db):
        pytest.skip("holds a table lock from another session (SQLite: applies take turns)")
    yaml = "name: {}\ntriggers: [{{type: webhook, path: /hooks/shared}}]\n" \
           "steps: [{{name: a, action: core/log, params: {{message: x}}}}]\n"
    # The first holds the path's row until its last write goes through.
    first, second = two_applies_at_once(migrated_db_url, yaml.format("first"),
                                        yaml.format("second"))
    assert first.error is None, first.error
    assert isinstance(second.error, WebhookPathTaken), second.error
    assert str(second.error) == ('webhook path "/hooks/shared" is already registered by '
                                 'workflow "first"')
    assert definitions.current_definition("second") is None
