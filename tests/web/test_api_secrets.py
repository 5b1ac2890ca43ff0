"""Nothing secret served or stored (issue 15 items 1-3; SPEC 13.1.1, 13.8): webhook secrets
redacted by the API and ``plan``, credential headers dropped, signed webhook timestamps.

Over a real socket (``tests.web.served``) and the real command line, on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import textwrap
import time

import pytest

from mantle.db.models import WorkflowDefinition, WorkflowExecution
from tests.web.served import served
from tests.web.support import Daemon, apply_yaml, cli

SECRET = "s3cret-value"
SIGNED = f"""
    name: signed
    triggers:
      - {{type: webhook, path: /hooks/signed, secret: {SECRET}}}
      - {{type: webhook, path: /hooks/open}}
      - {{type: webhook, path: /hooks/strict, secret: {SECRET}, max_age: 30s}}
    steps:
      - {{name: show, action: core/log, params: {{message: "{{{{ trigger.headers }}}}"}}}}
"""


def _sign(body: bytes, stamp: str | None = None, secret: str = SECRET) -> dict[str, str]:
    signed = body if stamp is None else stamp.encode() + b"." + body
    headers = {"X-Hub-Signature-256": "sha256=" + hmac.new(secret.encode(), signed,
                                                           hashlib.sha256).hexdigest()}
    if stamp is not None:
        headers["X-Webhook-Timestamp"] = stamp
    return headers


@pytest.fixture
def api(engine, db):
    apply_yaml(SIGNED)
    with served(engine, db) as server:
        yield server


def _finished(engine, reply) -> dict:
    assert reply.status == 202, reply.text
    execution_id = reply.json["execution_id"]
    assert engine.wait(execution_id, timeout=10) == "completed"
    return WorkflowExecution.get_by_id(execution_id)


def test_workflow_and_version_endpoints_serve_webhook_secrets_as_a_marker(api):
    for path in ("/api/v1/workflows/signed", "/api/v1/workflows/signed/versions/1"):
        reply = api.get(path)
        assert reply.status == 200
        triggers = reply.json["definition"]["triggers"]
        assert [trigger.get("secret") for trigger in triggers] == ["********", None,
                                                                  "********"], path
        assert "secret" not in triggers[1]
        assert SECRET not in reply.text
    # Only what is served changes: the stored version keeps its secret (signatures need it).
    stored = WorkflowDefinition.get(WorkflowDefinition.workflow_name == "signed").definition
    assert stored["triggers"][0]["secret"] == SECRET


PLANNED = """
name: deploy
triggers:
{triggers}
steps: [{{name: a, action: core/log, params: {{message: hi}}}}]
"""


def test_plan_never_prints_a_secret_value(tmp_path, db, migrated_db_url):
    def plan(*triggers: str):
        (tmp_path / "deploy.yaml").write_text(PLANNED.format(triggers="\n".join(triggers)))
        result = cli(tmp_path, migrated_db_url, "plan", "deploy.yaml")
        assert result.returncode == 0, result.stderr
        for value in ("old-secret", "new-secret", "added-secret"):
            assert value not in result.stdout + result.stderr
        return result.stdout.splitlines()

    first = "  - {type: webhook, path: /hooks/a, secret: old-secret}"
    (tmp_path / "deploy.yaml").write_text(PLANNED.format(triggers=first))
    assert cli(tmp_path, migrated_db_url, "apply", "deploy.yaml").returncode == 0
    assert plan("  - {type: webhook, path: /hooks/a, secret: new-secret}",
                "  - {type: webhook, path: /hooks/b, secret: added-secret}") == [
        "~ deploy (version 1 → 2)",
        "  ~ triggers[0].secret: (changed)",
        "  + triggers[1].type: webhook",
        "  + triggers[1].path: /hooks/b",
        "  + triggers[1].secret: (changed)",
        "",
        "Plan: 1 workflow to update (version 1 → 2)"]
    assert plan("  - {type: webhook, path: /hooks/a}")[1] == "  - triggers[0].secret: (changed)"


def test_webhooks_drop_credential_headers_before_storing_them_or_showing_them_to_cel(api,
                                                                                     engine):
    body = b'{"n": 1}'
    credentials = {"Cookie": "session=abc", "Proxy-Authorization": "Basic eA==",
                   "X-Api-Key": "k-123", "X-Auth-Token": "t-1", "X-Gitlab-Token": "g-1",
                   "Authorization": "Bearer not-an-api-key"}
    row = _finished(engine, api.post("/hooks/open", body=body,
                                     headers={**credentials, "X-Event": "push"}))
    stored = row.trigger["headers"]
    assert stored["x-event"] == "push"
    assert not {name.lower() for name in credentials} & set(stored)
    detail = api.get(f"/api/v1/executions/{row.id}").json
    shown = detail["steps"][0]["output"]["message"]  # one template: the map itself
    assert shown == stored
    for value in credentials.values():
        assert value not in json.dumps(row.trigger)


def test_the_dropped_header_list_is_extended_by_configuration(tmp_path, db, migrated_db_url):
    apply_yaml(SIGNED)
    daemon = Daemon(tmp_path, migrated_db_url,
                    env={"MANTLE_WEBHOOK_DROP_HEADERS": "X-Custom-Token, x-other-secret"}
                    ).start()
    try:
        reply = daemon.post("/hooks/open", body=b"{}", headers={
            "X-Custom-Token": "c", "X-Other-Secret": "o", "Cookie": "x=1", "X-Kept": "k"})
        assert reply.status == 202, reply.text
        detail = daemon.wait_for_status(reply.json["execution_id"])
    finally:
        daemon.stop()
    headers = WorkflowExecution.get_by_id(detail["id"]).trigger["headers"]
    assert headers["x-kept"] == "k"
    assert not {"x-custom-token", "x-other-secret", "cookie"} & set(headers)


def test_a_signed_timestamp_is_accepted_within_five_minutes_and_refused_outside(api, engine):
    body = b'{"deploy": true}'
    now = int(time.time())
    _finished(engine, api.post("/hooks/signed", body=body, headers=_sign(body, str(now))))
    _finished(engine, api.post("/hooks/signed", body=body, headers=_sign(body, str(now - 250))))
    # The old scheme (no timestamp) still works where max_age is not set.
    _finished(engine, api.post("/hooks/signed", body=body, headers=_sign(body)))
    stale = "webhook timestamp is not within 5m of the server's time"
    refused = [
        (_sign(body, str(now - 400)), stale),
        (_sign(body, str(now + 400)), stale),
        # The timestamp is signed with the body: replaying a body signature with a fresh
        # timestamp, or changing the timestamp, does not verify.
        ({**_sign(body), "X-Webhook-Timestamp": str(now)},
         "invalid or missing webhook signature"),
        ({**_sign(body, str(now - 400)), "X-Webhook-Timestamp": str(now)},
         "invalid or missing webhook signature"),
        ({**_sign(body, "12ab"), "X-Webhook-Timestamp": "12ab"},
         "invalid X-Webhook-Timestamp header: must be Unix time in seconds"),
    ]
    before = WorkflowExecution.select().count()
    for headers, message in refused:
        reply = api.post("/hooks/signed", body=body, headers=headers)
        assert (reply.status, reply.json) == (403, {"error": message}), headers
    assert WorkflowExecution.select().count() == before


def test_a_webhook_with_max_age_requires_a_recent_signed_timestamp(api, engine):
    body = b"{}"
    now = int(time.time())
    for headers, message in (
            (_sign(body), "missing X-Webhook-Timestamp header (the webhook sets max_age)"),
            (_sign(body, str(now - 45)), "webhook timestamp is not within 30s of the server's "
                                         "time")):
        reply = api.post("/hooks/strict", body=body, headers=headers)
        assert (reply.status, reply.json) == (403, {"error": message})
    _finished(engine, api.post("/hooks/strict", body=body, headers=_sign(body, str(now - 5))))


def test_max_age_is_validated_like_the_other_durations(tmp_path):
    (tmp_path / "bad.yaml").write_text(textwrap.dedent("""
        name: bad
        triggers:
          - {type: webhook, path: /hooks/a, secret: s, max_age: soon}
          - {type: webhook, path: /hooks/b, secret: s, max_age: 0s}
        steps: [{name: a, action: core/log, params: {message: hi}}]
    """))
    result = cli(tmp_path, "sqlite:///unused.db", "validate", "bad.yaml")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        'bad.yaml:4:48: error: invalid duration: "soon" (triggers[0].max_age)',
        "bad.yaml:5:48: error: max_age must be a positive duration (triggers[1].max_age)",
        "Error: validation failed"]
