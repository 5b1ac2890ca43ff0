"""API keys on the REST API (SPEC 7.1, 6.3, 9.3): enforced only while an active key exists,
picked up per request, refusals audited (summed per route: issue 15)."""

from __future__ import annotations

import collections

import falcon.testing

from mantle import apikeys
from mantle.db.models import ApiKey, AuditEvent, WorkflowExecution
from web.app import ApiRuntime, create_app
from web.settings import ApiSettings
from tests.web.support import apply_yaml, wait_until

TINY = """
    name: tiny
    triggers: [{type: webhook, path: /hooks/tiny}]
    steps: [{name: a, action: core/log, params: {message: x}}]
"""


def _refusals() -> list[tuple[str, str, str, dict]]:
    return [(row.actor, row.resource_type, row.resource_id, row.metadata["error"])
            for row in AuditEvent.select().where(AuditEvent.action == "auth.failed")
            .order_by(AuditEvent.id)]


def _counted() -> dict[str, int]:
    """Refusals per route, summed over the auth.failed rows."""
    counts: collections.Counter = collections.Counter()
    for row in AuditEvent.select().where(AuditEvent.action == "auth.failed"):
        assert row.actor == "api" and row.resource_type == "http_request"
        counts[row.resource_id] += row.metadata["count"]
    return dict(counts)


def test_without_active_keys_the_api_is_open(client):
    apply_yaml(TINY)
    assert client.simulate_post("/api/v1/run/tiny").status_code == 202
    key = apikeys.create_key("old")
    apikeys.revoke_key("old")
    assert client.simulate_get("/api/v1/executions").status_code == 200
    assert client.simulate_get("/api/v1/executions", headers={
        "Authorization": f"Bearer {key}"}).status_code == 200
    assert _refusals() == []


def test_an_active_key_is_required_on_api_and_hooks_with_exact_401_bodies(engine, db,
                                                                          readiness):
    runtime = ApiRuntime(db, ApiSettings(auth_audit_interval=0.2))
    client = falcon.testing.TestClient(create_app(engine, engine.metrics, db, readiness,
                                                  runtime))
    apply_yaml(TINY)
    key = apikeys.create_key("ci")
    cases = [
        ({}, "missing Authorization header"),
        ({"Authorization": ""}, "missing Authorization header"),
        ({"Authorization": f"Basic {key}"}, "Authorization header must use Bearer scheme"),
        ({"Authorization": key}, "Authorization header must use Bearer scheme"),
        ({"Authorization": "Bearer mk_" + "0" * 64}, "invalid API key"),
        ({"Authorization": "Bearer "}, "invalid API key"),
    ]
    for headers, message in cases:
        reply = client.simulate_post("/api/v1/run/tiny", headers=headers)
        assert (reply.status_code, reply.json) == (401, {"error": message}), headers
        assert reply.headers["www-authenticate"] == "Bearer"
    for method, path in (("GET", "/api/v1/executions/abc"), ("POST", "/hooks/tiny"),
                         ("GET", "/api/v1/openapi.json"), ("GET", "/api/v1/nothing-here")):
        reply = client.simulate_request(method, path)
        assert (reply.status_code, reply.json) == \
            (401, {"error": "missing Authorization header"}), path
    assert WorkflowExecution.select().count() == 0
    expected = {"/api/v1/run/{workflow}": len(cases), "/api/v1/executions/{id}": 1,
                "/hooks/{path}": 1, "/api/v1/openapi.json": 1, "unmatched": 1}
    try:
        wait_until(lambda: _counted() == expected, timeout=10)
    except AssertionError:
        assert _counted() == expected
    first = _refusals()[0]
    assert first == ("api", "http_request", "/api/v1/run/{workflow}",
                     "missing Authorization header")
    runtime.close()
    # Probes and metrics stay open.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.simulate_get(path).status_code == 200, path


def test_a_valid_key_opens_the_api_names_the_actor_and_records_its_use(client, engine):
    apply_yaml(TINY)
    key = apikeys.create_key("deployer")
    apikeys.create_key("other")
    assert ApiKey.get(ApiKey.name == "deployer").last_used_at is None
    reply = client.simulate_post("/api/v1/run/tiny", headers={"Authorization": f"bearer {key}"})
    assert reply.status_code == 202, reply.text
    execution_id = reply.json["execution_id"]
    audit = AuditEvent.get(AuditEvent.action == "workflow.executed")
    assert audit.actor == "apikey:deployer"
    assert ApiKey.get(ApiKey.name == "deployer").last_used_at is not None
    assert ApiKey.get(ApiKey.name == "other").last_used_at is None
    engine.wait(execution_id, timeout=10)
    # A revoked key is refused at once, without a restart; the remaining key still works.
    apikeys.revoke_key("deployer")
    reply = client.simulate_get("/api/v1/executions", headers={"Authorization": f"Bearer {key}"})
    assert (reply.status_code, reply.json) == (401, {"error": "invalid API key"})
    # With no active key left, the API is open again.
    apikeys.revoke_key("other")
    assert client.simulate_get("/api/v1/executions").status_code == 200


def test_keys_are_stored_as_sha256_with_a_short_prefix(db):
    key = apikeys.create_key("ci")
    assert key.startswith("mk_") and len(key) == 67
    row = ApiKey.get(ApiKey.name == "ci")
    assert row.key_hash == apikeys.hash_key(key) != key
    assert row.prefix == key[:9]
    assert key not in str([list(r) for r in ApiKey.select().tuples()])
